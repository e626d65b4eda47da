r"""Run the sweep a config file declares (`get_sweep`, see experiments/sweeps/language.py), one workdir per trial.

    python -m experiments.sweep --config=configs/quickstart.py --root=runs/quickstart
        [--executor=local|ray] [--workers=N] [--index=i|env] [--only=REGEX] [--dry_run] [--retry_failed]
        [--rerun_changed] [--adopt_new_keys]
        [--ray_address=host:port] [--start_method=forkserver|spawn] [--trial_fn=module:function]
        [--config.key=value ...]

Trials run `experiments.training.runner.train_and_evaluate(config, <root>/<name>)`; each trial's console output goes to
`<root>/<name>/train.log`. The sweep prints one line as a trial starts and one as it ends (metric, time),
then a tally, writes the HParams experiment and the report (experiments/review/report.py) at the root.

Executors:
  local (default)  a process pool started with 'forkserver' (or 'spawn'; 'fork' after JAX has started can
                   deadlock), its workers reused across trials, sharing a persistent JAX compilation cache in
                   <root>/.jax_cache ($JAX_COMPILATION_CACHE_DIR where set). Default --workers: min(usable
                   cores, trials), or the number of GPUs when `nvidia-smi` lists some (one GPU per worker). A
                   JAX process can use every core for large ops, but the small models these sweeps train spend
                   much of a step in Python dispatch, batching and single-threaded compiles, which leave a core
                   idle; so on 2 cores the default is 2 workers. Give a large model the whole machine with
                   --workers=1.
  ray              Ray (`pip install 'ray[default]'`, extra `qjax[ray]`). Without --ray_address a local Ray
                   starts bound to 127.0.0.1 with no dashboard and --workers CPUs; with it, the sweep joins
                   that cluster (the code and --root must be on every node). One GPU per trial when the
                   cluster has GPUs.
  --index=i        runs trial i alone in this process (Slurm arrays, Kubernetes indexed jobs); --index=env reads
                   SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX. `--dry_run` lists the trials with their indices
                   and status (done, failed, interrupted, pending; changed: its stored run has another config).
  --only=REGEX     runs the trials whose name the regular expression matches (re.search), and the trials they
                   start from, e.g. --only='estimator=(ewgs|pact)' to fill in two rows of a table first; the
                   others wait for a later run without --only. With --dry_run it lists what would run.

Reruns: finished trials (result.json) are skipped, interrupted ones resume from their checkpoints, failed ones
(error.json: exception and traceback) are skipped unless --retry_failed, which reruns only them. A rerun whose
config or overrides give a finished or interrupted trial another config than the one it ran is refused, listing
the keys that differ: use a new --root, or --rerun_changed, which moves those trials (and the ones starting from
them) to <root>/_replaced/ and runs them again. When the only differences are keys the stored runs predate (an
option added to the code since, at its config file value, which should keep what the runs did), --adopt_new_keys
writes those keys into the stored configs, logs them in <trial>/adopted_keys.json, and keeps the runs; a key set
on the command line or by the sweep's axes is never adopted. A trial is
claimed with an flock on <root>/<name>/.claim while it runs (released by the kernel if its process dies), so
two sweeps on one root never run the same trial twice; the second one skips it. A trial whose config refers to
another trial (sweeps.trial_ref, e.g. PTQ from the float trial) runs after it.

Exit status: 0 all selected trials finished, 1 some failed, 2 a config or flag error, 3 an executor error.
"""


from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import time
from typing import Any

from experiments import fileio
from experiments.config import cli as config_cli
from experiments.fileio import Claim
from experiments.sweeps import language as sweeps
from experiments.sweeps.executors import SweepError, cores, local_gpus, run_local, run_ray
from experiments.sweeps.trials import Task, run_trial

DEFAULT_TRIAL_FN = 'experiments.training.runner:train_and_evaluate'
FLAGS = ('config', 'root', 'executor', 'workers', 'index', 'only', 'dry_run', 'retry_failed', 'rerun_changed',
         'adopt_new_keys', 'ray_address', 'start_method', 'trial_fn')
REPLACED = '_replaced'  # <root>/_replaced/<name>-<time>: trials moved aside by --rerun_changed


@dataclasses.dataclass
class Plan:
  trials: list[sweeps.Trial]      # every trial of the sweep
  run: list[sweeps.Trial]         # the ones to run now
  skipped: dict[str, str]         # name -> why


def trial_status(root: str, trial: sweeps.Trial) -> str:
  """done, failed, interrupted or pending (fileio.run_status, which the report uses too)."""
  return fileio.run_status(trial.workdir(root))


def select(trials: list[sweeps.Trial], only: str) -> list[sweeps.Trial]:
  """The trials whose name `only` matches (re.search) and, transitively, the trials they start from, in sweep
  order. A pattern that is no regular expression, or matches no trial, is a ConfigError."""
  try:
    pattern = re.compile(only)
  except re.error as e:
    raise config_cli.ConfigError(f'--only={only}: not a regular expression ({e})') from None
  keep, todo = set(), [t.index for t in trials if pattern.search(t.name)]
  if not todo:
    sample = ', '.join(t.name for t in trials[:3])
    raise config_cli.ConfigError(f'--only={only}: matches none of the {len(trials)} trial names (e.g. {sample}); '
                                 'see --dry_run')
  while todo:
    i = todo.pop()
    if i not in keep:
      keep.add(i)
      todo.extend(trials[i].deps)
  return [t for t in trials if t.index in keep]


def plan(trials: list[sweeps.Trial], root: str, *, index: int | None = None, retry_failed: bool = False,
         only: str | None = None) -> Plan:
  chosen = trials if index is None else [trials[index]]
  run, skipped = [], {}
  if only:
    kept = {t.index for t in select(trials, only)}
    skipped.update((t.name, 'not selected by --only') for t in chosen if t.index not in kept)
    chosen = [t for t in chosen if t.index in kept]
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
  result = fileio.read_result(workdir)
  if result is not None and isinstance(result.get('config'), dict):
    return result['config']
  data = fileio.read_json(os.path.join(workdir, 'config.json'))
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
      keys = config_cli.changed_keys(stored, json.loads(json.dumps(config_cli.to_dict(t.config), default=str)))
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


def _changed_message(changed: dict[str, list[str]], root: str, adoptable=None) -> str:
  lines = [f'{len(changed)} trial(s) under {root} hold runs of a different config than this command gives them '
           '(kept as they are):']
  for name, keys in list(changed.items())[:10]:
    more = f' and {len(keys) - 6} more' if len(keys) > 6 else ''
    lines.append(f'  {name}: {", ".join(keys[:6])}{more}')
  if len(changed) > 10:
    lines.append(f'  ... and {len(changed) - 10} more')
  lines.append(f'Use a new --root for the new settings, or add --rerun_changed to move those trials to '
               f'{os.path.join(root, REPLACED)}/ and run them again.')
  if adoptable and set(adoptable) >= {n for n, k in changed.items() if not k[0].startswith('(starts from')}:
    keys = sorted({k for v in adoptable.values() for k in v})
    lines.append(f'Every difference is a key the stored runs predate ({", ".join(keys[:4])}'
                 f'{" ..." if len(keys) > 4 else ""}: options added since they ran), at its config file value. If '
                 'that value is what those runs did, --adopt_new_keys writes the keys into the stored configs (and '
                 '<trial>/adopted_keys.json) and keeps the runs.')
  return '\n'.join(lines)


def new_keys(trials: list[sweeps.Trial], root: str, cli_keys=()) -> dict[str, dict[str, Any]]:
  """Trial name -> {dotted key: value} for the trials whose stored run differs from the config it would run now
  only in keys the stored config does not have (options added to the code after the run), each at the value the
  config file gives it: a key set on the command line or by the sweep's own axes is a choice, not a default that
  kept the old behaviour, and is never adopted."""
  out = {}
  for t in trials:
    stored = stored_config(root, t)
    if stored is None:
      continue
    current = json.loads(json.dumps(config_cli.to_dict(t.config), default=str))
    now, old = config_cli.flatten(current), config_cli.flatten(stored)
    keys = config_cli.changed_keys(stored, current)
    explicit = set(cli_keys) | set(t.overrides)
    if keys and all(k not in old and k in now and k not in explicit for k in keys):
      out[t.name] = {k: now[k] for k in keys}
  return out


def adopt_new_keys(trials: list[sweeps.Trial], root: str, cli_keys=()) -> list[str]:
  """Writes each trial's new keys (`new_keys`) into its stored config (result.json's and config.json) and appends
  {time, keys} to <trial>/adopted_keys.json; returns the trials changed. A trial running elsewhere is refused."""
  found = new_keys(trials, root, cli_keys)
  held = [n for n in found if Claim.is_held(os.path.join(root, n))]
  if held:
    raise config_cli.ConfigError(f'--adopt_new_keys: {", ".join(held)} is running in another process; rerun when '
                                'it has ended')
  for name, keys in found.items():
    workdir = os.path.join(root, name)
    for fname, inner in (('result.json', 'config'), ('config.json', None)):
      data = fileio.read_json(os.path.join(workdir, fname))
      if not isinstance(data, dict) or (inner and not isinstance(data.get(inner), dict)):
        continue
      for key, value in keys.items():
        node = data[inner] if inner else data
        *parents, leaf = key.split('.')
        for p in parents:
          node = node.setdefault(p, {})
        node[leaf] = value
      fileio.write_json_atomic(os.path.join(workdir, fname), data)
    log = fileio.read_json(os.path.join(workdir, 'adopted_keys.json'))
    log = (log if isinstance(log, list) else []) + [{'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'keys': keys}]
    fileio.write_json_atomic(os.path.join(workdir, 'adopted_keys.json'), log)
  return sorted(found)


def replace_changed(root: str, names: list[str]) -> list[str]:
  """Moves the changed trials' workdirs to <root>/_replaced/ (nothing is deleted); returns where each went."""
  if not names:
    return []
  held = [n for n in names if Claim.is_held(os.path.join(root, n))]
  if held:
    raise config_cli.ConfigError(f'--rerun_changed: {", ".join(held)} is running in another process; rerun when '
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


def cache_dir(root: str) -> str:
  """The trials' persistent JAX compilation cache: $JAX_COMPILATION_CACHE_DIR when the user set one (a cache
  shared beyond this root, e.g. by every sweep of a project), else <root>/.jax_cache."""
  return os.environ.get('JAX_COMPILATION_CACHE_DIR') or os.path.join(root, '.jax_cache')


def make_task(trial: sweeps.Trial, trials: list[sweeps.Trial], root: str, trial_fn: str, retry: bool) -> Task:
  return Task(index=trial.index, name=trial.name, id=trial.id, root=root, group=group_name(trial),
              config=config_cli.to_dict(trial.config), trial_fn=trial_fn, cache_dir=cache_dir(root),
              retry=retry, deps=tuple(make_task(trials[d], trials, root, trial_fn, retry) for d in trial.deps))


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


def validate_trials(trials: list[sweeps.Trial], validate) -> None:
  """Checks every trial's config as the trial function will (`validate(config)`, e.g. the runner's: mode,
  optimizer, model, QuantSpec fields) before any trial starts."""
  for t in trials:
    try:
      validate(t.config)
    except config_cli.ConfigError as e:
      raise config_cli.ConfigError(f'trial {t.name}: {e}') from None
    except (AttributeError, KeyError) as e:
      found = re.search(r"[A-Za-z_][\w.]*", str(e))  # the key, out of ml_collections' quoted, escaped message
      key = found.group(0) if found else str(e)
      raise config_cli.ConfigError(f'trial {t.name}: the config lacks {key!r}, which {DEFAULT_TRIAL_FN} needs (a '
                                  'config built on experiments/config/defaults.py, or give --trial_fn)') from None


def write_manifest(root: str, spec: str, cli: list[tuple[str, str]], trials: list[sweeps.Trial],
                   metrics: list[str]) -> None:
  """<root>/sweep.json: the trials (merged by name with an earlier sweep's), swept keys and metrics."""
  path = os.path.join(root, 'sweep.json')
  old = {}
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  # Trials of earlier invocations stay listed (another --config.key into the same root) where they left a workdir;
  # one dropped from the config before it ran is forgotten, not reported as 'not run' for ever.
  merged = {t['name']: t for t in old.get('trials', []) if os.path.isdir(os.path.join(root, t['name']))}
  merged.update({t.name: t.manifest() for t in trials})
  keys = list(dict.fromkeys(old.get('hparam_keys', []) + list(sweeps.hparam_domains(trials))))
  fileio.write_json_atomic(path, {
      'config': spec, 'overrides': dict(cli), 'metrics': metrics, 'hparam_keys': keys,
      'trials': sorted(merged.values(), key=lambda t: t['index']), 'updated': time.time()})


def _parse(argv: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
  flags, overrides = {}, []
  for a in argv:
    if not a.startswith('--'):
      raise config_cli.ConfigError(f'unexpected argument {a!r}; flags look like --name=value')
    name, eq, value = a[2:].partition('=')
    if name.startswith('config.'):
      overrides.append((name[len('config.'):], value if eq else 'true'))
    else:
      config_cli.check_flags([name], FLAGS)
      flags[name] = value if eq else 'true'
  for req in ('config', 'root'):
    if not flags.get(req):
      raise config_cli.ConfigError(f'missing --{req}=...')
  return flags, overrides


def _index(value: str, n: int) -> int:
  if value == 'env':
    for var in ('SLURM_ARRAY_TASK_ID', 'JOB_COMPLETION_INDEX'):
      if os.environ.get(var, '') != '':
        value = os.environ[var]
        break
    else:
      raise config_cli.ConfigError('--index=env: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set')
  try:
    i = int(value)
  except ValueError:
    raise config_cli.ConfigError(f'--index={value}: expected an integer or "env"') from None
  if not 0 <= i < n:
    raise config_cli.ConfigError(f'--index={i}: the sweep has {n} trials (0..{n - 1}); see --dry_run')
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
    raise config_cli.ConfigError(f'--{name}={value}: expected a positive integer, like --{name}=2')
  return n


BOOL_FLAGS = ('dry_run', 'retry_failed', 'rerun_changed', 'adopt_new_keys')
_TRUE, _FALSE = ('1', 'true', 'yes'), ('0', 'false', 'no')


def _truthy(flags: dict[str, str], name: str) -> bool:
  """A switch (--dry_run, --dry_run=false); any other value is a ConfigError, so --dry_run=ture never runs the
  real sweep."""
  value = flags.get(name)
  if value is None:
    return False
  if value.lower() in _TRUE:
    return True
  if value.lower() in _FALSE:
    return False
  raise config_cli.ConfigError(f'--{name}={value}: expected true or false (or --{name} alone for true)')


def run_sweep(argv: list[str], out=print, *, validate=None, report=None) -> int:
  """The command line, as a function (returns the exit status; `out` receives the progress lines).

  `validate(config)` checks each trial's config before any runs when the trial function is the default runner;
  `report(root)` writes the root's report once the trials are done ({'report': path, 'csv': path}). The command
  (experiments/sweep.py) gives the runner's and experiments.review's; the sweep package itself imports neither.
  """
  if config_cli.wants_help(argv):
    out(config_cli.help_text(__doc__, {}, argv))
    return 0
  flags, cli = _parse(argv)
  switches = {name: _truthy(flags, name) for name in BOOL_FLAGS}
  module, arg = config_cli.load_module(flags['config'])
  root = os.path.abspath(flags['root'])
  try:
    trials = sweeps.expand(module, arg, root, cli)
  except config_cli.ConfigError as e:
    raise config_cli.ConfigError(f'--config={flags["config"]}: {e}') from None
  metrics = list(module.metrics()) if hasattr(module, 'metrics') else ['eval/accuracy', 'eval/loss']
  index = _index(flags['index'], len(trials)) if flags.get('index') else None
  for t in trials:
    unused = config_cli.unused_in_float(t.config, [k for k, _ in cli] + list(t.overrides))
    if unused:
      out(f'warning: trial {t.name}: {unused}')
  if flags.get('only') is not None and not flags['only']:
    raise config_cli.ConfigError('--only= needs a regular expression over trial names (see --dry_run)')
  selected = {t.index for t in select(trials, flags['only'])} if flags.get('only') else None
  if switches['dry_run']:
    changed = changed_trials(trials, trials, root)
    for t in trials:
      if selected is not None and t.index not in selected:
        continue
      deps = f'  after {",".join(trials[d].name for d in t.deps)}' if t.deps else ''
      status = 'changed' if t.name in changed else trial_status(root, t)
      out(f'{t.index:3d}  {t.id}  {t.name:<40s} {status:<12s}'
          f'{json.dumps(t.overrides, default=str)}{deps}')
    return 0
  executor = flags.get('executor', 'local')
  if executor not in ('local', 'ray'):
    raise config_cli.ConfigError(f'--executor={executor}: expected local or ray')
  start_method = flags.get('start_method', 'forkserver')
  if start_method not in ('forkserver', 'spawn'):
    raise config_cli.ConfigError(f'--start_method={start_method}: expected forkserver or spawn (fork can deadlock '
                                'a process that has started JAX)')
  trial_fn = flags.get('trial_fn', DEFAULT_TRIAL_FN)
  retry = switches['retry_failed']
  _count(flags, 'workers')
  if trial_fn == DEFAULT_TRIAL_FN and validate is not None:
    validate_trials(trials, validate)
  config_cli.writable_dir(root, 'root')
  chosen = trials if index is None else [trials[index]]
  if switches['adopt_new_keys']:
    adopted = adopt_new_keys(chosen, root, [k for k, _ in cli])
    if adopted:
      out(f'adopted the new config keys into {len(adopted)} stored run(s) (see <trial>/adopted_keys.json)')
  changed = changed_trials(trials, chosen, root)
  if changed and not switches['rerun_changed']:
    raise config_cli.ConfigError(_changed_message(changed, root, new_keys(chosen, root, [k for k, _ in cli])))
  for dest in replace_changed(root, list(changed)):
    out(f'moved {os.path.basename(dest)} (a run of an earlier config) to {os.path.dirname(dest)}/; it runs again')
  write_manifest(root, flags['config'], cli, trials, metrics)
  p = plan(trials, root, index=index, retry_failed=retry, only=flags.get('only'))
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
      outcomes = iter([run_trial(dataclasses.replace(make(p.run[0]), on_event=emit))])
      where = 'this process'
    elif executor == 'ray':
      workers = _count(flags, 'workers') or cores()
      outcomes = run_ray(p.run, make, workers, flags.get('ray_address') or None, emit)
      where = f'Ray ({flags.get("ray_address") or f"local, 127.0.0.1, {workers} CPUs"})'
    else:
      gpus = local_gpus()
      default = min(gpus or cores(), n)
      workers = _count(flags, 'workers') or default
      outcomes = run_local(p.run, make, workers, start_method, emit, gpus)
      where = f'{workers} worker process(es) ({start_method}' + (f', {gpus} GPUs)' if gpus else ')')
    out(f'sweep {flags["config"]}: {len(trials)} trials, running {n} on {where}; root {root}')
    k = 0
    for o in outcomes:
      k += 1
      status = o.status
      if status == 'claimed':
        status, counts['skipped'] = 'skip', counts['skipped'] + 1
        text = o.error
      elif status == 'skipped':
        counts['skipped'] += 1
        text = o.error or 'finished elsewhere'
      elif status == 'failed':
        counts['failed'] += 1
        text = o.error + ('' if o.unwritten else f'  (see {trials[o.index].name}/error.json)')
      else:
        counts['done'] += 1
        text = _metric_text(o.metrics, metrics)
        if o.warnings:
          text += f'  warning: {o.warnings[0]} (see {trials[o.index].name}/train.log)'
      elapsed = o.elapsed or (time.time() - starts[o.index] if o.index in starts else 0.0)
      cpu = f' (cpu {_fmt_time(o.cpu)})' if o.cpu else ''
      out(f'[{time.strftime("%H:%M:%S")}] {status:<6s} {o.name}  {text}  {_fmt_time(elapsed)}{cpu}  ({k}/{n})')
  out(f'tally: {counts["done"]} done, {counts["skipped"]} skipped, {counts["failed"]} failed '
      f'of {len(p.run) + len(p.skipped)} in {_fmt_time(time.time() - t_start)}')
  if report is not None:
    try:
      paths = report(root)
      out(f'report: {paths["report"]}  (table: {paths["csv"]})')
    except Exception as e:  # noqa: BLE001 - the trials are safe on disk; the report can be rerun
      out(f'report failed ({type(e).__name__}: {e}); rerun: python -m experiments.report {root}')
  out(f'TensorBoard: python -m experiments.board {root}')
  return 1 if counts['failed'] else 0


def main(argv: list[str], **hooks) -> int:
  """The command: run_sweep with its progress on stdout; `hooks` as run_sweep's (validate, report)."""
  def on_term(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_term)
  try:
    return run_sweep(argv, out=lambda s: print(s, flush=True), **hooks)
  except SweepError as e:
    if config_cli.debug_requested():
      raise
    print(f'error: {e}', file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    raise KeyboardInterrupt('finished trials are kept, the running ones keep their checkpoints; rerun the same '
                            'command to resume the others') from None
