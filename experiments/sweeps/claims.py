"""Trial claims: an exclusive flock on <workdir>/.claim, so that every trial of a sweep runs once, whatever runs
it (local workers, Ray tasks, `--index` jobs on other machines)."""

from __future__ import annotations

import fcntl
import os
import socket
import time


class Claim:
  """An exclusive flock on <workdir>/.claim, holding 'pid host' for messages.

  The kernel drops the lock when its process dies, so a claim is never stale on a local file system (and
  on NFS with working lockd, where Linux maps flock to POSIX locks).
  """

  def __init__(self, fd: int, path: str):
    self.fd, self.path = fd, path

  @classmethod
  def acquire(cls, workdir: str) -> Claim | None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, '.claim')
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return None
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
    claim = Claim.acquire(workdir)
    if claim is None:
      return True
    claim.release()
    return False

  def release(self) -> None:
    if self.fd is not None:
      os.ftruncate(self.fd, 0)
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None
