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


@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('axis', [1, 2, -1])
def test_round_trip_along_any_axis_packs_that_axis(bits, axis):
  shape = (3, 5, 16)
  q = np.random.default_rng(axis % 3).integers(-(2 ** (bits - 1)), 2 ** (bits - 1), shape).astype(np.int8)
  p = packing.pack(q, bits, axis)
  want = list(shape)
  want[axis] = packing.packed_rows(shape[axis], bits)
  assert p.shape == tuple(want)
  np.testing.assert_array_equal(np.asarray(packing.unpack(p, bits, shape, axis)), q)
  # the same bytes as packing that axis moved to the front
  np.testing.assert_array_equal(np.moveaxis(np.asarray(p), axis, 0),
                                np.asarray(packing.pack(np.moveaxis(q, axis, 0), bits)))


def test_best_axis_pads_least_and_prefers_axis_0_on_ties():
  # A 3x3 conv kernel (kh, kw, in, out) at 3 bits: kh = 3 padded to 8 would cost a byte per value.
  assert packing.best_axis((3, 3, 16, 32), 3) == 2          # in = 16 fills whole groups of 8
  assert packing.best_axis((3, 3, 6, 32), 3) == 3           # in = 6 would pad; out = 32 does not
  assert packing.best_axis((512, 32), 4) == 0               # a tie: axis 0, the matrix layout
  assert packing.best_axis((5, 5, 1, 6), 4) == 3            # 5 -> 6 pads; 6 packs to 3 rows exactly
  assert packing.best_axis((3, 3, 16, 32), 3, allowed=(0, 1)) == 0  # only the axes a sharding leaves free
  bytes_ = lambda shape, bits, a: packing.pack(np.zeros(shape, np.int8), bits, a).size  # noqa: E731
  assert bytes_((3, 3, 16, 32), 3, 2) == 3 * 3 * 16 * 32 * 3 // 8 < bytes_((3, 3, 16, 32), 3, 0)


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


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_pack_refuses_values_its_bits_cannot_hold(bits):
  """One step past either edge of the signed range would wrap to another value: a ValueError names the range.
  Traced values (inside jit) cannot be checked and are packed as given."""
  lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  for bad in (lo - 1, hi + 1):
    with pytest.raises(ValueError, match=rf'holds values in \[{lo}, {hi}\], got values in'):
      packing.pack(jnp.array([0, bad, 1], jnp.int8), bits)
  packing.pack(jnp.array([lo, hi], jnp.int8), bits)  # the edges themselves pack
  with pytest.raises(ValueError, match='takes integer values'):
    packing.pack(jnp.array([0.5, 1.0]), bits)
  with pytest.raises(ValueError, match='axis=2 is out of range'):
    packing.pack(jnp.zeros((3, 4), jnp.int8), bits, axis=2)


def test_unpack_refuses_a_shape_the_array_does_not_pack():
  """unpack to a smaller or larger shape, or along the wrong axis, names the packed shape it expected (before:
  rows silently dropped, or a reshape error)."""
  p = packing.pack(jnp.zeros((8, 3), jnp.int8), 4)                  # (4, 3)
  for shape, axis in (((6, 3), 0), ((10, 3), 0), ((8, 4), 0), ((8, 3), 1)):
    with pytest.raises(ValueError, match=r'packed along axis .* are an array of shape .*, got \(4, 3\)'):
      packing.unpack(p, 4, shape, axis)
  np.testing.assert_array_equal(packing.unpack(p, 4, (7, 3)), np.zeros((7, 3)))  # 7 rows also pack into 4


@pytest.mark.parametrize('shape, axis', [((0, 4), 0), ((4, 0), 0), ((4, 0), 1), ((0, 5), 1)])
def test_zero_size_arrays_round_trip(shape, axis):
  p = packing.pack(jnp.zeros(shape, jnp.int8), 3, axis)
  want = tuple(packing.packed_rows(n, 3) if i == axis else n for i, n in enumerate(shape))
  assert p.shape == want and p.dtype == jnp.uint8
  q = packing.unpack(p, 3, shape, axis)
  assert q.shape == shape and q.dtype == jnp.int8
