"""Calibration: pure functions from a tensor to (scale, zero_point) for a QuantSpec.

Every method returns a scale of the spec's scale shape (see `qjax.granularity`) such that the chosen range
[lo, hi] maps onto the format's grid: symmetric `scale = amax / grid_max`, asymmetric
`scale = (hi - lo) / (qmax - qmin)` and `zero_point = round(qmin - lo / scale)` (so that 0.0 is exactly
representable). Statistics ignore NaN and +-inf, and a range of zero gives scale 1, so all-zero and constant
tensors quantize to finite values (no 0/0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax import formats
from qjax import granularity as gran
from qjax.spec import QuantSpec

# Clip ratios searched by calibration='mse' (fraction of the absmax or min/max range).
MSE_RATIOS = tuple(0.2 + 0.01 * i for i in range(81))  # 0.20, 0.21, ..., 1.00 (no JAX at import time)


def _finite(x: jax.Array, fill: float = 0.0) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, fill)


# Statistics mask non-finite values first (one select pass, then one reduction). Two cheaper-looking forms were
# measured and rejected (docs/benchmarks.md, fake_quant): reducing x as is and redoing the reduction only when a
# statistic is non-finite needs a global `lax.cond`, whose predicate is a cross-device all-reduce when the scale
# groups are sharded; choosing per group with a select always pays both reductions (2.1-3.1x a copy vs 1.3x).


def absmax(x: jax.Array, sshape: tuple[int, ...]) -> jax.Array:
  """max |x| per scale group, non-finite values ignored."""
  return gran.reduce(jnp.abs(_finite(x.astype(jnp.float32))), sshape, jnp.max)


def minmax(x: jax.Array, sshape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(min(min x, 0), max(max x, 0)) per scale group: the range always contains 0. Non-finite values ignored."""
  v = _finite(x.astype(jnp.float32))
  lo, hi = gran.reduce(v, sshape, jnp.min), gran.reduce(v, sshape, jnp.max)
  return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def _quantile(x: jax.Array, sshape: tuple[int, ...], q: float) -> jax.Array:
  v = gran.group_view(jnp.where(jnp.isfinite(x), x, jnp.nan).astype(jnp.float32), sshape)
  nd = x.ndim
  v = jnp.moveaxis(v, gran.shared_axes(nd), tuple(range(nd, 2 * nd)))  # scale axes first, shared ones last
  v = v.reshape(v.shape[:nd] + (-1,))
  out = jnp.nanquantile(v, q / 100.0, axis=-1)
  return jnp.nan_to_num(out, nan=0.0).reshape(sshape)


def percentile(x: jax.Array, sshape: tuple[int, ...], p: float, *, symmetric: bool):
  """Symmetric: the p-th percentile of |x|. Asymmetric: (percentile 100-p of x, percentile p of x)."""
  if symmetric:
    return _quantile(jnp.abs(x), sshape, p)
  lo = jnp.minimum(_quantile(x, sshape, 100.0 - p), 0.0)
  hi = jnp.maximum(_quantile(x, sshape, p), 0.0)
  return lo, hi


def po2(scale: jax.Array) -> jax.Array:
  """Rounds scales up to the next power of two (never adds clipping). Exact: from the exponent bits."""
  mant, e = jnp.frexp(scale)  # scale = mant * 2^e, mant in [0.5, 1): already a power of two when mant == 0.5.
  return formats.exp2_int(jnp.where(mant == 0.5, e - 1, e))


def _safe(scale: jax.Array) -> jax.Array:
  return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def symmetric_scale(amax: jax.Array, spec: QuantSpec) -> jax.Array:
  """scale = amax / grid_max (MX: the power of two 2^(floor(log2 amax) - emax_elem))."""
  fmt = spec.fmt
  if isinstance(fmt, formats.MXFormat):
    elem = fmt.element
    emax = elem.emax if isinstance(elem, formats.FloatFormat) else elem.bits - 2  # MXINT8: 2^-6 implicit
    # E8M0 reaches 2^-127, but f32 subnormals flush to zero on XLA:CPU: stop at 2^-126.
    e = jnp.clip(formats.floor_log2(jnp.maximum(amax, 2.0 ** -126)) - emax, -126, 127)
    return jnp.where(amax > 0, formats.exp2_int(e), 1.0)
  # Multiplying by the reciprocal (not dividing by a constant) gives the same bits eagerly and under jit:
  # XLA rewrites x / constant into x * (1 / constant).
  scale = _safe(amax * (1.0 / formats.grid_max(fmt)))
  return po2(scale) if spec.po2_scale else scale


def asymmetric_params(lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """scale = (hi - lo) / (qmax - qmin); zero_point = clip(round(qmin - lo / scale), qmin, qmax) as int32."""
  fmt = spec.fmt
  scale = _safe((hi - lo) * (1.0 / (fmt.qmax - fmt.qmin)))
  if spec.po2_scale:
    scale = po2(scale)
  zero_point = jnp.clip(jnp.round(fmt.qmin - lo / scale), fmt.qmin, fmt.qmax)
  return scale, zero_point.astype(jnp.int32)


def _sq_error(x: jax.Array, scale: jax.Array, zero_point: jax.Array | None, spec: QuantSpec) -> jax.Array:
  # Squared error of a nearest-rounding fake-quant, summed per scale group.
  fmt = spec.fmt
  s = gran.expand(scale, x.shape)
  z = 0.0 if zero_point is None else gran.expand(zero_point, x.shape).astype(jnp.float32)
  q = formats.to_grid(x * gran.expand(1.0 / scale, x.shape) + z, fmt)
  err = (formats.from_grid(q, fmt) - z) * s - x
  return gran.reduce(jnp.square(_finite(err)), scale.shape, jnp.sum)


def mse_search(x: jax.Array, spec: QuantSpec, sshape: tuple[int, ...]):
  """Picks, per scale group, the clip ratio r in MSE_RATIOS minimising ||x - fq(x; r * range)||^2."""
  x = x.astype(jnp.float32)
  sym = spec.scheme == 'symmetric'
  if sym:
    base = absmax(x, sshape)
    params = lambda r: (symmetric_scale(base * r, spec), None)
  else:
    lo, hi = minmax(x, sshape)
    params = lambda r: asymmetric_params(lo * r, hi * r, spec)

  def step(best, r):
    scale, zp = params(r)
    err = _sq_error(x, scale, zp, spec)
    better = err < best[0]
    return (jnp.where(better, err, best[0]), jnp.where(better, r, best[1])), None

  init = (jnp.full(sshape, jnp.inf, jnp.float32), jnp.ones(sshape, jnp.float32))
  (_, ratio), _ = jax.lax.scan(step, init, jnp.asarray(MSE_RATIOS, jnp.float32))
  return params(ratio)


def calibrate(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array | None]:
  """Returns (scale, zero_point) for x under spec; zero_point is None for symmetric specs.

  Binary (int1) ignores the method's range and uses scale = mean|x|, the closed-form minimiser of
  ||x - sign(x) * scale||^2 (XNOR-Net).
  """
  sshape = gran.scale_shape(x.shape, spec)
  fmt = spec.fmt
  if isinstance(fmt, formats.IntFormat) and fmt.binary:
    # A group of zeros keeps scale 0 (its least-squares scale): it dequantizes to exactly 0, not to +-1.
    mean = gran.reduce(jnp.abs(_finite(x.astype(jnp.float32))), sshape, jnp.mean)
    return jnp.where(jnp.isfinite(mean), mean, 1.0), None
  if spec.calibration == 'mse':
    return mse_search(x, spec, sshape)
  if spec.scheme == 'symmetric':
    if spec.calibration == 'percentile':
      amax = percentile(x, sshape, spec.percentile, symmetric=True)
    else:
      amax = absmax(x, sshape)
    return symmetric_scale(amax, spec), None
  if spec.calibration == 'percentile':
    lo, hi = percentile(x, sshape, spec.percentile, symmetric=False)
  else:
    lo, hi = minmax(x, sshape)
  return asymmetric_params(lo, hi, spec)
