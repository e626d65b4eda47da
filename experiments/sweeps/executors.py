"""The executors that run a sweep's trials: a local process pool (concurrent.futures.ProcessPoolExecutor, forkserver
or spawn) and Ray; both submit a trial once the trials it refers to are finished, and yield each trial's Outcome
as it ends."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import shutil
import signal
import subprocess
import time

from experiments.sweeps import language as sweeps
from experiments.sweeps.trials import Outcome, init_worker, record_failure, run_trial

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SweepError(RuntimeError):
  """The sweep cannot run as asked (executor unavailable, bad flag); the message says what would work."""


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def local_gpus() -> int:
  """GPUs `nvidia-smi -L` lists (0 without it); honours CUDA_VISIBLE_DEVICES and JAX_PLATFORMS=cpu."""
  if os.environ.get('JAX_PLATFORMS', '').lower() == 'cpu' or not shutil.which('nvidia-smi'):
    return 0
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return len([v for v in visible.split(',') if v.strip()])
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20).stdout
  except (OSError, subprocess.TimeoutExpired):
    return 0
  return sum(1 for line in out.splitlines() if line.startswith('GPU '))


class _Scheduler:
  """Submits trials whose referenced trials are finished, in sweep order; yields outcomes as they end."""

  def __init__(self, run: list[sweeps.Trial]):
    self.waiting = list(run)
    self.selected = {t.index for t in run}
    self.finished: set[int] = set()

  def ready(self) -> list[sweeps.Trial]:
    out = [t for t in self.waiting if all(d not in self.selected or d in self.finished for d in t.deps)]
    for t in out:
      self.waiting.remove(t)
    return out


def _failed(t: sweeps.Trial, e: BaseException | str) -> Outcome:
  error = e if isinstance(e, str) else f'{type(e).__name__}: {e}'.splitlines()[0][:300]
  return Outcome(t.index, t.name, 'failed', error=error)


def run_local(run, make, workers: int, start_method: str, emit, gpus: int):
  """Process-pool executor: yields each trial's Outcome; rebuilds the pool if a worker dies.

  The pool's workers are this process's only multiprocessing children, so `multiprocessing.active_children()`
  names them: kept by pid, they give the exit code of a worker that died (which trial killed the pool) and
  let an interrupted sweep end its workers at once.
  """
  ctx = multiprocessing.get_context(start_method)
  sched = _Scheduler(run)
  cache_dir = make(run[0]).cache_dir
  started: dict[int, int] = {}  # trial index -> worker pid
  procs: dict[int, multiprocessing.Process] = {}  # worker pid -> its process (alive or not)
  queues = {}

  def new_pool():  # fresh queues too: a worker killed while writing may leave one unusable
    # SimpleQueue.put() writes at once, so a start event survives a worker that dies right after it.
    queues['events'] = ctx.SimpleQueue()
    queues['gpus'] = None
    if gpus:
      queues['gpus'] = ctx.Queue()
      for i in range(workers):
        queues['gpus'].put(i % gpus)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                                  initargs=(queues['events'], queues['gpus'], cache_dir, os.getpid()))

  def drain():
    procs.update((p.pid, p) for p in multiprocessing.active_children())
    events = queues['events']
    while not events.empty():
      kind, index, pid, when = events.get()
      started[index] = pid
      emit((kind, index, pid, when))

  pool, running = new_pool(), {}
  try:
    while sched.waiting or running:
      for t in sched.ready():
        running[pool.submit(run_trial, make(t))] = t
      if not running:
        break
      drain()  # the workers that submit() started, before any can die
      done, _ = concurrent.futures.wait(running, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
      drain()
      broken = []
      for fut in done:
        t = running.pop(fut)
        try:
          out = fut.result()
        except concurrent.futures.process.BrokenProcessPool:
          broken.append(t)
          continue
        except Exception as e:  # noqa: BLE001 - run_trial itself failed (e.g. its claim on a full disk)
          out = _failed(t, e)
        sched.finished.add(t.index)
        yield out
      if broken:
        pool.shutdown(wait=True)  # the pool has terminated its other workers: every exit code is known
        yield from _recover(broken + list(running.values()), procs, started, sched, make)
        running, pool = {}, new_pool()
  finally:
    _stop_pool(pool, procs)


def _recover(lost, procs, started, sched, make):
  """After a worker died: the trial it ran is recorded as failed; the others it took down run again."""
  for p in procs.values():
    p.join(timeout=15)
  codes = {pid: p.exitcode for pid, p in procs.items()}
  term = -signal.SIGTERM
  culprits = [t for t in lost if t.index in started and codes.get(started[t.index]) not in (term, None, 0)]
  if not culprits:  # cannot tell which one: every trial that had started is suspect
    culprits = [t for t in lost if t.index in started]
  for t in lost:
    if t in culprits:
      code = codes.get(started.get(t.index))
      msg = f'the worker process running this trial died (exit code {code}); see {t.name}/train.log'
      record_failure(make(t), None, msg)
      sched.finished.add(t.index)
      yield _failed(t, msg)
    else:
      sched.waiting.insert(0, t)  # interrupted by the pool's breakdown: resumes from its checkpoint
    started.pop(t.index, None)
  procs.clear()


# How long a stopped sweep waits for its workers: a running trial first saves a checkpoint of its last step
# (experiments.training.runner), which on a loaded machine took more than the 10 s this was.
STOP_WAIT_SEC = 60


def _stop_pool(pool, procs) -> None:
  """Ends our own worker processes now (their trials save their last step and resume from it on the next run)."""
  procs.update((p.pid, p) for p in multiprocessing.active_children())
  pool.shutdown(wait=False, cancel_futures=True)
  for p in procs.values():
    if p.is_alive():
      p.terminate()
  deadline = time.time() + STOP_WAIT_SEC
  for p in procs.values():
    p.join(timeout=max(0.1, deadline - time.time()))


def _import_ray(local: bool):
  if local:  # Ray's node address is a routable IP unless this is off (read when ray is first imported)
    os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
  os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
  try:
    import ray  # noqa: PLC0415 -- an optional dependency (qjax[ray]), imported when asked for
  except ImportError:
    raise SweepError("--executor=ray needs Ray, which is not installed: pip install 'ray[default]' "
                     "(or pip install -e '.[ray]'); or use --executor=local") from None
  return ray


def run_ray(run, make, workers: int, address: str | None, emit):
  ray = _import_ray(local=not address)
  started_here = not ray.is_initialized()
  if started_here:
    if address:
      ray.init(address=address, log_to_driver=False)
    else:
      ray.init(num_cpus=workers, include_dashboard=False, dashboard_host='127.0.0.1', log_to_driver=False,
               runtime_env={'env_vars': {'PYTHONPATH': os.pathsep.join(
                   p for p in (REPO_ROOT, os.environ.get('PYTHONPATH')) if p)}})
  try:
    gpus = ray.cluster_resources().get('GPU', 0)
    options = {'num_cpus': 1, 'max_retries': 0}
    if gpus:  # one GPU per trial; a fresh worker each time, as JAX binds its GPU once per process
      options.update(num_gpus=1, max_calls=1)
    remote = ray.remote(**options)(run_trial)
    sched = _Scheduler(run)
    running = {}
    while sched.waiting or running:
      for t in sched.ready():
        running[remote.remote(make(t))] = t
        emit(('start', t.index, None, time.time()))
      if not running:
        break
      done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
      for ref in done:
        t = running.pop(ref)
        sched.finished.add(t.index)
        try:
          yield ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the Ray worker died (the trial's own errors are returned)
          record_failure(make(t), e)
          yield _failed(t, e)
  finally:
    if started_here:
      ray.shutdown()
