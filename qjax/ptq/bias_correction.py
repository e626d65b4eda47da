"""Bias correction (Nagel et al. 2019): remove the expected output shift that quantizing a kernel causes.

    y = x . w + b,   y_hat = x . w_hat + b'
    E[y] - E[y_hat] = E[x] . (w - w_hat) + b - b'   = 0   for   b' = b + E[x] . (w - w_hat)

(the analytic form, with E[x] the mean calibration input). Invariant: over the calibration rows the mean output
of the corrected quantized layer equals the float layer's, exactly in real arithmetic.

Empirical variant (`empirical=True`; Nagel et al. 2019 sec. 4.2, as AIMET and Brevitas ship it): match the
float *model's* mean output instead, b' = b + E[x_f . w + b] - E[x . w_hat + b], with x_f the float model's input
to the layer and x its input in the quantized model, so the correction also removes the shift that the quantized
layers before it caused. It needs both inputs: under sequential calibration (each layer's statistics are of the
quantized model's inputs) the runner gives the layer the float model's mean output (`Layer.float_out_mean`);
otherwise x = x_f and the two variants are the same correction.

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


def _run(layer: L.Layer, empirical: bool = False) -> L.Layer:
  q = layer.q if layer.q is not None else L.rtn(layer.w, layer.spec)
  w_hat = np.asarray(quantizers.dequantize(q), np.float64)
  notes = layer.notes + ((('bias_correction', 'the op had no bias: the correction is a new one'),)
                         if layer.bias is None else ())
  if empirical and layer.float_out_mean is not None:
    y_quant = layer.stats.mean @ w_hat + (0.0 if layer.bias is None else np.asarray(layer.bias, np.float64))
    b = empirical_bias_correction(layer.float_out_mean, y_quant, layer.bias)
  else:
    if empirical:
      notes += (('bias_correction_empirical', "the layer's inputs are the float model's: the analytic correction"),)
    b = bias_correction(layer.w, w_hat, layer.stats.mean, layer.bias)
  return layer.replace(q=q, bias=b.astype(np.float32), notes=notes)


registry.register(registry.PTQMethod('bias_correction', _run, {'empirical': False}))
