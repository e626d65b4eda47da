"""Which Flax layers a model calls, and changes to their variables kept only where the model's output stays put.

The transforms of a float model before PTQ (qjax.ptq.batchnorm, qjax.ptq.equalization) need two things that a
module tree does not say: which layer's output a BatchNorm or the next layer reads, and whether what lies between
them is what the transform assumes. The first comes from one traced call of the model (`record_linen`,
`record_nnx`): each Flax layer's and BatchNorm's call with its input and output arrays, which later calls can be
matched to by identity (a BatchNorm whose input *is* a conv's output reads nothing else). The second is checked
(`checked`): the model runs before and after a change, on inputs the caller gives, and a change that moves the
output beyond a tolerance is undone, alone if the others hold. The tolerance is on the relative L2 change of the
output: by default 1e-4, or 3e-2 where a changed kernel or the output is a 16-bit float, whose rounding alone
moves the output by about 1e-3.
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


class Calls:
  """Module calls in call order: layers (path, module, input, output), BatchNorms (path, module, input, the call's
  use_running_average), and how often each path was called."""

  def __init__(self):
    self.layers, self.norms, self.calls = [], [], {}

  def layer(self, path, module, x, out):
    self.calls[path] = self.calls.get(path, 0) + 1
    self.layers.append((path, module, x, out))

  def norm(self, path, module, x, use_running_average):
    self.calls[path] = self.calls.get(path, 0) + 1
    self.norms.append((path, module, x, use_running_average))

  def source(self, x) -> str | None:
    """The path of the layer whose output is the array x itself, or None."""
    return next((p for p, _, _, out in self.layers if out is x), None)


def _path(parts) -> str:
  return '/'.join(str(p) for p in parts)


def record_linen(module: nn.Module, variables, *args, **kwargs) -> Calls:
  """The Flax layers' and BatchNorms' calls of module.apply(variables, *args, **kwargs), traced."""
  rec = Calls()

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
_ACTIVE: list = []  # the Calls of the record_nnx call in progress


def _recording_class(base: type) -> type:
  """base with a __call__ that reports to the active Calls (NNX modules: no interceptor to hook into)."""
  if base not in _RECORDING:
    def call(self, *a, **k):
      rec = _ACTIVE[-1] if _ACTIVE else None
      if rec is not None and base in NORMS and a:
        rec.norm(self._qjax_call_path, self, a[0], k.get('use_running_average', a[1] if len(a) > 1 else None))
      out = base.__call__(self, *a, **k)
      if rec is not None and base in LAYERS and a:
        rec.layer(self._qjax_call_path, self, a[0], out)
      return out
    _RECORDING[base] = type(base.__name__, (base,), {'__call__': call, '__module__': base.__module__,
                                                     '__qualname__': base.__qualname__})
  return _RECORDING[base]


def record_nnx(model: nnx.Module, *args, **kwargs) -> Calls:
  """The Flax layers' and BatchNorms' calls of model(*args, **kwargs), traced on a copy."""
  rec = Calls()
  swapped = []
  for p, m in nnx.iter_modules(model):
    if type(m) in LAYERS + NORMS:
      swapped.append((m, type(m)))
      object.__setattr__(m, '_qjax_call_path', _path(p))
      m.__class__ = _recording_class(type(m))
  _ACTIVE.append(rec)
  try:
    nnx.eval_shape(lambda m, *a: m(*a, **kwargs), model, *args)  # on a copy: training mode updates statistics
  finally:
    _ACTIVE.pop()
    for m, cls in swapped:
      m.__class__ = cls
      object.__delattr__(m, '_qjax_call_path')
  return rec


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
