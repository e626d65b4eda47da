"""Quantized ops: dot_general, conv_general_dilated, einsum, and HLO inspection."""

from qjax.ops.config import DotConfig, MatmulConfig, fp8, int8_dynamic
from qjax.ops.dot_general import dot_general, make_dot_general

__all__ = ['DotConfig', 'MatmulConfig', 'dot_general', 'fp8', 'int8_dynamic', 'make_dot_general']
