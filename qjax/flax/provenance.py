"""Provenance: which param an op operand is, and through which shape ops, found by walking the trace.

An operand is a weight when it is a param of the model, or is derived from one by shape/dtype/layout ops only
(transpose, reshape, astype, squeeze, broadcast, slicing; `kernel.T`, `jnp.asarray(w)`, `Embed.attend`'s
`jnp.dot(x, embedding.T)`). Under a jax trace (jit, eval_shape, jit(grad)) every traced value knows the
equation that produced it (`DynamicJaxprTracer.parent`); `trace_back` follows those equations from the operand
back to a value the caller recognises as a param (by identity), through the whitelisted shape ops only.
Anything else (arithmetic, gathers, a param times a mask) ends the walk: the operand is an activation.

The result, an `Origin`, records the steps from the param to the operand, so that
  - per-operand axes map to param axes (`Origin.axes[i]`: the param axis operand axis i is, None when a
    broadcast or a reshape merge made it), so a channel axis means the same whatever layout a module stores;
  - a quantized param stored in its own layout can be brought to the operand's layout (`forward`), and an
    operand-layout quantization back to the param's layout (`backward`; transposes, reshapes, casts only).

Eager values have no parent: the Flax backends then run the model once abstractly first and look the origins
up by use site (see qjax.flax.hooks). The walk uses JAX internals (`parent`, `in_tracers`, `primitive`); the
canary test in tests/test_flax_provenance.py fails first if they change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Private JAX: the tracer types whose primal / value `unwrap` reads (no public API exposes them).
from jax._src.interpreters import ad, batching

from qjax import quantizers

_CASTS = ('convert_element_type', 'copy', 'copy_p', 'sharding_constraint', 'reduce_precision', 'optimization_barrier')
_SHAPE_OPS = ('transpose', 'reshape', 'squeeze', 'broadcast_in_dim', 'slice', 'expand_dims') + _CASTS
INVERTIBLE = ('transpose', 'reshape', 'squeeze', 'cast')


@dataclasses.dataclass(frozen=True)
class Step:
  """One shape op from param to operand: kind in transpose|reshape|squeeze|broadcast|slice|cast, its static
  arguments, and the shapes before and after it."""
  kind: str
  args: tuple
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Origin:
  """An operand that is the param `param` (its '/'-joined path in the params tree) after `steps`.

  axes[i] is the param axis that operand axis i is (None: an axis a broadcast or reshape merge made), so that
  e.g. a kernel stored (out, in) and used as `kernel.T` has axes (1, 0).
  """
  param: str
  steps: tuple[Step, ...] = ()
  shape: tuple[int, ...] = ()  # the param's shape
  read: bool = False           # reached through a quantized read of the param (a tied weight in QAT; session)

  @property
  def axes(self) -> tuple[int | None, ...]:
    axes: tuple[int | None, ...] = tuple(range(len(self.shape)))
    for s in self.steps:
      axes = _map_axes(s, axes)
    return axes

  @property
  def invertible(self) -> bool:
    return all(s.kind in INVERTIBLE for s in self.steps)

  def describe(self) -> str:
    kinds = [s.kind for s in self.steps if s.kind != 'cast']
    return self.param + (f' via {"+".join(kinds)}' if kinds else '')


def unwrap(x):
  """The primal of a JVP/linearize tracer and the value of a batching tracer (repeatedly)."""
  for _ in range(32):
    if isinstance(x, (ad.JVPTracer, getattr(ad, 'LinearizeTracer', ad.JVPTracer))):
      x = x.primal
    elif isinstance(x, batching.BatchTracer):
      x = x.val
    else:
      return x
  return x


def trace_back(x, lookup: Callable[[Any], tuple[str, tuple[int, ...]] | None], max_steps: int = 64) -> Origin | None:
  """The Origin of operand x, or None for an activation. `lookup(v)` returns (param path, param shape) when v
  is (by identity) a param, else None; it is asked about x itself, its unwrapped primal, the array a constant
  tracer stands for (params closed over by jax.jit), and every value on the way back."""
  steps: list[Step] = []
  node = x
  for _ in range(max_steps):
    for v in (node, unwrap(node), _const(unwrap(node))):
      if v is None:
        continue
      hit = lookup(v)
      if hit is not None:
        return Origin(hit[0], tuple(reversed(steps)), tuple(hit[1]), len(hit) > 2 and bool(hit[2]))
    node = unwrap(node)
    eqn = getattr(node, 'parent', None) if isinstance(node, jax.core.Tracer) else None
    if eqn is None:
      return None
    prim = eqn.primitive.name
    ins = list(eqn.in_tracers)
    if prim not in _SHAPE_OPS or not ins:
      return None
    src = ins[0]
    steps.append(_step(prim, eqn.params, tuple(src.aval.shape), tuple(node.aval.shape)))
    node = src
  return None


def _const(v):
  """The array a trace closed over, for a tracer that stands for a constant (params closed over by jax.jit)."""
  if isinstance(v, jax.core.Tracer) and getattr(v, 'parent', None) is None and hasattr(v, 'get_const'):
    try:
      return v.get_const()
    except Exception:  # noqa: BLE001 -- not a constant
      return None
  return None


def has_trace(x) -> bool:
  """x is a value under a jax trace whose producer can be followed (not an eager array)."""
  return isinstance(unwrap(x), jax.core.Tracer) and hasattr(unwrap(x), 'parent')


def _step(prim: str, params, in_shape, out_shape) -> Step:
  if prim == 'transpose':
    return Step('transpose', tuple(params['permutation']), in_shape, out_shape)
  if prim == 'broadcast_in_dim':
    return Step('broadcast', tuple(params['broadcast_dimensions']), in_shape, out_shape)
  if prim == 'slice':
    return Step('slice', (tuple(params['start_indices']), tuple(params['limit_indices']),
                          None if params.get('strides') is None else tuple(params['strides'])), in_shape, out_shape)
  if prim in ('reshape', 'squeeze', 'expand_dims'):
    return Step('reshape', (), in_shape, out_shape)
  if prim == 'convert_element_type':
    return Step('cast', (str(jnp.dtype(params['new_dtype'])),), in_shape, out_shape)
  return Step('cast', (), in_shape, out_shape)


def reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """Pairs of (axes of shape a, axes of shape b) with equal products, in order, for a reshape a -> b.
  Size-1 axes form groups of their own (paired with nothing on the other side) unless they pair with a
  size-1 axis there."""
  out, i, j = [], 0, 0
  while i < len(a) or j < len(b):
    if i < len(a) and j < len(b) and a[i] == 1 and b[j] == 1:
      out.append(((i,), (j,)))
      i, j = i + 1, j + 1
    elif i < len(a) and a[i] == 1:
      out.append(((i,), ()))
      i += 1
    elif j < len(b) and b[j] == 1:
      out.append(((), (j,)))
      j += 1
    else:
      ga, gb, pa, pb = [i], [j], a[i], b[j]
      i, j = i + 1, j + 1
      while pa != pb:
        if pa < pb:
          ga.append(i)
          pa *= a[i]
          i += 1
        else:
          gb.append(j)
          pb *= b[j]
          j += 1
      out.append((tuple(ga), tuple(gb)))
  return out


def _map_axes(s: Step, axes: tuple[int | None, ...]) -> tuple[int | None, ...]:
  """Param axes of the step's output axes, given those of its input axes."""
  if s.kind == 'transpose':
    return tuple(axes[p] for p in s.args)
  if s.kind == 'broadcast':
    out: list[int | None] = [None] * len(s.out_shape)
    for j, d in enumerate(s.args):
      out[d] = axes[j] if s.in_shape[j] == s.out_shape[d] else None
    return tuple(out)
  if s.kind == 'reshape':
    out = [None] * len(s.out_shape)
    for ga, gb in reshape_groups(s.in_shape, s.out_shape):
      if len(ga) == 1 and len(gb) == 1:
        out[gb[0]] = axes[ga[0]]
    return tuple(out)
  return axes  # cast, slice


# ------------------------------------------------------------------------ moving a QArray along the steps


def _reshape_scale(scale, in_shape, out_shape):
  """A scale (or zero point) of an array of in_shape, for the array reshaped to out_shape. Per reshape group
  the scale must be all 1 (reduced) or the full sizes (kept); a 1:1 group keeps whatever it has."""
  target = [1] * len(out_shape)
  for ga, gb in reshape_groups(tuple(in_shape), tuple(out_shape)):
    sizes = [scale.shape[a] for a in ga]
    if len(ga) == 1 and len(gb) == 1:
      target[gb[0]] = sizes[0]
    elif all(s == 1 for s in sizes):
      continue
    elif all(scale.shape[a] == in_shape[a] for a in ga):
      for d in gb:
        target[d] = out_shape[d]
    else:
      raise ValueError(f'a reshape {tuple(in_shape)} -> {tuple(out_shape)} splits or merges an axis that is '
                       f'only partly scaled (scale shape {tuple(scale.shape)})')
  return scale.reshape(target)


def _apply(s: Step, q: quantizers.QArray, back: bool) -> quantizers.QArray:
  def both(f, minor_dim=None):  # the layout hint survives transposes only (qjax.quantizers.QArray.minor_dim)
    zp = None if q.zero_point is None else f(q.zero_point, True)
    return dataclasses.replace(q, qvalue=f(q.qvalue, False), scale=f(q.scale, True), zero_point=zp,
                               minor_dim=minor_dim)
  src, dst = (s.out_shape, s.in_shape) if back else (s.in_shape, s.out_shape)
  if s.kind == 'cast':
    return q
  if s.kind == 'transpose':
    perm = tuple(np.argsort(s.args)) if back else s.args
    minor = perm.index(q.qvalue.ndim - 1 if q.minor_dim is None else q.minor_dim)
    return both(lambda a, _: jnp.transpose(a, perm), None if minor == len(perm) - 1 else minor)
  if s.kind == 'reshape':
    return both(lambda a, is_scale: _reshape_scale(a, src, dst) if is_scale else a.reshape(dst))
  if back:
    raise ValueError(f'a {s.kind} cannot be undone')
  if s.kind == 'broadcast':
    def bc(a, is_scale):
      shape = tuple(1 if is_scale and a.shape[j] == 1 else dst[d] for j, d in enumerate(s.args))
      full = [1] * len(dst) if is_scale else list(dst)
      for j, d in enumerate(s.args):
        full[d] = shape[j] if is_scale else dst[d]
      return lax.broadcast_in_dim(a, tuple(full), s.args)
    return both(bc)
  start, limit, strides = s.args

  def sl(a, is_scale):
    if not is_scale:
      return lax.slice(a, start, limit, strides)
    st = [0 if a.shape[d] == 1 else start[d] for d in range(a.ndim)]
    li = [1 if a.shape[d] == 1 else limit[d] for d in range(a.ndim)]
    sd = None if strides is None else [1 if a.shape[d] == 1 else strides[d] for d in range(a.ndim)]
    if any(a.shape[d] not in (1, src[d]) for d in range(a.ndim)):
      raise ValueError('a slice of a per-group scaled param')
    return lax.slice(a, st, li, sd)
  return both(sl)


def forward(origin: Origin, q: quantizers.QArray) -> quantizers.QArray:
  """q, a QArray in the param's layout, brought to the operand's layout along origin's steps."""
  for s in origin.steps:
    q = _apply(s, q, back=False)
  return q


def backward(origin: Origin, q: quantizers.QArray) -> quantizers.QArray:
  """q, a QArray in the operand's layout, brought back to the param's layout (ValueError for a broadcast or
  slice, which cannot be undone)."""
  for s in reversed(origin.steps):
    q = _apply(s, q, back=True)
  return q


def replay(origin: Origin, x: jax.Array, back: bool = False) -> jax.Array:
  """The param's value x (an array in the param's layout) moved along origin's steps to the operand's layout,
  exactly as the model's own shape ops and casts did; `back=True` moves an operand-layout array back to the
  param's layout (transposes, reshapes and casts only; casts back go to x's own dtype)."""
  if not back:
    for s in origin.steps:
      if s.kind == 'cast':
        x = x.astype(s.args[0]) if s.args else x
      elif s.kind == 'transpose':
        x = jnp.transpose(x, s.args)
      elif s.kind == 'reshape':
        x = x.reshape(s.out_shape)
      elif s.kind == 'broadcast':
        x = lax.broadcast_in_dim(x, s.out_shape, s.args)
      else:
        x = lax.slice(x, *s.args)
    return x
  for s in reversed(origin.steps):
    if s.kind == 'transpose':
      x = jnp.transpose(x, tuple(np.argsort(s.args)))
    elif s.kind == 'reshape':
      x = x.reshape(s.in_shape)
    elif s.kind != 'cast':
      raise ValueError(f'a {s.kind} cannot be undone')
  return x


def param_axes(origin: Origin, operand_axes) -> tuple[int | None, ...]:
  """The param axes of the given operand axes (None where an operand axis is no param axis)."""
  axes = origin.axes
  return tuple(axes[a] for a in operand_axes)


def prod(shape) -> int:
  return math.prod(shape)
