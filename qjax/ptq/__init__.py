"""Post-training quantization algorithms over captured calibration data: `gptq` (Frantar et al., 2022)."""

from qjax.ptq.gptq import GPTQResult, gptq, hessian, inverse_factor

__all__ = ['GPTQResult', 'gptq', 'hessian', 'inverse_factor']
