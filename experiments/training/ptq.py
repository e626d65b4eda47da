"""PTQ methods in the runner: config.ptq (experiments/config/ptq.py) -> qjax.ptq, applied to every kernel a rule
quantizes whose op contracts its leading axes (below).

    config.ptq.method        'rtn' (default: the calibrated round-to-nearest conversion alone), a method name, or
                             several applied in order: 'smoothquant,gptq' (or a tuple of names)
    config.ptq.<method>.<p>  each method's parameters, with its paper's defaults (qjax.ptq.registry)
    config.ptq.max_sample    calibration rows kept per layer for AWQ / AdaRound (the sums are over all rows)
    config.ptq.fold_batchnorm  fold each BatchNorm into the Dense / Conv before it first (qjax.ptq.batchnorm)
    config.ptq.equalize      then equalize consecutive layers' channel ranges (qjax.ptq.equalization)
                             (both on the float state the run loads, before quantizing, with any method, RTN too)

A PTQ run with a method: (1) `gather_stats` takes each quantized op's calibration statistics through the public
Flax capture API (qjax.flax.capture, via `trainer.capture`: capture_linen / capture_nnx) on
config.quant.calibration_batches batches: the model runs in float, in evaluation mode, jit-compiled, one batch at a
time, and per op keeps x^T x, sum x, sum |x|, max |x| over its activation rows and at most max_sample of the rows,
so memory is O(K^2 + max_sample K) per op; (2) `match` pairs each target kernel ('<module path>/kernel') with the
one op that uses it, and each layer's methods run (qjax.ptq.run); (3) the float kernels and biases become the
methods' (rotated / scaled kernels, corrected biases), layers with a rotation or scale get their online input op
(qjax.ptq.online), a bias-free layer that bias correction gave a bias gets it as an online output shift (Flax's
own layers, whose output is their op's; elsewhere it is dropped and ptq.layers.<path>.notes says so), and the
methods' integer kernels are kept for serving (`patch_serving` puts them in the converted tree); (4) activation
ranges are calibrated as for RTN, then the run evaluates the serving model.

Per-layer error (ptq.layers.<path> in result.json, ptq/<path>/... in TensorBoard): `rel_output_mse` is
||x W + b - (x' Q + b')||^2 / ||x W + b||^2 on the layer's captured calibration rows x, with x' the online input op
of x and Q the dequantized integer kernel (the weights' error; `rtn_rel_output_mse` the same for round-to-nearest);
`act_rel_output_mse` (`act_error_layers`, after step 4) also quantizes x' on the operand's calibrated
per-tensor grid, as the served op does: the error of the layer as served, on float inputs. It is absent where the
activations stay float, and null (ptq.act_error_skipped says why) for activation scales that are not per-tensor
or not calibrated (dynamic).

Every layer's inputs are the float model's, unless config.ptq.sequential: then the layers run in the order their
ops ran, and each layer's statistics are captured again on the model whose earlier layers hold their quantized
(dequantized integer) kernels and input ops, as GPTQ (Frantar et al. 2022) calibrates; one capture pass per layer.
A kernel is flattened to (K, rest) when its op contracts its leading axes: Dense / Linear (in, out),
DenseGeneral / LinearGeneral over their `axis` (attention q/k/v and output projections), convolutions (2-D, one
feature group, no input dilation; per-channel or per-tensor weights) over (kh, kw, in), with capture's im2col
patches as rows. Other kernels stay RTN and are listed in ptq.skipped (ptq.skipped_reasons says why): no captured
op uses them, two ops do, the op runs in another module, or it contracts axes that are not the kernel's leading
ones (a grouped conv, whose patches capture falls back to channels). Methods that add an online input op
(rotation, SmoothQuant, AWQ) apply where the op contracts its activation's last axis alone, taken to be the
module's input (as in Dense / Linear); on a 2-D convolution SmoothQuant and AWQ apply with one scale per input
channel (qjax.ptq.layer: `tied`), which the online op multiplies into the conv's input, while a rotation does not;
elsewhere (an attention output over (heads, head_dim)) they are left out (ptq.input_op_methods_left_out lists
those layers) and the rest of the list runs. Each layer gets its own scale
or rotation (SmoothQuant's shared scale over q, k and v is not used: each projection has its own online op).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax.ptq
from experiments.config import ptq as ptq_config
from experiments.data import pipeline as input_pipeline
from experiments.training.progress import Progress
from qjax.ptq import layer as L
from qjax.ptq import online, registry


def _weight_spec(tr, state, path):
  """The weight spec the rules give the op at `path`, asked by the op the model ran there (a conv, an einsum
  or a dot_general, as recorded): rules may be limited by op name, and a first or last op kept at 8 bits is
  recorded per op. Asking as 'dot_general' gave a first conv the low-bit spec, which its serving then refused."""
  rs = tr.ruleset(state)
  op = next((o for (p, o, _) in rs.matches if p == path), 'dot_general')
  rule = rs.peek(path, op)
  if rule is None or rule.keep_float or rule.weight is None:
    return None
  return rs.effective(path, op, 0, rule).weight


def targets(tr, state):
  """({path: (kernel, bias, weight spec)} of the kernels a rule quantizes, {path: why left to RTN}). Which axes
  of a kernel its op contracts is learned when the calibration data are captured (`match`)."""
  todo, skipped = {}, {}
  for path, (w, b) in tr.kernels(state).items():
    spec = _weight_spec(tr, state, path)
    if spec is None:
      continue
    if w.ndim < 2:
      skipped[path] = f'a {w.ndim}-D kernel'
    elif b is not None and tuple(b.shape) != tuple(w.shape[w.ndim - b.ndim:]):
      skipped[path] = f'bias {tuple(b.shape)} is not the kernel {tuple(w.shape)}\'s trailing shape'
    else:
      todo[path] = (w, b, spec)
  return todo, skipped


# --------------------------------------------------------------------------------------------- statistics

CAPTURED = ('xtx', 'sum', 'mean_abs', 'absmax', 'sample')  # what L.Stats holds


def _layer_stats(st) -> L.Stats:
  """A capture OpStats (qjax.flax.capture) as the methods' Stats, in float64 (the sample in float32)."""
  f = lambda a: np.asarray(a, np.float64)
  return L.Stats(int(round(float(st.count))), f(st.xtx), f(st.sum_x), f(st.sum_abs), f(st.absmax),
                 np.asarray(st.sample, np.float32))


def gather_stats(run, state, max_sample: int = 512) -> dict:
  """qjax.flax.capture's statistics of every quantized op with one weight operand over
  config.quant.calibration_batches batches ({key: (OpSite, L.Stats)}): the model runs in float, in evaluation
  mode, one jit-compiled forward per batch (`trainer.capture`), convolutions as im2col patches ordered like
  their flattened kernel; the sums are over all rows, the sample keeps at most max_sample rows per op. In the
  order the ops ran."""
  batches = (jnp.asarray(run.batch(i)[0]) for i in range(run.config.quant.calibration_batches))
  got = run.trainer.capture(state, batches, stats=CAPTURED, max_sample=max_sample, conv_features='patches')
  host = jax.device_get(got)  # a dict with sorted keys: iterate over got's, which are in call order
  return {key: (site, _layer_stats(host[key][1])) for key, (site, _) in got.items()}


def _kernel_param(path: str) -> str:
  return f'{path}/kernel' if path else 'kernel'


def _why_not(site, w, spec) -> str:
  """Why a captured op's kernel cannot be flattened to (K, rest) with its rows as features ('' when it can): the
  op must contract the kernel's leading axes, in order."""
  n_in = len(site.contracting)
  if site.contracting != tuple(range(n_in)):
    return (f'{site.op} contracts kernel axes {site.contracting}, not its leading axes'
            + (f' ({site.conv_features}: {site.note})' if site.note else ''))
  if tuple(site.weight_shape) != tuple(w.shape) or int(np.prod(w.shape[:n_in])) != site.features:
    return f'captured features {site.features} do not match the kernel {tuple(w.shape)}'
  if n_in > 1 and spec.granularity == 'per_group' and w.shape[n_in - 1] % spec.group_size:
    # The flattened rows' groups would straddle the last contracting axis, where the op groups within it.
    return (f'groups of {spec.group_size} do not divide the last of its contracting axes ({w.shape[n_in - 1]} '
            'long)')
  return ''


def match(todo, captured) -> tuple[dict, dict[str, str]]:
  """({path: (OpSite, L.Stats)}, {path: why left to RTN}): each target kernel's one captured op. A kernel
  qualifies when exactly one op uses it, in its own module, contracting its leading axes (`_why_not`)."""
  by_weight: dict[str, list] = {}
  for site, st in captured.values():
    by_weight.setdefault(site.weight, []).append((site, st))
  found, skipped = {}, {}
  for path, (w, _, spec) in todo.items():
    uses = by_weight.get(_kernel_param(path), [])
    if not uses:
      skipped[path] = 'no quantized op with this kernel as its weight operand was captured'
      continue
    if len(uses) > 1:
      skipped[path] = f'{len(uses)} ops use this kernel ({", ".join(s.prefix for s, _ in uses)})'
      continue
    site, st = uses[0]
    why = (f'its op runs in module {site.module_path or "<root>"}' if site.module_path != path
           else _why_not(site, w, spec))
    if why:
      skipped[path] = why
    else:
      found[path] = (site, st)
  return found, skipped


def _input_is_last_axis(site) -> bool:
  """Whether an online input op (x @ rotation) / scale over the module input's last axis is the op's input
  transform: a matmul contracting its activation's last axis alone (not a conv's patches, not
  (heads, head_dim)). This takes the module's input to be the op's activation operand, as in Flax's Dense,
  DenseGeneral and nnx.Linear."""
  return site.op != 'conv' and site.act_contracting == (site.act_ndim - 1,)


def _conv_channels(site, w0) -> int | None:
  """C, when the op is a 2-D convolution over im2col patches of an NHWC input with an HWIO kernel, whose features
  are (kh, kw, C) with C the input's last axis: then a per-channel online scale on the conv's input is a scale of
  the features, repeated over the window (SmoothQuant, AWQ). None otherwise."""
  if site.op != 'conv' or site.conv_features != 'patches' or w0.ndim != 4:
    return None
  channels_last = site.act_contracting[:1] == (site.act_ndim - 1,)  # the input's channel axis is its last
  return int(w0.shape[2]) if channels_last and tuple(site.contracting) == (0, 1, 2) else None


# ----------------------------------------------------------------------------------------------- the run


def _bias_or_shift(lay: L.Layer, b0, site, out_shape):
  """(layer, the module's new bias or None, an online output shift or None). A method that gave a bias-free op
  a bias (bias correction) is served as the op's output shift, where the module is a Flax layer whose output is
  its op's output (qjax.ptq.online.PLAIN_LAYERS); elsewhere it is dropped and the layer's notes say so."""
  if lay.bias is None or b0 is not None:
    return lay, lay.bias, None
  if site.module_type in online.PLAIN_LAYERS:
    return lay, None, np.asarray(lay.bias, np.float32).reshape(out_shape)
  why = f'dropped: {site.module_type or "the module"} is not a Flax layer whose output is its op\'s output'
  return lay.replace(bias=None, notes=lay.notes + (('output_shift', why),)), None, None


# Compiled once per shape rather than run op by op (each eager op compiles on its own: seconds per PTQ run).
_fake_quant = jax.jit(qjax.quantizers.fake_quant, static_argnums=1)
_dequantize = jax.jit(qjax.quantizers.dequantize)


def _rel_error(lay: L.Layer, x, w, b, act=None) -> float:
  """Relative output MSE of the layer's integer kernel (with its input op and bias) on calibration rows x; with
  `act` = (spec, params), the op's input also quantized as served, on that per-tensor grid."""
  y = x @ w + (0 if b is None else b)
  x_in = lay.transform_input(x)
  if act is not None:
    x_in = np.asarray(_fake_quant(jnp.asarray(x_in, jnp.float32), *act), np.float64)
  y_hat = x_in @ np.asarray(_dequantize(lay.q), np.float64)
  y_hat = y_hat + (0 if lay.bias is None else lay.bias)
  return float(np.sum((y - y_hat) ** 2) / max(np.sum(y ** 2), 1e-30))


def act_error_layers(run, state, info) -> None:
  """Adds each PTQ layer's `act_rel_output_mse` to `info` (apply's) and TensorBoard, on the state whose
  activation ranges are calibrated (module docstring). A no-op where the activations stay float."""
  local = run.trainer.__dict__.pop('ptq_local', {})
  if not local or not run.trainer.quantized:
    return
  records = run.trainer.records(state, jnp.asarray(input_pipeline.sample_input(run.data, 8)))
  acts = {(r.path, r.prefix.rsplit('_', 1)[0]): r for r in records if r.weight_name is None}
  skipped = {}
  for path, (lay, x, w, b, site) in local.items():
    r = acts.get((site.module_path, site.prefix))
    if r is None:
      continue  # float activations: the weights' error is the layer's
    why = (f'{r.spec.granularity} activation scales (measured on per-tensor grids only)'
           if r.spec.granularity != 'per_tensor' else
           'dynamic activation scales (each served batch has its own; the calibration rows are no such batch)'
           if not r.state else '')
    if why:
      info['layers'][path]['act_rel_output_mse'] = None
      skipped[path] = why
      continue
    # per-tensor: every quantizer param is one number, in the operand's rank (NHWC (1, 1, 1, 1)); x is (rows, K)
    params = {k: np.reshape(v, ()) for k, v in jax.device_get(r.state).items()}
    err = _rel_error(lay, x, w, b, act=(r.spec, params))
    info['layers'][path]['act_rel_output_mse'] = err
    run.writer.scalars({f'ptq/{path}/act_rel_output_mse': err}, 0)
  if skipped:
    info['act_error_skipped'] = skipped


def apply(run, state):
  """Runs config.ptq's methods on the run's model; returns (state, info for result.json)."""
  tr, c = run.trainer, run.config
  ms = ptq_config.methods(c.ptq)
  t0 = time.time()
  todo, skipped = targets(tr, state)
  captured = gather_stats(run, state, c.ptq.max_sample)
  found, not_matched = match(todo, captured)
  skipped.update(not_matched)
  sequential = bool(c.ptq.get('sequential', False))
  if sequential:  # call order: the order the ops ran (capture's order)
    order = {site.weight: i for i, (site, _) in enumerate(captured.values())}
    found = dict(sorted(found.items(), key=lambda kv: order[_kernel_param(kv[0])]))
  done, layers, transforms, qs, left_out = {}, {}, {}, {}, []
  quantized = {}  # sequential: {path: (dequantized integer kernel, bias)} of the layers done so far
  local = {}  # {path: (layer, calibration rows, float kernel, bias, site)} for act_error_layers
  progress = Progress(len(found), 0)
  input_ops = {n for n, _ in ms if registry.get(n).changes_input}
  for i, (path, (site, stats)) in enumerate(found.items()):
    float_stats = stats
    if sequential and i:
      work = tr.ptq_update(state, quantized, transforms)
      site, stats = match({path: todo[path]}, gather_stats(run, work, c.ptq.max_sample))[0][path]
    w0, b0, spec = todo[path]
    n_in = len(site.contracting)
    w = w0.reshape((site.features, -1))                                       # (K, rest)
    b = None if b0 is None else b0.reshape(-1)
    # the float model's mean output of this op, which empirical bias correction matches (sequential runs)
    y_float = float_stats.mean @ w + (0.0 if b is None else b) if sequential else None
    tied = _conv_channels(site, w0)
    drop = set() if _input_is_last_axis(site) else {'rotation'} & input_ops if tied else input_ops
    if drop & {n for n, _ in ms}:
      left_out.append(path)
    start = L.Layer(w, spec, stats, bias=b, tied=tied, float_out_mean=y_float)
    lay = qjax.ptq.run(start, [m for m in ms if m[0] not in drop])
    lay, own_bias, shift = _bias_or_shift(lay, b0, site, w0.shape[n_in:])
    rtn = qjax.ptq.run(start, ['rtn'])
    x = stats.sample.astype(np.float64)
    layers[path] = {'rel_output_mse': _rel_error(lay, x, w, b), 'rtn_rel_output_mse': _rel_error(rtn, x, w, b),
                    **({'notes': {k: v for k, v in lay.notes}} if lay.notes else {})}
    local[path] = (lay, x, w, b, site)
    done[path], qs[path] = (lay.w, own_bias), _reshaped(lay.q, w0.shape, n_in)
    if lay.rotation is not None or lay.scale is not None or shift is not None:
      scale = lay.scale if lay.scale is None or tied is None else lay.scale[:tied]  # a conv's: per input channel
      transforms[path] = online.Online(lay.rotation, scale, shift)
    if sequential:
      quantized[path] = (np.asarray(qjax.quantizers.dequantize(lay.q), np.float32), own_bias)
    progress.update(i + 1)
  progress.close()
  # The rules' probe measures the activations again on the model with its online ops (a rotation makes a
  # non-negative input signed: act_signedness='auto' then gives that operand a signed grid, the others keep theirs).
  probe_x = input_pipeline.sample_input(run.data, c.batch_size) if transforms else None
  state = tr.ptq_update(state, done, transforms, probe_x=probe_x)
  tr.ptq_weights, tr.ptq_local = qs, local
  for path, m in layers.items():
    run.writer.scalars({f'ptq/{path}/rel_output_mse': m['rel_output_mse'],
                        f'ptq/{path}/rtn_rel_output_mse': m['rtn_rel_output_mse']}, 0)
  info = {'methods': [[n, {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}] for n, p in ms],
          'sequential': sequential, 'wall_time_sec': time.time() - t0, 'layers': layers, 'skipped': sorted(skipped),
          'skipped_reasons': dict(sorted(skipped.items())),
          'online_ops': sorted(transforms), 'input_op_methods_left_out': sorted(left_out)}
  run.log(f'ptq {"+".join(n for n, _ in ms)}: {len(done)} layers in {info["wall_time_sec"]:.1f}s'
          + (f', {len(skipped)} left to RTN ({", ".join(sorted(skipped)[:4])})' if skipped else ''))
  return state, info


def _reshaped(q, shape, n_in: int):
  """A QArray of a flattened (prod(shape[:n_in]), prod(shape[n_in:])) kernel as one of the kernel's own shape:
  scales (groups or 1, outputs or 1) -> (groups or 1, 1, ..., output shape or 1s), as the ops expect. Groups of
  several contracting axes, (heads, head_dim) say, are those of the flattened rows, each within one index of the
  leading axes: (heads * head_dim / g, out) -> (heads, head_dim / g, out), the op's per-group scale shape."""
  if len(shape) == 2:
    return q
  g, o = q.scale.shape
  out = tuple(shape[n_in:]) if o > 1 else (1,) * (len(shape) - n_in)
  lead = int(np.prod(shape[:n_in - 1]))
  sshape = ((g,) + (1,) * (n_in - 1) if g == 1 or n_in == 1 else tuple(shape[:n_in - 1]) + (g // lead,)) + out
  return qjax.quantizers.QArray(q.qvalue.reshape(shape), q.scale.reshape(sshape),
                                None if q.zero_point is None else q.zero_point.reshape(sshape), q.format, q.codebook)


def patch_serving(tr, served) -> None:
  """Puts the methods' integer kernels (tr.ptq_weights) into a converted serving tree (Linen variables) or
  converted NNX model, in place: the same format and packing as the RTN conversion chose."""
  if tr.ptq_weights:
    tr.ptq_serve(served, tr.ptq_weights)
