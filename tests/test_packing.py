"""qjax.packing: exact round trips at the integer edges of every packed width, the byte layouts written out
by hand, the sizes, and clear errors for widths it does not pack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import formats, packing


@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('shape', [(1,), (7, 3), (8, 2), (13, 2, 5), (64, 24)])
def test_round_trip_is_exact_at_the_edges(bits, shape):
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  rng = np.random.default_rng(bits)
  q = rng.integers(lo, hi + 1, shape).astype(np.int8)
  q.reshape(-1)[:4] = [lo, hi, 0, -1][:q.size]
  p = packing.pack(q, bits)
  assert p.dtype == jnp.uint8 and p.shape == (packing.packed_rows(shape[0], bits),) + shape[1:]
  np.testing.assert_array_equal(np.asarray(packing.unpack(p, bits, shape)), q)
  np.testing.assert_array_equal(np.asarray(jax.jit(packing.unpack, static_argnums=(1, 2))(p, bits, shape)), q)


def test_byte_layouts():
  # 4 bits: v0 in the low nibble (the int4 serving layout): -1 -> 0xF, 3 -> 0x3.
  assert int(packing.pack(jnp.array([-1, 3], jnp.int8), 4)[0]) == 0x3F
  # 2 bits: 1, -2, 0, -1 -> 01 | 10 << 2 | 00 << 4 | 11 << 6 = 0b11001001.
  assert int(packing.pack(jnp.array([1, -2, 0, -1], jnp.int8), 2)[0]) == 0b11001001
  # 3 bits: eight values in three bytes, low byte first.
  v = np.array([-4, 3, 0, -1, 1, 2, -2, -3])
  word = sum(int(x & 7) << (3 * i) for i, x in enumerate(v))
  got = np.asarray(packing.pack(jnp.asarray(v, jnp.int8), 3))
  assert list(got) == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]


def test_sizes_shrink_with_the_width():
  assert [packing.packed_rows(128, b) for b in (2, 3, 4)] == [32, 48, 64]
  assert packing.packed_rows(9, 3) == 6 and packing.packed_rows(5, 2) == 2


def test_widths():
  assert packing.width(formats.parse_format('int3')) == 3
  assert packing.width(formats.parse_format('int1')) == 2   # binary {-1, +1} at 2 bits
  assert packing.width(formats.parse_format('int4n')) == 4
  assert packing.width(formats.parse_format('int5')) is None
  assert packing.width(formats.parse_format('uint4')) is None
  with pytest.raises(ValueError, match=r'2\.\.4 bits, got bits=5'):
    packing.pack(jnp.zeros(4, jnp.int8), 5)
