"""Numerics never hide a problem: non-finite values, zero-size operands, ranges at the float
limits, binary grids of zeros, specs that mean nothing, unsigned grids meeting negatives, the half-step absmax."""

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import calibration, metrics, ops
from qjax.ops.config import DotConfig, MatmulConfig
from qjax.quantizers import dequantize, fake_quant, quantize
from qjax.spec import QuantSpec

dg = importlib.import_module('qjax.ops.dot_general')  # the module (qjax.ops.dot_general is the function)
DIMS = (((1,), (0,)), ((), ()))
PC = QuantSpec('int8', granularity='per_channel')


def _cfg(mode, small_m=0, spec=PC):
  return DotConfig(MatmulConfig(spec, spec, mode), MatmulConfig(spec, spec, mode), MatmulConfig(spec, spec, mode),
                   small_m=small_m)


def _bad(a):
  """Sorted indices of rows and of columns holding a non-finite value."""
  a = np.asarray(a)
  return sorted(set(np.nonzero(~np.isfinite(a).all(1))[0])), sorted(set(np.nonzero(~np.isfinite(a).all(0))[0]))


def _dot_and_grads(x, w, cfg, g=None, **kw):
  y, vjp = jax.vjp(lambda a, b: ops.dot_general(a, b, DIMS, config=cfg, **kw), x, w)
  return (y,) + vjp(jnp.ones_like(y) if g is None else g)


X = jax.random.normal(jax.random.key(0), (4, 64))
W = jax.random.normal(jax.random.key(1), (64, 32))


# ------------------------------------------------------------------------------------- NaN / inf, all modes


@pytest.mark.parametrize('case', ['lhs_nan', 'rhs_inf', 'grad_nan'])
def test_real_int8_keeps_nonfinite_rows_and_columns_like_fake(case):
  x, w, g = X, W, None
  if case == 'lhs_nan':
    x = x.at[1, 3].set(jnp.nan)
  elif case == 'rhs_inf':
    w = w.at[5, 7].set(jnp.inf)
  else:
    g = jnp.ones((4, 32)).at[2, 4].set(jnp.nan)
  fake = _dot_and_grads(x, w, _cfg('fake'), g)
  real = _dot_and_grads(x, w, _cfg('real'), g)
  for f, r in zip(fake, real, strict=True):
    assert _bad(f) == _bad(r)
  y, dx, dw = real
  if case == 'lhs_nan':    # row 1 of the product; its column 3 of x feeds every column of dW
    assert _bad(y) == ([1], list(range(32)))
    assert np.isfinite(np.asarray(y)[[0, 2, 3]]).all()
  elif case == 'rhs_inf':  # column 7 of the product, and every row of dX (g . W^T with the inf)
    assert _bad(y) == (list(range(4)), [7])
    assert np.isfinite(np.delete(np.asarray(y), 7, axis=1)).all()
  else:                    # dX row 2 (dlhs = g . W^T), dW column 4 (drhs = X^T . g); y is finite
    assert np.isfinite(np.asarray(y)).all()
    assert _bad(dx)[0] == [2] and _bad(dw)[1] == [4]


@pytest.mark.parametrize('rows', [1, 2, 8])
def test_nan_survives_whatever_the_batch_size_in_auto_mode(rows):
  # 'auto' routes 1-row products to fake mode; from 2 rows on they run in int8. A NaN row stays NaN either way.
  x = X[:1].repeat(rows, 0).at[0, 5].set(jnp.nan)
  y, dx, dw = _dot_and_grads(x, W, _cfg('auto', small_m=1))
  assert _bad(y)[0] == [0]
  assert not np.isfinite(np.asarray(dw)).any()  # drhs = X^T . g: the NaN row of X reaches every entry


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('kind', ['lsq', 'static'])
def test_learned_or_static_scale_real_mode_keeps_the_nan_row(kind, bad):
  """A learned (LSQ) or static (PTQ) forward scale: the op reduces the operand's non-finite flag per scale group,
  so the row of the product holding a NaN or an inf is non-finite in real mode as in fake mode, and row 0 of dW
  (X's column 0 held it) too; the other rows of the product stay finite."""
  s = QuantSpec('int8', granularity='per_channel', estimator='lsq' if kind == 'lsq' else 'ste')
  x = X.at[2, 0].set(bad)
  outs = {}
  for mode in ('fake', 'real'):
    cfg = DotConfig(MatmulConfig(s, PC, mode), MatmulConfig(PC, PC, mode), MatmulConfig(PC, PC, mode), small_m=0)
    f = lambda w, cfg=cfg: ops.dot_general(x, w, DIMS, config=cfg, lhs_params={'scale': jnp.full((4, 1), 0.05)})
    y, vjp = jax.vjp(f, W)
    outs[mode] = (y, vjp(jnp.ones_like(y))[0])
  for mode in ('fake', 'real'):
    y, dw = outs[mode]
    assert _bad(y)[0] == [2] and np.isfinite(np.asarray(y)[[0, 1, 3]]).all(), mode
    assert _bad(dw)[0] == [0], mode


def test_conv_real_int8_keeps_nan_in_its_example():
  x = jax.random.normal(jax.random.key(2), (3, 8, 8, 32)).at[1, 2, 2, 0].set(jnp.nan)
  w = jax.random.normal(jax.random.key(3), (3, 3, 32, 32))
  outs = {}
  for mode in ('fake', 'real'):
    f = lambda a, b, mode=mode: ops.conv_general_dilated(
        a, b, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), config=_cfg(mode))
    y, vjp = jax.vjp(f, x, w)
    outs[mode] = (y,) + vjp(jnp.ones_like(y))
  for mode in ('fake', 'real'):
    y, _, dw = outs[mode]
    assert [bool(np.isfinite(np.asarray(y[n])).all()) for n in range(3)] == [True, False, True]
    assert not np.isfinite(np.asarray(dw)).all()


def test_fake_quant_keeps_inf_and_nan():
  x = jnp.asarray([np.inf, -np.inf, np.nan, 2.0, 1e30])
  for fmt in ('int8', 'uint4', 'int1', 'fp8_e4m3', 'fp4_e2m1', 'nf4'):
    y = np.asarray(fake_quant(x, QuantSpec(fmt), {'scale': 1.0}))
    assert np.isposinf(y[0]) and np.isneginf(y[1]) and np.isnan(y[2]), fmt
    assert np.isfinite(y[3:]).all(), fmt
  q = quantize(x, QuantSpec('int8'), scale=1.0)  # qvalues stay on the grid: +-inf at the edges, NaN at 0
  np.testing.assert_array_equal(q.qvalue, [127, -128, 0, 2, 127])


# ----------------------------------------------------------------------------------------- zero-size operands


@pytest.mark.parametrize('spec', [QuantSpec(), QuantSpec(granularity='per_channel', axis=0),
                                  QuantSpec(granularity='per_channel', axis=1),
                                  QuantSpec('uint8', scheme='asymmetric', calibration='minmax'),
                                  QuantSpec('int4', granularity='per_group', axis=1, group_size=2)])
def test_zero_size_fake_quant_and_quantize(spec):
  x = jnp.zeros((0, 4))
  y = fake_quant(x, spec)
  assert y.shape == (0, 4) and y.dtype == x.dtype
  q = quantize(x, spec)
  assert q.qvalue.shape == (0, 4) and dequantize(q).shape == (0, 4)
  assert jax.grad(lambda x: fake_quant(x, spec).sum())(x).shape == (0, 4)


@pytest.mark.parametrize('mode', ['fake', 'real', 'auto'])
def test_zero_size_dot_general_like_jnp(mode):
  x, w = jnp.zeros((0, 8)), jnp.ones((8, 3))
  y, dx, dw = _dot_and_grads(x, w, _cfg(mode))
  ref = jnp.dot(x, w)
  assert y.shape == ref.shape == (0, 3)
  assert dx.shape == (0, 8)
  np.testing.assert_array_equal(dw, np.zeros((8, 3)))


# ----------------------------------------------------------------------------------- ranges at the float limits


def test_asymmetric_range_wider_than_f32_max():
  spec = QuantSpec('uint8', scheme='asymmetric', calibration='minmax')
  x = jnp.asarray([-3e38, 3e38, 0.0, 1e38, -1e38], jnp.float32)
  scale, zp = calibration.calibrate(x, spec)
  expected = np.float32(3e38) / np.float32(255) * 2  # (hi - lo) / 255, computed without overflow
  np.testing.assert_allclose(np.asarray(scale).item(), expected, rtol=1e-6)
  assert int(zp[0]) in (127, 128)
  y = np.asarray(fake_quant(x, spec))
  assert np.isfinite(y).all()
  assert np.all(np.abs(y - np.asarray(x)) <= np.asarray(scale).item() * (0.5 + 1e-4))  # f32 rounding of (q - z) s
  assert y[2] == 0.0


def test_f16_asymmetric_grid_end_saturates_instead_of_inf():
  # lo = -65504, hi = 300: scale = 65804 / 255, zero_point = round(65504 / scale) = 254, and the grid end
  # (0 - 254) * scale = -65545 lies beyond the f16 max 65504.
  spec = QuantSpec('uint8', scheme='asymmetric', calibration='minmax')
  x = jnp.asarray([-65504.0, 300.0, 0.0, 1.0], jnp.float16)
  scale, zp = calibration.calibrate(x, spec)
  assert int(zp[0]) == 254 and (0 - 254) * float(scale[0]) < -65504
  y = np.asarray(fake_quant(x, spec))
  assert np.isfinite(y).all()
  assert y[0] == np.float16(-65504.0)
  d = np.asarray(dequantize(quantize(x, spec), jnp.float16))
  assert np.isfinite(d).all() and d[0] == np.float16(-65504.0)


# ------------------------------------------------------------------------------------ binary grids of zeros


@pytest.mark.parametrize('estimator', ['clipped_ste', 'ewgs', 'ste'])
def test_int1_all_zero_group_lets_gradients_flow(estimator):
  spec = QuantSpec('int1', granularity='per_channel', axis=0, estimator=estimator)
  x = jnp.zeros((2, 4)).at[1].set(jnp.asarray([0.5, -1.0, 2.0, -0.25]))  # row 0: an all-zero group
  g = jnp.arange(1.0, 9.0).reshape(2, 4)
  y, vjp = jax.vjp(lambda x: fake_quant(x, spec), x)
  np.testing.assert_array_equal(y[0], np.zeros(4))  # scale 0: the zero group dequantizes to exactly 0
  (dx,) = vjp(g)
  # x = 0 lies inside the clip range [-0, 0]; EWGS's residual y - q = 0 - 1 scales by (1 - delta sign(g)).
  factor = 1.0 - spec.ewgs_delta if estimator == 'ewgs' else 1.0
  np.testing.assert_allclose(dx[0], np.asarray(g[0]) * factor, rtol=1e-6)


# ---------------------------------------------------------------------------------- specs that mean nothing


@pytest.mark.parametrize('kwargs, match', [
    (dict(granularity='per_tensor', group_size=32), 'group_size=32 only applies to granularity="per_group"'),
    (dict(granularity='per_channel', group_size=16), 'group_size=16 only applies'),
    (dict(granularity='per_group', group_size=-4), 'group_size must be >= 0'),
    (dict(format='int8', codebook=(-1.0, 0.0, 1.0)), 'codebook= only applies to format="codebook"'),
    (dict(format='codebook', codebook=(-2.0, 0.0, 1.0)), r'within \[-1, 1\].*-2.0'),
    (dict(granularity='per_channel', axis=1.5), 'axis must be an integer'),
    (dict(granularity='per_channel', axis=(0, 1.0)), 'axis must be an integer'),
    (dict(granularity='per_channel', axis=()), 'needs at least one channel axis'),  # silently per-tensor before
    (dict(ewgs_delta=float('nan')), 'ewgs_delta must be a finite number >= 0'),
    (dict(calibration='absmax_half_step', format='int8n'), 'needs scheme="symmetric" and one of int2..int8'),
    (dict(calibration='absmax_half_step', format='uint8'), 'absmax_half_step'),
    (dict(calibration='absmax_half_step', format='fp8_e4m3'), 'absmax_half_step'),
])
def test_meaningless_specs_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


def test_meaningful_specs_still_accepted():
  QuantSpec(format='codebook', codebook=(-1.0, -0.25, 0.5, 1.0))
  QuantSpec(granularity='per_channel', axis=np.int64(1))
  QuantSpec(granularity='per_channel', axis=(0, 1))
  QuantSpec(granularity='per_group', group_size=16)
  QuantSpec(format='mxfp4')  # MX formats set their own group
  QuantSpec(ewgs_delta=0.0)


# ------------------------------------------------------------------------ unsigned grids meeting negatives


def test_unsigned_symmetric_grid_warns_once_naming_the_op():
  dg._WARNED.clear()
  u = QuantSpec('uint8')
  cfg = DotConfig(fwd=MatmulConfig(u, QuantSpec('int8')))
  f = jax.jit(lambda x, w: ops.dot_general(x, w, DIMS, config=cfg))
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    f(jnp.abs(X), W).block_until_ready()  # non-negative: clips nothing
    jax.effects_barrier()
    assert not rec
    f(X, W).block_until_ready()
    f(X - 1, W).block_until_ready()
    ops.dot_general(X, W, DIMS, config=cfg)  # eager: checked on the spot
    jax.effects_barrier()
  msgs = [str(r.message) for r in rec]
  assert len(msgs) == 1, msgs
  assert 'dot_general fwd.lhs' in msgs[0] and "'uint8'" in msgs[0] and 'negative' in msgs[0]


def test_unsigned_check_is_no_effect_and_calls_the_host_only_for_negatives(monkeypatch):
  """The compiled check carries no effect (an effect takes a jitted function off JAX's fast dispatch path, even in
  a branch never taken), calls the host only when a negative value arrives (also under vmap), and leaves the
  result bit-equal to the same op without the check."""
  dg._WARNED.clear()
  calls = []
  host = dg._report_negatives
  monkeypatch.setattr(dg, '_report_negatives', lambda *a: (calls.append(a[-1]), host(*a))[1])
  u = QuantSpec('uint8')
  cfg = DotConfig(fwd=MatmulConfig(u, QuantSpec('int8'), 'real'))
  op = lambda x, w: ops.dot_general(x, w, DIMS, config=cfg, lhs_params={'scale': jnp.float32(2.0 ** -6)})
  assert not jax.make_jaxpr(op)(X, W).effects
  f = jax.jit(op)
  pos = jnp.abs(X)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    y = f(pos, W)
    assert not calls and not rec
    f(X, W).block_until_ready()
    assert len(calls) == 1 and bool(np.all(calls[0]))
    assert len([r for r in rec if 'unsigned' in str(r.message)]) == 1
    dg._WARNED.clear()
    jax.jit(jax.vmap(op, in_axes=(0, None)))(jnp.stack([pos, X]), W).block_until_ready()
    assert len(calls) == 2 and np.asarray(calls[1]).tolist() == [False, True]
  fake = DotConfig(fwd=MatmulConfig(u, QuantSpec('int8'), 'fake'))
  dg._WARNED.clear()
  with warnings.catch_warnings(record=True) as rec:  # a fake-mode matmul reads x_hat, which carries the check
    warnings.simplefilter('always')
    jax.jit(lambda x, w: ops.dot_general(x, w, DIMS, config=fake))(X, W).block_until_ready()
    assert len(calls) == 3 and len([r for r in rec if 'unsigned' in str(r.message)]) == 1
  monkeypatch.setattr(dg, 'warn_if_clipping_negatives', lambda *a: None)
  np.testing.assert_array_equal(y, jax.jit(lambda x, w: op(x, w))(pos, W))  # a new function: traced again


def test_signed_and_pact_grids_do_not_warn():
  dg._WARNED.clear()
  p = QuantSpec('uint4', estimator='pact')
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    ops.dot_general(X, W, DIMS, config=DotConfig(fwd=MatmulConfig(PC, PC)))
    ops.dot_general(X, W, DIMS, config=DotConfig(fwd=MatmulConfig(p, None)), lhs_params={'alpha': 2.0})
  assert not [r for r in rec if 'unsigned' in str(r.message)]


# ------------------------------------------------------------------------------ the half-step absmax option


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_absmax_half_step_integer_edges(bits):
  qmax = 2 ** (bits - 1) - 1
  spec = QuantSpec(f'int{bits}', calibration='absmax_half_step')
  a = 3.0
  x = jnp.asarray([-a, a, 0.0, a / (qmax + 0.5) * 1.25, -a / (qmax + 0.5) * 0.75])
  scale, _ = calibration.calibrate(x, spec)
  assert float(scale[0]) == np.float32(a) * np.float32((1 - 2 ** -20) / (qmax + 0.5))
  q = quantize(x, spec)
  # -absmax -> -(qmax + 0.5) (a hair beyond) -> -(qmax + 1); +absmax -> qmax + 0.5 -> clipped to qmax.
  np.testing.assert_array_equal(q.qvalue, [-(qmax + 1), qmax, 0, 1, -1])
  y = np.asarray(fake_quant(x, spec))
  s = float(scale[0])
  np.testing.assert_array_equal(y[:3], np.float32([-(qmax + 1) * s, qmax * s, 0.0]))
  assert np.all(np.abs(y - np.asarray(x)) <= s * (0.5 + 2e-4))  # half a step (plus (qmax + 1/2) 2^-20) at most
  # The default absmax keeps the -(qmax + 1) end unused.
  np.testing.assert_array_equal(quantize(x[:2], QuantSpec(f'int{bits}')).qvalue, [-qmax, qmax])


def test_absmax_half_step_lowers_int4_error_on_gaussian_weights():
  w = jax.random.normal(jax.random.key(7), (512, 256))
  err = {}
  for cal in ('absmax', 'absmax_half_step'):
    spec = QuantSpec('int4', granularity='per_channel', axis=1, calibration=cal)
    err[cal] = float(jnp.mean(jnp.square(fake_quant(w, spec) - w)))
  assert err['absmax_half_step'] < 0.9 * err['absmax'], err


def test_absmax_half_step_real_equals_fake():
  s = QuantSpec('int8', granularity='per_channel', calibration='absmax_half_step', po2_scale=True)
  y = {m: ops.dot_general(X, W, DIMS, config=DotConfig(fwd=MatmulConfig(s, s, m), small_m=0))
       for m in ('fake', 'real')}
  np.testing.assert_array_equal(y['fake'], y['real'])
  assert qjax.QuantSpec.from_dict(s.to_dict()) == s


# ------------------------------------------------------------- non-finite values in mean-based statistics


def test_int1_scale_is_the_mean_over_finite_values():
  """XNOR-Net's scale mean|x| over the values actually quantized: a NaN or inf is neither summed nor counted."""
  spec = QuantSpec(format='int1')
  x = jnp.float32([1.0, -3.0, jnp.nan, jnp.inf, -jnp.inf])
  np.testing.assert_array_equal(calibration.calibrate(x, spec)[0], [2.0])
  np.testing.assert_array_equal(fake_quant(x, spec), [2.0, -2.0, np.nan, np.inf, -np.inf])
  only_bad = jnp.float32([jnp.nan, jnp.inf])
  np.testing.assert_array_equal(calibration.calibrate(only_bad, spec)[0], [1.0])  # no finite value: neutral
  assert np.isnan(calibration.calibrate(x, spec, poison=True)[0][0])


def test_lsq_init_ignores_non_finite_values():
  """s0 = 2 mean|x| / sqrt(Q_P) over the finite elements: one inf used to make s0 inf and every output NaN."""
  spec = QuantSpec(format='int4', estimator='lsq')
  x = jnp.float32([1.0, -1.0, 0.5, 1.5, jnp.inf, jnp.nan])
  s0 = qjax.init_params(x, spec)['scale']
  np.testing.assert_allclose(s0, [2.0 * 1.0 / np.sqrt(7.0)], rtol=1e-6)
  y = fake_quant(x, spec, qjax.init_params(x, spec))
  assert np.all(np.isfinite(y[:4])) and y[4] == np.inf and np.isnan(y[5])


# ------------------------------------------------------------------------- stochastic binarization


def test_int1_stochastic_rounding_is_binaryconnect():
  """+1 with probability clip((1 + y) / 2, 0, 1): at y = 0.2 exactly when u >= 0.4; unbiased on [-1, 1]."""
  fmt = QuantSpec(format='int1').fmt
  y = jnp.full((7,), 0.2, jnp.float32)
  u = jnp.float32([0.0, 0.39, 0.3999999, 0.4, 0.41, 0.9, 0.99999994])
  np.testing.assert_array_equal(qjax.formats.grid_values(y, fmt, u), [-1, -1, -1, 1, 1, 1, 1])
  edges = jnp.float32([-1.0, 1.0, -1.5, 1.5, 0.0])
  np.testing.assert_array_equal(qjax.formats.grid_values(edges, fmt, jnp.zeros(5)), [-1, 1, -1, 1, -1])
  np.testing.assert_array_equal(qjax.formats.grid_values(edges, fmt, jnp.full(5, 0.99999994)), [-1, 1, -1, 1, 1])
  one = {'scale': jnp.float32(1.0)}
  spec = QuantSpec(format='int1', rounding='stochastic')
  for v in (0.2, -0.7):
    out = fake_quant(jnp.full((100_000,), v, jnp.float32), spec, one, key=jax.random.key(0))
    assert abs(float(out.mean()) - v) < 0.015  # 0.015 is > 4 standard errors (sqrt(1 - v^2) / 316)


# ------------------------------------------------------------------------------------ clip_fraction


@pytest.mark.parametrize('fmt, inside, beyond', [
    ('int8', [127.49, -128.49], [127.51, -128.51]),
    ('fp8_e4m3', [463.0, -463.0], [465.0, -465.0]),  # top binade step 32: half a step 16 beyond 448
    ('nf4', [1.13, -1.15], [1.15, -1.16]),  # half NF4's end gaps: (1 - 0.7230) / 2, (1 - 0.6962) / 2
])
def test_clip_fraction_counts_values_beyond_half_the_end_step(fmt, inside, beyond):
  one = {'scale': jnp.float32(1.0)}
  spec = QuantSpec(format=fmt)
  x = jnp.float32(inside + beyond + [0.1, 0.2, 0.3, jnp.nan])
  np.testing.assert_allclose(metrics.clip_fraction(x, spec, one), 2 / 7)


def test_sqnr_is_inf_when_exact_also_for_zeros():
  z = jnp.zeros(8)
  assert float(metrics.sqnr_db(z, z)) == np.inf and float(metrics.sqnr_db(X, X)) == np.inf
  np.testing.assert_allclose(metrics.sqnr_db(jnp.ones(4), jnp.ones(4) * 1.1), 20.0, rtol=1e-5)  # 10 log10(1 / 0.01)
