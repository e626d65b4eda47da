"""qjax.calibration: each method against numpy on known arrays, mse search, po2 scales, degenerate tensors."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QuantSpec, calibrate, fake_quant, formats, quantize
from qjax import calibration as cal

X = np.array([[0.5, -3.0, 2.0, 1.0],
              [-8.0, 4.0, 0.25, -1.0],
              [0.0, 0.0, 6.0, -0.5]], np.float32)


def test_absmax_per_tensor_and_per_channel():
  s, z = calibrate(jnp.asarray(X), QuantSpec())
  assert z is None and s.shape == (1, 1)
  np.testing.assert_allclose(s, [[8.0 / 127]], rtol=1e-7)
  s, _ = calibrate(jnp.asarray(X), QuantSpec(granularity='per_channel', axis=0))
  np.testing.assert_allclose(s, np.abs(X).max(1, keepdims=True) / 127, rtol=1e-7)
  s, _ = calibrate(jnp.asarray(X), QuantSpec(granularity='per_channel', axis=1, format='int4'))
  np.testing.assert_allclose(s, np.abs(X).max(0, keepdims=True) / 7, rtol=1e-7)
  s, _ = calibrate(jnp.asarray(X), QuantSpec(granularity='per_group', group_size=2, format='fp8_e4m3'))
  amax = np.abs(X).reshape(3, 2, 2).max(-1)
  np.testing.assert_allclose(s, np.where(amax > 0, amax / 448, 1.0), rtol=1e-7)  # The all-zero group gets 1.
  s, _ = calibrate(jnp.asarray(X), QuantSpec(format='nf4'))
  np.testing.assert_allclose(s, [[8.0]], rtol=1e-7)


def test_minmax():
  spec = QuantSpec(format='uint8', scheme='asymmetric', calibration='minmax', granularity='per_channel', axis=0)
  s, z = calibrate(jnp.asarray(X), spec)
  lo = np.minimum(X.min(1, keepdims=True), 0)
  hi = np.maximum(X.max(1, keepdims=True), 0)
  np.testing.assert_allclose(s, (hi - lo) / 255, rtol=1e-6)
  np.testing.assert_array_equal(z, np.round(0 - lo / ((hi - lo) / 255)).astype(np.int32))
  np.testing.assert_array_equal(z, [[153], [170], [20]])  # 3 / (5/255), 8 / (12/255), 0.5 / (6.5/255) = 19.6
  # Signed grid: zero_point = round(qmin - lo / scale).
  spec = QuantSpec(format='int8', scheme='asymmetric', calibration='minmax')
  s, z = calibrate(jnp.asarray(X), spec)
  np.testing.assert_allclose(s, [[14.0 / 255]], rtol=1e-6)
  assert int(z[0, 0]) == round(-128 + 8.0 / (14.0 / 255))  # -128 + 145.7 -> 18


def test_minmax_range_contains_zero():
  # All-positive data: lo = 0, so zero_point = qmin and 0.0 is a grid point.
  x = jnp.asarray([[1.0, 2.0, 3.0]])
  s, z = calibrate(x, QuantSpec(format='uint8', scheme='asymmetric', calibration='minmax'))
  np.testing.assert_allclose(s, [[3.0 / 255]], rtol=1e-7)
  assert int(z[0, 0]) == 0
  s, z = calibrate(-x, QuantSpec(format='int4', scheme='asymmetric', calibration='minmax'))
  np.testing.assert_allclose(s, [[3.0 / 15]], rtol=1e-7)
  assert int(z[0, 0]) == 7  # round(-8 + 3 / 0.2) = 7 = qmax: 0.0 is the top of the grid.


@pytest.mark.parametrize('p', [50.0, 90.0, 99.0, 99.9, 100.0])
def test_percentile_symmetric_matches_numpy(p):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 200)).astype(np.float32)
  spec = QuantSpec(calibration='percentile', percentile=p, granularity='per_channel', axis=0)
  s, _ = calibrate(jnp.asarray(x), spec)
  np.testing.assert_allclose(s, np.percentile(np.abs(x), p, axis=1, keepdims=True) / 127, rtol=1e-5)
  spec = QuantSpec(calibration='percentile', percentile=p)
  s, _ = calibrate(jnp.asarray(x), spec)
  np.testing.assert_allclose(s, [[np.percentile(np.abs(x), p) / 127]], rtol=1e-5)


def test_percentile_asymmetric_matches_numpy():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((4, 64)) + 0.5).astype(np.float32)
  spec = QuantSpec(format='uint8', scheme='asymmetric', calibration='percentile', percentile=95.0,
                   granularity='per_group', group_size=32)
  s, z = calibrate(jnp.asarray(x), spec)
  g = x.reshape(4, 2, 32)
  lo = np.minimum(np.percentile(g, 5.0, axis=-1), 0)
  hi = np.maximum(np.percentile(g, 95.0, axis=-1), 0)
  np.testing.assert_allclose(s, (hi - lo) / 255, rtol=1e-5)
  np.testing.assert_array_equal(z, np.round(-lo / ((hi - lo) / 255)))


def test_percentile_on_known_array():
  # |x| = 0..99: the 90th percentile (linear interpolation) is 89.1.
  x = jnp.arange(100.0).reshape(1, 100) * jnp.where(jnp.arange(100) % 2 == 0, 1.0, -1.0)
  s, _ = calibrate(x, QuantSpec(calibration='percentile', percentile=90.0))
  np.testing.assert_allclose(s, [[89.1 / 127]], rtol=1e-6)


def test_statistics_ignore_nan_and_inf():
  x = jnp.asarray([[1.0, -2.0, np.nan, np.inf, -np.inf]])
  np.testing.assert_allclose(calibrate(x, QuantSpec())[0], [[2.0 / 127]], rtol=1e-7)
  s, z = calibrate(x, QuantSpec(format='uint8', scheme='asymmetric', calibration='minmax'))
  np.testing.assert_allclose(s, [[3.0 / 255]], rtol=1e-6)
  s, _ = calibrate(x, QuantSpec(calibration='percentile', percentile=100.0))
  np.testing.assert_allclose(s, [[2.0 / 127]], rtol=1e-6)
  s, _ = calibrate(x, QuantSpec(calibration='mse'))
  assert np.isfinite(s).all()


def test_non_finite_per_channel_under_jit_and_vmap():
  # absmax/minmax take a one-pass reduction and redo it with non-finite values masked only when needed: the
  # channels without inf/NaN must come out the same either way.
  x = np.array([[1.0, -2.0, 3.0], [np.inf, 0.5, -np.nan], [-4.0, 1.0, 2.0]], np.float32)
  spec = QuantSpec(granularity='per_channel', axis=1)
  expected = np.array([[4.0, 2.0, 3.0]]) / 127
  for f in (lambda x: calibrate(x, spec)[0], jax.jit(lambda x: calibrate(x, spec)[0])):
    np.testing.assert_allclose(f(jnp.asarray(x)), expected, rtol=1e-7)
    np.testing.assert_allclose(f(jnp.asarray(np.nan_to_num(x, posinf=4.0, nan=0.0))), expected, rtol=1e-7)
  batch = jnp.asarray(np.stack([x, np.nan_to_num(x, posinf=0.0, nan=0.0)]))
  np.testing.assert_allclose(jax.vmap(lambda x: calibrate(x, spec)[0])(batch), np.stack([expected] * 2), rtol=1e-7)
  aspec = QuantSpec(format='uint8', scheme='asymmetric', calibration='minmax', granularity='per_channel', axis=1)
  s, z = jax.jit(lambda x: calibrate(x, aspec))(jnp.asarray(x))
  np.testing.assert_allclose(s, [[5.0 / 255, 3.0 / 255, 3.0 / 255]], rtol=1e-6)


def test_binary_uses_mean_abs():
  x = jnp.asarray([[1.0, -3.0], [0.5, 0.5]])
  s, z = calibrate(x, QuantSpec(format='int1', granularity='per_channel', axis=0))
  assert z is None
  np.testing.assert_allclose(s, [[2.0], [0.5]], rtol=1e-7)
  np.testing.assert_allclose(fake_quant(x, QuantSpec(format='int1', granularity='per_channel', axis=0)),
                             [[2.0, -2.0], [0.5, 0.5]], rtol=1e-7)


# -------------------------------------------------------------------------------------------------- mse


def _sq_err(x, spec, scale, zero_point=None):
  return float(jnp.sum(jnp.square(fake_quant(x, spec, {'scale': scale, 'zero_point': zero_point}) - x)))


@pytest.mark.parametrize('fmt', ['int4', 'int8', 'fp4_e2m1', 'nf4'])
def test_mse_not_worse_than_absmax(fmt):
  rng = np.random.default_rng(2)
  for x in (rng.standard_normal((1, 4096)), rng.uniform(-1, 1, (1, 4096))):
    x = jnp.asarray(x, jnp.float32)
    s_abs, _ = calibrate(x, QuantSpec(format=fmt))
    s_mse, _ = calibrate(x, QuantSpec(format=fmt, calibration='mse'))
    ratio = float(s_mse[0, 0] / s_abs[0, 0])
    assert 0.2 - 1e-6 <= ratio <= 1.0 + 1e-6
    assert _sq_err(x, QuantSpec(format=fmt), s_mse) <= _sq_err(x, QuantSpec(format=fmt), s_abs)


@pytest.mark.parametrize('fmt', ['int4', 'int8'])
def test_mse_strictly_better_on_heavy_tails(fmt):
  # Student-t(2) has a few huge values: absmax spends the grid on them, clipping them is cheaper overall.
  x = jnp.asarray(np.random.default_rng(3).standard_t(2, (1, 8192)), jnp.float32)
  spec = QuantSpec(format=fmt)
  s_abs, _ = calibrate(x, spec)
  s_mse, _ = calibrate(x, spec.replace(calibration='mse'))
  assert float(s_mse[0, 0]) < float(s_abs[0, 0])
  assert _sq_err(x, spec, s_mse) < _sq_err(x, spec, s_abs)
  # The chosen ratio is the best of the searched grid.
  errs = [_sq_err(x, spec, s_abs * r) for r in cal.MSE_RATIOS]
  assert _sq_err(x, spec, s_mse) <= min(errs) * (1 + 1e-5)


def test_mse_asymmetric_and_per_channel():
  rng = np.random.default_rng(4)
  x = np.abs(rng.standard_t(2, (8, 2048))).astype(np.float32) + 0.1
  x = jnp.asarray(x)
  spec = QuantSpec(format='uint4', scheme='asymmetric', calibration='minmax', granularity='per_channel', axis=0)
  s_mm, z_mm = calibrate(x, spec)
  s_mse, z_mse = calibrate(x, spec.replace(calibration='mse'))
  assert s_mse.shape == z_mse.shape == (8, 1)
  err = lambda s, z: np.sum(np.square(np.asarray(fake_quant(x, spec, {'scale': s, 'zero_point': z}) - x)), axis=1)
  e_mm, e_mse = err(s_mm, z_mm), err(s_mse, z_mse)
  assert np.all(e_mse <= e_mm * (1 + 1e-6))
  assert np.all(e_mse < e_mm)  # Heavy tails in every row.


# -------------------------------------------------------------------------------------------------- po2


@pytest.mark.parametrize('spec', [
    QuantSpec(po2_scale=True),
    QuantSpec(po2_scale=True, format='int4', granularity='per_channel', axis=0),
    QuantSpec(po2_scale=True, calibration='percentile', percentile=99.0, granularity='per_channel', axis=0),
    QuantSpec(po2_scale=True, calibration='mse', granularity='per_channel', axis=0),
    QuantSpec(po2_scale=True, format='fp8_e4m3', granularity='per_channel', axis=0),
    QuantSpec(po2_scale=True, format='uint8', scheme='asymmetric', calibration='minmax', granularity='per_channel',
              axis=0),
], ids=lambda s: f'{s.format}-{s.calibration}-{s.granularity}')
def test_po2_scales(spec):
  rng = np.random.default_rng(5)
  # Magnitudes over a wide range, including exact powers of two (2^13 once gave floor(log2) = 12 on XLA:CPU).
  x = rng.standard_normal((24, 64)) * np.exp2(np.arange(-12, 36, 2))[:, None]
  x[3] = 0.0
  x[4, :] = 2.0 ** 13
  x[5, 0] = 127 * 2.0 ** 5
  x = jnp.asarray(x, jnp.float32)
  s, z = calibrate(x, spec)
  plain, _ = calibrate(x, spec.replace(po2_scale=False))
  s, plain = np.asarray(s, np.float64), np.asarray(plain, np.float64)
  np.testing.assert_array_equal(np.exp2(np.round(np.log2(s))), s)
  if spec.calibration != 'mse':  # mse searches its ratio among po2 scales: not comparable to the plain search.
    assert np.all(s >= plain)
    assert np.all(s < 2 * plain)  # The *next* power of two, not a larger one.
  # A scale that already is a power of two stays.
  np.testing.assert_array_equal(np.asarray(cal.po2(jnp.asarray(np.exp2(np.arange(-126, 128.0)), jnp.float32))),
                                np.exp2(np.arange(-126, 128.0)).astype(np.float32))


def test_po2_exact():
  v = jnp.asarray([2.0 ** 13, 2.0 ** 13 + 1, 3.0, 0.75, 2.0 ** -20, 1.0, 0.9999999], jnp.float32)
  np.testing.assert_array_equal(cal.po2(v), [2.0 ** 13, 2.0 ** 14, 4.0, 1.0, 2.0 ** -20, 1.0, 1.0])
  np.testing.assert_array_equal(jax.jit(cal.po2)(v), cal.po2(v))


@pytest.mark.parametrize('fmt, emax', [('mxfp8', 8), ('mxfp4', 2), ('mxint8', 6)])
def test_mx_scale_at_powers_of_two(fmt, emax):
  # amax exactly 2^k -> scale 2^(k - emax) exactly (floor(log2 2^k) = k), for every k across f32's range.
  ks = np.arange(-100, 100)
  x = np.zeros((len(ks), 32), np.float32)
  x[:, 0] = np.exp2(ks)
  s, _ = calibrate(jnp.asarray(x), QuantSpec(format=fmt))
  np.testing.assert_array_equal(np.asarray(s)[:, 0], np.exp2(ks - emax).astype(np.float32))
  # So the block maximum is never saturated when it is a power of two.
  y = fake_quant(jnp.asarray(x), QuantSpec(format=fmt))
  np.testing.assert_array_equal(np.asarray(y)[:, 0], x[:, 0])


def test_mx_tiny_blocks_stay_finite():
  x = jnp.full((2, 32), 1e-37, jnp.float32).at[1].set(3e-38)
  for fmt in ('mxfp8', 'mxfp4', 'mxint8'):
    s, _ = calibrate(x, QuantSpec(format=fmt))
    assert np.all(np.asarray(s) > 0)
    assert np.all(np.isfinite(np.asarray(fake_quant(x, QuantSpec(format=fmt)))))


# -------------------------------------------------------------------------------------- degenerate tensors


SYM_FORMATS = ['int8', 'int4', 'int1', 'uint8', 'fp8_e4m3', 'fp8_e5m2', 'fp4_e2m1', 'nf4', 'mxfp8', 'mxfp4', 'mxint8']


def _degenerate():
  return {'zeros': np.zeros((4, 64), np.float32), 'const': np.full((4, 64), 3.0, np.float32),
          'neg_const': np.full((4, 64), -0.7, np.float32), 'tiny': np.full((4, 64), 1e-30, np.float32)}


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel', 'per_group'])
@pytest.mark.parametrize('calibration', ['absmax', 'percentile', 'mse'])
@pytest.mark.parametrize('fmt', SYM_FORMATS)
def test_degenerate_symmetric(fmt, calibration, granularity):
  kw = {'per_group': dict(group_size=32)}.get(granularity, {})
  spec = QuantSpec(format=fmt, calibration=calibration, granularity=granularity, **kw)
  for name, x in _degenerate().items():
    x = jnp.asarray(x)
    s, z = calibrate(x, spec)
    assert np.all(np.isfinite(s)), name
    if fmt == 'int1' and name == 'zeros':  # binary: scale 0 is the least-squares scale of zeros
      assert np.all(np.asarray(s) == 0), name
    else:
      assert np.all(np.asarray(s) > 0), name
    y = fake_quant(x, spec)
    assert np.all(np.isfinite(np.asarray(y))), name
    if name == 'zeros':
      np.testing.assert_array_equal(y, 0.0)
    g = jax.grad(lambda x: fake_quant(x, spec).sum())(x)
    assert np.all(np.isfinite(np.asarray(g))), name


@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel', 'per_group'])
@pytest.mark.parametrize('calibration', ['minmax', 'percentile', 'mse'])
@pytest.mark.parametrize('fmt', ['uint8', 'int8', 'int4', 'uint1', 'int2'])
def test_degenerate_asymmetric(fmt, calibration, granularity):
  kw = {'per_group': dict(group_size=32)}.get(granularity, {})
  spec = QuantSpec(format=fmt, scheme='asymmetric', calibration=calibration, granularity=granularity, **kw)
  for name, x in _degenerate().items():
    x = jnp.asarray(x)
    s, z = calibrate(x, spec)
    assert np.all(np.isfinite(s)) and np.all(np.asarray(s) > 0), name
    assert z.dtype == jnp.int32
    y = fake_quant(x, spec)
    assert np.all(np.isfinite(np.asarray(y))), name
    if name == 'zeros':
      np.testing.assert_array_equal(y, 0.0)
    if name in ('const', 'neg_const') and fmt != 'uint1':
      # The range [min(c, 0), max(c, 0)] has c at one end: c is a grid point (up to f32 rounding).
      np.testing.assert_allclose(y, x, rtol=1e-6)


def test_binary_all_zero_tensor():
  # XNOR-Net's scale mean|x| is 0 here and the least-squares answer is 0 * sign(x) = 0; ones is the worst answer
  # on the binary grid (error 1 per element, whereas any scale below 1 does better).
  y = fake_quant(jnp.zeros((4, 8)), QuantSpec(format='int1'))
  np.testing.assert_array_equal(y, 0.0)


def test_degenerate_quantize_po2():
  spec = QuantSpec(po2_scale=True)
  for x in _degenerate().values():
    q = quantize(jnp.asarray(x), spec)
    assert np.all(np.isfinite(np.asarray(q.scale))) and np.all(np.asarray(q.scale) > 0)


# ------------------------------------------------------------------------------------------------ errors


def test_calibration_must_fit_scheme():
  with pytest.raises(ValueError, match=r'calibration="minmax" does not fit scheme="symmetric"'):
    QuantSpec(calibration='minmax')
  with pytest.raises(ValueError, match=r'calibration="absmax" does not fit scheme="asymmetric".*minmax'):
    QuantSpec(scheme='asymmetric', format='uint8')
  with pytest.raises(ValueError,
                     match=r"calibration='max' is not one of absmax, absmax_half_step, minmax, percentile, mse"):
    QuantSpec(calibration='max')


def test_grid_max():
  assert formats.grid_max(formats.parse_format('int8')) == 127
  assert formats.grid_max(formats.parse_format('uint4')) == 15
  assert formats.grid_max(formats.parse_format('fp8_e5m2')) == 57344
  assert formats.grid_max(formats.parse_format('nf4')) == 1.0
  assert formats.grid_max(formats.parse_format('mxfp4')) == 6.0


@pytest.mark.parametrize('fmt', ['int8', 'int8n', 'int4', 'uint8', 'fp8_e4m3'])
def test_absmax_lands_inside_the_grid_so_the_clipped_ste_passes_it(fmt):
  """amax * (1 / scale) <= grid_max for every absmax: two roundings used to leave it 1 ulp beyond (about a quarter
  of int8 ranges, e.g. absmax 30.296362), where the clipped STE's mask gave the largest element a zero gradient.
  The scale moves by at most 2 ulp from amax / grid_max."""
  spec = QuantSpec(format=fmt, estimator='clipped_ste')
  rng = np.random.default_rng(0)
  a = np.concatenate([[30.296362], np.abs(rng.normal(size=2000)) * np.exp2(rng.integers(-20, 20, 2000))])
  a = jnp.asarray(a, jnp.float32)
  steps = formats.grid_max(spec.fmt)
  scale = jax.vmap(lambda v: cal.calibrate(jnp.stack([v, v / 3]), spec)[0][0])(a)
  assert float(jnp.max(a * (1.0 / scale))) <= steps
  ulps = (scale.view(jnp.int32) - (a * np.float32(1 / steps)).view(jnp.int32))
  assert int(jnp.min(ulps)) >= 0 and int(jnp.max(ulps)) <= 2
  x = jnp.float32([30.296362, 30.296362 / 3, 30.296362 / 2])  # eager, as a user calls it
  g = jax.grad(lambda v: fake_quant(v, spec).sum())(x)
  np.testing.assert_array_equal(g, [1.0, 1.0, 1.0])


@pytest.mark.parametrize('sshape', [(1, 1, 1), (1, 1, 64), (8, 1, 1), (8, 1, 64), (1, 48, 1)])
def test_absmax_and_minmax_of_activations_with_no_long_axis(sshape):
  """A (batch, seq, features) activation with no axis long enough to block is reduced in one stage: the same
  statistics as numpy's, non-finite values ignored."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 48, 64)).astype(np.float32) * np.exp2(rng.integers(-3, 4, (8, 1, 64)))
  x[1, 2, 3], x[5, 40, 60], x[7, 0, 0] = np.nan, np.inf, -np.inf
  finite = np.where(np.isfinite(x), x, 0.0)
  axes = tuple(d for d, s in enumerate(sshape) if s == 1)
  np.testing.assert_array_equal(jax.jit(cal.absmax, static_argnums=1)(jnp.asarray(x), sshape),
                                np.abs(finite).max(axis=axes, keepdims=True))
  lo, hi = jax.jit(cal.minmax, static_argnums=1)(jnp.asarray(x), sshape)
  np.testing.assert_array_equal(lo, np.minimum(finite.min(axis=axes, keepdims=True), 0))
  np.testing.assert_array_equal(hi, np.maximum(finite.max(axis=axes, keepdims=True), 0))


@pytest.mark.parametrize('poison', [False, True])
@pytest.mark.parametrize('shape,sshape', [((32, 128, 4, 32), (1, 1, 1, 1)), ((32, 4, 128, 32), (1, 4, 1, 1)),
                                          ((8, 48, 64), (8, 1, 1)), ((64, 64, 32), (1, 1, 1)),
                                          ((64, 7, 7, 16), (1, 1, 1, 1)), ((8, 64, 96), (1, 1, 96)),
                                          ((96, 40), (1, 40))])
def test_blocked_ranges_give_numpys_statistics_and_write_no_keys(shape, sshape, poison):
  """With no long axis, a range takes its first stage in blocks of 32 along a shorter axis before the last, or
  along the last axis (`calibration.first_stage_axis`): numpy's statistics (non-finite values ignored, or with
  poison a non-finite group statistic), and the compiled program writes no int32 keys at the size of x (XLA:CPU's
  reduce-windows would read them from a copy)."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=shape).astype(np.float32) * np.exp2(rng.integers(-3, 4, shape[:1] + (1,) * (len(shape) - 1)))
  x.flat[7], x.flat[x.size // 2 + 3], x.flat[-1] = np.nan, np.inf, -np.inf
  finite = np.where(np.isfinite(x), x, 0.0)
  axes = tuple(d for d, s in enumerate(sshape) if s == 1)
  bad = (~np.isfinite(x)).any(axis=axes, keepdims=True)
  amax = jax.jit(cal.absmax, static_argnums=(1, 2))(jnp.asarray(x), sshape, poison)
  want = np.abs(finite).max(axis=axes, keepdims=True)
  np.testing.assert_array_equal(np.where(bad, 0, amax), np.where(bad, 0, want))
  assert np.all(np.isfinite(amax) != bad) if poison else np.all(np.isfinite(amax))
  lo, hi = jax.jit(cal.minmax, static_argnums=(1, 2))(jnp.asarray(x), sshape, poison)
  ok = ~bad if poison else np.ones_like(bad)
  np.testing.assert_array_equal(lo[ok], np.minimum(finite.min(axis=axes, keepdims=True), 0)[ok])
  np.testing.assert_array_equal(hi[ok], np.maximum(finite.max(axis=axes, keepdims=True), 0)[ok])
  hlo = jax.jit(cal.absmax, static_argnums=(1, 2)).lower(jnp.zeros(shape), sshape, poison).compile().as_text()
  entry = hlo[hlo.index('ENTRY'):]  # the program's buffers (fused computations' insides are not written)
  written = [math.prod(map(int, filter(None, d.split(',')))) for d in re.findall(r'= s32\[([\d,]*)\]', entry)]
  assert written and max(written) <= x.size // 32, f'int32 keys written at x\'s size {x.size}: {written}'


def test_first_stage_axis_by_hand():
  """A long axis first (the longest groups); else the reduced axis before the last nearest it whose groups hold
  whole blocks of 32; else the last axis if reduced whole in whole blocks; else one stage."""
  f = cal.first_stage_axis
  assert f((4096, 128), (1, 1)) == 0              # a long axis
  assert f((2048, 4096), (1, 1)) == 1             # the longer one
  assert f((32, 128, 512), (1, 1, 1)) == 1        # seq, the reduced axis nearest the last (not the batch)
  assert f((32, 128, 512), (1, 1, 512)) == 1      # per feature: the kept last axis is never blocked
  assert f((32, 128, 4, 32), (1, 1, 1, 1)) == 1   # 4 heads hold no whole block
  assert f((32, 4, 128, 32), (1, 4, 1, 1)) == 2
  assert f((256, 28, 28, 16), (1, 1, 1, 1)) == 0  # only the batch holds whole blocks
  assert f((8, 48, 64), (8, 1, 1)) == 2           # per row: 48 holds no whole blocks, so the last axis
  assert f((64, 96), (2, 1)) == 0                 # two groups of 32 rows: one block each
  assert f((64, 40), (1, 40)) == 0
  assert f((16, 8, 4, 32), (1, 1, 1, 1)) == 3     # nothing before the last axis holds a block
  assert f((256, 28, 28, 16), (1, 1, 1, 16)) == 0
  assert f((3, 3, 16, 16), (1, 1, 1, 16)) is None  # a conv kernel per output feature: no axis holds a block
  assert f((4, 4, 32), (1, 1, 1)) is None          # 1024 elements at least
  # A short leading axis (the batch) only where each of the devices' shards holds whole blocks.
  ones = (1, 1, 1, 1)
  assert f((256, 28, 28, 16), ones, devices=8) == 0 and f((128, 28, 28, 16), ones, devices=4) == 0
  assert f((128, 28, 28, 16), ones, devices=8) is None and f((96, 14, 14, 16), ones, devices=2) is None
  assert f((64, 64, 32), (1, 1, 1), devices=8) == 1  # seq, not the batch: its rule is unchanged
  assert f((64, 32), (1, 1), devices=8) == 1         # the batch left alone, the last axis blocked
  assert f((4096, 128), (1, 1), devices=256) == 0    # a long axis, as before
