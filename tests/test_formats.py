"""qjax.formats: exact grid values at the edges of every format, NaN/inf handling, codebooks and MX blocks.

Values are written out by hand (scale 1 unless stated), so a change in rounding or saturation shows up as a
changed integer, not as a tolerance.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qjax import QuantSpec, dequantize, fake_quant, formats, int_spec, parse_format, quantize

EDGES = [1.2, 3.5, -127.5, 129.0, -1300.0]


def q1(x, fmt, **kw):
  """qvalue of x at scale 1 (no calibration), as a numpy array."""
  x = jnp.asarray(x, jnp.float32)
  return np.asarray(quantize(x, QuantSpec(format=fmt, **kw), scale=1.0).qvalue)


def fq1(x, fmt, **kw):
  x = jnp.asarray(x, jnp.float32)
  return np.asarray(fake_quant(x, QuantSpec(format=fmt, **kw), {'scale': 1.0}))


# -------------------------------------------------------------------------------------------- integers


@pytest.mark.parametrize('fmt, expected', [
    ('int8', [1, 4, -128, 127, -128]),
    ('int8n', [1, 4, -127, 127, -127]),
    ('int4', [1, 4, -8, 7, -8]),
    ('int4n', [1, 4, -7, 7, -7]),
    ('int2', [1, 1, -2, 1, -2]),
    ('int2n', [1, 1, -1, 1, -1]),
    ('uint8', [1, 4, 0, 129, 0]),
    ('uint4', [1, 4, 0, 15, 0]),
    ('uint1', [1, 1, 0, 1, 0]),
    ('int1', [1, 1, -1, 1, -1]),
])
def test_int_edges(fmt, expected):
  q = q1(EDGES, fmt)
  np.testing.assert_array_equal(q, expected)
  assert q.dtype == (np.uint8 if fmt.startswith('u') else np.int8)


@pytest.mark.parametrize('bits', range(1, 9))
def test_int_ranges(bits):
  f = parse_format(f'int{bits}')
  u = parse_format(f'uint{bits}')
  if bits == 1:
    assert (f.qmin, f.qmax) == (-1, 1)
  else:
    assert (f.qmin, f.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    n = parse_format(f'int{bits}n')
    assert (n.qmin, n.qmax) == (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
  assert (u.qmin, u.qmax) == (0, 2 ** bits - 1)
  # Every integer in the range maps to itself; everything beyond lands on the edge.
  grid = np.arange(f.qmin, f.qmax + 1, dtype=np.float32)
  if bits == 1:
    grid = np.array([-1.0, 1.0], np.float32)
  np.testing.assert_array_equal(q1(grid, f'int{bits}'), grid)
  ugrid = np.arange(0, 2 ** bits, dtype=np.float32)
  np.testing.assert_array_equal(q1(ugrid, f'uint{bits}'), ugrid)
  np.testing.assert_array_equal(q1([1e9, -1e9], f'int{bits}'), [f.qmax, f.qmin])
  np.testing.assert_array_equal(q1([1e9, -1e9], f'uint{bits}'), [u.qmax, 0])


def test_ties_to_even():
  x = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -127.5]
  np.testing.assert_array_equal(q1(x, 'int8'), [0, 2, 2, 4, 0, -2, -2, 126, -128])
  np.testing.assert_array_equal(fq1(x, 'int8'), [0, 2, 2, 4, 0, -2, -2, 126, -128])
  np.testing.assert_array_equal(q1([0.5, 1.5, 2.5], 'uint4'), [0, 2, 2])


def test_int1_is_sign_with_zero_to_plus_one():
  x = [0.0, -0.0, 1e-30, -1e-30, 0.4, -0.4, 7.0, -7.0]
  np.testing.assert_array_equal(q1(x, 'int1'), [1, 1, 1, -1, 1, -1, 1, -1])
  np.testing.assert_array_equal(fq1(x, 'int1'), [1, 1, 1, -1, 1, -1, 1, -1])


def test_int_inf_and_nan():
  x = [np.inf, -np.inf, np.nan, 2.0]
  # Table in formats.py: +-inf -> qmax / qmin, NaN -> qvalue 0, fake_quant keeps NaN and +-inf.
  np.testing.assert_array_equal(q1(x, 'int8'), [127, -128, 0, 2])
  np.testing.assert_array_equal(q1(x, 'uint4'), [15, 0, 0, 2])
  np.testing.assert_array_equal(fq1(x, 'int8'), [np.inf, -np.inf, np.nan, 2])
  np.testing.assert_array_equal(q1(x, 'int1'), [1, -1, 0, 1])
  np.testing.assert_array_equal(fq1(x, 'int1'), [np.inf, -np.inf, np.nan, 1])


def test_int_scale_and_zero_point():
  # qvalue = round(x / scale + zero_point), dequant = (qvalue - zero_point) * scale.
  x = jnp.array([0.0, 0.26, -0.26, 10.0, -10.0], jnp.float32)
  spec = QuantSpec(format='uint8', scheme='asymmetric', calibration='minmax')
  q = quantize(x, spec, scale=0.5, zero_point=3)
  np.testing.assert_array_equal(q.qvalue, [3, 4, 2, 23, 0])  # -10 / 0.5 + 3 = -17 -> clipped to 0.
  np.testing.assert_array_equal(dequantize(q), [0.0, 0.5, -0.5, 10.0, -1.5])


# ---------------------------------------------------------------------------------------------- floats


@pytest.mark.parametrize('fmt, fmax', [('fp8_e4m3', 448.0), ('fp8_e5m2', 57344.0), ('fp4_e2m1', 6.0)])
def test_float_saturates(fmt, fmax):
  x = [1e6, -1e6, np.inf, -np.inf, fmax, -fmax, 1e30]
  expected = [fmax, -fmax, fmax, -fmax, fmax, -fmax, fmax]
  np.testing.assert_array_equal(fq1(x, fmt), [fmax, -fmax, np.inf, -np.inf, fmax, -fmax, fmax])  # keeps +-inf
  q = quantize(jnp.asarray(x, jnp.float32), QuantSpec(format=fmt), scale=1.0).qvalue
  assert q.dtype == parse_format(fmt).dtype
  np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), expected)
  assert parse_format(fmt).max == fmax == formats.ml_dtype_max(parse_format(fmt))


def test_fp8_e4m3_grid_points():
  # Normal spacing 2^(e-3); subnormals 2^-9; ties to even (1.0625 is halfway between 1 and 1.125).
  x = [1.0, 1.0625, 1.1875, 1.124, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 240.0, 464.0]
  np.testing.assert_array_equal(fq1(x, 'fp8_e4m3'), [1.0, 1.0, 1.25, 1.125, 2.0 ** -9, 0.0, 2.0 ** -9, 240.0, 448.0])


def test_fp8_e5m2_grid_points():
  x = [1.0, 1.125, 1.375, 2.0 ** -16, 2.0 ** -17, 49152.0, 61440.0]
  np.testing.assert_array_equal(fq1(x, 'fp8_e5m2'), [1.0, 1.0, 1.5, 2.0 ** -16, 0.0, 49152.0, 57344.0])


def test_fp4_e2m1_values_exact():
  levels = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
  x = np.linspace(-8.0, 8.0, 1601, dtype=np.float32)
  out = fq1(x, 'fp4_e2m1')
  assert set(np.abs(out).tolist()) == levels
  # Each value maps to itself; ties go to the even mantissa (2.5 -> 2, 3.5 -> 4, 5 -> 4, 0.25 -> 0, 0.75 -> 1).
  pos = sorted(levels)
  np.testing.assert_array_equal(fq1(pos, 'fp4_e2m1'), pos)
  np.testing.assert_array_equal(fq1([-v for v in pos], 'fp4_e2m1'), [-v for v in pos])
  np.testing.assert_array_equal(fq1([2.5, 3.5, 5.0, 0.25, 0.75, 1.25, 1.75, 5.1, 7.0, 100.0], 'fp4_e2m1'),
                                [2.0, 4.0, 4.0, 0.0, 1.0, 1.0, 2.0, 6.0, 6.0, 6.0])


def test_float_nan():
  # formats.py table: float formats keep NaN (fp4 has no NaN: qvalue 0), fake_quant keeps NaN for all.
  for fmt in ('fp8_e4m3', 'fp8_e5m2'):
    q = quantize(jnp.array([np.nan, 1.0]), QuantSpec(format=fmt), scale=1.0).qvalue
    assert np.isnan(np.asarray(q.astype(jnp.float32))[0])
    np.testing.assert_array_equal(fq1([np.nan, 1.0], fmt), [np.nan, 1.0])
  q = quantize(jnp.array([np.nan, 1.0]), QuantSpec(format='fp4_e2m1'), scale=1.0).qvalue
  np.testing.assert_array_equal(np.asarray(q.astype(jnp.float32)), [0.0, 1.0])
  np.testing.assert_array_equal(fq1([np.nan, 1.0], 'fp4_e2m1'), [np.nan, 1.0])


def test_float_scaled():
  x = jnp.array([0.5, 1000.0, -3.0], jnp.float32)
  np.testing.assert_array_equal(fake_quant(x, QuantSpec(format='fp4_e2m1'), {'scale': 0.5}), [0.5, 3.0, -3.0])
  np.testing.assert_array_equal(fake_quant(x, QuantSpec(format='fp8_e4m3'), {'scale': 2.0}), [0.5, 896.0, -3.0])


# ------------------------------------------------------------------------------------------- codebooks


def test_nf4_levels_map_to_themselves():
  levels = np.asarray(formats.NF4_LEVELS, np.float32)
  assert len(levels) == 16 and levels[0] == -1.0 and levels[7] == 0.0 and levels[-1] == 1.0
  assert np.all(np.diff(levels) > 0)
  np.testing.assert_array_equal(q1(levels, 'nf4'), np.arange(16))
  np.testing.assert_array_equal(fq1(levels, 'nf4'), levels)
  # Scaled: levels * s map back to levels * s exactly.
  q = quantize(jnp.asarray(levels * 4.0), QuantSpec(format='nf4'), scale=4.0)
  np.testing.assert_array_equal(q.qvalue, np.arange(16))
  np.testing.assert_array_equal(dequantize(q), levels * 4.0)
  assert q.qvalue.dtype == jnp.uint8


def test_nf4_edges_and_nan():
  # Beyond the ends -> the edge levels; NaN -> index 0 (fake_quant keeps NaN); ties to the lower index.
  mid = (formats.NF4_LEVELS[7] + formats.NF4_LEVELS[8]) / 2
  x = [5.0, -5.0, np.inf, -np.inf, np.nan, mid, 0.0]
  np.testing.assert_array_equal(q1(x, 'nf4'), [15, 0, 15, 0, 0, 7, 7])
  out = fq1(x, 'nf4')
  np.testing.assert_array_equal(out[:4], [1.0, -1.0, np.inf, -np.inf])  # fake_quant keeps +-inf and NaN
  assert np.isnan(out[4])


def test_custom_codebook():
  levels = (0.5, -1.0, 0.0, 1.0)  # Given unsorted: parse sorts them.
  fmt = parse_format('codebook', levels)
  assert fmt.levels == (-1.0, 0.0, 0.5, 1.0) and fmt.bits == 2
  x = [-2.0, -0.6, -0.4, 0.2, 0.25, 0.3, 0.74, 0.76, 3.0]
  np.testing.assert_array_equal(q1(x, 'codebook', codebook=levels), [0, 0, 1, 1, 1, 2, 2, 3, 3])
  np.testing.assert_array_equal(fq1(x, 'codebook', codebook=levels), [-1, -1, 0, 0, 0, 0.5, 0.5, 1, 1])
  # Calibrated: scale = absmax / max|level|, so the largest magnitude is a level exactly.
  xs = jnp.array([-4.0, 1.9, 2.1, 4.0])
  np.testing.assert_array_equal(fake_quant(xs, QuantSpec(format='codebook', codebook=levels)), [-4, 2, 2, 4])


@pytest.mark.parametrize('levels, match', [
    (None, 'codebook='), ((1.0,), 'at least 2'), ((0.0, 0.0, 1.0), 'distinct'), (tuple(range(257)), '256'),
])
def test_bad_codebook(levels, match):
  with pytest.raises(ValueError, match=match):
    parse_format('codebook', levels)


# ------------------------------------------------------------------------------------------------- MX


def _block_consts(x, q, block=32):
  """Dequant / grid value per element, reshaped to (rows, blocks, 32) (NaN where the grid value is 0)."""
  v = np.asarray(formats.from_grid(q.qvalue, q.fmt))
  d = np.asarray(dequantize(q))
  with np.errstate(invalid='ignore', divide='ignore'):
    r = np.where(v != 0, d / v, np.nan)
  return r.reshape(x.shape[0], -1, block)


@pytest.mark.parametrize('fmt', ['mxint8', 'mxfp8', 'mxfp4'])
def test_mx_shared_power_of_two_scales(fmt):
  rng = np.random.default_rng(0)
  # Blocks of very different magnitudes, so that one scale per tensor would not fit.
  mags = 2.0 ** rng.integers(-10, 10, size=(4, 4, 1))
  x = jnp.asarray((rng.standard_normal((4, 4, 32)) * mags).reshape(4, 128), jnp.float32)
  spec = QuantSpec(format=fmt)
  assert (spec.granularity, spec.group_size) == ('per_group', 32)
  q = quantize(x, spec)
  assert q.scale.shape == (4, 4)
  s = np.asarray(q.scale)
  np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)  # Powers of two (E8M0).
  # Every element of a block dequantizes with the same, single scale: its block's.
  ratio = _block_consts(x, q)
  expected = np.broadcast_to(s[:, :, None], ratio.shape)
  ok = ~np.isnan(ratio)
  assert ok.sum() > 0.9 * ratio.size
  np.testing.assert_array_equal(ratio[ok], expected[ok])
  # The scale is 2^(floor(log2 amax) - emax_elem): amax / scale in [2^emax, 2^(emax+1)).
  emax = {'mxint8': 6, 'mxfp8': 8, 'mxfp4': 2}[fmt]
  amax = np.abs(np.asarray(x)).reshape(4, 4, 32).max(-1)
  np.testing.assert_array_equal(s, np.exp2(np.floor(np.log2(amax)) - emax))


def test_mx_other_axis():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 3)), jnp.float32)
  q = quantize(x, QuantSpec(format='mxfp8', axis=0))
  assert q.scale.shape == (2, 3)
  d = np.asarray(dequantize(q))
  v = np.asarray(q.qvalue.astype(jnp.float32))
  np.testing.assert_array_equal(d, v * np.repeat(np.asarray(q.scale), 32, axis=0))


@pytest.mark.parametrize('fmt, amax, out', [
    # amax 500 -> scale 2^(8-8) = 1 -> 500 saturates to 448 (e4m3 max).
    ('mxfp8', 500.0, 448.0),
    # amax 7.9 -> scale 2^(2-2) = 1 -> 7.9 saturates to 6 (e2m1 max).
    ('mxfp4', 7.9, 6.0),
    # amax 1.999 -> scale 2^(0-6) -> 127.9 clips to 127 (narrow int8) -> 127/64.
    ('mxint8', 1.999, 127.0 / 64),
])
def test_mx_elements_saturate(fmt, amax, out):
  x = np.full((1, 64), 0.25, np.float32)
  x[0, 5] = amax
  x[0, 40] = -amax
  y = np.asarray(fake_quant(jnp.asarray(x), QuantSpec(format=fmt)))
  assert y[0, 5] == out and y[0, 40] == -out
  assert np.all(np.isfinite(y))


def test_mx_group_size_is_fixed():
  with pytest.raises(ValueError, match='group_size must be 32'):
    QuantSpec(format='mxfp4', group_size=16)
  with pytest.raises(ValueError, match='group_size=32 does not divide'):
    fake_quant(jnp.ones((4, 48)), QuantSpec(format='mxfp4'))


# ----------------------------------------------------------------------------------------- bad names


@pytest.mark.parametrize('name', ['int0', 'int9', 'uint0', 'uint9', 'int16', 'int9n'])
def test_bad_bits(name):
  with pytest.raises(ValueError, match=r"format '.*': bits must be in 1\.\.8"):
    parse_format(name)
  with pytest.raises(ValueError, match=r'bits must be in 1\.\.8'):
    QuantSpec(format=name)


@pytest.mark.parametrize('bits', [0, 9, -1, 2.5, True])
def test_int_spec_bad_bits(bits):
  with pytest.raises(ValueError, match=r'bits must be an integer in 1\.\.8'):
    int_spec(bits)


def test_int_spec():
  assert int_spec(4).format == 'int4'
  assert int_spec(8, granularity='per_channel').granularity == 'per_channel'


@pytest.mark.parametrize('name', ['int', 'fp8', 'e4m3', 'nf8', 'float8', 'INT8', 'mxint4', ''])
def test_unknown_format(name):
  with pytest.raises(ValueError, match=r'unknown format .*allowed: int1\.\.int8, .*fp8_e4m3.*nf4'):
    parse_format(name)


@pytest.mark.parametrize('name', ['uint4n', 'int1n'])
def test_bad_narrow(name):
  with pytest.raises(ValueError, match='narrow range'):
    parse_format(name)


def test_format_not_a_string():
  with pytest.raises(ValueError, match='format must be a string'):
    parse_format(8)


def test_float_dtypes_match_ml_dtypes():
  for name, dt in [('fp8_e4m3', ml_dtypes.float8_e4m3fn), ('fp8_e5m2', ml_dtypes.float8_e5m2),
                   ('fp4_e2m1', ml_dtypes.float4_e2m1fn)]:
    assert np.dtype(parse_format(name).dtype) == np.dtype(dt)


def test_to_grid_from_grid_roundtrip_under_jit():
  fmt = parse_format('int4')
  f = jax.jit(lambda y: formats.from_grid(formats.to_grid(y, fmt), fmt))
  np.testing.assert_array_equal(f(jnp.array([-9.0, -0.5, 0.5, 6.6])), [-8.0, 0.0, 0.0, 7.0])
