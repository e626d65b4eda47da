"""Post-training quantization algorithms over captured calibration data, one module per method, each registered
by its config name in `qjax.ptq.registry` (its module imported below):

  rtn              round to nearest on the calibrated grid (the baseline)
  gptq             Frantar et al. 2022: Hessian-weighted error feedback, column by column
  awq              Lin et al. 2023: activation-aware input-channel scales by grid search, optional clip search
  smoothquant      Xiao et al. 2022: migrate activation outliers into the weights (s = max|X|^a / max|W|^(1-a))
  rotation         QuaRot / SpinQuant-style orthogonal (Hadamard or random) rotations, exact in float
  adaround         Nagel et al. 2020: learned up/down rounding (rectified sigmoid, annealed regulariser)
  bias_correction  Nagel et al. 2019: b += E[x] (w - w_hat)

Before any of them, two transforms of the float model (not per-layer methods): `qjax.ptq.batchnorm` folds its
evaluation-mode BatchNorms into the Dense / Conv layers whose outputs they normalise, and `qjax.ptq.equalization`
balances the channel ranges of consecutive layers (cross-layer equalization, Nagel et al. 2019).
"""

# Importing a method's module registers it: a new method adds its name here.
from qjax.ptq import adaround, awq, bias_correction, registry, rotation, rtn, smoothquant  # noqa: F401
from qjax.ptq import gptq as _gptq  # noqa: F401
from qjax.ptq.gptq import GPTQResult, gptq, hessian, inverse_factor
from qjax.ptq.layer import Layer, Stats, merge, stats_of
from qjax.ptq.pipeline import run

__all__ = ['GPTQResult', 'Layer', 'Stats', 'gptq', 'hessian', 'inverse_factor', 'merge', 'registry', 'run',
           'stats_of']
