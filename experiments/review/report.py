r"""The report of a sweep root: a table per configuration, Pareto fronts, and the same in TensorBoard.

    python -m experiments.report runs/quickstart

reads every trial's result.json (and config.json, error.json) under the root and writes

  results.csv          one row per configuration (seeds grouped): swept values, metric mean and std over
                       seeds, serving bytes, training step time, inference latency, int8 matmuls, Pareto flags,
                       seeds whose ranked metric is NaN / inf (such a configuration stays off the fronts)
  report.md            the same table, the Pareto fronts, failed trials, notes on each column
  pareto_<x>.png       accuracy (or -bits/char) against weight bits, serving bytes and inference latency as a
                       ratio to the float model timed side by side, the front highlighted, points labelled;
                       configurations far below the float model (FAR_BELOW_FLOAT) are marked x, never on a front
  <metric>_vs_bits.png the study's figure (accuracy_vs_bits.png, loss_vs_bits.png, ...): the metric against bits,
                       one line per method, error bars over seeds, the float model as a reference line
                       (experiments/review/study_plot.py); only where the quantized runs have two bit settings
  TensorBoard          the HParams experiment summary at the root (swept keys as columns; each trial's run,
                       written by the runner, is one session, grouped over seeds) and the plots as images
                       (tags pareto/*, study/*), so `python -m experiments.board <root>` shows both

Inference latency is taken from result['latency'] (ms, or a dict with 'ms' / 'median_ms' / 'serving_ms', and
'ratio_to_float'), which the runner times with the benchmark harness (experiments/timing.py) interleaved with the
float model's forward; this module measures nothing and reports 'n/a' where a result has none.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import io
import math
import os
import time

from experiments import fileio
from experiments.config import cli as config_cli
from experiments.review import tensorboard as tb
from experiments.review.plots import fmt_delta, fmt_num, fmt_pm, plot_front
from experiments.review.results import (
  FAR_BELOW_FLOAT,
  PLOT_AXES,
  Config,
  get_path,
  latency_ratio,
  load_trials,
  summarize,
)
from experiments.review.study_plot import plot_study


def _write_csv(path: str, configs: list[Config], metric: str) -> None:
  keys = list(dict.fromkeys(k for c in configs for k in c.values))
  m = metric.split('/')[-1]
  cols = keys + ['seeds', 'weight_bits', f'{m}_mean', f'{m}_std', f'serving_{m}_mean',
                 f'serving_{m}_std', f'{m}_minus_float', 'significance', 'loss_mean', 'loss_std', 'serving_bytes',
                 'train_step_ms', 'latency_ms', 'latency_vs_float', 'int8_matmuls', 'wall_time_s', 'far_below_float',
                 'front_weight_bits', 'front_serving_bytes', 'front_latency_ratio', 'trials', 'nonfinite_seeds']
  f = io.StringIO(newline='')
  w = csv.writer(f)
  w.writerow(cols)
  for c in configs:
    w.writerow([c.values.get(k, '') for k in keys] + [
        c.seeds, c.weight_bits, *c.metric, *c.serving_metric, *c.vs_float, *c.loss, c.serving_bytes,
        c.train_step_ms, c.latency_ms, c.latency_ratio, c.int8_matmuls, c.wall_time_s, c.far_below_float,
        c.front['weight_bits'], c.front['serving_bytes'], c.front['latency_ratio'], ' '.join(c.trials), c.nonfinite])
  fileio.write_atomic(path, f.getvalue())


def _markdown(root: str, trials: list[dict], configs: list[Config], metric: str, higher: bool,
              plots: dict[str, str], manifest: dict, study: tuple[str, str]) -> str:
  counts = {s: sum(t['status'] == s for t in trials) for s in ('done', 'failed', 'running', 'interrupted', 'not run')}
  m = metric.split('/')[-1]
  keys = list(dict.fromkeys(k for c in configs for k in c.values))
  lines = [f'# Sweep report: {root}', '',
           f'Config `{manifest.get("config", "?")}`; {len(trials)} trials: {counts["done"]} finished, '
           f'{counts["failed"]} failed, {counts["running"]} running, {counts["interrupted"]} interrupted, '
           f'{counts["not run"]} not run. '
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
    if c.nonfinite:
      fronts = 'none: non-finite'
    row = [c.values.get(k, '') for k in keys] + [
        str(c.seeds) + (f' ({c.nonfinite} non-finite)' if c.nonfinite else ''), fmt_num(c.weight_bits),
        fmt_pm(c.metric), fmt_pm(c.serving_metric), fmt_delta(c.vs_float),
        fmt_pm(c.loss),
        fmt_num(c.serving_bytes, '{:,.0f}'), fmt_num(c.train_step_ms, '{:.1f}'), fmt_num(c.latency_ms, '{:.3f}'),
        fmt_num(c.latency_ratio, '{:.2f}x'), c.int8_matmuls, fronts]
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
  lines += _study_section(m, *study)
  collapsed = [c for c in configs if c.far_below_float]
  if collapsed:
    lines += [f'Kept off the fronts, {m} far below the float model\'s (under {FAR_BELOW_FLOAT:g}x of it, or a loss '
              f'over {1 / FAR_BELOW_FLOAT:g}x): ' + ', '.join(f'`{c.label}`' for c in collapsed) + '.', '']
  diverged = [c for c in configs if c.nonfinite]
  if diverged:
    lines += [f'Kept off the fronts, a non-finite {m} (NaN or inf) in some seed, so that the mean of the others '
              'does not pass a diverged configuration off as working (the table\'s means are over the finite seeds): '
              + ', '.join(f'`{c.label}` ({c.nonfinite} of {c.seeds} seeds)' for c in diverged) + '.', '']
  failed = [t for t in trials if t['status'] == 'failed']
  if failed:
    lines += ['## Failed trials', '']
    for t in failed:
      error = t['error'] if isinstance(t['error'], dict) else {}  # an unreadable error.json is still a failure
      msg = f'{error.get("type")}: {error.get("message", "")}'.splitlines()[0][:300]
      lines.append(f'- `{t["name"]}`: {msg} (`{t["name"]}/error.json`, log `{t["name"]}/train.log`)')
    lines += ['', 'Rerun them with the sweep command plus `--retry_failed`.', '']
  pending = [t['name'] for t in trials if t['status'] in ('running', 'interrupted', 'not run')]
  if pending:
    lines += ['## Not finished', '', ', '.join(f'`{n}`' for n in pending), '']
    if counts['interrupted']:
      lines += ['Interrupted trials keep their checkpoints: rerunning the sweep command resumes them.', '']
  lines += [
      '## Columns', '',
      f'- `{m}`: the trained model evaluated as it trained (QAT: fake-quantized); `served {m}`: the model '
      'converted for serving (int8 / packed int4 weights), evaluated through that serving forward; the fronts '
      'rank the served value where there is one.',
      '- `serving bytes`: bytes of the parameters as served (float32 for float runs).',
      '- `train step (ms)`: result.train.step_time_ms, the median time of a training step as the runner timed '
      'it (compilation excluded); n/a for PTQ, which trains nothing.',
      '- `inference latency (ms)`: result.latency.serving_ms, the median time of the serving forward on one '
      'evaluation batch, timed by the benchmark harness (experiments/timing.py) at the end of the run; trials '
      'ran at different moments, so compare across rows with `vs float` (and its front uses it): that forward time '
      'divided by the float model\'s forward, timed interleaved with it in the same run '
      '(result.latency.ratio_to_float). For the '
      'full speed picture use `python -m experiments.bench --config=configs/bench_e2e.py`.',
      '- `int8 matmuls`: matmuls and convolutions of the serving forward that XLA compiled with int8 operands, '
      'of all of them (result.matmuls).',
      '', f'TensorBoard (HParams table, Pareto images): `python -m experiments.board {root}`', '']
  return '\n'.join(lines)


def _study_section(m: str, png: str, reason: str) -> list[str]:
  """The study figure's lines in report.md: the image, or the one line that says why there is none."""
  head = [f'## {m} vs bits', '']
  if png:
    return head + [f'{m} against bits, one line per method, error bars one std over seeds; dashed: the float '
                   "model's mean, shaded: its std.", '', f'![{m} vs bits]({png})', '']
  return head + [f'No {m}-vs-bits figure: {reason}.', '']


def _write_tensorboard(root: str, trials: list[dict], manifest: dict, pngs: dict[str, bytes],
                       text: str) -> None:
  """The HParams experiment, the report as text, and `pngs` (tag -> PNG) as images."""
  keys = manifest.get('hparam_keys') or []
  domains = {}
  for k in keys:
    values = []
    for t in trials:
      v = get_path(t['config'] or {}, k)
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
    for tag, png in pngs.items():
      w.image(tag, png, step)
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
  """Writes results.csv, report.md, the Pareto PNGs, the study's figure and the TensorBoard summaries; returns
  their paths (keys 'csv', 'report', the Pareto axes, and 'study' where there is that figure)."""
  root = os.path.abspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'no such sweep root: {root}')
  with open(os.path.join(root, '.report.lock'), 'w') as lock:  # one writer at a time (e.g. Slurm array tasks)
    fcntl.flock(lock, fcntl.LOCK_EX)
    trials, manifest = load_trials(root)
    configs, metric, higher = summarize(trials)
    plots, pngs = {}, {}
    m = metric.split('/')[-1]
    for axis, xlabel in PLOT_AXES:
      png = plot_front(configs, axis, xlabel, metric, higher)
      if png is not None:
        pngs[f'pareto/{m}_vs_{axis}'] = png
        plots[axis] = f'pareto_{axis}.png'
        with open(os.path.join(root, plots[axis]), 'wb') as f:
          f.write(png)
      elif os.path.exists(os.path.join(root, f'pareto_{axis}.png')):
        os.remove(os.path.join(root, f'pareto_{axis}.png'))
    study_png, reason = plot_study(configs, metric, higher)
    study_name = f'{m}_vs_bits.png'
    if study_png is not None:
      pngs[f'study/{m}_vs_bits'] = study_png
      plots['study'] = study_name
      with open(os.path.join(root, study_name), 'wb') as f:
        f.write(study_png)
    elif os.path.exists(os.path.join(root, study_name)):  # a stale figure from before the runs changed
      os.remove(os.path.join(root, study_name))
    paths = {'csv': os.path.join(root, 'results.csv'), 'report': os.path.join(root, 'report.md')}
    _write_csv(paths['csv'], configs, metric)
    text = _markdown(root, trials, configs, metric, higher, plots, manifest,
                     (plots.get('study', ''), reason))
    fileio.write_atomic(paths['report'], text)
    _write_tensorboard(root, trials, manifest, pngs, text)
  paths.update({axis: os.path.join(root, p) for axis, p in plots.items()})
  return paths


def main(argv: list[str] | None = None) -> int:
  """The command line; a mistake (no such root, a full disk) is one `error:` line (config_cli.main_guard)."""
  return config_cli.main_guard(_main, argv=argv)


def _main(argv: list[str]) -> int:
  parser = config_cli.ArgParser(prog='python -m experiments.report', description=__doc__.split('\n')[0])
  parser.add_argument('root', help='the sweep root (or a directory of run directories)')
  root = parser.parse_args(argv).root
  if not os.path.isdir(root):
    raise config_cli.ConfigError(f'no such sweep root: {os.path.abspath(root)}')
  paths = write_report(root)
  print(f'report: {paths["report"]}\ntable:  {paths["csv"]}')
  for axis in [a for a, _ in PLOT_AXES] + ['study']:
    if axis in paths:
      print(f'plot:   {paths[axis]}')
  print(f'TensorBoard: python -m experiments.board {os.path.abspath(root)}')
  return 0
