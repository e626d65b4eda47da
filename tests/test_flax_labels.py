"""qjax.flax.labels: which params are quantizer params, for optimizers that treat them apart."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qjax.flax import QuantRule, is_quantizer_param, quantize_linen, quantize_nnx, quantizer_param_labels
from qjax.spec import QuantSpec

LSQ_PACT = [QuantRule('.*', weight=QuantSpec('int4', estimator='lsq'), act=QuantSpec('uint4', estimator='pact'))]


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(name='ln')(x)  # its own 'scale' param is the model's
    return nn.Dense(3, name='fc')(nn.relu(nn.Dense(8, name='hidden')(x)))


def _flat(labels):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(labels)}


def test_names():
  for name in ('dot_general0_rhs_scale', 'conv0_lhs_alpha', 'dot_general1_lhs_offset', 'qjax_einsum0_rhs_scale',
               'attend_dot_general0_rhs_scale', 'lm_head_dot_general0_lhs_alpha'):
    assert is_quantizer_param(name), name
  for name in ('kernel', 'bias', 'scale', 'embedding', 'dot_general0_rhs_amax', 'layer0_scale', 'qjax_rngs'):
    assert not is_quantizer_param(name), name


def test_linen_labels_split_learned_steps_and_clips_from_the_model():
  x = jax.random.normal(jax.random.key(0), (4, 6))
  q = quantize_linen(Net(), LSQ_PACT)
  params = q.init(jax.random.key(1), x)['params']
  labels = _flat(quantizer_param_labels(params))
  model = {k for k, v in labels.items() if v == 'model'}
  quant = {k for k, v in labels.items() if v == 'quantizer'}
  assert model == {"['ln']['scale']", "['ln']['bias']", "['hidden']['kernel']", "['hidden']['bias']",
                   "['fc']['kernel']", "['fc']['bias']"}
  assert quant == {f"['{m}']['dot_general0_{s}']" for m in ('hidden', 'fc') for s in ('lhs_alpha', 'rhs_scale')}


def test_nnx_labels_and_an_optimizer_that_decays_only_the_model():
  model = nnx.Sequential(nnx.Linear(6, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 3, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (4, 6))
  quantize_nnx(model, LSQ_PACT, x)
  params = nnx.state(model, nnx.Param)
  labels = _flat(quantizer_param_labels(params))
  assert sum(v == 'quantizer' for v in labels.values()) == 4 and sum(v == 'model' for v in labels.values()) == 4
  # adamw with decay 0.5 on the model, none on the quantizer params: a zero gradient moves only model params.
  tx = optax.multi_transform({'model': optax.adamw(0.1, weight_decay=0.5), 'quantizer': optax.adam(0.1)},
                             quantizer_param_labels)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = jax.tree.map(jnp.array, nnx.state(model, nnx.Param))
  opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))
  after = nnx.state(model, nnx.Param)
  moved = {k: not bool(jnp.array_equal(a, b)) for (k, a), (_, b) in
           zip(_flat(before).items(), _flat(after).items(), strict=True)}
  # (the biases start at zero, where decay does nothing)
  assert {k for k, m in moved.items() if m} == {k for k, v in labels.items() if v == 'model' and 'kernel' in k}
