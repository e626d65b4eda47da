"""The experiment runner end to end on the committed fixtures: modes, run files, resume, failures, devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from experiments.config import cli as config_cli
from experiments.fileio import read_json
from experiments.review import tensorboard as tb
from experiments.training import checkpoints as ckpt_lib
from experiments.training import runner as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlp_config(**overrides):
  c = config_cli.load_file(os.path.join(ROOT, 'configs/fmnist_mlp.py:runlocal'))
  c.num_train_steps = 10
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 5
  c.model.hidden = (64,)
  c.quant_summaries = False
  for k, v in overrides.items():
    config_cli.set_key(c, k, v)
  return c


def run_cli(args, env=None, timeout=600):
  return subprocess.run([sys.executable, '-m', 'experiments.train', *args], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, **(env or {})}, timeout=timeout)


# ---------------------------------------------------------------------------------------------- configs


def test_unknown_key_names_the_nearest_valid_key():
  c = mlp_config()
  with pytest.raises(config_cli.ConfigError, match="did you mean 'quant.weight.format'"):
    config_cli.set_key(c, 'quant.weigth.format', 'int4')
  with pytest.raises(config_cli.ConfigError, match="did you mean 'num_train_steps'"):
    config_cli.set_key(c, 'num_train_step', 5)


def test_override_types_and_groups():
  c = mlp_config()
  config_cli.set_key(c, 'optimizer.learning_rate', '3e-4')
  config_cli.set_key(c, 'quant.weight.po2_scale', 'true')
  config_cli.set_key(c, 'model.hidden', '(32, 16)')
  assert c.optimizer.learning_rate == 3e-4 and c.quant.weight.po2_scale is True and c.model.hidden == (32, 16)
  with pytest.raises(config_cli.ConfigError, match='expected int'):
    config_cli.set_key(c, 'batch_size', 'lots')
  with pytest.raises(config_cli.ConfigError, match='is a group'):
    config_cli.set_key(c, 'quant.weight', 'int8')


def test_cli_rejects_unknown_key_with_exit_code_2(tmp_path):
  p = run_cli(['--config=configs/fmnist_mlp.py:runlocal', f'--workdir={tmp_path}', '--config.batchsize=3'])
  assert p.returncode == 2
  assert "unknown config key 'batchsize'; did you mean 'batch_size'?" in p.stderr
  assert not os.path.exists(tmp_path / 'result.json')


def test_unknown_runner_flag_names_the_nearest_known_flag(tmp_path):
  from experiments.bench import harness as bench  # noqa: PLC0415
  with pytest.raises(config_cli.ConfigError, match='unknown flag --work_dir; did you mean --workdir\\?'):
    train.main(['--config=configs/fmnist_mlp.py:runlocal', f'--work_dir={tmp_path}'])
  with pytest.raises(config_cli.ConfigError, match='did you mean --num_processes\\?'):
    train.main(['--config=configs/fmnist_mlp.py:runlocal', f'--workdir={tmp_path}', '--num_process=2'])
  with pytest.raises(config_cli.ConfigError, match=r'unknown flag --wrkdir; did you mean --workdir\? \(known: '
                                                  r'--config, --config.<key>, --workdir\)'):
    bench.main(['--config=configs/bench_fake_quant.py:runlocal', f'--wrkdir={tmp_path}'])
  assert not os.listdir(tmp_path)  # nothing ran


CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(ROOT, 'configs')) if f.endswith('.py'))


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_every_config_file_rejects_an_unknown_arg_naming_the_known_ones(name):
  path = os.path.join(ROOT, 'configs', name)
  with pytest.raises(config_cli.ConfigError, match=r"unknown config arg 'runlcoal'; did you mean 'runlocal'\? "
                                                  r"\(known: (.*, )?runlocal"):
    config_cli.load_file(f'{path}:runlcoal')
  assert config_cli.load_file(f'{path}:runlocal') is not None


def test_config_arg_values_are_parsed_and_checked():
  assert config_cli.config_args('seeds=3,runlocal', runlocal=False, seeds=1) == {'runlocal': True, 'seeds': 3}
  assert config_cli.config_args(None, runlocal=False, seeds=1) == {'runlocal': False, 'seeds': 1}
  with pytest.raises(config_cli.ConfigError, match=r"'seeds=abc': expected seeds=<int>"):
    config_cli.load_file(os.path.join(ROOT, 'configs/quickstart.py:seeds=abc'))
  with pytest.raises(config_cli.ConfigError, match=r"'runlocal' takes no value"):
    config_cli.config_args('runlocal=1', runlocal=False)


def test_cli_rejects_a_config_arg_typo_before_running(tmp_path):
  r = run_cli(['--config=configs/fmnist_cnn.py:runlcoal', f'--workdir={tmp_path}'])
  assert r.returncode == 2 and "did you mean 'runlocal'" in r.stderr and 'Traceback' not in r.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('arg, message', [
    ('--config.dataset=fmnist', "config.dataset='fmnist' is not one of fashion_mnist, mnist, shakespeare; did you "
                                "mean 'mnist'?"),
    ('--config.data_source=fixture', "config.data_source='fixture' is not one of auto, fixtures; did you mean "
                                     "'fixtures'?"),
])
def test_a_dataset_or_data_source_typo_is_refused_before_anything_runs(tmp_path, arg, message):
  """'fmnist' was a traceback once the data loaded; data_source='fixture' silently loaded the full dataset."""
  with pytest.raises(config_cli.ConfigError) as e:
    train.main(['--config=configs/fmnist_mlp.py:runlocal', f'--workdir={tmp_path / "w"}', arg])
  assert str(e.value) == message
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('key', ['num_train_steps', 'batch_size', 'eval_batch_size', 'log_every_steps',
                                 'eval_every_steps', 'checkpoint_every_steps'])
def test_a_step_count_batch_size_or_step_interval_of_zero_is_refused_naming_the_key(tmp_path, key):
  """Each interval divides a step count: 0 was a ZeroDivisionError traceback after the data had loaded. Zero
  training steps wrote a finished result.json for the untrained model."""
  with pytest.raises(config_cli.ConfigError, match=f'^config.{key}=0 must be >= 1$'):
    train.main(['--config=configs/fmnist_mlp.py:runlocal', f'--workdir={tmp_path / "w"}', f'--config.{key}=0'])
  assert not os.path.exists(tmp_path / 'w')


def test_a_negative_pretrain_step_count_is_refused(tmp_path):
  """It silently meant num_train_steps (as 0 does on purpose)."""
  with pytest.raises(config_cli.ConfigError, match=r'^config.pretrain_steps=-5 must be >= 0 \(0: num_train_steps\)$'):
    train.main(['--config=configs/fmnist_mlp.py:runlocal', f'--workdir={tmp_path / "w"}', '--config.mode=ptq',
                '--config.pretrain_steps=-5'])
  assert not os.path.exists(tmp_path / 'w')


def test_a_qjax_data_source_typo_is_refused_by_validate(monkeypatch):
  monkeypatch.setenv('QJAX_DATA_SOURCE', 'fixture')
  with pytest.raises(config_cli.ConfigError, match="QJAX_DATA_SOURCE='fixture'.*did you mean 'fixtures'"):
    train.validate(mlp_config())


def test_bad_quant_field_names_the_config_key():
  c = mlp_config(mode='qat')
  config_cli.set_key(c, 'quant.weight.format', 'int9')
  with pytest.raises(ValueError, match=r'config.quant.weight: .*bits must be in 1..8'):
    train.train_and_evaluate(c, '/tmp/never-written', log=lambda *a: None)


# ------------------------------------------------------------------------------------------ every mode


@pytest.mark.parametrize('mode', ['float', 'qat', 'ptq', 'quantized_training'])
def test_mode_end_to_end_writes_run_files(tmp_path, mode):
  c = mlp_config(mode=mode, quant_summaries=mode in ('qat', 'ptq'))
  work = tmp_path / mode
  result = train.train_and_evaluate(c, str(work), log=lambda *a: None)
  assert json.load(open(work / 'config.json'))['mode'] == mode
  on_disk = read_json(str(work / 'result.json'))
  assert on_disk['metrics'] == result['metrics']
  assert 0.3 < result['metrics']['eval/accuracy'] <= 1.0  # 10 classes: chance is 0.1
  assert result['environment']['jax'] and 'xla_flags' in result['environment']
  code = result['environment']['code']  # this checkout's commit (tests run from a git clone: .ci/run, README)
  assert len(code['commit']) == 40 and int(code['commit'], 16) >= 0 and isinstance(code['dirty'], bool)
  tags = tb.read_tags(str(work))
  scalars = tags.get('scalars', set())
  assert {'eval/loss', 'eval/accuracy'} <= scalars
  if mode != 'ptq':
    assert {'train/loss', 'train/learning_rate', 'time/steps_per_sec'} <= scalars
  lat = result['latency']
  assert lat['serving_ms'] > 0 and lat['float_ms'] > 0
  assert lat['ratio_to_float'] == pytest.approx(lat['serving_ms'] / lat['float_ms'])
  if mode == 'float':
    assert result['matmuls']['int8'] == 0
    assert result['serving_bytes'] == sum(4 * n for n in (784 * 64, 64, 64 * 10, 10))
    assert lat['ratio_to_float'] == 1.0  # timed against itself
    assert result['checkpoint']['float_bytes'] > 0 and 'serving_dir' not in result['checkpoint']
    assert not (work / 'serving').exists()
  else:
    # The converted model is saved as an orbax checkpoint beside the run; int8 kernels: ~a quarter on disk.
    ck = result['checkpoint']
    assert (work / ck['serving_dir']).is_dir() and ck['ratio_to_float'] == ck['serving_bytes'] / ck['float_bytes']
    assert ck['ratio_to_float'] < 0.35, ck
    # The serving model holds int8 kernels: about a quarter of the float bytes (biases stay f32).
    assert result['serving_bytes'] < 0.3 * result['float_param_bytes']
    assert result['serving_metrics']['eval/accuracy'] == pytest.approx(result['metrics']['eval/accuracy'], abs=0.01)
  if mode in ('qat', 'ptq'):
    assert any(t.startswith('quant_sqnr_db/') for t in scalars)
    assert 'quant/sqnr_per_layer' in tags.get('images', set())
    weights = [row for row in result['layers'] if row['operand'] == 'kernel']
    assert weights and all(row['sqnr_db'] > 30 for row in weights)  # int8 per-channel weights
  if mode == 'ptq':
    assert os.path.isdir(tmp_path / '_pretrained')  # the float model it calibrated was trained once, beside it


def test_first_last_8bit_reaches_the_rules_and_the_per_layer_report(tmp_path):
  c = mlp_config(mode='qat', quant_summaries=True, **{'quant.weight.format': 'int4', 'quant.act.format': 'int4',
                                                      'quant.first_last_8bit': True, 'model.hidden': (64, 32),
                                                      'quant.act_signedness': 'format'})
  result = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  assert result['rules'] and all(r['first_last_8bit'] for r in result['rules'])
  # Three Dense layers: the first and the last (execution order) ran at 8 bits, the middle one at 4.
  weights = [row for row in result['layers'] if row['operand'] == 'kernel']
  acts = [row for row in result['layers'] if row['operand'] == 'act']
  for rows in (weights, acts):
    assert [(row['format'], row['kept_8bit']) for row in rows] == [('int8', True), ('int4', False), ('int8', True)]


def test_experiments_default_to_auto_act_signedness():
  """The runner decides activation grids from data by default; the library's rules keep the format as written
  (its 'auto' needs a probe run on sample inputs)."""
  from experiments.config import quant as quant_config  # noqa: PLC0415
  from qjax import QuantSpec  # noqa: PLC0415
  from qjax.flax import QuantRule  # noqa: PLC0415
  assert quant_config.default_quant_config().act_signedness == 'auto'
  assert QuantRule('.*', weight=QuantSpec(format='int8')).act_signedness == 'format'
  assert all(r.act_signedness == 'auto' for r in quant_config.build_rules(quant_config.default_quant_config()))


def test_auto_act_signedness_reaches_the_rules_and_the_per_layer_report(tmp_path):
  c = mlp_config(mode='qat', quant_summaries=True, **{'quant.act.format': 'int4'})  # 'auto': the default
  result = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  assert result['rules'] and all(r['act_signedness'] == 'auto' for r in result['rules'])
  acts = [row for row in result['layers'] if row['operand'] == 'act']
  assert len(acts) == 2
  # The second layer's input is a ReLU output: unsigned. Each row names the grid its format has.
  assert (acts[1]['format'], acts[1]['grid']) == ('uint4', 'unsigned')
  assert acts[0]['grid'] == ('unsigned' if acts[0]['format'] == 'uint4' else 'signed')


@pytest.mark.parametrize('fine_tune', [False, True])
def test_linen_trainer_decides_auto_signedness_on_concrete_data_before_its_jitted_init(fine_tune):
  import jax  # noqa: PLC0415

  from experiments import models  # noqa: PLC0415
  from experiments.config import quant as quant_config  # noqa: PLC0415
  from experiments.data import pipeline as input_pipeline  # noqa: PLC0415
  from experiments.training import trainers  # noqa: PLC0415
  c = config_cli.load_file(os.path.join(ROOT, 'configs/fmnist_cnn.py:runlocal'))
  c.mode, c.quant.act.format, c.quant.act_signedness = 'qat', 'int4', 'auto'
  data = input_pipeline.load(c)
  md = models.build(c.model)
  tx, _ = train.make_optimizer(c)
  x, _ = input_pipeline.train_batch(data, 0, 0, c.batch_size)
  float_pure = None
  if fine_tune:  # the pretrained model's variables are the ones measured
    v = md.module.init(jax.random.key(0), x, train=False)
    float_pure = {'params': v['params'], 'vars': {k: val for k, val in v.items() if k != 'params'}}
  tr = trainers.make(md, tx, quant_config.build_rules(c.quant))
  tr.init(jax.random.key(0), x, float_pure)
  formats = [m.dot_config.fwd.lhs.format for m in tr.q.rules.quantized()]
  assert len(formats) >= 3 and all(f == 'uint4' for f in formats[1:])  # every layer after the first follows a ReLU
  assert formats[0] == ('uint4' if float(x.min()) >= 0 else 'int4')


def test_learned_act_quantizers_initialise_on_the_activations_training_sees():
  """A fine-tune's PACT clip after a BatchNorm starts at the range of the batch-normalised activations, not at the
  range the running averages give (here 100x the batch's: var / 1e4), which the first training step never sees."""
  import flax.linen as nn  # noqa: PLC0415

  from experiments import models  # noqa: PLC0415
  from experiments.config import quant as quant_config  # noqa: PLC0415
  from experiments.training import trainers  # noqa: PLC0415

  class BnNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Dense(16, name='fc1')(x)
      h = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(h))
      return nn.Dense(10, name='head')(h)

  c = mlp_config(mode='qat')
  c.quant.act.estimator, c.quant.act.format, c.quant.first_last_8bit = 'pact', 'int4', False
  md = models.ModelDef('bn', 'linen', 'classify', module=BnNet())
  x = jax.random.normal(jax.random.key(1), (64, 8))
  v = md.module.init(jax.random.key(0), x, train=False)
  stats = {'bn': {**v['batch_stats']['bn'], 'var': v['batch_stats']['bn']['var'] * 1e-4}}
  tr = trainers.make(md, train.make_optimizer(c)[0], quant_config.build_rules(c.quant))
  state = tr.init(jax.random.key(0), x, {'params': v['params'], 'vars': {'batch_stats': stats}})
  p = v['params']
  h = x @ p['fc1']['kernel'] + p['fc1']['bias']
  seen = jax.nn.relu((h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5) * p['bn']['scale'] + p['bn']['bias'])
  alpha = float(state['params']['head']['dot_general0_lhs_alpha'].squeeze())
  assert 0.9 < alpha / float(seen.max()) < 1.1  # fc1's int8 weights and int4 input move it a little
  assert state['vars']['batch_stats']['bn']['var'] == pytest.approx(stats['bn']['var'])  # running stats kept


@pytest.mark.parametrize('estimator', ['ste', 'lsq'])
def test_init_runs_the_training_mode_forward_only_for_learned_quantizer_params(monkeypatch, estimator):
  """PTQ and a plain-STE QAT have no learned quantizer params: their init skips the training-mode forward (a
  whole compiled program per run) and keeps the model's own params; an LSQ step is still created there."""
  from experiments import models  # noqa: PLC0415
  from experiments.config import quant as quant_config  # noqa: PLC0415
  from experiments.training import trainers  # noqa: PLC0415
  c = config_cli.load_file(os.path.join(ROOT, 'configs/fmnist_cnn.py:runlocal'))  # LeNet-5: a Linen model
  c.mode, c.quant.weight.estimator, c.quant.act.estimator = 'qat', estimator, estimator
  md = models.build(c.model)
  x = jax.random.normal(jax.random.key(1), (8, 28, 28))  # (batch, H, W): LeNet-5 adds the feature axis
  v = md.module.init(jax.random.key(0), x, train=False)
  calls = []
  real = trainers.LinenTrainer._params_as_in_training
  monkeypatch.setattr(trainers.LinenTrainer, '_params_as_in_training',
                      lambda self, *a: calls.append(1) or real(self, *a))
  for float_pure in (None, {'params': v['params'], 'vars': {}}):
    tr = trainers.make(md, train.make_optimizer(c)[0], quant_config.build_rules(c.quant))
    assert tr.q.rules.learns == (estimator == 'lsq')
    params = tr.init(jax.random.key(0), x, float_pure)['params']
    extra = jax.tree.structure(params) != jax.tree.structure(v['params'])
    assert extra == (estimator == 'lsq')  # LSQ: a step per quantized operand
    # What the training-mode forward gives (and init kept before it skipped that forward), bit for bit.
    old = real(tr, jax.random.key(0), x, None if float_pure is None else {'params': float_pure['params']})
    assert jax.tree.structure(params) == jax.tree.structure(old)
    assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, params, old)))
  assert len(calls) == (2 if estimator == 'lsq' else 0)


def test_quantized_training_runs_int8_in_all_three_matmuls(tmp_path):
  from experiments import models  # noqa: PLC0415
  from experiments.config import quant as quant_config  # noqa: PLC0415
  from experiments.data import pipeline as input_pipeline  # noqa: PLC0415
  from experiments.training import trainers  # noqa: PLC0415
  from qjax.ops import inspect_matmuls  # noqa: PLC0415
  c = mlp_config(mode='quantized_training')
  c.quant.grad.format = 'int8'
  data = input_pipeline.load(c)
  md = models.build(c.model)
  tx, _ = train.make_optimizer(c)
  tr = trainers.make(md, tx, quant_config.build_rules(c.quant))
  x, y = input_pipeline.train_batch(data, 0, 0, c.batch_size)
  state = tr.init(__import__('jax').random.key(0), x)
  report = inspect_matmuls(tr.train_step, state, x, y)
  # 2 layers: 2 forward + 2 weight-gradient + 1 input-gradient (the first layer's is dead code) matmuls.
  assert report.n_int8 >= 5 and report.n_int8_slow == 0, report.summary()


def test_qdrop_trains_with_a_fresh_drop_mask_per_step_and_resumes_with_the_same_masks(tmp_path, monkeypatch):
  """QDrop drops in the runner's training steps (before: the trainer passed no PRNG key, so it trained as the
  clipped STE); its key lives in the state, so an interrupted run resumes with the masks it would have drawn."""
  from experiments import models  # noqa: PLC0415
  from experiments.config import quant as quant_config  # noqa: PLC0415
  from experiments.data import pipeline as input_pipeline  # noqa: PLC0415
  from experiments.training import trainers  # noqa: PLC0415

  def two_steps(c, estimator):
    c.quant.act.estimator, c.quant.act.format = estimator, 'int4'
    data, md = input_pipeline.load(c), models.build(c.model)
    tr = trainers.make(md, train.make_optimizer(c)[0], quant_config.build_rules(c.quant))
    x, y = input_pipeline.train_batch(data, 0, 0, c.batch_size)
    state = tr.init(jax.random.key(0), x)
    step = jax.jit(tr.train_step)
    s1, m1 = step(state, x, y)
    s2, m2 = step(s1, x, y)
    return (state, s1, s2), (float(m1['loss']), float(m2['loss']))
  lenet = lambda: config_cli.load_file(os.path.join(ROOT, 'configs/fmnist_cnn.py:runlocal'))
  for make in (lambda: mlp_config(mode='qat'), lenet):  # NNX, Linen
    states, qdrop_loss = two_steps(make(), 'qdrop')
    _, clipped_loss = two_steps(make(), 'clipped_ste')
    assert qdrop_loss[0] != clipped_loss[0] and qdrop_loss[1] != clipped_loss[1]
    if isinstance(states[0], dict):  # Linen: the key is the state's 'rng', split once per step
      assert len({tuple(s['rng'].tolist()) for s in states}) == 3

  c = mlp_config(mode='qat', num_train_steps=12, checkpoint_every_steps=10, eval_every_steps=12,
                 **{'quant.act.estimator': 'qdrop', 'quant.act.format': 'int4'})
  whole = train.train_and_evaluate(c, str(tmp_path / 'whole'), log=lambda _: None)
  batch = train.Run.batch

  def interrupted_at_7(self, step):
    if step == 7:
      raise KeyboardInterrupt
    return batch(self, step)
  monkeypatch.setattr(train.Run, 'batch', interrupted_at_7)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path / 'resumed'), log=lambda _: None)
  monkeypatch.setattr(train.Run, 'batch', batch)
  resumed = train.train_and_evaluate(c, str(tmp_path / 'resumed'), log=lambda _: None)
  assert resumed['train']['resumed_from'] == 7
  assert resumed['metrics']['eval/loss'] == whole['metrics']['eval/loss']


# ------------------------------------------------------------------------------- run files and failures


def test_finished_run_is_never_overwritten(tmp_path):
  c = mlp_config(num_train_steps=5, checkpoint_every_steps=5, eval_every_steps=5)
  first = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  before = open(tmp_path / 'result.json').read()
  again = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)  # the same run: returns its result
  assert again['metrics'] == first['metrics']
  other = mlp_config(num_train_steps=5, checkpoint_every_steps=5, eval_every_steps=5, seed=1)
  with pytest.raises(train.RunError, match='finished run with a different config'):
    train.train_and_evaluate(other, str(tmp_path), log=lambda *a: None)
  assert open(tmp_path / 'result.json').read() == before


def test_a_truncated_result_is_a_run_to_finish_not_a_traceback(tmp_path, capsys):
  c = mlp_config(num_train_steps=5, checkpoint_every_steps=5, eval_every_steps=5)
  first = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  (tmp_path / 'result.json').write_text('{"metrics": {"eval/acc')
  again = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)  # resumes at its last step
  assert 'is not a valid result' in capsys.readouterr().err
  assert again['metrics'] == first['metrics'] and read_json(str(tmp_path / 'result.json'))['metrics']


def test_a_resumed_run_reports_its_total_steps(tmp_path, monkeypatch):
  c = mlp_config(num_train_steps=10, checkpoint_every_steps=5)
  save = ckpt_lib.Checkpoints.save

  def save_then_stop(self, step, tree):  # Ctrl-C right after the checkpoint of step 5
    save(self, step, tree)
    raise KeyboardInterrupt

  monkeypatch.setattr(ckpt_lib.Checkpoints, 'save', save_then_stop)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  monkeypatch.setattr(ckpt_lib.Checkpoints, 'save', save)
  result = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  assert result['train']['steps'] == 10 and result['train']['resumed_from'] == 5
  assert read_json(str(tmp_path / 'result.json'))['train']['steps'] == 10


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = mlp_config(num_train_steps=10, log_every_steps=1, checkpoint_every_steps=1)
  c.optimizer.name, c.optimizer.schedule, c.optimizer.learning_rate = 'sgd', 'constant', 1e30
  with pytest.raises(train.NonFiniteLoss, match=r'non-finite loss .* at step (\d+).*last good checkpoint') as e:
    train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  bad_step = int(e.value.args[0].split('at step ')[1].split(':')[0])
  steps = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert steps and max(steps) == bad_step - 1  # nothing saved from the bad step on
  assert not os.path.exists(tmp_path / 'result.json')


def test_the_checkpoint_kept_is_finite_and_the_message_names_a_step(tmp_path):
  # lr 1e39: the loss of step 1 (before the update) is finite, the state after it is not.
  c = mlp_config(num_train_steps=10, log_every_steps=5, checkpoint_every_steps=1)
  c.optimizer.schedule, c.optimizer.learning_rate = 'constant', 1e39
  with pytest.raises(train.NonFiniteLoss, match=r'non-finite .* at step 1\b') as e:
    train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  assert 'step None' not in str(e.value) and 'No checkpoint was saved' in str(e.value)
  assert not [d for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()]


def test_an_exploding_finite_loss_is_reported(tmp_path):
  c = mlp_config(num_train_steps=20)
  c.optimizer.schedule, c.optimizer.learning_rate = 'constant', 1e6
  lines = []
  result = train.train_and_evaluate(c, str(tmp_path), log=lines.append)
  warnings = result['warnings']
  assert any('orders of magnitude' in w for w in warnings) and any('far worse' in w for w in warnings), warnings
  assert any(str(line).startswith('warning: the training loss grew') for line in lines)
  calm = train.train_and_evaluate(mlp_config(num_train_steps=20), str(tmp_path / 'calm'), log=lambda *a: None)
  assert calm['warnings'] == []


def test_quant_options_in_a_float_run_warn_naming_the_mode_that_uses_them(tmp_path):
  c = mlp_config(mode='float')
  config_cli.set_key(c, 'quant.weight.format', 'int4')
  text = config_cli.unused_in_float(c, ['quant.weight.format', 'seed'])
  assert "config.quant.weight.format='int4' has no effect" in text and '--config.mode=qat' in text
  assert config_cli.unused_in_float(c, ['seed']) is None  # the config file's own quant settings are not a mistake
  config_cli.set_key(c, 'quant.act.format', '')  # no quantization: agrees with a float run
  assert config_cli.unused_in_float(c, ['quant.act.format']) is None
  config_cli.set_key(c, 'mode', 'qat')
  assert config_cli.unused_in_float(c, ['quant.weight.format']) is None
  r = run_cli(['--config=configs/fmnist_mlp.py:runlocal', '--config.quant.weight.format=int4',
               '--config.num_train_steps=2', '--config.model.hidden=(8,)', f'--workdir={tmp_path}'])
  assert r.returncode == 0 and "warning: config.quant.weight.format='int4' has no effect" in r.stderr


def test_an_interrupt_mid_training_checkpoints_the_last_finished_step_and_the_rerun_resumes_there(tmp_path,
                                                                                                  monkeypatch):
  c = mlp_config(num_train_steps=12, checkpoint_every_steps=10, eval_every_steps=12)
  batch = train.Run.batch

  def interrupted_at_7(self, step):
    if step == 7:  # steps 0..6 are done: the state holds 7 steps
      raise KeyboardInterrupt
    return batch(self, step)
  monkeypatch.setattr(train.Run, 'batch', interrupted_at_7)
  lines = []
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path), log=lines.append)
  assert 'interrupted: saved a checkpoint at step 7' in lines
  assert ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints')).latest_step() == 7  # not the periodic 10: never reached
  monkeypatch.setattr(train.Run, 'batch', batch)
  lines = []
  result = train.train_and_evaluate(c, str(tmp_path), log=lines.append)
  assert result['train']['resumed_from'] == 7 and any('from step 7' in str(line) for line in lines)
  # TensorBoard's HParams dashboard calls the finished run a success: the interrupted segment ended its session
  # as a failure, and TensorBoard keeps the first end it reads.
  from tensorboard.backend.event_processing import plugin_event_accumulator as pea
  from tensorboard.plugins.hparams import api_pb2
  from tensorboard.plugins.hparams import metadata as hm
  acc = pea.EventAccumulator(str(tmp_path), size_guidance={pea.TENSORS: 0})
  acc.Reload()
  content = acc.PluginTagToContent(hm.PLUGIN_NAME)
  assert hm.parse_session_end_info_plugin_data(content[hm.SESSION_END_INFO_TAG]).status == api_pb2.STATUS_SUCCESS


def test_a_run_that_crashed_and_is_rerun_ends_its_hparams_session_as_a_success(tmp_path, monkeypatch):
  """A crash ends the HParams session as a failure; the rerun resumes from the checkpoint and finishes, and its
  'success' is the end TensorBoard reads (it keeps the first: the crash's end sits in a file the rerun drops)."""
  c = mlp_config(num_train_steps=12, checkpoint_every_steps=5, eval_every_steps=12)
  batch = train.Run.batch

  def crash_at_7(self, step):
    if step == 7:
      raise RuntimeError('disk full')
    return batch(self, step)
  monkeypatch.setattr(train.Run, 'batch', crash_at_7)
  with pytest.raises(RuntimeError, match='disk full'):
    train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  from tensorboard.backend.event_processing import plugin_event_accumulator as pea
  from tensorboard.plugins.hparams import api_pb2
  from tensorboard.plugins.hparams import metadata as hm

  def status():
    acc = pea.EventAccumulator(str(tmp_path), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return hm.parse_session_end_info_plugin_data(acc.PluginTagToContent(hm.PLUGIN_NAME)[hm.SESSION_END_INFO_TAG]).status
  assert status() == api_pb2.STATUS_FAILURE
  monkeypatch.setattr(train.Run, 'batch', batch)
  result = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  assert result['train']['resumed_from'] == 5
  assert status() == api_pb2.STATUS_SUCCESS


def test_a_run_stopped_after_its_last_checkpoint_reports_its_logged_final_loss(tmp_path, monkeypatch):
  """Stopped in _finish (after the final checkpoint, before result.json), the rerun ran no step and wrote
  final_train_loss NaN and 0 steps/s."""
  c = mlp_config()
  finish, calls = train._finish, []

  def stop_once(*a, **k):
    calls.append(1)
    if len(calls) == 1:
      raise KeyboardInterrupt
    return finish(*a, **k)
  monkeypatch.setattr(train, '_finish', stop_once)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path / 'a'), log=lambda *_: None)
  resumed = train.train_and_evaluate(c, str(tmp_path / 'a'), log=lambda *_: None)['train']
  whole = train.train_and_evaluate(c, str(tmp_path / 'b'), log=lambda *_: None)['train']
  assert resumed['resumed_from'] == 10 and resumed['steps_per_sec'] is None and resumed['step_time_ms'] is None
  assert resumed['final_train_loss'] == pytest.approx(whole['final_train_loss'], rel=1e-6)


def test_sigterm_to_a_sweep_checkpoints_its_running_trial(tmp_path):
  """The sweep stops its workers with SIGTERM: the running trial saves its last step before the worker dies."""
  root = tmp_path / 'root'
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.sweep', '--config=configs/quickstart.py:runlocal',
                           f'--root={root}', '--workers=1', '--config.num_train_steps=100000',
                           '--config.checkpoint_every_steps=100000', '--config.eval_every_steps=100000'],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline, log = time.time() + 240, None
  while time.time() < deadline and proc.poll() is None:
    logs = list(root.glob('*/train.log'))
    if logs and logs[0].read_text().count('loss=') >= 2:  # training, past its first logged steps
      log = logs[0]
      break
    time.sleep(0.2)
  assert log is not None, proc.communicate()[0] if proc.poll() is not None else 'no training seen'
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0 and 'rerun the same command to resume' in out, out
  saved = [line for line in log.read_text().splitlines() if line.startswith('interrupted: saved a checkpoint')]
  step = ckpt_lib.Checkpoints(str(log.parent / 'checkpoints')).latest_step()
  assert saved == [f'interrupted: saved a checkpoint at step {step}'] and step > 0, log.read_text()[-2000:]


def test_kill_9_then_rerun_finishes_with_uninterrupted_metrics(tmp_path):
  args = ['--config=configs/fmnist_mlp.py:runlocal', '--config.num_train_steps=40', '--config.model.hidden=(64,)',
          '--config.checkpoint_every_steps=10', '--config.eval_every_steps=40', '--config.quant_summaries=false',
          '--config.mode=qat', '--config.quant.act_static=true']
  ref = run_cli([*args, f'--workdir={tmp_path / "ref"}'])
  assert ref.returncode == 0, ref.stderr
  work = tmp_path / 'killed'
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.train', *args, f'--workdir={work}'], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  ckpt = work / 'checkpoints'
  while time.time() < deadline and not (ckpt.exists() and any(d.isdigit() for d in os.listdir(ckpt))):
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (work / 'result.json').exists(), 'the run finished before it could be killed'
  resumed = run_cli([*args, f'--workdir={work}'])
  assert resumed.returncode == 0, resumed.stderr
  assert 'resuming' in resumed.stdout
  a, b = read_json(str(tmp_path / 'ref' / 'result.json')), read_json(str(work / 'result.json'))
  for k in a['metrics']:
    assert b['metrics'][k] == pytest.approx(a['metrics'][k], rel=1e-5, abs=1e-6)
  assert b['train']['final_train_loss'] == pytest.approx(a['train']['final_train_loss'], rel=1e-5)


# ---------------------------------------------------------------------------------------- beyond one device


COMMON = ['--config=configs/fmnist_mlp.py:runlocal', '--config.num_train_steps=6', '--config.eval_every_steps=6',
          '--config.checkpoint_every_steps=6', '--config.quant_summaries=false', '--config.eval_batch_size=200',
          '--config.model.hidden=(64,)']


def test_eight_simulated_devices_match_one_device(tmp_path):
  one = run_cli([*COMMON, f'--workdir={tmp_path / "one"}'], env={'JAX_NUM_CPU_DEVICES': '1'})
  eight = run_cli([*COMMON, f'--workdir={tmp_path / "eight"}'], env={'JAX_NUM_CPU_DEVICES': '8'})
  assert one.returncode == 0 and eight.returncode == 0, (one.stderr, eight.stderr)
  a, b = read_json(str(tmp_path / 'one/result.json')), read_json(str(tmp_path / 'eight/result.json'))
  assert b['environment']['devices'] == 8 and a['environment']['devices'] == 1
  assert b['train']['final_train_loss'] == pytest.approx(a['train']['final_train_loss'], rel=1e-4)
  assert b['metrics']['eval/loss'] == pytest.approx(a['metrics']['eval/loss'], rel=1e-4)


def test_two_processes_on_loopback_form_one_run(tmp_path):
  s = socket.socket()
  s.bind(('127.0.0.1', 0))
  port = s.getsockname()[1]
  s.close()
  work = tmp_path / 'mp'
  procs = [subprocess.Popen([sys.executable, '-m', 'experiments.train', *COMMON, f'--workdir={work}',
                             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}'],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, 'JAX_NUM_CPU_DEVICES': '1'}) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  # conftest sets a persistent compilation cache, which such a run turns off, and says so.
  assert all('persistent compilation cache' in o[1] and 'is off in this 2-process' in o[1] for o in outs)
  single = run_cli([*COMMON, f'--workdir={tmp_path / "single"}'], env={'JAX_NUM_CPU_DEVICES': '2'})
  assert single.returncode == 0, single.stderr
  a, b = read_json(str(tmp_path / 'single/result.json')), read_json(str(work / 'result.json'))
  assert b['environment']['processes'] == 2 and b['environment']['devices'] == 2
  assert b['train']['final_train_loss'] == pytest.approx(a['train']['final_train_loss'], rel=1e-4)
  assert b['metrics']['eval/accuracy'] == pytest.approx(a['metrics']['eval/accuracy'], abs=1e-6)


def test_layer_groups_pick_format_granularity_and_estimator_by_config(tmp_path):
  import ml_collections  # noqa: PLC0415
  c = mlp_config(mode='qat', quant_summaries=True)
  c.model.hidden = (64, 32)
  c.quant.groups = ml_collections.ConfigDict({
      'first': {'module_path': 'hidden/0', 'weight': {'format': 'int4', 'granularity': 'per_group', 'group_size': 16,
                                                      'estimator': 'lsq'},
                'act': {'format': 'fp8_e4m3'}},
      'last': {'module_path': 'head', 'float': True}})  # the old name of keep_float, as configs wrote it
  result = train.train_and_evaluate(c, str(tmp_path), log=lambda *a: None)
  assert [r['name'] for r in result['rules']] == ['first', 'last', 'default']
  layers = {(row['layer'].split('/dot_general')[0], row['operand']): row for row in result['layers']}
  assert layers[('hidden/0', 'kernel')]['format'] == 'int4' and layers[('hidden/0', 'act')]['format'] == 'fp8_e4m3'
  assert 'scale' in layers[('hidden/0', 'kernel')]['learned']  # LSQ's step, logged as it trains
  assert layers[('hidden/1', 'kernel')]['format'] == 'int8'      # the default rule
  assert not any(path == 'head' for path, _ in layers)            # left in float
  with pytest.raises(ValueError, match=r'config.quant.groups.first.weight: .*group_size=48 does not divide|'
                                       r'group_size=48'):
    bad = mlp_config(mode='qat')
    bad.quant.groups = ml_collections.ConfigDict({'first': {'module_path': 'hidden/0',
                                                            'weight': {'granularity': 'per_group', 'group_size': 48}}})
    train.train_and_evaluate(bad, str(tmp_path / 'bad'), log=lambda *a: None)


def test_model_axis_sharding_matches_data_parallel(tmp_path):
  base = run_cli([*COMMON, f'--workdir={tmp_path / "dp"}'], env={'JAX_NUM_CPU_DEVICES': '4'})
  tp = run_cli([*COMMON, '--config.mesh.model=2', f'--workdir={tmp_path / "tp"}'], env={'JAX_NUM_CPU_DEVICES': '4'})
  assert base.returncode == 0 and tp.returncode == 0, (base.stderr[-2000:], tp.stderr[-2000:])
  a, b = read_json(str(tmp_path / 'dp/result.json')), read_json(str(tmp_path / 'tp/result.json'))
  assert b['config']['mesh']['model'] == 2
  assert b['train']['final_train_loss'] == pytest.approx(a['train']['final_train_loss'], rel=1e-4)


def test_a_model_with_no_integer_serving_form_is_reported_not_served_as_another_model(tmp_path):
  # DoReFa weights have no integer grid: the run keeps its QAT metrics and says why it was not served (it used to
  # serve an absmax int4 rounding of the raw weights: another model, at chance accuracy).
  c = mlp_config(mode='qat')
  config_cli.set_key(c, 'quant.weight.estimator', 'dorefa')
  config_cli.set_key(c, 'quant.weight.format', 'int4')
  result = train.train_and_evaluate(c, str(tmp_path / 'w'), log=lambda *a: None)
  assert "estimator='dorefa' has no integer grid" in result['serving_error']
  assert 'serving_metrics' not in result and 'serving_bytes' not in result
  assert any(w.startswith('not served: convert: the weight') for w in result['warnings'])
  assert 0.3 < result['metrics']['eval/accuracy'] <= 1.0


def test_quantizer_params_get_their_own_learning_rate_and_weight_decay():
  params = {'fc': {'kernel': jnp.ones((2, 2)), 'dot_general0_rhs_scale': jnp.ones((1, 2))}}
  zeros = {'fc': {'kernel': jnp.zeros((2, 2)), 'dot_general0_rhs_scale': jnp.zeros((1, 2))}}

  def update(grads, **opt):
    c = mlp_config(**{'optimizer.name': 'adamw', 'optimizer.schedule': 'constant', 'optimizer.learning_rate': 0.1,
                      'optimizer.weight_decay': 0.5, **{f'optimizer.{k}': v for k, v in opt.items()}})
    tx, _ = train.make_optimizer(c)
    u, _ = tx.update(grads, tx.init(params), params)
    return float(u['fc']['kernel'][0, 0]), float(u['fc']['dot_general0_rhs_scale'][0, 0])

  # A zero gradient: the model's kernel decays (-lr * wd * w), the quantizer's step does not, unless asked to.
  assert update(zeros) == pytest.approx((-0.05, 0.0))
  assert update(zeros, quant_weight_decay=0.2) == pytest.approx((-0.05, -0.02))
  # A unit gradient: Adam's first step is -lr * sign(g) (plus decay); the step's learning rate is scaled.
  k, s = update({'fc': {'kernel': jnp.ones((2, 2)), 'dot_general0_rhs_scale': jnp.ones((1, 2))}}, quant_lr_scale=0.1)
  assert k == pytest.approx(-0.1 - 0.05, rel=1e-4) and s == pytest.approx(-0.01, rel=1e-4)
  with pytest.raises(config_cli.ConfigError, match='quant_lr_scale and quant_weight_decay must be >= 0'):
    update(zeros, quant_lr_scale=-1.0)


def test_a_layer_group_is_kept_float_by_keep_float_or_its_old_name_float():
  import ml_collections  # noqa: PLC0415

  from experiments.config import quant as quant_config  # noqa: PLC0415
  for key in ('keep_float', 'float'):
    c = mlp_config(mode='qat')
    c.quant.groups = ml_collections.ConfigDict({'head': {'module_path': 'head', key: True}})
    rules = quant_config.build_rules(c.quant)
    assert [(r.name, r.keep_float) for r in rules] == [('head', True), ('default', False)]
  c.quant.groups.head.keep_float = False
  with pytest.raises(ValueError, match='keep_float or its old name float, not both'):
    quant_config.build_rules(c.quant)


def test_static_activation_ranges_with_a_per_channel_act_grid_are_refused_naming_the_key():
  """PTQ (and quant.act_static) keeps one range per activation tensor: a per-channel act grid is a ConfigError
  naming the config key, the rule and the flag that fixes it, raised by validate, before any data loads or model
  trains (it used to surface as a traceback from inside the first quantized forward, after the float model had
  trained)."""
  import ml_collections  # noqa: PLC0415

  c = mlp_config(mode='ptq')
  c.quant.act.granularity = 'per_channel'
  with pytest.raises(config_cli.ConfigError, match=r"^config.quant \(mode=ptq sets act_static\): rule 'default': "
                     r'act_static keeps one range per tensor; act granularity must be "per_tensor", got '
                     r"'per_channel'; add --config.quant.act.granularity=per_tensor$"):
    train.validate(c)
  c = mlp_config(mode='qat')
  c.quant.act.granularity = 'per_channel'
  train.validate(c)  # dynamic per-channel activation scales: fine
  c.quant.groups = ml_collections.ConfigDict({'head': {'module_path': 'head', 'act_static': True}})
  with pytest.raises(config_cli.ConfigError, match=r"^config.quant.groups.head: rule 'head': act_static keeps one "
                     r'range per tensor; act granularity must be "per_tensor", got \'per_channel\'; add '
                     r'--config.quant.groups.head.act.granularity=per_tensor$'):
    train.validate(c)
  c.quant.groups.head.act = ml_collections.ConfigDict({'granularity': 'per_tensor'})
  train.validate(c)


@pytest.mark.parametrize('mode', ['qat', 'ptq'])
def test_init_from_a_quantized_run_is_refused_naming_its_mode(tmp_path, mode):
  """init_from takes a float run's weights; a finished QAT or PTQ run gets a RunError saying so (its checkpoint's
  tree differs, which orbax would report as a tree-structure dump), before anything is restored."""
  from experiments.fileio import write_json_atomic
  src = str(tmp_path / 'src')
  os.makedirs(src)
  write_json_atomic(os.path.join(src, 'result.json'), {'test_acc': 0.9, 'config': {'mode': mode}})
  cfg = mlp_config(init_from=src)
  with pytest.raises(train.RunError, match=f"mode='{mode}' run; init_from takes the weights of a float run"):
    train.load_float_state(cfg, str(tmp_path / 'run'), None, None, print)


def test_a_workdir_another_run_holds_is_refused(tmp_path, capsys):
  """A lone `experiments.train` took no claim: two on one workdir both trained, writing the same checkpoints and
  result. The second is now refused, naming the holder, and the workdir is left as it was."""
  from experiments.fileio import Claim
  work = tmp_path / 'held'
  claim = Claim.acquire(str(work))  # another run (here this process, through its own lock) holds it
  try:
    rc = train.main(['--config=configs/fmnist_mlp.py:runlocal', f'--workdir={work}'])
  finally:
    claim.release()
  assert rc == 3
  err = capsys.readouterr().err
  assert f'is being run by pid {os.getpid()} on {socket.gethostname()}' in err
  assert sorted(os.listdir(work)) == ['.claim']
