"""The online input op of rotation / SmoothQuant / AWQ layers, on unmodified Flax models.

    x -> (x @ rotation) / scale          before the layer's own op, in float

Linen: `InputOps(model, transforms)` wraps a Linen module (init / apply as the module's own) and, through Flax's
`nn.intercept_methods`, rewrites the first argument of `__call__` of the modules at the given paths. NNX:
`install_nnx(model, transforms)` gives those modules a subclass whose `__call__` does the same, with the rotation
and scale held as `OnlineInput` variables (so jit, checkpoints and nnx.split see them). The matmul of the
rotation calls `jax.lax.dot_general` from inside qjax (not from a module), so qjax's interception runs it as the
plain float op it is. (The PTQ methods' calibration data come from qjax.flax.capture, not from here.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


def transform_input(x, rotation=None, scale=None):
  """(x @ rotation) / scale over the last axis of x, in x's dtype."""
  if rotation is not None:
    r = jnp.asarray(rotation, x.dtype)
    x = jax.lax.dot_general(x, r, (((x.ndim - 1,), (0,)), ((), ())))
  if scale is not None:
    x = x * (1.0 / jnp.asarray(scale, jnp.float32)).astype(x.dtype)
  return x


class InputOps:
  """A Linen module whose modules at `transforms`' paths apply their online input op ({path: (rotation,
  scale)}, either may be None)."""

  def __init__(self, model: nn.Module, transforms=None):
    self.model, self.transforms = model, dict(transforms or {})

  def __getattr__(self, name):
    return getattr(self.model, name)

  def _interceptor(self, next_fun, args, kwargs, context):
    if context.method_name == '__call__' and args:
      t = self.transforms.get('/'.join(str(p) for p in context.module.path))
      if t is not None:
        args = (transform_input(args[0], *t),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  def init(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor):
      return self.model.init(*args, **kwargs)

  def apply(self, *args, **kwargs):
    with nn.intercept_methods(self._interceptor):
      return self.model.apply(*args, **kwargs)


class OnlineInput(nnx.Variable):
  """The rotation or scale of a module's online input op (not trained)."""


_SUBCLASSES: dict[type, type] = {}


def _call(self, x, *args, **kwargs):
  r, s = getattr(self, 'ptq_rotation', None), getattr(self, 'ptq_scale', None)
  x = transform_input(x, None if r is None else r.get_value(), None if s is None else s.get_value())
  return super(_SUBCLASSES[self._ptq_base], self).__call__(x, *args, **kwargs)


def install_nnx(model: nnx.Module, transforms) -> None:
  """Gives the NNX modules at `transforms`' paths ({path: (rotation, scale)}) their online input op. In place."""
  transforms = dict(transforms)
  for p, m in nnx.iter_modules(model):
    path = '/'.join(str(k) for k in p)
    if path not in transforms:
      continue
    base = getattr(m, '_ptq_base', None) or type(m)
    if base not in _SUBCLASSES:
      _SUBCLASSES[base] = type(base.__name__, (base,), {'__call__': _call, '_ptq_base': base,
                                                        '__module__': base.__module__})
    m.__class__ = _SUBCLASSES[base]
    rot, scale = transforms.get(path, (None, None))
    if rot is not None:
      m.ptq_rotation = OnlineInput(jnp.asarray(rot, jnp.float32))
    if scale is not None:
      m.ptq_scale = OnlineInput(jnp.asarray(scale, jnp.float32))
