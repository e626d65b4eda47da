"""`config.ptq`: which PTQ methods a PTQ run applies, in order, and their parameters (qjax.ptq.registry's names and
defaults). Applying them: experiments/training/ptq.py."""

from __future__ import annotations

from typing import Any

import ml_collections

from qjax.ptq import pipeline, registry


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = 'rtn'  # rtn | gptq | awq | smoothquant | rotation | adaround | bias_correction, or 'a,b' in order
  c.max_sample = 512  # calibration rows kept per layer (AWQ, AdaRound); sums use every row
  # False: every layer is calibrated on the float model's inputs. True: layer by layer in call order, each on the
  # inputs of the model whose earlier layers already hold the methods' quantized kernels (GPTQ's protocol; one
  # capture pass per layer).
  c.sequential = False
  # True: every BatchNorm that normalises a Flax Dense / Conv's output is folded into that layer's kernel and
  # bias before anything is quantized (qjax.ptq.batchnorm), so the weights rounded are the ones a deployed model
  # multiplies by. Applies with any method, round-to-nearest included.
  c.fold_batchnorm = False
  # True: consecutive layers joined by a positively homogeneous op (ReLU, pooling) get their channels rescaled so
  # that each channel's weight range is the same in both (cross-layer equalization, qjax.ptq.equalization; after
  # folding when both are set). For per-tensor weight grids.
  c.equalize = False
  for name in registry.names():
    d = registry.get(name).defaults
    if d:
      c[name] = ml_collections.ConfigDict(dict(d))
  return c


def methods(ptq) -> list[tuple[str, dict[str, Any]]]:
  """The ordered (name, params) of config.ptq; ValueError naming a wrong method (and the closest) or parameter,
  or an option set where it would be ignored (sequential with RTN alone, empirical bias correction without
  sequential)."""
  m = ptq.method
  names = [s.strip() for s in m.replace('+', ',').split(',')] if isinstance(m, str) else list(m)
  if not names or any(not n for n in names):
    raise ValueError(f'config.ptq.method={m!r}: give one method or several separated by commas')
  out = []
  for n in names:
    try:
      registry.get(n)
      given = ptq[n].to_dict() if n in ptq and isinstance(ptq[n], ml_collections.ConfigDict) else {}
      out.append((n, registry.params(n, given)))
    except ValueError as e:  # a parameter's value ('<method>.<key> must ...') or the method and its names
      raise ValueError(f'config.ptq.{e}' if str(e).startswith(f'{n}.') else f'config.ptq.method: {e}') from None
  try:
    pipeline.check_order(names)
  except ValueError as e:
    raise ValueError(f'config.ptq.method={m!r}: {e}') from None
  if ptq.get('sequential', False) and names == ['rtn']:
    raise ValueError("config.ptq.sequential=True has no effect with config.ptq.method='rtn' (round-to-nearest reads "
                     "no calibration inputs of its own); give a method that does, e.g. 'gptq', or drop it")
  if 'bias_correction' in names and dict(out)['bias_correction']['empirical'] and not ptq.get('sequential', False):
    raise ValueError('config.ptq.bias_correction.empirical=True has no effect without config.ptq.sequential=True '
                     "(each layer's inputs are then the float model's, and the empirical correction is the analytic "
                     'one); set config.ptq.sequential=True, or drop it')
  return out


def unused(config, keys) -> str | None:
  """A warning when `keys` (command-line overrides) set config.ptq options that a run of another mode ignores."""
  keys = [k for k in keys if k.startswith('ptq.')]
  if not keys or config.get('mode') == 'ptq':
    return None
  return (f'config.{keys[0]} has no effect: config.mode={config.mode!r}; the PTQ methods run with '
          '--config.mode=ptq')


def active(config) -> bool:
  return config.mode == 'ptq' and [n for n, _ in methods(config.ptq)] != ['rtn']


def prepares(config) -> bool:
  """Whether a PTQ run changes the float model before quantizing it (BatchNorm folding, equalization)."""
  return config.mode == 'ptq' and 'ptq' in config and (config.ptq.get('fold_batchnorm', False)
                                                       or config.ptq.get('equalize', False))


# ----------------------------------------------------------------------------------------------- targets
