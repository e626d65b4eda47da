"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", sec. 4.1): rescale the channels between two consecutive layers so that each channel's weight range
is the same in both, which a per-tensor weight grid then resolves evenly. Data-free: the scales come from the
weights alone (only the check below runs the model).

Layer a's output channel c feeds layer b's input channel c through a positively homogeneous function f
(ReLU, max or average pooling, or nothing), f(y / s) = f(y) / s for s > 0. So for any s_c > 0

    W_a[..., c] / s_c,  b_a[c] / s_c,   W_b[..., c, :] * s_c          (a's output axis last, b's input axis -2)

computes the same function. With r_a[c] = max |W_a[..., c]| and r_b[c] = max |W_b[..., c, :]|, the choice

    s_c = sqrt(r_a[c] / r_b[c])          gives both layers the range sqrt(r_a[c] r_b[c]) in channel c,

which maximises the sum over channels of the product of their precisions r[c] / max_c r (the paper's eq. 9;
`precision` reports the mean of each kernel's, over its output channels, before and after). A layer in a chain
(a -> b -> c) is rescaled on both sides, so the pairs are equalized in turn until the scales stop moving (`iters`
sweeps at most).
When a's BatchNorm has been folded (qjax.ptq.batchnorm: it keeps only a shift beta'), that shift is divided by
s_c too; a BatchNorm that still normalises a's output (not folded) is in the way, and the pair is skipped.

Which layers pair: consecutive Flax Dense / Conv calls (qjax.ptq.calls' recording), each called
once, where b reads as many channels (its input's and its kernel's axis -2; no feature groups) as a writes, or
is a Dense reading a's map flattened (K = k C rows, the channels fastest as NHWC flattens them: row i reads
channel i mod C, so its scale is s[i mod C]).
Whether f in between is positively homogeneous, and whether a's output reaches b alone (a residual that adds it
elsewhere breaks the invariance), is not visible from module calls: as with folding, each pair is checked by
running the model before and after (`calls.checked`), and the pairs that change its output are left out.
The check is on the inputs given, not a proof: an op that is nearly linear on them (a GELU whose inputs are far
from 0) passes it.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import numpy as np
from flax import nnx

from qjax.ptq import batchnorm as bn
from qjax.ptq import calls


class Link(NamedTuple):
  """Layer `a`'s output channels feed layer `b`'s input channels; `norm`: a folded BatchNorm on a's output (its
  shift is rescaled with a), or ''."""
  a: str
  b: str
  norm: str = ''


class Equalization(NamedTuple):
  """equalized: ['a -> b'] of the kept pairs; skipped {'a -> b': why not}; rel_error: the change of the model's
  output on the checked inputs; precision: {layer: (before, after)} of each equalized layer's `precision`."""
  equalized: list
  skipped: dict
  rel_error: float = 0.0
  precision: dict = {}


def _name(link: Link) -> str:
  return f'{link.a} -> {link.b}'


def scales(w_a, w_b) -> np.ndarray:
  """s (C,): sqrt(r_a / r_b) per channel for a's kernel (..., C) and b's kernel (..., C, out); 1 where a range
  is 0 (a dead channel: nothing to balance)."""
  r_a = np.max(np.abs(w_a.reshape(-1, w_a.shape[-1])), axis=0)
  r_b = np.max(np.abs(np.moveaxis(w_b, -2, -1).reshape(-1, w_b.shape[-2])), axis=0)
  ok = (r_a > 0) & (r_b > 0)
  return np.where(ok, np.sqrt(np.where(ok, r_a, 1.0) / np.where(ok, r_b, 1.0)), 1.0)


def _by_channel(w_b, c: int):
  """b's kernel as (..., C, out): as it is, or, for a Dense kernel whose K = k C rows read a map of C channels
  flattened with the channels fastest (NHWC), as (k, C, out)."""
  return w_b if w_b.shape[-2] == c else w_b.reshape(-1, c, w_b.shape[-1])


def _identity_norm(get, path: str, eps: float) -> bool:
  """Whether the BatchNorm at `path` is folded (qjax.ptq.batchnorm.fold): scale 1 (or none), mean 0,
  var + eps == 1."""
  scale, mean, var = get(path, 'scale'), get(path, 'mean'), get(path, 'var')
  one = np.asarray(var, np.float32) + np.float32(eps)
  return (scale is None or bool(np.all(scale == 1))) and bool(np.all(mean == 0)) and bool(np.all(one == 1))


def links(rec, get) -> tuple[list[Link], dict[str, str]]:
  """([Link], {'a -> b': why not}) from a recording (calls.record_linen / record_nnx)."""
  pairs, _ = bn.pairs(rec)
  norm_of = {p.layer: p for p in pairs}
  fed = {}  # layer path -> the BatchNorms reading its output, paired or not
  for path, _, x, _ in rec.norms:
    src = rec.source(x)
    if src is not None:
      fed.setdefault(src, []).append(path)
  out, skipped = [], {}
  layers = rec.layers
  for (pa, _, _, ya), (pb, mb, xb, _) in zip(layers, layers[1:], strict=False):
    link = Link(pa, pb, norm_of[pa].norm if pa in norm_of else '')
    wa, wb = get(pa, 'kernel'), get(pb, 'kernel')
    c = ya.shape[-1]
    why = (f'{pa} is called {rec.calls[pa]} times' if rec.calls[pa] > 1 else
           f'{pb} is called {rec.calls[pb]} times' if rec.calls[pb] > 1 else
           f'{pb} has feature groups' if getattr(mb, 'feature_group_count', 1) != 1 else
           f'{pb} has a {wb.ndim}-D kernel with its input channels not on axis -2'
           if wb.ndim < 2 or (wb.ndim > 2 and not isinstance(mb, (nn.Conv, nnx.Conv))) else
           f'{pa} writes {c} channels, {pb} reads {xb.shape[-1]}' if wa.shape[-1] != c or not (
               (xb.shape[-1] == c and wb.shape[-2] == c) or (wb.ndim == 2 and xb.shape[-1] == wb.shape[0]
                                                            and wb.shape[0] % c == 0)) else '')
    if not why and pa in fed and (pa not in norm_of or not _identity_norm(get, norm_of[pa].norm,
                                                                          norm_of[pa].epsilon)):
      why = f'a BatchNorm normalises {pa}\'s output ({", ".join(fed[pa])}): fold it first'
    if why:
      skipped[_name(link)] = why
    else:
      out.append(link)
  return out, skipped


def precision(w) -> float:
  """The mean over a kernel's output channels (last axis) of max |w[..., c]| / max |w|: the fraction of a
  per-tensor grid that an average channel uses (the paper's per-channel precision, averaged)."""
  r = np.max(np.abs(np.asarray(w, np.float64).reshape(-1, w.shape[-1])), axis=0)
  return float(np.mean(r) / max(float(np.max(r)), 1e-300))


def _equalize(links_, get, iters: int, sweeps_tol: float = 1e-7) -> dict:
  """{(path, name): array} after equalizing `links_` in turn, from the arrays get() gives, until no scale moves
  more than sweeps_tol (relative) or `iters` sweeps."""
  arrays = {}
  val = lambda path, name: arrays[(path, name)] if (path, name) in arrays else get(path, name)
  for _ in range(iters):
    moved = 0.0
    for lk in links_:
      w_a, w_b = (np.asarray(val(lk.a, 'kernel'), np.float64), np.asarray(val(lk.b, 'kernel'), np.float64))
      w_bc = _by_channel(w_b, w_a.shape[-1])                                     # (..., C, out)
      s = scales(w_a, w_bc)                                                      # (C,)
      moved = max(moved, float(np.max(np.abs(s - 1.0))))
      arrays[(lk.a, 'kernel')] = w_a / s
      arrays[(lk.b, 'kernel')] = (w_bc * s[:, None]).reshape(w_b.shape)
      for path, name in ((lk.a, 'bias'), (lk.norm, 'bias')):
        if path and val(path, name) is not None:
          arrays[(path, name)] = np.asarray(val(path, name), np.float64) / s
    if moved <= sweeps_tol:
      break
  return arrays


def _run(rec, access: calls.Access, iters: int, tol: float | None) -> Equalization:
  candidates, skipped = links(rec, access.get)
  layers = list(dict.fromkeys(p for lk in candidates for p in (lk.a, lk.b)))
  precisions = lambda: {p: precision(access.get(p, 'kernel')) for p in layers}
  before = precisions()

  def why(link, e, tol):
    return (f'equalizing it changed the model\'s output by {e:.2g} (relative, above tol={tol:.2g}): what lies '
            f'between {link.a} and {link.b} is not positively homogeneous, or {link.a}\'s output is read elsewhere')
  kept, dropped, err = calls.checked(candidates, lambda subset: _equalize(subset, access.get, iters), access, why, tol)
  after = precisions()
  skipped.update({_name(lk): w for lk, w in dropped.items()})
  changed = dict.fromkeys(p for lk in kept for p in (lk.a, lk.b))
  return Equalization([_name(lk) for lk in kept], dict(sorted(skipped.items())), err,
                      {p: (before[p], after[p]) for p in changed})


def equalize_linen(module: nn.Module, variables, *args, iters: int = 100, tol: float | None = None, **kwargs):
  """(variables with consecutive layers equalized, Equalization) of a Linen module applied as
  module.apply(variables, *args, **kwargs) in evaluation mode; `args`: inputs the changes are checked on. The
  given variables are not changed. Fold BatchNorms first (qjax.ptq.batchnorm.fold_linen)."""
  rec = calls.record_linen(module, variables, *args, **kwargs)
  new, access = calls.linen_access(module, variables, *args, **kwargs)
  return new, _run(rec, access, iters, tol)


def equalize_nnx(model: nnx.Module, *args, iters: int = 100, tol: float | None = None, **kwargs) -> Equalization:
  """Equalizes consecutive layers of an NNX model (in evaluation mode) in place; `args`: a call's inputs, on
  which the changes are checked. Fold BatchNorms first (qjax.ptq.batchnorm.fold_nnx)."""
  rec = calls.record_nnx(model, *args, **kwargs)
  return _run(rec, calls.nnx_access(model, *args, **kwargs), iters, tol)
