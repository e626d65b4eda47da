"""Quantization error metrics: pure jnp functions of a tensor and its quantizer.

  sqnr_db(x, x_hat)          10 log10(||x||^2 / ||x - x_hat||^2)  (inf when exact)
  clip_fraction(x, spec, p)  fraction of finite elements outside the quantizer's clip range
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax import formats, quantizers
from qjax import granularity as gran
from qjax.spec import QuantSpec


def sqnr_db(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  x, x_hat = x.astype(jnp.float32), x_hat.astype(jnp.float32)
  signal = jnp.sum(jnp.square(x))
  noise = jnp.sum(jnp.square(x - x_hat))
  return jnp.where(noise == 0, jnp.inf, 10.0 * jnp.log10(signal / noise))  # exact, an all-zero x too (not 0 / 0)


def fake_quant_with(x, spec: QuantSpec, params: dict | None) -> jax.Array:
  """The forward value of fake_quant(x) under the quantizer's params (any method; without a key, so methods
  that draw random numbers draw none)."""
  return quantizers.fake_quant(x, spec, params)


def clip_fraction(x: jax.Array, spec: QuantSpec, params: dict | None = None) -> jax.Array:
  """Fraction of finite elements of x that the grid clips: beyond its representable range [(lo - z) s,
  (hi - z) s] by more than half the grid's end step (`formats.end_half_steps`: 0.5 units for ints, 16 for fp8
  e4m3, 0.14 for NF4), so farther from the end point than rounding inside the grid would leave them. The grid is
  the one the method uses for x under params (`Method.grid`: learned, static, or calibrated)."""
  x = x.astype(jnp.float32)
  method = spec.method
  scale, zp = method.grid(x, spec, method.prepare(x, spec, params))
  sshape = gran.scale_shape(x.shape, spec)
  s = gran.expand(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), sshape), x.shape)
  z = 0.0 if zp is None else gran.expand(jnp.broadcast_to(jnp.asarray(zp, jnp.float32), sshape), x.shape)
  lo, hi = formats.grid_range(spec.fmt)
  below, above = formats.end_half_steps(spec.fmt)
  y = x / s + z
  finite = jnp.isfinite(x)
  out = finite & ((y < lo - below) | (y > hi + above))
  return jnp.sum(out) / jnp.maximum(jnp.sum(finite), 1)
