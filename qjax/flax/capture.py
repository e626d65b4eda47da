"""Capture: calibration statistics per quantized op, for PTQ methods (GPTQ, AWQ, SmoothQuant, AdaRound).

    stats = qjax.flax.capture.capture_linen(qmodel, variables, batches)       # Linen
    stats = qjax.flax.capture.capture_nnx(model, batches)                     # NNX, after quantize_nnx
    for key, (site, s) in stats.items():   # key: '<module path>/<op><index>' ('<root>/...' at the root)
      site.weight, site.weight_shape, site.contracting   # the weight param and its contracting axes (param layout)
      s.xtx, s.absmax, s.mean_abs, s.mean_sq, s.count    # of the activation operand, per contracting feature

The model runs in float (ops are not quantized while capturing) on each batch, jit-compiled once per input
shape. For every op a rule quantizes that has one weight operand (a param, or a transpose / reshape / cast of
one: qjax.flax.provenance) and one activation operand x, the activation is flattened to rows of K features,
x2 (N, K), its contracting axes last in the order they pair with the weight's, and the sums below are
accumulated over all batches. Memory is O(K^2) per op, whatever the number of batches.

  xtx      (K, K)  sum over rows of x x^T  (X^T X: the GPTQ Hessian is 2 xtx / count)
  absmax   (K,)    max over rows of |x|    (SmoothQuant's per-channel activation range)
  mean_abs (K,)    mean over rows of |x|   (AWQ's activation salience)
  mean_sq  (K,)    mean over rows of x^2
  out_absmax, out_mean_sq (M,)  the same of the op's output over its last axis
  count    ()      rows seen (tokens, or positions times batch for convs)

Features are numbered in `site.contracting` order: feature k of xtx is the k-th index of the weight's
contracting param axes flattened row-major (for a Dense kernel (in, out): `contracting == (0,)`, features = rows;
for a kernel stored (out, in) and used as `kernel.T`: `contracting == (1,)`). For convolutions the features are
the input channels (the window's spatial positions are summed into the rows), so xtx is the channel covariance,
not the im2col Hessian.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.flax.linen import QuantizedLinen
from qjax.flax.nnx import _session_of
from qjax.flax.session import Session
from qjax.flax.state import LinenBackend

STATS = ('xtx', 'absmax', 'mean_abs', 'mean_sq', 'out')


@dataclasses.dataclass(frozen=True)
class OpSite:
  """A quantized op with one weight operand, as capture found it.

  Attributes:
    module_path: the module's path in the params tree ('' for the root).
    op: 'dot_general' | 'conv' | 'einsum'; prefix: '<op><index>' as in quantizer state names.
    weight: the weight's param path ('h_0/c_attn/kernel'); weight_side: 'lhs' | 'rhs' of the op.
    weight_shape: the param's stored shape; contracting: the param axes the op contracts, in feature order.
    features: K, the product of the contracting sizes (for convs: input channels).
  """
  module_path: str
  op: str
  prefix: str
  weight: str
  weight_side: str
  weight_shape: tuple[int, ...]
  contracting: tuple[int, ...]
  features: int


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

  @property
  def mean_abs(self):
    return None if self.sum_abs is None else self.sum_abs / self.count

  @property
  def mean_sq(self):
    return None if self.sum_sq is None else self.sum_sq / self.count

  @property
  def out_mean_sq(self):
    return None if self.out_sum_sq is None else self.out_sum_sq / self.out_count


def _merge(a: OpStats, b: OpStats) -> OpStats:
  """a and b combined: sums add, maxima take the max."""
  f = lambda x, y, op: None if x is None else op(x, y)
  return OpStats(a.count + b.count, f(a.xtx, b.xtx, jnp.add), f(a.absmax, b.absmax, jnp.maximum),
                 f(a.sum_abs, b.sum_abs, jnp.add), f(a.sum_sq, b.sum_sq, jnp.add),
                 f(a.out_absmax, b.out_absmax, jnp.maximum), f(a.out_sum_sq, b.out_sum_sq, jnp.add),
                 f(a.out_count, b.out_count, jnp.add))


class Collector:
  """Receives the ops of a run in 'capture' mode (Session.run_op); keeps one OpStats per op for the batch."""

  def __init__(self, stats: Iterable[str]):
    self.stats = tuple(stats)
    for s in self.stats:
      if s not in STATS:
        raise ValueError(f'capture: unknown statistic {s!r}; choose among {STATS}')
    self.sites: dict[str, OpSite] = {}
    self.batch: dict[str, OpStats] = {}

  def add(self, fr, prefix, op, lhs, rhs, lo, ro, contracting, out) -> None:
    if (lo.origin is None) == (ro.origin is None):
      return  # two activations (attention scores) or two weights: no weight/activation pair
    side = 'lhs' if lo.origin is not None else 'rhs'
    origin, (x, xc), wc = ((lo.origin, (rhs, contracting[1]), contracting[0]) if side == 'lhs'
                           else (ro.origin, (lhs, contracting[0]), contracting[1]))
    axes = origin.axes
    if any(axes[a] is None for a in wc):
      return  # a contracting axis made by a broadcast: no param features to report
    key = f'{fr.path or "<root>"}/{prefix}'
    k = 1
    for a in xc:
      k *= x.shape[a]
    self.sites[key] = OpSite(fr.path, op, prefix, origin.param, side, tuple(origin.shape),
                             tuple(axes[a] for a in wc), k)
    x2 = jnp.moveaxis(jax.lax.stop_gradient(x), xc, tuple(range(x.ndim - len(xc), x.ndim))).reshape(-1, k)
    x2 = x2.astype(jnp.float32)
    st = OpStats(jnp.asarray(x2.shape[0], jnp.float32))
    if 'xtx' in self.stats:
      st.xtx = jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST)
    if 'absmax' in self.stats:
      st.absmax = jnp.max(jnp.abs(x2), axis=0)
    if 'mean_abs' in self.stats:
      st.sum_abs = jnp.sum(jnp.abs(x2), axis=0)
    if 'mean_sq' in self.stats:
      st.sum_sq = jnp.sum(x2 * x2, axis=0)
    if 'out' in self.stats and out is not None:
      o2 = jax.lax.stop_gradient(out).astype(jnp.float32).reshape(-1, out.shape[-1])
      st.out_absmax, st.out_sum_sq = jnp.max(jnp.abs(o2), axis=0), jnp.sum(o2 * o2, axis=0)
      st.out_count = jnp.asarray(o2.shape[0], jnp.float32)
    self.batch[key] = _merge(self.batch[key], st) if key in self.batch else st  # an op run twice per batch


def _run(session, step, carry, batches) -> dict[str, tuple[OpSite, OpStats]]:
  """Runs `step(carry, batch)` (which runs the model on the variables `carry`) for each batch under jax.jit in
  capture mode; sums the stats."""
  collector = Collector(session.capture_stats)

  def one(carry, batch):
    collector.batch = {}
    step(carry, batch)
    return dict(collector.batch)
  jone = jax.jit(one)
  merge = jax.jit(lambda a, b: jax.tree.map(_merge, a, b, is_leaf=lambda v: isinstance(v, OpStats)))
  total = None
  mode, session.mode, session.capture = session.mode, 'capture', collector
  try:
    for batch in batches:
      out = jone(carry, batch)
      total = out if total is None else merge(total, out)
  finally:
    session.mode, session.capture = mode, None
  if total is None:
    raise ValueError('capture: no batches')
  return {k: (collector.sites[k], v) for k, v in total.items()}


def capture_linen(qmodel, variables, batches: Iterable[Any], *, stats: Iterable[str] = STATS,
                  **apply_kwargs) -> dict[str, tuple[OpSite, OpStats]]:
  """Statistics per quantized op of a Linen model (module docstring). `batches` yields the model's input (one
  array, or a tuple of positional inputs); apply_kwargs go to every apply (e.g. train=False)."""
  session = Session(qmodel.rules, LinenBackend())
  session.capture_stats = tuple(stats)
  runner = QuantizedLinen(qmodel.model, qmodel.rules, session=session)

  def step(variables, batch):
    args = batch if isinstance(batch, tuple) else (batch,)
    runner.apply(variables, *args, **apply_kwargs)
  return _run(session, step, variables, batches)


def capture_nnx(model, batches: Iterable[Any], *, stats: Iterable[str] = STATS,
                **call_kwargs) -> dict[str, tuple[OpSite, OpStats]]:
  """Statistics per quantized op of an NNX model quantized by quantize_nnx (module docstring). The model is
  not changed (it runs on a copy of its state inside jit)."""

  session = _session_of(model)
  session.capture_stats = tuple(stats)
  graphdef, state = nnx.split(model)

  def step(state, batch):
    args = batch if isinstance(batch, tuple) else (batch,)
    m = nnx.merge(graphdef, state)
    m.eval()
    m(*args, **call_kwargs)
  return _run(session, step, state, batches)
