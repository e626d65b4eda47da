"""Models written by others: Hugging Face transformers' Flax GPT-2, BERT and ResNet, quantized by rules.

Tiny random configs, built with `seed=0` (no downloads). The model's own params stand in for a pretrained
checkpoint. Each family: the ops matched, every kernel recognised as a weight with its channel axis in its
stored layout, W8A8 and W4A8 forward errors vs float, QAT steps (LSQ) that lower the loss and move the learned
steps, PTQ conversion that leaves no float kernel of a quantized op, serving equal to the QAT evaluation forward
bit for bit, and the int8 matmuls in the compiled HLO.
  GPT-2 (Linen):  FlaxConv1D stores its kernel (out, in) and calls lax.dot_general(x, kernel.T); the LM head is a
                  nested `lm_head.apply({'params': {'kernel': wte.embedding.T}}, x)` tied to the token embedding.
  BERT (NNX):     the Linen module wrapped by nnx.bridge.ToNNX as the root of the NNX model, quantize_nnx.
  ResNet (Linen): convolutions, batch norm, a Dense classifier.
Compiled pieces are shared through module-scoped fixtures.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
import transformers  # a test dependency (pyproject's [test] extra)
from flax import nnx

from qjax.flax import Served, ServingWeight, add_quant_vars, convert_linen, convert_nnx, quantize_linen, quantize_nnx
from qjax.ops.inspect import parse_lowered


def rules(bits, estimator='ste', ops=('dot_general', 'conv')):
  return [{'module_path': '.*', 'op_names': ops, 'mode': 'real', 'act': {'format': 'int8'},
           'weight': {'format': f'int{bits}', 'granularity': 'per_channel', 'estimator': estimator}}]


def flat(tree, leaf=lambda a: isinstance(a, ServingWeight)):
  return {jax.tree_util.keystr(p, simple=True, separator='/'): a
          for p, a in jax.tree_util.tree_leaves_with_path(tree, is_leaf=leaf)}


def kernels(params) -> dict:
  return {p: a for p, a in flat(params).items() if p.endswith('/kernel')}


def weights_of(matches) -> dict:
  return {m.rhs_weight: m.rhs_channels for m in matches if m.rhs_weight}


def rel_err(y, ref):
  y, ref = (y[0], ref[0]) if isinstance(y, tuple) else (y, ref)  # a model's outputs: its first (logits)
  return float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))


def int8_dots(lowered) -> int:
  return sum(op.category == 'int8' for op in parse_lowered(lowered.as_text(debug_info=True)))


def lsq_steps(params) -> dict:
  return {p: a for p, a in flat(params).items() if p.endswith('_rhs_scale')}


# ------------------------------------------------------------------------------------------------- Linen


def linen_family(module, variables, args, loss_fn, kwargs, eager=True):
  """Everything the Linen tests check, computed once: {name: value}. `eager`: add_quant_vars runs eagerly and
  must return the pretrained arrays themselves; else compiled (faster for convolutions), their values."""
  out = {}
  fwd = lambda qm: jax.jit(lambda v, *a: qm.apply(v, *a, **kwargs))
  out['ref'] = ref = jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(variables, *args)
  # W8A8: the PTQ model (per-channel int8 weights, dynamic int8 activations)
  q8 = quantize_linen(module, rules(8))
  if eager:
    v8 = add_quant_vars(q8, variables, *args, **kwargs)
    same = lambda a, b: a is b
  else:
    v8 = jax.jit(lambda v, *a: add_quant_vars(q8, v, *a, **kwargs))(variables, *args)
    same = lambda a, b: bool(jnp.array_equal(a, b))
  out['untouched'] = all(same(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(
      {k: v8[k] for k in variables}), strict=True))
  out['matches'] = q8.rules.quantized()
  out['y8'] = y8 = fwd(q8)(v8, *args)
  served = convert_linen(q8, v8, *args, **kwargs)
  out['served'] = served
  lowered = jax.jit(lambda v, *a: served.model.apply(v, *a, **kwargs)).lower(served.variables, *args)
  out['int8_dots'] = int8_dots(lowered)
  out['y_srv'] = lowered.compile()(served.variables, *args)
  out['y_call'] = served(*args, **kwargs)
  out['err8'] = rel_err(y8, ref)
  # W4A8 with learned steps (LSQ), fine-tuned from the pretrained params
  q4 = quantize_linen(module, rules(4, 'lsq'))
  v4 = jax.jit(lambda v, *a: add_quant_vars(q4, v, *a, **kwargs))(variables, *args)  # compiled: no eager ops
  out['err4'] = rel_err(fwd(q4)(v4, *args), ref)
  steps0 = lsq_steps(v4['params'])
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: loss_fn(q4.apply({**v4, 'params': p}, *args, **kwargs)))(params)
    up, opt = tx.update(g, opt)
    return optax.apply_updates(params, up), opt, loss
  params, opt, losses = v4['params'], tx.init(v4['params']), []
  for _ in range(6):
    params, opt, loss = step(params, opt)
    losses.append(float(loss))
  out['losses'] = losses
  out['steps'] = (steps0, lsq_steps(params))
  return out


def gpt2_args(ids):
  return ids, jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


@pytest.fixture(scope='module')
def gpt2():
  cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
  model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0)
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  loss = lambda out: optax.softmax_cross_entropy_with_integer_labels(out[0][:, :-1], ids[:, 1:]).mean()
  res = linen_family(model.module, {'params': model.params}, gpt2_args(ids), loss, {'return_dict': False})
  res['params'] = model.params
  return res


@pytest.fixture(scope='module')
def resnet():
  cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                  layer_type='basic', num_labels=5)
  module = transformers.FlaxResNetForImageClassification(cfg, seed=0, _do_init=False).module
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))  # NHWC: the module (its wrapper transposes NCHW)
  variables = jax.jit(lambda k, x: module.init(k, x, return_dict=False))(jax.random.key(0), x)  # compiled init
  labels = jnp.array([1, 3])
  loss = lambda out: optax.softmax_cross_entropy_with_integer_labels(out[0], labels).mean()
  res = linen_family(module, dict(variables), (x,), loss, {'return_dict': False}, eager=False)
  res['params'] = variables['params']
  return res


GPT2_WEIGHTS = {f'transformer/h/{i}/{m}/kernel': (0,) for i in (0, 1)  # FlaxConv1D: (out, in), out per channel
                for m in ('attn/c_attn', 'attn/c_proj', 'mlp/c_fc', 'mlp/c_proj')}
GPT2_WEIGHTS['transformer/wte/embedding'] = (0,)  # the tied head: wte.T, one scale per vocabulary row


def test_gpt2_every_kernel_is_a_weight_in_its_stored_layout(gpt2):
  matches = gpt2['matches']
  assert weights_of(matches) == GPT2_WEIGHTS
  assert set(kernels(gpt2['params'])) | {'transformer/wte/embedding'} == set(GPT2_WEIGHTS)
  head = [m for m in matches if m.rhs_weight == 'transformer/wte/embedding']
  assert [m.path for m in head] == ['lm_head']  # the nested apply, named as in the model
  assert all(m.lhs == 'act' for m in matches)


def test_gpt2_errors_qat_serving_and_hlo(gpt2):
  assert gpt2['untouched']  # add_quant_vars kept every pretrained array (the same objects)
  assert 0 < gpt2['err8'] < gpt2['err4'] < 0.5, (gpt2['err8'], gpt2['err4'])
  losses = gpt2['losses']
  assert losses[-1] < losses[0], losses
  s0, s1 = gpt2['steps']
  assert len(s0) == len(GPT2_WEIGHTS) and all(not jnp.array_equal(s0[p], s1[p]) for p in s0)
  served = gpt2['served']
  assert isinstance(served, Served) and set(served.weights) == set(GPT2_WEIGHTS)
  sw = served.weights['transformer/h/0/attn/c_attn/kernel']
  assert sw.shape == (96, 32) and sw.scale.shape == (96, 1) and sw.qvalue.dtype == jnp.int8  # (out, in) kept
  left = flat(served['params'])
  assert not any(p in left and not isinstance(left[p], ServingWeight) for p in GPT2_WEIGHTS)
  assert all(not k.endswith('_rhs_scale') for k in left)
  # the tied table is stored once and read quantized by the lookup in QAT as in serving: bit for bit
  assert jnp.array_equal(gpt2['y_srv'][0], gpt2['y8'][0])
  assert jnp.array_equal(gpt2['y_call'][0], gpt2['y8'][0])
  assert gpt2['int8_dots'] == len(GPT2_WEIGHTS)


RESNET_CONVS = ['resnet/embedder/embedder/convolution/kernel'] + [
    f'resnet/encoder/stages/{s}/layers/0/layer/layer_{i}/convolution/kernel' for s in (0, 1) for i in (0, 1)] + [
    'resnet/encoder/stages/1/layers/0/shortcut/convolution/kernel']


def test_resnet_every_kernel_is_a_weight_with_its_channel_axis(resnet):
  want = {p: (3,) for p in RESNET_CONVS} | {'classifier/1/kernel': (1,)}  # HWIO convs, (in, out) Dense
  assert weights_of(resnet['matches']) == want
  assert set(kernels(resnet['params'])) == set(want)
  assert sorted({m.op for m in resnet['matches']}) == ['conv', 'dot_general']


def test_resnet_errors_qat_serving_and_hlo(resnet):
  assert resnet['untouched']
  assert 0 < resnet['err8'] < resnet['err4'], (resnet['err8'], resnet['err4'])
  assert resnet['losses'][-1] < resnet['losses'][0], resnet['losses']
  s0, s1 = resnet['steps']
  assert len(s0) == 7 and all(not jnp.array_equal(s0[p], s1[p]) for p in s0)
  served = resnet['served']
  assert set(served.weights) == set(RESNET_CONVS) | {'classifier/1/kernel'}
  assert served.weights[RESNET_CONVS[0]].scale.shape == (1, 1, 1, 8)
  assert 'batch_stats' in served  # other collections are kept
  assert jnp.array_equal(resnet['y_srv'][0], resnet['y8'][0])
  assert resnet['int8_dots'] == 7
  assert '7 served weights' in served.report()


# --------------------------------------------------------------------------------------- NNX (ToNNX root)


BERT_CFG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=32)


def bert_inputs(seed):
  ids = jax.random.randint(jax.random.key(seed), (2, 8), 0, 64)
  return ids, jnp.ones_like(ids), jnp.zeros_like(ids), jnp.broadcast_to(jnp.arange(8), ids.shape)


def bert_model(module, args):
  """BERT's Linen module as the root of an NNX model: nnx.bridge.ToNNX, initialised lazily."""
  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, *args, return_dict=False)
  return model


@pytest.fixture(scope='module')
def bert():
  module = transformers.FlaxBertModel(transformers.BertConfig(**BERT_CFG), seed=0, _do_init=False).module
  args = bert_inputs(0)
  fwd = nnx.jit(lambda m, *a: m(*a, return_dict=False)[0])
  params = lambda m: flat(nnx.state(m, nnx.Param), leaf=lambda a: False)
  out = {}
  for bits, est in ((8, 'ste'), (4, 'lsq')):
    model = bert_model(module, args)  # the same random params (Rngs(0)); a model of its own for each
    before = params(model)
    out.setdefault('ref', fwd(model, *args))
    q = quantize_nnx(model, rules(bits, est, ('dot_general',)), *args, return_dict=False)
    out[f'q{bits}'], out[f'm{bits}'] = q, model
    after = params(model)
    out['untouched'] = out.get('untouched', True) and all(jnp.array_equal(after[p], a) for p, a in before.items())
    out[f'err{bits}'] = rel_err(fwd(model, *args), out['ref'])
  model = out['m4']  # QAT: the pooled output towards a target
  out['steps0'] = {p: a for p, a in params(model).items() if '_rhs_scale' in p}

  @nnx.jit
  def step(m):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(*args, return_dict=False)[1] - 0.5) ** 2))(m)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.05 * g, nnx.state(m, nnx.Param), g))
    return loss
  out['losses'] = [float(step(model)) for _ in range(4)]
  out['steps1'] = {p: a for p, a in params(model).items() if '_rhs_scale' in p}
  model.eval()
  xe = bert_inputs(1)
  out['want'] = fwd(model, *xe)
  out['want_o0'] = unoptimised(model, *xe)
  served = convert_nnx(out['q4'], *args, return_dict=False)
  out['got_o0'] = unoptimised(served.model, *xe)
  out['served'] = served
  out['got'] = served(*xe, return_dict=False)[0]
  graphdef, state = nnx.split(model)
  out['int8_dots'] = int8_dots(jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, return_dict=False)).lower(
      state, *xe))  # both outputs: the pooler's matmul is not dead code
  return out


def unoptimised(model, *args):
  """The model's first output, compiled with XLA's backend optimisations off (no reassociated float epilogue)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, return_dict=False)[0])
  return fn.lower(state, *args).compile(compiler_options={'xla_backend_optimization_level': 0})(state, *args)


BERT_DENSE = [f'encoder/layer/{i}/{m}/kernel' for i in (0, 1) for m in (
    'attention/self/query', 'attention/self/key', 'attention/self/value', 'attention/output/dense',
    'intermediate/dense', 'output/dense')] + ['pooler/dense/kernel']


def test_bert_through_tonnx_every_dense_kernel_is_a_weight(bert):
  assert weights_of(bert['q8'].quantized()) == {p: (1,) for p in BERT_DENSE}  # (in, out): out per channel
  assert bert['untouched']


def test_bert_through_tonnx_errors_qat_serving_and_hlo(bert):
  assert 0 < bert['err8'] < bert['err4'] < 0.5, (bert['err8'], bert['err4'])
  assert bert['losses'][-1] < bert['losses'][0], bert['losses']
  s0, s1 = bert['steps0'], bert['steps1']
  assert {p.rsplit('/', 2)[0] for p in s0} == {p.rsplit('/', 1)[0] for p in BERT_DENSE}, sorted(s0)
  assert len(s0) == len(BERT_DENSE) and all(not jnp.array_equal(s0[p], s1[p]) for p in s0)
  served = bert['served']
  assert isinstance(served, Served) and set(served.weights) == set(BERT_DENSE)
  assert served.model is bert['m4']  # converted in place, as quantized
  assert all(isinstance(a, ServingWeight) for a in served.weights.values())
  assert not any('_rhs_scale' in p for p in flat(nnx.state(bert['m4'], nnx.Param), leaf=lambda a: False))
  # The integer matmuls are the same, but XLA optimises the float epilogue of the two programs (dequantize, bias,
  # residual, LayerNorm) differently here: max |diff| 2.4e-7 measured. With XLA's backend optimisations off the
  # two programs agree bit for bit: the arithmetic qjax asks for is the same. GPT-2 and ResNet above are bit for
  # bit as they are.
  want = bert['want']
  assert float(jnp.max(jnp.abs(bert['got'] - want))) <= 1e-6 * float(jnp.max(jnp.abs(want)))
  assert jnp.array_equal(bert['got_o0'], bert['want_o0'])
  assert float(jnp.max(jnp.abs(bert['want_o0'] - want))) <= 1e-6 * float(jnp.max(jnp.abs(want)))  # the same model
  assert bert['int8_dots'] == len(BERT_DENSE)
