"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights with a per-input-channel scale.

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (clamped at 1e-5; alpha = 0.5 by default)
    x' = x / s,   w' = diag(s) . w                     so that  x' . w' = x . w   exactly in real arithmetic.

max|W_j| is over every consumer of the same input (q, k and v together), so pass all their kernels. For a
convolution's im2col kernel (`tied` = its input channels) both maxima run over the window's positions too, and
s is one scale per input channel, repeated over the positions. The
division x / s can be folded into the producing op where the model has one (a LayerNorm's scale and bias, a
previous Dense's output columns: `fold_into_producer`); the experiments' runner keeps it as an explicit online
multiply. With alpha =
0.5, max|X'_j| = max|W'_j| = sqrt(max|X_j| max|W_j|): the two ranges meet.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qjax.ptq import layer as L
from qjax.ptq import registry


class SmoothResult(NamedTuple):
  scale: np.ndarray      # (in,) s
  w: list[np.ndarray]    # each consumer kernel diag(s) . w


def smooth_scales(x_absmax, kernels, alpha: float = 0.5, min_scale: float = 1e-5,
                  tied: int | None = None) -> np.ndarray:
  """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), W_j over all kernels (in, out_k) that read the input (per input
  channel, repeated over positions, when `tied`)."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'SmoothQuant alpha must be in [0, 1], got {alpha}')
  ks = [np.asarray(k, np.float64) for k in (kernels if isinstance(kernels, (list, tuple)) else [kernels])]
  w_max = L.per_channel(np.max(np.stack([np.abs(k).max(axis=1) for k in ks]), axis=0), tied)
  x_max = L.per_channel(x_absmax, tied)
  s = np.power(x_max, alpha) / np.power(np.maximum(w_max, 1e-12), 1.0 - alpha)
  s = np.maximum(np.where(x_max > 0, s, 1.0), min_scale)  # an input that is always 0: leave it alone
  return L.per_feature(s, ks[0].shape[0])


def smoothquant(x_absmax, kernels, alpha: float = 0.5, tied: int | None = None) -> SmoothResult:
  """The scale and the smoothed kernels of one input shared by `kernels` (each (in, out))."""
  ks = kernels if isinstance(kernels, (list, tuple)) else [kernels]
  s = smooth_scales(x_absmax, ks, alpha, tied=tied)
  return SmoothResult(s, [s[:, None] * np.asarray(k, np.float64) for k in ks])


def fold_into_producer(weight, bias, scale):
  """Folds x / s into the op producing x: its output channels (last axis of a kernel or LayerNorm scale, and
  its bias) divided by s. Returns (weight, bias)."""
  s = np.asarray(scale, np.float64)
  w = np.asarray(weight, np.float64) / s
  return w, None if bias is None else np.asarray(bias, np.float64) / s


def _run(layer: L.Layer, *, alpha: float) -> L.Layer:
  if layer.q is not None:
    raise ValueError('smoothquant changes the float kernel; it must come before a rounding method')
  res = smoothquant(layer.stats.x_absmax, [layer.w], alpha, tied=layer.tied)
  s = res.scale
  scale = s if layer.scale is None else layer.scale * s
  return layer.replace(w=res.w[0].astype(np.float32), scale=scale, stats=L.transform_stats(layer.stats, scale=s))


def _check_params(p) -> None:
  registry.within('smoothquant', 'alpha', p['alpha'], 0.0, 1.0)


registry.register(registry.PTQMethod('smoothquant', _run, {'alpha': 0.5}, changes_input=True, check=_check_params))
