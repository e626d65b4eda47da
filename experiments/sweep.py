r"""Run the sweep a config file declares (`get_sweep`, see experiments/sweeps.py), one workdir per trial.

    python -m experiments.sweep --config=configs/quickstart.py --root=runs/quickstart
        [--executor=local|ray] [--workers=N] [--index=i|env] [--dry_run] [--retry_failed] [--rerun_changed]
        [--ray_address=host:port] [--start_method=forkserver|spawn] [--trial_fn=module:function]
        [--config.key=value ...]

Trials run `experiments.train.train_and_evaluate(config, <root>/<name>)`; each trial's console output goes to
`<root>/<name>/train.log`. The sweep prints one line as a trial starts and one as it ends (metric, time),
then a tally, writes the HParams experiment and the report (experiments/report.py) at the root.

Executors:
  local (default)  a process pool started with 'forkserver' (or 'spawn'; 'fork' after JAX has started can
                   deadlock), its workers reused across trials, sharing a persistent JAX compilation cache in
                   <root>/.jax_cache. Default --workers: min(usable cores, trials), or the number of GPUs when
                   `nvidia-smi` lists some (one GPU per worker). A JAX process can use every core for large
                   ops, but the small models these sweeps train spend much of a step in Python dispatch,
                   batching and single-threaded compiles, which leave a core idle; so on 2 cores the default
                   is 2 workers. Give a large model the whole machine with --workers=1.
  ray              Ray (`pip install 'ray[default]'`, extra `qjax[ray]`). Without --ray_address a local Ray
                   starts bound to 127.0.0.1 with no dashboard and --workers CPUs; with it, the sweep joins
                   that cluster (the code and --root must be on every node). One GPU per trial when the
                   cluster has GPUs.
  --index=i        runs trial i alone in this process (Slurm arrays, Kubernetes indexed jobs); --index=env reads
                   SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX. `--dry_run` lists the trials with their indices
                   and status (done, failed, interrupted, pending; changed: its stored run has another config).

Reruns: finished trials (result.json) are skipped, interrupted ones resume from their checkpoints, failed ones
(error.json: exception and traceback) are skipped unless --retry_failed, which reruns only them. A rerun whose
config or overrides give a finished or interrupted trial another config than the one it ran is refused, listing
the keys that differ: use a new --root, or --rerun_changed, which moves those trials (and the ones starting from
them) to <root>/_replaced/ and runs them again. A trial is
claimed with an flock on <root>/<name>/.claim while it runs (released by the kernel if its process dies), so
two sweeps on one root never run the same trial twice; the second one skips it. A trial whose config refers to
another trial (sweeps.trial_ref, e.g. PTQ from the float trial) runs after it.

Exit status: 0 all selected trials finished, 1 some failed, 2 a config or flag error, 3 an executor error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import inspect
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from experiments import configlib, fileio, sweeps
from experiments.sweeps import Claim

DEFAULT_TRIAL_FN = 'experiments.train:train_and_evaluate'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ('config', 'root', 'executor', 'workers', 'index', 'dry_run', 'retry_failed', 'rerun_changed',
         'ray_address', 'start_method', 'trial_fn')
REPLACED = '_replaced'  # <root>/_replaced/<name>-<time>: trials moved aside by --rerun_changed


class SweepError(RuntimeError):
  """The sweep cannot run as asked (executor unavailable, bad flag); the message says what would work."""


class DependencyFailed(RuntimeError):
  pass


# ------------------------------------------------------------------------------------------ worker side

_WORKER: dict[str, Any] = {'events': None, 'cache_dir': None}


def _init_worker(events, gpu_ids, cache_dir: str, sweep_pid: int) -> None:
  """Pool worker setup: start events to the parent, its GPU, the JAX cache, exit when the sweep dies."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it terminates us on Ctrl-C
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


def setup_jax_cache(cache_dir: str) -> None:
  """The persistent compilation cache shared by every trial of a root, small programs included."""
  if _WORKER['cache_dir'] == cache_dir:
    return
  import jax  # noqa: PLC0415
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  _WORKER['cache_dir'] = cache_dir


def _emit(kind: str, task: dict) -> None:
  event = (kind, task['index'], os.getpid(), time.time())
  q = _WORKER['events']
  if q is not None:
    q.put(event)
  elif callable(task.get('on_event')):
    task['on_event'](event)


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


def record_failure(workdir: str, task: dict, exc: BaseException | None, message: str = '') -> dict:
  """Writes <workdir>/error.json (atomically): the exception, its traceback, where and when."""
  err = {
      'trial': task['name'], 'id': task['id'], 'index': task['index'],
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


def _ensure_deps(task: dict) -> None:
  """Each trial this one refers to must be finished; one nobody runs yet is run here first."""
  for dep in task.get('dep_tasks', []):
    workdir = os.path.join(dep['root'], dep['name'])
    while True:
      if sweeps.read_result(workdir) is not None:
        break
      if os.path.exists(os.path.join(workdir, 'error.json')) and not task.get('retry'):
        raise DependencyFailed(f'trial {dep["name"]!r}, which this trial starts from, failed (see '
                               f'{workdir}/error.json); rerun with --retry_failed')
      if not Claim.is_held(workdir):
        out = run_trial({**dep, 'retry': task.get('retry', False)})
        if out['status'] == 'failed':
          raise DependencyFailed(f'trial {dep["name"]!r}, which this trial starts from, failed: {out["error"]}')
        if out['status'] != 'claimed':
          continue
      time.sleep(2.0)  # another process runs it: wait for its result


def run_trial(task: dict) -> dict:
  """Runs one trial where this process is (pool worker, Ray worker, or --index); returns its outcome.

  Never raises for a trial's own failure: that is recorded in <workdir>/error.json and returned.
  """
  setup_jax_cache(task['cache_dir'])
  workdir = os.path.join(task['root'], task['name'])
  out = {'index': task['index'], 'name': task['name'], 'status': 'done', 'metrics': {}, 'elapsed': 0.0,
         'error': '', 'pid': os.getpid()}
  claim = Claim.acquire(workdir)
  if claim is None:
    return {**out, 'status': 'claimed', 'error': f'claimed by {Claim.holder(workdir)}'}
  try:
    finished = sweeps.read_result(workdir)
    if finished is not None:
      return {**out, 'status': 'skipped', 'metrics': _metrics_of(finished)}
    if os.path.exists(os.path.join(workdir, 'error.json')) and not task.get('retry'):
      return {**out, 'status': 'skipped', 'error': 'failed earlier (--retry_failed reruns it)'}
    t0, cpu0 = time.time(), time.process_time()
    try:
      _ensure_deps(task)
      _emit('start', task)
      import ml_collections  # noqa: PLC0415
      config = ml_collections.ConfigDict(task['config'])
      fn = _load_fn(task['trial_fn'])
      with _output_to(os.path.join(workdir, 'train.log')) as log_file:
        print(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} trial {task["name"]} (id {task["id"]}) pid {os.getpid()} '
              f'on {socket.gethostname()}', flush=True)
        named = {'group_name': task['group']} if 'group_name' in inspect.signature(fn).parameters else {}
        result = fn(config, workdir, log=lambda *a: print(*a, file=log_file, flush=True), **named)
    except Exception as e:  # noqa: BLE001 - a trial's failure is recorded, the sweep goes on
      if isinstance(e, OSError):  # a full disk or a permission: one line naming the path, not a traceback
        e = OSError(e.errno, f'{configlib.os_error_text(e)}; its checkpoints so far are kept')
      err = record_failure(workdir, task, e)
      return {**out, 'status': 'failed', 'error': f'{err["type"]}: {err["message"]}'.splitlines()[0][:500],
              'unwritten': err.get('unwritten', False),
              'elapsed': time.time() - t0, 'cpu': time.process_time() - cpu0}
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(workdir, 'error.json'))
    return {**out, 'metrics': _metrics_of(result or {}), 'elapsed': time.time() - t0,
            'cpu': time.process_time() - cpu0, 'warnings': (result or {}).get('warnings') or []}
  finally:
    claim.release()


# ------------------------------------------------------------------------------------------ parent side


@dataclasses.dataclass
class Plan:
  trials: list[sweeps.Trial]      # every trial of the sweep
  run: list[sweeps.Trial]         # the ones to run now
  skipped: dict[str, str]         # name -> why


def trial_status(root: str, trial: sweeps.Trial) -> str:
  workdir = trial.workdir(root)
  if sweeps.read_result(workdir) is not None:
    return 'done'
  if os.path.exists(os.path.join(workdir, 'error.json')):
    return 'failed'
  if os.path.isdir(os.path.join(workdir, 'checkpoints')):
    return 'interrupted'
  return 'pending'


def plan(trials: list[sweeps.Trial], root: str, *, index: int | None = None, retry_failed: bool = False) -> Plan:
  chosen = trials if index is None else [trials[index]]
  run, skipped = [], {}
  for t in chosen:
    status = trial_status(root, t)
    if status == 'done':
      skipped[t.name] = 'finished'
    elif status == 'failed' and not retry_failed:
      skipped[t.name] = 'failed earlier (--retry_failed reruns it)'
    elif retry_failed and status != 'failed' and index is None:
      skipped[t.name] = f'{status}, not failed (--retry_failed runs only failed trials)'
    else:
      run.append(t)
  return Plan(trials, run, skipped)


def stored_config(root: str, trial: sweeps.Trial) -> dict | None:
  """The config a trial's workdir already holds: its finished result's, else config.json beside checkpoints."""
  workdir = trial.workdir(root)
  result = sweeps.read_result(workdir)
  if result is not None and isinstance(result.get('config'), dict):
    return result['config']
  data = sweeps.read_json(os.path.join(workdir, 'config.json'))
  return data if isinstance(data, dict) and os.path.isdir(os.path.join(workdir, 'checkpoints')) else None


def changed_trials(trials: list[sweeps.Trial], chosen: list[sweeps.Trial], root: str) -> dict[str, list[str]]:
  """Trial name -> the config keys its stored run differs in from the config it would run now.

  A trial starting from a changed trial (sweeps.trial_ref) counts as changed too: its stored run derives from
  the old one.
  """
  changed = {}
  for t in chosen:
    stored = stored_config(root, t)
    if stored is not None:
      keys = configlib.changed_keys(stored, json.loads(json.dumps(configlib.to_dict(t.config), default=str)))
      if keys:
        changed[t.name] = keys
  grew = True
  while grew:
    grew = False
    for t in chosen:
      if t.name not in changed and stored_config(root, t) is not None:
        bad = [trials[d].name for d in t.deps if trials[d].name in changed]
        if bad:
          changed[t.name], grew = [f'(starts from {bad[0]})'], True
  return changed


def _changed_message(changed: dict[str, list[str]], root: str) -> str:
  lines = [f'{len(changed)} trial(s) under {root} hold runs of a different config than this command gives them '
           '(kept as they are):']
  for name, keys in list(changed.items())[:10]:
    more = f' and {len(keys) - 6} more' if len(keys) > 6 else ''
    lines.append(f'  {name}: {", ".join(keys[:6])}{more}')
  if len(changed) > 10:
    lines.append(f'  ... and {len(changed) - 10} more')
  lines.append(f'Use a new --root for the new settings, or add --rerun_changed to move those trials to '
               f'{os.path.join(root, REPLACED)}/ and run them again.')
  return '\n'.join(lines)


def replace_changed(root: str, names: list[str]) -> list[str]:
  """Moves the changed trials' workdirs to <root>/_replaced/ (nothing is deleted); returns where each went."""
  if not names:
    return []
  held = [n for n in names if Claim.is_held(os.path.join(root, n))]
  if held:
    raise configlib.ConfigError(f'--rerun_changed: {", ".join(held)} is running in another process; rerun when '
                                'it has ended')
  os.makedirs(os.path.join(root, REPLACED), exist_ok=True)
  moved = []
  for n in names:
    dest = os.path.join(root, REPLACED, f'{n}-{time.strftime("%Y%m%d-%H%M%S")}')
    os.replace(os.path.join(root, n), dest)
    moved.append(dest)
  return moved


def group_name(trial: sweeps.Trial) -> str:
  """The trial's HParams session group: its labels without the seed ('mode=qat,bits=w4a4'), so TensorBoard names
  a configuration as the sweep does and groups its seeds."""
  return ','.join(f'{k}={v}' for k, v in trial.labels.items() if not sweeps.is_seed_key(k)) or trial.name


def make_task(trial: sweeps.Trial, trials: list[sweeps.Trial], root: str, trial_fn: str, retry: bool) -> dict:
  return {
      'index': trial.index, 'name': trial.name, 'id': trial.id, 'root': root, 'group': group_name(trial),
      'config': configlib.to_dict(trial.config), 'trial_fn': trial_fn, 'retry': retry,
      'cache_dir': os.path.join(root, '.jax_cache'),
      'dep_tasks': [make_task(trials[d], trials, root, trial_fn, retry) for d in trial.deps],
  }


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


def _run_local(run, make, workers: int, start_method: str, emit, gpus: int):
  """Process-pool executor: yields each trial's outcome; rebuilds the pool if a worker dies."""
  ctx = multiprocessing.get_context(start_method)
  sched = _Scheduler(run)
  cache_dir = make(run[0])['cache_dir']
  started: dict[int, int] = {}  # trial index -> worker pid
  queues = {}
  pool = running = None

  def new_pool():  # fresh queues too: a worker killed while writing may leave one unusable
    # SimpleQueue.put() writes at once, so a start event survives a worker that dies right after it.
    queues['events'] = ctx.SimpleQueue()
    queues['gpus'] = None
    if gpus:
      queues['gpus'] = ctx.Queue()
      for i in range(workers):
        queues['gpus'].put(i % gpus)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                  initargs=(queues['events'], queues['gpus'], cache_dir, os.getpid()))

  def drain():
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
          out = {'index': t.index, 'name': t.name, 'status': 'failed', 'metrics': {}, 'elapsed': 0.0,
                 'error': f'{type(e).__name__}: {e}'.splitlines()[0][:300]}
        sched.finished.add(t.index)
        yield out
      if broken:
        yield from _recover(broken + list(running.values()), pool, started, sched, make)
        running = {}
        pool.shutdown(wait=True)
        pool = new_pool()
  finally:
    _stop_pool(pool)


def _recover(lost, pool, started, sched, make):
  """After a worker died: the trial it ran is recorded as failed; the others it took down run again."""
  procs = dict(getattr(pool, '_processes', None) or {})
  for p in procs.values():  # the pool terminates the others: wait, so every exit code is known
    p.join(timeout=15)
  codes = {pid: p.exitcode for pid, p in procs.items()}
  term = -signal.SIGTERM
  culprits = [t for t in lost if t.index in started and codes.get(started[t.index]) not in (term, None, 0)]
  if not culprits:  # cannot tell which one: every trial that had started is suspect
    culprits = [t for t in lost if t.index in started]
  for t in lost:
    if t in culprits:
      code = codes.get(started.get(t.index))
      task = make(t)
      msg = f'the worker process running this trial died (exit code {code}); see {t.name}/train.log'
      record_failure(os.path.join(task['root'], t.name), task, None, msg)
      sched.finished.add(t.index)
      yield {'index': t.index, 'name': t.name, 'status': 'failed', 'metrics': {}, 'elapsed': 0.0, 'error': msg}
    else:
      sched.waiting.insert(0, t)  # interrupted by the pool's breakdown: resumes from its checkpoint
    started.pop(t.index, None)


def _stop_pool(pool) -> None:
  """Ends our own worker processes now (their trials resume from checkpoints on the next run)."""
  if pool is None:
    return
  procs = list(getattr(pool, '_processes', {}).values())
  pool.shutdown(wait=False, cancel_futures=True)
  for p in procs:
    if p.is_alive():
      p.terminate()
  for p in procs:
    p.join(timeout=10)


def _import_ray(local: bool):
  if local:  # Ray's node address is a routable IP unless this is off (read when ray is first imported)
    os.environ.setdefault('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
  os.environ.setdefault('RAY_USAGE_STATS_ENABLED', '0')
  try:
    import ray  # noqa: PLC0415
  except ImportError:
    raise SweepError("--executor=ray needs Ray, which is not installed: pip install 'ray[default]' "
                     "(or pip install -e '.[ray]'); or use --executor=local") from None
  return ray


def _run_ray(run, make, workers: int, address: str | None, emit):
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
          task = make(t)
          record_failure(os.path.join(task['root'], t.name), task, e)
          yield {'index': t.index, 'name': t.name, 'status': 'failed', 'metrics': {}, 'elapsed': 0.0,
                 'error': f'{type(e).__name__}: {e}'.splitlines()[0][:300]}
  finally:
    if started_here:
      ray.shutdown()


# ----------------------------------------------------------------------------------------------- driver


def _fmt_time(s: float) -> str:
  m, s = divmod(int(s), 60)
  return f'{m}m{s:02d}s' if m else f'{s}s'


def _metric_text(metrics: dict, names: list[str]) -> str:
  parts = []
  for name in names:
    if name in metrics:
      parts.append(f'{name.split("/")[-1]}={metrics[name]:.4f}')
      serving = metrics.get(f'serving/{name.split("/")[-1]}')
      if serving is not None and name == names[0]:
        parts.append(f'(serving {serving:.4f})')
      break
  return ' '.join(parts)


def validate_trials(trials: list[sweeps.Trial]) -> None:
  """Checks every trial's config as the runner will (mode, optimizer, QuantSpec fields) before any trial starts."""
  from experiments import train  # noqa: PLC0415 - JAX; the pool's workers start by forkserver, unaffected
  for t in trials:
    try:
      train.validate(t.config)
    except configlib.ConfigError as e:
      raise configlib.ConfigError(f'trial {t.name}: {e}') from None
    except (AttributeError, KeyError) as e:
      key = str(e).strip('"\' ')
      raise configlib.ConfigError(f'trial {t.name}: the config lacks {key!r}, which {DEFAULT_TRIAL_FN} needs (a '
                                  'config built on experiments.config_base, or give --trial_fn)') from None


def write_manifest(root: str, spec: str, cli: list[tuple[str, str]], trials: list[sweeps.Trial],
                   metrics: list[str]) -> None:
  """<root>/sweep.json: the trials (merged by name with an earlier sweep's), swept keys and metrics."""
  path = os.path.join(root, 'sweep.json')
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  merged = {t['name']: t for t in old.get('trials', [])}
  merged.update({t.name: t.manifest() for t in trials})
  keys = list(dict.fromkeys(old.get('hparam_keys', []) + list(sweeps.hparam_domains(trials))))
  fileio.write_json_atomic(path, {
      'config': spec, 'overrides': dict(cli), 'metrics': metrics, 'hparam_keys': keys,
      'trials': sorted(merged.values(), key=lambda t: t['index']), 'updated': time.time()})


def _parse(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
  flags, overrides = {}, []
  for a in argv:
    if not a.startswith('--'):
      raise configlib.ConfigError(f'unexpected argument {a!r}; flags look like --name=value')
    name, eq, value = a[2:].partition('=')
    if name.startswith('config.'):
      overrides.append((name[len('config.'):], value if eq else 'true'))
    else:
      configlib.check_flags([name], FLAGS)
      flags[name] = value if eq else 'true'
  for req in ('config', 'root'):
    if not flags.get(req):
      raise configlib.ConfigError(f'missing --{req}=...')
  return flags, overrides


def _index(value: str, n: int) -> int:
  if value == 'env':
    for var in ('SLURM_ARRAY_TASK_ID', 'JOB_COMPLETION_INDEX'):
      if os.environ.get(var, '') != '':
        value = os.environ[var]
        break
    else:
      raise configlib.ConfigError('--index=env: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set')
  try:
    i = int(value)
  except ValueError:
    raise configlib.ConfigError(f'--index={value}: expected an integer or "env"') from None
  if not 0 <= i < n:
    raise configlib.ConfigError(f'--index={i}: the sweep has {n} trials (0..{n - 1}); see --dry_run')
  return i


def _count(flags: dict[str, str], name: str) -> int | None:
  """A positive integer flag (--workers=2), None when not given; anything else is a ConfigError."""
  value = flags.get(name)
  if not value:
    return None
  try:
    n = int(value)
  except ValueError:
    n = 0
  if n < 1:
    raise configlib.ConfigError(f'--{name}={value}: expected a positive integer, like --{name}=2')
  return n


def _truthy(v: str | None) -> bool:
  return (v or 'false').lower() in ('1', 'true', 'yes')


def run_sweep(argv: list[str], out=print) -> int:
  """The command line, as a function (returns the exit status; `out` receives the progress lines)."""
  if configlib.wants_help(argv):
    out(configlib.help_text(__doc__, {}, argv))
    return 0
  flags, cli = _parse(argv)
  module, arg = configlib.load_module(flags['config'])
  root = os.path.abspath(flags['root'])
  try:
    trials = sweeps.expand(module, arg, root, cli)
  except configlib.ConfigError as e:
    raise configlib.ConfigError(f'--config={flags["config"]}: {e}') from None
  metrics = list(module.metrics()) if hasattr(module, 'metrics') else ['eval/accuracy', 'eval/loss']
  index = _index(flags['index'], len(trials)) if flags.get('index') else None
  for t in trials:
    unused = configlib.unused_in_float(t.config, [k for k, _ in cli] + list(t.overrides))
    if unused:
      out(f'warning: trial {t.name}: {unused}')
  if _truthy(flags.get('dry_run')):
    changed = changed_trials(trials, trials, root)
    for t in trials:
      deps = f'  after {",".join(trials[d].name for d in t.deps)}' if t.deps else ''
      status = 'changed' if t.name in changed else trial_status(root, t)
      out(f'{t.index:3d}  {t.id}  {t.name:<40s} {status:<12s}'
          f'{json.dumps(t.overrides, default=str)}{deps}')
    return 0
  executor = flags.get('executor', 'local')
  if executor not in ('local', 'ray'):
    raise configlib.ConfigError(f'--executor={executor}: expected local or ray')
  start_method = flags.get('start_method', 'forkserver')
  if start_method not in ('forkserver', 'spawn'):
    raise configlib.ConfigError(f'--start_method={start_method}: expected forkserver or spawn (fork can deadlock '
                                'a process that has started JAX)')
  trial_fn = flags.get('trial_fn', DEFAULT_TRIAL_FN)
  retry = _truthy(flags.get('retry_failed'))
  _count(flags, 'workers')
  if trial_fn == DEFAULT_TRIAL_FN:
    validate_trials(trials)
  configlib.writable_dir(root, 'root')
  chosen = trials if index is None else [trials[index]]
  changed = changed_trials(trials, chosen, root)
  if changed and not _truthy(flags.get('rerun_changed')):
    raise configlib.ConfigError(_changed_message(changed, root))
  for dest in replace_changed(root, list(changed)):
    out(f'moved {os.path.basename(dest)} (a run of an earlier config) to {os.path.dirname(dest)}/; it runs again')
  write_manifest(root, flags['config'], cli, trials, metrics)
  p = plan(trials, root, index=index, retry_failed=retry)
  make = lambda t: make_task(t, trials, root, trial_fn, retry)  # noqa: E731
  t_start = time.time()
  counts = {'done': 0, 'skipped': len(p.skipped), 'failed': 0}
  if p.skipped:
    reasons = {}
    for name, why in p.skipped.items():
      reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
      out(f'skip {len(names)} trial(s), {why}: {", ".join(names[:6])}{" ..." if len(names) > 6 else ""}')
  n = len(p.run)
  starts = {}

  def emit(event):
    kind, idx, pid, when = event
    starts[idx] = when
    out(f'[{time.strftime("%H:%M:%S")}] start  {trials[idx].name}' + (f'  (pid {pid})' if pid else ''))

  if n:
    if index is not None:
      outcomes = iter([run_trial({**make(p.run[0]), 'on_event': emit})])
      where = 'this process'
    elif executor == 'ray':
      workers = _count(flags, 'workers') or cores()
      outcomes = _run_ray(p.run, make, workers, flags.get('ray_address') or None, emit)
      where = f'Ray ({flags.get("ray_address") or f"local, 127.0.0.1, {workers} CPUs"})'
    else:
      gpus = local_gpus()
      default = min(gpus or cores(), n)
      workers = _count(flags, 'workers') or default
      outcomes = _run_local(p.run, make, workers, start_method, emit, gpus)
      where = f'{workers} worker process(es) ({start_method}' + (f', {gpus} GPUs)' if gpus else ')')
    out(f'sweep {flags["config"]}: {len(trials)} trials, running {n} on {where}; root {root}')
    k = 0
    for o in outcomes:
      k += 1
      status = o['status']
      if status == 'claimed':
        status, counts['skipped'] = 'skip', counts['skipped'] + 1
        text = o['error']
      elif status == 'skipped':
        counts['skipped'] += 1
        text = o['error'] or 'finished elsewhere'
      elif status == 'failed':
        counts['failed'] += 1
        text = o['error'] + ('' if o.get('unwritten') else f'  (see {trials[o["index"]].name}/error.json)')
      else:
        counts['done'] += 1
        text = _metric_text(o['metrics'], metrics)
        if o.get('warnings'):
          text += f'  warning: {o["warnings"][0]} (see {trials[o["index"]].name}/train.log)'
      elapsed = o['elapsed'] or (time.time() - starts[o['index']] if o['index'] in starts else 0.0)
      cpu = f' (cpu {_fmt_time(o["cpu"])})' if o.get('cpu') else ''
      out(f'[{time.strftime("%H:%M:%S")}] {status:<6s} {o["name"]}  {text}  {_fmt_time(elapsed)}{cpu}  ({k}/{n})')
  out(f'tally: {counts["done"]} done, {counts["skipped"]} skipped, {counts["failed"]} failed '
      f'of {len(p.run) + len(p.skipped)} in {_fmt_time(time.time() - t_start)}')
  try:
    from experiments import report  # noqa: PLC0415
    paths = report.write_report(root)
    out(f'report: {paths["report"]}  (table: {paths["csv"]})')
  except Exception as e:  # noqa: BLE001 - the trials are safe on disk; the report can be rerun
    out(f'report failed ({type(e).__name__}: {e}); rerun: python -m experiments.report {root}')
  out(f'TensorBoard: python -m experiments.board {root}')
  return 1 if counts['failed'] else 0


def main(argv: list[str]) -> int:
  def on_term(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_term)
  try:
    return run_sweep(argv, out=lambda s: print(s, flush=True))
  except SweepError as e:
    if configlib.debug_requested():
      raise
    print(f'error: {e}', file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    raise KeyboardInterrupt('finished trials are kept, the running ones keep their checkpoints; rerun the same '
                            'command to resume the others') from None


if __name__ == '__main__':
  sys.exit(configlib.main_guard(main))
