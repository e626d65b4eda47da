"""Pure quantizers: quantize, dequantize and fake_quant for every format, granularity and scheme.

    quantize(x, spec)     -> QArray(qvalue, scale, zero_point)  with  x ~ (qvalue - zero_point) * scale
    dequantize(q)         -> (qvalue - zero_point) * scale      (codebooks: levels[qvalue] * scale)
    fake_quant(x, spec)   -> dequantize(quantize(x)) in x's dtype, differentiable through spec.estimator

Invariant (tested): qvalue lies in the format's range, and inside the clip range |x - dequantize(q)| <= scale/2
for integer grids with nearest rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax import calibration, estimators, formats
from qjax import granularity as gran
from qjax.spec import QuantSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: x ~ (qvalue - zero_point) * scale, qvalue within the format's range.

  Attributes:
    qvalue: int8/uint8 for integer formats, float8/float4 dtypes for float formats, uint8 level indices for
      codebooks, element-format values for MX blocks. Same shape as x.
    scale: f32 of the scale shape (same rank as qvalue; each dimension 1, full, or size // group_size).
    zero_point: int32 of the scale shape, or None (symmetric).
    format: the format name (static).
    codebook: the levels of a custom codebook (static), else None.
  """
  qvalue: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  format: str = dataclasses.field(metadata=dict(static=True))
  codebook: tuple[float, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def shape(self):
    return self.qvalue.shape

  @property
  def fmt(self) -> formats.Format:
    return formats.parse_format(self.format, self.codebook)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return dequantize(self, dtype)


def _check_input(x, spec: QuantSpec, what: str = 'x'):
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{what} must be a float array (bf16, f16 or f32) to quantize, got dtype {x.dtype}')
  if x.ndim == 0:
    raise ValueError(f'{what} must have rank >= 1 to quantize, got a scalar')
  gran.scale_shape(x.shape, spec)  # Validates axis and group_size against the shape.


def quantize(x: jax.Array, spec: QuantSpec, *, scale: jax.Array | None = None,
             zero_point: jax.Array | None = None, key: jax.Array | None = None) -> QArray:
  """Quantizes x: qvalue = to_grid(x / scale + zero_point), so that x ~ (qvalue - zero_point) * scale.

  Args:
    x: a float array.
    spec: the QuantSpec.
    scale, zero_point: use these instead of calibrating on x (static ranges, learned steps).
    key: PRNG key, required when spec.rounding == 'stochastic'.
  Returns:
    QArray with the format's container dtype.
  """
  _check_input(x, spec)
  if scale is None:
    scale, zero_point = calibration.calibrate(jax.lax.stop_gradient(x), spec)
  sshape = gran.scale_shape(x.shape, spec)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), sshape)
  if spec.scheme == 'asymmetric' and zero_point is None:
    raise ValueError('scheme="asymmetric" with an explicit scale needs zero_point too')
  if zero_point is not None:
    zero_point = jnp.broadcast_to(jnp.round(jnp.asarray(zero_point)).astype(jnp.int32), sshape)
  noise = formats.uniform_noise(key, x.shape, spec.rounding)
  y = estimators.grid_units(x, scale, zero_point)  # The same y as fake_quant's, eagerly and under jit.
  qvalue = formats.to_grid(y, spec.fmt, noise)
  return QArray(qvalue, scale, zero_point, spec.format, spec.codebook)


def dequantize(q: QArray, dtype=jnp.float32) -> jax.Array:
  """(qvalue - zero_point) * scale (codebooks: levels[qvalue] * scale), in `dtype`, saturating at dtype's finite
  range (the end of an asymmetric grid may overshoot it by part of a step). A NaN scale gives NaN."""
  v = formats.from_grid(q.qvalue, q.fmt)
  if q.zero_point is not None:
    v = v - gran.expand(q.zero_point, q.shape).astype(jnp.float32)
  v = v * gran.expand(q.scale, q.shape)
  m = float(jnp.finfo(dtype).max)
  return jnp.clip(v, -m, m).astype(dtype)


def init_params(x: jax.Array, spec: QuantSpec) -> dict[str, jax.Array]:
  """Initial values of the spec's learnable quantizer parameters, calibrated on x.

  lsq: {'scale': 2 mean|x| / sqrt(Q_P)} (LSQ's init); lsq_plus: {'scale', 'offset'} from the spec's
  calibration (offset = -zero_point * scale); pact: {'alpha': calibrated range, i.e. scale * qmax}.
  Other estimators learn nothing: {}.
  """
  _check_input(x, spec)
  x = jax.lax.stop_gradient(x)
  if spec.estimator == 'lsq':
    return {'scale': estimators.lsq_init(x, gran.scale_shape(x.shape, spec), spec.fmt)}
  if spec.estimator == 'lsq_plus':
    scale, zero_point = calibration.calibrate(x, spec)
    return {'scale': scale, 'offset': -zero_point.astype(jnp.float32) * scale}
  if spec.estimator == 'pact':
    scale, _ = calibration.calibrate(x, spec)
    return {'alpha': scale * spec.fmt.qmax}
  return {}


def fake_quant(x: jax.Array, spec: QuantSpec, *, scale: jax.Array | None = None,
               zero_point: jax.Array | None = None, offset: jax.Array | None = None,
               alpha: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
  """Quantize-dequantize in x's dtype, differentiable through spec.estimator.

  x_hat = (q - zero_point) * scale with q = to_grid(x / scale + zero_point); the forward value is the same
  for every estimator (given the same scale), only the gradient differs (see `qjax.estimators`).

  Args:
    x: a float array (bf16, f16, f32).
    spec: the QuantSpec.
    scale, zero_point: explicit range (else calibrated on x with stop_gradient). For 'lsq' and 'lsq_plus'
      `scale` is the learned step and receives a gradient.
    offset: the learned offset of 'lsq_plus'.
    alpha: the learned clip of 'pact'.
    key: PRNG key for stochastic rounding.
  """
  _check_input(x, spec)
  fmt = spec.fmt
  sshape = gran.scale_shape(x.shape, spec)
  fit = lambda a: None if a is None else jnp.broadcast_to(jnp.asarray(a, jnp.float32), sshape)
  scale, zero_point, offset, alpha = fit(scale), fit(zero_point), fit(offset), fit(alpha)
  noise = formats.uniform_noise(key, x.shape, spec.rounding)
  est = spec.estimator
  if est == 'pact':
    if alpha is None:
      raise ValueError('estimator="pact" needs alpha= (the learned clip); see qjax.init_params')
    return estimators.pact(x, alpha, noise, fmt=fmt)
  if est in ('lsq', 'lsq_plus') and scale is None:
    raise ValueError(f'estimator={est!r} needs scale= (the learned step); see qjax.init_params')
  if est == 'lsq':
    return estimators.lsq(x, scale, noise, fmt=fmt)
  if est == 'lsq_plus':
    if offset is None:
      raise ValueError('estimator="lsq_plus" needs offset= (the learned offset); see qjax.init_params')
    return estimators.lsq_plus(x, scale, offset, noise, fmt=fmt)
  if scale is None:
    scale, zero_point = calibration.calibrate(jax.lax.stop_gradient(x), spec)
    # Materialise the small calibrated scale: else XLA fuses its producer (a few selects) into the elementwise
    # pass and recomputes it for every element (~8% of per-channel fake_quant's time, docs/benchmarks.md).
    scale, zero_point = jax.lax.optimization_barrier((scale, zero_point))
  elif spec.scheme == 'asymmetric' and zero_point is None:
    raise ValueError('scheme="asymmetric" with an explicit scale needs zero_point too')
  scale = jax.lax.stop_gradient(scale)
  if zero_point is not None:
    zero_point = jax.lax.stop_gradient(jnp.round(zero_point).astype(jnp.float32))
  if est == 'ste':
    return estimators.ste(x, scale, zero_point, noise, fmt=fmt)
  if est == 'clipped_ste':
    return estimators.clipped_ste(x, scale, zero_point, noise, fmt=fmt)
  return estimators.ewgs(x, scale, zero_point, noise, fmt=fmt, delta=spec.ewgs_delta)
