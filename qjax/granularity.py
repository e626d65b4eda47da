"""Scale shapes for per-tensor, per-channel and per-group quantization.

A scale always has the rank of the tensor it scales. Along each dimension d its size is 1 (shared), the full
size n (one scale per index) or n // g (one scale per group of g consecutive indices). `expand` and
`sum_to` move between a scale's shape and the tensor's shape with reshapes, so XLA sees plain broadcasts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.spec import QuantSpec


def normalize_axes(axis: int | tuple[int, ...], ndim: int, field: str = 'axis') -> tuple[int, ...]:
  """Non-negative axes; ValueError naming the field and the allowed range when out of range."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f'{field}={axis} is out of range for a tensor of rank {ndim}; '
                       f'allowed: {-ndim}..{ndim - 1}')
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def scale_shape(shape: tuple[int, ...], spec: QuantSpec) -> tuple[int, ...]:
  """The shape of the scale (and zero_point) for a tensor of `shape` under `spec`."""
  ndim = len(shape)
  if spec.granularity == 'per_tensor':
    return (1,) * ndim
  axes = normalize_axes(spec.axis, ndim)
  if spec.granularity == 'per_channel':
    return tuple(n if d in axes else 1 for d, n in enumerate(shape))
  (a,) = axes
  if shape[a] % spec.group_size:
    raise ValueError(f'group_size={spec.group_size} does not divide axis {spec.axis} of size {shape[a]} '
                     f'(shape {tuple(shape)}); pick a divisor of {shape[a]}')
  return tuple(n // spec.group_size if d == a else n for d, n in enumerate(shape))


def _split(shape: tuple[int, ...], sshape: tuple[int, ...]) -> tuple[int, ...]:
  # (n0, n1, ...) -> (s0, n0/s0, s1, n1/s1, ...): even positions index scales, odd ones the shared elements.
  # A zero-size dimension has zero scales (sshape 0): its group size is taken as 1.
  out = []
  for n, s in zip(shape, sshape, strict=True):
    out += [s, n // s if s else 1]
  return tuple(out)


def group_view(x: jax.Array, sshape: tuple[int, ...]) -> jax.Array:
  """x reshaped to (s0, n0/s0, s1, n1/s1, ...): reduce the odd axes to get one statistic per scale."""
  return x.reshape(_split(x.shape, sshape))


def shared_axes(ndim: int) -> tuple[int, ...]:
  return tuple(range(1, 2 * ndim, 2))


def reduce(x: jax.Array, sshape: tuple[int, ...], fn) -> jax.Array:
  """Applies reduction `fn(view, axis=..., keepdims=True)` per scale group; returns an array of shape sshape."""
  return fn(group_view(x, sshape), axis=shared_axes(x.ndim), keepdims=True).reshape(sshape)


def finite_mean_abs(x: jax.Array, sshape: tuple[int, ...]) -> jax.Array:
  """mean |x| per scale group over its finite elements (NaN and +-inf neither add to the sum nor to the count);
  NaN for a group with no finite element."""
  x = x.astype(jnp.float32)
  finite = jnp.isfinite(x)
  total = reduce(jnp.where(finite, jnp.abs(x), 0.0), sshape, jnp.sum)
  return total / reduce(finite.astype(jnp.float32), sshape, jnp.sum)


def expand(scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Broadcasts a scale-shaped array to `shape` (each scale repeated over its group)."""
  scale = jnp.asarray(scale)
  if scale.shape == tuple(shape):
    return scale
  split = _split(shape, scale.shape)
  inter = tuple(s if i % 2 == 0 else 1 for i, s in enumerate(split))
  return jnp.broadcast_to(scale.reshape(inter), split).reshape(shape)


def sum_to(g: jax.Array, sshape: tuple[int, ...]) -> jax.Array:
  """Adjoint of `expand`: sums a full-shape gradient back onto the scale's shape."""
  if g.shape == tuple(sshape):
    return g
  return reduce(g, sshape, jnp.sum)


def elements_per_scale(shape: tuple[int, ...], sshape: tuple[int, ...]) -> int:
  n = 1
  for a, b in zip(shape, sshape, strict=True):
    n *= a // b if b else 1
  return n
