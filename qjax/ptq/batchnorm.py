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

Finding the pairs (`pairs_linen`, `pairs_nnx`): the model runs once abstractly (jax.eval_shape), and a BatchNorm
pairs with a layer when its input is the very array the layer returned in that call. Flax's own layers only
(`LAYERS`: their output is x W (+ b) with the features last), called once each, and a BatchNorm over the last
axis that normalises with its running averages in that call. A layer output that something else also reads (a
residual from the conv's raw output) is invisible to module calls, so `fold_linen` / `fold_nnx` run the model on
the given inputs before and after and keep only the folds that leave its output unchanged (relative L2 error
at most `tol`: by default 1e-4, or 3e-2 where a folded kernel or the output is a 16-bit float, whose rounding
alone moves the output by about 1e-3); the others are listed in `Folding.skipped` with the reason.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Flax layers whose __call__ returns x W (+ b) with the output features on the last axis of both the result and
# the kernel (DenseGeneral / LinearGeneral with one output axis: checked on the shapes).
LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose,
          nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose)
NORMS = (nn.BatchNorm, nnx.BatchNorm)


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


class _Recorder:
  """Module calls as they happen: layer outputs by identity, BatchNorm inputs, call counts per path."""

  def __init__(self):
    self.layers, self.norms, self.calls = [], [], {}

  def layer(self, path, module, x, out):
    self.calls[path] = self.calls.get(path, 0) + 1
    self.layers.append((path, module, x, out))

  def norm(self, path, module, x, use_running_average):
    self.calls[path] = self.calls.get(path, 0) + 1
    self.norms.append((path, module, x, use_running_average))

  def pairs(self) -> tuple[list[Pair], dict[str, str]]:
    src = {path: next((p for p, _, _, out in self.layers if out is x), None) for path, _, x, _ in self.norms}
    feeds = {}  # layer path -> the BatchNorms its output feeds
    for path, s in src.items():
      if s is not None:
        feeds.setdefault(s, []).append(path)
    pairs, skipped = [], {}
    for path, module, x, ura in self.norms:
      s = src[path]
      why = ('its input is not the output of a Flax Dense or Conv layer' if s is None else
             f'{s} is called {self.calls[s]} times' if self.calls[s] > 1 else
             f'it is called {self.calls[path]} times' if self.calls[path] > 1 else
             f'{s}\'s output also feeds {", ".join(n for n in feeds[s] if n != path)}' if len(feeds[s]) > 1 else
             _norm_why(module, x, ura))
      if why:
        skipped[path] = why
      else:
        pairs.append(Pair(s, path, float(module.epsilon)))
    return pairs, skipped


def _path(parts) -> str:
  return '/'.join(str(p) for p in parts)


def pairs_linen(module: nn.Module, variables, *args, **kwargs) -> tuple[list[Pair], dict[str, str]]:
  """([Pair], {norm path: why not}) of a Linen module applied as module.apply(variables, *args, **kwargs)
  (traced, not run)."""
  return record_linen(module, variables, *args, **kwargs).pairs()


def record_linen(module: nn.Module, variables, *args, **kwargs) -> _Recorder:
  """The Flax layers' and BatchNorms' calls of module.apply(variables, *args, **kwargs), traced."""
  rec = _Recorder()

  def interceptor(next_fun, a, k, context):
    m = context.module
    if context.method_name != '__call__' or not a:
      return next_fun(*a, **k)
    if type(m) in NORMS:
      ura = k.get('use_running_average', a[1] if len(a) > 1 else None)
      rec.norm(_path(m.path), m, a[0], ura)
    out = next_fun(*a, **k)
    if type(m) in LAYERS:
      rec.layer(_path(m.path), m, a[0], out)
    return out

  def run(v, *a):
    with nn.intercept_methods(interceptor):
      return module.apply(v, *a, **{'mutable': True, **kwargs})  # training mode updates statistics
  jax.eval_shape(run, variables, *args)
  return rec


_RECORDING: dict[type, type] = {}


def _recording_class(base: type, rec_of) -> type:
  if base not in _RECORDING:
    def call(self, *a, **k):
      rec = rec_of()
      if rec is not None and base in NORMS and a:
        rec.norm(self._fold_path, self, a[0], k.get('use_running_average', a[1] if len(a) > 1 else None))
      out = base.__call__(self, *a, **k)
      if rec is not None and base in LAYERS and a:
        rec.layer(self._fold_path, self, a[0], out)
      return out
    _RECORDING[base] = type(base.__name__, (base,), {'__call__': call, '__module__': base.__module__,
                                                     '__qualname__': base.__qualname__})
  return _RECORDING[base]


_ACTIVE: list = []  # the recorder of the pairs_nnx call in progress


def pairs_nnx(model: nnx.Module, *args, **kwargs) -> tuple[list[Pair], dict[str, str]]:
  """([Pair], {norm path: why not}) of an NNX model called as model(*args, **kwargs) (traced, not run; put it in
  evaluation mode first: model.eval())."""
  return record_nnx(model, *args, **kwargs).pairs()


def record_nnx(model: nnx.Module, *args, **kwargs) -> _Recorder:
  """The Flax layers' and BatchNorms' calls of model(*args, **kwargs), traced on a copy."""
  rec = _Recorder()
  swapped = []
  for p, m in nnx.iter_modules(model):
    if type(m) in LAYERS + NORMS:
      swapped.append((m, type(m)))
      object.__setattr__(m, '_fold_path', _path(p))
      m.__class__ = _recording_class(type(m), lambda: _ACTIVE[-1] if _ACTIVE else None)
  _ACTIVE.append(rec)
  try:
    nnx.eval_shape(lambda m, *a: m(*a, **kwargs), model, *args)  # on a copy: training mode updates statistics
  finally:
    _ACTIVE.pop()
    for m, cls in swapped:
      m.__class__ = cls
      object.__delattr__(m, '_fold_path')
  return rec


# ------------------------------------------------------------------------------------------------- folding

# Where each array of a pair lives: (which module, variable name); Linen keeps mean and var in 'batch_stats'.
_SLOTS = (('layer', 'kernel'), ('layer', 'bias'), ('norm', 'scale'), ('norm', 'bias'), ('norm', 'mean'),
          ('norm', 'var'))


def _rel_error(y, y0) -> float:
  """||y - y0|| / ||y0|| over the floating leaves of two model outputs."""
  num = den = 0.0
  for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(y0), strict=True):
    if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      num, den = num + float(np.sum((a - b) ** 2)), den + float(np.sum(b ** 2))
  return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _default_tol(arrays, y) -> float:
  """1e-4, or 3e-2 where a kernel or an output leaf is a float of fewer than 32 bits (module docstring)."""
  dtypes = [np.asarray(a).dtype for a in arrays] + [jnp.asarray(b).dtype for b in jax.tree.leaves(y)]
  narrow = any(jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits < 32 for d in dtypes)
  return 3e-2 if narrow else 1e-4


class Access(NamedTuple):
  """A model's variables as get(path, name) -> array or None, put(path, name, array), forward() -> output."""
  get: Any
  put: Any
  forward: Any


def checked(candidates, changes, access: Access, why, tol: float | None):
  """(kept, {candidate: why not}, rel_error): the candidates whose changes leave the model's output within `tol`
  (relative L2; None: `_default_tol`). changes(subset) -> {(path, name): new array} for a list of candidates,
  computed from the arrays access.get gives (always the unchanged model's when it is called);
  each is tried with all the others first, then alone where the whole set fails; why(candidate, err, tol) says
  why one is dropped. The model is left with the kept candidates' changes."""
  touched = {k for c in candidates for k in changes([c])}
  original = {k: access.get(*k) for k in touched}

  def use(subset):
    for k, old in original.items():  # changes() reads the model's arrays: from the unchanged model
      access.put(*k, old)
    new = changes(subset)
    for k, a in new.items():
      access.put(*k, a)
    return access.forward()

  if not candidates:
    return [], {}, 0.0
  y0 = access.forward()
  tol = _default_tol([original[k] for k in touched if k[1] == 'kernel'], y0) if tol is None else tol
  kept, skipped = list(candidates), {}
  err = _rel_error(use(kept), y0)
  if err > tol:  # find which candidates change the model
    alone = {c: _rel_error(use([c]), y0) for c in candidates}
    skipped = {c: why(c, e, tol) for c, e in alone.items() if e > tol}
    kept = [c for c in candidates if alone[c] <= tol]
    err = _rel_error(use(kept), y0) if kept else 0.0
    if err > tol:
      skipped.update({c: f'together the changes moved the model\'s output by {err:.2g} (relative); none kept'
                      for c in kept})
      kept, err = [], 0.0
    if not kept:
      use([])
  return kept, skipped, err


def _fold_checked(pairs, skipped, access: Access, tol: float | None) -> Folding:
  """Folds `pairs`, keeping the folds that leave the model's output within `tol` (`checked`)."""
  skipped = dict(skipped)
  folded = {}
  for p in pairs:
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
  kept, dropped, err = checked(list(folded), changes, access, why, tol)
  skipped.update({p.norm: w for p, w in dropped.items()})
  return Folding({p.norm: p.layer for p in kept}, dict(sorted(skipped.items())), err)


def _node(tree, path: str):
  for k in path.split('/') if path else ():
    tree = tree[k]
  return tree


def _plain(tree):
  return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, 'items') else tree


def linen_access(module: nn.Module, variables, *args, **kwargs) -> tuple[dict, Access]:
  """(a copy of `variables` as plain dicts, its Access): module.apply(copy, *args, **kwargs) as forward."""
  new = jax.tree.map(lambda a: a, _plain(variables))
  coll = lambda name: 'batch_stats' if name in ('mean', 'var') else 'params'

  def get(path, name):
    node = _node(new.get(coll(name), {}), path)
    return None if name not in node else np.asarray(node[name])

  def put(path, name, a):
    node = _node(new[coll(name)], path)
    node[name] = jnp.asarray(a, node[name].dtype)

  run = jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))
  return new, Access(get, put, lambda: run(new, *args))


def nnx_access(model: nnx.Module, *args, **kwargs) -> Access:
  """The model's own variables (put changes them in place); model(*args, **kwargs) as forward."""
  modules = {_path(p): m for p, m in nnx.iter_modules(model)}

  def get(path, name):
    v = getattr(modules[path], name, None)
    return np.asarray(v.get_value()) if isinstance(v, nnx.Variable) and v.get_value() is not None else None

  def put(path, name, a):
    v = getattr(modules[path], name)
    v.set_value(jnp.asarray(a, v.get_value().dtype))

  graphdef, _ = nnx.split(model)
  run = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))
  return Access(get, put, lambda: run(nnx.state(model), *args))


def fold_linen(module: nn.Module, variables, *args, tol: float | None = None, **kwargs):
  """(variables with every foldable BatchNorm folded into its layer, Folding) of a Linen module applied as
  module.apply(variables, *args, **kwargs) in evaluation mode; `args` are the inputs the folds are checked on
  (arrays: a batch or a few examples; flags such as train=False go in kwargs, which are not traced). The given
  variables are not changed."""
  pairs, skipped = pairs_linen(module, variables, *args, **kwargs)
  new, access = linen_access(module, variables, *args, **kwargs)
  return new, _fold_checked(pairs, skipped, access, tol)


def fold_nnx(model: nnx.Module, *args, tol: float | None = None, **kwargs) -> Folding:
  """Folds every foldable BatchNorm of an NNX model (in evaluation mode: model.eval()) into its layer, in place;
  `args` (and kwargs) are a call's inputs, on which the folds are checked."""
  pairs, skipped = pairs_nnx(model, *args, **kwargs)
  return _fold_checked(pairs, skipped, nnx_access(model, *args, **kwargs), tol)
