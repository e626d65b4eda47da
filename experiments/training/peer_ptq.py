"""qjax's PTQ methods side by side with Qwix's (Google's `qwix` package, through its own API) on one problem: the
same float model, the same calibration batches, the same layers and weight widths. Per method x width: the metric
on the eval split and the method's wall time, each tool's own defaults otherwise. qjax runs on each weight grid of
config.peer.qjax_grids (its default, scale = absmax / qmax, and Qwix's, absmax / (qmax + 1/2)): at 2 bits the
grids differ by a level, which matters more than the method.

    python -m experiments.peer_ptq --config=configs/peer_ptq_fmnist.py --workdir=runs/peer_ptq_fmnist

The float model is trained (or reused) in <workdir>/float. qjax's rows are ordinary PTQ runs of the runner in
<workdir>/qjax/<method>_w<bits>_<grid> (their result.json holds everything); Qwix's rows run in this process. The
table is printed and written to <workdir>/peer_ptq.md, the rows to <workdir>/peer_ptq.json (rerunning skips finished
rows). config.peer.seeds repeats the whole comparison per seed (seed s > 0 under <workdir>/seed<s>/: its own float
model, initialisation, data order and calibration batches); the table then gives mean ± sample std over the seeds.
A rerun with more seeds keeps the finished ones.

What each side's time covers: qjax, the runner's `train.ptq.wall_time_sec` (statistics over the calibration
batches, the method on every layer, and the per-layer error report), compilation included; Qwix, its calibration
passes over the same batches plus `quantize_params`, compilation included. Both exclude loading and evaluation.
A Qwix method that fails (e.g. Qwix 0.1.8's GPTQ has no 3-bit path) is recorded with its error, not hidden.

Qwix needs `pip install qwix` (the project's `peers` extra).
"""

from __future__ import annotations

import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from experiments.config import cli as config_cli
from experiments.data import pipeline as input_pipeline
from experiments.fileio import write_json_atomic
from experiments.training import runner as train
from experiments.training import trainers

# Qwix's symmetric integer grid: scale = absmax / (qmax + 1/2) on the full signed range (its numerics'
# get_symmetric_bound), which is qjax's calibration='absmax_half_step'.
QWIX_GRID = 'absmax_half_step'
GRID_NAMES = {'absmax': '(absmax / qmax)', 'absmax_half_step': '(absmax / (qmax + 1/2))'}

METRICS = ('eval/accuracy', 'eval/loss')  # what both sides report: the runner's result and _evaluate
FLAGS = {'workdir': '=<dir>: where the float run, the qjax runs and the table go (rerunning resumes)'}


# ------------------------------------------------------------------------------------------------ Qwix's side


def qwix_ptq(module, params, calib, method: str, bits: int, layers: str, sample):
  """Qwix's weight-only PTQ of `layers` (a module-path regex) with `method` ('rtn' | 'gptq' | 'awq' |
  'smoothquant') at `bits`: (apply(x) -> logits, seconds of calibration + quantize_params). Qwix's SmoothQuant
  reads int8 activation scales for its smoothing factors (its rule needs act_qtype) and serves the smoothed
  weights with float activations, so it is weight-only here too."""
  import qwix  # noqa: PLC0415 - an optional peer, imported only where it is compared
  from qwix.contrib import awq, gptq, smooth_quant  # noqa: PLC0415

  qtype = f'int{bits}'
  t0 = time.perf_counter()
  if method == 'rtn':
    rules = [qwix.QuantizationRule(module_path=layers, weight_qtype=qtype)]
    serve = qwix.quantize_model(module, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(serve.init, jax.random.key(0), sample)['params']
    qparams = qwix.quantize_params(params, abstract)
  else:
    rule_cls, cal_cls, serve_cls, quantize = {
        'gptq': (gptq.GptqRule, gptq.GptqCalibrationProvider, qwix.PtqProvider, gptq.quantize_params),
        'awq': (awq.AwqRule, awq.AwqCalibrationProvider, awq.AwqInferenceProvider, awq.quantize_params),
        'smoothquant': (smooth_quant.SqRule, smooth_quant.SqCalibrationProvider, smooth_quant.SqInferenceProvider,
                        smooth_quant.quantize_params)}[method]
    extra = {'act_qtype': 'int8'} if method == 'smoothquant' else {}
    rules = [rule_cls(module_path=layers, weight_qtype=qtype, **extra)]
    cal = qwix.quantize_model(module, cal_cls(rules))
    step = jax.jit(lambda v, x: cal.apply(v, x, mutable='quant_stats')[1])
    variables = {'params': params}
    for x in calib:
      variables = {**variables, **step(variables, x)}
    serve = qwix.quantize_model(module, serve_cls(rules))
    # The weights' quantization layout (WithAux leaves) comes from a PtqProvider model: SqInferenceProvider's own
    # dot_general never wraps a kernel, so its abstract params would leave every weight float.
    layout = serve if method != 'smoothquant' else qwix.quantize_model(module, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(layout.init, jax.random.key(0), sample)['params']
    qparams = quantize(params, abstract, variables['quant_stats'])
  jax.block_until_ready(qparams)
  seconds = time.perf_counter() - t0
  return jax.jit(lambda x: serve.apply({'params': qparams}, x)), seconds


# ------------------------------------------------------------------------------------------------ the study


def _qjax_config(config, method: str, bits: int, grid: str, float_dir: str):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.mode = 'ptq'
    c.init_from = float_dir
    c.quant.weight.format = f'int{bits}'
    c.quant.weight.calibration = grid
    c.ptq.method = method
  return c


def _evaluate(data, config, task: str, apply) -> dict[str, float]:
  def sums(x, y, w):
    _, ce, hits = trainers.loss_fn(apply(jnp.asarray(x)), jnp.asarray(y), task)
    return {'loss': jnp.sum(ce * w), 'correct': jnp.sum(hits * w), 'count': jnp.sum(w)}
  return trainers.evaluate(data, config, sums, task)


def check_metric(metric: str) -> None:
  """config.peer.metric must be one both tools' evaluations give: any other was a KeyError after every run."""
  if metric not in METRICS:
    raise config_cli.ConfigError(f'config.peer.metric={metric!r} is not one of {", ".join(METRICS)}'
                                 f'{config_cli.did_you_mean(metric, METRICS)}')


def run_study(config, workdir: str, log=print) -> list[dict]:
  """Every (seed, method, bits) row of config.peer, for both tools; returns the rows (also in peer_ptq.json)."""
  p = config.peer
  check_metric(p.metric)
  seeds = tuple(p.get('seeds', (config.seed,)))
  config = config.copy_and_resolve_references()
  with config.unlocked():
    del config['peer']  # the runs are ordinary runner runs: the study's own keys stay out of their configs
  out_json = os.path.join(workdir, 'peer_ptq.json')
  # Finished rows are reused only for the same study: the config (peer section included, but for the seeds, which
  # each row carries) is stored beside them.
  peer = {k: v for k, v in p.to_dict().items() if k != 'seeds'}
  study = json.loads(json.dumps({'config': config_cli.to_dict(config), 'peer': peer}))
  saved = json.load(open(out_json)) if os.path.exists(out_json) else {**study, 'rows': []}
  if {k: saved.get(k) for k in study} != study:
    raise config_cli.ConfigError(f'{out_json} holds the rows of another config; use another --workdir')
  rows, floats = [r for r in saved['rows'] if 'error' not in r], []  # failed rows run again
  for seed in seeds:
    rows, value = _run_seed(config, seed, seed_dir(workdir, seed), p, rows,
                            lambda rs: write_json_atomic(out_json, {**study, 'rows': rs}), log)
    floats.append(value)
  table = render([r for r in rows if r.get('seed', 0) in seeds], p.metric, floats)
  with open(os.path.join(workdir, 'peer_ptq.md'), 'w') as f:
    f.write(table + '\n')
  print(table)
  return rows


def seed_dir(workdir: str, seed: int) -> str:
  """Seed 0's runs in the workdir itself (where a one-seed study keeps them), seed s's in <workdir>/seed<s>."""
  return workdir if seed == 0 else os.path.join(workdir, f'seed{seed}')


def _seeded(config, seed: int):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.seed = seed
  return c


def _run_seed(config, seed: int, workdir: str, p, rows: list[dict], save, log) -> tuple[list[dict], float]:
  """One seed's comparison in workdir (its float model, then every row not yet in `rows`): (all rows, the float
  model's metric)."""
  config = _seeded(config, seed)
  done = {(r.get('seed', 0), r['tool'], r['grid'], r['method'], r['bits']) for r in rows}
  float_dir = os.path.join(workdir, 'float')
  float_result = train.train_and_evaluate(train.float_config(config), float_dir, log=log, write_hparams=False)

  # Qwix's inputs: the float params and the same calibration batches the runner's PTQ reads (train batches 0..n-1).
  _, data, md = train._setup(config, workdir, log)
  if md.api != 'linen':
    raise config_cli.ConfigError(f'config.model.name={config.model.name!r}: Qwix\'s PTQ methods take a Linen model')
  tx, _ = train.make_optimizer(config)
  sample = jnp.asarray(input_pipeline.sample_input(data, config.batch_size))
  with config.unlocked():
    config.init_from = float_dir
  params = train.load_float_state(config, workdir, trainers.make(md, tx), sample, log)['params']
  calib = [jnp.asarray(input_pipeline.train_batch(data, config.seed, i, config.batch_size)[0])
           for i in range(config.quant.calibration_batches)]
  metric = p.metric

  for bits in p.bits:
    for method in p.methods:
      for grid in p.qjax_grids:
        if (seed, 'qjax', grid, method, bits) in done:
          continue
        r = train.train_and_evaluate(_qjax_config(config, method, bits, grid, float_dir),
                                     os.path.join(workdir, 'qjax', f'{method}_w{bits}_{grid}'), log=log,
                                     write_hparams=False)
        info = r.get('train', {}).get('ptq')
        rows.append({'seed': seed, 'tool': 'qjax', 'grid': grid, 'method': method, 'bits': bits,
                     metric: r['metrics'][metric], 'seconds': info['wall_time_sec'] if info else None})
        save(rows)
      if (seed, 'qwix', QWIX_GRID, method, bits) not in done:
        row = {'seed': seed, 'tool': 'qwix', 'grid': QWIX_GRID, 'method': method, 'bits': bits}
        try:
          apply, seconds = qwix_ptq(md.module, params, calib, method, bits, p.qwix_layers, sample)
          row.update({metric: _evaluate(data, config, md.task, apply)[metric], 'seconds': seconds})
        except Exception as e:  # noqa: BLE001 - a peer's failure is a result of the comparison
          row['error'] = f'{type(e).__name__}: {e}'.splitlines()[0]
          log(f'qwix {method} W{bits} failed:\n{traceback.format_exc(limit=3)}')
        rows.append(row)
        save(rows)
      log(f'seed {seed} W{bits} {method}: ' + ', '.join(
          _cell(r, metric) for r in rows if (r.get('seed', 0), r['method'], r['bits']) == (seed, method, bits)))
  return rows, float_result['metrics'][metric]


def _cell(r: dict, metric: str) -> str:
  if 'error' in r:
    return f'{r["tool"]} ({r["grid"]}) failed ({r["error"][:60]})'
  t = '' if r['seconds'] is None else f' / {r["seconds"]:.1f} s'
  return f'{r["tool"]} ({r["grid"]}) {r[metric]:.4f}{t}'


def _stat(values) -> str:
  """'0.9042' for one value, 'mean ± std' (sample std) for several."""
  v = np.asarray(values, np.float64)
  return f'{v[0]:.4f}' if len(v) == 1 else f'{v.mean():.4f} ± {v.std(ddof=1):.4f}'


def render(rows: list[dict], metric: str, float_values) -> str:
  """The markdown table: a row per method, a column per (bits, tool and grid); cell 'metric / method seconds',
  over several seeds 'mean ± std / mean seconds'. A cell where any seed failed shows the failure."""
  floats = np.atleast_1d(np.asarray(float_values, np.float64))
  bits = sorted({r['bits'] for r in rows}, reverse=True)
  methods = list(dict.fromkeys(r['method'] for r in rows))
  tools = list(dict.fromkeys((r['tool'], r['grid']) for r in rows))
  by = {}
  for r in rows:
    by.setdefault((r['tool'], r['grid'], r['method'], r['bits']), []).append(r)
  name = lambda t, g: f'{"Qwix" if t == "qwix" else t} {GRID_NAMES.get(g, g)}'
  head = '| method | ' + ' | '.join(f'W{b} {name(t, g)}' for b in bits for t, g in tools) + ' |'
  over = f' over {len(floats)} seeds (mean ± sample std)' if len(floats) > 1 else ''
  lines = [f'float {metric}: {_stat(floats)}; cell: {metric} / method seconds{over}', '', head,
           '|---|' + '---|' * (len(bits) * len(tools))]
  for m in methods:
    cells = []
    for b in bits:
      for t, g in tools:
        rs = by.get((t, g, m, b), [])
        failed = [r for r in rs if 'error' in r]
        secs = [r['seconds'] for r in rs if r.get('seconds') is not None]
        if not rs:
          cells.append('—')
        elif failed:
          cells.append(f'fails: {failed[0]["error"][:50]}')
        else:
          value = _stat([r[metric] for r in rs])
          cells.append(f'{value} / {np.mean(secs):.1f}' if len(secs) == len(rs) else value)
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  if config_cli.wants_help(argv):
    print(config_cli.help_text(__doc__, FLAGS, argv))
    return 0
  config, flags = config_cli.parse_argv(argv)
  config_cli.check_flags(flags, ('workdir',))
  if not flags.get('workdir'):
    raise config_cli.ConfigError('missing --workdir=<dir>')
  if 'peer' not in config:
    raise config_cli.ConfigError('the config has no `peer` section (methods, bits, metric, qwix_layers): use '
                                'configs/peer_ptq_fmnist.py or a config like it')
  check_metric(config.peer.metric)
  workdir = config_cli.writable_dir(flags['workdir'], 'workdir')
  run_study(config, workdir)
  return 0

