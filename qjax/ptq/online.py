"""The online ops of PTQ layers, on unmodified Flax models: an input transform and an output shift.

    x -> (x @ rotation) / scale          before the layer's own op, in float (rotations, SmoothQuant, AWQ)
    y -> y + shift                       after it (bias correction of a layer that has no bias of its own)

An `Online(rotation, scale, shift)` per module path, any of them None. Linen: `OnlineOps(model, ops)` wraps a
Linen module (init / apply as the module's own) and, through Flax's `nn.intercept_methods`, rewrites the first
argument and the result of `__call__` of the modules at the given paths. NNX: `install_nnx(model, ops)` gives
those modules a subclass whose `__call__` does the same, with the rotation, scale and shift held as
`OnlineInput` variables (so jit, checkpoints and nnx.split see them). The matmul of the rotation calls
`jax.lax.dot_general` from inside qjax (not from a module), so qjax's interception runs it as the plain float op
it is. (The PTQ methods' calibration data come from qjax.flax.capture, not from here.)

The output shift is added to what the module's `__call__` returns, so it is the op's output shift only for a
module whose output is its op's output (plus its bias, when it has one): Flax's own layers, `PLAIN_LAYERS`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

# Flax layers whose __call__ returns op(x, kernel) (+ bias) with the kernel's output axes last, so an output shift
# shaped like those axes is one of the op. (Not Einsum: its equation places the output axes anywhere.) Names as
# qjax.flax.capture's OpSite.module_type.
PLAIN_LAYERS = frozenset({
    'flax.linen.linear.Dense', 'flax.linen.linear.DenseGeneral', 'flax.linen.linear.Conv',
    'flax.nnx.nn.linear.Linear', 'flax.nnx.nn.linear.LinearGeneral', 'flax.nnx.nn.linear.Conv'})


class Online(NamedTuple):
  """A module's online ops: ((x @ rotation) / scale) in, y + shift out; None where absent. rotation (in, in),
  scale (in,), shift: the output's trailing shape (out,) or (heads, head_dim)."""
  rotation: object = None
  scale: object = None
  shift: object = None


def transform_input(x, rotation=None, scale=None):
  """(x @ rotation) / scale over the last axis of x, in x's dtype."""
  if rotation is not None:
    r = jnp.asarray(rotation, x.dtype)
    x = jax.lax.dot_general(x, r, (((x.ndim - 1,), (0,)), ((), ())))
  if scale is not None:
    x = x * (1.0 / jnp.asarray(scale, jnp.float32)).astype(x.dtype)
  return x


def shift_output(y, shift=None):
  """y + shift over y's trailing axes, in y's dtype."""
  return y if shift is None else y + jnp.asarray(shift, y.dtype)


class OnlineOps:
  """A Linen module whose modules at `ops`' paths apply their online ops ({path: Online, or a (rotation,
  scale[, shift]) tuple})."""

  def __init__(self, model: nn.Module, ops=None):
    self.model, self.ops = model, {p: Online(*t) for p, t in dict(ops or {}).items()}

  def __getattr__(self, name):
    return getattr(self.model, name)

  def _interceptor(self, next_fun, args, kwargs, context):
    t = None
    if context.method_name == '__call__' and args:
      t = self.ops.get('/'.join(str(p) for p in context.module.path))
    if t is None:
      return next_fun(*args, **kwargs)
    args = (transform_input(args[0], t.rotation, t.scale),) + tuple(args[1:])
    return shift_output(next_fun(*args, **kwargs), t.shift)

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor):
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor):
      return self.model.apply(*args, **kwargs)


class OnlineInput(nnx.Variable):
  """The rotation, scale or output shift of a module's online ops (not trained)."""


_SUBCLASSES: dict[type, type] = {}
_VARS = ('ptq_rotation', 'ptq_scale', 'ptq_shift')  # Online's fields, as the module's variables


def _call(self, x, *args, **kwargs):
  r, s, b = (None if getattr(self, n, None) is None else getattr(self, n).get_value() for n in _VARS)
  y = super(_SUBCLASSES[self._ptq_base], self).__call__(transform_input(x, r, s), *args, **kwargs)
  return shift_output(y, b)


def install_nnx(model: nnx.Module, ops) -> None:
  """Gives the NNX modules at `ops`' paths ({path: Online or a tuple}) their online ops. In place."""
  ops = {p: Online(*t) for p, t in dict(ops).items()}
  for p, m in nnx.iter_modules(model):
    path = '/'.join(str(k) for k in p)
    if path not in ops:
      continue
    base = getattr(m, '_ptq_base', None) or type(m)
    if base not in _SUBCLASSES:
      _SUBCLASSES[base] = type(base.__name__, (base,), {'__call__': _call, '_ptq_base': base,
                                                        '__module__': base.__module__,
                                                        '__qualname__': base.__qualname__})
    m.__class__ = _SUBCLASSES[base]
    for name, v in zip(_VARS, ops[path], strict=True):
      if v is not None:
        setattr(m, name, OnlineInput(jnp.asarray(v, jnp.float32)))
