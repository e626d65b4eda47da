"""BatchNorm folding: an evaluation-mode BatchNorm merged into the Dense or Conv whose output it normalises, so
that post-training quantization rounds the weights a deployed model multiplies by (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", sec. 3.2; Nagel et al. 2021, "A
White Paper on Neural Network Quantization", sec. 2.3.1).

With y = x W + b the layer's output and the BatchNorm over y's last axis, using its running statistics,

    BN(y) = (y - mean) * s + beta,      s = gamma / sqrt(var + eps)            (per output feature)
          = x (W * s) + (b * s + beta - mean * s)

so the layer gets W' = W * s over its output axis (the kernel's last) and b' = b * s, and the BatchNorm keeps
only its shift: gamma' = 1, mean' = 0, var' = 1 - eps, beta' = beta - mean * s. var' is chosen so that
var' + eps == 1 exactly in float32, where rsqrt is exactly 1: the folded BatchNorm computes y' * 1 + beta'.
(A BatchNorm without a bias hands its shift to the layer's bias instead; a pair where neither has one is not
folded.) Invariant: the model computes the same function, up to float rounding.

What changes is what quantization sees. Per-channel weight scales absorb s exactly, so folding alone changes
per-channel round-to-nearest only by float rounding; per-tensor weights get one grid for features whose ranges
s spreads apart, which costs accuracy at low bit-widths (the white paper's reason for per-channel weights).

Finding the pairs (`pairs_linen`, `pairs_nnx`): the model runs once abstractly (qjax.ptq.calls), and a BatchNorm
pairs with a layer when its input is the very array the layer returned in that call. Flax's own layers only
(`calls.LAYERS`: their output is x W (+ b) with the features last), called once each, and a BatchNorm over the last
axis that normalises with its running averages in that call. A layer output that something else also reads (a
residual from the conv's raw output) is invisible to module calls, so `fold_linen` / `fold_nnx` run the model on
the given inputs before and after and keep only the folds that leave its output unchanged (`calls.checked`);
the others are listed in `Folding.skipped` with the reason.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import numpy as np
from flax import nnx

from qjax.ptq import calls


class Pair(NamedTuple):
  """A BatchNorm at module path `norm` that normalises the output of the layer at `layer`."""
  layer: str
  norm: str
  epsilon: float


class Folding(NamedTuple):
  """What a fold did: folded {norm path: layer path}; skipped {norm path: why not}; rel_error: the relative L2
  change of the model's output on the checked inputs with the kept folds (0.0 when none were kept)."""
  folded: dict
  skipped: dict
  rel_error: float = 0.0


class Folded(NamedTuple):
  """The arrays of one folded pair, in the shapes given: the layer's kernel and bias, the BatchNorm's scale, bias,
  mean and var (None where the module has no such variable)."""
  kernel: Any
  bias: Any
  scale: Any
  offset: Any
  mean: Any
  var: Any


def identity_var(epsilon: float, dtype=np.float32) -> np.floating:
  """The var' with var' + eps == 1 exactly in `dtype` (1 - eps, nudged by one ulp where rounding misses)."""
  one, eps = dtype(1), dtype(epsilon)
  v = dtype(one - eps)
  for _ in range(4):
    total = dtype(v + eps)
    if total == one:
      return v
    v = np.nextafter(v, dtype(-np.inf) if total > one else dtype(np.inf))
  raise ValueError(f'no float {np.dtype(dtype).name} var has var + {epsilon} == 1')


def fold(kernel, bias, scale, offset, mean, var, epsilon: float) -> Folded:
  """The folded arrays (module docstring): kernel (..., C), bias (C,) or None; the BatchNorm's scale and offset
  (gamma, beta: (C,) or None) and running mean and var (C,). Computed in float64, returned in each input's dtype.
  ValueError when neither the layer nor the BatchNorm has a bias to hold the shift beta - mean * s."""
  f = lambda a: None if a is None else np.asarray(a, np.float64)
  w, b, g, beta, mu, v = map(f, (kernel, bias, scale, offset, mean, var))
  c = w.shape[-1]
  if mu.shape != (c,) or v.shape != (c,):
    raise ValueError(f'BatchNorm statistics of shape {mu.shape} do not match the kernel {w.shape}\'s {c} outputs')
  s = (1.0 if g is None else g) / np.sqrt(v + float(np.float32(epsilon)))       # (C,)
  shift = (0.0 if beta is None else beta) - mu * s                             # (C,)
  if offset is None and bias is None:
    raise ValueError('neither the layer nor the BatchNorm has a bias to hold the shift beta - mean * s')
  new_b = None if bias is None else b * s + (shift if offset is None else 0.0)
  like = lambda new, old: None if old is None else np.asarray(new, np.asarray(old).dtype)
  vdtype = np.asarray(var).dtype.type
  return Folded(kernel=like(w * s, kernel), bias=like(new_b, bias),
                scale=like(np.ones(c), scale), offset=like(shift, offset),
                mean=like(np.zeros(c), mean), var=np.full(c, identity_var(epsilon, vdtype), vdtype))


# --------------------------------------------------------------------------------------------- finding pairs


def _norm_why(module, x, use_running_average) -> str:
  """Why a BatchNorm call cannot be folded ('' when it can): it must normalise the last axis alone, with its
  running averages."""
  ura = use_running_average if use_running_average is not None else module.use_running_average
  if not ura:
    return 'it normalises with batch statistics in this call (only evaluation mode folds)'
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  if tuple(a % x.ndim for a in axes) != (x.ndim - 1,):
    return f'it normalises axis {module.axis}, not the last'
  return ''


def pairs(rec: calls.Calls) -> tuple[list[Pair], dict[str, str]]:
  """([Pair], {norm path: why not}) of a recording (calls.record_linen / record_nnx)."""
  src = {path: rec.source(x) for path, _, x, _ in rec.norms}
  feeds = {}  # layer path -> the BatchNorms its output feeds
  for path, s in src.items():
    if s is not None:
      feeds.setdefault(s, []).append(path)
  pairs_, skipped = [], {}
  for path, module, x, ura in rec.norms:
    s = src[path]
    why = ('its input is not the output of a Flax Dense or Conv layer' if s is None else
           f'{s} is called {rec.calls[s]} times' if rec.calls[s] > 1 else
           f'it is called {rec.calls[path]} times' if rec.calls[path] > 1 else
           f'{s}\'s output also feeds {", ".join(n for n in feeds[s] if n != path)}' if len(feeds[s]) > 1 else
           _norm_why(module, x, ura))
    if why:
      skipped[path] = why
    else:
      pairs_.append(Pair(s, path, float(module.epsilon)))
  return pairs_, skipped


def pairs_linen(module: nn.Module, variables, *args, **kwargs) -> tuple[list[Pair], dict[str, str]]:
  """([Pair], {norm path: why not}) of a Linen module applied as module.apply(variables, *args, **kwargs)
  (traced, not run)."""
  return pairs(calls.record_linen(module, variables, *args, **kwargs))


def pairs_nnx(model: nnx.Module, *args, **kwargs) -> tuple[list[Pair], dict[str, str]]:
  """([Pair], {norm path: why not}) of an NNX model called as model(*args, **kwargs) (traced, not run; put it in
  evaluation mode first: model.eval())."""
  return pairs(calls.record_nnx(model, *args, **kwargs))


# ------------------------------------------------------------------------------------------------- folding

# Where each array of a pair lives: (which module, variable name); Linen keeps mean and var in 'batch_stats'.
_SLOTS = (('layer', 'kernel'), ('layer', 'bias'), ('norm', 'scale'), ('norm', 'bias'), ('norm', 'mean'),
          ('norm', 'var'))


def _fold_checked(found, skipped, access: calls.Access, tol: float | None) -> Folding:
  """Folds the pairs `found`, keeping the folds that leave the model's output within `tol` (`calls.checked`)."""
  skipped = dict(skipped)
  folded = {}
  for p in found:
    try:
      folded[p] = fold(*(access.get(getattr(p, who), name) for who, name in _SLOTS), p.epsilon)
    except ValueError as e:
      skipped[p.norm] = str(e)

  def changes(subset):
    return {(getattr(p, who), name): a for p in subset
            for (who, name), a in zip(_SLOTS, folded[p], strict=True) if a is not None}

  def why(p, e, tol):
    return (f'folding it changed the model\'s output by {e:.2g} (relative, above tol={tol:.2g}): {p.layer}\'s '
            'output is also read besides the BatchNorm, or the model rounds more coarsely than tol allows')
  kept, dropped, err = calls.checked(list(folded), changes, access, why, tol)
  skipped.update({p.norm: w for p, w in dropped.items()})
  return Folding({p.norm: p.layer for p in kept}, dict(sorted(skipped.items())), err)


def fold_linen(module: nn.Module, variables, *args, tol: float | None = None, **kwargs):
  """(variables with every foldable BatchNorm folded into its layer, Folding) of a Linen module applied as
  module.apply(variables, *args, **kwargs) in evaluation mode; `args` are the inputs the folds are checked on
  (arrays: a batch or a few examples; flags such as train=False go in kwargs, which are not traced). The given
  variables are not changed."""
  found, skipped = pairs_linen(module, variables, *args, **kwargs)
  new, access = calls.linen_access(module, variables, *args, **kwargs)
  return new, _fold_checked(found, skipped, access, tol)


def fold_nnx(model: nnx.Module, *args, tol: float | None = None, **kwargs) -> Folding:
  """Folds every foldable BatchNorm of an NNX model (in evaluation mode: model.eval()) into its layer, in place;
  `args` (and kwargs) are a call's inputs, on which the folds are checked."""
  found, skipped = pairs_nnx(model, *args, **kwargs)
  return _fold_checked(found, skipped, calls.nnx_access(model, *args, **kwargs), tol)
