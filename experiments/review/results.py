"""A sweep root's results: the trials read from their run files, grouped into configurations (seeds together), the
comparison with the float model (the seed spread) and the Pareto fronts. Nothing here writes or measures."""


from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from experiments import fileio
from experiments.config import cli as config_cli
from experiments.fileio import Claim
from experiments.sweeps import language as sweeps
from qjax import formats

PLOT_AXES = (('weight_bits', 'weight bits'), ('serving_bytes', 'serving size'),
             ('latency_ratio', 'inference latency vs float'))
AXIS_UNITS = {'weight_bits': 'bits per weight', 'serving_bytes': 'bytes, log scale',
              'latency_ratio': "x the float model's time, timed side by side"}
FAR_BELOW_FLOAT = 0.5  # a score under half the float model's (or a loss over twice it): collapsed, off the fronts


# ------------------------------------------------------------------------------------------------ loading


def get_path(d: dict, key: str, default=None):
  for part in key.split('.'):
    if not isinstance(d, dict) or part not in d:
      return default
    d = d[part]
  return d


def load_trials(root: str) -> tuple[list[dict], dict]:
  """The trials under `root` (from sweep.json, else every sub-directory with a config.json) and the manifest."""
  manifest = fileio.read_json(os.path.join(root, 'sweep.json')) or {}
  listed = manifest.get('trials') or []
  if not listed:
    names = sorted(d for d in os.listdir(root) if not d.startswith(('.', '_'))
                   and os.path.exists(os.path.join(root, d, 'config.json')))
    listed = [{'name': n, 'index': i, 'labels': None} for i, n in enumerate(names)]
  trials = []
  for t in listed:
    workdir = os.path.join(root, t['name'])
    result = fileio.read_result(workdir)
    config = (result or {}).get('config') or fileio.read_json(os.path.join(workdir, 'config.json'))
    error = fileio.read_json(os.path.join(workdir, 'error.json'))
    status = fileio.run_status(workdir)  # as the sweep calls it; a run in progress in another process: running
    if status in ('interrupted', 'pending'):
      status = 'running' if _held(workdir) else 'not run' if status == 'pending' else status
    trials.append({'name': t['name'], 'index': t.get('index', 0), 'labels': _ordered(t['name'], t.get('labels')),
                   'config': config,
                   'result': result, 'error': error, 'status': status})
  if any(t['labels'] is None for t in trials):
    _derive_labels(trials)
  return trials, manifest


def _ordered(name: str, labels: dict | list | None) -> dict | None:
  """Labels in the order the trial's name gives them (JSON files may have sorted the keys)."""
  if labels is None:
    return None
  labels = dict(labels)
  order = [part.partition('=')[0] for part in name.split(',')]
  return {k: labels[k] for k in sorted(labels, key=lambda k: order.index(k) if k in order else len(order))}


def _held(workdir: str) -> bool:
  if not os.path.exists(os.path.join(workdir, '.claim')):
    return False
  return Claim.is_held(workdir)


def _derive_labels(trials: list[dict]) -> None:
  """Without a manifest: the labels are the config leaves that differ between trials (last key segment)."""
  flats = [config_cli.flatten(t['config']) for t in trials]
  keys = sorted({k for f in flats for k in f if len({json.dumps(g.get(k), default=str) for g in flats}) > 1})
  short = sweeps.short_key_names(keys)
  for t, f in zip(trials, flats, strict=True):
    t['labels'] = {short[k]: sweeps.label(f.get(k)) for k in keys}


# ---------------------------------------------------------------------------------------------- summaries


def weight_bits(config: dict | None) -> float:
  """Bits per weight: 32 for float runs, else the weight format's bits (int4 -> 4, fp8_e4m3 -> 8)."""
  if not config or config.get('mode') == 'float':
    return 32.0
  fmt = get_path(config, 'quant.weight.format', '')
  if not fmt:
    return 32.0
  try:
    return float(formats.parse_format(fmt).bits)
  except Exception:  # noqa: BLE001 - an unknown name: read the digits
    m = re.search(r'(\d+)', fmt)
    return float(m.group(1)) if m else float('nan')


def latency_ratio(result: dict) -> float:
  """Serving forward time / the float model's forward time, timed interleaved in one run (the runner's
  result.latency.ratio_to_float); nan when the result has none."""
  lat = result.get('latency')
  v = lat.get('ratio_to_float') if isinstance(lat, dict) else None
  return float(v) if isinstance(v, (int, float)) else float('nan')


def latency_ms(result: dict) -> float:
  lat = result.get('latency')
  if isinstance(lat, (int, float)):
    return float(lat)
  if isinstance(lat, dict):
    for k in ('serving_ms', 'median_ms', 'ms'):
      if isinstance(lat.get(k), (int, float)):
        return float(lat[k])
  return float('nan')


def _metric_name(results: list[dict]) -> tuple[str, bool]:
  """The headline metric and whether higher is better: accuracy for classifiers, bits/char for LMs."""
  for r in results:
    if 'eval/accuracy' in (r.get('metrics') or {}) and 'eval/bits_per_char' not in r['metrics']:
      return 'eval/accuracy', True
    if 'eval/bits_per_char' in (r.get('metrics') or {}):
      return 'eval/bits_per_char', False
  return 'eval/loss', False


def _mean_std(xs: list[float]) -> tuple[float, float]:
  """Mean and sample std (ddof 1) of the values present (None: a result without the metric; NaN: not measured).
  A non-finite value of the metric a configuration is ranked by is counted apart (`Config.nonfinite`)."""
  xs = [x for x in xs if x is not None and math.isfinite(x)]
  if not xs:
    return float('nan'), float('nan')
  m = sum(xs) / len(xs)
  sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, sd


@dataclasses.dataclass
class Config:
  """One configuration: its trials over seeds, summarized."""
  label: str
  values: dict[str, str]
  trials: list[str]
  seeds: int
  metric: tuple[float, float]
  serving_metric: tuple[float, float]
  loss: tuple[float, float]
  weight_bits: float
  serving_bytes: float
  train_step_ms: float
  latency_ms: float
  int8_matmuls: str
  wall_time_s: float
  latency_ratio: float = float('nan')
  mode: str = ''
  far_below_float: bool = False
  front: dict[str, bool] = dataclasses.field(default_factory=dict)
  vs_float: tuple[float, str] = (float('nan'), '')  # (score - float's score, significance; see compare_to_float)
  nonfinite: int = 0  # seeds whose ranked metric (served, else eval) is NaN or inf: a diverged run

  @property
  def score_spread(self) -> float:
    """The seed std of what `score` reports."""
    return self.serving_metric[1] if not math.isnan(self.serving_metric[0]) else self.metric[1]

  @property
  def score(self) -> float:
    """What the fronts rank: the served model's metric when the run converted one, else the eval metric. NaN
    (off every front, no difference from float) when a seed's is non-finite: the mean of the other seeds would
    pass a diverged configuration off as a working one."""
    if self.nonfinite:
      return float('nan')
    return self.serving_metric[0] if not math.isnan(self.serving_metric[0]) else self.metric[0]

  def cost(self, axis: str) -> float:
    return getattr(self, axis)


def served_metric(result: dict, metric: str) -> float | None:
  """The served model's `metric` in a result (None when it has none). Bits per character are derived from the
  served loss (nats) where the result lacks them: the runner wrote only loss and accuracy there before."""
  sm = result.get('serving_metrics') or {}
  if metric in sm:
    return sm[metric]
  if metric == 'eval/bits_per_char' and sm.get('eval/loss') is not None:
    return sm['eval/loss'] / math.log(2)
  return None


def _nonfinite(xs: list[float | None]) -> int:
  return sum(x is not None and not math.isfinite(x) for x in xs)


def summarize(trials: list[dict]) -> tuple[list[Config], str, bool]:
  """Finished trials grouped into configurations (labels without the seed); returns (configs, metric, higher)."""
  done = [t for t in trials if t['result']]
  metric, higher = _metric_name([t['result'] for t in done])
  groups: dict[str, list[dict]] = {}
  for t in done:
    values = {k: v for k, v in (t['labels'] or {}).items() if not sweeps.is_seed_key(k)}
    groups.setdefault(json.dumps(values), []).append(t)
  configs = []
  for key, ts in groups.items():
    values = json.loads(key)
    rs = [t['result'] for t in ts]
    # The runner's median step time; older results only have the loop average (evals included).
    step_ms = [r['train']['step_time_ms'] if r.get('train', {}).get('step_time_ms')
               else 1000.0 / r['train']['steps_per_sec'] for r in rs if (r.get('train') or {}).get('steps_per_sec')]
    mm = rs[0].get('matmuls') or {}
    evals = [get_path(r, 'metrics', {}).get(metric) for r in rs]
    served = [served_metric(r, metric) for r in rs]
    ranked = served if any(v is not None for v in served) else evals
    configs.append(Config(
        label=','.join(f'{k}={v}' for k, v in values.items()) or 'default', values=values,
        trials=[t['name'] for t in ts], seeds=len(ts),
        metric=_mean_std(evals), serving_metric=_mean_std(served), nonfinite=_nonfinite(ranked),
        loss=_mean_std([get_path(r, 'metrics', {}).get('eval/loss') for r in rs]),
        weight_bits=weight_bits(rs[0].get('config') or ts[0]['config']),
        serving_bytes=float(rs[0].get('serving_bytes', float('nan'))),
        train_step_ms=_mean_std(step_ms)[0],
        latency_ms=_mean_std([latency_ms(r) for r in rs])[0],
        int8_matmuls=f'{mm["int8"]}/{mm["total"]}' if 'int8' in mm and 'total' in mm else 'n/a',
        latency_ratio=_mean_std([latency_ratio(r) for r in rs])[0],
        wall_time_s=_mean_std([r.get('wall_time_sec') for r in rs])[0],
        mode=str(rs[0].get('mode') or (ts[0]['config'] or {}).get('mode') or '')))
  mark_far_below_float(configs, higher)
  compare_to_float(configs)
  for axis, _ in PLOT_AXES:  # a collapsed configuration is cheap at no use: it never sits on a front
    flags = pareto_front([c.cost(axis) for c in configs],
                         [float('nan') if c.far_below_float else c.score for c in configs], higher=higher)
    for c, f in zip(configs, flags, strict=True):
      c.front[axis] = f
  return configs, metric, higher


def mark_far_below_float(configs: list[Config], higher: bool) -> None:
  """Marks the configurations whose score is far from the float model's (FAR_BELOW_FLOAT): e.g. PTQ W2A2 at
  chance accuracy, which would otherwise sit on every front as the cheapest point."""
  floats = [c for c in configs if c.mode == 'float' and not math.isnan(c.score)]
  if not floats:
    return
  best = (max if higher else min)(f.score for f in floats)
  for c in configs:
    if c.mode != 'float' and not math.isnan(c.score):
      # Its own float configuration (a sweep over models: the small model's float, not the big one's); the best
      # float where that is ambiguous.
      ref = float_reference(c, floats)
      f = best if ref is None else ref.score
      c.far_below_float = c.score < FAR_BELOW_FLOAT * f if higher else c.score > f / FAR_BELOW_FLOAT


def significance(delta: float, seeds: tuple[int, int], spreads: tuple[float, float]) -> str:
  """'n.s.' when a difference between two configurations is within the seed spread, max(std_a, std_b) (the std
  over seeds of each); '1 seed' when either has one seed, so there is no spread to compare with; '' otherwise
  (the difference exceeds the seed-to-seed variation of both)."""
  if math.isnan(delta):
    return ''
  if min(seeds) < 2:
    return '1 seed'
  return 'n.s.' if abs(delta) <= max(spreads) else ''


def compare_to_float(configs: list[Config]) -> None:
  """Each quantized configuration's score minus its float configuration's, with its significance. Its float
  configuration: the only one, or where several were swept (over models, datasets, ...) the one that shares the
  configuration's values on the keys in which the float ones differ; none when that is ambiguous."""
  floats = [c for c in configs if c.mode == 'float' and not math.isnan(c.score)]
  for c in configs:
    if c.mode == 'float' or math.isnan(c.score):
      continue
    ref = float_reference(c, floats)
    if ref is None:
      continue
    d = c.score - ref.score
    c.vs_float = (d, significance(d, (c.seeds, ref.seeds), (c.score_spread, ref.score_spread)))


def float_reference(config: Config, floats: list[Config]) -> Config | None:
  """`config`'s float configuration among `floats`: the only one, or the one that shares `config`'s values on the
  keys in which the float ones differ (e.g. the float fine-tune with the same total steps); None if ambiguous."""
  varying = {k for f in floats for k in f.values if len({g.values.get(k) for g in floats}) > 1}
  refs = [f for f in floats if all(config.values.get(k) == f.values.get(k) for k in varying)]
  return refs[0] if len(refs) == 1 else None


def pareto_front(costs: list[float], values: list[float], *, higher: bool = True) -> list[bool]:
  """Which points are Pareto-optimal for (lower cost, better value); NaN points are never on the front.

  A point is dominated when another costs no more and scores no worse, and is strictly better in one.
  """
  sign = 1.0 if higher else -1.0
  pts = [(c, sign * v) for c, v in zip(costs, values, strict=True)]
  ok = [not (math.isnan(c) or math.isnan(v)) for c, v in pts]
  out = []
  for i, (ci, vi) in enumerate(pts):
    dominated = any(ok[j] and cj <= ci and vj >= vi and (cj < ci or vj > vi)
                    for j, (cj, vj) in enumerate(pts) if j != i)
    out.append(ok[i] and not dominated)
  return out
