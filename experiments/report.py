r"""The report of a sweep root: a table per configuration, Pareto fronts, and the same in TensorBoard.

    python -m experiments.report runs/quickstart

reads every trial's result.json (and config.json, error.json) under the root and writes

  results.csv          one row per configuration (seeds grouped): swept values, metric mean and std over
                       seeds, serving bytes, training step time, inference latency, int8 matmuls, Pareto flags
  report.md            the same table, the Pareto fronts, failed trials, notes on each column
  pareto_<x>.png       accuracy (or -bits/char) against weight bits, serving bytes and inference latency as a
                       ratio to the float model timed side by side, the front highlighted, points labelled;
                       configurations far below the float model (FAR_BELOW_FLOAT) are marked x, never on a front
  TensorBoard          the HParams experiment summary at the root (swept keys as columns; each trial's run,
                       written by the runner, is one session, grouped over seeds) and the Pareto plots as images
                       (tags pareto/*), so `python -m experiments.board <root>` shows both

Inference latency is taken from result['latency'] (ms, or a dict with 'ms' / 'median_ms' / 'serving_ms', and
'ratio_to_float'), which the runner times with the benchmark harness (experiments.timing) interleaved with the
float model's forward; this module measures nothing and reports 'n/a' where a result has none.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import glob
import io
import json
import math
import os
import re
import sys
import time

from experiments import configlib, sweeps

__all__ = ['Config', 'load_trials', 'main', 'pareto_front', 'summarize', 'write_report']

PLOT_AXES = (('weight_bits', 'weight bits'), ('serving_bytes', 'serving size'),
             ('latency_ratio', 'inference latency vs float'))
AXIS_UNITS = {'weight_bits': 'bits per weight', 'serving_bytes': 'bytes, log scale',
              'latency_ratio': "x the float model's time, timed side by side"}
FAR_BELOW_FLOAT = 0.5  # a score under half the float model's (or a loss over twice it): collapsed, off the fronts


# ------------------------------------------------------------------------------------------------ loading


def _get(d: dict, key: str, default=None):
  for part in key.split('.'):
    if not isinstance(d, dict) or part not in d:
      return default
    d = d[part]
  return d


def load_trials(root: str) -> tuple[list[dict], dict]:
  """The trials under `root` (from sweep.json, else every sub-directory with a config.json) and the manifest."""
  manifest = sweeps.read_json(os.path.join(root, 'sweep.json')) or {}
  listed = manifest.get('trials') or []
  if not listed:
    names = sorted(d for d in os.listdir(root) if not d.startswith(('.', '_'))
                   and os.path.exists(os.path.join(root, d, 'config.json')))
    listed = [{'name': n, 'index': i, 'labels': None} for i, n in enumerate(names)]
  trials = []
  for t in listed:
    workdir = os.path.join(root, t['name'])
    result = sweeps.read_result(workdir)
    config = (result or {}).get('config') or sweeps.read_json(os.path.join(workdir, 'config.json'))
    error = sweeps.read_json(os.path.join(workdir, 'error.json'))
    status = 'done' if result else 'failed' if error else 'running' if _held(workdir) else 'not run'
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
  return sweeps.Claim.is_held(workdir)


def _derive_labels(trials: list[dict]) -> None:
  """Without a manifest: the labels are the config leaves that differ between trials (last key segment)."""
  flats = [configlib.flatten(t['config']) for t in trials]
  keys = sorted({k for f in flats for k in f if len({json.dumps(g.get(k), default=str) for g in flats}) > 1})
  short = sweeps.short_names([sweeps._Axis(k, None, False) for k in keys])
  for t, f in zip(trials, flats, strict=True):
    t['labels'] = {short[k]: sweeps._label(f.get(k)) for k in keys}


# ---------------------------------------------------------------------------------------------- summaries


def weight_bits(config: dict | None) -> float:
  """Bits per weight: 32 for float runs, else the weight format's bits (int4 -> 4, fp8_e4m3 -> 8)."""
  if not config or config.get('mode') == 'float':
    return 32.0
  fmt = _get(config, 'quant.weight.format', '')
  if not fmt:
    return 32.0
  try:
    from qjax import formats  # noqa: PLC0415
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
  xs = [x for x in xs if x is not None and not math.isnan(x)]
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

  @property
  def score_spread(self) -> float:
    """The seed std of what `score` reports."""
    return self.serving_metric[1] if not math.isnan(self.serving_metric[0]) else self.metric[1]

  @property
  def score(self) -> float:
    """What the fronts rank: the served model's metric when the run converted one, else the eval metric."""
    return self.serving_metric[0] if not math.isnan(self.serving_metric[0]) else self.metric[0]

  def cost(self, axis: str) -> float:
    return getattr(self, axis)


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
    configs.append(Config(
        label=','.join(f'{k}={v}' for k, v in values.items()) or 'default', values=values,
        trials=[t['name'] for t in ts], seeds=len(ts),
        metric=_mean_std([_get(r, 'metrics', {}).get(metric) for r in rs]),
        serving_metric=_mean_std([(r.get('serving_metrics') or {}).get(metric, float('nan')) for r in rs]),
        loss=_mean_std([_get(r, 'metrics', {}).get('eval/loss') for r in rs]),
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
  floats = [c.score for c in configs if c.mode == 'float' and not math.isnan(c.score)]
  if not floats:
    return
  best = max(floats) if higher else min(floats)
  for c in configs:
    if c.mode != 'float' and not math.isnan(c.score):
      c.far_below_float = c.score < FAR_BELOW_FLOAT * best if higher else c.score > best / FAR_BELOW_FLOAT


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
  varying = {k for f in floats for k in f.values if len({g.values.get(k) for g in floats}) > 1}
  for c in configs:
    if c.mode == 'float' or math.isnan(c.score):
      continue
    refs = [f for f in floats if all(c.values.get(k) == f.values.get(k) for k in varying)]
    if len(refs) != 1:
      continue
    ref = refs[0]
    d = c.score - ref.score
    c.vs_float = (d, significance(d, (c.seeds, ref.seeds), (c.score_spread, ref.score_spread)))


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


# ------------------------------------------------------------------------------------------------ outputs


def _delta(v: tuple[float, str]) -> str:
  d, sig = v
  return '' if math.isnan(d) else f'{d:+.4g}' + (f' ({sig})' if sig else '')


def _pm(ms: tuple[float, float], digits: int = 4) -> str:
  m, s = ms
  if math.isnan(m):
    return 'n/a'
  return f'{m:.{digits}f} ± {s:.{digits}f}'


def _num(x: float, fmt: str = '{:.0f}') -> str:
  return 'n/a' if x is None or math.isnan(x) else fmt.format(x)


METRIC_UNITS = {'accuracy': 'fraction of the test set', 'loss': 'nats', 'bits_per_char': 'bits per character'}


def plot_front(configs: list[Config], axis: str, xlabel: str, metric: str, higher: bool) -> bytes | None:
  """A PNG of `pareto_figure`; None when no configuration has that cost."""
  fig = pareto_figure(configs, axis, xlabel, metric, higher)
  if fig is None:
    return None
  import matplotlib.pyplot as plt  # noqa: PLC0415
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def pareto_figure(configs: list[Config], axis: str, xlabel: str, metric: str, higher: bool):
  """Score against one cost: the front as a step line, error bars over seeds, units on both axes, labels placed
  so none overlaps another (one that finds no free place is left out) and the front named in a caption below."""
  pts = [c for c in configs if not math.isnan(c.cost(axis)) and not math.isnan(c.score)]
  if not pts:
    return None
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
  labels = []
  for c in sorted(pts, key=lambda c: (c.cost(axis), -c.score)):
    on = c.front[axis]
    std = c.serving_metric[1] if not math.isnan(c.serving_metric[0]) else c.metric[1]
    ax.errorbar(c.cost(axis), c.score, yerr=std if c.seeds > 1 and std else None,
                fmt='x' if c.far_below_float else 'o', ms=8 if on else 5, color='tab:red' if on else 'tab:gray',
                capsize=3, zorder=3)
    labels.append((not on, ax.annotate(','.join(c.values.values()) or c.label, (c.cost(axis), c.score),
                              textcoords='offset points', xytext=(6, 4), fontsize=7,
                              color='black' if on else 'dimgray')))
  front = sorted((c for c in pts if c.front[axis]), key=lambda c: c.cost(axis))
  if front:
    ax.step([c.cost(axis) for c in front], [c.score for c in front], where='post', color='tab:red', alpha=0.6,
            label='Pareto front')
    ax.legend(loc='lower right' if higher else 'upper right', fontsize=8)
  if axis in ('weight_bits', 'serving_bytes') and min(c.cost(axis) for c in pts) > 0:
    ax.set_xscale('log', base=2)
  name = metric.split('/')[-1]
  ax.set_xlabel(f'{xlabel} ({AXIS_UNITS.get(axis, axis)})')
  ax.set_ylabel(f'{name} ({METRIC_UNITS.get(name, metric)}; {"higher" if higher else "lower"} is better)')
  ax.set_title(f'{name} vs {xlabel}')
  ax.grid(alpha=0.3)
  caption = 'Pareto front, cheapest first: ' + (' → '.join(c.label for c in front) or 'none')
  collapsed = [c.label for c in pts if c.far_below_float]
  if collapsed:
    caption += f'\nx: far below the float model, kept off the front: {", ".join(collapsed)}'
  fig.text(0.01, 0.005, caption, fontsize=7, va='bottom', ha='left', wrap=True)
  fig.tight_layout(rect=(0, 0.06 + 0.03 * bool(collapsed), 1, 1))
  place_labels(fig, sorted(labels, key=lambda p: p[0]))  # the front's labels first
  return fig


def place_labels(fig, labels) -> None:
  """Moves each annotation of (thin, label) pairs to the first of a few offsets around its point where it overlaps
  no label placed before it and stays inside the axes; one that finds no such place is hidden (a `thin` label, off
  the front, only tries the places next to its point), so labels never lie on top of each other.
  """
  renderer = fig.canvas.get_renderer()
  ax_box = labels[0][1].axes.get_window_extent(renderer) if labels else None
  near = [(6, 4), (6, -11), (-6, 4), (-6, -11)]
  far = [(6, 15), (6, -22), (6, 26), (6, -33)]
  placed = []
  for thin, label in labels:
    for dx, dy in near if thin else near + far:
      label.set_position((dx, dy))
      label.set_horizontalalignment('left' if dx > 0 else 'right')
      box = label.get_window_extent(renderer)
      inside = ax_box.x0 <= box.x0 and box.x1 <= ax_box.x1 and ax_box.y0 <= box.y0 and box.y1 <= ax_box.y1
      if inside and not any(box.overlaps(other) for other in placed):
        placed.append(box)
        break
    else:
      label.set_visible(False)


def _write_csv(path: str, configs: list[Config], metric: str) -> None:
  keys = list(dict.fromkeys(k for c in configs for k in c.values))
  m = metric.split('/')[-1]
  cols = keys + ['seeds', 'weight_bits', f'{m}_mean', f'{m}_std', f'serving_{m}_mean', f'serving_{m}_std',
                 f'{m}_minus_float', 'significance', 'loss_mean', 'loss_std', 'serving_bytes', 'train_step_ms',
                 'latency_ms', 'latency_vs_float',
                 'int8_matmuls', 'wall_time_s', 'far_below_float', 'front_weight_bits', 'front_serving_bytes',
                 'front_latency_ratio', 'trials']
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(cols)
    for c in configs:
      w.writerow([c.values.get(k, '') for k in keys] + [
          c.seeds, c.weight_bits, *c.metric, *c.serving_metric, *c.vs_float, *c.loss, c.serving_bytes, c.train_step_ms,
          c.latency_ms, c.latency_ratio, c.int8_matmuls, c.wall_time_s, c.far_below_float, c.front['weight_bits'],
          c.front['serving_bytes'], c.front['latency_ratio'], ' '.join(c.trials)])
  os.replace(tmp, path)


def _markdown(root: str, trials: list[dict], configs: list[Config], metric: str, higher: bool,
              plots: dict[str, str], manifest: dict) -> str:
  counts = {s: sum(t['status'] == s for t in trials) for s in ('done', 'failed', 'running', 'not run')}
  m = metric.split('/')[-1]
  keys = list(dict.fromkeys(k for c in configs for k in c.values))
  lines = [f'# Sweep report: {root}', '',
           f'Config `{manifest.get("config", "?")}`; {len(trials)} trials: {counts["done"]} finished, '
           f'{counts["failed"]} failed, {counts["running"]} running, {counts["not run"]} not run. '
           f'Written {time.strftime("%Y-%m-%d %H:%M:%S")} by `python -m experiments.report {root}`.', '',
           f'## Results (one row per configuration; mean ± std over seeds; {"higher" if higher else "lower"} '
           f'{m} is better)', '',
           f'`{m} - float`: the difference from the float configuration; (n.s.): not significant, within the seed '
           'spread (the larger std over seeds of the two); (1 seed): no spread to judge it by (run with more seeds).',
           '']
  head = keys + ['seeds', 'weight bits', m, f'served {m}', f'{m} - float', 'loss', 'serving bytes',
                 'train step (ms)', 'inference latency (ms)', 'vs float', 'int8 matmuls', 'front']
  lines.append('| ' + ' | '.join(head) + ' |')
  lines.append('|' + '---|' * len(head))
  for c in sorted(configs, key=lambda c: (-c.weight_bits, c.label)):
    fronts = ', '.join(a.replace('_', ' ') for a, _ in PLOT_AXES if c.front[a]) or ''
    if c.far_below_float:
      fronts = 'none: far below float'
    row = [c.values.get(k, '') for k in keys] + [
        str(c.seeds), _num(c.weight_bits), _pm(c.metric), _pm(c.serving_metric), _delta(c.vs_float), _pm(c.loss),
        _num(c.serving_bytes, '{:,.0f}'), _num(c.train_step_ms, '{:.1f}'), _num(c.latency_ms, '{:.3f}'),
        _num(c.latency_ratio, '{:.2f}x'), c.int8_matmuls, fronts]
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('')
  lines.append('## Pareto fronts')
  lines.append('')
  for axis, xlabel in PLOT_AXES:
    front = sorted((c for c in configs if c.front[axis]), key=lambda c: c.cost(axis))
    if axis in plots:
      lines.append(f'{m} vs {xlabel}: ' + ' → '.join(f'`{c.label}`' for c in front))
      lines.append('')
      lines.append(f'![{m} vs {xlabel}]({plots[axis]})')
    else:
      lines.append(f'{m} vs {xlabel}: no trial has this measurement yet.')
    lines.append('')
  collapsed = [c for c in configs if c.far_below_float]
  if collapsed:
    lines += [f'Kept off the fronts, {m} far below the float model\'s (under {FAR_BELOW_FLOAT:g}x of it, or a loss '
              f'over {1 / FAR_BELOW_FLOAT:g}x): ' + ', '.join(f'`{c.label}`' for c in collapsed) + '.', '']
  failed = [t for t in trials if t['status'] == 'failed']
  if failed:
    lines += ['## Failed trials', '']
    for t in failed:
      msg = f'{t["error"].get("type")}: {t["error"].get("message", "")}'.splitlines()[0][:300]
      lines.append(f'- `{t["name"]}`: {msg} (`{t["name"]}/error.json`, log `{t["name"]}/train.log`)')
    lines += ['', 'Rerun them with the sweep command plus `--retry_failed`.', '']
  pending = [t['name'] for t in trials if t['status'] in ('running', 'not run')]
  if pending:
    lines += ['## Not finished', '', ', '.join(f'`{n}`' for n in pending), '']
  lines += [
      '## Columns', '',
      f'- `{m}`: the trained model evaluated as it trained (QAT: fake-quantized); `served {m}`: the model '
      'converted for serving (int8 / packed int4 weights), evaluated through that serving forward; the fronts '
      'rank the served value where there is one.',
      '- `serving bytes`: bytes of the parameters as served (float32 for float runs).',
      '- `train step (ms)`: result.train.step_time_ms, the median time of a training step as the runner timed '
      'it (compilation excluded); n/a for PTQ, which trains nothing.',
      '- `inference latency (ms)`: result.latency.serving_ms, the median time of the serving forward on one '
      'evaluation batch, timed by the benchmark harness (experiments.timing) at the end of the run; trials ran '
      'at different moments, so compare across rows with `vs float` (and its front uses it): that forward time '
      'divided by the float model\'s forward, timed interleaved with it in the same run '
      '(result.latency.ratio_to_float). For the '
      'full speed picture use `python -m experiments.bench --config=configs/bench_e2e.py`.',
      '- `int8 matmuls`: matmuls and convolutions of the serving forward that XLA compiled with int8 operands, '
      'of all of them (result.matmuls).',
      '', f'TensorBoard (HParams table, Pareto images): `python -m experiments.board {root}`', '']
  return '\n'.join(lines)


def _write_tensorboard(root: str, trials: list[dict], manifest: dict, pngs: dict[str, bytes],
                       text: str, metric: str) -> None:
  from experiments import tb  # noqa: PLC0415
  keys = manifest.get('hparam_keys') or []
  domains = {}
  for k in keys:
    values = []
    for t in trials:
      v = _get(t['config'] or {}, k)
      if v is None:
        continue
      v = str(v) if isinstance(v, (list, tuple)) else v
      if v not in values:
        values.append(v)
    if values:
      domains[k] = values
  metrics = list(dict.fromkeys((manifest.get('metrics') or ['eval/accuracy', 'eval/loss']) + serving_tags(trials)))
  tb.write_hparams_experiment(root, domains, metrics,
                              description=f'Sweep `{manifest.get("config", root)}`; one session per trial, '
                                          'sessions grouped over seeds. Report: report.md at the root.')
  for old in glob.glob(os.path.join(glob.escape(root), 'events.out.tfevents.*.report')):
    os.remove(old)
  step = sum(t['status'] == 'done' for t in trials)
  with tb.SummaryWriter(root, filename_suffix='.report') as w:
    for axis, png in pngs.items():
      w.image(f'pareto/{metric.split("/")[-1]}_vs_{axis}', png, step)
    w.text('report', text, step)


def serving_tags(trials: list[dict]) -> list[str]:
  """The serving scalars the runner writes (experiments.train.serving_scalars) that some finished trial has, as
  HParams metrics: served metrics, bytes, latency ratio to float, int8 matmuls."""
  tags = {}
  for t in trials:
    r = t['result'] or {}
    tags.update(dict.fromkeys(f'serving/{k.split("/")[-1]}' for k in (r.get('serving_metrics') or {})))
    present = {'serving/bytes': 'serving_bytes' in r, 'serving/latency_vs_float': not math.isnan(latency_ratio(r)),
               'serving/int8_matmuls': 'int8' in (r.get('matmuls') or {})}
    tags.update(dict.fromkeys(k for k, ok in present.items() if ok))
  return list(tags)


def write_report(root: str) -> dict[str, str]:
  """Writes results.csv, report.md, the Pareto PNGs and the TensorBoard summaries; returns their paths."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'no such sweep root: {root}')
  with open(os.path.join(root, '.report.lock'), 'w') as lock:  # one writer at a time (e.g. Slurm array tasks)
    fcntl.flock(lock, fcntl.LOCK_EX)
    trials, manifest = load_trials(root)
    configs, metric, higher = summarize(trials)
    plots, pngs = {}, {}
    for axis, xlabel in PLOT_AXES:
      png = plot_front(configs, axis, xlabel, metric, higher)
      if png is not None:
        pngs[axis] = png
        plots[axis] = f'pareto_{axis}.png'
        with open(os.path.join(root, plots[axis]), 'wb') as f:
          f.write(png)
      elif os.path.exists(os.path.join(root, f'pareto_{axis}.png')):
        os.remove(os.path.join(root, f'pareto_{axis}.png'))
    paths = {'csv': os.path.join(root, 'results.csv'), 'report': os.path.join(root, 'report.md')}
    _write_csv(paths['csv'], configs, metric)
    text = _markdown(root, trials, configs, metric, higher, plots, manifest)
    with open(paths['report'] + '.tmp', 'w') as f:
      f.write(text)
    os.replace(paths['report'] + '.tmp', paths['report'])
    _write_tensorboard(root, trials, manifest, pngs, text, metric)
  paths.update({axis: os.path.join(root, p) for axis, p in plots.items()})
  return paths


def main(argv: list[str] | None = None) -> int:
  """The command line; a mistake (no such root, a full disk) is one `error:` line (configlib.main_guard)."""
  return configlib.main_guard(_main, argv=argv)


def _main(argv: list[str]) -> int:
  parser = configlib.ArgParser(prog='python -m experiments.report', description=__doc__.split('\n')[0])
  parser.add_argument('root', help='the sweep root (or a directory of run directories)')
  root = parser.parse_args(argv).root
  if not os.path.isdir(root):
    raise configlib.ConfigError(f'no such sweep root: {os.path.abspath(root)}')
  paths = write_report(root)
  print(f'report: {paths["report"]}\ntable:  {paths["csv"]}')
  for axis, _ in PLOT_AXES:
    if axis in paths:
      print(f'plot:   {paths[axis]}')
  print(f'TensorBoard: python -m experiments.board {os.path.abspath(root)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
