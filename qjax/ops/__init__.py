"""Quantized ops: dot_general, conv_general_dilated, einsum, and HLO inspection."""

from qjax.hlo import MatmulOp, MatmulReport, inspect_matmuls
from qjax.ops.config import DotConfig, MatmulConfig, fp8, int8_dynamic, int_dynamic
from qjax.ops.conv import conv_general_dilated, make_conv_general_dilated
from qjax.ops.dot_general import dot_general, make_dot_general
from qjax.ops.einsum import make_einsum  # qjax.ops.einsum stays the module (its function: einsum.einsum)

__all__ = ['DotConfig', 'MatmulConfig', 'MatmulOp', 'MatmulReport', 'dot_general', 'fp8', 'inspect_matmuls',
           'int8_dynamic', 'int_dynamic', 'make_dot_general']
__all__ += ['conv_general_dilated', 'make_conv_general_dilated', 'make_einsum']
