"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, found by a grid search.

    xbar_j = mean|x_j|,   s(alpha) = max(xbar^alpha, 1e-4) / sqrt(max s . min s)
    alpha* = argmin_{alpha in grid} || x . w  -  (x / s) . Q(diag(s) . w) ||^2      grid: i / n_grid, i = 0..n_grid

over the calibration rows x (n, in) of the layer (a sample); for a convolution's im2col kernel (`tied` = its input
channels) xbar is averaged over the window's positions and s is one scale per input channel, repeated over the
positions (the online op scales the conv's input channels). alpha = 0 gives s = 1, plain round-to-nearest, so
the picked scales are never worse than RTN on those rows. The optional clip search (AWQ's auto_clip) then
shrinks each grid's range by r in {1 - j / n_clip : j < max_shrink n_clip}, per scale group (output column, or
group of input rows and output column), keeping the r with the least output error of that group.

The scales x / s can be folded into the producing op where the model has one (`smoothquant.fold_into_producer`);
the experiments' runner keeps them as an explicit online multiply. The kernel handed on is diag(s) . w, whose
float output with the input transform equals the original's.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qjax import calibration, quantizers
from qjax import granularity as gran
from qjax.ptq import layer as L
from qjax.ptq import registry
from qjax.spec import QuantSpec


class AWQResult(NamedTuple):
  scale: np.ndarray           # (in,) s: the op computes (x / s) . w_scaled
  w_scaled: np.ndarray        # (in, out) diag(s) . w
  q: quantizers.QArray        # w_scaled on its (clipped) grid
  alpha: float
  errors: np.ndarray          # the output error of each alpha in the grid
  clip_ratio: np.ndarray | None  # the chosen shrink per scale group (None without clip search)


def awq_scales(x_abs_mean, alpha: float) -> np.ndarray:
  """s = max(xbar^alpha, 1e-4), normalised by sqrt(max s . min s)."""
  s = np.maximum(np.power(np.asarray(x_abs_mean, np.float64), alpha), 1e-4)
  return s / np.sqrt(s.max() * s.min())


def _group_errors(x, d, sshape) -> jax.Array:
  """Output error per scale group of a kernel difference d (in, out) on rows x (n, in): (sshape)."""
  groups = sshape[0]
  xg = x.reshape(x.shape[0], groups, -1)                   # (n, G, in/G)
  dg = d.reshape(groups, -1, d.shape[1])                   # (G, in/G, out)
  e = jnp.sum(jnp.square(jnp.einsum('ngi,gio->ngo', xg, dg)), axis=0)  # (G, out)
  return e if sshape[1] == d.shape[1] else jnp.sum(e, axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(2,))
def _loss(x, w, spec, s):
  ws = w * s[:, None]
  w_hat = quantizers.dequantize(quantizers.quantize(ws, spec)) / s[:, None]
  return jnp.sum(jnp.square(x @ (w - w_hat)))


@functools.partial(jax.jit, static_argnums=(2,))
def _clip_search(x, ws, spec, ratios):
  sshape = gran.scale_shape(ws.shape, spec)

  def step(best, r):
    scale, zp = calibration.calibrate(ws * r, spec)
    d = ws - quantizers.dequantize(quantizers.quantize(ws, spec, scale=scale, zero_point=zp))
    err = _group_errors(x, d, sshape)
    better = err < best[0]
    return (jnp.where(better, err, best[0]), jnp.where(better, r, best[1])), None

  init = (jnp.full(sshape, jnp.inf), jnp.ones(sshape))
  (_, ratio), _ = jax.lax.scan(step, init, ratios)
  return ratio


def awq(w, x, spec: QuantSpec, *, x_abs_mean=None, n_grid: int = 20, clip: bool = True, n_clip: int = 20,
        max_shrink: float = 0.5, tied: int | None = None) -> AWQResult:
  """AWQ of a kernel w (in, out) on calibration rows x (n, in) (mean|x| from x unless x_abs_mean is given);
  `tied`: the kernel is a conv's im2col form with that many input channels (module docstring)."""
  spec = L.kernel_spec(spec, 'AWQ')
  if n_grid < 1:
    raise ValueError(f'AWQ n_grid must be >= 1, got {n_grid}')
  xj, wj = L.as_array(x), L.as_array(w)
  xbar = np.abs(np.asarray(x, np.float64)).mean(0) if x_abs_mean is None else np.asarray(x_abs_mean)
  xbar = L.per_channel(xbar, tied, np.mean)
  scales = lambda a: L.per_feature(awq_scales(xbar, a), wj.shape[0])  # noqa: E731
  alphas = np.arange(n_grid + 1) / n_grid
  errors = np.array([float(_loss(xj, wj, spec, L.as_array(scales(a)))) for a in alphas])
  alpha = float(alphas[int(np.argmin(errors))])
  s = scales(alpha)
  ws = L.as_array(np.asarray(w, np.float64) * s[:, None])
  ratio = None
  if clip:
    ratios = jnp.asarray([1 - j / n_clip for j in range(max(1, int(round(max_shrink * n_clip))))], jnp.float32)
    ratio = _clip_search(xj / L.as_array(s), ws, spec, ratios)
    scale, zp = calibration.calibrate(ws * gran.expand(ratio, ws.shape), spec)
    q = quantizers.quantize(ws, spec, scale=scale, zero_point=zp)
    ratio = np.asarray(ratio)
  else:
    q = quantizers.quantize(ws, spec)
  return AWQResult(s, np.asarray(ws), q, alpha, errors, ratio)


def _run(layer: L.Layer, *, n_grid: int, clip: bool, n_clip: int, max_shrink: float) -> L.Layer:
  if layer.q is not None:
    raise ValueError('awq decides the rounding grid; it must come before other rounding methods')
  res = awq(layer.w, layer.stats.sample, layer.spec, x_abs_mean=layer.stats.abs_mean, n_grid=n_grid, clip=clip,
            n_clip=n_clip, max_shrink=max_shrink, tied=layer.tied)
  scale = res.scale if layer.scale is None else layer.scale * res.scale
  return layer.replace(w=res.w_scaled, q=res.q, scale=scale,
                       stats=L.transform_stats(layer.stats, scale=res.scale),
                       notes=layer.notes + (('awq_alpha', res.alpha),))


def _check_params(p) -> None:
  registry.at_least('awq', 'n_grid', p['n_grid'], 1)
  registry.at_least('awq', 'n_clip', p['n_clip'], 1)
  registry.within('awq', 'max_shrink', p['max_shrink'], 0.0, 1.0)


registry.register(registry.PTQMethod('awq', _run, {'n_grid': 20, 'clip': True, 'n_clip': 20, 'max_shrink': 0.5},
                                     changes_input=True, rounds=True, check=_check_params))
