"""The three methods added through the registry alone: DSQ (Gong et al., 2019), DoReFa weights
(Zhou et al., 2016) and QDrop (Wei et al., 2022), each in its own module plus one line of qjax/registered.py,
tested against hand-derived values."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import dorefa, ops, qdrop, registry
from qjax.flax import QuantRule, convert_linen, quantize_linen
from qjax.ops.config import DotConfig, MatmulConfig
from qjax.quantizers import fake_quant, init_params, quantize
from qjax.spec import QuantSpec


def test_registered_by_their_config_names():
  assert registry.names()[6:] == ('dsq', 'dorefa', 'qdrop')
  assert QuantSpec('int4', estimator='dsq').learned == ('alpha',)
  with pytest.raises(ValueError, match="estimator='dorefa' has no integer grid"):
    quantize(jnp.ones((1, 4)), QuantSpec('int4', estimator='dorefa'), {'scale': 1.0})


# ------------------------------------------------------------------------------------------------------ DSQ


def _dsq_reference(x, s, alpha):
  """DSQ's soft quantizer written out (symmetric int4 grid of step s), for autodiff."""
  y = x / s
  k = jnp.log(2.0 / alpha - 1.0)
  i = jnp.clip(jnp.floor(y), -8, 6)
  phi = jnp.tanh(k * (y - i - 0.5)) / jnp.tanh(k / 2)
  return (i + (phi + 1) / 2) * s


def test_dsq_forward_is_the_grid_and_backward_the_soft_quantizer():
  spec = QuantSpec('int4', estimator='dsq')
  x = jnp.asarray([7.0, 0.5, 0.3, -2.6, 1.5, 0.0, -8.5])  # absmax 8.5 -> scale 8.5 / 7
  s = 8.5 / 7
  params = init_params(x, spec)
  np.testing.assert_array_equal(params['alpha'], np.float32([0.2]))
  np.testing.assert_array_equal(fake_quant(x, spec, params), fake_quant(x, spec.replace(estimator='ste')))
  g = jnp.arange(1.0, 8.0)
  dx, da = jax.grad(lambda x, a: jnp.sum(fake_quant(x, spec, {'alpha': a}) * g), argnums=(0, 1))(
      x, params['alpha'])
  inside = np.abs(np.asarray(x) / s) <= np.asarray([7, 7, 7, 7, 7, 7, 7]) + 0  # -8.5 / s = -7: inside
  rx, ra = jax.grad(lambda x, a: jnp.sum(_dsq_reference(x, s, a[0]) * g), argnums=(0, 1))(x, params['alpha'])
  np.testing.assert_allclose(dx, np.where(inside, rx, 0.0), rtol=2e-5)
  np.testing.assert_allclose(da, ra, rtol=2e-5, atol=1e-6)
  # By hand at alpha = 0.2: k = ln 9, tanh(k / 2) = tanh(ln 3) = 0.8. At a cell centre (y = 0.5 s, d = 0)
  # dx = k / (2 * 0.8) and dphi/dk = 0; at the edge y = 7 (d = 1/2) dx = k (1 - 0.64) / 1.6.
  x2 = jnp.asarray([0.5, 7.0]) * s
  dx2 = jax.grad(lambda x: fake_quant(jnp.concatenate([x, jnp.asarray([-8.5])]), spec, params)[:2].sum())(x2)
  np.testing.assert_allclose(dx2, [math.log(9) / 1.6, math.log(9) * 0.36 / 1.6], rtol=1e-5)


def test_dsq_alpha_stays_in_range_and_is_learnable():
  spec = QuantSpec('int4', granularity='per_channel', axis=1, estimator='dsq')
  x = jax.random.normal(jax.random.key(0), (32, 4))
  y = fake_quant(x, spec, {'alpha': jnp.asarray([[-1.0, 0.0, 0.7, 0.3]])})  # clamped to [1e-4, 0.5]
  assert np.isfinite(np.asarray(y)).all()
  da = jax.grad(lambda a: jnp.sum(jnp.sin(fake_quant(x, spec, {'alpha': a}))))(jnp.full((1, 4), 0.2))
  assert da.shape == (1, 4) and np.all(np.asarray(da) != 0)
  with pytest.raises(ValueError, match='int1'):
    QuantSpec('int1', estimator='dsq')
  with pytest.raises(ValueError, match='needs an integer format'):
    QuantSpec('fp8_e4m3', estimator='dsq')


# --------------------------------------------------------------------------------------------------- DoReFa


def test_dorefa_weights_hand_derived_levels_and_gradient():
  spec = QuantSpec('int2', estimator='dorefa')  # n = 3 steps: levels -1, -1/3, 1/3, 1
  w = jnp.asarray([0.0, 1.0, -1.0, 0.2, 3.0, -0.3])
  m = math.tanh(3.0)
  t = np.tanh(np.asarray(w, np.float64)) / (2 * m) + 0.5  # 0.5, 0.883, 0.117, 0.599, 1, 0.349
  # round(3 t) = round(1.5) = 2 (half to even), 3, 0, round(1.80) = 2, 3, round(1.047) = 1
  np.testing.assert_array_equal(np.round(3 * t), [2, 3, 0, 2, 3, 1])
  np.testing.assert_allclose(fake_quant(w, spec), [1 / 3, 1, -1, 1 / 3, 1, -1 / 3], rtol=1e-6)
  g = jnp.asarray([1.0, 2.0, 3.0, -1.0, 0.5, 1.0])
  dw = jax.grad(lambda w: jnp.sum(fake_quant(w, spec) * g))(w)
  np.testing.assert_allclose(dw, np.asarray(g) * (1 - np.tanh(np.asarray(w)) ** 2) / m, rtol=1e-4)  # f32 tanh
  assert init_params(w, spec) == {}


def test_dorefa_edges():
  spec = QuantSpec('int4', granularity='per_channel', axis=0, estimator='dorefa')
  w = jnp.zeros((2, 3)).at[1].set(jnp.asarray([np.nan, 1.0, -1.0]))
  y = np.asarray(fake_quant(w, spec))
  np.testing.assert_allclose(y[0], np.full(3, 1 / 15), rtol=1e-5)  # an all-zero row: t = 1/2 -> round(7.5) = 8
  assert np.isnan(y[1, 0]) and np.isfinite(y[1, 1:]).all()
  np.testing.assert_allclose(y[1, 1:], [1.0, -1.0])
  cfg = DotConfig(fwd=MatmulConfig(QuantSpec('int8', granularity='per_channel'), spec.replace(axis=-1), 'auto'))
  x = jnp.ones((4, 2))
  np.testing.assert_allclose(ops.dot_general(x, jnp.asarray([[0.0, 1.0], [1.0, -1.0]]), (((1,), (0,)), ((), ())),
                                             config=cfg)[0], [1 / 15 + 1, 1 - 1], atol=0.02)
  with pytest.raises(ValueError, match='mode="real" cannot run estimator .dorefa.'):
    ops.dot_general(x, jnp.ones((2, 2)), (((1,), (0,)), ((), ())),
                    config=DotConfig(fwd=MatmulConfig(QuantSpec('int8'), QuantSpec('int4', estimator='dorefa'),
                                                      'real')))
  with pytest.raises(ValueError, match='symmetric'):
    QuantSpec('uint4', scheme='asymmetric', calibration='minmax', estimator='dorefa')


# ---------------------------------------------------------------------------------------------------- QDrop


def test_qdrop_drops_with_probability_p_and_passes_gradients_of_dropped_elements():
  spec = QuantSpec('int4', estimator='qdrop')
  x = jnp.asarray(np.linspace(-9.0, 9.0, 4000), jnp.float32)
  key = jax.random.key(5)
  params = {'scale': 1.0}
  out = np.asarray(fake_quant(x, spec, params, key))
  drop = np.asarray(jax.random.bernoulli(jax.random.split(key)[1], 0.5, x.shape))
  xq = np.asarray(fake_quant(x, spec.replace(estimator='clipped_ste'), params))
  np.testing.assert_array_equal(out, np.where(drop, np.asarray(x), xq))
  assert 0.45 < drop.mean() < 0.55
  g = np.asarray(jax.grad(lambda x: fake_quant(x, spec, params, key).sum())(x))
  inside = (np.asarray(x) >= -8) & (np.asarray(x) <= 7)
  np.testing.assert_array_equal(g, np.where(drop | inside, 1.0, 0.0))
  # Without a key nothing is dropped: QDrop is the clipped STE (its evaluation behaviour).
  np.testing.assert_array_equal(fake_quant(x, spec, params), xq)
  np.testing.assert_array_equal(quantize(x, spec, params).qvalue, quantize(x, spec, scale=1.0).qvalue)


def test_qdrop_other_p_is_another_registration():
  m = qdrop.QDrop('qdrop_p0', p=0.0)
  registry.register(m)
  try:
    x = jnp.asarray([0.3, 2.6])
    np.testing.assert_array_equal(fake_quant(x, QuantSpec('int4', estimator='qdrop_p0'), {'scale': 1.0},
                                             jax.random.key(0)), [0.0, 3.0])
  finally:
    registry._METHODS.pop('qdrop_p0')
  with pytest.raises(ValueError, match=r'p must be in \[0, 1\)'):
    qdrop.QDrop('bad', p=1.0)


def test_new_methods_through_flax_rules():
  from flax import linen as nn  # noqa: PLC0415

  from qjax.flax import QuantRule, quantize_linen  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(0), (4, 8))
  for est in ('dsq', 'dorefa', 'qdrop'):
    rules = [QuantRule('.*', weight=QuantSpec('int4', granularity='per_channel', estimator=est),
                       act=QuantSpec('int8'))]
    model = quantize_linen(nn.Dense(3), rules)
    v = model.init(jax.random.key(1), x)
    names = set(v['params'][next(iter(v['params']))].keys()) if 'Dense_0' in v['params'] else set(v['params'])
    assert ('dot_general0_rhs_alpha' in names) == (est == 'dsq'), names
    y, g = jax.value_and_grad(lambda p, model=model: model.apply({'params': p}, x, rngs={'quant': jax.random.key(2)})
                              .sum())(v['params'])
    assert np.isfinite(np.asarray(y))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))


def test_qdrop_through_linen_rules_drops_only_with_a_quant_stream():
  # Before: the Flax layers handed a key only to stochastic rounding, so a QDrop rule trained as the clipped STE.
  from flax import linen as nn  # noqa: PLC0415

  from qjax.flax import QuantRule, quantize_linen  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(0), (64, 16)) * 3.0
  act = lambda est: QuantSpec('int4', estimator=est)
  model = quantize_linen(nn.Dense(16, use_bias=False), [QuantRule('.*', act=act('qdrop'))])
  clipped = quantize_linen(nn.Dense(16, use_bias=False), [QuantRule('.*', act=act('clipped_ste'))])
  assert model.rules.needs_rng and not clipped.rules.needs_rng
  v = {'params': {'kernel': jnp.eye(16)}}  # y = the quantized input itself
  xq = np.asarray(fake_quant(x, act('clipped_ste')))
  np.testing.assert_array_equal(model.apply(v, x), xq)  # no stream: the evaluation forward
  np.testing.assert_array_equal(clipped.apply(v, x), xq)
  y1 = np.asarray(model.apply(v, x, rngs={'quant': jax.random.key(2)}))
  y2 = np.asarray(model.apply(v, x, rngs={'quant': jax.random.key(3)}))
  moved = xq != np.asarray(x)  # elements that quantization changes
  for y in (y1, y2):
    kept_float = y == np.asarray(x)
    assert np.all(kept_float | (y == xq))  # each element either dropped (float) or on the grid
    assert 0.4 < kept_float[moved].mean() < 0.6  # p = 0.5
  assert np.any(y1 != y2)  # the mask follows the key


def test_qdrop_differentiated_without_a_key_warns_that_it_trains_the_clipped_ste():
  """A training step that forgets the key would train the clipped STE: differentiation without a key warns; the
  forward alone (evaluation, calibration) and differentiation with a key do not."""
  import warnings  # noqa: PLC0415

  from flax import linen as nn  # noqa: PLC0415

  from qjax.flax import QuantRule, quantize_linen  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(0), (8, 16)) * 3.0
  spec = QuantSpec('int4', estimator='qdrop')
  with pytest.warns(UserWarning, match=r"drops nothing and trains as the clipped STE.*rngs=\{'quant': key\}"):
    g = jax.grad(lambda x: fake_quant(x, spec, {'scale': 1.0}).sum())(x)
  np.testing.assert_array_equal(g, jax.grad(lambda x: fake_quant(x, spec.replace(estimator='clipped_ste'),
                                                                 {'scale': 1.0}).sum())(x))
  # Two layers: the second one's input depends on the params, so a training step differentiates its quantizer.
  model = quantize_linen(nn.Sequential([nn.Dense(8), nn.Dense(4)]), [QuantRule('.*', act=spec)])
  v = model.init(jax.random.key(1), x)
  loss = lambda p, **kw: model.apply({'params': p}, x, **kw).sum()
  with pytest.warns(UserWarning, match='drops nothing'):
    jax.grad(loss)(v['params'])
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    jax.grad(lambda p: loss(p, rngs={'quant': jax.random.key(2)}))(v['params'])
    # A QDrop weight: the rule's weight read (the served table forward) takes the keyless spec's gradient.
    wq = quantize_linen(nn.Dense(4), [QuantRule('.*', weight=spec.replace(granularity='per_channel'))])
    wv = wq.init(jax.random.key(1), x)
    assert QuantSpec('int4', estimator='qdrop').method.keyless_spec(spec).estimator == 'clipped_ste'
    jax.grad(lambda p: wq.apply({'params': p}, x, rngs={'quant': jax.random.key(2)}).sum())(wv['params'])
    model.apply(v, x)
    jax.jit(lambda x: fake_quant(x, spec, {'scale': 1.0}))(x)
    registry.register(qdrop.QDrop('qdrop_p0_nokey', p=0.0))  # p = 0 drops nothing by design: no warning
    try:
      jax.grad(lambda x: fake_quant(x, spec.replace(estimator='qdrop_p0_nokey'), {'scale': 1.0}).sum())(x)
    finally:
      registry._METHODS.pop('qdrop_p0_nokey')


def test_qdrop_without_a_key_runs_a_real_int8_matmul_equal_to_fake_quant():
  """Evaluation and serving (no key: nothing dropped) run QDrop's grid as an int8 matmul; with a key it drops and
  runs in fake mode. Power-of-two scales make the integer and the fake-quant results equal exactly."""
  from qjax.ops import inspect_matmuls  # noqa: PLC0415
  x = jnp.asarray(np.random.default_rng(0).integers(-300, 300, (16, 32)) / 8.0, jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).integers(-127, 128, (32, 8)) / 64.0, jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  qd = QuantSpec('int8', estimator='qdrop')
  cfg = lambda est: DotConfig(fwd=MatmulConfig(qd.replace(estimator=est), QuantSpec('int8', granularity='per_channel'),
                                               'auto'))
  rp = {'scale': jnp.full((1, 8), 1 / 64.0)}
  f = lambda est, key=None: (lambda x, w: ops.dot_general(x, w, dims, config=cfg(est), lhs_params={'scale': 0.25},
                                                          rhs_params=rp, key=key))
  y = jax.jit(f('qdrop'))(x, w)
  np.testing.assert_array_equal(y, jax.jit(f('clipped_ste'))(x, w))
  fake = fake_quant(x, qd.replace(estimator='clipped_ste'), {'scale': 0.25}) @ w
  np.testing.assert_array_equal(y, fake)
  assert inspect_matmuls(f('qdrop'), x, w).n_int8 == 1
  assert inspect_matmuls(f('qdrop', jax.random.key(0)), x, w).n_int8 == 0  # dropping: fake mode


def test_qdrop_through_nnx_needs_a_seed_and_drops_in_train_mode_only():
  from flax import nnx  # noqa: PLC0415

  from qjax.flax import QuantRule, quantize_nnx  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(0), (64, 16)) * 3.0
  rules = [QuantRule('.*', act=QuantSpec('int4', estimator='qdrop'))]
  with pytest.raises(ValueError, match=r'needs quantize_nnx\(\.\.\., seed=\.\.\.\)'):
    quantize_nnx(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), rules, x)
  m = nnx.Linear(16, 8, use_bias=False, rngs=nnx.Rngs(0))
  quantize_nnx(m, rules, x, seed=3)
  xq = np.asarray(fake_quant(x, QuantSpec('int4', estimator='clipped_ste')))
  w = np.asarray(m.kernel.get_value())
  y1, y2 = np.asarray(m(x)), np.asarray(m(x))
  assert not np.allclose(y1, xq @ w) and not np.allclose(y1, y2)  # dropped, a fresh mask per call
  m.eval()
  np.testing.assert_allclose(np.asarray(m(x)), xq @ w, rtol=1e-5, atol=1e-5)


def test_dorefa_module_is_self_contained():
  assert dorefa.DoReFa('x').native is False and qjax.QuantSpec(estimator='qdrop').method.native is False


def test_dorefa_weights_are_never_quantized_onto_a_calibrated_grid():
  # Without params (DoReFa learns none) quantize used to calibrate absmax and round: an int4 grid of the raw weights,
  # not DoReFa's levels. Serving conversion of such a weight would then serve another model than the one trained.
  with pytest.raises(ValueError, match="estimator='dorefa' has no integer grid"):
    quantize(jnp.ones((1, 4)), QuantSpec('int4', estimator='dorefa'))
  q = quantize(jnp.ones((1, 4)), QuantSpec('int4', estimator='dorefa'), scale=jnp.asarray(0.5))  # explicit grid
  assert q.qvalue.tolist() == [[2, 2, 2, 2]]


def test_converting_a_model_with_dorefa_weights_is_a_clear_error_not_a_different_model():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='fc')(x)

  x = jax.random.normal(jax.random.key(0), (4, 8))
  q = quantize_linen(Net(), [QuantRule('.*', weight=QuantSpec('int4', estimator='dorefa'), act=QuantSpec('int8'))])
  v = q.init(jax.random.key(1), x)
  with pytest.raises(ValueError, match=r"convert: the weight fc/kernel .* estimator='dorefa' has no integer grid"):
    convert_linen(q, v, x)
