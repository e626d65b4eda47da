"""qjax.flax with NNX: explicit plugging of qjax ops into NNX layers, unmodified models quantized in place by
rules only (the MLP trained on the real-data fixtures, the transformer block with nnx.MultiHeadAttention's
einsums, stacked layers under nnx.scan), no clone (same Variables, no doubled memory), quantizer state
(learned LSQ/LSQ+/PACT params, QuantStat EMA statistics, fp8 delayed scaling) and its orbax round trip, and
sharding metadata carried from weights to their scales.
"""

import gc
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax_common import A8, CFG, MM, W8, normal, rel_err
from jax.sharding import PartitionSpec as P

from experiments.data import load_images
from experiments.models import MLP, Block
from qjax import QuantSpec, calibration, ops
from qjax.flax import QuantRule, QuantStat, ServingWeight, convert_nnx, intercept, quantize_nnx
from qjax.ops.conv import conv_general_dilated, make_conv_general_dilated
from qjax.ops.einsum import einsum, make_einsum


def close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- explicit plugging


def test_explicit_linear_lineargeneral_conv_einsum_give_the_quantized_op():
  x = normal(0, (40, 16))  # 40 rows > small_m: the int8 path
  rngs = nnx.Rngs(0)
  dot = jax.jit(lambda x, k: ops.dot_general(x, k, MM, config=CFG))
  lin = nnx.Linear(16, 8, dot_general=ops.make_dot_general(CFG), rngs=rngs)
  y = nnx.jit(lambda m, x: m(x))(lin, x)
  close(y, dot(x, lin.kernel[...]) + lin.bias[...])
  assert rel_err(y, x @ lin.kernel[...] + lin.bias[...]) > 1e-4  # quantized, not float

  lg = nnx.LinearGeneral(16, (2, 4), dot_general=ops.make_dot_general(CFG), rngs=rngs)
  y = nnx.jit(lambda m, x: m(x))(lg, x)
  close(y, dot(x, lg.kernel[...]) + lg.bias[...])
  assert rel_err(y, jnp.einsum('bd,dhk->bhk', x, lg.kernel[...]) + lg.bias[...]) > 1e-4

  ein = nnx.Einsum('bd,dhk->bhk', (16, 2, 4), (2, 4), einsum_op=make_einsum(CFG), rngs=rngs)
  y = nnx.jit(lambda m, x: m(x))(ein, x)
  close(y, jax.jit(lambda x, k: einsum('bd,dhk->bhk', x, k, config=CFG))(x, ein.kernel[...]) + ein.bias[...])
  assert rel_err(y, jnp.einsum('bd,dhk->bhk', x, ein.kernel[...]) + ein.bias[...]) > 1e-4

  img = normal(3, (2, 8, 8, 3))
  conv_fn = make_conv_general_dilated(CFG)
  conv = nnx.Conv(3, 5, (3, 3), conv_general_dilated=conv_fn, rngs=rngs)
  y = nnx.jit(lambda m, x: m(x))(conv, img)
  want = jax.jit(lambda x, k: conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), config=CFG,
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(img, conv.kernel[...])
  close(y, want + conv.bias[...])
  float_conv = jax.lax.conv_general_dilated(img, conv.kernel[...], (1, 1), 'SAME',
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert rel_err(y, float_conv + conv.bias[...]) > 1e-4

  # Quantizing by rules afterwards leaves explicitly plugged ops alone and hooks the default ones.
  class Two(nnx.Module):
    def __init__(self):
      self.conv, self.plain = conv, nnx.Conv(5, 5, (3, 3), rngs=rngs)

    def __call__(self, x):
      return self.plain(self.conv(x))
  two = Two()
  quantize_nnx(two, [{'module_path': 'plain', 'weight': W8, 'act': A8}], img)
  assert two.conv.conv_general_dilated is conv_fn
  assert two.plain.conv_general_dilated is intercept.HOOKS['conv_general_dilated']


# ---------------------------------------------------------------------------------- unmodified models


def test_mlp_by_rules_trains_on_fashion_mnist_fixtures():
  images, labels = load_images('fashion_mnist', 'train', fixtures=True, verbose=False)
  order = np.random.default_rng(0).permutation(len(images))[:96]
  x, y = jnp.asarray(images[order], jnp.float32) / 255.0, jnp.asarray(labels[order])
  model = MLP((64,), 10, rngs=nnx.Rngs(0))
  rules = [{'module_path': 'hidden/.*', 'weight': {'format': 'int4', 'granularity': 'per_channel'}, 'act': A8,
            'grad': {'format': 'int8', 'granularity': 'per_channel'}, 'name': 'hidden'},
           {'module_path': 'head', 'weight': W8, 'act': A8, 'name': 'head'}]
  rs = quantize_nnx(model, rules, x[:2])
  assert [(m.path, m.rule, m.lhs, m.rhs) for m in rs.quantized()] == [
      ('hidden/0', 'hidden', 'act', 'kernel'), ('head', 'head', 'act', 'kernel')]
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, g = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, g)
    return loss
  losses = [float(step(model, opt)) for _ in range(10)]
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


def test_transformer_block_attention_einsums_by_rules():
  block = Block(16, 2, rngs=nnx.Rngs(0))
  x = normal(0, (4, 12, 16))
  mask = nnx.make_causal_mask(jnp.ones((4, 12)))
  yf = block(x, mask)
  attn = {'module_path': 'attn', 'op_names': ['einsum'], 'act': {'format': 'int8', 'granularity': 'per_channel'},
          'name': 'scores'}
  rs = quantize_nnx(block, [attn, {'module_path': '.*', 'weight': W8, 'act': A8, 'name': 'dense'}], x, mask)
  y = nnx.jit(lambda m, x, mask: m(x, mask))(block, x, mask)
  ein = [m for m in rs.quantized() if m.op == 'einsum']
  assert [(m.path, m.rule, m.lhs, m.rhs, m.weight_operands) for m in ein] == [('attn', 'scores', 'act', 'act', ())] * 2
  assert all(m.dot_config.fwd.lhs.format == m.dot_config.fwd.rhs.format == 'int8' for m in ein)
  assert {m.path for m in rs.quantized() if m.op == 'dot_general'} == {
      'attn/query', 'attn/key', 'attn/value', 'attn/out', 'up', 'down'}
  assert 'lhs=act rhs=act' in [line for line in rs.report().splitlines() if 'einsum' in line][0]
  assert 0 < rel_err(y, yf) < 0.05
  # Only the attention einsums quantized: the output moves, so they really run quantized.
  only = Block(16, 2, rngs=nnx.Rngs(0))
  quantize_nnx(only, [attn], x, mask)
  assert 0 < rel_err(nnx.jit(lambda m, x, mask: m(x, mask))(only, x, mask), yf) < 0.02


def test_attention_einsums_kept_float_by_a_rule_run_fused_and_count_as_matched():
  """A keep_float rule on the attention einsums: the model's own (fused) attention runs, bit for bit what no rule
  at all gives, and the rule is reported as used (before: warned as 'matched no op')."""
  x = normal(0, (4, 12, 16))
  mask = nnx.make_causal_mask(jnp.ones((4, 12)))
  dense = {'module_path': '(?!attn$).*', 'weight': W8, 'act': A8, 'name': 'dense'}  # every op but attn's einsums
  keep = {'module_path': 'attn', 'op_names': ['einsum'], 'keep_float': True, 'name': 'attn_float'}
  ys = []
  for rules in ([keep, dense], [dense]):
    block = Block(16, 2, rngs=nnx.Rngs(0))
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      rs = quantize_nnx(block, rules, x, mask)
      ys.append(nnx.jit(lambda m, x, mask: m(x, mask))(block, x, mask))
    assert not [str(w.message) for w in caught if 'qjax' in str(w.message)]
    assert rs.unused_rules() == []
  assert jnp.array_equal(ys[0], ys[1])
  block = Block(16, 2, rngs=nnx.Rngs(0))
  rs = quantize_nnx(block, [keep, dense], x, mask)
  ein = [m for m in rs.matches.values() if m.op == 'einsum']
  assert [(m.path, m.rule, m.config) for m in ein] == [('attn', 'attn_float', 'float')] * 2
  assert not [m for m in rs.quantized() if m.op == 'einsum']


def test_quantize_nnx_does_not_clone():
  model = MLP((512, 512), 10, rngs=nnx.Rngs(0))  # 784-512-512-10: 2.7 MB of params
  x = normal(0, (8, 784))
  layers = [model.hidden[0], model.hidden[1], model.head]
  kernels = [m.kernel for m in layers]
  values = [k.get_value() for k in kernels]
  model_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model)))
  gc.collect()
  before = jax.live_arrays()
  n0, b0 = len(before), sum(a.nbytes for a in before)
  del before
  quantize_nnx(model, [{'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
                        'act': A8}], x)
  gc.collect()
  after = jax.live_arrays()
  n1, b1 = len(after), sum(a.nbytes for a in after)
  del after
  assert [m.kernel for m in layers] == kernels and all(m.kernel is k for m, k in zip(layers, kernels, strict=True))
  assert all(k.get_value() is v for k, v in zip(kernels, values, strict=True))
  assert model.hidden[0] is layers[0] and type(layers[0]).__mro__[1] is nnx.Linear  # same object, new class
  # Memory proxy: the bytes of live arrays grow by the quantizer state only (a few scales), not a model copy.
  assert model_bytes > 2_500_000
  assert b1 <= 1.3 * b0 and b1 - b0 < 0.05 * model_bytes, (b0, b1, model_bytes)
  assert n1 - n0 <= 3 + 4  # three learned weight steps, three activations are dynamic; slack for caches


class NLayer(nnx.Module):
  def __init__(self, rngs):
    self.fc = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.fc(x))


class Stacked(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NLayer(rngs)
    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return layer(x)
    return body(self.layers, x)


def test_weights_inside_nnx_scan_are_weights():
  model = Stacked(nnx.Rngs(0))
  rule = QuantRule(weight=QuantSpec('int8', 'per_channel', estimator='lsq'), act=QuantSpec('int8'), act_static=True)
  x = normal(0, (40, 16))
  rs = quantize_nnx(model, [rule], x)
  fc = model.layers.fc
  assert fc.kernel.shape == (3, 16, 16) and fc.qjax_dot_general0_rhs_scale.shape == (3, 1, 16)
  assert isinstance(fc.qjax_dot_general0_lhs_scale, QuantStat) and fc.qjax_dot_general0_lhs_scale.shape == (3, 1, 1)
  (m,) = rs.quantized()
  assert (m.path, m.lhs, m.rhs) == ('layers/fc', 'act', 'kernel')
  model.eval()
  y = nnx.jit(lambda m, x: m(x))(model, x)
  cfg, h = rule.dot_config(False, True), x
  for i in range(3):
    h = jax.nn.relu(ops.dot_general(h, fc.kernel[...][i], MM, config=cfg,
                                    lhs_params={'scale': fc.qjax_dot_general0_lhs_scale[...][i]},
                                    rhs_params={'scale': fc.qjax_dot_general0_rhs_scale[...][i]}) + fc.bias[...][i])
  close(y, h)
  # A jit-compiled training step updates the stacked learned steps.
  model.train()
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  s0 = fc.qjax_dot_general0_rhs_scale[...]

  @nnx.jit
  def step(model, opt):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    opt.update(model, g)
    return loss
  step(model, opt)
  assert not jnp.array_equal(fc.qjax_dot_general0_rhs_scale[...], s0)
  # Serving conversion of stacked weights is not supported: a clear error, and the model is left as it was.
  with pytest.raises(ValueError, match='layers/fc/kernel has shape \\(3, 16, 16\\) but its op saw \\(16, 16\\): '
                                       'weights used inside an NNX transform over stacked layers'):
    convert_nnx(model, x)
  assert fc.kernel[...].dtype == jnp.float32 and hasattr(fc, 'qjax_dot_general0_rhs_scale')


# ------------------------------------------------------------------------------------------ quantizer state


STATE_RULES = [
    {'module_path': 'hidden/0', 'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
     'act': {'format': 'int8', 'estimator': 'lsq'}},
    {'module_path': 'hidden/1', 'weight': W8, 'act': {'format': 'uint8', 'scheme': 'asymmetric',
                                                      'calibration': 'percentile', 'percentile': 90.0,
                                                      'estimator': 'lsq_plus'}},
    {'module_path': 'hidden/2', 'weight': {'format': 'int4', 'granularity': 'per_channel'},
     'act': {'format': 'int8', 'calibration': 'percentile', 'percentile': 95.0, 'estimator': 'pact'}},
    {'module_path': 'head', 'weight': W8, 'act_static': True, 'ema_decay': 0.9,
     'act': {'format': 'int8', 'scheme': 'asymmetric', 'calibration': 'minmax'}},
]
LEARNED = [('hidden', 0, 'qjax_dot_general0_lhs_scale'), ('hidden', 0, 'qjax_dot_general0_rhs_scale'),
           ('hidden', 1, 'qjax_dot_general0_lhs_scale'), ('hidden', 1, 'qjax_dot_general0_lhs_offset'),
           ('hidden', 2, 'qjax_dot_general0_lhs_alpha')]


def _state_model(x):
  model = MLP((32, 32, 32), 10, rngs=nnx.Rngs(0), in_features=20)
  quantize_nnx(model, STATE_RULES, x)
  return model


def test_learned_params_and_qjax_stats_train_freeze_and_survive_orbax(tmp_path):
  x, labels = normal(0, (48, 20)), jnp.arange(48) % 10
  model = _state_model(x)
  params = nnx.state(model, nnx.Param)
  names = {(str(p[0]), p[-1]) for p, _ in nnx.to_flat_state(params) if str(p[-1]).startswith('qjax_')}
  assert names == {('hidden', n) for _, _, n in LEARNED}
  stats = nnx.state(model, QuantStat)
  assert {p for p, _ in nnx.to_flat_state(stats)} == {
      ('head', f'qjax_dot_general0_lhs_{k}') for k in ('count', 'scale', 'zero_point')}
  head = model.head
  assert float(head.qjax_dot_general0_lhs_count[...]) == 1.0  # the sample run calibrates once
  learned = lambda: {(i, n): getattr(model.hidden[i], n)[...] for _, i, n in LEARNED}
  before, stat0 = learned(), head.qjax_dot_general0_lhs_scale[...]
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x):
    loss, g = nnx.value_and_grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean())(
        model)
    opt.update(model, g)
    return loss
  for i in range(3):
    step(model, opt, normal(10 + i, (48, 20)))
  after = learned()
  for k in before:
    assert not jnp.array_equal(after[k], before[k]), k
  assert float(head.qjax_dot_general0_lhs_count[...]) == 4.0
  assert not jnp.array_equal(head.qjax_dot_general0_lhs_scale[...], stat0)

  # Evaluation freezes the statistics and uses them.
  model.eval()
  frozen = jax.tree.map(jnp.copy, nnx.state(model, QuantStat))
  fwd = nnx.jit(lambda m, x: m(x))
  x2 = normal(20, (48, 20)) * 3
  y_eval = fwd(model, x2)
  for a, b in zip(jax.tree.leaves(nnx.state(model, QuantStat)), jax.tree.leaves(frozen), strict=True):
    assert jnp.array_equal(a, b)
  scale = head.qjax_dot_general0_lhs_scale[...]
  head.qjax_dot_general0_lhs_scale[...] = scale * 1.5
  assert not jnp.array_equal(fwd(model, x2), y_eval)
  head.qjax_dot_general0_lhs_scale[...] = scale

  # Orbax round trip into a freshly built and quantized model: learned params and statistics exactly.
  state = nnx.state(model)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'qat', state)
  ckpt.wait_until_finished()
  fresh = _state_model(x)
  fresh.eval()
  restored = ckpt.restore(tmp_path / 'qat', jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh)))
  nnx.update(fresh, restored)
  for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(state), strict=True):
    assert a.dtype == b.dtype and jnp.array_equal(a, b)
  assert jnp.array_equal(fwd(fresh, x2), y_eval)


def test_eager_grad_keeps_weights_as_weights():
  lin = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  x = normal(0, (8, 6))
  rs = quantize_nnx(lin, [{'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
                           'act': {'format': 'int8', 'estimator': 'lsq'}}], x)
  g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(lin)  # eager: a same-dtype cast of the kernel is a new tracer
  assert g['qjax_dot_general0_rhs_scale'][...].shape == (1, 4)
  assert float(jnp.abs(g['qjax_dot_general0_rhs_scale'][...]).max()) > 0
  (m,) = rs.quantized()
  assert (m.lhs, m.rhs) == ('act', 'kernel')


def test_fp8_delayed_scaling():
  e4 = {'format': 'fp8_e4m3'}
  rule = QuantRule(weight=e4, act=e4, delayed_scaling=4)
  lin = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
  xs = [normal(i, (40, 16)) * (i + 1) for i in range(4)]
  quantize_nnx(lin, [rule], xs[0])
  k = lin.kernel[...]
  amax_w = float(jnp.max(jnp.abs(k)))
  hist = lambda side: np.asarray(getattr(lin, f'qjax_dot_general0_{side}_amax_history')[...])
  assert isinstance(lin.qjax_dot_general0_lhs_amax_history, QuantStat)
  np.testing.assert_array_equal(hist('lhs'), [jnp.max(jnp.abs(xs[0])), 0, 0, 0])
  fwd = nnx.jit(lambda m, x: m(x))
  for x in xs[1:]:
    fwd(lin, x)
  np.testing.assert_array_equal(hist('lhs'), [jnp.max(jnp.abs(x)) for x in xs[::-1]])
  np.testing.assert_array_equal(hist('rhs'), [amax_w] * 4)
  # The scale comes from the history's max; evaluation does not roll.
  lin.qjax_dot_general0_lhs_amax_history[...] = jnp.array([1.0, 7.0, 3.0, 2.0])
  lin.eval()
  x = normal(5, (40, 16))
  y = fwd(lin, x)
  np.testing.assert_array_equal(hist('lhs'), [1.0, 7.0, 3.0, 2.0])
  spec = QuantSpec('fp8_e4m3')
  scale = lambda amax: calibration.symmetric_scale(jnp.full((1, 1), amax, jnp.float32), spec)
  want = jax.jit(lambda x, k: ops.dot_general(x, k, MM, config=rule.dot_config(False, True),
                                              lhs_params={'scale': scale(7.0)},
                                              rhs_params={'scale': scale(amax_w)}))(x, k) + lin.bias[...]
  close(y, want)
  assert not np.allclose(y, ops.dot_general(x, k, MM, config=rule.dot_config(False, True)) + lin.bias[...],
                         rtol=1e-6, atol=1e-6)
  lin.train()
  fwd(lin, x)
  np.testing.assert_array_equal(hist('lhs'), [jnp.max(jnp.abs(x)), 1.0, 7.0, 3.0])


# ------------------------------------------------------------------------------------------------ sharding


def test_sharding_metadata_carries_over_to_scales():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('embed', 'mlp'))
  init = nnx.initializers.lecun_normal()

  class Sharded(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ('embed', 'mlp'), mesh=mesh), rngs=rngs)
      self.down = nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, ('mlp', 'embed'), mesh=mesh),
                             rngs=rngs)

    def __call__(self, x):
      return self.down(nnx.relu(self.up(x)))
  model = Sharded(nnx.Rngs(0))
  x = normal(0, (40, 16))
  quantize_nnx(model, [{'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
                        'act': A8}], x)
  specs = nnx.get_partition_spec(nnx.state(model))
  assert specs['up']['kernel'].get_value() == P('embed', 'mlp')
  assert specs['up']['qjax_dot_general0_rhs_scale'].get_value() == P(None, 'mlp')
  assert specs['down']['qjax_dot_general0_rhs_scale'].get_value() == P(None, 'embed')
  scale = model.up.qjax_dot_general0_rhs_scale
  assert scale.get_metadata()['out_sharding'] == (None, 'mlp') and scale.get_metadata()['mesh'] is mesh
  # Serving: the ServingWeight keeps the names (its qvalue, stored transposed, the reversed ones); its scale is
  # unsharded on the reduced axis.
  model.eval()
  y = nnx.jit(lambda m, x: m(x))(model, x)
  assert len(convert_nnx(model, x).weights) == 2
  sw = model.up.kernel.get_value()
  assert isinstance(sw, ServingWeight) and sw.names == ('embed', 'mlp') and sw.transposed
  assert sw.partition_specs().qvalue == P('mlp', 'embed') and sw.partition_specs().scale == P(None, 'mlp')
  assert sw.qvalue.sharding.spec == P('mlp', 'embed') and sw.scale.sharding.spec == P(None, 'mlp')
  assert jnp.array_equal(nnx.jit(lambda m, x: m(x))(model, x), y)
