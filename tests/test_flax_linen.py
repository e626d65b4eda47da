"""qjax.flax with Linen: explicit plugging of qjax ops into Linen layers, unmodified models quantized by rules
only (LeNet-5 trained on the real-data fixtures, a transformer block with its attention einsums, weights inside
nn.scan), quantizer state (learned LSQ/LSQ+/PACT params, EMA statistics, fp8 delayed scaling) and its orbax
round trip, and sharding annotations carried from weights to their scales.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax_common import A8, CFG, MM, W8, normal, rel_err
from jax.sharding import PartitionSpec as P

from experiments.data import load_images
from experiments.models import LeNet5
from qjax import QuantSpec, calibration, ops
from qjax.flax import QuantRule, ServingWeight, convert_linen, quantize_linen
from qjax.ops.conv import conv_general_dilated, make_conv_general_dilated
from qjax.ops.einsum import einsum

# ------------------------------------------------------------------------------------- explicit plugging


def test_explicit_dense_densegeneral_conv_give_the_quantized_op():
  x = normal(0, (40, 16))  # 40 rows > small_m: the int8 path
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  dense = nn.Dense(8, dot_general=ops.make_dot_general(CFG))
  v = dense.init(jax.random.key(1), x)['params']
  y = jax.jit(dense.apply)({'params': v}, x)
  close(y, jax.jit(lambda x, k: ops.dot_general(x, k, MM, config=CFG))(x, v['kernel']) + v['bias'])
  assert rel_err(y, x @ v['kernel'] + v['bias']) > 1e-4  # quantized, not float

  dg = nn.DenseGeneral((2, 4), axis=-1, dot_general=ops.make_dot_general(CFG))
  v = dg.init(jax.random.key(2), x)['params']
  assert v['kernel'].shape == (16, 2, 4)
  y = jax.jit(dg.apply)({'params': v}, x)
  close(y, jax.jit(lambda x, k: ops.dot_general(x, k, MM, config=CFG))(x, v['kernel']) + v['bias'])
  assert rel_err(y, jnp.einsum('bd,dhk->bhk', x, v['kernel']) + v['bias']) > 1e-4

  img = normal(3, (2, 8, 8, 3))
  conv = nn.Conv(5, (3, 3), conv_general_dilated=make_conv_general_dilated(CFG))
  v = conv.init(jax.random.key(4), img)['params']
  y = jax.jit(conv.apply)({'params': v}, img)
  want = jax.jit(lambda x, k: conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), config=CFG,
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(img, v['kernel'])
  close(y, want + v['bias'])
  assert rel_err(y, nn.Conv(5, (3, 3)).apply({'params': v}, img)) > 1e-4


def test_eager_grad_keeps_weights_as_weights():
  # Under eager jax.grad a layer's same-dtype cast of its kernel is a new tracer; it is still the weight.
  rule = {'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
          'act': {'format': 'int8', 'estimator': 'lsq'}}
  qm = quantize_linen(nn.Dense(4), [rule])
  x = normal(0, (8, 6))
  v = qm.init(jax.random.key(1), x)
  g = jax.grad(lambda p: jnp.sum(qm.apply({'params': p}, x) ** 2))(v['params'])
  assert g['dot_general0_rhs_scale'].shape == (1, 4) and float(jnp.abs(g['dot_general0_rhs_scale']).max()) > 0
  assert g['dot_general0_lhs_scale'].shape == (1, 1)
  (m,) = qm.rules.quantized()
  assert (m.lhs, m.rhs) == ('act', 'kernel')


def test_linen_einsum_by_rules():
  # linen.Einsum calls jnp.einsum with no hook argument: rules are the way to quantize it.
  x = normal(0, (40, 16))
  layer = nn.Einsum((16, 2, 4), 'bd,dhk->bhk')
  qm = quantize_linen(layer, [{'module_path': '.*', 'weight': W8, 'act': W8}])
  v = qm.init(jax.random.key(1), x)
  y = qm.apply(v, x)
  k, b = v['params']['kernel'], v['params']['bias']
  assert jnp.array_equal(y, einsum('bd,dhk->bhk', x, k, config=CFG) + b)
  assert rel_err(y, layer.apply(v, x)) > 1e-4
  (m,) = qm.rules.quantized()
  assert (m.path, m.op, m.lhs, m.rhs) == ('', 'einsum', 'act', 'kernel')


# ---------------------------------------------------------------------------------- unmodified models


def test_lenet5_by_rules_trains_on_fashion_mnist_fixtures():
  images, labels = load_images('fashion_mnist', 'train', fixtures=True, verbose=False)
  order = np.random.default_rng(0).permutation(len(images))[:96]
  x, y = jnp.asarray(images[order], jnp.float32) / 255.0, jnp.asarray(labels[order])
  rules = [{'module_path': 'head', 'weight': W8, 'act': A8, 'name': 'head'},
           {'module_path': '.*', 'weight': {'format': 'int4', 'granularity': 'per_channel'}, 'act': A8,
            'grad': {'format': 'int8', 'granularity': 'per_channel'}, 'name': 'body'}]
  qm = quantize_linen(LeNet5(), rules)
  params = jax.jit(qm.init)(jax.random.key(0), x[:2])['params']
  assert [(m.path, m.op, m.rule, m.lhs, m.rhs) for m in qm.rules.quantized()] == [
      ('conv1', 'conv', 'body', 'act', 'kernel'), ('conv2', 'conv', 'body', 'act', 'kernel'),
      ('fc1', 'dot_general', 'body', 'act', 'kernel'), ('fc2', 'dot_general', 'body', 'act', 'kernel'),
      ('head', 'dot_general', 'head', 'act', 'kernel')]
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(qm.apply({'params': p}, x, train=True), y).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, loss
  opt = tx.init(params)
  losses = []
  for _ in range(10):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


class Block(nn.Module):
  """A pre-LN transformer block written as plain Linen."""
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name='ln1')(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(h, h, mask=mask)
    h = nn.LayerNorm(name='ln2')(x)
    return x + nn.Dense(16, name='down')(nn.gelu(nn.Dense(64, name='up')(h)))


def test_transformer_block_attention_einsums_by_rules():
  x = normal(0, (4, 12, 16))
  v = Block().init(jax.random.key(1), x)
  yf = Block().apply(v, x)
  attn = {'module_path': 'attn', 'op_names': ['einsum'], 'act': {'format': 'int8', 'granularity': 'per_channel'},
          'name': 'scores'}
  qm = quantize_linen(Block(), [attn, {'module_path': '.*', 'weight': W8, 'act': A8, 'name': 'dense'}])
  y = jax.jit(qm.apply)(v, x)
  ein = [m for m in qm.rules.quantized() if m.op == 'einsum']
  assert [(m.path, m.rule, m.lhs, m.rhs, m.weight_operands) for m in ein] == [('attn', 'scores', 'act', 'act', ())] * 2
  assert all(m.dot_config.fwd.lhs.format == m.dot_config.fwd.rhs.format == 'int8' for m in ein)
  assert {m.path for m in qm.rules.quantized() if m.op == 'dot_general'} == {
      'attn/query', 'attn/key', 'attn/value', 'attn/out', 'up', 'down'}
  assert 'lhs=act rhs=act' in [line for line in qm.report().splitlines() if 'einsum' in line][0]
  assert 0 < rel_err(y, yf) < 0.05
  # Only the two attention einsums quantized: the output still moves, so they really run quantized.
  only = quantize_linen(Block(), [attn])
  y_ein = jax.jit(only.apply)(v, x)
  assert 0 < rel_err(y_ein, yf) < 0.02


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(16, name='fc')(x)), None


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    scan = nn.scan(Layer, variable_axes={'params': 0, 'qjax_stats': 0}, split_rngs={'params': True}, length=3)
    return scan(name='layers')(x, None)[0]


def test_weights_inside_nn_scan_are_weights():
  rule = QuantRule(weight=QuantSpec('int8', 'per_channel', estimator='lsq'), act=QuantSpec('int8'), act_static=True)
  qm = quantize_linen(Stack(), [rule])
  x = normal(0, (40, 16))
  v = qm.init(jax.random.key(1), x)
  p = v['params']['layers']['fc']
  assert p['kernel'].shape == (3, 16, 16) and p['dot_general0_rhs_scale'].shape == (3, 1, 16)
  assert v['qjax_stats']['layers']['fc']['dot_general0_lhs_scale'].shape == (3, 1, 1)
  (m,) = qm.rules.quantized()
  assert (m.path, m.lhs, m.rhs) == ('layers/fc', 'act', 'kernel')
  y = qm.apply(v, x)
  # The same computation unrolled: layer i's kernel quantized with the weight spec and its own learned step.
  cfg = rule.dot_config(False, True)
  h = x
  for i in range(3):
    lhs = {'scale': v['qjax_stats']['layers']['fc']['dot_general0_lhs_scale'][i]}
    h = jax.nn.relu(ops.dot_general(h, p['kernel'][i], MM, config=cfg, lhs_params=lhs,
                                    rhs_params={'scale': p['dot_general0_rhs_scale'][i]}) + p['bias'][i])
  assert jnp.array_equal(y, h)
  # Gradients through the scan reach every layer's learned step.
  loss = lambda params: jnp.mean(qm.apply({**v, 'params': params}, x) ** 2)
  g = jax.jit(jax.grad(loss))(v['params'])['layers']['fc']['dot_general0_rhs_scale']
  assert g.shape == (3, 1, 16) and bool(jnp.all(jnp.abs(g).max(axis=(1, 2)) > 0))


# ------------------------------------------------------------------------------------------ quantizer state


class Four(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name='lsq')(x))
    x = nn.relu(nn.Dense(32, name='lsq_plus')(x))
    x = nn.relu(nn.Dense(32, name='pact')(x))
    return nn.Dense(10, name='static')(x)


STATE_RULES = [
    {'module_path': 'lsq', 'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
     'act': {'format': 'int8', 'estimator': 'lsq'}},
    {'module_path': 'lsq_plus', 'weight': W8, 'act': {'format': 'uint8', 'scheme': 'asymmetric',
                                                      'calibration': 'percentile', 'percentile': 90.0,
                                                      'estimator': 'lsq_plus'}},
    {'module_path': 'pact', 'weight': {'format': 'int4', 'granularity': 'per_channel'},
     'act': {'format': 'int8', 'calibration': 'percentile', 'percentile': 95.0, 'estimator': 'pact'}},
    {'module_path': 'static', 'weight': W8, 'act_static': True, 'ema_decay': 0.9,
     'act': {'format': 'int8', 'scheme': 'asymmetric', 'calibration': 'minmax'}},
]


def test_learned_params_and_ema_statistics_train_freeze_and_survive_orbax(tmp_path):
  qm = quantize_linen(Four(), STATE_RULES)
  x, labels = normal(0, (48, 20)), jnp.arange(48) % 10
  v = qm.init(jax.random.key(1), x)
  learned = {('lsq', 'dot_general0_lhs_scale'), ('lsq', 'dot_general0_rhs_scale'),
             ('lsq_plus', 'dot_general0_lhs_scale'), ('lsq_plus', 'dot_general0_lhs_offset'),
             ('pact', 'dot_general0_lhs_alpha')}
  assert {(m, k) for m, d in v['params'].items() for k in d if k.startswith('dot_general')} == learned
  assert set(v['qjax_stats']) == {'static'}
  assert float(v['qjax_stats']['static']['dot_general0_lhs_count']) == 1.0  # init is a training run
  tx = optax.adam(1e-3)  # learned steps are ~1e-2: larger Adam steps clip whole layers

  @jax.jit
  def step(variables, opt, x):
    def loss_fn(p):
      y, upd = qm.apply({'params': p, 'qjax_stats': variables['qjax_stats']}, x, mutable=['qjax_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(y, labels).mean(), upd
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    u, opt = tx.update(g, opt, variables['params'])
    return {'params': optax.apply_updates(variables['params'], u), **upd}, opt, g
  v0, opt, gmax = v, tx.init(v['params']), None
  for i in range(3):
    v, opt, g = step(v, opt, normal(10 + i, (48, 20)))
    g = jax.tree.map(lambda a: jnp.abs(a).max(), g)
    gmax = g if gmax is None else jax.tree.map(jnp.maximum, gmax, g)
  for mod, name in learned:
    assert float(gmax[mod][name]) > 0, (mod, name)
    assert not jnp.array_equal(v['params'][mod][name], v0['params'][mod][name]), (mod, name)
  st, st0 = v['qjax_stats']['static'], v0['qjax_stats']['static']
  assert float(st['dot_general0_lhs_count']) == 4.0
  assert not jnp.array_equal(st['dot_general0_lhs_scale'], st0['dot_general0_lhs_scale'])
  assert float(st['dot_general0_lhs_zero_point'][0, 0]) == -128.0  # int8 grid over a relu output: min 0

  # Evaluation: statistics are not a mutable collection, so they stay; the output uses them (not the batch).
  ev = jax.jit(qm.apply)
  x2 = normal(20, (48, 20))
  y_eval, state = qm.apply(v, x2, mutable=['intermediates'])
  assert 'qjax_stats' not in state
  moved = {**v, 'qjax_stats': jax.tree.map(lambda a: a * 1.5, v['qjax_stats'])}
  assert not jnp.array_equal(ev(moved, x2), y_eval)
  assert jnp.array_equal(ev(v, x2), ev(v, x2))

  # Orbax round trip: learned params and statistics come back exactly, and so does the forward.
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'qat', v)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / 'qat', jax.tree.map(ocp.utils.to_shape_dtype_struct, v))
  assert jax.tree.structure(restored) == jax.tree.structure(v)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(v), strict=True):
    assert a.dtype == b.dtype and jnp.array_equal(a, b)
  assert jnp.array_equal(ev(restored, x2), ev(v, x2))


def test_fp8_delayed_scaling():
  e4 = {'format': 'fp8_e4m3'}
  rule = QuantRule(weight=e4, act=e4, delayed_scaling=4)
  qm = quantize_linen(nn.Dense(8), [rule])
  xs = [normal(i, (40, 16)) * (i + 1) for i in range(4)]
  v = qm.init(jax.random.key(9), xs[0])
  k = v['params']['kernel']
  amax_w = float(jnp.max(jnp.abs(k)))
  hist = lambda v, side: np.asarray(v['qjax_stats'][f'dot_general0_{side}_amax_history'])
  np.testing.assert_array_equal(hist(v, 'lhs'), [jnp.max(jnp.abs(xs[0])), 0, 0, 0])
  np.testing.assert_array_equal(hist(v, 'rhs'), [amax_w, 0, 0, 0])
  # Training rolls the histories: the newest amax first.
  train = jax.jit(lambda v, x: qm.apply(v, x, mutable=['qjax_stats']))
  for x in xs[1:]:
    _, upd = train(v, x)
    v = {**v, **upd}
  np.testing.assert_array_equal(hist(v, 'lhs'), [jnp.max(jnp.abs(x)) for x in xs[::-1]])
  np.testing.assert_array_equal(hist(v, 'rhs'), [amax_w] * 4)
  # The scale comes from the history's max, not the current batch; evaluation does not roll.
  lhs_hist = jnp.array([1.0, 7.0, 3.0, 2.0])
  v = {**v, 'qjax_stats': {**v['qjax_stats'], 'dot_general0_lhs_amax_history': lhs_hist}}
  x = normal(5, (40, 16))  # amax ~ 4 < 7
  y = jax.jit(qm.apply)(v, x)
  spec = QuantSpec('fp8_e4m3')
  scale = lambda amax: calibration.symmetric_scale(jnp.full((1, 1), amax, jnp.float32), spec)
  want = ops.dot_general(x, k, MM, config=rule.dot_config(False, True), lhs_params={'scale': scale(7.0)},
                         rhs_params={'scale': scale(amax_w)}) + v['params']['bias']
  assert jnp.array_equal(y, want)
  dyn = ops.dot_general(x, k, MM, config=rule.dot_config(False, True)) + v['params']['bias']
  assert not jnp.array_equal(y, dyn)
  np.testing.assert_array_equal(qm.apply(v, x, mutable=['qjax_stats'])[1]['qjax_stats'][
      'dot_general0_lhs_amax_history'], [jnp.max(jnp.abs(x)), 1.0, 7.0, 3.0])


# ------------------------------------------------------------------------------------------------ sharding


class Sharded(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(32, kernel_init=nn.with_partitioning(init, ('embed', 'mlp')), name='up')(x)
    return nn.Dense(16, kernel_init=nn.with_logical_partitioning(init, ('mlp', 'embed')), name='down')(nn.relu(x))


@pytest.mark.parametrize('weight', [
    {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
    {'format': 'int4', 'granularity': 'per_group', 'group_size': 8, 'estimator': 'lsq'}])
def test_sharding_annotations_carry_over_to_scales(weight):
  qm = quantize_linen(Sharded(), [{'module_path': '.*', 'weight': weight, 'act': A8}])
  x = normal(0, (40, 16))
  v = qm.init(jax.random.key(1), x)
  up, down = v['params']['up'], v['params']['down']
  grouped = weight['granularity'] == 'per_group'
  assert isinstance(up['dot_general0_rhs_scale'], nn.Partitioned)
  assert isinstance(down['dot_general0_rhs_scale'], nn.LogicallyPartitioned)  # the same kind of box
  assert up['dot_general0_rhs_scale'].value.shape == ((2, 32) if grouped else (1, 32))
  specs = nn.get_partition_spec(v)['params']
  # per_channel reduces the contraction axis; per_group keeps it (one scale per group), so it stays sharded.
  assert specs['up']['dot_general0_rhs_scale'] == (P('embed', 'mlp') if grouped else P(None, 'mlp'))
  assert specs['down']['dot_general0_rhs_scale'] == (P('mlp', 'embed') if grouped else P(None, 'embed'))
  assert specs['up']['kernel'] == P('embed', 'mlp')
  # The serving tree: qvalues keep the weight's spec (reversed where stored transposed: per channel), scales the
  # reduced one.
  sv = convert_linen(qm, v, x)
  sspec = nn.get_partition_spec(sv)['params']
  for name, names, scale_spec in (('up', ('embed', 'mlp'), specs['up']['dot_general0_rhs_scale']),
                                  ('down', ('mlp', 'embed'), specs['down']['dot_general0_rhs_scale'])):
    sw = sv['params'][name]['kernel']
    assert isinstance(sw, ServingWeight) and sw.names == names and sw.transposed == (not grouped)
    stored = P(*(names[::-1] if sw.transposed else names))
    assert sspec[name]['kernel'].qvalue == stored and sspec[name]['kernel'].scale == scale_spec
    assert sw.partition_specs().scale == scale_spec and sw.partition_specs().qvalue == stored
  assert jnp.array_equal(jax.jit(qm.serving().apply)(sv, x), jax.jit(qm.apply)(v, x))


def test_static_ranges_average_the_calibration_batches_and_restart_clears_the_init_batch():
  """An EMA at 0.99 over N calibration batches weighed the first 0.99^(N-1) (86% of 16): the range was one
  batch's. The first 1 / (1 - decay) batches are now averaged, and `restart_ranges` drops the ranges measured
  before (PTQ restarts them after SmoothQuant, AWQ or a rotation changed the layers' inputs)."""
  from qjax.flax.session import restart_ranges
  qm = quantize_linen(nn.Dense(4), [{'module_path': '.*', 'weight': W8, 'act': {'format': 'int8'},
                                     'act_static': True}])
  x0 = 100.0 * normal(0, (16, 8))  # the init batch: a range far from the calibration batches'
  batches = [normal(i, (16, 8)) * (1.0 + i) for i in range(1, 5)]
  scale = lambda x: float(calibration.calibrate(x, QuantSpec('int8'))[0].reshape(()))
  v = qm.init(jax.random.key(0), x0)

  def calibrate(v):
    for x in batches:
      _, upd = qm.apply(v, x, mutable=['qjax_stats'])
      v = {**v, **upd}
    return v['qjax_stats']['dot_general0_lhs_scale'].reshape(()), v['qjax_stats']['dot_general0_lhs_count']
  kept, n = calibrate(v)
  assert float(n) == 5 and float(kept) == pytest.approx(np.mean([scale(x) for x in [x0, *batches]]), rel=1e-6)
  restarted = restart_ranges(v)
  assert float(restarted['qjax_stats']['dot_general0_lhs_count']) == 0.0
  assert np.array_equal(restarted['params']['kernel'], v['params']['kernel'])  # nothing else touched
  fresh, n = calibrate(restarted)
  assert float(n) == 4 and float(fresh) == pytest.approx(np.mean([scale(x) for x in batches]), rel=1e-6)
