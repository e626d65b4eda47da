"""What a run reports: per-layer quantization statistics, serving size and speed checks, one-line summaries.

Per quantized layer (from one probe batch run in qjax's 'record' mode): SQNR in dB of weights and
activations against float, the clipped fraction, histograms of weights and scales, learned quantizer
parameters (do LSQ steps and PACT clips move?), and an image of the per-layer SQNR.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import fileio, timing
from experiments.config import cli as config_cli
from experiments.data import pipeline as input_pipeline
from experiments.training import ptq as ptq_runner
from experiments.training import trainers
from qjax import formats
from qjax import metrics as qmetrics
from qjax.flax.serving import ConversionError
from qjax.ops import inspect_matmuls


class NullWriter:
  """The writer of non-leading processes: writes nothing."""

  def __getattr__(self, name):
    return lambda *a, **k: None


def hparams_of(config) -> dict[str, Any]:
  """The config's scalar leaves as {dotted key: value}, the hparams a run reports to TensorBoard."""
  return config_cli.flatten(config_cli.to_dict(config), keep=(str, int, float, bool))


def one_line(result: dict) -> str:
  m = result.get('metrics', {})
  parts = [f'{result.get("mode")} {result.get("model")}/{result.get("dataset")}']
  for k in ('eval/accuracy', 'eval/bits_per_char', 'eval/loss'):
    if k in m:
      parts.append(f'{k.split("/")[1]}={m[k]:.4f}')
  if 'serving_bytes' in result:
    parts.append(f'serving={result["serving_bytes"] / 1024:.1f} KiB')
  mm = result.get('matmuls') or {}
  if mm:
    parts.append(f'int8 matmuls={mm.get("int8", 0)}/{mm.get("total", 0)}')
  parts.append(f'{result.get("wall_time_sec", 0):.0f}s')
  warnings = result.get('warnings') or []
  if warnings:
    parts.append(f'{len(warnings)} warning(s), first: {warnings[0]}')
  return 'done: ' + ', '.join(parts)


def _probe_records(run, state):
  """Runs one small eval batch in qjax's record mode, inside jit (eager ops would compile one by one).

  Returns (records, arrays): the records' static metadata, and per record the operand and quantizer state.
  """
  x, _, _ = next(input_pipeline.eval_batches(run.data, min(run.config.eval_batch_size, 64)))
  forward = run.trainer.records
  cache = run.__dict__.setdefault('_probe_cache', {})
  if 'probe' in cache:
    meta, jprobe = cache['probe']
    return meta, jprobe(state, jnp.asarray(x))
  meta = []

  def probe(st, x):
    records = forward(st, x)
    meta[:] = [dataclasses.replace(r, x=None, state={}, module=None) for r in records]
    return [(r.x, r.state) for r in records]
  jprobe = jax.jit(probe)
  arrays = jprobe(state, jnp.asarray(x))
  cache['probe'] = (meta, jprobe)
  return meta, arrays


def layer_stats(run, state) -> list[dict[str, Any]]:
  meta, arrays = _probe_records(run, state)

  def stats(arrays):
    out = []
    for r, (x, st) in zip(meta, arrays, strict=True):
      x = x.astype(jnp.float32)
      x_hat = qmetrics.fake_quant_with(x, r.spec, st)
      out.append((qmetrics.sqnr_db(x, x_hat), qmetrics.clip_fraction(x, r.spec, st)))
    return out
  cache = run.__dict__.setdefault('_probe_cache', {})
  if 'stats' not in cache:
    cache['stats'] = jax.jit(stats)
  values = cache['stats'](arrays)
  rows = []
  for r, (x, st), (sqnr, clip) in zip(meta, arrays, values, strict=True):
    rows.append({
        'layer': f'{r.path}/{r.prefix}', 'path': r.path, 'op': r.prefix.rsplit('_', 1)[0],  # '<op><i>_<side>'
        'operand': r.weight_name.rsplit('/', 1)[-1] if r.weight_name else 'act', 'param': r.weight_name,
        'format': r.spec.format, 'kept_8bit': r.kept_8bit,
        'grid': _grid(r.spec),
        'sqnr_db': float(sqnr), 'clip_fraction': float(clip),
        'learned': {k: float(jnp.mean(jnp.asarray(st[k]))) for k in r.spec.learned},
        '_x': x if r.weight_name else None, '_scale': st.get('scale', st.get('alpha')),
    })
  return rows


def _grid(spec) -> str:
  """'signed' or 'unsigned' for an integer grid (the act_signedness choice), else the format's kind."""
  fmt = spec.fmt
  if isinstance(fmt, formats.IntFormat):
    return 'signed' if fmt.signed else 'unsigned'
  return type(fmt).__name__.removesuffix('Format').lower()


def quant_summaries(run, state, step: int) -> list[dict[str, Any]]:
  """Writes the per-layer statistics to TensorBoard; returns them (without arrays) for result.json."""
  if not run.trainer.quantized or not run.config.quant_summaries:
    return []
  rows = layer_stats(run, state)
  w = run.writer
  for row in rows:
    tag = f'{row["layer"]}_{row["operand"]}'
    w.scalar(f'quant_sqnr_db/{tag}', row['sqnr_db'], step)
    w.scalar(f'quant_clip_fraction/{tag}', row['clip_fraction'], step)
    for k, v in row['learned'].items():
      w.scalar(f'quant_learned/{tag}_{k}', v, step)
    if row['_x'] is not None:
      w.histogram(f'weights/{tag}', np.asarray(row['_x']), step)
    if row['_scale'] is not None:
      w.histogram(f'scales/{tag}', np.asarray(row['_scale']).ravel(), step)
  if rows:
    w.image('quant/sqnr_per_layer', sqnr_chart(rows), step)
  return [{k: v for k, v in r.items() if not k.startswith('_')} for r in rows]


def sqnr_chart(rows) -> bytes:
  """The per-layer SQNR image (PNG) of `sqnr_figure`."""
  fig = sqnr_figure(rows)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def _op_key(row) -> str:
  """A row's quantized op ('conv1/conv0'): both operands of one op (its _lhs and _rhs rows) share it."""
  return f'{row["path"]}/{row["op"]}' if 'op' in row else row['layer']


def layer_names(rows) -> dict[str, str]:
  """Op key -> the name the rules report gives its layer: the module path ('conv1'), with the op only where a
  path holds several quantized ops ('block/conv0', 'block/dot_general0')."""
  ops = {}
  for r in rows:
    ops.setdefault(r.get('path', r['layer']), set()).add(_op_key(r))
  return {_op_key(r): _op_key(r) if len(ops[r.get('path', r['layer'])]) > 1 else r.get('path', r['layer'])
          for r in rows}


def sqnr_figure(rows):
  """Bars of SQNR (dB) per layer, weights and activations side by side, each layer's bars centred on its tick (a
  layer with one quantized operand has one bar), the legend outside the plot area."""
  matplotlib.use('Agg')
  names = layer_names(rows)
  layers = list(dict.fromkeys(_op_key(r) for r in rows))
  fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(layers) + 3), 3.5), dpi=100)
  width, colors = 0.38, {'weight': 'tab:blue', 'act': 'tab:orange'}
  for i, layer in enumerate(layers):
    have = [(kind, r['sqnr_db']) for kind in ('weight', 'act') for r in rows
            if _op_key(r) == layer and (r['operand'] == 'act') == (kind == 'act')][:2]
    for j, (kind, v) in enumerate(have):
      ax.bar(i + (j - (len(have) - 1) / 2) * width, min(v, 99.0), width, color=colors[kind], label=kind)
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles, strict=True))
  ax.set_xticks(np.arange(len(layers)), [names[layer] for layer in layers], rotation=30, ha='right', fontsize=7)
  ax.set_xlim(-0.6, len(layers) - 0.4)
  ax.set_ylabel('SQNR (dB)')
  ax.set_title('quantization SQNR per layer (higher is better)')
  ax.legend(unique.values(), unique.keys(), loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  fig.tight_layout()
  return fig


def checkpoint_bytes(tree, path: str | None = None) -> int | None:
  """Bytes on disk of `tree` saved by orbax's StandardCheckpointer (its defaults: OCDBT, zstd) at `path`
  (replaced if present), or in a temporary directory. None in multi-process runs, where every process would have
  to join the save."""
  if jax.process_count() > 1:
    return None

  def save(p: str) -> int:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(p), tree, force=True)
    ckpt.wait_until_finished()
    return fileio.dir_bytes(p)

  if path is not None:
    return save(path)
  with tempfile.TemporaryDirectory() as tmp:
    return save(os.path.join(tmp, 'ckpt'))


def tree_bytes(tree) -> int:
  """Bytes of the arrays in a pytree (leaves without `nbytes` count 0): parameters as held or as served."""
  return int(sum(getattr(a, 'nbytes', 0) for a in jax.tree.leaves(tree)))


def serving_summary(run, state, rules) -> dict[str, Any]:
  """Serving size, serving accuracy (the converted int8 model) and how many of its matmuls run in int8."""
  tr = run.trainer
  state = jax.device_get(state)
  x, y, w = next(input_pipeline.eval_batches(run.data, run.config.eval_batch_size))
  x = jnp.asarray(x)
  float_params = tr.float_params(state)
  float_bytes = tree_bytes(float_params)
  float_ckpt = checkpoint_bytes(float_params)
  try:
    fwd, args, served_params, serving_tree = serving_forward(tr, state, x, rules)
  except ConversionError as e:
    # A quantizer with no integer grid (DoReFa weights) has no serving form: say so rather than serve another model.
    return {'serving_error': str(e)}
  serving_bytes = float_bytes if served_params is None else tree_bytes(served_params)
  ckpt = {'float_bytes': float_ckpt}
  if serving_tree is not None and float_ckpt is not None:
    # The serving model as a deployable orbax checkpoint: <workdir>/serving (restores with the serving model).
    ckpt['serving_dir'] = 'serving'
    ckpt['serving_bytes'] = checkpoint_bytes(serving_tree, os.path.join(run.workdir, 'serving'))
    ckpt['ratio_to_float'] = ckpt['serving_bytes'] / float_ckpt
  jfwd = jax.jit(fwd)
  latency = _latency(jfwd, args, x, None if rules is None else _float_forward(run, x))
  out = {'serving_bytes': serving_bytes, 'checkpoint': ckpt, 'latency': latency}
  report = inspect_matmuls(fwd, *args, x)
  out['matmuls'] = {'total': report.n_compiled, 'int8': report.n_int8, 'int8_fast': report.n_int8_fast,
                    'int8_slow': report.n_int8_slow, 'batch': int(x.shape[0])}
  if rules is not None:
    out['serving_metrics'] = _eval_fwd(run, jfwd, args)
    out['float_param_bytes'] = float_bytes
  return out


def serving_forward(tr, state, x, rules):
  """The forward a trained run serves, in evaluation mode: (forward(*args, x), args, served params, serving tree).

  Quantized runs are converted for serving (int8 / packed int4 ServingWeights; convert_linen / convert_nnx run
  the model once on x); the serving tree is what `<workdir>/serving` holds. A float run serves its own model:
  served params and serving tree are None."""
  if rules is None:
    return *tr.eval_forward(state), None, None
  served = tr.convert(state, x)
  ptq_runner.patch_serving(tr, served)  # a PTQ method's integer kernels (experiments/training/ptq.py), if any
  return tr.serving_forward(served)


def _float_forward(run, x):
  """(forward, args) of the float model of the same architecture (fresh weights: only its speed is used)."""

  tr = trainers.make(run.md, optax.sgd(0.0), None)
  return tr.eval_forward(tr.init(jax.random.key(0), x))


def _latency(jfwd, args, x, float_fwd=None) -> dict[str, Any]:
  """The serving forward on one eval batch timed by the benchmark harness (experiments/timing.py),
  interleaved with the float model's forward (`float_fwd`: (forward, args); None for a float run, its own baseline), so
  `ratio_to_float` compares samples of the same moment (absolute times of trials that ran at different times or
  loads do not compare; their ratios do)."""
  fns = {'serving': lambda: jfwd(*args, x)}
  if float_fwd is not None:
    ffwd, fargs = jax.jit(float_fwd[0]), float_fwd[1]
    fns['float'] = lambda: ffwd(*fargs, x)
  st = timing.time_interleaved(fns, warmup=2, rounds=7, min_time=0.05)
  serving = st['serving']
  base = st.get('float', serving)
  return {'serving_ms': 1e3 * serving.median, 'float_ms': 1e3 * base.median,
          'ratio_to_float': serving.median / base.median, 'batch': int(x.shape[0]), 'spread': serving.spread,
          'method': 'experiments.timing.time_interleaved (wall clock, 7 interleaved samples, median)'}


def _eval_fwd(run, jfwd, args) -> dict[str, float]:

  def batch_sums(x, y, w):
    _, ce, hits = trainers.loss_fn(jfwd(*args, jnp.asarray(x)), jnp.asarray(y), run.md.task)
    return {'loss': jnp.sum(ce * w), 'correct': jnp.sum(hits * w), 'count': np.sum(w)}
  return trainers.evaluate(run.data, run.config, batch_sums, run.md.task)
