"""qjax: quantization research toolkit for JAX and Flax.

Layers, bottom up: formats -> spec -> granularity/calibration -> estimators -> quantizers -> ops -> flax.
"""

from qjax.calibration import calibrate
from qjax.formats import parse_format
from qjax.quantizers import QArray, dequantize, fake_quant, init_params, quantize
from qjax.spec import QuantSpec, int_spec

__all__ = [
    'QArray',
    'QuantSpec',
    'calibrate',
    'dequantize',
    'fake_quant',
    'init_params',
    'int_spec',
    'parse_format',
    'quantize',
]
