"""Quantization error metrics: pure jnp functions of a tensor and its quantizer.

  sqnr_db(x, x_hat)          10 log10(||x||^2 / ||x - x_hat||^2)  (inf when exact)
  clip_fraction(x, spec, p)  fraction of finite elements outside the quantizer's clip range
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax import calibration, estimators, formats, quantizers
from qjax import granularity as gran
from qjax.spec import QuantSpec


def sqnr_db(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
  signal = jnp.sum(jnp.square(x))
  noise = jnp.sum(jnp.square(x - x_hat))
  return 10.0 * jnp.log10(signal / noise)


def _range(x, spec: QuantSpec, params: dict):
  """(scale, zero_point) the quantizer uses for x given its params (learned, static, or calibrated)."""
  params = params or {}
  if 'alpha' in params:
    return estimators.positive(params['alpha']) / spec.fmt.qmax, None
  if 'scale' in params:
    scale = jnp.asarray(params['scale'])
    return (estimators.positive(scale) if 'scale' in spec.learned else scale), params.get('zero_point')
  return calibration.calibrate(x, spec)


def fake_quant_with(x, spec: QuantSpec, params: dict | None) -> jax.Array:
  """The forward value of fake_quant(x) under the quantizer's params (any estimator)."""
  params = params or {}
  if spec.estimator == 'pact':
    return quantizers.fake_quant(x, spec, alpha=params['alpha'])
  if spec.estimator == 'lsq_plus':
    return quantizers.fake_quant(x, spec, scale=params['scale'], offset=params['offset'])
  scale, zp = _range(x, spec, params)
  return quantizers.fake_quant(x, spec.replace(estimator='ste'), scale=scale, zero_point=zp)


def clip_fraction(x: jax.Array, spec: QuantSpec, params: dict | None = None) -> jax.Array:
  """Fraction of finite elements of x beyond the representable range [(lo - z) s, (hi - z) s]."""
  x = x.astype(jnp.float32)
  if spec.estimator == 'lsq_plus':
    scale, zp = estimators.positive(params['scale']), None
    x = x - gran.expand(jnp.broadcast_to(params['offset'], scale.shape), x.shape)
  else:
    scale, zp = _range(x, spec, params)
  sshape = gran.scale_shape(x.shape, spec)
  s = gran.expand(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), sshape), x.shape)
  z = 0.0 if zp is None else gran.expand(jnp.broadcast_to(jnp.asarray(zp, jnp.float32), sshape), x.shape)
  lo, hi = formats.grid_range(spec.fmt)
  y = x / s + z
  finite = jnp.isfinite(x)
  out = finite & ((y < lo - 0.5) | (y > hi + 0.5))
  return jnp.sum(out) / jnp.maximum(jnp.sum(finite), 1)
