"""Sub-byte storage: signed integers of 2, 3 or 4 bits packed densely into bytes along axis 0.

A group of G = 8 / gcd(8, bits) values (two's complement, `bits` each) fills B = bits G / 8 bytes exactly:

    bits   G   B   bytes per value
     4     2   1   1/2              byte = v0 | v1 << 4  (v0 in the low nibble)
     3     8   3   3/8              24-bit word v0 | v1 << 3 | ... | v7 << 21, stored as 3 bytes, low byte first
     2     4   1   1/4              byte = v0 | v1 << 2 | v2 << 4 | v3 << 6

The packed axis (axis 0 unless given) is padded with zeros to a multiple of G; `unpack` takes the original shape
to drop the padding. `best_axis` picks the axis that pads least: a conv kernel (kh, kw, in, out) packs along
`in` or `out`, since kh = 3 padded to G = 8 would store 3-bit values at a byte each.
Values must lie in [-2^(bits-1), 2^(bits-1) - 1] (a QArray's int range; `pack` refuses others). 1-bit binary
{-1, +1} is stored at 2 bits (`width`). Wider integers (5..7 bits) stay one per int8 byte: their groups would not
fit a 32-bit word.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from qjax import formats

PACKED_BITS = (2, 3, 4)


def width(fmt: formats.Format) -> int | None:
  """The packed width of a format's values: 2..4 for signed integers of up to 4 bits (binary int1 at 2), else
  None (not packed)."""
  if not isinstance(fmt, formats.IntFormat) or not fmt.signed or fmt.bits > 4:
    return None
  return max(fmt.bits, 2)


def _layout(bits: int) -> tuple[int, int]:
  if bits not in PACKED_BITS:
    raise ValueError(f'packing stores signed integers of {PACKED_BITS[0]}..{PACKED_BITS[-1]} bits, got bits={bits}')
  g = 8 // math.gcd(8, bits)
  return g, bits * g // 8


def packed_rows(n: int, bits: int) -> int:
  """Rows of the packed array for n rows of values."""
  g, b = _layout(bits)
  return -(-n // g) * b


def best_axis(shape: tuple[int, ...], bits: int, allowed: tuple[int, ...] | None = None) -> int:
  """The axis (among `allowed`, default all) along which `shape` packs into the fewest bytes; ties go to the
  lowest axis, so a matrix whose rows fill whole groups packs along axis 0."""
  axes = tuple(range(len(shape))) if allowed is None else tuple(allowed)
  if not axes:
    return 0
  size = math.prod(shape)
  return min(axes, key=lambda a: (packed_rows(shape[a], bits) * (size // shape[a] if shape[a] else 0), a))


def pack(q, bits: int, axis: int = 0):
  """int8 values in the signed `bits` range -> uint8, `axis` of size n becoming packed_rows(n, bits).

  Raises ValueError for non-integer values, an axis out of range, and (when q is concrete, not traced) values
  outside [-2^(bits-1), 2^(bits-1) - 1], which the packed bits cannot hold: they would wrap to other values."""
  _layout(bits)
  q = q if isinstance(q, jax.core.Tracer) else jnp.asarray(q)
  if not jnp.issubdtype(q.dtype, jnp.integer):
    raise ValueError(f'packing.pack: takes integer values, got dtype {q.dtype}')
  if not -q.ndim <= axis < q.ndim:
    raise ValueError(f'packing.pack: axis={axis} is out of range for shape {tuple(q.shape)}')
  if not isinstance(q, jax.core.Tracer) and q.size:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    qmin, qmax = (int(v) for v in _min_max(q))
    if qmin < lo or qmax > hi:
      raise ValueError(f'packing.pack: {bits}-bit storage holds values in [{lo}, {hi}], got values in '
                       f'[{qmin}, {qmax}]')
  return _pack(q, bits, axis % q.ndim)


def unpack(p, bits: int, shape: tuple[int, ...], axis: int = 0):
  """Inverse of `pack`: uint8 packed along `axis` -> int8 of `shape`, sign-extended. Raises ValueError when p is
  not the packed form of `shape` (its packed axis must hold packed_rows(shape[axis], bits) rows, every other axis
  shape's size)."""
  _layout(bits)
  shape = tuple(int(n) for n in shape)
  if not -len(shape) <= axis < len(shape):
    raise ValueError(f'packing.unpack: axis={axis} is out of range for shape {shape}')
  axis %= len(shape)
  want = tuple(packed_rows(n, bits) if i == axis else n for i, n in enumerate(shape))
  if tuple(p.shape) != want:
    raise ValueError(f'packing.unpack: {bits}-bit values of shape {shape} packed along axis {axis} are an array '
                     f'of shape {want}, got {tuple(p.shape)}')
  return _unpack(p, bits, shape, axis)


@jax.jit
def _min_max(q):
  return jnp.min(q), jnp.max(q)


# Compiled per (shape, bits, axis): run eagerly (converting a model for serving), their dozen ops would each
# compile on their own, for every kernel shape.
@functools.partial(jax.jit, static_argnames=('bits', 'axis'))
def _pack(q, bits: int, axis: int):
  q = jnp.moveaxis(q, axis, 0)
  return jnp.moveaxis(_pack0(q, bits), 0, axis)


@functools.partial(jax.jit, static_argnames=('bits', 'shape', 'axis'))
def _unpack(p, bits: int, shape: tuple[int, ...], axis: int):
  moved = (shape[axis],) + tuple(n for i, n in enumerate(shape) if i != axis)
  return jnp.moveaxis(_unpack0(jnp.moveaxis(jnp.asarray(p), axis, 0), bits, moved), 0, axis)


def _pack0(q, bits: int):
  """int8 values (n, ...) -> uint8 (packed_rows(n, bits), ...)."""
  g, b = _layout(bits)
  if q.size == 0:  # (reshapes by -1 cannot infer a size next to a zero)
    return jnp.zeros((packed_rows(q.shape[0], bits),) + q.shape[1:], jnp.uint8)
  pad = -q.shape[0] % g
  if pad:
    q = jnp.concatenate([q, jnp.zeros((pad,) + q.shape[1:], q.dtype)])
  v = (q.astype(jnp.int32) & ((1 << bits) - 1)).astype(jnp.uint32)
  v = v.reshape((-1, g) + q.shape[1:])                                   # (groups, G, ...)
  shifts = (jnp.arange(g, dtype=jnp.uint32) * bits).reshape((1, g) + (1,) * (q.ndim - 1))
  word = jnp.sum(v << shifts, axis=1, dtype=jnp.uint32)                  # (groups, ...) disjoint bits: sum = or
  byte_shifts = (jnp.arange(b, dtype=jnp.uint32) * 8).reshape((1, b) + (1,) * (q.ndim - 1))
  out = (word[:, None] >> byte_shifts) & 0xFF                           # (groups, B, ...)
  return out.astype(jnp.uint8).reshape((-1,) + q.shape[1:])


def _unpack0(p, bits: int, shape: tuple[int, ...]):
  """uint8 (packed_rows, ...) -> int8 of `shape`."""
  g, b = _layout(bits)
  if math.prod(shape) == 0:
    return jnp.zeros(shape, jnp.int8)
  p = p.astype(jnp.uint32).reshape((-1, b) + tuple(p.shape[1:]))
  nd = p.ndim - 1
  byte_shifts = (jnp.arange(b, dtype=jnp.uint32) * 8).reshape((1, b) + (1,) * (nd - 1))
  word = jnp.sum(p << byte_shifts, axis=1, dtype=jnp.uint32)             # (groups, ...)
  shifts = (jnp.arange(g, dtype=jnp.uint32) * bits).reshape((1, g) + (1,) * (nd - 1))
  v = ((word[:, None] >> shifts) & ((1 << bits) - 1)).astype(jnp.int32)  # (groups, G, ...)
  sign = 1 << (bits - 1)
  v = (v ^ sign) - sign
  return v.reshape((-1,) + tuple(p.shape[2:]))[:shape[0]].astype(jnp.int8).reshape(shape)
