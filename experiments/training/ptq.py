"""PTQ methods in the runner: config.ptq (experiments/config/ptq.py) -> qjax.ptq, applied to every 2-D kernel
(Dense / Linear) a rule quantizes.

    config.ptq.method        'rtn' (default: the calibrated round-to-nearest conversion alone), a method name, or
                             several applied in order: 'smoothquant,gptq' (or a tuple of names)
    config.ptq.<method>.<p>  each method's parameters, with its paper's defaults (qjax.ptq.registry)
    config.ptq.max_sample    calibration rows kept per layer for AWQ / AdaRound (the sums are over all rows)

A PTQ run with a method: (1) `gather_stats` runs the quantized model on config.quant.calibration_batches batches
and sums each target layer's input statistics; (2) each layer's methods run (qjax.ptq.run); (3) the float kernels
and biases become the methods' (rotated / scaled kernels, corrected biases), layers with a rotation or scale get
their online input op (qjax.ptq.online), and the methods' integer kernels are kept for serving
(`patch_serving` puts them in the converted tree); (4) activation ranges are calibrated as for RTN, then the run
evaluates the serving model. Kernels are flattened to (contracted, rest): DenseGeneral / LinearGeneral over their
`axis` (attention q/k/v and output projections), convolutions (2-D, one feature group, per-channel or per-tensor
weights) over (kh, kw, in) with im2col inputs. Methods that add an online input op (rotation, SmoothQuant, AWQ)
apply only where the kernel contracts the input's last axis alone; elsewhere they are left out
(ptq.input_op_methods_left_out lists those layers) and the rest of the list runs. Layers whose input could not be
matched to their kernel (einsums) stay RTN: ptq.skipped. Each layer gets its own scale or rotation (SmoothQuant's
shared scale over q, k and v is not used: each projection has its own online op).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax.ptq
from experiments.config import ptq as ptq_config
from experiments.training.progress import Progress
from qjax.ptq import layer as L
from qjax.ptq import online, registry


def _weight_spec(tr, state, path):
  rs = tr.ruleset(state)
  rule = rs.peek(path, 'dot_general')
  if rule is None or rule.keep_float or rule.weight is None:
    return None
  return rs.effective(path, 'dot_general', 0, rule).weight


def targets(tr, state):
  """({path: (kernel, bias, weight spec)} of the kernels a rule quantizes, [paths left to RTN]). Which axes of a
  kernel are contracted is learned when its inputs are captured (`_rows`)."""
  todo, skipped = {}, []
  for path, (w, b) in tr.kernels(state).items():
    spec = _weight_spec(tr, state, path)
    if spec is None:
      continue
    if w.ndim < 2 or (b is not None and tuple(b.shape) != tuple(w.shape[w.ndim - b.ndim:])):
      skipped.append(path)
    else:
      todo[path] = (w, b, spec)
  return todo, skipped


# --------------------------------------------------------------------------------------------- statistics


def _rows(x, module):
  """(rows, n_in): a module input as rows of its kernel's contraction, and how many leading kernel axes that
  contraction covers: x over its last axis (Dense / Linear), or its last len(axis) axes (DenseGeneral /
  LinearGeneral, e.g. an attention output projection over (heads, head_dim)), or im2col patches (conv), whose
  features are ordered (kh, kw, in) like the flattened HWIO kernel."""
  ks = getattr(module, 'kernel_size', None)
  if ks is None or x.ndim != 4:
    axis = getattr(module, 'axis', -1)
    n_in = len(axis) if isinstance(axis, (tuple, list)) else 1
    return x.reshape((-1, int(np.prod(x.shape[x.ndim - n_in:])))), n_in
  ks = tuple(ks) if isinstance(ks, (tuple, list)) else (ks, ks)
  dilated = (getattr(module, 'input_dilation', None) or 1) not in (1, (1, 1))
  if getattr(module, 'feature_group_count', 1) != 1 or dilated:
    raise ValueError('grouped or input-dilated convs are not supported')
  pair = lambda v: (1, 1) if v is None else (tuple(v) if isinstance(v, (tuple, list)) else (v, v))
  pad = module.padding if isinstance(module.padding, str) else [tuple(p) if isinstance(p, (tuple, list)) else (p, p)
                                                                for p in module.padding]
  p = jax.lax.conv_general_dilated_patches(x, ks, pair(module.strides), pad,
                                           rhs_dilation=pair(getattr(module, 'kernel_dilation', None)),
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))   # features (in, kh, kw)
  c = x.shape[-1]
  p = p.reshape(p.shape[:3] + (c, ks[0] * ks[1]))
  return jnp.swapaxes(p, -1, -2).reshape(-1, ks[0] * ks[1] * c), 3                  # (rows, kh kw in)


def _batch_stats(x, max_sample: int) -> dict[str, jax.Array]:
  x = x.astype(jnp.float32)
  idx = np.linspace(0, x.shape[0] - 1, min(max_sample, x.shape[0])).astype(int)
  return {'xtx': x.T @ x, 'x_sum': x.sum(0), 'x_abs_sum': jnp.abs(x).sum(0), 'x_absmax': jnp.abs(x).max(0),
          'sample': x[idx], 'n': jnp.asarray(x.shape[0])}


def gather_stats(run, state, paths, max_sample: int = 512) -> tuple[dict[str, L.Stats], dict[str, int]]:
  """Input statistics of the modules at `paths` over the calibration batches, one jitted forward per batch, and
  the number of leading kernel axes each module contracts (`_rows`).

  Calibration inputs are module inputs, taken at qjax.ptq.online's capture point on the quantized model in
  evaluation mode (`trainer.ptq_forward`). Not qjax.flax.capture: the methods here need the im2col Hessian of a
  convolution (capture sums a conv's window into per-channel statistics) and a sample of input rows (AWQ's
  search, AdaRound's reconstruction), which capture does not keep."""
  fwd, args = run.trainer.ptq_forward(state, paths)
  n_in = {}

  @jax.jit
  def step(args, x):
    got, out = {}, {}
    with online.capture(lambda p, v, m: got.setdefault(p, (v, m)), paths):
      fwd(args, x)
    for p, (v, m) in got.items():  # after the forward: qjax no longer intercepts these ops (the im2col is a conv)
      rows, n_in[p] = _rows(v, m)
      out[p] = _batch_stats(rows, max_sample)
    return out

  stats: dict[str, L.Stats] = {}
  for i in range(run.config.quant.calibration_batches):
    out = jax.device_get(step(args, jnp.asarray(run.batch(i)[0])))
    for p, d in out.items():
      s = L.Stats(int(d['n']), *(np.asarray(d[k], np.float64) for k in ('xtx', 'x_sum', 'x_abs_sum', 'x_absmax')),
                  np.asarray(d['sample'], np.float32))
      stats[p] = L.merge(stats.get(p), s, max_sample)
  return stats, n_in


# ----------------------------------------------------------------------------------------------- the run


def _rel_error(lay: L.Layer, x, w, b) -> float:
  """Relative output MSE of the layer's integer kernel (with its input op and bias) on calibration rows x."""
  y = x @ w + (0 if b is None else b)
  y_hat = lay.transform_input(x) @ np.asarray(qjax.quantizers.dequantize(lay.q), np.float64)
  y_hat = y_hat + (0 if lay.bias is None else lay.bias)
  return float(np.sum((y - y_hat) ** 2) / max(np.sum(y ** 2), 1e-30))


def apply(run, state):
  """Runs config.ptq's methods on the run's model; returns (state, info for result.json)."""
  tr, c = run.trainer, run.config
  ms = ptq_config.methods(c.ptq)
  t0 = time.time()
  todo, skipped = targets(tr, state)
  stats, n_ins = gather_stats(run, state, tuple(todo), c.ptq.max_sample)
  done, layers, transforms, qs, left_out = {}, {}, {}, {}, []
  progress = Progress(len(todo), 0)
  input_ops = {n for n, _ in ms if registry.get(n).changes_input}
  for i, (path, (w0, b0, spec)) in enumerate(todo.items()):
    n_in = n_ins.get(path)
    w = None if n_in is None else w0.reshape((int(np.prod(w0.shape[:n_in])), -1))
    if w is None or w.shape[0] != len(stats[path].x_sum) or (n_in > 1 and spec.granularity == 'per_group'):
      skipped.append(path)
      continue
    b = None if b0 is None else b0.reshape(-1)
    # An online input op acts on the module's input: only where the kernel contracts its last axis alone.
    drop = input_ops if (n_in > 1 or w0.ndim == 4) else set()
    if drop & {n for n, _ in ms}:
      left_out.append(path)
    start = L.Layer(w, spec, stats[path], bias=b)
    lay = qjax.ptq.run(start, [m for m in ms if m[0] not in drop])
    rtn = qjax.ptq.run(start, ['rtn'])
    x = stats[path].sample.astype(np.float64)
    layers[path] = {'rel_output_mse': _rel_error(lay, x, w, b), 'rtn_rel_output_mse': _rel_error(rtn, x, w, b),
                    **({'notes': {k: v for k, v in lay.notes}} if lay.notes else {})}
    done[path], qs[path] = lay, _reshaped(lay.q, w0.shape, n_in)
    if lay.rotation is not None or lay.scale is not None:
      transforms[path] = (lay.rotation, lay.scale)
    progress.update(i + 1)
  progress.close()
  state = tr.ptq_update(state, {p: (lay.w, lay.bias) for p, lay in done.items()}, transforms)
  tr.ptq_weights = qs
  for path, m in layers.items():
    run.writer.scalars({f'ptq/{path}/rel_output_mse': m['rel_output_mse'],
                        f'ptq/{path}/rtn_rel_output_mse': m['rtn_rel_output_mse']}, 0)
  info = {'methods': [[n, {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}] for n, p in ms],
          'wall_time_sec': time.time() - t0, 'layers': layers, 'skipped': sorted(skipped),
          'online_ops': sorted(transforms), 'input_op_methods_left_out': sorted(left_out)}
  run.log(f'ptq {"+".join(n for n, _ in ms)}: {len(done)} layers in {info["wall_time_sec"]:.1f}s'
          + (f', {len(skipped)} left to RTN ({", ".join(sorted(skipped)[:4])})' if skipped else ''))
  return state, info


def _reshaped(q, shape, n_in: int):
  """A QArray of a flattened (prod(shape[:n_in]), prod(shape[n_in:])) kernel as one of the kernel's own shape:
  scales (groups or 1, outputs or 1) -> (groups or 1, 1, ..., output shape or 1s), as the ops expect."""
  if len(shape) == 2:
    return q
  g, o = q.scale.shape
  out = tuple(shape[n_in:]) if o > 1 else (1,) * (len(shape) - n_in)
  sshape = (g,) + (1,) * (n_in - 1) + out
  return qjax.quantizers.QArray(q.qvalue.reshape(shape), q.scale.reshape(sshape),
                                None if q.zero_point is None else q.zero_point.reshape(sshape), q.format, q.codebook)


def patch_serving(tr, served) -> None:
  """Puts the methods' integer kernels (tr.ptq_weights) into a converted serving tree (Linen variables) or
  converted NNX model, in place: the same format and packing as the RTN conversion chose."""
  if tr.ptq_weights:
    tr.ptq_serve(served, tr.ptq_weights)
