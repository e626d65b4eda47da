"""Gradient estimators of fake quantization: one `jax.custom_vjp` each, with `_fwd`/`_bwd` beside it.

All share one forward, the fake-quant of x on a grid (units: y = x / s + z, q = round_clip(y)):

    x_hat = (q - z) * s,   q = clip(round(x / s + z), qmin, qmax)

and differ only in their backward. Below, g is the incoming gradient, `inside` is the indicator
qmin <= y <= qmax, and sums over a scale's group reduce full-shape terms to the scale's shape.

  ste          dx = g                                   (round and clip treated as identity)
  clipped_ste  dx = g * inside
  lsq          dx = g * inside;  ds = sum(g * (q - y * inside)) * gs,   gs = 1 / sqrt(N * qmax)
  lsq_plus     y = (x - b) / s:  dx = g * inside;  ds as lsq;  db = sum(g * (1 - inside)) * gs
  pact         y = clip(x, lo, a) / s with s = a / qmax: dx = g * 1[lo < x < a];  da = sum(g * (x >= a))
               (signed grids also subtract sum(g * (x <= -a)))
  ewgs         dx = g * (1 + delta * sign(g) * (y - q)) * inside

Scales and offsets enter and leave as ordinary arrays of the scale's shape, so Flax layers can hold them as
params and optax can train them. Inputs may be bf16, f16 or f32; arithmetic runs in f32.

Learned steps and clips stay positive by construction: lsq, lsq_plus and pact use `positive(s)` =
max(s, STEP_FLOOR) in the forward with a straight-through gradient (d positive(s) / ds = 1), the clamp of the
reference LSQ and PACT implementations without its zero gradient below the floor: an optimizer step that drives a
step size to zero or below (Adam at a high learning rate) leaves a tiny positive step in the forward, and the
gradient, computed at that step, pushes the parameter back up. Serving conversion and the ops use the same value.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qjax import formats
from qjax import granularity as gran


@jax.jit
def grid_units(x, scale, zero_point=None):
  """y = x / scale + zero_point in f32, the value that gets rounded onto the grid.

  Written as x * (1 / scale) (+ zero_point) and compiled as one unit, so that eager calls and calls inside a
  larger jit give the same bits: XLA rewrites a division by a broadcast scale into a multiplication by its
  reciprocal, and contracts the multiply-add into an FMA, under jit only. A zero scale (an all-zero int1 group)
  maps every element to the zero point (reciprocal 0, not inf: 0 * inf would be NaN).
  """
  scale = scale.astype(jnp.float32)
  y = x.astype(jnp.float32) * gran.expand(jnp.where(scale == 0, 0.0, 1.0 / scale), x.shape)
  if zero_point is not None:
    y = y + gran.expand(zero_point.astype(jnp.float32), x.shape)
  return y


def keep_nonfinite(xf, x_hat, dtype):
  """x_hat where x is finite, clipped to the finite range of `dtype` (a grid end of an asymmetric range may
  overshoot it: f16, or f32 for ranges near the f32 max); NaN and +-inf of x pass through unchanged."""
  m = float(jnp.finfo(dtype).max)
  return jnp.where(jnp.isfinite(xf), jnp.clip(x_hat, -m, m), xf)


def _fq(x, scale, zero_point, noise, fmt):
  """The shared forward: returns (x_hat in f32, y, q in grid units as f32, inside mask)."""
  xf = x.astype(jnp.float32)
  s = gran.expand(scale.astype(jnp.float32), x.shape)
  z = 0.0 if zero_point is None else gran.expand(zero_point.astype(jnp.float32), x.shape)
  y = grid_units(x, scale, zero_point)
  q = formats.grid_values(y, fmt, noise)
  lo, hi = formats.grid_range(fmt)
  inside = (y >= lo) & (y <= hi)
  x_hat = keep_nonfinite(xf, (q - z) * s, x.dtype)  # NaN / inf in, NaN / inf out (never silently finite).
  return x_hat, y, q, inside


def _zeros_like(a):
  return None if a is None else jnp.zeros_like(a)


# ---------------------------------------------------------------------------------------------------- STE


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ste(x, scale, zero_point, noise, fmt):
  return _fq(x, scale, zero_point, noise, fmt)[0].astype(x.dtype)


def _ste_fwd(x, scale, zero_point, noise, fmt):
  return _ste(x, scale, zero_point, noise, fmt), (scale, zero_point, noise)


def _ste_bwd(fmt, res, g):
  scale, zero_point, noise = res
  return g, jnp.zeros_like(scale), _zeros_like(zero_point), _zeros_like(noise)


_ste.defvjp(_ste_fwd, _ste_bwd)


def ste(x, scale, zero_point=None, noise=None, *, fmt):
  """Fake quant with the straight-through estimator: d x_hat / dx = 1 everywhere; scale gets no gradient."""
  return _ste(x, scale, zero_point, noise, fmt)


# -------------------------------------------------------------------------------------------- clipped STE


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _clipped_ste(x, scale, zero_point, noise, fmt):
  return _fq(x, scale, zero_point, noise, fmt)[0].astype(x.dtype)


def _clipped_ste_fwd(x, scale, zero_point, noise, fmt):
  x_hat, _, _, inside = _fq(x, scale, zero_point, noise, fmt)
  return x_hat.astype(x.dtype), (inside, scale, zero_point, noise)


def _clipped_ste_bwd(fmt, res, g):
  inside, scale, zero_point, noise = res
  return (g * inside).astype(g.dtype), jnp.zeros_like(scale), _zeros_like(zero_point), _zeros_like(noise)


_clipped_ste.defvjp(_clipped_ste_fwd, _clipped_ste_bwd)


def clipped_ste(x, scale, zero_point=None, noise=None, *, fmt):
  """Fake quant whose gradient is 1 inside the clip range [(qmin - z) s, (qmax - z) s] and 0 outside."""
  return _clipped_ste(x, scale, zero_point, noise, fmt)


# ------------------------------------------------------------------------------------------ positive steps

STEP_FLOOR = 1e-8  # the smallest learned step / clip a forward uses (f32 x / 1e-8 stays finite up to 3e30)


def positive(s):
  """max(s, STEP_FLOOR) in the forward, identity in the backward (straight-through clamp): learned steps and
  clips can never be zero or negative where they are used, and a parameter below the floor still gets its
  gradient."""
  s = jnp.asarray(s)
  # (s - sg(s)) is exactly 0 in the forward, so the result is exactly max(s, floor) (s + sg(max - s) would
  # cancel to 0 for s = -1).
  return (s - jax.lax.stop_gradient(s)) + jax.lax.stop_gradient(jnp.maximum(s, STEP_FLOOR))


# ---------------------------------------------------------------------------------------------------- LSQ


def lsq_grad_scale(x_shape, scale_shape, fmt) -> float:
  """LSQ's gradient scale g = 1 / sqrt(N * Q_P), N = elements sharing one scale, Q_P = qmax."""
  n = gran.elements_per_scale(tuple(x_shape), tuple(scale_shape))
  return 1.0 / math.sqrt(max(n, 1) * max(formats.grid_max(fmt), 1.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lsq(x, scale, noise, fmt):
  return _fq(x, scale, None, noise, fmt)[0].astype(x.dtype)


def _lsq_fwd(x, scale, noise, fmt):
  x_hat, y, q, inside = _fq(x, scale, None, noise, fmt)
  return x_hat.astype(x.dtype), (y, q, inside, scale, noise)


def _lsq_bwd(fmt, res, g):
  y, q, inside, scale, noise = res
  gs = lsq_grad_scale(y.shape, scale.shape, fmt)
  gf = g.astype(jnp.float32)
  dscale = gran.sum_to(gf * (q - jnp.where(inside, y, 0.0)), scale.shape) * gs
  return (g * inside).astype(g.dtype), dscale.astype(scale.dtype), _zeros_like(noise)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq(x, scale, noise=None, *, fmt):
  """Learned step size quantization (Esser et al., 2020), symmetric.

  x_hat = clip(round(x / s), -Q_N, Q_P) * s. Gradients: dx = g * inside; per element
  d x_hat / ds = round(x/s) - x/s inside, -Q_N below, Q_P above, times g = 1 / sqrt(N * Q_P).
  The step used is `positive(scale)` (see the module docstring).
  """
  return _lsq(x, positive(scale), noise, fmt)


def lsq_init(x, sshape, fmt):
  """LSQ's initial step s0 = 2 * mean|x| / sqrt(Q_P) per scale group, the mean over finite elements (an inf
  would make the step inf and every output NaN); 1 for a group of zeros or of no finite element."""
  mean = gran.finite_mean_abs(x, tuple(sshape))
  return jnp.where(mean > 0, mean * (2.0 / math.sqrt(formats.grid_max(fmt))), 1.0)


# --------------------------------------------------------------------------------------------------- LSQ+


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lsq_plus(x, scale, offset, noise, fmt):
  return _lsq_plus_fwd(x, scale, offset, noise, fmt)[0]


def _lsq_plus_fwd(x, scale, offset, noise, fmt):
  b = gran.expand(offset.astype(jnp.float32), x.shape)
  x_hat, y, q, inside = _fq(x.astype(jnp.float32) - b, scale, None, noise, fmt)
  return keep_nonfinite(x, x_hat + b, x.dtype).astype(x.dtype), (y, q, inside, scale, offset, noise)


def _lsq_plus_bwd(fmt, res, g):
  y, q, inside, scale, offset, noise = res
  gs = lsq_grad_scale(y.shape, scale.shape, fmt)
  gf = g.astype(jnp.float32)
  dscale = gran.sum_to(gf * (q - jnp.where(inside, y, 0.0)), scale.shape) * gs
  doffset = gran.sum_to(jnp.where(inside, 0.0, gf), offset.shape) * gs
  return ((g * inside).astype(g.dtype), dscale.astype(scale.dtype), doffset.astype(offset.dtype),
          _zeros_like(noise))


_lsq_plus.defvjp(_lsq_plus_fwd, _lsq_plus_bwd)


def lsq_plus(x, scale, offset, noise=None, *, fmt):
  """LSQ+ (Bhalgat et al., 2020): learned step s and offset b. x_hat = clip(round((x-b)/s), qmin, qmax) s + b.

  Gradients: dx = g * inside; ds as LSQ on y = (x - b) / s; db = g * (1 - inside) (times LSQ's gradient scale).
  The step used is `positive(scale)`.
  """
  return _lsq_plus(x, positive(scale), offset, noise, fmt)


# --------------------------------------------------------------------------------------------------- PACT


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pact(x, alpha, noise, fmt):
  return _pact_fwd(x, alpha, noise, fmt)[0]


def _pact_fwd(x, alpha, noise, fmt):
  xf = x.astype(jnp.float32)
  a = gran.expand(alpha.astype(jnp.float32), x.shape)
  lo = -a if fmt.qmin < 0 else jnp.zeros_like(a)
  clipped = jnp.clip(xf, lo, a)
  x_hat = keep_nonfinite(xf, _fq(clipped, alpha * (1.0 / fmt.qmax), None, noise, fmt)[0], x.dtype)
  return x_hat.astype(x.dtype), (xf, a, lo, alpha, noise)


def _pact_bwd(fmt, res, g):
  xf, a, lo, alpha, noise = res
  gf = g.astype(jnp.float32)
  dx = jnp.where((xf > lo) & (xf < a), gf, 0.0)
  dalpha_full = jnp.where(xf >= a, gf, 0.0)
  if fmt.qmin < 0:
    dalpha_full = dalpha_full - jnp.where(xf <= lo, gf, 0.0)
  dalpha = gran.sum_to(dalpha_full, alpha.shape)
  return dx.astype(g.dtype), dalpha.astype(alpha.dtype), _zeros_like(noise)


_pact.defvjp(_pact_fwd, _pact_bwd)


def pact(x, alpha, noise=None, *, fmt):
  """PACT (Choi et al., 2018): clip to [0, alpha] (unsigned grids) or [-alpha, alpha] (signed), then quantize
  with s = alpha / qmax. dx = g * 1[lo < x < alpha]; d alpha = g * 1[x >= alpha] (- g * 1[x <= -alpha]).
  The clip used is `positive(alpha)`."""
  return _pact(x, positive(alpha), noise, fmt)


# --------------------------------------------------------------------------------------------------- EWGS


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ewgs(x, scale, zero_point, noise, fmt, delta):
  return _fq(x, scale, zero_point, noise, fmt)[0].astype(x.dtype)


def _ewgs_fwd(x, scale, zero_point, noise, fmt, delta):
  x_hat, y, q, inside = _fq(x, scale, zero_point, noise, fmt)
  return x_hat.astype(x.dtype), (y, q, inside, scale, zero_point, noise)


def _ewgs_bwd(fmt, delta, res, g):
  y, q, inside, scale, zero_point, noise = res
  gf = g.astype(jnp.float32)
  dx = gf * (1.0 + delta * jnp.sign(gf) * (y - q)) * inside
  return dx.astype(g.dtype), jnp.zeros_like(scale), _zeros_like(zero_point), _zeros_like(noise)


_ewgs.defvjp(_ewgs_fwd, _ewgs_bwd)


def ewgs(x, scale, zero_point=None, noise=None, *, fmt, delta):
  """Element-wise gradient scaling (Lee et al., 2021): dx = g (1 + delta sign(g) (y - q)) inside the range,
  where y - q in [-1/2, 1/2] is the rounding residual in grid units."""
  return _ewgs(x, scale, zero_point, noise, fmt, delta)
