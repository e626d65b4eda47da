"""Calibration: pure functions from a tensor to (scale, zero_point) for a QuantSpec.

Every method returns a scale of the spec's scale shape (see `qjax.granularity`) such that the chosen range
[lo, hi] maps onto the format's grid: symmetric `scale = amax / grid_max`, asymmetric
`scale = (hi - lo) / (qmax - qmin)` and `zero_point = round(qmin - lo / scale)` (so that 0.0 is exactly
representable). Statistics ignore NaN and +-inf, and a range of zero gives scale 1, so all-zero and constant
tensors quantize to finite values (no 0/0). With `poison=True` (what the quantized ops use) a scale group that
holds a non-finite value gets scale NaN instead, so that a real (integer) matmul, whose int8 qvalues cannot hold a
NaN, still returns NaN for that row / column after the rescale (see `qjax.ops.dot_general`).

Two symmetric integer conventions (`QuantSpec.calibration`):

  absmax            scale = absmax / qmax: +-absmax land exactly on +-qmax (the f32 scale is rounded up by up to
                    2 ulp where needed, so that absmax * (1 / scale) is not 1 ulp beyond qmax, which the
                    clipped STE's mask would read as clipped); the -(qmax + 1) end of a full-range signed grid
                    (e.g. -128 of int8) is never used.
  absmax_half_step  scale = absmax / (qmax + 1/2) (times 1 - 2^-20, so that f32 rounding cannot move the end
                    points): -absmax lands on -(qmax + 1), +absmax rounds to qmax + 1 and is clipped to qmax.
                    Every grid point is used and the step is smaller by qmax / (qmax + 1/2) (int4: 7 / 7.5), at
                    the price of a clipping error of scale / 2 at +absmax (Qwix's convention). Trade-off: lower
                    error for wide, symmetric distributions (per-channel int4 on N(0, 1) weights: MSE ratio
                    0.88 for int4, 1.00 for int8; tests/test_numerics_edges.py), but the positive maximum is not
                    representable (an outlier at +absmax loses half a step) and real matmuls see the -(qmax + 1)
                    products. Needs a full-range signed integer format (int2..int8, not narrow).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qjax import formats
from qjax import granularity as gran
from qjax.spec import QuantSpec

# Clip ratios searched by calibration='mse' (fraction of the absmax or min/max range).
MSE_RATIOS = tuple(0.2 + 0.01 * i for i in range(81))  # 0.20, 0.21, ..., 1.00 (no JAX at import time)


_F32_MAX = float(np.finfo(np.float32).max)


def _finite(x: jax.Array, fill: float = 0.0) -> jax.Array:
  return jnp.where(jnp.isfinite(x), x, fill)


# absmax and minmax ignore non-finite values without a masked copy of x. Their statistics are reduced as int32
# keys of the float bits (monotonic in the value; NaN and +-inf map to the key of +0.0), first over blocks of
# _BLOCK elements along one reduced axis (`first_stage_axis`), then the rest. XLA:CPU fuses the masking into that
# short first reduction and reads x once, as fast as an unmasked reduction (docs/benchmarks.md, fake_quant). Its
# fast (YNN) reductions take no compare or select, and a long reduction is split by XLA into reduce-windows that
# do not fuse their producer, so both plainer forms write a masked copy of x first. A global `lax.cond` (reduce as
# is, mask only when a statistic is non-finite) is avoided on purpose: its predicate is a cross-device all-reduce
# when the scale groups are sharded.
#
# Which axis: a long one (at least _BLOCK_MIN elements, groups of whole blocks; the longest groups) first; else a
# shorter reduced axis before the last, the one nearest it, whose groups hold whole blocks (a leading one, the batch,
# only where its equal shards over all of the process's devices do: see `first_stage_axis`); else the last axis,
# reduced whole, if it holds whole blocks. An axis is only ever split into (blocks, _BLOCK), never merged with another,
# so a sharded activation whose shards hold whole blocks needs no collective beyond the scale-sized all-reduce (commit
# 93e3265 merged the axes reduced whole into one: on a mesh sharding two of them XLA all-gathered the keys, and in
# Explicit mode merging a sharded inner axis is a type error). An axis before the last is preferred: its blocks reduce
# element-wise across whole rows, where blocks of the last axis reduce within each vector (our reading of the times
# below; the machine code was not read). Each absmax (poison on) jitted alone, the rule before -> this one, one pinned
# core of a Zen 4 (an ad-hoc script, 2026-12-07 night, docs/benchmarks.md): per tensor (32, 128, 512) 1.52 -> 0.43 ms,
# (32, 4, 128, 128) 1.71 -> 0.39 ms, the ResNet's (256, 28, 28, 16) 1.58 -> 0.49 ms; per feature (32, 128, 512) 6.49 ->
# 0.46 ms and (256, 14, 14, 32) 1.69 -> 0.17 ms; a (512, 2048) weight per column 0.33 -> 0.23 ms.
_BLOCK = 32          # elements per first-stage block
_BLOCK_MIN = 1024    # axes at least this long are blocked first; smaller arrays are reduced in one stage


def _keys(x: jax.Array, signed: bool, poison: bool = False) -> jax.Array:
  """int32 keys ordered as the float values of x (|x| unless signed); non-finite values get the key of +0.0, or
  with `poison` keep their own key (beyond every finite key, so a group's max (or min) is non-finite)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  mag = b & 0x7FFFFFFF
  key = jnp.where(b < 0, b ^ 0x7FFFFFFF, b) if signed else mag  # negative floats: larger |x|, smaller key
  return key if poison else jnp.where(mag < 0x7F800000, key, 0)


def _from_keys(k: jax.Array, signed: bool) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.where(k < 0, k ^ 0x7FFFFFFF, k) if signed else k, jnp.float32)


def first_stage_axis(shape: tuple[int, ...], sshape: tuple[int, ...], devices: int | None = None) -> int | None:
  """The axis whose blocks of _BLOCK a range over an array of `shape` with scale shape `sshape` reduces first
  (see the comment above), or None for one stage. (4096, 128) per tensor: 0; (32, 128, 512) per tensor: 1;
  (256, 28, 28, 16) per tensor: 0 (no other axis holds whole blocks); (8, 48, 64) per row: 2 (the last);
  (4, 4, 32) per tensor: None (under _BLOCK_MIN elements).

  A short leading axis is blocked only where it splits into whole blocks on each of `devices` (default: this
  process's `jax.device_count()`) equal shards: it is the batch, which data parallelism shards over every device,
  and a block across two shards turns the first stage into an all-reduce of x.size / _BLOCK partial statistics.
  On 8 devices (256, 28, 28, 16) still blocks its batch (32 per shard); (128, 28, 28, 16) reduces in one stage."""
  if math.prod(shape) < _BLOCK_MIN:
    return None
  groups = [n // s for n, s in zip(shape, sshape, strict=True)]
  whole = [d for d, g in enumerate(groups) if g % _BLOCK == 0 and g > 1]
  long = [d for d in whole if shape[d] >= _BLOCK_MIN]
  if long:
    return max(long, key=lambda d: groups[d])
  devices = jax.device_count() if devices is None else devices
  inner = [d for d in whole if d < len(shape) - 1 and (d > 0 or shape[0] % (_BLOCK * devices) == 0)]
  if inner:
    return inner[-1]
  return len(shape) - 1 if len(shape) > 1 and sshape[-1] == 1 and shape[-1] % _BLOCK == 0 else None


def _reduce_keys(k: jax.Array, sshape: tuple[int, ...], fn) -> jax.Array:
  """gran.reduce(k, sshape, fn), in two stages where `first_stage_axis` names an axis (see the comment above)."""
  # initial=0 (the key of +0.0): every statistic here includes 0, and empty groups reduce to it.
  fn = functools.partial(fn, initial=0)
  d = first_stage_axis(k.shape, sshape)
  if d is not None:
    k = k.reshape(k.shape[:d] + (k.shape[d] // _BLOCK, _BLOCK) + k.shape[d + 1:])
    k = jax.lax.optimization_barrier(fn(k, axis=d + 1))  # keeps XLA from merging the two stages back
  return gran.reduce(k, sshape, fn)


def absmax(x: jax.Array, sshape: tuple[int, ...], poison: bool = False) -> jax.Array:
  """max |x| per scale group, non-finite values ignored (poison: a group holding one gives a non-finite max)."""
  return _from_keys(_reduce_keys(_keys(x, False, poison), sshape, jnp.max), False)


def minmax(x: jax.Array, sshape: tuple[int, ...], poison: bool = False) -> tuple[jax.Array, jax.Array]:
  """(min(min x, 0), max(max x, 0)) per scale group: the range always contains 0. Non-finite values ignored
  (poison: a group holding one gives a non-finite end)."""
  k = _keys(x, True, poison)
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
  """Rounds scales up to the next power of two (never adds clipping). Exact: from the exponent bits. Non-finite
  scales stay as they are."""
  mant, e = jnp.frexp(scale)  # scale = mant * 2^e, mant in [0.5, 1): already a power of two when mant == 0.5.
  return jnp.where(jnp.isfinite(scale), formats.exp2_int(jnp.where(mant == 0.5, e - 1, e)), scale)


def _safe(scale: jax.Array) -> jax.Array:
  """A zero scale (an all-zero group, or a range that underflows) becomes 1; a non-finite one (poison) NaN."""
  return jnp.where(scale == 0, 1.0, jnp.where(jnp.isfinite(scale), scale, jnp.nan))


# absmax_half_step divides by qmax + 1/2 and then by (1 - 2^-20): without that nudge, f32 rounding of the scale and
# of x / scale leaves -absmax at -(qmax + 0.5) +- 1 ulp, which rounds to -qmax about half of the time.
_HALF_STEP_NUDGE = 1.0 - 2.0 ** -20


def _grid_steps(spec: QuantSpec) -> float:
  """The number of steps from 0 to the end of a symmetric grid that absmax maps to (see the module docstring)."""
  qmax = formats.grid_max(spec.fmt)
  return (qmax + 0.5) / _HALF_STEP_NUDGE if spec.calibration == 'absmax_half_step' else qmax


def symmetric_scale(amax: jax.Array, spec: QuantSpec) -> jax.Array:
  """scale = amax / grid_max (absmax_half_step: amax / (qmax + 1/2); MX: the power of two
  2^(floor(log2 amax) - emax_elem)). A non-finite amax (poison) gives NaN."""
  fmt = spec.fmt
  if isinstance(fmt, formats.MXFormat):
    elem = fmt.element
    emax = elem.emax if isinstance(elem, formats.FloatFormat) else elem.bits - 2  # MXINT8: 2^-6 implicit
    # E8M0 reaches 2^-127, but f32 subnormals flush to zero on XLA:CPU: stop at 2^-126.
    e = jnp.clip(formats.floor_log2(jnp.maximum(amax, 2.0 ** -126)) - emax, -126, 127)
    return jnp.where(jnp.isfinite(amax), jnp.where(amax > 0, formats.exp2_int(e), 1.0), jnp.nan)
  # Multiplying by the reciprocal (not dividing by a constant) gives the same bits eagerly and under jit:
  # XLA rewrites x / constant into x * (1 / constant).
  steps = _grid_steps(spec)
  scale = _safe(amax * (1.0 / steps))
  # Two roundings (the scale, then amax * (1 / scale) in `estimators.grid_units`) left amax at steps * (1 + 2^-23)
  # for about a quarter of int8 ranges: it still rounds onto the end point, but the clipped STE's mask and the
  # estimators built on it (EWGS, QDrop, DSQ) read it as clipped and gave the largest element a zero gradient.
  # One ulp more scale puts it back inside; rarely (1 in about 10^5 ranges) two.
  for _ in range(2):
    over = amax * jnp.where(scale == 0, 0.0, 1.0 / scale) > steps
    scale = jnp.where(over, jnp.nextafter(scale, jnp.float32(jnp.inf)), scale)
  return po2(scale) if spec.po2_scale else scale


def asymmetric_params(lo: jax.Array, hi: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
  """scale = (hi - lo) / (qmax - qmin); zero_point = clip(round(qmin - lo / scale), qmin, qmax) as int32.

  Computed as (hi / 2 - lo / 2) * (2 / n), so a range wider than the float range (hi - lo > f32 max) still gives
  its finite scale (a single step wider than f32 max, possible only for uint1, is capped at f32 max). Halving is
  exact, so these are the bits of (hi - lo) * (1 / n) for every other range, eagerly and under jit (no FMA).
  """
  fmt = spec.fmt
  width = (hi * 0.5 - lo * 0.5) * (2.0 / (fmt.qmax - fmt.qmin))
  scale = _safe(jnp.where(jnp.isfinite(lo) & jnp.isfinite(hi), jnp.minimum(width, _F32_MAX), width))
  if spec.po2_scale:
    scale = _safe(jnp.minimum(po2(scale), 2.0 ** 127))
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


def calibrate(x: jax.Array, spec: QuantSpec, *, poison: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Returns (scale, zero_point) for x under spec; zero_point is None for symmetric specs.

  Binary (int1) ignores the method's range and uses scale = mean|x|, the closed-form minimiser of
  ||x - sign(x) * scale||^2 (XNOR-Net). With `poison`, a scale group holding a NaN or +-inf gets scale NaN (see
  the module docstring); absmax and minmax get that flag from their own reduction, at no extra pass over x.
  """
  sshape = gran.scale_shape(x.shape, spec)
  fmt = spec.fmt
  if x.size == 0:  # Nothing to calibrate on: the neutral grid (scale 1, zero point 0).
    return jnp.ones(sshape, jnp.float32), None if spec.scheme == 'symmetric' else jnp.zeros(sshape, jnp.int32)
  flag = lambda: gran.reduce(~jnp.isfinite(x), sshape, jnp.any)
  poisoned = lambda s: jnp.where(flag(), jnp.nan, s) if poison else s
  if isinstance(fmt, formats.IntFormat) and fmt.binary:
    # A group of zeros keeps scale 0 (its least-squares scale): it dequantizes to exactly 0, not to +-1.
    xf = x.astype(jnp.float32)
    mean = gran.reduce(jnp.abs(xf), sshape, jnp.mean) if poison else gran.finite_mean_abs(xf, sshape)
    return jnp.where(jnp.isfinite(mean), mean, jnp.nan if poison else 1.0), None
  if spec.calibration == 'mse':
    scale, zero_point = mse_search(x, spec, sshape)
    return poisoned(scale), zero_point
  if spec.scheme == 'symmetric':
    if spec.calibration == 'percentile':
      return poisoned(symmetric_scale(percentile(x, sshape, spec.percentile, symmetric=True), spec)), None
    return symmetric_scale(absmax(x, sshape, poison), spec), None
  if spec.calibration == 'percentile':
    lo, hi = percentile(x, sshape, spec.percentile, symmetric=False)
    scale, zero_point = asymmetric_params(lo, hi, spec)
    return poisoned(scale), zero_point
  lo, hi = minmax(x, sshape, poison)
  scale, zero_point = asymmetric_params(lo, hi, spec)
  return scale, jnp.where(jnp.isfinite(scale), zero_point, 0)
