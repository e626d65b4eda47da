"""Running one trial, in whatever process runs it (a local worker, a Ray task, an --index job): its claim, its log
(<root>/<name>/train.log), the trial function, and error.json when it fails. A `Task` is what the launcher hands
over (make_task in launch.py); an `Outcome` is what comes back."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import ml_collections

from experiments import fileio
from experiments.config import cli as config_cli
from experiments.fileio import Claim


class DependencyFailed(RuntimeError):
  pass


@dataclasses.dataclass(frozen=True)
class Task:
  """One trial as a worker runs it: where (root/name), what (config, trial_fn) and the trials it starts from."""
  index: int
  name: str
  id: str
  root: str
  group: str                     # its HParams session group (labels without the seed)
  config: dict                   # the trial's config as plain data
  trial_fn: str                  # 'module:function', called as fn(config, workdir, log=...)
  cache_dir: str                 # the root's persistent JAX compilation cache
  retry: bool = False            # rerun it (and a failed trial it starts from) if it failed before
  deps: tuple[Task, ...] = ()    # the trials it refers to (sweeps.trial_ref): finished before it starts
  on_event: Callable | None = None  # in-process runs (--index): receives the start event

  @property
  def workdir(self) -> str:
    return os.path.join(self.root, self.name)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a trial ended: status 'done' | 'skipped' (finished or failed before) | 'claimed' (another process runs
  it) | 'failed'; its metrics (eval and serving), times, error line and the run's warnings."""
  index: int
  name: str
  status: str
  metrics: dict = dataclasses.field(default_factory=dict)
  elapsed: float = 0.0
  cpu: float = 0.0
  error: str = ''
  unwritten: bool = False        # error.json could not be written (full disk)
  warnings: tuple[str, ...] = ()
  pid: int = 0


_WORKER: dict[str, Any] = {'events': None, 'cache_dir': None}


def init_worker(events, gpu_ids, cache_dir: str, sweep_pid: int) -> None:
  """Pool worker setup: start events to the parent, its GPU, the JAX cache, exit when the sweep dies."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it terminates us on Ctrl-C
  # ... with SIGTERM: a running trial checkpoints its last step first (KeyboardInterrupt in the runner), then the
  # worker dies of the signal as before (run_trial); an idle worker dies at once.
  signal.signal(signal.SIGTERM, _on_term)
  _WORKER['events'] = events
  if gpu_ids is not None:
    gpu = gpu_ids.get()
    os.environ['CUDA_VISIBLE_DEVICES'] = str(gpu)
  setup_jax_cache(cache_dir)
  parent = os.getppid()

  def watchdog():  # a killed sweep leaves no orphans (a forkserver outlives it while its workers live)
    while True:
      time.sleep(1.0)
      try:
        os.kill(sweep_pid, 0)
      except ProcessLookupError:
        os._exit(1)
      if os.getppid() != parent:
        os._exit(1)

  threading.Thread(target=watchdog, daemon=True).start()


def _on_term(signum, frame):
  if _WORKER.get('running'):
    raise KeyboardInterrupt('terminated by the sweep')
  _die_of(signum)


def _die_of(signum: int) -> NoReturn:
  """Ends this worker by the signal's default action, so the pool sees the exit code it sent."""
  signal.signal(signum, signal.SIG_DFL)
  os.kill(os.getpid(), signum)
  time.sleep(5)  # the signal is delivered before this returns
  os._exit(128 + signum)


def setup_jax_cache(cache_dir: str) -> None:
  """The persistent compilation cache shared by every trial of a root, small programs included."""
  if _WORKER['cache_dir'] == cache_dir:
    return
  import jax  # noqa: PLC0415 -- here, not at the top: the sweep's parent process (--help, --dry_run) stays free of JAX
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  _WORKER['cache_dir'] = cache_dir


def _emit(kind: str, task: Task) -> None:
  event = (kind, task.index, os.getpid(), time.time())
  q = _WORKER['events']
  if q is not None:
    q.put(event)
  elif task.on_event is not None:
    task.on_event(event)


@contextlib.contextmanager
def _output_to(path: str):
  """Sends this process's stdout and stderr (file descriptors 1 and 2) to `path` for the block."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(path, 'a') as f:
    os.dup2(f.fileno(), 1)
    os.dup2(f.fileno(), 2)
    try:
      yield f
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])


def _load_fn(spec: str):
  module, _, name = spec.partition(':')
  return getattr(importlib.import_module(module), name)


def _metrics_of(result: dict) -> dict:
  out = dict(result.get('metrics') or {})
  out.update({f'serving/{k.split("/")[-1]}': v for k, v in (result.get('serving_metrics') or {}).items()})
  return out


def record_failure(task: Task, exc: BaseException | None, message: str = '') -> dict:
  """Writes the trial's error.json (atomically): the exception, its traceback, where and when."""
  workdir = task.workdir
  err = {
      'trial': task.name, 'id': task.id, 'index': task.index,
      'type': type(exc).__name__ if exc else 'WorkerDied',
      'message': str(exc) if exc else message,
      'traceback': ''.join(traceback.format_exception(exc)) if exc else '',
      'run_error': type(exc).__name__ in ('RunError', 'NonFiniteLoss'),
      'host': socket.gethostname(), 'pid': os.getpid(), 'time': time.time(),
      'log': os.path.join(workdir, 'train.log'),
  }
  try:
    fileio.write_json_atomic(os.path.join(workdir, 'error.json'), err)
  except OSError as e:  # a full disk: the sweep still reports the failure (its line and tally say it)
    err['message'] += f' (error.json not written: {e.strerror or e})'
    err['unwritten'] = True
  return err


def _ensure_deps(task: Task) -> None:
  """Each trial this one refers to is finished when this returns: run here if nobody has run it, waited for
  (blocking on its claim) while another process runs it. The same claim makes the float model of a lone PTQ run
  once (experiments/training/runner.py: load_float_state)."""
  for dep in task.deps:
    out = run_trial(dataclasses.replace(dep, retry=task.retry), wait=True)
    if out.status == 'failed':
      raise DependencyFailed(f'trial {dep.name!r}, which this trial starts from, failed: {out.error}')
    if fileio.read_result(dep.workdir) is None:
      raise DependencyFailed(f'trial {dep.name!r}, which this trial starts from, failed (see '
                             f'{dep.workdir}/error.json); rerun with --retry_failed')


def run_trial(task: Task, wait: bool = False) -> Outcome:
  """Runs one trial where this process is (pool worker, Ray worker, or --index); returns its outcome. A trial
  another process holds is 'claimed', or with `wait`, waited for (and then 'skipped' once finished).

  Never raises for a trial's own failure: that is recorded in <workdir>/error.json and returned.
  """
  setup_jax_cache(task.cache_dir)
  workdir = task.workdir
  out = functools.partial(Outcome, task.index, task.name, pid=os.getpid())
  claim = Claim.acquire(workdir, wait=wait)
  if claim is None:
    return out('claimed', error=f'claimed by {Claim.holder(workdir)}')
  try:
    finished = fileio.read_result(workdir)
    if finished is not None:
      return out('skipped', _metrics_of(finished))
    if os.path.exists(os.path.join(workdir, 'error.json')) and not task.retry:
      return out('skipped', error='failed earlier (--retry_failed reruns it)')
    t0, cpu0 = time.time(), time.process_time()
    try:
      _ensure_deps(task)
      _emit('start', task)
      config = ml_collections.ConfigDict(task.config)
      fn = _load_fn(task.trial_fn)
      with _output_to(os.path.join(workdir, 'train.log')) as log_file:
        print(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} trial {task.name} (id {task.id}) pid {os.getpid()} '
              f'on {socket.gethostname()}', flush=True)
        named = {'group_name': task.group} if 'group_name' in inspect.signature(fn).parameters else {}
        _WORKER['running'] = True
        try:
          result = fn(config, workdir, log=lambda *a: print(*a, file=log_file, flush=True), **named)
        finally:
          _WORKER['running'] = False
    except KeyboardInterrupt:
      if _WORKER['events'] is None:  # --index, in the sweep's own process: Ctrl-C goes on up
        raise
      claim.release()
      _die_of(signal.SIGTERM)  # a pool worker stopped by the sweep: its trial has saved what it could
    except Exception as e:  # noqa: BLE001 - a trial's failure is recorded, the sweep goes on
      if isinstance(e, OSError):  # a full disk or a permission: one line naming the path, not a traceback
        e = OSError(e.errno, f'{config_cli.os_error_text(e)}; its checkpoints so far are kept')
      err = record_failure(task, e)
      return out('failed', error=f'{err["type"]}: {err["message"]}'.splitlines()[0][:500],
                 unwritten=err.get('unwritten', False), elapsed=time.time() - t0, cpu=time.process_time() - cpu0)
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, 'error.json'))
    return out('done', _metrics_of(result or {}), elapsed=time.time() - t0, cpu=time.process_time() - cpu0,
               warnings=tuple((result or {}).get('warnings') or ()))
  finally:
    claim.release()
