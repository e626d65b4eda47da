"""qjax.estimators: each estimator's gradients against numbers derived by hand from the formulas.

Every expected value below is written from the update rules (Esser et al. 2020 for LSQ,
Bhalgat et al. 2020 for LSQ+, Choi et al. 2018 for PACT, Lee et al. 2021 for EWGS), not by calling qjax.
The cotangent is a weight vector w (loss = sum(w * fake_quant(x))), so each element's gradient shows up.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from qjax import QuantSpec, estimators, fake_quant, formats, init_params, int_spec


def vjp(f, *args, w):
  out, pull = jax.vjp(f, *args)
  return out, pull(jnp.asarray(w, out.dtype))


# ---------------------------------------------------------------------------------------------------- STE


def test_ste_gradient_is_one_everywhere():
  x = jnp.asarray([-500.0, -128.6, -3.3, 0.0, 0.49, 0.5, 126.7, 127.6, 1e6])
  spec = QuantSpec()
  g = jax.grad(lambda x: fake_quant(x, spec, {'scale': 1.0}).sum())(x)
  np.testing.assert_array_equal(g, np.ones(9))
  # Calibrated scale too; the scale itself gets no gradient (stop_gradient).
  g = jax.grad(lambda x: fake_quant(x, spec).sum())(x)
  np.testing.assert_array_equal(g, np.ones(9))
  gs = jax.grad(lambda s: fake_quant(x, spec, {'scale': s}).sum())(jnp.float32(0.5))
  assert float(gs) == 0.0
  w = np.array([1, -2, 3, -4, 5, -6, 7, -8, 9], np.float32)
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 1.0}), x, w=w)
  np.testing.assert_array_equal(gx, w)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.float16])
def test_ste_gradient_dtype(dtype):
  x = jnp.asarray([0.3, -1.7, 2.0], dtype)
  g = jax.grad(lambda x: fake_quant(x, QuantSpec(granularity='per_channel')).astype(jnp.float32).sum())(x)
  assert g.dtype == dtype
  np.testing.assert_array_equal(np.asarray(g, np.float32), [1, 1, 1])


def test_clipped_ste_mask():
  # int8, scale 1: inside means qmin <= x/s <= qmax, i.e. -128 <= x <= 127 (127.4 rounds to 127 but is outside).
  x = jnp.asarray([-130.0, -128.4, -128.0, -0.4, 0.3, 127.0, 127.4, 200.0])
  spec = QuantSpec(estimator='clipped_ste')
  w = np.array([1, 2, 3, 4, 5, 6, 7, 8], np.float32)
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 1.0}), x, w=w)
  np.testing.assert_array_equal(gx, [0, 0, 3, 4, 5, 6, 0, 0])
  # At scale 0.5 the range is [-64, 63.5]; asymmetric uint4 with zero point 3 at scale 2: [-6, 24].
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 0.5}), jnp.asarray([-64.1, -64.0, 63.5, 63.6]), w=[1, 1, 1, 1])
  np.testing.assert_array_equal(gx, [0, 1, 1, 0])
  spec = QuantSpec(format='uint4', scheme='asymmetric', calibration='minmax', estimator='clipped_ste')
  xa = jnp.asarray([-6.5, -6.0, 0.0, 24.0, 24.5])
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 2.0, 'zero_point': 3}), xa, w=[1, 1, 1, 1, 1])
  np.testing.assert_array_equal(gx, [0, 1, 1, 1, 0])


def test_clipped_ste_binary_and_float():
  # int1 grid range is [-1, 1] in grid units: the BNN "hardtanh" STE.
  spec = QuantSpec(format='int1', estimator='clipped_ste')
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 1.0}), jnp.asarray([-1.5, -1.0, 0.2, 1.0, 1.01]), w=[1] * 5)
  np.testing.assert_array_equal(gx, [0, 1, 1, 1, 0])
  spec = QuantSpec(format='fp8_e4m3', estimator='clipped_ste')
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 1.0}), jnp.asarray([-449.0, -448.0, 3.0, 448.0, 1e4]),
                 w=[1] * 5)
  np.testing.assert_array_equal(gx, [0, 1, 1, 1, 0])


# ---------------------------------------------------------------------------------------------------- LSQ


def test_lsq_step_gradient_by_hand():
  # int4: Q_N = 8, Q_P = 7. s = 0.5, N = 6 elements share it: g = 1 / sqrt(6 * 7).
  x = jnp.asarray([0.3, 1.7, -2.2, 10.0, -20.0, 3.5])
  # v/s = [0.6, 3.4, -4.4, 20, -40, 7.0]; round(v/s) - v/s inside = [0.4, -0.4, 0.4, ., ., 0.0];
  # 20 is above Q_P -> Q_P = 7; -40 is below -Q_N -> -Q_N = -8; 7.0 is exactly Q_P: inside, 7 - 7 = 0.
  w = np.array([1, 2, 3, 4, 5, 6], np.float32)
  per_elem = np.array([0.4, -0.4, 0.4, 7.0, -8.0, 0.0])
  g = 1 / math.sqrt(6 * 7)
  spec = QuantSpec(format='int4', estimator='lsq')
  out, (gx, gs) = vjp(lambda x, s: fake_quant(x, spec, {'scale': s}), x, jnp.asarray([[0.5]]).reshape(1), w=w)
  np.testing.assert_allclose(out, [0.5, 1.5, -2.0, 3.5, -4.0, 3.5], rtol=1e-7)
  np.testing.assert_allclose(gs, [np.sum(w * per_elem) * g], rtol=1e-5)  # (0.4-0.8+1.2+28-40+0) g = -11.2 g
  np.testing.assert_allclose(gs, [-11.2 / math.sqrt(42)], rtol=1e-5)
  np.testing.assert_array_equal(gx, [1, 2, 3, 0, 0, 6])


def test_lsq_per_channel_gradient_scale():
  # Two channels (rows) of 3 elements, int8 (Q_P = 127): g = 1 / sqrt(3 * 127) for each row.
  x = jnp.asarray([[0.26, 0.74, 1000.0], [-0.06, 0.24, -0.65]])
  s = jnp.asarray([[0.1], [0.2]])
  spec = QuantSpec(format='int8', estimator='lsq', granularity='per_channel', axis=0)
  # Row 0: v/s = [2.6, 7.4, 10000] -> [3-2.6, 7-7.4, 127] = [0.4, -0.4, 127].
  # Row 1: v/s = [-0.3, 1.2, -3.25] -> [0 + 0.3, 1 - 1.2, -3 + 3.25] = [0.3, -0.2, 0.25].
  _, (gx, gs) = vjp(lambda x, s: fake_quant(x, spec, {'scale': s}), x, s, w=np.ones((2, 3)))
  g = 1 / math.sqrt(3 * 127)
  np.testing.assert_allclose(gs, [[(0.4 - 0.4 + 127) * g], [(0.3 - 0.2 + 0.25) * g]], rtol=1e-5)
  np.testing.assert_array_equal(gx, [[1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize('spec, shape, n', [
    (QuantSpec(format='int4', estimator='lsq'), (4, 6), 24),
    (QuantSpec(format='int4', estimator='lsq', granularity='per_channel'), (4, 6), 4),
    (QuantSpec(format='int4', estimator='lsq', granularity='per_channel', axis=0), (4, 6), 6),
    (QuantSpec(format='int4', estimator='lsq', granularity='per_group', group_size=3), (4, 6), 3),
    (QuantSpec(format='int2', estimator='lsq', granularity='per_channel', axis=(0, 1)), (4, 6), 1),
])
def test_lsq_grad_scale(spec, shape, n):
  from qjax import granularity as gran
  qp = spec.fmt.qmax
  assert estimators.lsq_grad_scale(shape, gran.scale_shape(shape, spec), spec.fmt) == pytest.approx(
      1 / math.sqrt(n * qp), rel=1e-12)


def test_lsq_check_grads_where_rounding_is_off():
  """Every input clipped: x_hat = Q_P s (above) or -Q_N s (below), smooth in s. With one element per scale and
  Q_P = 1 (int2), LSQ's gradient scale is 1, so its custom gradient must equal the true derivative."""
  spec = QuantSpec(format='int2', estimator='lsq', granularity='per_channel', axis=(0, 1))
  x = jnp.asarray([[5.0, -7.0, 3.0], [-4.0, 6.0, 9.0]])
  s0 = jnp.asarray([[0.5, 0.7, 0.9], [1.1, 0.4, 0.8]])

  def f(x, s):
    return jnp.sum(jnp.sin(fake_quant(x, spec, {'scale': s * s})))  # A smooth composition around the quantizer.

  check_grads(f, (x, s0), order=1, modes=('rev',))
  gs = jax.grad(f, argnums=1)(x, s0)
  xs = np.asarray(x) > 0
  ds = np.where(xs, 1.0, -2.0)  # d x_hat / d scale = Q_P = 1 above, -Q_N = -2 below.
  xhat = ds * np.asarray(s0) ** 2
  np.testing.assert_allclose(gs, np.cos(xhat) * ds * 2 * np.asarray(s0), rtol=1e-5)


def test_lsq_gradients_finite_and_init():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)
  spec = QuantSpec(format='int4', estimator='lsq', granularity='per_channel')
  p = init_params(x, spec)
  gx, gs = jax.grad(lambda x, s: fake_quant(x, spec, {'scale': s}).sum(), argnums=(0, 1))(x, p['scale'])
  assert np.isfinite(gx).all() and np.isfinite(gs).all() and gs.shape == (1, 16)
  zeros = jnp.zeros((8, 16))
  p = init_params(zeros, spec)
  np.testing.assert_array_equal(p['scale'], np.ones((1, 16)))
  gx, gs = jax.grad(lambda x, s: fake_quant(x, spec, {'scale': s}).sum(), argnums=(0, 1))(zeros, p['scale'])
  assert np.isfinite(gx).all() and np.isfinite(gs).all()


def test_lsq_needs_scale():
  with pytest.raises(ValueError, match="estimator='lsq' needs learned scale in its params"):
    fake_quant(jnp.ones((4,)), QuantSpec(format='int4', estimator='lsq'))


# --------------------------------------------------------------------------------------------------- LSQ+


def test_lsq_plus_gradients_by_hand():
  # uint4 [0, 15], s = 0.5, b = -1.0: v = (x - b) / s = [2.6, -0.4, 17, -4, 12].
  x = jnp.asarray([0.3, -1.2, 7.5, -3.0, 5.0])
  w = np.array([1, 2, 3, 4, 5], np.float32)
  spec = QuantSpec(format='uint4', scheme='asymmetric', calibration='minmax', estimator='lsq_plus')
  out, (gx, gs, gb) = vjp(lambda x, s, b: fake_quant(x, spec, {'scale': s, 'offset': b}), x,
                          jnp.asarray([[0.5]]).reshape(1),
                          jnp.asarray([-1.0]), w=w)
  # x_hat = clip(round(v), 0, 15) * s + b = [3, 0, 15, 0, 12] * 0.5 - 1.
  np.testing.assert_allclose(out, [0.5, -1.0, 6.5, -1.0, 5.0], rtol=1e-7)
  g = 1 / math.sqrt(5 * 15)
  # d x_hat / ds: inside round(v) - v, below qmin = 0, above qmax = 15: [0.4, 0, 15, 0, 0].
  np.testing.assert_allclose(gs, [(0.4 * 1 + 15 * 3) * g], rtol=1e-5)
  # d x_hat / db: 0 inside (STE), 1 where clipped: [0, 1, 1, 1, 0].
  np.testing.assert_allclose(gb, [(2 + 3 + 4) * g], rtol=1e-5)
  np.testing.assert_array_equal(gx, [1, 0, 0, 0, 5])


def test_lsq_plus_check_grads_where_rounding_is_off():
  # int2 (Q_P = 1), one element per scale: gradient scale 1. All inputs clipped: x_hat = q_edge * s + b.
  spec = QuantSpec(format='int2', scheme='asymmetric', calibration='minmax', estimator='lsq_plus',
                   granularity='per_channel', axis=0)
  x = jnp.asarray([9.0, -9.0, 12.0])
  s0, b0 = jnp.asarray([0.6, 0.9, 1.3]), jnp.asarray([0.2, -0.3, 0.5])
  f = lambda s, b: jnp.sum(jnp.tanh(fake_quant(x, spec, {'scale': s, 'offset': b})))
  check_grads(f, (s0, b0), order=1, modes=('rev',))


def test_lsq_plus_needs_offset():
  spec = QuantSpec(format='uint4', scheme='asymmetric', calibration='minmax', estimator='lsq_plus')
  with pytest.raises(ValueError, match='needs learned offset in its params'):
    fake_quant(jnp.ones((4,)), spec, {'scale': 1.0})
  with pytest.raises(ValueError, match='scheme="asymmetric"'):
    QuantSpec(format='int4', estimator='lsq_plus')


# --------------------------------------------------------------------------------------------------- PACT


def test_pact_unsigned_by_hand():
  # uint4: clip to [0, alpha], s = alpha / 15. alpha = 2.
  x = jnp.asarray([-3.0, -0.5, 0.7, 1.1, 2.0, 5.0])
  w = np.array([1, 2, 3, 4, 5, 6], np.float32)
  spec = QuantSpec(format='uint4', estimator='pact')
  out, (gx, ga) = vjp(lambda x, a: fake_quant(x, spec, {'alpha': a}), x, jnp.asarray([2.0]), w=w)
  # x_hat = round(clip(x) * 7.5) / 7.5: 0.7 -> round(5.25) = 5, 1.1 -> round(8.25) = 8; 2 and 5 -> alpha.
  np.testing.assert_allclose(out, [0, 0, 5 / 7.5, 8 / 7.5, 2.0, 2.0], rtol=1e-6)
  np.testing.assert_array_equal(gx, [0, 0, 3, 4, 0, 0])  # 1[0 < x < alpha]
  np.testing.assert_allclose(ga, [5 + 6], rtol=1e-7)    # sum(w * 1[x >= alpha])


def test_pact_signed_by_hand():
  # int4: clip to [-alpha, alpha], s = alpha / 7; d alpha also collects -w where x <= -alpha.
  x = jnp.asarray([-3.0, -0.5, 0.5, 1.2, 2.0, 5.0])
  w = np.array([1, 2, 3, 4, 5, 6], np.float32)
  spec = QuantSpec(format='int4', estimator='pact')
  out, (gx, ga) = vjp(lambda x, a: fake_quant(x, spec, {'alpha': a}), x, jnp.asarray([2.0]), w=w)
  # y = clip(x) * 3.5: [-7, -1.75, 1.75, 4.2, 7, 7] -> [-7, -2, 2, 4, 7, 7].
  np.testing.assert_allclose(out, [-2.0, -2 / 3.5, 2 / 3.5, 4 / 3.5, 2.0, 2.0], rtol=1e-6)
  np.testing.assert_array_equal(gx, [0, 2, 3, 4, 0, 0])
  np.testing.assert_allclose(ga, [5 + 6 - 1], rtol=1e-7)


def test_pact_per_channel_alpha():
  x = jnp.asarray([[0.5, 3.0], [4.0, 5.0]])
  spec = QuantSpec(format='uint8', estimator='pact', granularity='per_channel', axis=0)
  _, (gx, ga) = vjp(lambda x, a: fake_quant(x, spec, {'alpha': a}), x, jnp.asarray([[1.0], [4.5]]), w=[[1, 2], [3, 4]])
  np.testing.assert_array_equal(gx, [[1, 0], [3, 0]])
  np.testing.assert_array_equal(ga, [[2], [4]])


def test_pact_check_grads_above_alpha():
  """All inputs at or above alpha: x_hat = alpha exactly (round(qmax) * alpha / qmax), so d/dalpha is exact."""
  spec = QuantSpec(format='uint4', estimator='pact')
  x = jnp.asarray([3.0, 4.5, 10.0, 2.5])
  f = lambda a: jnp.sum(jnp.square(fake_quant(x, spec, {'alpha': a})))
  a0 = jnp.asarray([1.7])
  check_grads(f, (a0,), order=1, modes=('rev',))
  np.testing.assert_allclose(jax.grad(f)(a0), [4 * 2 * 1.7], rtol=1e-6)  # d/da sum(a^2) over 4 elements


def test_pact_needs_alpha_and_int():
  with pytest.raises(ValueError, match='needs learned alpha in its params'):
    fake_quant(jnp.ones((4,)), QuantSpec(format='uint4', estimator='pact'))
  with pytest.raises(ValueError, match="estimator='pact' needs an integer format"):
    QuantSpec(format='fp8_e4m3', estimator='pact')
  with pytest.raises(ValueError, match='scheme="symmetric"'):
    QuantSpec(format='uint4', estimator='pact', scheme='asymmetric', calibration='minmax')


def test_pact_init_and_finite():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
  spec = QuantSpec(format='uint4', estimator='pact')
  p = init_params(x, spec)
  np.testing.assert_allclose(p['alpha'], [[np.abs(np.asarray(x)).max()]], rtol=1e-6)
  g = jax.grad(lambda x, a: fake_quant(x, spec, {'alpha': a}).sum(), argnums=(0, 1))(x, p['alpha'])
  assert all(np.isfinite(np.asarray(t)).all() for t in g)


# --------------------------------------------------------------------------------------------------- EWGS


def test_ewgs_by_hand():
  # int8, s = 1: residual y - q = [0.3, -0.3, -0.2, 0.5 (0.5 -> 0, ties to even)]; 200 is clipped.
  x = jnp.asarray([0.3, 0.7, -1.2, 0.5, 200.0])
  w = np.array([1.0, -2.0, 3.0, -1.0, 1.0], np.float32)
  delta = 0.5
  spec = QuantSpec(estimator='ewgs', ewgs_delta=delta)
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 1.0}), x, w=w)
  # g (1 + delta sign(g) (y - q)): 1 (1 + .5 * .3) = 1.15; -2 (1 + .5 * -1 * -.3) = -2.3; 3 (1 - .1) = 2.7;
  # -1 (1 + .5 * -1 * .5) = -0.75; clipped: 0.
  np.testing.assert_allclose(gx, [1.15, -2.3, 2.7, -0.75, 0.0], rtol=1e-6)


def test_ewgs_delta_zero_is_clipped_ste():
  x = jnp.asarray(np.random.default_rng(2).standard_normal(64) * 100, jnp.float32)
  w = np.random.default_rng(3).standard_normal(64).astype(np.float32)
  _, (g0,) = vjp(lambda x: fake_quant(x, QuantSpec(estimator='ewgs', ewgs_delta=0.0), {'scale': 1.0}), x, w=w)
  _, (gc,) = vjp(lambda x: fake_quant(x, QuantSpec(estimator='clipped_ste'), {'scale': 1.0}), x, w=w)
  np.testing.assert_array_equal(g0, gc)


def test_ewgs_scales_with_residual_in_grid_units():
  # Scale 0.25: x = 0.3 -> y = 1.2, q = 1, residual 0.2 (grid units, not x units).
  spec = QuantSpec(estimator='ewgs', ewgs_delta=1.0)
  _, (gx,) = vjp(lambda x: fake_quant(x, spec, {'scale': 0.25}), jnp.asarray([0.3]), w=[2.0])
  np.testing.assert_allclose(gx, [2 * 1.2], rtol=1e-6)


def test_ewgs_bad_delta():
  with pytest.raises(ValueError, match='ewgs_delta must be a finite number >= 0'):
    QuantSpec(estimator='ewgs', ewgs_delta=-0.1)


# ------------------------------------------------------------------------------------------ all estimators


ALL = [
    QuantSpec(format='int4'),
    QuantSpec(format='int4', estimator='clipped_ste'),
    QuantSpec(format='int4', estimator='ewgs'),
    QuantSpec(format='int4', estimator='lsq'),
    QuantSpec(format='uint4', scheme='asymmetric', calibration='minmax', estimator='lsq_plus'),
    QuantSpec(format='uint4', estimator='pact'),
]


@pytest.mark.parametrize('spec', ALL, ids=lambda s: s.estimator)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_all_estimators_same_forward_finite_grads_jit(spec, dtype):
  x = jnp.asarray(np.random.default_rng(4).standard_normal((4, 32)) * 3, dtype)
  params = init_params(x, spec)

  def f(x, params):
    return fake_quant(x, spec, params)

  out = f(x, params)
  assert out.dtype == dtype
  # The forward is fake_quant at the same scale whatever the estimator.
  if spec.estimator in ('lsq', 'lsq_plus', 'pact'):
    scale = params['alpha'] * (1.0 / spec.fmt.qmax) if spec.estimator == 'pact' else params['scale']
    if spec.estimator == 'pact':
      ref = fake_quant(jnp.clip(x, 0, params['alpha'].astype(dtype)), QuantSpec(format='uint4'), {'scale': scale})
      np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-6)
    else:
      zp = None if spec.estimator == 'lsq' else -params['offset'] / params['scale']
      ref = fake_quant(x, spec.replace(estimator='ste'), {'scale': scale, 'zero_point': zp})
      np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-6)
  loss = lambda x, p: jnp.sum(jnp.square(f(x, p).astype(jnp.float32)))
  grads = jax.grad(loss, argnums=(0, 1))(x, params)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  assert grads[0].dtype == dtype
  jgrads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
  # Element-wise gradients match bit for bit; the learned parameters' gradients are sums, whose order of
  # accumulation XLA may change between the eager and the fused program.
  np.testing.assert_array_equal(np.asarray(grads[0], np.float32), np.asarray(jgrads[0], np.float32))
  for a, b in zip(jax.tree_util.tree_leaves(grads[1]), jax.tree_util.tree_leaves(jgrads[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(jax.jit(f)(x, params), np.float32), np.asarray(out, np.float32))


def test_unknown_estimator_did_you_mean():
  with pytest.raises(ValueError, match=r"estimator='lsqq' is not one of ste, clipped_ste, lsq, lsq_plus, pact, ewgs"
                                       r"(, \w+)* \(did you mean 'lsq'\?\)"):
    QuantSpec(estimator='lsqq')
  with pytest.raises(ValueError, match="did you mean 'clipped_ste'"):
    int_spec(4, estimator='clip_ste')
  with pytest.raises(ValueError, match=r"estimator='magic' is not one of"):
    QuantSpec(estimator='magic')


@pytest.mark.parametrize('est', ['lsq', 'ewgs'])
def test_learned_estimators_need_integer_format(est):
  with pytest.raises(ValueError, match=f"estimator='{est}' needs an integer format"):
    QuantSpec(format='nf4', estimator=est)


def test_stochastic_rounding_gradients():
  x = jnp.asarray(np.linspace(-3, 3, 32), jnp.float32)
  spec = QuantSpec(format='int4', estimator='lsq', rounding='stochastic')
  g = jax.grad(lambda s: fake_quant(x, spec, {'scale': s}, key=jax.random.key(0)).sum())(jnp.asarray([0.5]))
  assert np.isfinite(np.asarray(g)).all()
  gx = jax.grad(lambda x: fake_quant(x, QuantSpec(rounding='stochastic'), {'scale': 1.0},
                                     key=jax.random.key(0)).sum())(x)
  np.testing.assert_array_equal(gx, np.ones(32))


def test_grid_range_used_by_masks():
  assert formats.grid_range(formats.parse_format('int4')) == (-8.0, 7.0)
  assert formats.grid_range(formats.parse_format('uint4')) == (0.0, 15.0)
  assert formats.grid_range(formats.parse_format('fp4_e2m1')) == (-6.0, 6.0)


# ------------------------------------------------------------------------ learned steps stay positive


def test_positive_clamps_forward_and_passes_gradient_straight_through():
  s = jnp.asarray([-1.0, 0.0, 1e-9, 0.5])
  np.testing.assert_array_equal(estimators.positive(s), np.float32([1e-8, 1e-8, 1e-8, 0.5]))
  np.testing.assert_array_equal(jax.grad(lambda s: jnp.sum(estimators.positive(s) * 3.0))(s), [3.0] * 4)


def test_lsq_negative_step_uses_the_floor_with_its_gradient():
  spec = QuantSpec('int4', estimator='lsq')
  x = jnp.asarray([1.0, -1.0, 0.0])
  f = lambda s: fake_quant(x, spec, {'scale': s})
  np.testing.assert_array_equal(f(-0.5), f(1e-8))
  np.testing.assert_allclose(f(-0.5), [7e-8, -8e-8, 0.0], rtol=1e-6)
  # y = x / 1e-8: above Q_P -> d x_hat / ds = Q_P = 7; below -Q_N -> -8; x = 0 inside -> round(0) - 0 = 0;
  # times LSQ's gradient scale 1 / sqrt(N Q_P) = 1 / sqrt(3 * 7).
  ds = jax.grad(lambda s: jnp.sum(f(s)))(-0.5)
  np.testing.assert_allclose(ds, (7 - 8) / np.sqrt(21.0), rtol=1e-6)


def test_pact_negative_clip_uses_the_floor_with_its_gradient():
  spec = QuantSpec('int8', estimator='pact')
  x = jnp.asarray([2.0, -3.0, 0.0, 1.0])
  f = lambda a: fake_quant(x, spec, {'alpha': a})
  np.testing.assert_array_equal(f(-1.0), f(1e-8))
  assert np.all(np.abs(np.asarray(f(-1.0))) <= 1e-8 * (1 + 1e-6))
  # d alpha = sum(g 1[x >= alpha]) - sum(g 1[x <= -alpha]) at alpha = 1e-8: 2 above, 1 below.
  np.testing.assert_allclose(jax.grad(lambda a: jnp.sum(f(a)))(-1.0), 2.0 - 1.0)


def test_adam_drives_negative_lsq_steps_back_up():
  import optax  # noqa: PLC0415
  spec = QuantSpec('int4', granularity='per_channel', axis=1, estimator='lsq')
  w = jax.random.normal(jax.random.key(0), (64, 16))
  s = jnp.full((1, 16), -0.05)  # as if Adam had pushed every per-channel step below zero
  opt = optax.adam(1e-2)
  state = opt.init(s)
  loss = lambda s: jnp.mean(jnp.square(fake_quant(w, spec, {'scale': s}) - w))
  first = float(loss(s))
  for _ in range(40):
    g = jax.grad(loss)(s)
    assert np.isfinite(np.asarray(g)).all()
    upd, state = opt.update(g, state)
    s = optax.apply_updates(s, upd)
  assert np.all(np.asarray(s) > 0), s
  assert float(loss(s)) < 0.5 * first


def test_ops_real_and_fake_use_the_same_clamped_step():
  from qjax import ops  # noqa: PLC0415
  from qjax.ops.config import DotConfig, MatmulConfig  # noqa: PLC0415
  s = QuantSpec('int8', granularity='per_channel', estimator='lsq', po2_scale=True)
  w = QuantSpec('int8', granularity='per_channel', po2_scale=True)
  x = jax.random.normal(jax.random.key(1), (4, 32))
  k = jax.random.normal(jax.random.key(2), (32, 8))
  params = {'scale': jnp.asarray([[-1.0], [0.0], [2.0 ** -4], [2.0 ** -5]])}
  y = {m: ops.dot_general(x, k, (((1,), (0,)), ((), ())), config=DotConfig(fwd=MatmulConfig(s, w, m), small_m=0),
                          lhs_params=params) for m in ('fake', 'real')}
  assert np.isfinite(np.asarray(y['real'])).all()
  np.testing.assert_allclose(y['fake'], y['real'], rtol=1e-6, atol=1e-12)
