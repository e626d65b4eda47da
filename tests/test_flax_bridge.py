"""NNX: a Linen model wrapped by nnx.bridge.ToNNX inside an NNX model, quantized by quantize_nnx."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qjax.flax import QuantStat, ServingWeight, convert_nnx, quantize_nnx

RULES = [{'module_path': '.*', 'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
          'act': {'format': 'int8'}, 'act_static': True, 'mode': 'real'}]


class Proj(nn.Module):
  """External Linen style: kernel stored (out, in), used transposed."""
  features: int

  @nn.compact
  def __call__(self, x):
    k = self.param('kernel', nn.initializers.normal(0.3), (self.features, x.shape[-1]))
    return jax.lax.dot_general(x, k.T, (((x.ndim - 1,), (0,)), ((), ())))


class LinenBody(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Proj(16, name='proj')(nn.relu(nn.Dense(16, name='fc')(x)))


class Outer(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.bridge.ToNNX(LinenBody(), rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(self.body(x))


def make(x):
  model = Outer(nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)
  return model


def test_tonnx_inside_nnx_quantizes_trains_converts_and_serves():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = make(x)
  y_float = model(x)
  rs = quantize_nnx(model, RULES, x)
  found = {m.rhs_weight: m.rhs_channels for m in rs.quantized()}
  assert found == {'body/fc/kernel': (1,), 'body/proj/kernel': (0,), 'head/kernel': (1,)}
  # quantizer state lives in the ToNNX's Linen collections: LSQ steps as Params, statistics as QuantStat
  assert isinstance(model.body.fc['dot_general0_rhs_scale'], nnx.Param)
  assert isinstance(model.body.fc['dot_general0_lhs_scale'], QuantStat)
  assert float(model.body.proj['dot_general0_lhs_count'][...]) == 1.0
  y_q = model(x)
  assert not jnp.array_equal(y_q, y_float) and float(jnp.max(jnp.abs(y_q - y_float))) < 0.1
  assert float(model.body.proj['dot_general0_lhs_count'][...]) == 2.0  # training mode: statistics update

  @nnx.jit
  def step(m):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(m, nnx.Param), g))
    return loss
  s0 = model.body.fc['dot_general0_rhs_scale'][...]
  losses = [float(step(model)) for _ in range(3)]
  assert losses[-1] < losses[0]
  assert not jnp.array_equal(model.body.fc['dot_general0_rhs_scale'][...], s0)
  model.eval()
  count = float(model.body.proj['dot_general0_lhs_count'][...])
  want = nnx.jit(lambda m, x: m(x))(model, x)
  assert float(model.body.proj['dot_general0_lhs_count'][...]) == count  # eval: frozen
  assert len(convert_nnx(model, x).weights) == 3
  for var in (model.body.fc['kernel'], model.body.proj['kernel'], model.head.kernel):
    assert isinstance(var.get_value(), ServingWeight)
  assert model.body.proj['kernel'].get_value().shape == (16, 16)
  assert 'dot_general0_rhs_scale' not in vars(model.body)['fc']  # the learned step is folded into the int8 kernel
  assert jnp.array_equal(nnx.jit(lambda m, x: m(x))(model, x), want)


def test_tonnx_failed_quantization_leaves_the_model_as_it_was():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = make(x)
  y = model(x)
  with pytest.raises(flax.errors.ScopeParamShapeError):  # the wrong-shaped sample input: Linen refuses it
    quantize_nnx(model, RULES, jnp.ones((4, 3)))
  assert type(model.body) is nnx.bridge.ToNNX and jnp.array_equal(model(x), y)


# ---------------------------------------------------------------------------------- a native NNX model


V, D = 40, 16


class NnxLM(nnx.Module):
  """Native NNX, external style: a raw Param stored (out, in) used as `x @ w.T`, and a tied head via attend."""

  def __init__(self, rngs):
    self.emb = nnx.Embed(V, D, rngs=rngs)
    self.w_up = nnx.Param(jax.random.normal(rngs.params(), (2 * D, D)) * 0.3)
    self.down = nnx.Linear(2 * D, D, rngs=rngs)

  def __call__(self, ids):
    x = self.emb(ids)
    h = nnx.relu(x @ self.w_up[...].T)
    return self.emb.attend(x + self.down(h))


def w_rules(bits, estimator='ste'):
  return [{'module_path': '.*', 'weight': {'format': f'int{bits}', 'granularity': 'per_channel',
                                           'estimator': estimator}, 'act': {'format': 'int8'}, 'mode': 'real'}]


IDS = jax.random.randint(jax.random.key(3), (4, 8), 0, V)


def test_native_nnx_weights_errors_qat_conversion_and_hlo():
  ref = NnxLM(nnx.Rngs(0))(IDS)
  err = {}
  for bits in (8, 4):
    model = NnxLM(nnx.Rngs(0))
    rs = quantize_nnx(model, w_rules(bits), IDS)
    assert {m.rhs_weight: m.rhs_channels for m in rs.quantized()} == {
        'w_up': (0,), 'down/kernel': (1,), 'emb/embedding': (0,)}
    y = nnx.jit(lambda m, x: m(x))(model, IDS)
    err[bits] = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
  assert 0 < err[8] < err[4]
  # QAT: LSQ steps of every weight move and the loss goes down
  model = NnxLM(nnx.Rngs(0))
  quantize_nnx(model, w_rules(4, 'lsq'), IDS)
  learned = lambda: [model.qjax_dot_general0_rhs_scale[...], model.down.qjax_dot_general0_rhs_scale[...],
                     model.emb.qjax_attend_dot_general0_rhs_scale[...]]
  steps = learned()

  @nnx.jit
  def step(m):
    loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(IDS) - 1.0) ** 2))(m)
    nnx.update(m, jax.tree.map(lambda p, g: p - 0.05 * g, nnx.state(m, nnx.Param), g))
    return loss
  losses = [float(step(model)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert all(not jnp.array_equal(a, b) for a, b in zip(learned(), steps, strict=True))
  model.eval()
  fwd = nnx.jit(lambda m, x: m(x))
  want = fwd(model, IDS)
  assert len(convert_nnx(model, IDS).weights) == 3
  assert all(isinstance(v.get_value(), ServingWeight) for v in (model.w_up, model.down.kernel, model.emb.embedding))
  assert not any(hasattr(m, n) for m, n in ((model, 'qjax_dot_general0_rhs_scale'),
                                            (model.emb, 'qjax_attend_dot_general0_rhs_scale')))
  got = fwd(model, IDS)  # tied: the lookup reads the int4 table, in QAT (a quantized read) as in serving
  assert jnp.array_equal(got, want)
  graphdef, state = nnx.split(model)
  hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, IDS).as_text(debug_info=True)
  from qjax.ops.inspect import parse_lowered  # noqa: PLC0415
  assert sum(op.category == 'int8' for op in parse_lowered(hlo)) == 3


def test_statistics_keep_qjax_types_in_a_process_that_imports_qwix():
  # Qwix registers the Linen collection 'quant_stats' with nnx.bridge for its own variable type; qjax's collection
  # has its own name, so importing Qwix (here, after qjax: last registration wins) changes nothing for qjax.
  import qwix  # noqa: F401, PLC0415 - imported here on purpose: the order of registration is what is tested
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = make(x)
  quantize_nnx(model, RULES, x)
  assert isinstance(model.body.fc['dot_general0_lhs_scale'], QuantStat)


def test_tonnx_at_the_root_freezes_its_statistics_in_eval_mode_and_resumes_in_train_mode():
  """A ToNNX that is the model itself has no NNX parent whose eval() flag qjax could read: model.eval() must
  still stop act_static range statistics from updating, also under nnx.jit (which retraces on the mode)."""
  x = jax.random.normal(jax.random.key(1), (4, 8))
  model = nnx.bridge.ToNNX(LinenBody(), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(model, x)
  quantize_nnx(model, RULES, x)
  count = lambda: float(model.proj['dot_general0_lhs_count'][...])  # noqa: E731
  fwd = nnx.jit(lambda m, x: m(x))
  n0 = count()
  fwd(model, x)
  assert count() == n0 + 1  # training mode (the default): statistics update
  model.eval()
  assert 'use_running_average' not in vars(model)  # never handed to Linen as a variable
  y1, y2 = fwd(model, x), fwd(model, 2 * x)
  assert count() == n0 + 1  # frozen: the same ranges for every eval batch
  assert jnp.array_equal(fwd(model, x), y1) and not jnp.array_equal(y2, 2 * y1)
  model.train()
  fwd(model, x)
  assert count() == n0 + 2
