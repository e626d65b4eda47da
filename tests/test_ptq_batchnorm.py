"""BatchNorm folding (qjax.ptq.batchnorm): the folded arrays against hand-derived values, the identity BatchNorm
exact in float32, which pairs are found (and why others are not) on Linen and NNX models, the model's output kept
and a fold whose layer output is read elsewhere undone; in the runner (config.ptq.fold_batchnorm) on the ResNet
and an NNX model, and in the PTQ table's labels."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.models import ModelDef
from experiments.review import ptq_table
from experiments.training import runner as train
from experiments.training import trainers
from qjax.ptq import batchnorm as B


def test_fold_against_hand_derived_values():
  # s = gamma / sqrt(var + eps) = (2 / 2, 0.5 / 1) = (1, 0.5); shift = beta - mean * s = (0.5 - 1, 1 + 1)
  kernel = np.array([[1., 2.], [3., 4.]], np.float32)
  gamma, beta = np.array([2., .5], np.float32), np.array([.5, 1.], np.float32)
  mean, var = np.array([1., -2.], np.float32), np.array([3.75, .75], np.float32)
  f = B.fold(kernel, np.array([1., 2.], np.float32), gamma, beta, mean, var, 0.25)
  np.testing.assert_array_equal(f.kernel, [[1., 1.], [3., 2.]])
  np.testing.assert_array_equal(f.bias, [1., 1.])           # b * s; the shift stays in the BatchNorm
  np.testing.assert_array_equal(f.offset, [-.5, 2.])
  np.testing.assert_array_equal(f.scale, [1., 1.])
  np.testing.assert_array_equal(f.mean, [0., 0.])
  np.testing.assert_array_equal(f.var + np.float32(.25), [1., 1.])
  assert f.kernel.dtype == np.float32 and f.var.dtype == np.float32
  # A BatchNorm without a bias hands its shift to the layer's: b * s + shift
  g = B.fold(kernel, np.array([1., 2.], np.float32), gamma, None, mean, var, 0.25)
  np.testing.assert_array_equal(g.bias, [1. - 1., 1. + (0. + 1.)])
  assert g.offset is None
  # No scale: s = 1 / sqrt(var + eps)
  h = B.fold(kernel, None, None, beta, mean, var, 0.25)
  np.testing.assert_array_equal(h.kernel, [[.5, 2.], [1.5, 4.]])
  np.testing.assert_array_equal(h.offset, [.5 - .5, 1. + 2.])
  assert h.scale is None and h.bias is None
  with pytest.raises(ValueError, match='neither the layer nor the BatchNorm has a bias'):
    B.fold(kernel, None, gamma, None, mean, var, 0.25)
  with pytest.raises(ValueError, match=r'statistics of shape \(3,\) do not match'):
    B.fold(kernel, None, gamma, beta, np.zeros(3), np.ones(3), 0.25)


@pytest.mark.parametrize('dtype', [np.float32, np.float16])
@pytest.mark.parametrize('eps', [1e-5, 1e-3, 1e-6, 0.1, 3e-4, 1e-8, 0.0])
def test_identity_var_makes_var_plus_eps_exactly_one(dtype, eps):
  v = B.identity_var(eps, dtype)
  assert dtype(v + dtype(eps)) == 1 and v.dtype == dtype


@pytest.mark.parametrize('eps', [1e-5, 1e-3, 0.1])
def test_a_folded_batchnorm_adds_its_offset_and_nothing_else(eps):
  """With the folded statistics Flax's BatchNorm is y + beta', bit for bit (rsqrt(1) == 1 on this backend)."""
  bn = nn.BatchNorm(use_running_average=True, epsilon=eps)
  x = jax.random.normal(jax.random.key(0), (4, 5, 3)) * 100
  offset = np.array([.1, -2., 7.], np.float32)
  f = B.fold(np.ones((2, 3), np.float32), None, np.ones(3, np.float32), offset, np.full(3, 5., np.float32),
             np.full(3, 2., np.float32), eps)
  y = jax.jit(bn.apply)({'params': {'scale': f.scale, 'bias': f.offset},
                         'batch_stats': {'mean': f.mean, 'var': f.var}}, x)
  np.testing.assert_array_equal(y, x + f.offset)
  np.testing.assert_allclose(f.offset, offset - 5. / np.sqrt(2. + eps), rtol=1e-6)


class Zoo(nn.Module):
  """Foldable pairs (conv1 -> bn1, dense -> bn_d) and every reason a BatchNorm is not paired."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name, **kw: nn.BatchNorm(use_running_average=not train, name=name, **kw)
    y = nn.relu(bn('bn1')(nn.Conv(4, (3, 3), use_bias=False, name='conv1')(x)))     # (batch, h, w, 4)
    shared = nn.Conv(4, (1, 1), name='shared')
    a = bn('bn_twice_a')(shared(y))                                   # a layer called twice
    b = bn('bn_twice_b')(shared(a))
    z = nn.Conv(4, (1, 1), name='fan')(b)
    z = bn('bn_fan_a')(z) + bn('bn_fan_b')(z)                         # one output, two BatchNorms
    w = bn('bn_axis', axis=1)(nn.Conv(4, (1, 1), name='conv_axis')(z))  # over an axis that is not the last
    v = bn('bn_relu')(nn.relu(w))                                     # its input is no layer's output
    p = jnp.mean(v, axis=(1, 2))                                      # (batch, 4)
    return bn('bn_d')(nn.Dense(3, name='dense')(p))


def test_pairs_linen_finds_the_foldable_pairs_and_says_why_not():
  x = jnp.ones((2, 6, 6, 3))
  m = Zoo()
  v = m.init(jax.random.key(0), x)
  pairs, skipped = B.pairs_linen(m, v, x, train=False)
  assert [(p.layer, p.norm) for p in pairs] == [('conv1', 'bn1'), ('dense', 'bn_d')]
  assert all(p.epsilon == np.float32(1e-5) for p in pairs)
  assert skipped == {
      'bn_twice_a': 'shared is called 2 times', 'bn_twice_b': 'shared is called 2 times',
      'bn_fan_a': "fan's output also feeds bn_fan_b", 'bn_fan_b': "fan's output also feeds bn_fan_a",
      'bn_axis': 'it normalises axis 1, not the last',
      'bn_relu': 'its input is not the output of a Flax Dense or Conv layer'}
  pairs, skipped = B.pairs_linen(m, v, x, train=True)
  assert pairs == [] and skipped['bn1'] == 'it normalises with batch statistics in this call (only evaluation mode ' \
                                          'folds)'


def _random_stats(variables, key):
  """Variables whose BatchNorms hold random scales, offsets and running statistics (fresh ones are identities)."""
  def rand(path, a):
    name = path[-1].key
    k = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % 2 ** 31)
    u = jax.random.uniform(k, a.shape, minval=.2, maxval=3.)
    return {'scale': u, 'var': (3.2 - u) ** 2, 'mean': u - 1., 'bias': u * .5}.get(name, a) if a.ndim == 1 else a
  return jax.tree_util.tree_map_with_path(rand, variables)


class Residual(nn.Module):
  """conv_a's output feeds its BatchNorm and the residual sum as well: folding it would change the model."""

  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Conv(3, (3, 3), use_bias=False, name='conv_a')(x)
    z = nn.BatchNorm(use_running_average=not train, name='bn_a')(y) + y
    return nn.BatchNorm(use_running_average=not train, name='bn_b')(nn.Conv(3, (3, 3), name='conv_b')(z))


def test_fold_linen_keeps_the_output_and_undoes_a_fold_whose_output_is_read_elsewhere():
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  m = Residual()
  v = _random_stats(m.init(jax.random.key(0), x), jax.random.key(2))
  before = jax.tree.map(np.asarray, v)
  new, folding = B.fold_linen(m, v, x, train=False)
  assert folding.folded == {'bn_b': 'conv_b'}
  assert set(folding.skipped) == {'bn_a'}
  assert "conv_a's output is also read besides the BatchNorm" in folding.skipped['bn_a']
  assert folding.rel_error < 1e-5
  y0, y1 = m.apply(v, x), m.apply(new, x)
  np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, v), before)  # the input is not changed
  # the folded kernel and bias by the formula; the unfolded pair as it was
  pb, sb = v['params']['bn_b'], v['batch_stats']['bn_b']
  s = pb['scale'] / np.sqrt(sb['var'] + np.float32(1e-5))
  np.testing.assert_allclose(new['params']['conv_b']['kernel'], v['params']['conv_b']['kernel'] * s, rtol=1e-6)
  np.testing.assert_allclose(new['params']['conv_b']['bias'], v['params']['conv_b']['bias'] * s, rtol=1e-6)
  np.testing.assert_allclose(new['params']['bn_b']['bias'], pb['bias'] - sb['mean'] * s, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new['params']['conv_a']['kernel'], v['params']['conv_a']['kernel'])
  np.testing.assert_array_equal(new['batch_stats']['bn_a']['var'], v['batch_stats']['bn_a']['var'])


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.lin = nnx.Linear(4, 5, rngs=rngs)
    self.bn2 = nnx.BatchNorm(5, use_bias=False, rngs=rngs)   # its shift goes to the Linear's bias
    self.raw = nnx.Linear(5, 2, rngs=rngs)
    self.bn3 = nnx.BatchNorm(2, rngs=rngs)

  def __call__(self, x):
    y = jnp.mean(nnx.relu(self.bn(self.conv(x))), axis=(1, 2))   # (batch, 4)
    y = self.bn2(self.lin(y))
    r = self.raw(y)
    return self.bn3(r) - r                                         # raw's output is read besides bn3


def _nnx_random_stats(model, seed=3):
  for i, (_, m) in enumerate(nnx.iter_modules(model)):
    if isinstance(m, nnx.BatchNorm):
      u = jax.random.uniform(jax.random.key(seed + i), m.mean.get_value().shape, minval=.2, maxval=3.)
      m.mean.set_value(u - 1.)
      m.var.set_value((3.2 - u) ** 2)  # s = u / (3.2 - u): 0.07 to 15
      m.scale.set_value(u)
      if m.bias is not None:
        m.bias.set_value(u * .5)


def test_fold_nnx_in_place_keeps_the_output_and_restores_the_classes():
  model = NnxNet(nnx.Rngs(0))
  _nnx_random_stats(model)
  model.eval()
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  y0 = model(x)
  lin_b = np.asarray(model.lin.bias.get_value())
  folding = B.fold_nnx(model, x)
  assert folding.folded == {'bn': 'conv', 'bn2': 'lin'}
  assert "raw's output is also read besides the BatchNorm" in folding.skipped['bn3']
  np.testing.assert_allclose(model(x), y0, rtol=1e-4, atol=1e-5)
  assert type(model.conv) is nnx.Conv and type(model.bn) is nnx.BatchNorm and not hasattr(model.conv, '_qjax_call_path')
  assert not np.allclose(model.lin.bias.get_value(), lin_b)  # bn2 has no bias: its shift moved into lin's
  np.testing.assert_array_equal(model.bn.mean.get_value(), np.zeros(4))
  model.train()
  _, skipped = B.pairs_nnx(model, x)   # a copy runs: training mode's statistic updates are not kept
  assert skipped['bn'].startswith('it normalises with batch statistics')
  np.testing.assert_array_equal(model.bn.mean.get_value(), np.zeros(4))


def test_the_nnx_trainer_folds_a_float_runs_state():
  md = ModelDef('nnx_bn', 'nnx', 'classify', make=lambda rngs: NnxNet(rngs))
  tr = trainers.make(md, optax.sgd(0.1))
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  state = tr.init(jax.random.key(0), x)
  model, opt = state.merge()
  _nnx_random_stats(model)
  pure = tr.to_pure(state.replace((model, opt)))
  folded, info = tr.ptq_prepare(pure, x, fold=True)
  assert list(info) == ['batchnorm_folding'] and info['batchnorm_folding'].folded == {'bn': 'conv', 'bn2': 'lin'}
  fresh = tr.init(jax.random.key(5), x, folded)   # a PTQ run's model, loaded from the folded state
  m0, m1 = tr.module(tr.init(jax.random.key(5), x, pure)), tr.module(fresh)
  m0.eval()
  m1.eval()
  np.testing.assert_allclose(m1(x), m0(x), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(m1.bn.var.get_value() + np.float32(1e-5), np.ones(4))


def test_the_runner_folds_the_resnets_batchnorms_before_ptq(tmp_path):
  """All nine BatchNorms of the ResNet follow a conv and fold; per-channel weight scales absorb each s, so the
  served model's accuracy is the unfolded run's (the same integers up to float ties); per-tensor weights are
  rounded on the folded kernels' one grid."""
  base = ['--config=configs/fmnist_resnet.py:runlocal', '--config.mode=ptq', '--config.quant_summaries=False',
          f'--config.init_from={tmp_path / "float"}']
  assert train.main(['--config=configs/fmnist_resnet.py:runlocal', f'--workdir={tmp_path / "float"}']) == 0
  res = {}
  for name, extra in {'plain': [], 'folded': ['--config.ptq.fold_batchnorm=True'],
                      'gptq': ['--config.ptq.fold_batchnorm=True', '--config.ptq.method=gptq',
                               '--config.quant.weight.format=int4']}.items():
    assert train.main([*base, f'--workdir={tmp_path / name}', *extra]) == 0
    res[name] = json.load(open(tmp_path / name / 'result.json'))
  f = res['folded']['train']['batchnorm_folding']
  assert len(f['folded']) == 9 and f['skipped'] == {} and f['rel_error'] < 1e-5
  assert f['folded']['stage1_block0/bn_proj'] == 'stage1_block0/proj' and f['folded']['bn_stem'] == 'stem'
  assert 'batchnorm_folding' not in res['plain']['train']
  acc = {k: r['serving_metrics']['eval/accuracy'] for k, r in res.items()}
  assert abs(acc['folded'] - acc['plain']) <= 0.01, acc
  g = res['gptq']['train']
  assert len(g['batchnorm_folding']['folded']) == 9 and len(g['ptq']['layers']) == 8
  assert res['gptq']['metrics'] == res['gptq']['serving_metrics']


def test_the_ptq_table_labels_folded_and_per_tensor_trials(tmp_path):
  def trial(name, fold, granularity, equalize=False):
    (tmp_path / name).mkdir()
    quant = {'weight': {'format': 'int4', 'granularity': granularity, 'group_size': 0}, 'act': {'format': ''}}
    ptq = {'method': 'rtn', 'fold_batchnorm': fold, 'equalize': equalize}
    json.dump({'mode': 'ptq', 'metrics': {'eval/accuracy': .5}, 'serving_bytes': 1,
               'config': {'quant': quant, 'ptq': ptq, 'seed': 0}}, open(tmp_path / name / 'result.json', 'w'))
  trial('a', False, 'per_channel')
  trial('b', True, 'per_tensor')
  trial('c', True, 'per_tensor', True)
  _, rows = ptq_table.rows(str(tmp_path))
  assert [r[:2] for r in rows] == [('rtn', 'W4'), ('rtn, BatchNorm folded', 'W4 per-tensor'),
                                   ('rtn, BatchNorm folded, equalized', 'W4 per-tensor')]


class Bf16(nn.Module):
  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    y = nn.BatchNorm(use_running_average=True, name='bn1', **kw)(nn.Conv(8, (3, 3), name='conv1', **kw)(x))
    y = nn.Conv(8, (3, 3), name='conv2', **kw)(nn.relu(y))
    return nn.BatchNorm(use_running_average=True, name='bn2', **kw)(y) + 0.5 * y   # conv2's output read twice


def test_16_bit_models_fold_within_their_rounding_and_a_second_reader_is_still_caught():
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.bfloat16)
  m = Bf16()
  v = _random_stats(m.init(jax.random.key(0), x), jax.random.key(2))
  _, folding = B.fold_linen(m, v, x)
  assert folding.folded == {'bn1': 'conv1'} and 1e-4 < folding.rel_error < 3e-2
  assert "conv2's output is also read besides the BatchNorm" in folding.skipped['bn2']
  _, strict = B.fold_linen(m, v, x, tol=1e-4)   # float32's tolerance: bf16 rounding alone exceeds it
  assert strict.folded == {}
