"""The older name of qjax.hlo (which matmuls really run in low precision, read from HLO), kept because code and
docs import `qjax.ops.inspect.parse_lowered`; new code imports qjax.hlo."""

from qjax.hlo import MatmulOp, MatmulReport, inspect_matmuls, parse_compiled, parse_lowered

__all__ = ['MatmulOp', 'MatmulReport', 'inspect_matmuls', 'parse_compiled', 'parse_lowered']
