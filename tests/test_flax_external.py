"""Models written the way external code writes them, quantized by rules (small random configs, no downloads).

Faithful small reimplementations of the styles that matter for op interception:
  GPT2Like   (HF FlaxGPT2 style) projections that store their kernel (out, in) and call
             `lax.dot_general(x, kernel.T)`; the LM head reuses the token embedding through `nn.Embed.attend`.
  LlamaLike  setup()-style modules: attention whose einsums run from a plain method, and a root-level embedding
             table used as `x @ table.T` for the logits.
  ConvNet    nn.Conv / nn.Dense.
For each: ops matched, every kernel recognised as a weight with the right channel axis (in the param's own
layout), W8A8 vs W4A8 error, QAT, PTQ conversion, serving vs QAT eval, and int8 matmuls in the HLO.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qjax.flax import ServingWeight, add_quant_vars, convert_linen, quantize_linen
from qjax.ops.inspect import parse_lowered

V, D, T, B = 48, 32, 8, 4


class Conv1D(nn.Module):
  """HF FlaxConv1D: kernel stored (features, in), used transposed."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.normal(0.2), (self.features, x.shape[-1]))
    kernel = jnp.asarray(kernel.transpose(), jnp.float32)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + self.param('bias', nn.initializers.zeros, (self.features,))


class GPT2Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    qkv = Conv1D(3 * D, name='c_attn')(h)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    att = jax.nn.softmax(jnp.einsum('btd,bsd->bts', q, k) / np.sqrt(D), axis=-1)
    x = x + Conv1D(D, name='c_proj')(jnp.einsum('bts,bsd->btd', att, v))
    h = nn.LayerNorm()(x)
    return x + Conv1D(D, name='mlp_proj')(nn.gelu(Conv1D(2 * D, name='mlp_fc')(h)))


class GPT2Like(nn.Module):
  @nn.compact
  def __call__(self, ids):
    wte = nn.Embed(V, D, embedding_init=nn.initializers.normal(0.5), name='wte')
    x = wte(ids)
    x = GPT2Block(name='h_0')(x)
    return wte.attend(nn.LayerNorm()(x))  # tied LM head: jnp.dot(x, embedding.T)


class Attention(nn.Module):
  """setup()-style attention: its ops run from a plain method."""

  def setup(self):
    self.wq = nn.Dense(D, use_bias=False)
    self.wk = nn.Dense(D, use_bias=False)
    self.wo = nn.DenseGeneral(D, axis=-1, use_bias=False)

  def scores(self, q, k):
    return jnp.einsum('btd,bsd->bts', q, k) / np.sqrt(D)

  def __call__(self, x):
    att = jax.nn.softmax(self.scores(self.wq(x), self.wk(x)), axis=-1)
    return self.wo(jnp.einsum('bts,bsd->btd', att, x))


class LlamaLike(nn.Module):
  def setup(self):
    self.embedding = self.param('embedding', nn.initializers.normal(0.5), (V, D))
    self.attn = Attention()
    self.up = nn.Dense(2 * D, use_bias=False)
    self.down = nn.Dense(D, use_bias=False)

  def decode(self, x):
    return x @ self.embedding.T  # logits through the embedding table, at the root module

  def __call__(self, ids):
    x = self.embedding[ids]
    x = x + self.attn(x)
    x = x + self.down(nn.silu(self.up(x)))
    return self.decode(x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(16, (3, 3), name='conv2')(x))
    return nn.Dense(10, name='head')(x.reshape(x.shape[0], -1))


def w_rule(bits, estimator='ste', **kw):
  return [{'module_path': '.*', 'op_names': ('dot_general', 'conv'),
           'weight': {'format': f'int{bits}', 'granularity': 'per_channel', 'estimator': estimator},
           'act': {'format': 'int8'}, 'mode': 'real', **kw}]


# model, input maker, {weight param path: channel axes in the param's layout}
CASES = {
    'gpt2': (GPT2Like, lambda s: jax.random.randint(jax.random.key(s), (B, T), 0, V),
             {'h_0/c_attn/kernel': (0,), 'h_0/c_proj/kernel': (0,), 'h_0/mlp_fc/kernel': (0,),
              'h_0/mlp_proj/kernel': (0,), 'wte/embedding': (0,)}),
    'llama': (LlamaLike, lambda s: jax.random.randint(jax.random.key(s), (B, T), 0, V),
              {'attn/wq/kernel': (1,), 'attn/wk/kernel': (1,), 'attn/wo/kernel': (1,), 'up/kernel': (1,),
               'down/kernel': (1,), 'embedding': (0,)}),
    'conv': (ConvNet, lambda s: jax.random.normal(jax.random.key(s), (B, 8, 8, 3)),
             {'conv1/kernel': (3,), 'conv2/kernel': (3,), 'head/kernel': (1,)}),
}


def weights_of(qm):
  return {m.rhs_weight or m.lhs_weight: m.rhs_channels if m.rhs_weight else m.lhs_channels
          for m in qm.rules.quantized() if m.rhs_weight or m.lhs_weight}


def int8_matmuls(fn, *args):
  return sum(op.category == 'int8' for op in parse_lowered(jax.jit(fn).lower(*args).as_text(debug_info=True)))


@pytest.mark.parametrize('name', sorted(CASES))
@pytest.mark.parametrize('jit', [False, True])
def test_every_kernel_is_a_weight_with_its_channel_axis(name, jit):
  model_cls, inputs, want = CASES[name]
  qm = quantize_linen(model_cls(), w_rule(8))
  x = inputs(0)
  init = jax.jit(qm.init) if jit else qm.init
  init(jax.random.key(0), x)
  assert weights_of(qm) == want
  report = qm.report()
  for path in want:
    assert f'param {path} ' in report
  assert '<root>' not in report or name == 'llama'  # only LlamaLike computes at its root (decode)
  if name == 'llama':
    assert qm.rules.matches[('', 'dot_general', 0)].via == 'matmul'


@pytest.mark.parametrize('name', sorted(CASES))
def test_w4_error_differs_from_w8(name):
  model_cls, inputs, _ = CASES[name]
  x = inputs(0)
  v = model_cls().init(jax.random.key(0), x)
  ref = model_cls().apply(v, x)
  err = {}
  for bits in (8, 4):
    y = jax.jit(quantize_linen(model_cls(), w_rule(bits)).apply)(v, x)
    err[bits] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  assert 0 < err[8] < err[4], err


@pytest.mark.parametrize('name', sorted(CASES))
def test_qat_steps_reduce_loss_and_move_learned_steps(name):
  model_cls, inputs, _ = CASES[name]
  x = inputs(0)
  float_v = model_cls().init(jax.random.key(0), x)
  qm = quantize_linen(model_cls(), w_rule(4, 'lsq'))
  v = add_quant_vars(qm, float_v, x)  # a pretrained model: float params kept, learned steps added
  for path, leaf in jax.tree_util.tree_leaves_with_path(float_v['params']):
    got = v['params']
    for k in path:
      got = got[k.key]
    assert got is leaf
  target = jnp.zeros_like(model_cls().apply(float_v, x))
  steps = {p: a for p, a in jax.tree_util.tree_leaves_with_path(v['params']) if 'rhs_scale' in jax.tree_util.keystr(p)}
  assert len(steps) == len(CASES[name][2])
  tx = optax.adam(1e-2)
  opt = tx.init(v['params'])

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((qm.apply({**v, 'params': p}, x) - target) ** 2))(params)
    up, opt = tx.update(g, opt)
    return optax.apply_updates(params, up), opt, loss
  params, losses = v['params'], []
  for _ in range(8):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  moved = [p for p, a in jax.tree_util.tree_leaves_with_path(params) if p in steps and not jnp.allclose(a, steps[p])]
  assert len(moved) == len(steps)


@pytest.mark.parametrize('name', sorted(CASES))
def test_ptq_conversion_serves_int8_and_equals_qat_eval(name):
  model_cls, inputs, want = CASES[name]
  x = inputs(0)
  qm = quantize_linen(model_cls(), w_rule(8, act_static=True))
  v = qm.init(jax.random.key(0), x)
  _, upd = qm.apply(v, inputs(1), mutable=['qjax_stats'])  # a calibration batch
  v = {**v, **upd}
  sv = convert_linen(qm, v, x)
  flat = {jax.tree_util.keystr(p, simple=True, separator='/'): a for p, a in
          jax.tree_util.tree_leaves_with_path(sv['params'], is_leaf=lambda a: isinstance(a, ServingWeight))}
  for path in want:
    assert isinstance(flat[path], ServingWeight), path  # no float kernel of a quantized op is left
  assert all(not isinstance(a, ServingWeight) for p, a in flat.items() if p not in want)
  if name == 'gpt2':  # a Conv1D kernel is stored (out, in) with one scale per output row
    sw = flat['h_0/c_attn/kernel']
    assert sw.shape == (3 * D, D) and sw.scale.shape == (3 * D, 1)
  xe = inputs(2)
  y_qat = jax.jit(qm.apply)(v, xe)
  y_srv = jax.jit(qm.serving().apply)(sv, xe)
  assert jnp.array_equal(y_srv, y_qat)  # tied tables too: QAT's lookup reads the table as quantized for the head
  assert jnp.array_equal(qm.serving().apply(sv, xe), y_srv)  # eager serving: same program
  assert int8_matmuls(qm.serving().apply, sv, xe) == len(want)


def test_setup_style_act_static_from_a_plain_method():
  qm = quantize_linen(LlamaLike(), [{'module_path': '.*', 'op_names': ('einsum',), 'act': {'format': 'int8'},
                                     'act_static': True}])
  x = CASES['llama'][1](0)
  v = qm.init(jax.random.key(0), x)
  stats = v['qjax_stats']['attn']
  assert set(stats) >= {'scores_einsum0_lhs_scale', 'scores_einsum0_rhs_scale', 'einsum0_lhs_scale'}
  _, upd = qm.apply(v, CASES['llama'][1](1), mutable=['qjax_stats'])
  new = upd['qjax_stats']['attn']
  assert float(new['scores_einsum0_lhs_count']) == 2.0
  assert any(not jnp.array_equal(new[k], stats[k]) for k in stats if k.endswith('_scale'))


def test_pretrained_params_missing_quantizer_state_is_a_clear_error():
  x = CASES['conv'][1](0)
  float_v = ConvNet().init(jax.random.key(0), x)
  qm = quantize_linen(ConvNet(), w_rule(8, 'lsq'))
  with pytest.raises(ValueError, match='add_quant_vars'):
    qm.apply(float_v, x)
  v = add_quant_vars(qm, float_v, x)
  assert v['params']['conv1']['kernel'] is float_v['params']['conv1']['kernel']
  assert 'conv0_rhs_scale' in v['params']['conv1']


def test_weight_rule_that_finds_no_weight_warns_once():
  class Masked(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(), (D, D))
      return x @ (w * jnp.tril(jnp.ones((D, D))))  # a param times a mask is no weight
  qm = quantize_linen(Masked(), [{'module_path': '.*', 'weight': {'format': 'int4'}}])
  with pytest.warns(UserWarning, match="rule '.\\*' has a weight spec, but none of the 1 op.*rhs is made by mul"):
    qm.init(jax.random.key(0), jnp.ones((2, D)))


def test_tied_weight_used_with_two_specs_is_a_clear_conversion_error():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(), (D, D))
      return jnp.dot(x @ w, w.T)  # per-channel over columns, then over rows
  qm = quantize_linen(Tied(), w_rule(8))
  x = jnp.ones((2, D))
  v = qm.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='the weight w is shared by 2 quantized ops that quantize it differently'):
    convert_linen(qm, v, x)


def test_broadcasting_matmul_is_listed_as_not_reachable():
  class Batched(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.matmul(x[:, None], jnp.ones((3, D, 4)))  # (B, 1, T, D) @ (3, D, 4): broadcast batch dims
  qm = quantize_linen(Batched(), w_rule(8))
  with pytest.warns(UserWarning, match='not quantized, not reachable: matmul at <root>'):
    qm.init(jax.random.key(0), jnp.ones((2, T, D)))
  assert 'not quantized, not reachable' in qm.report()


def test_a_rule_can_name_the_root_module():
  rule = {'module_path': '<root>', 'weight': {'format': 'int8', 'granularity': 'per_channel'},
          'act': {'format': 'int8'}}
  qm = quantize_linen(LlamaLike(), [rule])
  qm.init(jax.random.key(0), CASES['llama'][1](0))
  assert [(m.path, m.rhs_weight) for m in qm.rules.quantized()] == [('', 'embedding')]
  assert qm.report().startswith('<root> ')


class ScanCell(nn.Module):
  @nn.compact
  def __call__(self, c, x):
    return nn.Dense(D, name='fc')(c) + x, None


class Scanned(nn.Module):
  axes: tuple = (('params', 0), ('qjax_stats', 0))

  @nn.compact
  def __call__(self, x):
    cell = nn.scan(ScanCell, variable_axes=dict(self.axes), split_rngs={'params': True}, length=3)
    return cell(name='cell')(x, jnp.zeros((3,) + x.shape))[0]


def test_nn_scan_weights_and_stats_and_a_clear_error_without_qjax_stats_axes():
  rule = w_rule(8, act_static=True)
  x = jnp.ones((2, D))
  qm = quantize_linen(Scanned(), rule)
  v = qm.init(jax.random.key(0), x)
  assert weights_of(qm) == {'cell/fc/kernel': (1,)}
  assert v['qjax_stats']['cell']['fc']['dot_general0_lhs_count'].shape == (3,)  # one statistic per layer
  with pytest.raises(ValueError, match="variable_axes lack 'qjax_stats'"):
    quantize_linen(Scanned(axes=(('params', 0),)), rule).init(jax.random.key(0), x)


def test_einsum_with_the_weight_on_the_lhs():
  class WeightFirst(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(), (D, 6))
      return jnp.einsum('dk,btd->btk', w, x)
  qm = quantize_linen(WeightFirst(), [{'module_path': '.*', 'weight': {'format': 'int4', 'granularity': 'per_channel'},
                                       'act': {'format': 'int8'}}])
  x = jax.random.normal(jax.random.key(0), (2, T, D))
  v = qm.init(jax.random.key(0), x)
  (m,) = qm.rules.quantized()
  assert (m.lhs_weight, m.lhs_channels, m.rhs_weight) == ('w', (1,), None)
  assert 'int4' in m.config.split(' x ')[0]  # the weight spec went to the lhs
  sv = convert_linen(qm, v, x)
  assert isinstance(sv['params']['w'], ServingWeight)
  assert jnp.array_equal(qm.serving().apply(sv, x), qm.apply(v, x))


def test_lax_dot_and_jnp_dot_reach_the_rules():
  class Dots(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = self.param('a', nn.initializers.normal(), (6, D))
      b = self.param('b', nn.initializers.normal(), (D, D))
      return jax.lax.dot(jnp.dot(x, a.T), jnp.ones((6, D))) @ b  # (2, D) . (D, 6) . (6, D) . (D, D)
  qm = quantize_linen(Dots(), w_rule(8))
  qm.init(jax.random.key(0), jnp.ones((2, D)))
  ops = [(m.via, m.rhs_weight, m.rhs_channels) for m in qm.rules.quantized()]
  assert ops == [('dot', 'a', (0,)), ('lax.dot', None, ()), ('matmul', 'b', (1,))]


def test_an_eager_call_that_cannot_be_traced_still_runs_and_says_so():
  class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(), (D, D))
      y = x @ w  # the param itself: recognised by identity even eagerly
      return y if float(jnp.sum(x)) > 0 else -y  # Python control flow on a value: not traceable
  qm = quantize_linen(Branchy(), w_rule(8))
  x = jnp.ones((2, D))
  with pytest.warns(UserWarning, match='could not be traced abstractly first'):
    qm.init(jax.random.key(0), x)
  assert [m.rhs_weight for m in qm.rules.quantized()] == ['w']


def test_variables_closed_over_by_jit_are_still_weights():
  model_cls, inputs, want = CASES['gpt2']
  x = inputs(0)
  qm = quantize_linen(model_cls(), w_rule(8))
  v = qm.init(jax.random.key(0), x)
  y = jax.jit(lambda x: qm.apply(v, x))(x)  # v is a constant of this trace: kernel.T has no producer to follow
  assert weights_of(qm) == want
  assert jnp.allclose(y, jax.jit(qm.apply)(v, x), atol=1e-5)


class NestedApplyHead(nn.Module):
  """Hugging Face's tied LM heads: `self.lm_head.apply({'params': {'kernel': wte.T}}, x)` from inside the model."""

  def setup(self):
    self.wte = nn.Embed(V, D, embedding_init=nn.initializers.normal(0.5))
    self.lm_head = nn.Dense(V, use_bias=False)

  def __call__(self, ids):
    x = self.wte(ids)
    return self.lm_head.apply({'params': {'kernel': self.wte.variables['params']['embedding'].T}}, x)


def test_a_nested_apply_is_hosted_by_its_caller_and_its_kernel_traced_to_the_param():
  x = CASES['gpt2'][1](0)
  qm = quantize_linen(NestedApplyHead(), w_rule(8, 'lsq', act_static=True))
  v = qm.init(jax.random.key(0), x)
  (m,) = qm.rules.quantized()
  assert (m.path, m.rhs_weight, m.rhs_channels) == ('lm_head', 'wte/embedding', (0,))  # not its own 'kernel'
  assert {'lm_head_dot_general0_rhs_scale'} <= set(v['params'])  # state at the host, under the nested name
  assert {'lm_head_dot_general0_lhs_scale', 'lm_head_dot_general0_lhs_count'} <= set(v['qjax_stats'])
  _, upd = qm.apply(v, x, mutable=['qjax_stats'])
  assert float(upd['qjax_stats']['lm_head_dot_general0_lhs_count']) == 2.0
  sv = convert_linen(qm, v, x)
  assert isinstance(sv['params']['wte']['embedding'], ServingWeight)
  assert 'lm_head_dot_general0_rhs_scale' not in sv['params']  # folded into the ServingWeight
  assert int8_matmuls(qm.serving().apply, sv, x) == 1


def test_tensordot_and_inner_reach_the_rules_and_vdot_is_listed_as_not_reachable():
  class Contractions(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = self.param('a', nn.initializers.normal(), (D, 6))
      b = self.param('b', nn.initializers.normal(), (5, 6))  # stored (out, in)
      h = jnp.tensordot(x, a, axes=1)                      # (B, T, D) . (D, 6)
      y = jnp.inner(h, b)                                  # (B, T, 6) . (5, 6)^T
      return y + jnp.tensordot(y, jnp.ones((5, 5)), axes=((2,), (0,))) + jnp.vdot(x, x)
  qm = quantize_linen(Contractions(), w_rule(8))
  x = jax.random.normal(jax.random.key(0), (2, T, D))
  with pytest.warns(UserWarning, match='not quantized, not reachable: vdot at <root>'):
    v = qm.init(jax.random.key(0), x)
  ops = [(m.via, m.rhs_weight, m.rhs_channels) for m in qm.rules.quantized()]
  assert ops == [('tensordot', 'a', (1,)), ('inner', 'b', (0,)), ('tensordot', None, ())]
  assert 'not quantized, not reachable' in qm.report() and 'vdot' in qm.report()
  served = convert_linen(qm, v, x)
  assert set(served.weights) == {'a', 'b'} and served.weights['b'].scale.shape == (5, 1)
  assert jnp.array_equal(served(x), jax.jit(qm.apply)(v, x))
  assert int8_matmuls(served.model.apply, served.variables, x) == 3


def test_nn_remat_layers_are_quantized_converted_and_served():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.relu(nn.Dense(16, name='fc')(x))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = nn.remat(Block)(name=f'block_{i}')(x)
      return nn.Dense(4, name='head')(x)
  x = jax.random.normal(jax.random.key(0), (8, 16))
  qm = quantize_linen(Model(), w_rule(8))
  v = qm.init(jax.random.key(1), x)
  assert weights_of(qm) == {'block_0/fc/kernel': (1,), 'block_1/fc/kernel': (1,), 'head/kernel': (1,)}
  g = jax.jit(jax.grad(lambda p: jnp.sum(qm.apply({**v, 'params': p}, x) ** 2)))(v['params'])
  assert float(jnp.abs(g['block_0']['fc']['kernel']).sum()) > 0
  served = convert_linen(qm, v, x)
  assert set(served.weights) == {'block_0/fc/kernel', 'block_1/fc/kernel', 'head/kernel'}
  assert jnp.array_equal(served(x), jax.jit(qm.apply)(v, x))
  assert int8_matmuls(served.model.apply, served.variables, x) == 3
  np.testing.assert_allclose(served(x), Model().apply(v, x), rtol=0.1, atol=0.05)
