"""PTQ methods through the experiment runner (config.ptq): one runlocal PTQ run per method and a composed list on
the NNX MLP, two on the Linen LeNet, each through `experiments.train.main` (the `python -m experiments.train`
entry point; one as a real subprocess); config errors; the online input op exact in float on Linen and NNX. (That
im2col rows times the flattened kernel are the conv: tests/test_flax_capture.py, conv patches.)"""

import importlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.config import cli as config_cli
from experiments.config import ptq as ptq_config
from experiments.training import runner as train
from qjax.ptq import online, rotation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = ['--config=configs/fmnist_mlp.py:runlocal', '--config.mode=ptq', '--config.model.hidden=(64,)',
       '--config.quant.weight.format=int4', '--config.quant_summaries=False']


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('ptq')  # runs share one float model (<root>/_pretrained)


def run(root, name, method, extra=()):
  work = root / name
  assert train.main([*MLP, f'--workdir={work}', f'--config.ptq.method={method}', *extra]) == 0
  return json.load(open(work / 'result.json'))


@pytest.fixture(scope='module')
def rtn(root):
  return run(root, 'rtn', 'rtn')


@pytest.mark.parametrize('method,extra', [
    # AWQ with int8 and int4 activations: the activation ranges were measured on the model before AWQ scaled its
    # layers' inputs, and served so (accuracy 0.62 and 0.10 against RTN's 0.68; now 0.70 and 0.66).
    ('gptq', ()), ('awq', ()), ('awq', ('--config.quant.act.format=int4',)), ('smoothquant', ()), ('rotation', ()),
    ('adaround', ('--config.ptq.adaround.iters=200',)), ('bias_correction', ()),
    ('rotation,smoothquant,gptq,bias_correction', ())])
def test_each_method_runs_in_the_runner(root, rtn, method, extra):
  r = run(root, method.replace(',', '+') + ''.join(extra).replace('--config.quant.act.format=', '_a'), method, extra)
  info = r['train']['ptq']
  assert [m[0] for m in info['methods']] == method.split(',')
  assert set(info['layers']) == {'hidden/0', 'head'} and info['skipped'] == []
  assert r['metrics'] == r['serving_metrics']  # the integer model is what is evaluated
  assert r['serving_bytes'] == rtn['serving_bytes']  # same int4 kernels, packed the same way
  assert r['metrics']['eval/accuracy'] > rtn['metrics']['eval/accuracy'] - 0.1
  if method in ('gptq', 'awq'):  # never worse than round-to-nearest on the calibration rows
    for m in info['layers'].values():
      assert m['rel_output_mse'] <= m['rtn_rel_output_mse'] * (1 + 1e-4)
  if method in ('smoothquant', 'rotation', 'rotation,smoothquant,gptq,bias_correction'):
    assert info['online_ops'] == ['head', 'hidden/0']
  for m in info['layers'].values():  # per-tensor activations add error, on ranges of the model as served
    assert 0 < m['act_rel_output_mse'] < (0.02 if extra else 0.01)  # AWQ's head: 0.096 and 1.0 on stale ranges


def test_sequential_calibrates_each_layer_on_the_quantized_predecessors(root, monkeypatch):
  """config.ptq.sequential: the head's statistics are captured on the model whose hidden layer already holds
  GPTQ's int4 kernel (at most 16 distinct values per output column), not the float one; layers in call order."""
  ptq = importlib.import_module('experiments.training.ptq')
  seen, real = [], ptq.gather_stats

  def spy(run_, state, max_sample=512):
    seen.append({p: np.asarray(w) for p, (w, _) in run_.trainer.kernels(state).items()})
    return real(run_, state, max_sample)
  monkeypatch.setattr(ptq, 'gather_stats', spy)
  r = run(root, 'gptq_sequential', 'gptq', ('--config.ptq.sequential=True',))
  info = r['train']['ptq']
  assert info['sequential'] is True and set(info['layers']) == {'hidden/0', 'head'}
  assert len(seen) == 2  # the first pass (float model), then one for the head
  levels = lambda w: max(len(np.unique(w[:, j])) for j in range(w.shape[1]))
  assert levels(seen[0]['hidden/0']) > 16 and levels(seen[1]['hidden/0']) <= 16
  np.testing.assert_array_equal(seen[1]['head'], seen[0]['head'])
  assert r['metrics'] == r['serving_metrics']


def test_sequential_layers_carry_the_float_models_mean_output(root, monkeypatch):
  """Sequential runs hand each layer the float model's mean output (empirical bias correction's target): for the
  first layer it is its own statistics' (its inputs are the float model's), for the head it is not."""
  ptq = importlib.import_module('experiments.training.ptq')
  starts, real = {}, ptq.qjax.ptq.run

  def spy(lay, methods):
    if methods != ['rtn']:
      starts[len(starts)] = lay
    return real(lay, methods)
  monkeypatch.setattr(ptq.qjax.ptq, 'run', spy)
  r = run(root, 'gptq_bc_sequential', 'gptq,bias_correction',
          ('--config.ptq.sequential=True', '--config.ptq.bias_correction.empirical=True'))
  assert r['train']['ptq']['methods'][1] == ['bias_correction', {'empirical': True}]
  first, head = starts[0], starts[1]
  np.testing.assert_allclose(first.float_out_mean, first.stats.mean @ first.w + first.bias, rtol=1e-6)
  assert np.abs(head.float_out_mean - (head.stats.mean @ head.w + head.bias)).max() > 1e-4
  assert r['metrics'] == r['serving_metrics']


def test_rtn_is_the_default_conversion(rtn):
  assert 'ptq' not in rtn['train'] and rtn['config']['ptq']['method'] == 'rtn'


@pytest.mark.parametrize('method', ['smoothquant,gptq', 'rotation,awq', 'adaround,bias_correction'])
def test_linen_lenet(root, method):
  work = root / f'lenet-{method}'
  assert train.main(['--config=configs/fmnist_cnn.py:runlocal', '--config.mode=ptq', f'--workdir={work}',
                     f'--config.ptq.method={method}', f'--config.quant_summaries={method == "rotation,awq"}',
                     '--config.ptq.adaround.iters=200']) == 0
  r = json.load(open(work / 'result.json'))
  info = r['train']['ptq']
  assert set(info['layers']) == {'conv1', 'conv2', 'fc1', 'fc2', 'head'} and info['skipped'] == []
  # SmoothQuant and AWQ scale a conv's input channels (an online op on its NHWC input); a rotation skips convs.
  assert info['online_ops'] == ([] if method == 'adaround,bias_correction' else ['conv1', 'conv2', 'fc1', 'fc2',
                                                                               'head'])
  assert info['input_op_methods_left_out'] == (['conv1', 'conv2'] if method == 'rotation,awq' else [])
  for name in ('conv1', 'conv2') if method == 'rotation,awq' else ():  # AWQ alone there: never above RTN
    m = info['layers'][name]
    assert m['rel_output_mse'] <= m['rtn_rel_output_mse'] * (1 + 1e-4)
  assert r['metrics'] == r['serving_metrics']  # the served integer model (online scales included) is evaluated
  assert r['metrics']['eval/accuracy'] > 0.3
  # the layer as served (calibrated activation grid after the online op), convs over their im2col rows too
  assert all(0 < m['act_rel_output_mse'] < 1 for m in info['layers'].values()), info['layers']
  if method == 'rotation,awq':  # the rotated dense inputs are signed; conv2's ReLU input keeps its unsigned grid
    grids = {row['path']: row['grid'] for row in r['layers'] if row['operand'] == 'act'}
    assert grids == {'conv1': 'signed', 'conv2': 'unsigned', 'fc1': 'signed', 'fc2': 'signed', 'head': 'signed'}


def test_cli_subprocess(root):
  p = subprocess.run([sys.executable, '-m', 'experiments.train', *MLP, f'--workdir={root / "cli"}',
                      '--config.ptq.method=gptq', '--config.ptq.gptq.act_order=True'], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'ptq gptq: 2 layers' in p.stdout


@pytest.mark.parametrize('method, key, value, message', [
    ('rotation', 'kind', 'hadamardd', r"config\.ptq\.rotation\.kind='hadamardd' is not one of .*mean 'hadamard'"),
    ('gptq', 'block_size', 0, r'config\.ptq\.gptq\.block_size must be >= 1, got 0'),
    ('awq', 'n_grid', 0, r'config\.ptq\.awq\.n_grid must be >= 1, got 0'),
    ('smoothquant', 'alpha', 1.5, r'config\.ptq\.smoothquant\.alpha must be in \[0\.0, 1\.0\], got 1\.5'),
    ('adaround', 'beta_range', (2.0, 20.0), r'config\.ptq\.adaround\.beta_range must be \(start, end\)'),
    ('bias_correction,gptq', None, None, r"config\.ptq\.method='bias_correction,gptq': bias_correction must come "
                                         'after gptq'),
])
def test_a_ptq_parameter_value_is_refused_before_anything_runs(method, key, value, message):
  """Parameter values were checked only by the method itself, after the float model had trained: a traceback
  (for gptq.block_size=0 a ZeroDivisionError). validate() now refuses them, naming the key; and an order that
  does not compose (bias correction before a rounding method was accepted and served a worse bias)."""
  c = config_cli.load_file(os.path.join(ROOT, 'configs/fmnist_mlp.py:runlocal'))
  c.mode, c.ptq.method = 'ptq', method
  if key is not None:
    c.ptq[method][key] = value
  with pytest.raises(config_cli.ConfigError, match=message):
    train.validate(c)


def test_config_errors_name_the_nearest_method():
  c = config_cli.load_file(os.path.join(ROOT, 'configs/fmnist_mlp.py:runlocal'))
  c.mode = 'ptq'
  c.ptq.method = 'smoothquant,gtpq'
  with pytest.raises(config_cli.ConfigError, match="'gtpq' is not one of .*did you mean 'gptq'"):
    train.validate(c)
  c.ptq.method = 'gptq'
  c.ptq.gptq.damp = 0.1
  train.validate(c)
  assert ptq_config.unused(c, ['ptq.method']) is None
  c.mode = 'qat'
  assert "config.ptq.method has no effect: config.mode='qat'" in ptq_config.unused(c, ['seed', 'ptq.method'])
  c.mode, c.ptq.method, c.ptq.sequential = 'ptq', 'rtn', True  # would be silently ignored: refused
  with pytest.raises(config_cli.ConfigError, match="sequential=True has no effect with config.ptq.method='rtn'"):
    train.validate(c)
  c.ptq.method = 'gptq'
  train.validate(c)
  c.ptq.method, c.ptq.bias_correction.empirical, c.ptq.sequential = 'gptq,bias_correction', True, False
  with pytest.raises(config_cli.ConfigError, match='empirical=True has no effect without config.ptq.sequential'):
    train.validate(c)
  c.ptq.sequential = True
  train.validate(c)


# ------------------------------------------------------------------------------ the online op, exact in float


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name='out')(nn.relu(nn.Dense(16, name='fc')(x)))


def test_linen_rotation_through_the_online_op_is_exact():
  x = jax.random.normal(jax.random.key(0), (5, 32))
  v = Net().init(jax.random.key(1), x)
  r = rotation.rotate(np.asarray(v['params']['fc']['kernel']), 'random_hadamard', seed=3)
  v2 = jax.tree.map(lambda a: a, v)
  wrapped = online.OnlineOps(Net(), {'fc': (r.rotation, np.linspace(0.5, 2.0, 32))})
  v2['params']['fc']['kernel'] = jnp.asarray(r.w * np.linspace(0.5, 2.0, 32)[:, None], jnp.float32)
  np.testing.assert_allclose(wrapped.apply(v2, x), Net().apply(v, x), rtol=1e-5, atol=1e-5)


def test_nnx_rotation_through_the_online_op_is_exact():
  model = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
  x = jax.random.normal(jax.random.key(0), (5, 32))
  want = model(x)
  r = rotation.rotate(np.asarray(model.layers[0].kernel.get_value()), 'random', seed=4)
  model.layers[0].kernel.set_value(jnp.asarray(r.w, jnp.float32))
  online.install_nnx(model, {'layers/0': (r.rotation, None)})
  np.testing.assert_allclose(model(x), want, rtol=1e-5, atol=1e-5)
  graphdef, state = nnx.split(model)  # survives split / merge (jit, checkpoints)
  np.testing.assert_allclose(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x), want, rtol=1e-5, atol=1e-5)


AUTO = [{'module_path': '.*', 'weight': {'format': 'int8', 'granularity': 'per_channel'},
         'act': {'format': 'int8', 'granularity': 'per_tensor'}, 'act_signedness': 'auto'}]


def test_a_reprobe_after_an_online_rotation_gives_the_rotated_input_a_signed_grid_linen_and_nnx():
  """The ReLU output feeding `out` is non-negative (an unsigned grid); rotated by an online op it is signed, which
  only a probe run after the op is installed sees. The input of `fc` (a signed image) stays signed throughout."""
  import qjax.flax as qflax
  x = jax.random.normal(jax.random.key(0), (8, 32))
  key_out, key_fc = ('out', 'dot_general', 0, 'lhs'), ('fc', 'dot_general', 0, 'lhs')
  q = qflax.quantize_linen(Net(), AUTO)
  v = q.init(jax.random.key(1), x)
  assert q.rules.act_min[key_out] >= 0 > q.rules.act_min[key_fc]
  rot = rotation.rotate(np.asarray(v['params']['out']['kernel']), 'random_hadamard', seed=0)
  q2 = qflax.QuantizedLinen(online.OnlineOps(Net(), {'out': (rot.rotation, None)}), q.rules)
  q2.apply(v, x)  # no probe: the minima are the old ones
  assert q.rules.act_min[key_out] >= 0
  q2.reprobe('apply', v, x)
  assert q.rules.act_min[key_out] < 0 > q.rules.act_min[key_fc]

  model = nnx.Sequential(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 8, rngs=nnx.Rngs(1)))
  qn = qflax.quantize_nnx(model, [{**AUTO[0]}], x)
  k2 = ('layers/2', 'dot_general', 0, 'lhs')
  assert qn.rules.act_min[k2] >= 0
  rot = rotation.rotate(np.asarray(model.layers[2].kernel.get_value()), 'random_hadamard', seed=0)
  model.layers[2].kernel.set_value(jnp.asarray(rot.w, jnp.float32))
  online.install_nnx(model, {'layers/2': (rot.rotation, None)})
  qflax.reprobe_nnx(model, x)
  assert qn.rules.act_min[k2] < 0
  with pytest.raises(ValueError, match='needs a model quantize_nnx quantized'):
    qflax.reprobe_nnx(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), x[:, :4])


class BiasFree(nn.Module):
  bias: bool = False

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name='out')(nn.relu(nn.Dense(16, use_bias=self.bias, name='fc')(x)))


def test_online_output_shift_is_a_bias_linen_and_nnx():
  """The output shift of a bias-free layer computes what the same layer with that bias computes."""
  x = jax.random.normal(jax.random.key(0), (5, 32))
  shift = np.linspace(-1.0, 1.0, 16)
  v = BiasFree(bias=True).init(jax.random.key(1), x)
  v['params']['fc']['bias'] = jnp.asarray(shift, jnp.float32)
  free = {'params': {**v['params'], 'fc': {'kernel': v['params']['fc']['kernel']}}}
  shifted = online.OnlineOps(BiasFree(), {'fc': online.Online(shift=shift)})
  np.testing.assert_allclose(shifted.apply(free, x), BiasFree(bias=True).apply(v, x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(BiasFree().apply(free, x), BiasFree(bias=True).apply(v, x), atol=1e-3)

  with_bias = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
  with_bias.bias.set_value(jnp.asarray(shift, jnp.float32))
  model = nnx.Sequential(nnx.Linear(32, 16, use_bias=False, rngs=nnx.Rngs(0)), nnx.relu)
  online.install_nnx(model, {'layers/0': online.Online(shift=shift)})
  np.testing.assert_allclose(model(x), nnx.relu(with_bias(x)), rtol=1e-6, atol=1e-6)


def test_the_layer_error_with_activations_quantizes_the_transformed_input_on_its_grid():
  """_rel_error with the activation grid against numpy: the online scale, then a per-tensor int4 grid of step
  0.25 (power of two, so the grid is exact in float32), then the dequantized kernel; exactly the weights' error
  where x is on the grid."""
  from experiments.training import ptq as ptq_runner  # noqa: PLC0415
  from qjax.ptq import layer as L  # noqa: PLC0415
  from qjax.spec import QuantSpec  # noqa: PLC0415
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 3))
  b = rng.normal(size=3)
  spec = QuantSpec(format='int4', granularity='per_channel', axis=1)
  lay = qjax_run(L.Layer(w, spec, None, bias=b))
  act = QuantSpec(format='int4', calibration='absmax')
  params = {'scale': np.float32(0.25)}
  on_grid = rng.integers(-8, 8, size=(40, 6)) * 0.25  # already on the activation grid
  assert ptq_runner._rel_error(lay, on_grid, w, b, act=(act, params)) == pytest.approx(
      ptq_runner._rel_error(lay, on_grid, w, b), rel=1e-9)
  x = rng.normal(size=(40, 6)) * 1.5
  scaled = lay.replace(scale=np.array([1.0, 2.0, 0.5, 1.0, 4.0, 1.0]))
  x_q = np.clip(np.round(scaled.transform_input(x) / 0.25), -8, 7) * 0.25
  q = np.asarray(qjax_deq(scaled.q), np.float64)
  y = x @ w + b
  want = np.sum((y - (x_q @ q + b)) ** 2) / np.sum(y ** 2)
  assert ptq_runner._rel_error(scaled, x, w, b, act=(act, params)) == pytest.approx(want, rel=1e-9)


def qjax_run(lay):
  import qjax.ptq  # noqa: PLC0415
  return qjax.ptq.run(lay, ['rtn'])


def qjax_deq(q):
  import qjax.quantizers  # noqa: PLC0415
  return qjax.quantizers.dequantize(q)


def test_a_new_bias_is_an_output_shift_only_on_flax_layers():
  from experiments.training import ptq as ptq_runner  # noqa: PLC0415
  from qjax.flax.capture import OpSite  # noqa: PLC0415
  from qjax.ptq import layer as L  # noqa: PLC0415
  site = lambda t: OpSite('c', 'conv', 'conv0', 'c/kernel', 'rhs', (3, 3, 2, 4), (0, 1, 2), 18, module_type=t)
  lay = L.Layer(np.zeros((18, 4)), None, None, bias=np.arange(4.0))
  same, own, shift = ptq_runner._bias_or_shift(lay, None, site('flax.linen.linear.Conv'), (4,))
  assert same is lay and own is None and shift.tolist() == [0, 1, 2, 3]
  dropped, own, shift = ptq_runner._bias_or_shift(lay, None, site('models.MyConvRelu'), (4,))
  assert dropped.bias is None and own is None and shift is None
  assert "models.MyConvRelu is not a Flax layer" in dict(dropped.notes)['output_shift']
  kept, own, shift = ptq_runner._bias_or_shift(lay, np.zeros(4), site('models.MyConvRelu'), (4,))
  assert own.tolist() == [0, 1, 2, 3] and shift is None  # a module with its own bias keeps it there


def test_bias_correction_on_a_resnet_corrects_its_bias_free_convs(tmp_path):
  """The ResNet's block convs have no bias (BatchNorm follows): bias correction serves each correction as the
  conv's output shift, and the served model is what is evaluated."""
  work = tmp_path / 'resnet-bc'
  assert train.main(['--config=configs/fmnist_resnet.py:runlocal', '--config.mode=ptq', f'--workdir={work}',
                     '--config.ptq.method=gptq,bias_correction', '--config.quant_summaries=False',
                     '--config.quant.weight.format=int3']) == 0
  r = json.load(open(work / 'result.json'))
  info = r['train']['ptq']
  convs = sorted(info['layers'])
  assert len(convs) == 8 and all('/conv' in p or '/proj' in p for p in convs)
  assert info['online_ops'] == convs  # one output shift each
  for p in convs:
    assert info['layers'][p]['notes']['bias_correction'] == 'the op had no bias: the correction is a new one'
  assert r['metrics'] == r['serving_metrics']


def test_ptq_table_from_result_files(tmp_path):
  from experiments.review import ptq_table  # noqa: PLC0415

  def write(name, mode, fmt, acc, nbytes, info=None, seed=0, root=tmp_path):
    os.makedirs(root / name)
    quant = {'weight': {'format': fmt, 'granularity': 'per_channel', 'group_size': 0}, 'act': {'format': ''}}
    r = {'mode': mode, 'config': {'quant': quant, 'ptq': {'method': 'rtn'}, 'seed': seed},
         'metrics': {'eval/accuracy': acc}, 'serving_bytes': nbytes, 'train': {} if info is None else {'ptq': info}}
    json.dump(r, open(root / name / 'result.json', 'w'))
  write('float', 'float', 'int8', 0.91, 1000)
  open(tmp_path / 'report.md', 'w').write('not a run')
  write('rtn4', 'ptq', 'int4', 0.90, 300)
  write('rtn2', 'ptq', 'int2', 0.50, 200)
  write('g4', 'ptq', 'int4', 0.905, 300, {'methods': [['gptq', {'act_order': True}]], 'wall_time_sec': 1.25})
  write('g4s', 'ptq', 'int4', 0.907, 300, {'methods': [['gptq', {}]], 'wall_time_sec': 2.0, 'sequential': True})
  write('bc4', 'ptq', 'int4', 0.904, 300, {'methods': [['gptq', {}], ['bias_correction', {'empirical': True}]],
                                          'wall_time_sec': 3.0, 'sequential': True})
  t = ptq_table.table(str(tmp_path))
  assert '| gptq, sequential | 0.9070 / 300 / 2.0 | — |' in t
  assert '| gptq+bias_correction (empirical), sequential | 0.9040 / 300 / 3.0 | — |' in t
  # Seeds: mean ± std (sample std) per cell and of the float reference; mean method seconds.
  seeds = tmp_path / 'seeds'
  for seed, (f, a, s) in enumerate([(0.90, 0.80, 1.0), (0.92, 0.84, 3.0)]):
    write(f'float_{seed}', 'float', 'int8', f, 1000, seed=seed, root=seeds)
    write(f'g3_{seed}', 'ptq', 'int3', a, 250, {'methods': [['gptq', {}]], 'wall_time_sec': s}, seed=seed,
          root=seeds)
  t2 = ptq_table.table(str(seeds))
  assert 'float eval/accuracy: 0.9100 ± 0.0141 (1,000 bytes); 2 seeds, mean ± std' in t2
  assert '| gptq | 0.8200 ± 0.0283 / 250 / 2.0 |' in t2
  assert 'float eval/accuracy: 0.9100 (1,000 bytes)' in t
  assert '| rtn | 0.9000 / 300 / 0.0 | 0.5000 / 200 / 0.0 |' in t
  assert '| gptq (act-order) | 0.9050 / 300 / 1.2 | — |' in t
  assert t.index('| rtn |') < t.index('| gptq')


def test_ptq_table_leaves_out_qat_trials_and_its_command_line_errors_are_one_line(tmp_path, capsys):
  """A QAT trial (no train.ptq) used to be a second 'rtn' seed beside the PTQ run; a missing root, a traceback."""
  from experiments.review import ptq_table  # noqa: PLC0415

  quant = {'weight': {'format': 'int4', 'granularity': 'per_channel', 'group_size': 0}, 'act': {'format': ''}}
  for name, mode, acc, seed in (('float', 'float', 0.91, 0), ('ptq', 'ptq', 0.80, 0), ('qat', 'qat', 0.89, 1)):
    os.makedirs(tmp_path / name)
    json.dump({'mode': mode, 'config': {'quant': quant, 'seed': seed}, 'metrics': {'eval/accuracy': acc},
               'serving_bytes': 300, 'train': {}}, open(tmp_path / name / 'result.json', 'w'))
  _, rows = ptq_table.rows(str(tmp_path))
  assert [r[:3] for r in rows] == [('rtn', 'W4', 0.80)]
  assert '| rtn | 0.8000 / 300 / 0.0 |' in ptq_table.table(str(tmp_path))
  assert ptq_table.main([str(tmp_path / 'nope')]) == 2
  assert capsys.readouterr().err.startswith('error: no such sweep root: ')
  assert ptq_table.main([str(tmp_path), '--metric=eval/acc']) == 2
  assert "did you mean 'eval/accuracy'?" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    ptq_table.main(['--help'])
  assert e.value.code == 0 and 'usage:' in capsys.readouterr().out


def test_char_lm_every_projection_including_attention(root):
  """NNX char-LM: q/k/v (3-D kernels) and the attention output (contracting heads x head_dim) are solved too;
  the output projection gets no online input op (its input is (heads, head_dim))."""
  work = root / 'char_lm'
  assert train.main(['--config=configs/shakespeare_charlm.py:runlocal', '--config.mode=ptq', f'--workdir={work}',
                     '--config.ptq.method=rotation,smoothquant,gptq,bias_correction', '--config.quant_summaries=False',
                     '--config.quant.weight.format=int4', '--config.quant.act.granularity=per_tensor']) == 0
  r = json.load(open(work / 'result.json'))
  info = r['train']['ptq']
  per_block = ['attn/key', 'attn/out', 'attn/query', 'attn/value', 'down', 'up']
  assert sorted(info['layers']) == [f'blocks/{i}/{n}' for i in (0, 1) for n in per_block] + ['head']
  assert info['skipped'] == [] and info['input_op_methods_left_out'] == ['blocks/0/attn/out', 'blocks/1/attn/out']
  for m in info['layers'].values():
    assert m['rel_output_mse'] < m['rtn_rel_output_mse']
  float_dir = next((root / '_pretrained').glob('char_lm-*'))
  float_loss = json.load(open(float_dir / 'result.json'))['metrics']['eval/loss']
  assert r['metrics']['eval/loss'] == r['serving_metrics']['eval/loss'] < float_loss + 0.5
  assert r['metrics']['eval/bits_per_char'] == pytest.approx(r['metrics']['eval/loss'] / np.log(2))
  # The served model's bits per character, which the LM reports rank (QAT's served metrics come from the same
  # serving evaluation): they were missing, and the reports' served column read n/a.
  assert r['serving_metrics']['eval/bits_per_char'] == r['metrics']['eval/bits_per_char']


def test_char_lm_per_group_weights_including_the_attention_output(root):
  """Per-group int4 weights (groups of 16): GPTQ solves the attention output projection too, whose kernel
  contracts (heads, head_dim) (it was left to RTN: 'per-group weights over several contracting axes'), and the
  served integer model is the one evaluated."""
  work = root / 'char_lm_g16'
  assert train.main(['--config=configs/shakespeare_charlm.py:runlocal', '--config.mode=ptq', f'--workdir={work}',
                     '--config.ptq.method=gptq', '--config.quant_summaries=False', '--config.quant.weight.format=int4',
                     '--config.quant.weight.granularity=per_group', '--config.quant.weight.group_size=16',
                     '--config.quant.act.granularity=per_tensor']) == 0
  r = json.load(open(work / 'result.json'))
  info = r['train']['ptq']
  assert info['skipped'] == [] and {'blocks/0/attn/out', 'blocks/1/attn/out'} <= set(info['layers'])
  for m in info['layers'].values():
    assert m['rel_output_mse'] <= m['rtn_rel_output_mse'] * (1 + 1e-4)
  assert r['metrics'] == r['serving_metrics']


def test_a_flattened_kernels_groups_take_the_ops_per_group_layout():
  """GPTQ's (K, out) result for a (heads, head_dim, out) kernel, groups of 16 rows: reshaped, its scale has the
  shape the op gives a per-group rhs over (heads, head_dim), and it dequantizes to the flattened kernel's values."""
  from experiments.training import ptq as ptq_runner  # noqa: PLC0415
  from qjax import QuantSpec, quantizers  # noqa: PLC0415
  from qjax import granularity as gran  # noqa: PLC0415
  dg = importlib.import_module('qjax.ops.dot_general')  # the module (qjax.ops.dot_general is the function)

  w = np.random.default_rng(0).standard_normal((4, 32, 6)).astype(np.float32)
  spec = QuantSpec(format='int4', granularity='per_group', group_size=16)
  q2 = quantizers.quantize(jnp.asarray(w.reshape(128, 6)), spec.replace(axis=0))
  q3 = ptq_runner._reshaped(q2, w.shape, 2)
  op_spec = dg.resolve_spec(spec, w.shape, (0, 1), (), 'rhs')
  assert q3.scale.shape == gran.scale_shape(w.shape, op_spec) == (4, 2, 6)
  np.testing.assert_array_equal(quantizers.dequantize(q3), quantizers.dequantize(q2).reshape(w.shape))
  np.testing.assert_array_equal(quantizers.dequantize(q3), quantizers.fake_quant(jnp.asarray(w), op_spec))


def test_match_pairs_kernels_with_their_one_captured_op_and_says_why_not():
  from experiments.training import ptq as ptq_runner  # noqa: PLC0415
  from qjax.flax.capture import OpSite  # noqa: PLC0415
  from qjax.spec import QuantSpec  # noqa: PLC0415
  spec = QuantSpec(format='int4', granularity='per_channel')
  w = lambda *s: (np.zeros(s), None, spec)
  site = lambda path, w, shape, con, k, prefix='dot_general0', mod=None: OpSite(
      path if mod is None else mod, 'dot_general', prefix, w, 'rhs', shape, con, k, (1,), 2)
  todo = {'fc': w(8, 4), 'proj': w(4, 6), 'tied': w(5, 5), 'twice': w(3, 3), 'gone': w(2, 2), '': w(2, 3)}
  captured = {'fc/a': (site('fc', 'fc/kernel', (8, 4), (0,), 8), 'fc stats'),
              'proj/a': (site('proj', 'proj/kernel', (4, 6), (1,), 6), None),
              'head/a': (site('tied', 'tied/kernel', (5, 5), (0,), 5, mod='head'), None),
              'twice/a': (site('twice', 'twice/kernel', (3, 3), (0,), 3), None),
              'twice/b': (site('twice', 'twice/kernel', (3, 3), (0,), 3, 'dot_general1'), None),
              '<root>/a': (site('', 'kernel', (2, 3), (0,), 2), 'root stats')}
  found, skipped = ptq_runner.match(todo, captured)
  assert {p: st for p, (_, st) in found.items()} == {'fc': 'fc stats', '': 'root stats'}
  assert skipped == {'proj': 'dot_general contracts kernel axes (1,), not its leading axes',
                     'tied': 'its op runs in module head',
                     'twice': '2 ops use this kernel (dot_general0, dot_general1)',
                     'gone': 'no quantized op with this kernel as its weight operand was captured'}


def test_gptq_gives_a_first_conv_kept_at_8_bits_its_8_bit_grid(tmp_path):
  """The runner asked the rules for a kernel's spec as if its op were a dot_general. A conv that is the model's
  first or last op (kept at 8 bits, recorded per op) then got the int4 spec, and serving, which holds it at 8
  bits, refused the int4 kernel GPTQ had made."""
  work = tmp_path / 'cnn'
  assert train.main(['--config=configs/fmnist_cnn.py:runlocal', '--config.mode=ptq', f'--workdir={work}',
                     '--config.ptq.method=gptq', '--config.quant.weight.format=int4',
                     '--config.quant.first_last_8bit=True', '--config.quant_summaries=False']) == 0
  layers = json.load(open(work / 'result.json'))['train']['ptq']['layers']
  assert {'conv1', 'conv2', 'head'} <= set(layers) and 'gptq_damp' in layers['conv1']['notes']
