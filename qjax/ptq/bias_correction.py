"""Bias correction (Nagel et al. 2019): remove the expected output shift that quantizing a kernel causes.

    y = x . w + b,   y_hat = x . w_hat + b'
    E[y] - E[y_hat] = E[x] . (w - w_hat) + b - b'   = 0   for   b' = b + E[x] . (w - w_hat)

(the analytic form, with E[x] the mean calibration input). Invariant: over the calibration rows the mean output
of the corrected quantized layer equals the float layer's, exactly in real arithmetic.

A layer without a bias (a convolution before BatchNorm, a bias-free projection) gets one: b' = E[x] . (w - w_hat).
Nagel et al. absorb it into the following BatchNorm's offset after folding the BatchNorm into the conv; the
runner adds it to the op's output instead (qjax.ptq.online's output shift), which is the same function of the
input before the BatchNorm and needs no knowledge of which op follows.
"""

from __future__ import annotations

import numpy as np

from qjax import quantizers
from qjax.ptq import layer as L
from qjax.ptq import registry


def bias_correction(w, w_hat, x_mean, bias=None) -> np.ndarray:
  """b' = b + E[x] . (w - w_hat), for a kernel w (in, out), its quantized w_hat, E[x] (in,)."""
  shift = np.asarray(x_mean, np.float64) @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))
  return shift if bias is None else np.asarray(bias, np.float64) + shift


def empirical_bias_correction(y_float_mean, y_quant_mean, bias=None) -> np.ndarray:
  """b' = b + (E[y] - E[y_hat]) from measured mean outputs (Brevitas' empirical variant)."""
  shift = np.asarray(y_float_mean, np.float64) - np.asarray(y_quant_mean, np.float64)
  return shift if bias is None else np.asarray(bias, np.float64) + shift


def _run(layer: L.Layer) -> L.Layer:
  q = layer.q if layer.q is not None else L.rtn(layer.w, layer.spec)
  b = bias_correction(layer.w, quantizers.dequantize(q), layer.stats.mean, layer.bias)
  notes = layer.notes + ((('bias_correction', 'the op had no bias: the correction is a new one'),)
                         if layer.bias is None else ())
  return layer.replace(q=q, bias=b.astype(np.float32), notes=notes)


registry.register(registry.PTQMethod('bias_correction', _run, {}))
