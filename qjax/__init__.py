"""qjax: quantization research toolkit for JAX and Flax.

Layers, bottom up: formats -> registry (names only) -> spec -> granularity/calibration -> estimators -> methods
(one object per quantizer method; dsq, dorefa, qdrop; registered in qjax.registered) -> quantizers -> ops -> flax.
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
