"""experiments.sweeps (declarations, expansion) and experiments.sweep (executors, claims, resume, failures).

Most tests run a fake trial function (`--trial_fn=test_sweep:fake_trial`) that counts its runs in marker
files; one runs the real runner on the committed Fashion-MNIST fixtures, and one a local Ray.
"""

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import ml_collections
import pytest

from experiments import fileio, sweeps
from experiments import sweep as sweep_cmd
from experiments.config import cli as config_cli
from experiments.fileio import Claim
from experiments.review import board
from experiments.review import tensorboard as tb
from experiments.sweeps import launch as sweep

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
ENV = {**os.environ, 'PYTHONPATH': os.pathsep.join([TESTS, REPO]), 'JAX_PLATFORMS': 'cpu'}

FAKE_CONFIG = '''
import ml_collections
from experiments import sweeps

def get_config(arg=None):
  return ml_collections.ConfigDict({
      'seed': 0, 'mode': 'qat', 'steps': 3, 'sleep': 0.0, 'fail': '', 'crash': '', 'init_from': '',
      'quant': {'weight': {'format': 'int8'}, 'act': {'format': 'int8'}}})

def get_sweep(arg=None):
  bits = sweeps.zipped(sweeps.axis('quant.weight.format', ['int8', 'int4'], name='w'),
                       sweeps.axis('quant.act.format', ['int8', 'int4'], name='a'))
  return sweeps.product(bits, sweeps.axis('seed', [0, 1]))

def metrics():
  return ['eval/accuracy']
'''


def _accuracy(config) -> float:
  return {'int8': 0.9, 'int4': 0.8, '': 0.95}[config.quant.weight.format] + 0.01 * config.seed


def fake_trial(config, workdir, log=print):
  """A resumable stand-in for train_and_evaluate: `steps` steps of `sleep` s, each recorded once."""
  with open(os.path.join(workdir, 'runs.txt'), 'a') as f:
    f.write(f'start {os.getpid()}\n')
  log(f'fake trial in {workdir}')
  ckpt = os.path.join(workdir, 'ckpt.json')  # the steps done so far, written atomically after each step
  steps = json.load(open(ckpt)) if os.path.exists(ckpt) else []
  name = os.path.basename(workdir)
  if config.crash and config.crash == name:
    os._exit(3)
  while len(steps) < config.steps:
    time.sleep(config.sleep)
    steps.append(len(steps) + 1)
    fileio.write_json_atomic(ckpt, steps)
  if config.fail and config.fail == name and not os.path.exists(os.path.join(workdir, 'healed')):
    raise ValueError(f'injected failure in {name}')
  c = config_cli.to_dict(config)
  result = {'metrics': {'eval/accuracy': _accuracy(config), 'eval/loss': 1 - _accuracy(config)},
            'serving_bytes': 1000 if config.quant.weight.format == 'int8' else 500,
            'train': {'steps_per_sec': 20.0}, 'matmuls': {'int8': 2, 'total': 3}, 'mode': config.mode, 'config': c}
  with tb.SummaryWriter(workdir) as w:  # what the runner writes: every config leaf (the seed left out)
    w.hparams(c)
    w.scalar('eval/accuracy', result['metrics']['eval/accuracy'], config.steps)
  fileio.write_json_atomic(os.path.join(workdir, 'result.json'), result)
  return result


@pytest.fixture
def fake_cfg(tmp_path):
  path = tmp_path / 'fake.py'
  path.write_text(FAKE_CONFIG)
  return str(path)


def _sweep(args, lines=None):
  out = [] if lines is None else lines
  rc = sweep_cmd.run_sweep(args, out=out.append)
  return rc, out


def _runs(root, name):
  return sum(1 for line in open(os.path.join(root, name, 'runs.txt')) if line.startswith('start'))


def _steps(root, name):
  return json.load(open(os.path.join(root, name, 'ckpt.json')))


# -------------------------------------------------------------------------------------- expansion, naming


def test_expansion_names_ids_and_overrides(fake_cfg, tmp_path):
  module, arg = config_cli.load_module(fake_cfg)
  trials = sweeps.expand(module, arg, str(tmp_path / 'root'))
  assert [t.name for t in trials] == ['w=int8,a=int8,seed=0', 'w=int8,a=int8,seed=1',
                                      'w=int4,a=int4,seed=0', 'w=int4,a=int4,seed=1']
  assert trials[2].config.quant.act.format == 'int4' and trials[2].config.seed == 0
  assert trials[2].overrides == {'quant.weight.format': 'int4', 'quant.act.format': 'int4', 'seed': 0}
  again = sweeps.expand(*config_cli.load_module(fake_cfg), str(tmp_path / 'root'))
  assert [t.id for t in trials] == [t.id for t in again]  # deterministic
  assert len({t.id for t in trials}) == 4
  assert trials[0].id == sweeps.config_id(trials[0].config)
  assert sweeps.hparam_domains(trials) == {'quant.weight.format': ['int8', 'int4'],
                                           'quant.act.format': ['int8', 'int4']}  # no seed
  # --config.* overrides reach every trial; a swept key cannot be overridden; typos name the nearest key.
  assert all(t.config.steps == 7 for t in sweeps.expand(module, arg, str(tmp_path), [('steps', '7')]))
  with pytest.raises(config_cli.ConfigError, match='swept'):
    sweeps.expand(module, arg, str(tmp_path), [('seed', '3')])
  with pytest.raises(config_cli.ConfigError, match="did you mean 'steps'"):
    sweeps.expand(module, arg, str(tmp_path), [('stesp', '3')])


def test_axis_forms_short_names_and_refs(tmp_path):
  s = sweeps.chain(
      sweeps.axis('mode', {'float': {'mode': 'float', 'quant.weight.format': ''}}),
      sweeps.product(sweeps.axis('mode', [{'mode': 'ptq', 'init_from': sweeps.trial_ref('mode=float')}]),
                     sweeps.axis('quant.weight.format', ['int8', 'int4']),
                     sweeps.axis('quant.act.format', ['int8'])),
  )
  short = sweeps.short_names(s.axes)
  assert short == {'mode': 'mode', 'quant.weight.format': 'weight.format', 'quant.act.format': 'act.format'}
  module = type('M', (), {})()
  module.get_config = lambda arg=None: config_cli.load_file(os.path.join(REPO, 'configs/fmnist_cnn.py'))
  module.get_sweep = lambda arg=None: s
  trials = sweeps.expand(module, None, str(tmp_path))
  assert [t.name for t in trials] == ['mode=float', 'mode=ptq,weight.format=int8,act.format=int8',
                                      'mode=ptq,weight.format=int4,act.format=int8']
  assert trials[1].deps == [0] and trials[1].config.init_from == os.path.join(str(tmp_path), 'mode=float')
  assert trials[1].refs == {'init_from': 'mode=float'}
  assert 'init_from' not in sweeps.hparam_domains(trials)
  with pytest.raises(config_cli.ConfigError, match='one length'):
    sweeps.zipped(sweeps.axis('seed', [0, 1]), sweeps.axis('mode', ['qat']))
  with pytest.raises(config_cli.ConfigError, match='twice'):
    sweeps.product(sweeps.axis('seed', [0]), sweeps.axis('seed', [1]))
  with pytest.raises(config_cli.ConfigError, match='label'):
    sweeps.axis('bits', [{'quant.weight.format': 'int4'}])
  module.get_sweep = lambda arg=None: sweeps.axis('mode', ['qat', 'qat'])
  with pytest.raises(config_cli.ConfigError, match='both named'):
    sweeps.expand(module, None, str(tmp_path))


def test_quickstart_sweep_expands():
  module, arg = config_cli.load_module(os.path.join(REPO, 'configs/quickstart.py'))
  trials = sweeps.expand(module, arg, '/tmp/qs')
  assert [t.name for t in trials] == ['mode=float', 'mode=qat,bits=w8a8', 'mode=qat,bits=w4a4',
                                      'mode=qat,bits=w2a2', 'mode=ptq,bits=w8a8', 'mode=ptq,bits=w4a4',
                                      'mode=ptq,bits=w2a2']
  by = {t.name: t for t in trials}
  assert by['mode=qat,bits=w2a2'].config.quant.weight.estimator == 'lsq'
  assert by['mode=ptq,bits=w4a4'].config.init_from == '/tmp/qs/mode=float'
  assert all(t.deps == [0] for t in trials if t.config.mode == 'ptq')
  seeds = sweeps.expand(*config_cli.load_module(os.path.join(REPO, 'configs/quickstart.py:seeds=2')), '/tmp/qs')
  assert len(seeds) == 14 and seeds[-1].name == 'mode=ptq,bits=w2a2,seed=1' and seeds[-1].deps == [1]


def test_dry_run_and_index(fake_cfg, tmp_path, monkeypatch):
  root = str(tmp_path / 'root')
  rc, out = _sweep([f'--config={fake_cfg}', f'--root={root}', '--dry_run'])
  assert rc == 0 and len(out) == 4 and 'w=int4,a=int4,seed=1' in out[3] and out[3].split()[0] == '3'
  assert not os.path.exists(root)
  rc, out = _sweep([f'--config={fake_cfg}', f'--root={root}', '--dry_run', '--config.mode=float'])
  assert "warning: trial w=int4,a=int4,seed=0: config.quant.weight.format='int4'" in out[2], out
  monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '2')
  rc, out = _sweep([f'--config={fake_cfg}', f'--root={root}', '--index=env', '--trial_fn=test_sweep:fake_trial'])
  assert rc == 0, out
  assert os.listdir(root) and os.path.exists(os.path.join(root, 'w=int4,a=int4,seed=0', 'result.json'))
  assert not os.path.exists(os.path.join(root, 'w=int8,a=int8,seed=0'))
  assert any('start  w=int4,a=int4,seed=0' in line for line in out)
  assert any(line.startswith('tally: 1 done, 0 skipped, 0 failed') for line in out)
  with pytest.raises(config_cli.ConfigError, match='0..3'):
    _sweep([f'--config={fake_cfg}', f'--root={root}', '--index=4'])
  with pytest.raises(config_cli.ConfigError, match="unknown flag --workres; did you mean --workers\\?"):
    _sweep([f'--config={fake_cfg}', f'--root={root}', '--workres=2'])


@pytest.mark.parametrize('flag', ['dry_run', 'retry_failed', 'rerun_changed', 'adopt_new_keys'])
def test_a_switch_with_a_value_that_is_not_true_or_false_is_refused_before_any_trial(fake_cfg, tmp_path, flag):
  """--dry_run=ture used to read as false and run the real sweep."""
  root = str(tmp_path / 'root')
  with pytest.raises(config_cli.ConfigError, match=f'--{flag}=ture: expected true or false'):
    _sweep([f'--config={fake_cfg}', f'--root={root}', f'--{flag}=ture', '--trial_fn=test_sweep:fake_trial'])
  assert not os.path.exists(root)
  rc, out = _sweep([f'--config={fake_cfg}', f'--root={root}', '--dry_run=yes'])
  assert rc == 0 and len(out) == 4 and not os.path.exists(root)


def test_a_dataset_typo_fails_the_sweep_before_any_trial(tmp_path):
  """The runner's validate() checks config.dataset, so the sweep's pre-trial check catches it too."""
  root = str(tmp_path / 'root')
  with pytest.raises(config_cli.ConfigError, match=r"^trial .*: config.dataset='fmnist' is not one of"):
    _sweep([f'--config={REPO}/configs/quickstart.py:runlocal', f'--root={root}', '--config.dataset=fmnist'])
  assert not os.path.exists(root)


def test_only_selects_trials_and_what_they_start_from(fake_cfg, tmp_path):
  module, arg = config_cli.load_module(os.path.join(REPO, 'configs/quickstart.py'))
  trials = sweeps.expand(module, arg, '/tmp/qs')
  # The PTQ trial starts from the float one, which comes along; sweep order is kept.
  assert [t.name for t in sweep.select(trials, 'ptq,bits=w4')] == ['mode=float', 'mode=ptq,bits=w4a4']
  assert [t.name for t in sweep.select(trials, 'qat')] == ['mode=qat,bits=w8a8', 'mode=qat,bits=w4a4',
                                                           'mode=qat,bits=w2a2']
  with pytest.raises(config_cli.ConfigError, match='matches none of the 7 trial names'):
    sweep.select(trials, 'bits=w3')
  with pytest.raises(config_cli.ConfigError, match='not a regular expression'):
    sweep.select(trials, 'bits=(w3')
  root = str(tmp_path / 'root')
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1']
  rc, out = _sweep(args + ['--only=a=int4', '--dry_run'])
  assert rc == 0 and [line.split()[2] for line in out] == ['w=int4,a=int4,seed=0', 'w=int4,a=int4,seed=1'], out
  rc, out = _sweep(args + ['--only=a=int4'])
  assert rc == 0 and any(line.startswith('tally: 2 done, 2 skipped, 0 failed') for line in out), out
  assert any('not selected by --only: w=int8,a=int8,seed=0, w=int8,a=int8,seed=1' in line for line in out), out
  assert not os.path.exists(os.path.join(root, 'w=int8,a=int8,seed=0', 'result.json'))
  rc, out = _sweep(args)  # without --only the rest runs, the finished ones are kept
  assert rc == 0 and any(line.startswith('tally: 2 done, 2 skipped, 0 failed') for line in out), out
  with pytest.raises(config_cli.ConfigError, match='needs a regular expression'):
    _sweep(args + ['--only='])


def test_manifest_forgets_trials_dropped_from_the_config_before_they_ran(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  os.makedirs(root)
  trials = sweeps.expand(*config_cli.load_module(fake_cfg), root)
  sweep.write_manifest(root, fake_cfg, [], trials, ['eval/accuracy'])
  os.makedirs(trials[3].workdir(root))  # this one started; trials[2] never did
  sweep.write_manifest(root, fake_cfg, [], trials[:2], ['eval/accuracy'])  # the config now sweeps only int8
  listed = [t['name'] for t in json.load(open(os.path.join(root, 'sweep.json')))['trials']]
  assert listed == [trials[0].name, trials[1].name, trials[3].name]


# ------------------------------------------------------------------------------ failures, retry, crashes


def test_failing_trial_is_recorded_and_retried_alone(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  bad = 'w=int4,a=int4,seed=0'
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=2',
          '--start_method=spawn']
  rc, out = _sweep(args + [f'--config.fail={bad}'])
  assert rc == 1
  assert any(line.startswith('tally: 3 done, 0 skipped, 1 failed') for line in out), out
  err = json.load(open(os.path.join(root, bad, 'error.json')))
  assert err['type'] == 'ValueError' and 'injected failure' in err['message'] and 'Traceback' in err['traceback']
  assert not os.path.exists(os.path.join(root, bad, 'result.json'))
  # A plain rerun runs nothing: finished ones are kept, the failed one waits for --retry_failed.
  rc, out = _sweep(args + [f'--config.fail={bad}'])
  assert rc == 0 and any(line.startswith('tally: 0 done, 4 skipped') for line in out), out
  rc, out = _sweep(args + [f'--config.fail={bad}', '--retry_failed'])
  assert rc == 1  # still failing (it resumed from its checkpoint at 3)
  open(os.path.join(root, bad, 'healed'), 'w').close()  # what fixes it is outside its config
  rc, out = _sweep(args + [f'--config.fail={bad}', '--retry_failed'])
  assert rc == 0 and any(line.startswith('tally: 1 done, 3 skipped, 0 failed') for line in out), out
  assert not os.path.exists(os.path.join(root, bad, 'error.json'))
  assert _runs(root, bad) == 3 and _steps(root, bad) == [1, 2, 3]
  for t in sweeps.expand(*config_cli.load_module(fake_cfg), root):
    if t.name != bad:
      assert _runs(root, t.name) == 1 and _steps(root, t.name) == [1, 2, 3]
  report = open(os.path.join(root, 'report.md')).read()
  assert '| int4 | int4 | 2 |' in report


def test_rerun_with_changed_overrides_is_refused_then_rerun_on_request(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1']
  assert _sweep(args)[0] == 0
  assert not os.path.exists(os.path.join(root, sweep.REPLACED))  # made only when something moves there
  manifest = open(os.path.join(root, 'sweep.json')).read()
  with pytest.raises(config_cli.ConfigError, match=r'(?s)4 trial\(s\).*w=int8,a=int8,seed=0: steps.*--rerun_changed'):
    _sweep(args + ['--config.steps=4'])
  assert open(os.path.join(root, 'sweep.json')).read() == manifest  # nothing relabelled
  rc, out = _sweep(args + ['--config.steps=4', '--dry_run'])
  assert rc == 0 and all(line.split()[3] == 'changed' for line in out), out
  names = [t.name for t in sweeps.expand(*config_cli.load_module(fake_cfg), root)]
  assert all(_steps(root, n) == [1, 2, 3] for n in names)
  rc, out = _sweep(args + ['--config.steps=4', '--rerun_changed'])
  assert rc == 0 and any(line.startswith('tally: 4 done, 0 skipped') for line in out), out
  assert all(_steps(root, n) == [1, 2, 3, 4] for n in names)
  kept = os.listdir(os.path.join(root, sweep.REPLACED))  # the old runs, moved aside, not deleted
  assert sorted(k.rsplit('-', 2)[0] for k in kept) == sorted(names)
  assert all(json.load(open(os.path.join(root, sweep.REPLACED, k, 'result.json')))['config']['steps'] == 3
             for k in kept)
  assert _sweep(args + ['--config.steps=4'])[0] == 0  # now the same config: finished, skipped


def test_keys_the_stored_runs_predate_are_adopted_on_request(fake_cfg, tmp_path):
  """A run made before an option existed (its stored config lacks the key) is 'changed' for the sweep; with
  --adopt_new_keys the key's current value is written into the stored config and logged, and the run is kept. A
  run that also differs in a value it had is not adopted."""
  root = str(tmp_path / 'root')
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1']
  assert _sweep(args)[0] == 0
  names = [t.name for t in sweeps.expand(*config_cli.load_module(fake_cfg), root)]
  for n in names:  # an older version of the code had no `steps` option
    path = os.path.join(root, n, 'result.json')
    r = json.load(open(path))
    del r['config']['steps']
    json.dump(r, open(path, 'w'))
  with pytest.raises(config_cli.ConfigError, match=r'(?s)steps.*a key the stored runs predate.*--adopt_new_keys'):
    _sweep(args)
  with pytest.raises(config_cli.ConfigError, match=r'(?s)4 trial\(s\)') as e:  # a command-line choice: never
    _sweep(args + ['--config.steps=4', '--adopt_new_keys'])                   # taken to be what they ran
  assert 'predate' not in str(e.value)
  assert 'steps' not in json.load(open(os.path.join(root, names[0], 'result.json')))['config']
  rc, out = _sweep(args + ['--adopt_new_keys'])
  assert rc == 0 and any(line.startswith('tally: 0 done, 4 skipped') for line in out), out
  assert any('adopted the new config keys into 4 stored run(s)' in line for line in out)
  for n in names:
    assert json.load(open(os.path.join(root, n, 'result.json')))['config']['steps'] == 3
    log = json.load(open(os.path.join(root, n, 'adopted_keys.json')))
    assert [e['keys'] for e in log] == [{'steps': 3}]
    assert _steps(root, n) == [1, 2, 3]  # nothing ran again


def test_a_truncated_result_is_not_finished_for_the_sweep_and_the_report(fake_cfg, tmp_path, capsys):
  from experiments.review import results  # noqa: PLC0415
  root = str(tmp_path / 'root')
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1']
  assert _sweep(args)[0] == 0
  cut = 'w=int4,a=int4,seed=1'
  path = os.path.join(root, cut, 'result.json')
  text = open(path).read()
  open(path, 'w').write(text[:len(text) // 2])  # a disk that filled up mid-write
  capsys.readouterr()
  status = {t['name']: t['status'] for t in results.load_trials(root)[0]}
  assert status[cut] == 'not run' and list(status.values()).count('done') == 3
  assert f'warning: {path} is not a valid result' in capsys.readouterr().err
  rc, out = _sweep(args)
  assert rc == 0 and any(line.startswith('tally: 1 done, 3 skipped') for line in out), out
  assert json.load(open(path))['metrics'] and _runs(root, cut) == 2


def test_a_trial_starting_from_a_changed_trial_counts_as_changed(tmp_path):
  root = str(tmp_path)
  module, arg = config_cli.load_module(os.path.join(REPO, 'configs/quickstart.py:runlocal'))
  trials = sweeps.expand(module, arg, root)
  for t in trials:  # every trial finished with the config it has now, except the float one
    stored = config_cli.to_dict(t.config)
    if t.name == 'mode=float':
      stored['num_train_steps'] += 1
    fileio.write_json_atomic(os.path.join(root, t.name, 'result.json'), {'config': stored})
  changed = sweep.changed_trials(trials, trials, root)
  assert changed['mode=float'] == ['num_train_steps']
  assert sorted(changed) == ['mode=float'] + sorted(t.name for t in trials if t.name.startswith('mode=ptq'))
  assert changed['mode=ptq,bits=w8a8'] == ['(starts from mode=float)']


def test_dead_worker_fails_its_trial_only(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  crash = 'w=int8,a=int8,seed=1'
  rc, out = _sweep([f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=2',
                    '--start_method=spawn', f'--config.crash={crash}', '--config.sleep=0.2'])
  assert rc == 1
  assert any(line.startswith('tally: 3 done, 0 skipped, 1 failed') for line in out), '\n'.join(out)
  err = json.load(open(os.path.join(root, crash, 'error.json')))
  assert 'exit code 3' in err['message']
  for t in sweeps.expand(*config_cli.load_module(fake_cfg), root):
    if t.name != crash:
      assert os.path.exists(os.path.join(root, t.name, 'result.json'))
      assert _steps(root, t.name) == [1, 2, 3]



def test_trials_use_the_users_compilation_cache_where_set(fake_cfg, tmp_path, monkeypatch):
  from experiments.sweeps import launch
  root = str(tmp_path / 'root')
  trials = sweeps.expand(*config_cli.load_module(fake_cfg), root)
  task = lambda: launch.make_task(trials[0], trials, root, 'test_sweep:fake_trial', retry=False)
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'mine'))
  assert task().cache_dir == str(tmp_path / 'mine')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  assert task().cache_dir == os.path.join(root, '.jax_cache')


def _task(root, name, index, **kw):
  from experiments.sweeps.trials import Task
  config = {'seed': 0, 'mode': 'qat', 'steps': 2, 'sleep': 0.0, 'fail': '', 'crash': '', 'init_from': '',
            'quant': {'weight': {'format': 'int8'}, 'act': {'format': 'int8'}}}
  return Task(index=index, name=name, id=name, root=root, group=name, config=config,
              trial_fn='test_sweep:fake_trial', cache_dir=os.path.join(root, '.jax_cache'), **kw)


def test_a_trial_waits_for_the_trial_it_starts_from_while_another_process_runs_it(tmp_path):
  from experiments.sweeps import trials
  root = str(tmp_path / 'root')
  dep = _task(root, 'mode=float', 0)
  task = _task(root, 'mode=ptq', 1, deps=(dep,))
  code = (f'import os, sys, time; sys.path[:0] = [{TESTS!r}]; from experiments.fileio import Claim; '
          f'import ml_collections, test_sweep; c = Claim.acquire({dep.workdir!r}); print(c is not None, flush=True); '
          f'time.sleep(1.5); test_sweep.fake_trial(ml_collections.ConfigDict({dep.config!r}), {dep.workdir!r}); '
          'c.release()')
  holder = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'True'
    out = trials.run_trial(task)
  finally:
    holder.kill()
    holder.wait()
  assert out.status == 'done', out
  assert open(os.path.join(dep.workdir, 'runs.txt')).read().count('start') == 1  # run by the holder only
  assert fileio.read_result(dep.workdir) is not None and _runs(root, 'mode=ptq') == 1


def test_a_failed_trial_it_starts_from_fails_the_trial_with_its_reason(tmp_path):
  from experiments.sweeps import trials
  root = str(tmp_path / 'root')
  dep = _task(root, 'mode=float', 0)
  dep = dataclasses.replace(dep, config={**dep.config, 'fail': 'mode=float'})
  out = trials.run_trial(_task(root, 'mode=ptq', 1, deps=(dep,)))
  assert out.status == 'failed' and 'DependencyFailed' in out.error and 'injected failure' in out.error
  out = trials.run_trial(_task(root, 'mode=qat', 2, deps=(dep,)))  # the failed float trial is not rerun unasked
  assert out.status == 'failed' and '--retry_failed' in out.error
  assert _runs(root, 'mode=float') == 1
  assert not any(os.path.exists(os.path.join(root, n, 'runs.txt')) for n in ('mode=ptq', 'mode=qat'))


# ----------------------------------------------------------------------------------- kills and concurrency


def _popen(args):
  return subprocess.Popen([sys.executable, '-m', 'experiments.sweep', *args], cwd=REPO, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(cond, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if cond():
      return
    time.sleep(0.1)
  raise AssertionError(f'timed out waiting for {what}')


def _group_gone(pgid):
  try:
    os.killpg(pgid, 0)
  except ProcessLookupError:
    return True
  return False


def test_resume_after_the_sweep_is_killed(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  names = [t.name for t in sweeps.expand(*config_cli.load_module(fake_cfg), root)]
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1',
          '--config.sleep=0.3', '--config.steps=5']
  proc = _popen(args)
  try:
    done = lambda n: os.path.exists(os.path.join(root, n, 'result.json'))  # noqa: E731
    mid = lambda: os.path.exists(os.path.join(root, names[2], 'ckpt.json'))  # noqa: E731
    _wait_for(lambda: done(names[0]) and done(names[1]) and mid(), 120, 'two trials and a step of the third')
    os.kill(proc.pid, signal.SIGKILL)  # the sweep only: its worker must notice and exit by itself
    proc.wait(timeout=10)
    _wait_for(lambda: not Claim.is_held(os.path.join(root, names[2])), 20, 'the orphaned worker to exit')
    _wait_for(lambda: _group_gone(proc.pid), 30, 'every process of the killed sweep to exit')
  finally:
    if not _group_gone(proc.pid):  # only on failure: end what is left of the sweep this test started
      os.killpg(proc.pid, signal.SIGKILL)
  assert not done(names[2]) and not os.path.exists(os.path.join(root, names[3]))
  rc, out = _sweep(args)
  assert rc == 0 and any(line.startswith('tally: 2 done, 2 skipped, 0 failed') for line in out), out
  for n in names:  # no trial lost, none run twice, no step run twice
    assert done(n) and _steps(root, n) == [1, 2, 3, 4, 5], n
  assert [_runs(root, n) for n in names] == [1, 1, 2, 1]


def test_claims_exclude_other_processes_and_die_with_them(tmp_path):
  workdir = str(tmp_path / 'trial')
  claim = Claim.acquire(workdir)
  assert claim is not None and Claim.acquire(workdir) is None and Claim.is_held(workdir)
  assert f'pid {os.getpid()}' in Claim.holder(workdir)
  claim.release()
  assert not Claim.is_held(workdir)
  code = f'from experiments.fileio import Claim; c = Claim.acquire({workdir!r}); ' \
         'print(c is not None, flush=True); import time; time.sleep(60)'
  holder = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'True'
    assert Claim.acquire(workdir) is None and f'pid {holder.pid}' in Claim.holder(workdir)
  finally:
    holder.kill()
    holder.wait()
  claim = Claim.acquire(workdir)  # the kernel released the dead holder's claim: never stale
  assert claim is not None
  claim.release()


def test_a_report_probing_the_claim_never_turns_a_starting_run_away(tmp_path):
  """`Claim.is_held` (the report's "running?") takes the lock for an instant; a run whose acquire fell in that
  instant was refused as if another run held its workdir."""
  import fcntl
  import threading
  workdir = str(tmp_path / 'trial')
  os.makedirs(workdir)
  probe = os.open(os.path.join(workdir, '.claim'), os.O_RDONLY | os.O_CREAT)
  fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a probe in flight (a slow one: 0.1 s)
  threading.Timer(0.1, lambda: fcntl.flock(probe, fcntl.LOCK_UN)).start()
  try:
    claim = Claim.acquire(workdir)
    assert claim is not None and f'pid {os.getpid()}' in Claim.holder(workdir)
    assert Claim.is_held(workdir) and f'pid {os.getpid()}' in Claim.holder(workdir)  # the probe wrote nothing
    claim.release()
  finally:
    os.close(probe)
  assert not Claim.is_held(workdir)
  assert not Claim.is_held(str(tmp_path / 'x')) and not os.path.exists(tmp_path / 'x')  # the probe makes nothing


def test_a_waiting_claim_blocks_until_the_holder_is_done(tmp_path):
  """What a trial waiting for its trial_ref, or a PTQ run waiting for its shared float model, relies on."""
  workdir = str(tmp_path / 'float')
  code = f'from experiments.fileio import Claim; c = Claim.acquire({workdir!r}); ' \
         'print(c is not None, flush=True); import time; time.sleep(1.5); open(' \
         f'{os.path.join(workdir, "done")!r}, "w").close(); c.release()'
  holder = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'True'
    assert Claim.acquire(workdir) is None
    claim = Claim.acquire(workdir, wait=True)
    assert claim is not None and os.path.exists(os.path.join(workdir, 'done'))  # it waited for the holder's work
    claim.release()
  finally:
    holder.kill()
    holder.wait()


def test_two_sweeps_on_one_root_run_each_trial_once(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  args = [f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1',
          '--config.sleep=0.4', '--config.steps=3']
  procs = [_popen(args), _popen(args)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  tallies = [next(line for line in o.splitlines() if line.startswith('tally:')) for o in outs]
  done = [int(t.split()[1]) for t in tallies]
  assert sum(done) == 4 and all('0 failed' in t for t in tallies), tallies
  for t in sweeps.expand(*config_cli.load_module(fake_cfg), root):
    assert _runs(root, t.name) == 1 and _steps(root, t.name) == [1, 2, 3]


# -------------------------------------------------------------------------------------------- TensorBoard


def _post(url, path, body):
  req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method='POST',
                               headers={'Content-Type': 'application/json', 'X-XSRF-Protected': '1'})
  with urllib.request.urlopen(req, timeout=20) as r:
    return json.load(r)


def test_tensorboard_lists_trials_with_swept_hparams_and_groups_seeds(fake_cfg, tmp_path):
  root = str(tmp_path / 'root')
  rc, out = _sweep([f'--config={fake_cfg}', f'--root={root}', '--trial_fn=test_sweep:fake_trial', '--workers=1',
                    '--start_method=spawn'])
  assert rc == 0, out
  assert out[-1] == f'TensorBoard: python -m experiments.board {root}'
  url, server = board.start(root, host='127.0.0.1', port=0, timeout=90, reload_interval=1)
  try:
    assert url.startswith('http://127.0.0.1:')
    experiment = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not experiment.get('hparamInfos'):
      experiment = _post(url, 'data/plugin/hparams/experiment', {'experimentName': ''})
      time.sleep(0.5)
    infos = {i['name']: i for i in experiment['hparamInfos']}
    assert set(infos) == {'quant.weight.format', 'quant.act.format'}
    assert infos['quant.weight.format']['domainDiscrete'] == ['int4', 'int8']
    assert [m['name']['tag'] for m in experiment['metricInfos']] == ['eval/accuracy', 'serving/bytes',
                                                                     'serving/int8_matmuls']
    request = {'experimentName': '', 'startIndex': 0, 'sliceSize': 1000,
               'allowedStatuses': ['STATUS_FAILURE', 'STATUS_RUNNING', 'STATUS_SUCCESS', 'STATUS_UNKNOWN'],
               'colParams': [{'hparam': 'quant.weight.format'}, {'hparam': 'quant.act.format'},
                             {'metric': {'tag': 'eval/accuracy', 'group': ''}}]}
    groups = _post(url, 'data/plugin/hparams/session_groups', request)
    assert groups['totalSize'] == 2  # 4 trials, 2 configurations: the seeds are repeats
    by_w = {g['hparams']['quant.weight.format']: g for g in groups['sessionGroups']}
    assert set(by_w) == {'int8', 'int4'}
    for w, g in by_w.items():
      assert 'seed' not in g['hparams']
      assert sorted(s['name'] for s in g['sessions']) == [f'w={w},a={w},seed=0', f'w={w},a={w},seed=1']
      mean = {'int8': 0.905, 'int4': 0.805}[w]
      assert g['metricValues'][0]['value'] == pytest.approx(mean, abs=1e-5)
      assert g['name'] == tb.group_name_for(json.load(open(os.path.join(root, g['sessions'][0]['name'],
                                                                        'result.json')))['config'])
    tags = tb.read_tags(root)
    assert {'pareto/accuracy_vs_weight_bits', 'pareto/accuracy_vs_serving_bytes'} <= tags['images']
  finally:
    server.stop()


# ------------------------------------------------------------------------------------------ real runner


RUNNER_CONFIG = '''
import os
from experiments.config import cli as config_cli
from experiments import sweeps

def get_config(arg=None):
  c = config_cli.load_file(os.path.join({repo!r}, 'configs/fmnist_cnn.py:runlocal'))
  c.num_train_steps, c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 2, 1, 2, 2
  c.eval_examples, c.quant.calibration_batches, c.quant_summaries = 125, 1, False
  return c

def get_sweep(arg=None):
  return sweeps.chain(
      sweeps.axis('mode', {{'float': {{'mode': 'float'}}}}),
      sweeps.axis('mode', {{'ptq': {{'mode': 'ptq', 'init_from': sweeps.trial_ref('mode=float')}}}}))
'''


def test_real_runner_ptq_from_the_float_trial(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')  # the default: the trials' cache in the root (tests set one)
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(RUNNER_CONFIG.format(repo=REPO))
  root = str(tmp_path / 'root')
  rc, out = _sweep([f'--config={cfg}', f'--root={root}', '--workers=2'])
  assert rc == 0, out
  text = '\n'.join(out)
  assert 'running 2 on 2 worker process(es) (forkserver)' in text
  assert text.index('done   mode=float') < text.index('start  mode=ptq')  # the PTQ trial waited for it
  ptq = json.load(open(os.path.join(root, 'mode=ptq', 'result.json')))
  assert ptq['config']['init_from'] == os.path.join(root, 'mode=float') and ptq['matmuls']['int8'] > 0
  assert not os.path.exists(os.path.join(root, '_pretrained'))  # no second float training
  assert os.listdir(os.path.join(root, '.jax_cache'))  # the shared persistent compilation cache
  assert 'resuming' not in open(os.path.join(root, 'mode=ptq', 'train.log')).read()
  rows = open(os.path.join(root, 'results.csv')).read().splitlines()
  assert len(rows) == 3 and rows[0].startswith('mode,seeds,weight_bits,accuracy_mean')
  _check_review_in_tensorboard(root)
  rc, out = _sweep([f'--config={cfg}', f'--root={root}'])
  assert rc == 0 and any(line.startswith('tally: 0 done, 2 skipped') for line in out)


def _check_review_in_tensorboard(root):
  """Through TensorBoard's HTTP API (what its browser UI reads): session groups named by the sweep's labels with
  the serving metrics, the Pareto images and the runs' scalars."""
  url, server = board.start(root, host='127.0.0.1', port=0, timeout=90, reload_interval=1)
  try:
    experiment, deadline = {}, time.monotonic() + 60
    while time.monotonic() < deadline and not experiment.get('metricInfos'):
      experiment = _post(url, 'data/plugin/hparams/experiment', {'experimentName': ''})
      time.sleep(0.5)
    tags = [m['name']['tag'] for m in experiment['metricInfos']]
    serving = ['serving/accuracy', 'serving/loss', 'serving/bytes', 'serving/latency_vs_float', 'serving/int8_matmuls']
    assert tags[:2] == ['eval/accuracy', 'eval/loss'] and set(serving) <= set(tags), tags
    request = {'experimentName': '', 'startIndex': 0, 'sliceSize': 100,
               'allowedStatuses': ['STATUS_FAILURE', 'STATUS_RUNNING', 'STATUS_SUCCESS', 'STATUS_UNKNOWN'],
               'colParams': [{'metric': {'tag': t, 'group': ''}} for t in tags]}
    groups = _post(url, 'data/plugin/hparams/session_groups', request)['sessionGroups']
    assert sorted(g['name'] for g in groups) == ['mode=float', 'mode=ptq']  # the sweep's labels, not hashes
    ptq = next(g for g in groups if g['name'] == 'mode=ptq')
    values = {v['name']['tag']: v['value'] for v in ptq['metricValues']}
    assert values['serving/int8_matmuls'] > 0 and 0 < values['serving/latency_vs_float']
    assert 0 <= values['serving/accuracy'] <= 1 and values['serving/bytes'] > 0
    images = json.load(urllib.request.urlopen(f'{url}data/plugin/images/tags', timeout=30))
    assert any(t.startswith('pareto/') for run in images.values() for t in run), images
    scalars = json.load(urllib.request.urlopen(f'{url}data/plugin/scalars/tags', timeout=30))
    assert 'eval/accuracy' in scalars.get('mode=float', {}) and 'serving/bytes' in scalars.get('mode=ptq', {})
    _check_review_in_a_browser(url)
  finally:
    server.stop()


def _check_review_in_a_browser(url):
  """A real browser (headless Chromium, installed by .ci/run) loads TensorBoard's page and runs its JavaScript:
  the rendered DOM lists the dashboards the review uses (hparams, images, scalars), as a person would see them.
  Skipped where Chromium is not installed (the HTTP API checks above still ran)."""
  chromium = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
  if chromium is None:
    pytest.skip('no Chromium on PATH (.ci/run installs it): the review was checked through the HTTP API only')
  out = subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=20000',
                        '--dump-dom', f'{url}#hparams'], capture_output=True, text=True, timeout=180)
  assert out.returncode == 0, out.stderr[-2000:]
  text = re.sub(r'\s+', ' ', re.sub(r'<[^>]+>', ' ', re.sub(r'<(style|script)\b.*?</\1>', ' ', out.stdout,
                                                                 flags=re.S)))
  for dashboard in ('hparams', 'images', 'scalars'):
    assert dashboard in text, text[:2000]


# ------------------------------------------------------------------------------------------------- Ray


@pytest.mark.skipif(importlib.util.find_spec('ray') is None,
                    reason="ray is not installed (pip install 'ray[default]'); the executor then exits 3 saying so")
def test_ray_executor_runs_a_two_trial_sweep(tmp_path, monkeypatch):
  monkeypatch.setenv('PYTHONPATH', ENV['PYTHONPATH'])
  monkeypatch.setenv('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER', '0')
  ray_cfg = tmp_path / 'two.py'
  ray_cfg.write_text(FAKE_CONFIG.replace("sweeps.product(bits, sweeps.axis('seed', [0, 1]))", 'bits'))
  rc, out = _sweep([f'--config={ray_cfg}', f'--root={tmp_path / "ray"}', '--trial_fn=test_sweep:fake_trial',
                    '--executor=ray', '--workers=2'])
  assert rc == 0, out
  assert any('on Ray (local, 127.0.0.1, 2 CPUs)' in line for line in out), out
  assert any(line.startswith('tally: 2 done, 0 skipped, 0 failed') for line in out), out
  for name in ('w=int8,a=int8', 'w=int4,a=int4'):
    assert os.path.exists(tmp_path / 'ray' / name / 'result.json')


def test_ray_missing_is_a_clear_error(fake_cfg, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'ray', None)  # import ray -> ImportError
  with pytest.raises(sweep.SweepError, match=r"pip install 'ray\[default\]'"):
    _sweep([f'--config={fake_cfg}', f'--root={tmp_path}', '--executor=ray', '--trial_fn=test_sweep:fake_trial'])


def test_cli_exit_codes(fake_cfg, tmp_path):
  bad = subprocess.run([sys.executable, '-m', 'experiments.sweep', f'--config={fake_cfg}'], cwd=REPO, env=ENV,
                       capture_output=True, text=True)
  assert bad.returncode == 2 and 'missing --root' in bad.stderr
  code = textwrap.dedent(f'''
      import sys; sys.modules['ray'] = None
      from experiments import sweep; sys.exit(sweep.main(['--config={fake_cfg}', '--root={tmp_path}',
                                                         '--executor=ray', '--trial_fn=test_sweep:fake_trial']))''')
  ray_missing = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=ENV, capture_output=True, text=True)
  assert ray_missing.returncode == 3 and 'needs Ray' in ray_missing.stderr
  not_a_run = subprocess.run([sys.executable, '-m', 'experiments.sweep', f'--config={fake_cfg}', f'--root={tmp_path}'],
                             cwd=REPO, env=ENV, capture_output=True, text=True)
  assert not_a_run.returncode == 2 and "lacks 'optimizer'" in not_a_run.stderr and 'Traceback' not in not_a_run.stderr


def test_results_fmnist_keeps_the_first_and_last_layers_at_8_bits_in_its_low_bit_qat_trials():
  module, arg = config_cli.load_module(os.path.join(REPO, 'configs/results_fmnist.py'))
  trials = sweeps.expand(module, arg, '/tmp/rf')
  kept = {t.name for t in trials if t.config.quant.first_last_8bit}
  low_bit_qat = {t.name for t in trials if t.config.mode == 'qat' and t.config.quant.weight.format != 'int8'}
  assert low_bit_qat and kept == low_bit_qat  # PTQ's per-channel vs per-tensor study quantizes every layer


def test_get_sweep_errors_are_not_swallowed():
  """A TypeError inside a user's get_sweep(arg) surfaces as itself (it used to be retried as get_sweep())."""
  import types

  from experiments import sweeps

  def broken(arg=None):
    return sweeps.axis('seed', [0, 1]) + 1   # a bug in the user's function
  with pytest.raises(TypeError):
    sweeps.get_sweep(types.SimpleNamespace(get_sweep=broken), None)
  no_arg = types.SimpleNamespace(get_sweep=lambda: sweeps.product(sweeps.axis('seed', [0, 1])))
  assert len(sweeps.get_sweep(no_arg, None).points) == 2


def test_the_swish_estimator_study_builds_swish_lenets_and_a_bad_activation_fails_before_any_trial(tmp_path):
  import jax
  import jax.numpy as jnp

  from experiments import models
  from experiments.training import runner
  module, _ = config_cli.load_module(os.path.join(REPO, 'configs/study_estimators.py'))
  trials = sweeps.expand(module, 'activation=swish,runlocal', str(tmp_path))
  assert {t.config.model.activation for t in trials} == {'swish'}
  assert {t.labels['estimator'] for t in trials if 'estimator' in t.labels} == {'ste', 'lsq', 'lsq_plus'}
  x = jax.random.normal(jax.random.key(0), (2, 28, 28))
  nets = {a: models.build(ml_collections.ConfigDict({'name': 'lenet5', 'activation': a})).module
          for a in ('relu', 'swish')}
  params = nets['relu'].init(jax.random.key(1), x)
  ys = {a: m.apply(params, x) for a, m in nets.items()}  # the same params: only the activation differs
  assert ys['relu'].shape == ys['swish'].shape and not jnp.allclose(ys['relu'], ys['swish'])
  bad = trials[0].config.copy_and_resolve_references()
  bad.model.activation = 'swsh'
  with pytest.raises(config_cli.ConfigError, match=r"config.model: LeNet5 activation='swsh': expected one of relu, "
                                                   r"swish, gelu"):
    runner.validate(bad)


def test_the_resnet_ptq_results_config_builds_its_last_trial_from_the_resnet_float_trial(tmp_path):
  """configs/results_ptq_fmnist.py:model=resnet is the CNN's sweep on the ResNet (whose PTQ runs end to end in
  tests/test_ptq_runner.py): its last trial with activations validates and starts from the ResNet's float trial;
  so do its BatchNorm-folding trials, 8 folded, 6 unfolded (the unfolded per-channel int4 ones are the method x
  w trials) and 4 folded and equalized."""
  from experiments.training import runner  # noqa: PLC0415
  trials = sweeps.expand(*config_cli.load_module(os.path.join(REPO, 'configs/results_ptq_fmnist.py:model=resnet,'
                                                                     'runlocal')), str(tmp_path))
  last = [t for t in trials if t.config.quant.act.format == 'int8'][-1]
  runner.validate(last.config)
  assert last.config.mode == 'ptq' and last.config.model.name == 'resnet'
  assert [trials[d].config.mode for d in last.deps] == ['float'] and trials[last.deps[0]].config.model.name == 'resnet'
  fold = [t for t in trials if 'fold' in t.labels]
  assert len(fold) == 18 and sum(t.config.ptq.fold_batchnorm for t in fold) == 12
  assert sum(t.config.ptq.equalize for t in fold) == 4
  assert {(t.config.quant.weight.granularity, t.config.quant.weight.format) for t in fold} == {
      (g, f) for g in ('per_channel', 'per_tensor') for f in ('int8', 'int4')}
  runner.validate(fold[-1].config)
  assert [trials[d].config.mode for d in fold[-1].deps] == ['float']


def test_the_resnet_estimator_study_keeps_stem_and_head_float_and_names_the_models_on_a_typo(tmp_path):
  module, _ = config_cli.load_module(os.path.join(REPO, 'configs/study_estimators.py'))
  trials = sweeps.expand(module, 'model=resnet,seeds=2', str(tmp_path))
  qat = [t for t in trials if t.config.mode == 'qat']
  assert len(qat) == 8 * 3 * 2 and {t.config.model.name for t in trials} == {'resnet'}
  order = list(dict.fromkeys(t.labels['estimator'] for t in qat))  # the contrasts the literature reports first
  assert order == ['ste', 'clipped_ste', 'lsq', 'ewgs', 'pact', 'lsq_plus', 'dsq', 'qdrop']
  # first_last_8bit would put the first and last *block* convs at 8 bits: the stem and head are already float.
  assert {(t.config.quant.float_layers, t.config.quant.first_last_8bit) for t in qat} == {('stem|head', False)}
  assert {t.config.num_train_steps for t in qat} == {500} and trials[0].config.num_train_steps == 4000
  from experiments.training import runner
  for t in qat[::6]:  # each estimator's rules build (the runlocal run of the LeNet-5 study runs one end to end)
    runner.validate(t.config)
  lenet = sweeps.expand(module, None, str(tmp_path))
  assert {t.config.quant.first_last_8bit for t in lenet} == {True}
  with pytest.raises(config_cli.ConfigError, match=r"model='resnt': expected one of cnn, resnet"):
    sweeps.expand(module, 'model=resnt', str(tmp_path))


@pytest.mark.parametrize('spec', ['results_fmnist.py', 'results_mnist.py', 'results_charlm.py', 'results_ptq_fmnist.py',
                                  'results_ptq_charlm.py', 'study_estimators.py',
                                  'study_estimators.py:activation=swish'])
def test_each_results_config_runs_its_last_trial_in_runlocal_mode(spec, tmp_path):
  """The last trial of every results config (a quantized run, which starts from its float trial) on the fixtures:
  the config, its sweep, the trial_ref and the runner agree before anyone spends hours on the full sweep."""
  name, _, arg = spec.partition(':')
  arg = ','.join(filter(None, [arg, 'runlocal']))
  trials = sweeps.expand(*config_cli.load_module(os.path.join(REPO, 'configs', f'{name}:{arg}')), str(tmp_path))
  last = trials[-1]
  rc, out = _sweep([f'--config={os.path.join(REPO, "configs", name)}:{arg}', f'--root={tmp_path}',
                    f'--index={last.index}'])
  assert rc == 0, '\n'.join(out)
  result = fileio.read_result(os.path.join(str(tmp_path), last.name))
  assert result is not None and result['config']['mode'] == last.config.mode != 'float'
  assert any(k in result['metrics'] for k in ('eval/accuracy', 'eval/loss'))
  for d in last.deps:  # its float model was made first, by the same command
    assert fileio.read_result(os.path.join(str(tmp_path), trials[d].name)) is not None
