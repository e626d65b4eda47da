"""Cross-layer equalization (qjax.ptq.equalization): the scales against hand-derived values, the pairs found and
the reasons for the others on Linen and NNX models, the model's output kept, a chain brought to its fixed point;
in the runner (config.ptq.equalize) on LeNet-5 with per-tensor weights, and after folding on the ResNet."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.training import runner as train
from qjax.ptq import batchnorm as B
from qjax.ptq import equalization as E


def test_scales_balance_each_channels_ranges_against_hand_derived_values():
  w_a = np.array([[1., -4., 0.], [.5, 2., 0.]])       # output ranges r_a = (1, 4, 0)
  w_b = np.array([[4., 1.], [-1., .25], [3., 1.]])    # input ranges r_b = (4, 1, 3)
  s = E.scales(w_a, w_b)
  np.testing.assert_array_equal(s, [.5, 2., 1.])       # sqrt(r_a / r_b); a dead channel keeps 1
  np.testing.assert_array_equal(w_a / s, [[2., -2., 0.], [1., 1., 0.]])
  np.testing.assert_array_equal(w_b * s[:, None], [[2., .5], [-2., .5], [3., 1.]])   # both ranges sqrt(r_a r_b) = 2
  assert E.precision(w_a) == (1 + 4 + 0) / 3 / 4 and E.precision(w_a / s) == (2 + 2 + 0) / 3 / 2
  conv_b = np.zeros((3, 3, 3, 2))                      # HWIO: input channels on axis -2
  conv_b[1, 2, :, 0] = [4., -1., 3.]
  np.testing.assert_array_equal(E.scales(w_a, conv_b), [.5, 2., 1.])


def _random_bn(variables, key):
  def rand(path, a):
    name = path[-1].key
    u = jax.random.uniform(jax.random.fold_in(key, len(jax.tree_util.keystr(path))), a.shape, minval=.2, maxval=3.)
    return {'scale': u, 'var': (3.2 - u) ** 2, 'mean': u - 1., 'bias': u * .5}.get(name, a) if a.ndim == 1 else a
  return jax.tree_util.tree_map_with_path(rand, variables)


class Zoo(nn.Module):
  @nn.compact
  def __call__(self, x):
    bn = lambda n: nn.BatchNorm(use_running_average=True, name=n)
    y = nn.relu(bn('bn1')(nn.Conv(8, (3, 3), use_bias=False, name='c1')(x)))          # (batch, 8, 8, 8)
    y = nn.max_pool(y, (2, 2), (2, 2))                                                  # homogeneous: kept
    y = nn.relu(bn('bn2')(nn.Conv(8, (3, 3), use_bias=False, name='c2')(y)))
    y = y + nn.relu(bn('bn3')(nn.Conv(8, (3, 3), use_bias=False, name='c3')(y)))      # c2's output read twice
    y = jnp.mean(y, axis=(1, 2))                                                        # (batch, 8)
    y = nn.sigmoid(nn.Dense(16, name='d1')(y))                                          # not homogeneous
    y = nn.relu(nn.Dense(16, name='d2')(y))
    y = nn.Dense(6, name='d3')(y)
    return nn.Dense(3, name='d4')(y)


def test_equalize_linen_keeps_the_output_and_says_why_not():
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  m = Zoo()
  v = _random_bn(m.init(jax.random.key(0), x), jax.random.key(2))
  _, e = E.equalize_linen(m, v, x)
  assert e.equalized == ['d2 -> d3', 'd3 -> d4']
  assert e.skipped['c1 -> c2'] == "a BatchNorm normalises c1's output (bn1): fold it first"
  folded, f = B.fold_linen(m, v, x)
  assert len(f.folded) == 3
  new, e = E.equalize_linen(m, folded, x)
  assert e.equalized == ['c1 -> c2', 'd2 -> d3', 'd3 -> d4']
  for link in ('c2 -> c3', 'c3 -> d1', 'd1 -> d2'):
    assert e.skipped[link].startswith("equalizing it changed the model's output"), link
  assert e.rel_error < 1e-5
  np.testing.assert_allclose(m.apply(new, x), m.apply(v, x), rtol=1e-4, atol=1e-5)
  p = new['params']
  for a, b in (('c1', 'c2'), ('d2', 'd3'), ('d3', 'd4')):   # every kept link at its fixed point
    np.testing.assert_allclose(E.scales(np.asarray(p[a]['kernel']), np.asarray(p[b]['kernel'])), 1., rtol=1e-5)
  assert set(e.precision) == {'c1', 'c2', 'd2', 'd3', 'd4'}
  assert e.precision['c1'][0] == E.precision(folded['params']['c1']['kernel'])
  assert e.precision['c1'][1] == E.precision(p['c1']['kernel']) and e.precision['c1'][1] > e.precision['c1'][0]
  # the folded BatchNorm's shift follows c1's output: divided by the same scales as c1's kernel
  s = np.max(np.abs(folded['params']['c1']['kernel']), axis=(0, 1, 2)) / np.max(np.abs(p['c1']['kernel']),
                                                                                  axis=(0, 1, 2))
  np.testing.assert_allclose(p['bn1']['bias'], folded['params']['bn1']['bias'] / s, rtol=1e-5)
  np.testing.assert_array_equal(p['c3']['kernel'], folded['params']['c3']['kernel'])   # skipped: untouched


class Flat(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.max_pool(nn.relu(nn.Conv(4, (3, 3), name='conv')(x)), (2, 2), (2, 2))    # (batch, 3, 3, 4)
    y = y.reshape(y.shape[0], -1)                                                     # (batch, 36): channels fastest
    return nn.Dense(5, name='dense')(y)


def test_a_conv_map_flattened_into_a_dense_is_equalized_per_channel_over_its_rows():
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  m = Flat()
  v = m.init(jax.random.key(0), x)
  v['params']['conv']['kernel'] = v['params']['conv']['kernel'] * jnp.array([.1, 1., 10., 3.])   # uneven channels
  new, e = E.equalize_linen(m, v, x)
  assert e.equalized == ['conv -> dense'] and e.skipped == {}
  np.testing.assert_allclose(m.apply(new, x), m.apply(v, x), rtol=1e-4, atol=1e-5)
  w_a, w_b = np.asarray(new['params']['conv']['kernel']), np.asarray(new['params']['dense']['kernel'])
  r_a = np.max(np.abs(w_a), axis=(0, 1, 2))
  r_b = np.max(np.abs(w_b.reshape(9, 4, 5)), axis=(0, 2))    # row i reads channel i mod 4
  np.testing.assert_allclose(r_a, r_b, rtol=1e-5)
  s = np.max(np.abs(np.asarray(v['params']['conv']['kernel'])), axis=(0, 1, 2)) / r_a
  np.testing.assert_allclose(w_b, np.asarray(v['params']['dense']['kernel']) * np.tile(s, 9)[:, None], rtol=1e-5)


class Chain(nnx.Module):
  def __init__(self, rngs):
    self.l1, self.l2, self.l3 = (nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs),
                                 nnx.Linear(5, 3, rngs=rngs))

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def test_equalize_nnx_brings_a_chain_to_its_fixed_point_in_place():
  model = Chain(nnx.Rngs(0))
  for i, lin in enumerate((model.l1, model.l2, model.l3)):   # uneven channel ranges
    k = lin.kernel.get_value()
    lin.kernel.set_value(k * jnp.exp(jax.random.normal(jax.random.key(i), (1, k.shape[1]))))
  x = jax.random.normal(jax.random.key(9), (16, 4))
  y0 = model(x)
  e = E.equalize_nnx(model, x)
  assert e.equalized == ['l1 -> l2', 'l2 -> l3'] and e.skipped == {}
  np.testing.assert_allclose(model(x), y0, rtol=1e-4, atol=1e-5)
  k = [np.asarray(lin.kernel.get_value()) for lin in (model.l1, model.l2, model.l3)]
  np.testing.assert_allclose(E.scales(k[0], k[1]), 1., rtol=1e-5)   # both links balanced at once
  np.testing.assert_allclose(E.scales(k[1], k[2]), 1., rtol=1e-5)


def test_the_runner_equalizes_lenet5_and_the_folded_resnet(tmp_path, capsys):
  """LeNet-5 (then GPTQ on per-tensor grids): conv1 -> conv2 (ReLU and max pooling between), conv2 -> fc1 (fc1
  reads conv2's pooled map flattened: 400 rows of 16 channels), fc1 -> fc2 -> head. The ResNet after folding: the
  conv pair inside each block (a residual reads the others)."""
  common = ['--config.mode=ptq', '--config.quant_summaries=False', '--config.quant.weight.granularity=per_tensor',
            '--config.ptq.equalize=True']
  assert train.main(['--config=configs/fmnist_cnn.py:runlocal', *common, '--config.ptq.method=gptq',
                     '--config.ptq.fold_batchnorm=True', f'--workdir={tmp_path / "lenet"}']) == 0   # per-tensor GPTQ
  assert 'batchnorm folding: the model has no BatchNorm' in capsys.readouterr().out
  r = json.load(open(tmp_path / 'lenet' / 'result.json'))
  assert r['train']['batchnorm_folding'] == {'folded': {}, 'skipped': {}, 'rel_error': 0.0}
  assert len(r['train']['ptq']['layers']) == 5
  e = r['train']['equalization']
  assert e['equalized'] == ['conv1 -> conv2', 'conv2 -> fc1', 'fc1 -> fc2', 'fc2 -> head'] and e['skipped'] == {}
  assert r['metrics']['eval/accuracy'] == r['serving_metrics']['eval/accuracy']   # the integer model evaluated
  assert abs(r['metrics']['eval/loss'] - r['serving_metrics']['eval/loss']) < 1e-5 * r['metrics']['eval/loss']
  assert train.main(['--config=configs/fmnist_resnet.py:runlocal', *common, '--config.ptq.fold_batchnorm=True',
                     f'--workdir={tmp_path / "resnet"}']) == 0
  r = json.load(open(tmp_path / 'resnet' / 'result.json'))
  e = r['train']['equalization']
  assert e['equalized'] == [f'stage{i}_block0/conv1 -> stage{i}_block0/conv2' for i in range(3)]
  assert len(r['train']['batchnorm_folding']['folded']) == 9 and e['rel_error'] < 1e-5
