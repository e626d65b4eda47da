"""Sub-byte storage: signed integers of 2, 3 or 4 bits packed densely into bytes along axis 0.

A group of G = 8 / gcd(8, bits) values (two's complement, `bits` each) fills B = bits G / 8 bytes exactly:

    bits   G   B   bytes per value
     4     2   1   1/2              byte = v0 | v1 << 4  (v0 in the low nibble)
     3     8   3   3/8              24-bit word v0 | v1 << 3 | ... | v7 << 21, stored as 3 bytes, low byte first
     2     4   1   1/4              byte = v0 | v1 << 2 | v2 << 4 | v3 << 6

The packed axis (axis 0 unless given) is padded with zeros to a multiple of G; `unpack` takes the original shape
to drop the padding. `best_axis` picks the axis that pads least: a conv kernel (kh, kw, in, out) packs along
`in` or `out`, since kh = 3 padded to G = 8 would store 3-bit values at a byte each.
Values must lie in [-2^(bits-1), 2^(bits-1) - 1] (a QArray's int range); 1-bit binary {-1, +1} is stored at 2
bits (`width`). Wider integers (5..7 bits) stay one per int8 byte: their groups would not fit a 32-bit word.
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


# Compiled per (shape, bits, axis): run eagerly (converting a model for serving), their dozen ops would each
# compile on their own, for every kernel shape.
@functools.partial(jax.jit, static_argnames=('bits', 'axis'))
def pack(q, bits: int, axis: int = 0):
  """int8 values in the signed `bits` range -> uint8, `axis` of size n becoming packed_rows(n, bits)."""
  q = jnp.moveaxis(jnp.asarray(q), axis, 0)
  return jnp.moveaxis(_pack0(q, bits), 0, axis)


@functools.partial(jax.jit, static_argnames=('bits', 'shape', 'axis'))
def unpack(p, bits: int, shape: tuple[int, ...], axis: int = 0):
  """Inverse of `pack`: uint8 packed along `axis` -> int8 of `shape`, sign-extended."""
  axis %= len(shape)
  moved = (shape[axis],) + tuple(n for i, n in enumerate(shape) if i != axis)
  return jnp.moveaxis(_unpack0(jnp.moveaxis(jnp.asarray(p), axis, 0), bits, moved), 0, axis)


def _pack0(q, bits: int):
  """int8 values (n, ...) -> uint8 (packed_rows(n, bits), ...)."""
  g, b = _layout(bits)
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
  p = p.astype(jnp.uint32).reshape((-1, b) + tuple(p.shape[1:]))
  nd = p.ndim - 1
  byte_shifts = (jnp.arange(b, dtype=jnp.uint32) * 8).reshape((1, b) + (1,) * (nd - 1))
  word = jnp.sum(p << byte_shifts, axis=1, dtype=jnp.uint32)             # (groups, ...)
  shifts = (jnp.arange(g, dtype=jnp.uint32) * bits).reshape((1, g) + (1,) * (nd - 1))
  v = ((word[:, None] >> shifts) & ((1 << bits) - 1)).astype(jnp.int32)  # (groups, G, ...)
  sign = 1 << (bits - 1)
  v = (v ^ sign) - sign
  return v.reshape((-1,) + tuple(p.shape[2:]))[:shape[0]].astype(jnp.int8).reshape(shape)
