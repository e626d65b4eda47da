"""DSQ: Differentiable Soft Quantization (Gong et al., ICCV 2019), with a learned temperature.

The forward is the standard fake quant on the calibrated (or static) grid, x_hat = (q - z) s. The backward
differentiates DSQ's soft quantizer instead of the staircase. In grid units y = x / s + z, each unit interval
[i, i + 1] (i = clip(floor(y), qmin, qmax - 1)) holds one tanh step centred on c = i + 1/2:

    phi(y) = tanh(k (y - c)) / tanh(k / 2),     k = log(2 / alpha - 1),     Q_soft(y) = i + (phi(y) + 1) / 2

alpha in (0, 1/2) is DSQ's characteristic variable: small alpha -> large k -> close to the staircase. With
d = y - c, T = tanh(k / 2), u = tanh(k d), and g the incoming gradient, inside the grid's range (0 outside):

    dx     = g * k (1 - u^2) / (2 T)
    dalpha = sum(g * s / 2 * dphi/dk * dk/dalpha),   dphi/dk = (d (1 - u^2) T - u (1 - T^2) / 2) / T^2,
                                                      dk/dalpha = -2 / (alpha (2 - alpha))

params: {'alpha'} of the scale shape, initialised to 0.2 (the paper's value) and kept in [1e-4, 1/2] (a clamp with
a straight-through gradient). The grid is the calibrated one, so DSQ runs real matmuls like STE.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qjax import estimators, formats, methods
from qjax import granularity as gran

ALPHA_INIT = 0.2
ALPHA_MIN, ALPHA_MAX = 1e-4, 0.5


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _dsq(x, scale, zero_point, alpha, noise, fmt):
  return estimators._fq(x, scale, zero_point, noise, fmt)[0].astype(x.dtype)


def _dsq_fwd(x, scale, zero_point, alpha, noise, fmt):
  x_hat, y, _, inside = estimators._fq(x, scale, zero_point, noise, fmt)
  return x_hat.astype(x.dtype), (y, inside, scale, zero_point, alpha, noise)


def _dsq_bwd(fmt, res, g):
  y, inside, scale, zero_point, alpha, noise = res
  gf = g.astype(jnp.float32)
  a = gran.expand(alpha.astype(jnp.float32), y.shape)
  k = jnp.log(2.0 / a - 1.0)
  t = jnp.tanh(k / 2)
  d = y - (jnp.clip(jnp.floor(y), fmt.qmin, fmt.qmax - 1) + 0.5)
  u = jnp.tanh(k * d)
  dx = jnp.where(inside, gf * k * (1 - u * u) / (2 * t), 0.0)
  dphi_dk = (d * (1 - u * u) * t - u * (1 - t * t) / 2) / (t * t)
  dk_dalpha = -2.0 / (a * (2.0 - a))
  s = gran.expand(scale.astype(jnp.float32), y.shape)
  dalpha = gran.sum_to(jnp.where(inside, gf * s / 2 * dphi_dk * dk_dalpha, 0.0), alpha.shape)
  zp = None if zero_point is None else jnp.zeros_like(zero_point)
  return (dx.astype(g.dtype), jnp.zeros_like(scale), zp, dalpha.astype(alpha.dtype),
          None if noise is None else jnp.zeros_like(noise))


_dsq.defvjp(_dsq_fwd, _dsq_bwd)


def dsq(x, scale, zero_point, alpha, noise=None, *, fmt):
  """Fake quant whose gradient is DSQ's soft quantizer (see the module docstring); alpha gets a gradient."""
  return _dsq(x, scale, zero_point, alpha, noise, fmt)


def _alpha_init(x, spec):
  return jnp.full(gran.scale_shape(x.shape, spec), ALPHA_INIT, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DSQ(methods.Method):
  """DSQ on the calibrated grid with a learned alpha (see the module docstring)."""
  learned: tuple[methods.Learned, ...] = (methods.Learned('alpha', _alpha_init, ALPHA_MIN, ALPHA_MAX),)
  needs_int: bool = True

  def check(self, spec):
    super().check(spec)
    if spec.fmt.binary:
      raise ValueError('estimator="dsq" needs at least one unit interval between grid points; int1 ({-1, +1}) '
                       'has none (use int2 or wider)')

  def grid(self, x, spec, params, *, poison=False):
    return methods.Method.grid(self, x, spec, {}, poison=poison)

  def fake_quant(self, x, spec, params, key):
    scale, zero_point = methods.Method.grid(self, x, spec, {})
    scale = jax.lax.stop_gradient(scale)
    zero_point = None if zero_point is None else jax.lax.stop_gradient(zero_point.astype(jnp.float32))
    noise = formats.uniform_noise(key, x.shape, spec.rounding)
    return dsq(x, scale, zero_point, params['alpha'], noise, fmt=spec.fmt)
