"""Run files on disk: the one atomic writer (and its JSON form), the readers of run files (and the one rule of a
finished run), the one directory-size count, and claims: who is running the run in a workdir.

A leaf module (it imports nothing from `experiments`) so that every layer that writes run files, from the sweep
language to checkpoints and the bench, can import it without cycles or without pulling orbax in.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any

import numpy as np


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """`data` written to a temp file in the same directory, then renamed over `path`, so a reader never sees a
  half-written file. The file gets the permissions a plain `open` would give (0o666 less the umask), not mkstemp's
  private 0o600, so other users of a shared run directory (or dataset cache) can read it. The one atomic writer
  of run files, reports and the dataset cache.
  """
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp-', suffix='.' + os.path.basename(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  """`obj` as JSON, written atomically (write_atomic). Keys are sorted (run files diff cleanly); numpy scalars and
  arrays become JSON numbers and lists, anything else unknown its `str`."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o):
  """JSON for what `json` cannot write: numpy numbers and arrays as numbers and lists, the rest as `str`."""
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def dir_bytes(path: str | os.PathLike) -> int:
  """Bytes of all files under `path` (recursively): what a checkpoint, run or dataset directory takes on disk; 0 when
  `path` is missing or not a directory."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


_WARNED: set[str] = set()


def read_json(path: str) -> Any | None:
  """The JSON in `path`, or None when it is missing or unreadable (a run file being written, or cut short)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def read_result(workdir: str) -> dict | None:
  """The run's result.json, or None when the run is not finished: no file, or one that is not a valid result
  (truncated by a full disk or a copy, edited by hand), which is warned about on stderr once per path.

  The one rule of "finished" the runner, the sweep and the report share: an invalid result is not finished.
  """
  path = os.path.join(workdir, 'result.json')
  try:
    with open(path) as f:
      result = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    problem = f'{type(e).__name__}: {e}'
  else:
    if isinstance(result, dict):
      return result
    problem = f'a JSON {type(result).__name__}, not an object'
  if path not in _WARNED:
    _WARNED.add(path)
    print(f'warning: {path} is not a valid result ({problem}); the run counts as not finished: rerunning resumes '
          'it from its checkpoints and replaces the file when it finishes', file=sys.stderr, flush=True)
  return None


def run_status(workdir: str) -> str:
  """'done' (a valid result.json), 'failed' (error.json), 'interrupted' (a checkpoint, no result) or 'pending'.

  The one classification the sweep (--dry_run, reruns) and the report share, so both call a run the same. A run
  stopped before its first checkpoint (an empty checkpoints/ directory) is 'pending': a rerun starts it afresh.
  """
  if read_result(workdir) is not None:
    return 'done'
  if os.path.exists(os.path.join(workdir, 'error.json')):
    return 'failed'
  if checkpoint_steps(workdir):
    return 'interrupted'
  return 'pending'


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints saved in <workdir>/checkpoints (orbax names each step's directory by its
  number), ascending; [] when there are none."""
  ckpts = os.path.join(workdir, 'checkpoints')
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []


# ------------------------------------------------------------------------------------------------ claims


class Claim:
  """An exclusive flock on <workdir>/.claim, holding 'pid host' for messages: whoever holds it runs the run in
  that workdir (a sweep's trial, or the float model a PTQ run starts from), so every run is made once, whatever
  process makes it (local workers, Ray tasks, `--index` jobs on other machines, a lone `experiments.train`).

  The kernel drops the lock when its process dies, so a claim is never stale on a local file system (and
  on NFS with working lockd, where Linux maps flock to POSIX locks).
  """

  def __init__(self, fd: int, path: str):
    self.fd, self.path = fd, path

  # A lock held for less than this is a probe (`is_held`: the report asking whether a run is in progress), not a
  # run: acquire(wait=False) tries again until then, so that a report never turns a starting run away.
  PROBE_S = 0.5

  @classmethod
  def acquire(cls, workdir: str, wait: bool = False) -> Claim | None:
    """The claim of `workdir`; None if another process holds it, or with `wait`, once that process is done."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, '.claim')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + cls.PROBE_S
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          os.close(fd)
          return None
        time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()} {socket.gethostname()} {time.time():.0f}\n'.encode(), 0)
    return cls(fd, path)

  @staticmethod
  def holder(workdir: str) -> str:
    try:
      with open(os.path.join(workdir, '.claim')) as f:
        pid, host, *_ = f.read().split() + ['?', '?']
      return f'pid {pid} on {host}'
    except OSError:
      return 'another process'

  @staticmethod
  def is_held(workdir: str) -> bool:
    """Whether a process holds the claim now. A probe: it takes the lock for an instant and writes nothing (a run
    starting meanwhile waits it out, see PROBE_S)."""
    try:
      fd = os.open(os.path.join(workdir, '.claim'), os.O_RDONLY)
    except FileNotFoundError:
      return False
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      fcntl.flock(fd, fcntl.LOCK_UN)
      return False
    except BlockingIOError:
      return True
    finally:
      os.close(fd)

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None
