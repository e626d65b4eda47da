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


# absmax and minmax ignore non-finite values without a masked copy of x. Their statistics are reduced as int32
# keys of the float bits (monotonic in the value; NaN and +-inf map to the key of +0.0), first over blocks of
# _BLOCK elements along one long reduced axis, then the rest. XLA:CPU fuses the masking into that short first
# reduction and reads x once, as fast as an unmasked reduction (docs/benchmarks.md, fake_quant). Its fast
# (YNN) reductions take no compare or select, and a long reduction is split by XLA into reduce-windows that do
# not fuse their producer, so both plainer forms write a masked copy of x first. A global `lax.cond` (reduce as
# is, mask only when a statistic is non-finite) is avoided on purpose: its predicate is a cross-device
# all-reduce when the scale groups are sharded.
_BLOCK = 32          # elements per first-stage block
_BLOCK_MIN = 1024    # axes at least this long are blocked (shorter ones: one plain reduction; x is small)


def _keys(x: jax.Array, signed: bool) -> jax.Array:
  """int32 keys ordered as the float values of x (|x| unless signed); non-finite values get the key of +0.0."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  mag = b & 0x7FFFFFFF
  key = jnp.where(b < 0, b ^ 0x7FFFFFFF, b) if signed else mag  # negative floats: larger |x|, smaller key
  return jnp.where(mag < 0x7F800000, key, 0)


def _from_keys(k: jax.Array, signed: bool) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k) if signed else k, jnp.float32)


def _reduce_keys(k: jax.Array, sshape: tuple[int, ...], fn) -> jax.Array:
  """gran.reduce(k, sshape, fn), in two stages when a reduced axis is long (see the comment above)."""
  cands = [d for d, (n, s) in enumerate(zip(k.shape, sshape, strict=True))
           if n >= _BLOCK_MIN and (n // s) % _BLOCK == 0]
  if cands:
    d = max(cands, key=lambda d: k.shape[d] // sshape[d])
    k = k.reshape(k.shape[:d] + (k.shape[d] // _BLOCK, _BLOCK) + k.shape[d + 1:])
    k = jax.lax.optimization_barrier(fn(k, axis=d + 1))  # keeps XLA from merging the two stages back
  return gran.reduce(k, sshape, fn)


def absmax(x: jax.Array, sshape: tuple[int, ...]) -> jax.Array:
  """max |x| per scale group, non-finite values ignored."""
  return _from_keys(_reduce_keys(_keys(x, False), sshape, jnp.max), False)


def minmax(x: jax.Array, sshape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """(min(min x, 0), max(max x, 0)) per scale group: the range always contains 0. Non-finite values ignored."""
  k = _keys(x, True)
  lo = _from_keys(_reduce_keys(k, sshape, jnp.min), True)
  hi = _from_keys(_reduce_keys(k, sshape, jnp.max), True)
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
