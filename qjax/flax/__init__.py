"""Flax integration: quantize unmodified Linen and NNX models by rules; QAT, PTQ and int8 serving.

Weights are recognised by provenance (qjax.flax.provenance), quantizer state follows the policy in
qjax.flax.session, and calibration statistics per op come from qjax.flax.capture.
"""

from qjax.flax import capture
from qjax.flax.labels import is_quantizer_param, quantizer_param_labels
from qjax.flax.linen import QuantizedLinen, add_quant_vars, convert_linen, quantize_linen
from qjax.flax.nnx import QuantizedNnx, convert_nnx, quantize_nnx, reprobe_nnx
from qjax.flax.nnx import records as nnx_records
from qjax.flax.rules import QuantRule, RuleError, RuleSet
from qjax.flax.serving import ConversionError, Served, ServingWeight
from qjax.flax.state import QuantStat

__all__ = ['ConversionError', 'QuantRule', 'QuantStat', 'QuantizedLinen', 'QuantizedNnx', 'RuleError', 'RuleSet',
           'Served', 'ServingWeight', 'add_quant_vars', 'capture', 'convert_linen', 'convert_nnx', 'is_quantizer_param',
           'nnx_records', 'quantize_linen', 'quantize_nnx', 'quantizer_param_labels', 'reprobe_nnx']
