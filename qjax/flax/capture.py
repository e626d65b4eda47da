"""Capture: calibration statistics per quantized op, for PTQ methods (GPTQ, AWQ, SmoothQuant, AdaRound).

    stats = qjax.flax.capture.capture_linen(qmodel, variables, batches)       # Linen
    stats = qjax.flax.capture.capture_nnx(model, batches)                     # NNX, after quantize_nnx
    for key, (site, s) in stats.items():   # in call order; key: '<module path>/<op><index>' ('<root>/...' at the root)
      site.weight, site.weight_shape, site.contracting   # the weight param and its contracting axes (param layout)
      s.xtx, s.absmax, s.mean_abs, s.mean_sq, s.sum_x, s.sample, s.count   # of the activation operand, per feature

The model runs in float (ops are not quantized while capturing) on each batch, jit-compiled once per input
shape. For every op a rule quantizes that has one weight operand (a param, or a transpose / reshape / cast of
one: qjax.flax.provenance) and one activation operand x, the activation is flattened to rows of K features,
x2 (N, K), its contracting axes last in the order they pair with the weight's, and the sums below are
accumulated over all batches. Memory is O(K^2 + max_sample K) per op, whatever the number of batches.

  xtx      (K, K)  sum over rows of x x^T  (X^T X: the GPTQ Hessian is 2 xtx / count)
  absmax   (K,)    max over rows of |x|    (SmoothQuant's per-channel activation range)
  mean_abs (K,)    mean over rows of |x|   (AWQ's activation salience)
  mean_sq  (K,)    mean over rows of x^2
  sum      (K,)    sum over rows of x      (`s.sum_x`; `s.mean` = sum_x / count: bias correction)
  sample   (m, K)  m <= max_sample rows of x2, in float32 (AWQ's grid search, AdaRound's reconstruction)
  out_absmax, out_mean_sq (M,)  the same of the op's output over its last axis
  count    ()      rows seen (tokens, or output positions times batch for convs)

`stats` chooses among these (default: all but `sample`). The sample is deterministic: each batch (each call of
the op) contributes the rows at evenly spaced indices floor(linspace(0, N - 1, min(max_sample, N))) of its x2,
and the running sample and the new rows are concatenated and thinned the same way back to max_sample rows
(`thin`). So every batch is represented, later batches by more rows than earlier ones (the last batch of a long
run holds about half the sample).

Features are numbered in `site.contracting` order: feature k of xtx is the k-th index of the weight's
contracting param axes flattened row-major (for a Dense kernel (in, out): `contracting == (0,)`, features = rows;
for a kernel stored (out, in) and used as `kernel.T`: `contracting == (1,)`). For convolutions
`conv_features` chooses the features:
  'channels' (default)  the input channels; the window's spatial positions are summed into the rows, so xtx
                        is the channel covariance, not the im2col Hessian (`contracting` = the in axis;
                        a grouped conv's features are all its input channels, groups x that axis).
  'patches'             im2col: one row per output position (count = batch x output positions), holding the
                        window's input values, K = kh kw in, ordered like the kernel's contracting param axes
                        row-major ((kh, kw, in) for an HWIO kernel: contracting == (0, 1, 2)), so that
                        x2 @ kernel.reshape(K, out) is the conv's output and xtx is the im2col Hessian.
                        Grouped convs, input-dilated (transposed) convs and a kernel that is the conv's lhs
                        fall back to 'channels'; `site.note` says why (`site.conv_features` says which).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.flax import hooks
from qjax.flax.linen import QuantizedLinen
from qjax.flax.nnx import _session_of
from qjax.flax.session import Session
from qjax.flax.state import LinenBackend

STATS = ('xtx', 'absmax', 'mean_abs', 'mean_sq', 'sum', 'out', 'sample')
DEFAULT_STATS = tuple(s for s in STATS if s != 'sample')  # the sample costs max_sample * K per op: on request
CONV_FEATURES = ('channels', 'patches')


@dataclasses.dataclass(frozen=True)
class OpSite:
  """A quantized op with one weight operand, as capture found it.

  Attributes:
    module_path: the module's path in the params tree ('' for the root).
    op: 'dot_general' | 'conv' | 'einsum'; prefix: '<op><index>' as in quantizer state names.
    weight: the weight's param path ('h_0/c_attn/kernel'); weight_side: 'lhs' | 'rhs' of the op.
    weight_shape: the param's stored shape; contracting: the param axes the op contracts, in feature order.
    features: K, the product of the contracting sizes (convs: input channels, or kh kw in for patches).
    act_contracting: the activation operand's contracting axes (its input-feature and spatial axes for conv
      patches); act_ndim: its rank. (The runner's online input ops need the activation's last axis alone.)
    conv_features: for convs, 'channels' or 'patches' (what the features are); '' for other ops.
    note: why a conv asked for patches got channels ('' otherwise).
    module_type: the running module's class, '<module>.<qualname>' ('flax.linen.linear.Conv'; qjax's own wrapper
      subclasses keep their base's names), so a caller can tell a Flax layer, whose output is its op's output
      plus an optional bias, from a custom module that does more after the op.
  """
  module_path: str
  op: str
  prefix: str
  weight: str
  weight_side: str
  weight_shape: tuple[int, ...]
  contracting: tuple[int, ...]
  features: int
  act_contracting: tuple[int, ...] = ()
  act_ndim: int = 0
  conv_features: str = ''
  note: str = ''
  module_type: str = ''


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class OpStats:
  """Running sums of one op's activation (see the module docstring); None for stats not asked for."""
  count: jax.Array
  xtx: jax.Array | None = None
  absmax: jax.Array | None = None
  sum_abs: jax.Array | None = None
  sum_sq: jax.Array | None = None
  out_absmax: jax.Array | None = None
  out_sum_sq: jax.Array | None = None
  out_count: jax.Array | None = None
  sum_x: jax.Array | None = None
  sample: jax.Array | None = None

  @property
  def mean(self):
    return None if self.sum_x is None else self.sum_x / self.count

  @property
  def mean_abs(self):
    return None if self.sum_abs is None else self.sum_abs / self.count

  @property
  def mean_sq(self):
    return None if self.sum_sq is None else self.sum_sq / self.count

  @property
  def out_mean_sq(self):
    return None if self.out_sum_sq is None else self.out_sum_sq / self.out_count


def thin(rows, max_sample: int):
  """At most max_sample rows of rows (n, K): those at the evenly spaced indices floor(linspace(0, n - 1, m)),
  m = min(max_sample, n), first and last row included. The indices are static (NumPy): deterministic."""
  n = rows.shape[0]
  if n <= max_sample:
    return rows
  return rows[np.linspace(0, n - 1, max_sample).astype(int)]


def _merge(a: OpStats, b: OpStats, max_sample: int) -> OpStats:
  """a and b combined: sums add, maxima take the max, samples are concatenated (a's rows first) and thinned."""
  f = lambda x, y, op: None if x is None else op(x, y)
  sample = f(a.sample, b.sample, lambda x, y: thin(jnp.concatenate([x, y]), max_sample))
  return OpStats(a.count + b.count, f(a.xtx, b.xtx, jnp.add), f(a.absmax, b.absmax, jnp.maximum),
                 f(a.sum_abs, b.sum_abs, jnp.add), f(a.sum_sq, b.sum_sq, jnp.add),
                 f(a.out_absmax, b.out_absmax, jnp.maximum), f(a.out_sum_sq, b.out_sum_sq, jnp.add),
                 f(a.out_count, b.out_count, jnp.add), f(a.sum_x, b.sum_x, jnp.add), sample)


def _flat_rows(x, xc):
  """x with its contracting axes xc moved last, in xc's order, as rows: (rows, K)."""
  k = math.prod(x.shape[a] for a in xc)
  return jnp.moveaxis(x, xc, tuple(range(x.ndim - len(xc), x.ndim))).reshape(-1, k)


def _no_patches(side, window, w_axes, dn) -> str:
  """Why a conv's input cannot be captured as im2col patches ('' when it can)."""
  _, _, lhs_dilation, _, _, groups, batch_groups = window[:7]
  if side != 'rhs':
    return 'the weight is the lhs of the conv'
  if groups != 1 or batch_groups != 1:
    return f'grouped conv (feature_group_count={groups}, batch_group_count={batch_groups})'
  if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
    return f'input dilation {tuple(lhs_dilation)} (a transposed conv)'
  if any(w_axes[a] is None for a in dn.rhs_spec[1:]):
    return 'a kernel axis made by a broadcast'
  if list(dn.rhs_spec[2:]) != sorted(dn.rhs_spec[2:]):
    return 'kernel spatial axes not in the input\'s spatial order'
  return ''


def _patch_rows(x, w_shape, window, w_axes, dn):
  """(x2 (rows, K), the weight's contracting param axes in feature order): the im2col patches of a conv's input
  x, one row per output position, features ordered like the weight's param axes (in, spatial...) sorted, i.e.
  (kh, kw, in) for an HWIO kernel, so that x2 @ kernel.reshape(K, out) is the conv's output as rows."""
  strides, padding, lhs_dilation, rhs_dilation, dnums = window[:5]
  space = tuple(w_shape[a] for a in dn.rhs_spec[2:])
  p = jax.lax.conv_general_dilated_patches(x, space, strides, padding, lhs_dilation, rhs_dilation, dnums,
                                           precision=jax.lax.Precision.HIGHEST)  # features (in, *space)
  p = jnp.moveaxis(p, dn.out_spec[1], -1)
  p = p.reshape((-1, x.shape[dn.lhs_spec[1]]) + space)                         # (rows, in, *space)
  param = [w_axes[a] for a in dn.rhs_spec[1:]]                                 # param axis of in, *space
  order = sorted(range(len(param)), key=param.__getitem__)
  x2 = p.transpose((0,) + tuple(1 + i for i in order)).reshape(p.shape[0], -1)
  return x2, tuple(param[i] for i in order)


def _batch_stats(x2, out, stats, max_sample: int) -> OpStats:
  """The statistics of one batch's rows x2 (rows, K) in float32 (and of the op's output)."""
  st = OpStats(jnp.asarray(x2.shape[0], jnp.float32))
  if 'xtx' in stats:
    st.xtx = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
  if 'absmax' in stats:
    st.absmax = jnp.max(jnp.abs(x2), axis=0)
  if 'mean_abs' in stats:
    st.sum_abs = jnp.sum(jnp.abs(x2), axis=0)
  if 'mean_sq' in stats:
    st.sum_sq = jnp.sum(x2 * x2, axis=0)
  if 'sum' in stats:
    st.sum_x = jnp.sum(x2, axis=0)
  if 'sample' in stats:
    st.sample = thin(x2, max_sample)
  if 'out' in stats and out is not None:
    o2 = jax.lax.stop_gradient(out).astype(jnp.float32).reshape(-1, out.shape[-1])
    st.out_absmax, st.out_sum_sq = jnp.max(jnp.abs(o2), axis=0), jnp.sum(o2 * o2, axis=0)
    st.out_count = jnp.asarray(o2.shape[0], jnp.float32)
  return st


class Collector:
  """Receives the ops of a run in 'capture' mode (Session.run_op); keeps one OpStats per op for the batch."""

  def __init__(self, stats: Iterable[str], max_sample: int = 512, conv_features: str = 'channels'):
    self.stats = tuple(stats)
    for s in self.stats:
      if s not in STATS:
        raise ValueError(f'capture: unknown statistic {s!r}; choose among {STATS}')
    if conv_features not in CONV_FEATURES:
      raise ValueError(f'capture: conv_features must be one of {CONV_FEATURES}, got {conv_features!r}')
    if max_sample < 1:
      raise ValueError(f'capture: max_sample must be >= 1, got {max_sample}')
    self.max_sample, self.conv_features = int(max_sample), conv_features
    self.sites: dict[str, OpSite] = {}
    self.batch: dict[str, OpStats] = {}

  def add(self, fr, prefix, op, lhs, rhs, lo, ro, contracting, out, window=None) -> None:
    if (lo.origin is None) == (ro.origin is None):
      return  # two activations (attention scores) or two weights: no weight/activation pair
    side = 'lhs' if lo.origin is not None else 'rhs'
    origin, (x, xc), (w, wc) = ((lo.origin, (rhs, contracting[1]), (lhs, contracting[0])) if side == 'lhs'
                                else (ro.origin, (lhs, contracting[0]), (rhs, contracting[1])))
    axes = origin.axes
    if any(axes[a] is None for a in wc):
      return  # a contracting axis made by a broadcast: no param features to report
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    kind, note = '', ''
    with hooks.inside_op():  # the collector's own matmuls and convs are no ops of the model
      if op == 'conv':
        dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, window[4])
        kind = 'channels'
        if self.conv_features == 'patches':
          note = _no_patches(side, window, axes, dn)
          kind = 'channels' if note else 'patches'
      if kind == 'patches':
        x2, params = _patch_rows(x, w.shape, window, axes, dn)
        xc = tuple(dn.lhs_spec[1:])
      else:
        x2, params = _flat_rows(x, xc), tuple(axes[a] for a in wc)
      st = _batch_stats(x2, out, self.stats, self.max_sample)
      key = f'{fr.path or "<root>"}/{prefix}'
      self.sites[key] = OpSite(fr.path, op, prefix, origin.param, side, tuple(origin.shape), params,
                               x2.shape[1], tuple(xc), x.ndim, kind, note, _class_name(fr.module))
      # an op run twice per batch (a module called twice): one op, its rows together
      self.batch[key] = _merge(self.batch[key], st, self.max_sample) if key in self.batch else st


def _class_name(module) -> str:
  cls = type(module)
  return f'{cls.__module__}.{cls.__qualname__}'


def _run(session, collector, step, carry, batches) -> dict[str, tuple[OpSite, OpStats]]:
  """Runs `step(carry, batch)` (which runs the model on the variables `carry`) for each batch under jax.jit in
  capture mode; sums the stats."""

  def one(carry, batch):
    collector.batch = {}
    step(carry, batch)
    return dict(collector.batch)
  jone = jax.jit(one)
  merge = jax.jit(lambda a, b: jax.tree.map(lambda x, y: _merge(x, y, collector.max_sample), a, b,
                                            is_leaf=lambda v: isinstance(v, OpStats)))
  total = None
  phase, session.phase, session.capture = session.phase, 'capture', collector
  try:
    for batch in batches:
      out = jone(carry, batch)
      total = out if total is None else merge(total, out)
  finally:
    session.phase, session.capture = phase, None
  if total is None:
    raise ValueError('capture: no batches')
  # In call order (the order the ops ran when traced), not the sorted order of the jitted dict's keys.
  return {k: (site, total[k]) for k, site in collector.sites.items() if k in total}


def capture_linen(qmodel, variables, batches: Iterable[Any], *, stats: Iterable[str] = DEFAULT_STATS,
                  max_sample: int = 512, conv_features: str = 'channels',
                  **apply_kwargs) -> dict[str, tuple[OpSite, OpStats]]:
  """Statistics per quantized op of a Linen model (module docstring). `batches` yields the model's input (one
  array, or a tuple of positional inputs); apply_kwargs go to every apply (e.g. train=False)."""
  collector = Collector(stats, max_sample, conv_features)
  session = Session(qmodel.rules, LinenBackend())
  runner = QuantizedLinen(qmodel.model, qmodel.rules, session=session)

  def step(variables, batch):
    args = batch if isinstance(batch, tuple) else (batch,)
    runner.apply(variables, *args, **apply_kwargs)
  return _run(session, collector, step, variables, batches)


def capture_nnx(model, batches: Iterable[Any], *, stats: Iterable[str] = DEFAULT_STATS, max_sample: int = 512,
                conv_features: str = 'channels', **call_kwargs) -> dict[str, tuple[OpSite, OpStats]]:
  """Statistics per quantized op of an NNX model quantized by quantize_nnx (module docstring). The model is
  not changed (it runs on a copy of its state inside jit)."""
  collector = Collector(stats, max_sample, conv_features)
  session = _session_of(model)
  graphdef, state = nnx.split(model)

  def step(state, batch):
    args = batch if isinstance(batch, tuple) else (batch,)
    m = nnx.merge(graphdef, state)
    m.eval()
    m(*args, **call_kwargs)
  return _run(session, collector, step, state, batches)
