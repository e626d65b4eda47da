"""Pure quantizers: quantize, dequantize and fake_quant for every format, granularity and scheme.

    quantize(x, spec, params=None, key=None)   -> QArray(qvalue, scale, zero_point, format)
                                                  with  x ~ (qvalue - zero_point) * scale
    dequantize(q)                              -> (qvalue - zero_point) * scale  (codebooks: levels[qvalue] * scale)
    fake_quant(x, spec, params=None, key=None) -> dequantize(quantize(x)) in x's dtype, differentiable through
                                                  the spec's method (`qjax.methods`, looked up in `qjax.registry`)

Invariant (tested): qvalue lies in the format's range, and inside the clip range |x - dequantize(q)| <= scale/2
for integer grids with nearest rounding.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from qjax import calibration, estimators, formats, methods, registered  # noqa: F401 (registered: the methods)
from qjax import granularity as gran
from qjax.spec import QuantSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: x ~ (qvalue - zero_point) * scale, qvalue within the format's range.

  Attributes:
    qvalue: int8/uint8 for integer formats, float8/float4 dtypes for float formats, uint8 level indices for
      codebooks, element-format values for MX blocks. Same shape as x. None in a grid-only QArray (inside the
      ops: the scale and zero point an operand's fake quant used, handed to the low-precision matmul).
    scale: f32 of the scale shape (same rank as qvalue; each dimension 1, full, or size // group_size).
    zero_point: int32 of the scale shape, or None (symmetric).
    format: the format name (static).
    codebook: the levels of a custom codebook (static), else None.
    minor_dim: a layout hint (static), no effect on values: the dim of qvalue that is minor-most in memory when
      qvalue is a transposed view of a row-major stored array (a served weight stored transposed,
      `qjax.flax.serving`), else None (row-major: the last dim). The matmul lowering reads it to contract along
      the stored minor dim without a copy (`qjax.ops.dot_general.low_precision_dot`).
  """
  qvalue: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  format: str = dataclasses.field(metadata=dict(static=True))
  codebook: tuple[float, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
  minor_dim: int | None = dataclasses.field(default=None, metadata=dict(static=True))

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


def quantize(x: jax.Array, spec: QuantSpec, params: Mapping[str, jax.Array] | None = None,
             key: jax.Array | None = None, *, scale: jax.Array | None = None,
             zero_point: jax.Array | None = None, poison: bool = False) -> QArray:
  """Quantizes x: qvalue = to_grid(x / scale + zero_point), so that x ~ (qvalue - zero_point) * scale.

  Args:
    x: a float array.
    spec: the QuantSpec.
    params: the method's params (its learned ones, e.g. {'scale': step} for LSQ, or a static range
      {'scale', 'zero_point'}): the grid is then the method's (`Method.grid`); None: the spec's calibration.
    key: PRNG key, required when spec.rounding == 'stochastic'.
    scale, zero_point: an explicit grid (static ranges), whatever the method.
    poison: a scale group holding a NaN or +-inf gets scale NaN, so that its dequantized values are NaN as
      fake_quant's are (the qvalues alone cannot hold a NaN: grid rounding sends NaN to 0, inf to the end). How a
      weight is stored for serving (`qjax.flax.serving`): a diverged checkpoint must not serve finite numbers.
  Returns:
    QArray with the format's container dtype.
  """
  _check_input(x, spec)
  x_given = x  # what poison looks at: quantize_input may clip an inf onto the grid (PACT)
  method = spec.method
  if not method.integer_grid and scale is None and zero_point is None:
    # With or without params: calibrating x onto an integer grid would not be what the method computes.
    raise ValueError(f'estimator={spec.estimator!r} has no integer grid to quantize onto (its levels are not '
                     '(q - zero_point) * scale); serve it in fake mode')
  if scale is not None or zero_point is not None:
    if params:
      raise ValueError('quantize takes params or an explicit scale / zero_point, not both')
    scale, zero_point = methods.fit(scale, gran.scale_shape(x.shape, spec)), zero_point
    if scale is None:
      raise ValueError('a zero_point needs a scale too')
    if spec.scheme == 'asymmetric' and zero_point is None:
      raise ValueError('scheme="asymmetric" with an explicit scale needs zero_point too')
    _check_zero_point(zero_point, spec)
  elif params:
    params = method.prepare(x, spec, params)
    scale, zero_point = method.grid(x, spec, params)
    x = method.quantize_input(x, spec, params)
  else:
    scale, zero_point = calibration.calibrate(jax.lax.stop_gradient(x), spec)
  sshape = gran.scale_shape(x.shape, spec)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), sshape)
  if zero_point is not None:
    zero_point = jnp.broadcast_to(jnp.round(jnp.asarray(zero_point)).astype(jnp.int32), sshape)
  noise = formats.uniform_noise(key, x.shape, spec.rounding)
  y = estimators.grid_units(x, scale, zero_point)  # The same y as fake_quant's, eagerly and under jit.
  qvalue = formats.to_grid(y, spec.fmt, noise)
  if poison:  # sum(x - x) is NaN exactly where the group holds a NaN or an inf
    scale = jnp.where(jnp.isnan(gran.reduce(x_given - x_given, sshape, jnp.sum)), jnp.nan, scale)
  return QArray(qvalue, scale, zero_point, spec.format, spec.codebook)


def _check_zero_point(zero_point, spec: QuantSpec) -> None:
  """An explicit (concrete) zero point must lie on the grid, as calibrated ones are clipped to: one outside sent
  every element to the end of the grid (zero_point=1000 on int8 dequantized all of x to (127 - 1000) * scale)."""
  if zero_point is None or isinstance(zero_point, jax.core.Tracer):
    return
  fmt = spec.fmt
  zp = np.round(np.asarray(zero_point, np.float64))
  lo, hi = getattr(fmt, 'qmin', None), getattr(fmt, 'qmax', None)
  if lo is not None and zp.size and (zp.min() < lo or zp.max() > hi):
    raise ValueError(f'zero_point must lie on the grid of format={spec.format!r}, [{lo}, {hi}]; got values in '
                     f'[{zp.min():g}, {zp.max():g}]')


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
  """Initial values of the spec's learned quantizer parameters, calibrated on x (`Method.init`).

  lsq: {'scale': 2 mean|x| / sqrt(Q_P)} (LSQ's init); lsq_plus: {'scale', 'offset'} from the spec's
  calibration (offset = -zero_point * scale); pact: {'alpha': calibrated range, i.e. scale * qmax}; others: see
  their `Learned` declarations (`qjax.methods`). Methods that learn nothing: {}.
  """
  _check_input(x, spec)
  return spec.method.init(x, spec)


_DEPRECATED = ('scale', 'zero_point', 'offset', 'alpha')


def fake_quant(x: jax.Array, spec: QuantSpec, params: Mapping[str, jax.Array] | None = None,
               key: jax.Array | None = None, **deprecated) -> jax.Array:
  """Quantize-dequantize in x's dtype, differentiable through the spec's method (`spec.estimator`).

  x_hat = (q - zero_point) * scale with q = to_grid(x / scale + zero_point) for the grid methods (the forward
  value is the same for every estimator given the same grid, only the gradient differs; see `qjax.estimators`);
  methods with their own forward document it in their modules.

  Args:
    x: a float array (bf16, f16, f32).
    spec: the QuantSpec; `spec.estimator` names the registered method (`qjax.registry`).
    params: the mapping the method declares: its learned parameters (lsq: {'scale'}, lsq_plus: {'scale',
      'offset'}, pact: {'alpha'}; see `qjax.init_params`), or for methods that learn nothing an
      optional static range {'scale', 'zero_point'} (else calibrated on x, without gradient).
    key: PRNG key for stochastic rounding (and methods that draw random numbers).
    **deprecated: the keywords of qjax <= 0.1 (scale=, zero_point=, offset=, alpha=), mapped into params with a
      DeprecationWarning.
  """
  if deprecated:
    unknown = [k for k in deprecated if k not in _DEPRECATED]
    if unknown:
      raise TypeError(f'fake_quant() got unexpected keyword arguments {unknown}; it takes (x, spec, params, key)')
    warnings.warn(f'fake_quant({", ".join(f"{k}=" for k in deprecated)}...) is deprecated: pass '
                  f'params={{{", ".join(repr(k) + ": ..." for k in deprecated)}}}', DeprecationWarning, stacklevel=2)
    params = {**(params or {}), **{k: v for k, v in deprecated.items() if v is not None}}
  _check_input(x, spec)
  method = spec.method
  return method.fake_quant(x, spec, method.prepare(x, spec, params), key)
