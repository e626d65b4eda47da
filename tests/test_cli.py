"""Every command line (data, train, sweep, report, board, bench) as a person meets it: a mistake is one `error:`
line and a non-zero exit without a traceback (--debug or QJAX_DEBUG=1 shows it), and --help lists the flags."""

import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import sweep as sweep_cmd
from experiments.config import cli as config_cli
from experiments.sweeps import launch as sweep
from experiments.training import checkpoints as ckpt_lib
from experiments.training import progress
from experiments.training import runner as train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
ENV.pop('QJAX_DEBUG', None)


def cli(module, *args, env=None, timeout=300):
  return subprocess.run([sys.executable, '-m', f'experiments.{module}', *args], cwd=ROOT, capture_output=True,
                        text=True, env={**ENV, **(env or {})}, timeout=timeout)


def assert_one_error_line(r, *expected):
  assert r.returncode not in (0, None), r
  assert 'Traceback' not in r.stderr, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, r.stderr
  for text in expected:
    assert text in r.stderr, r.stderr


def test_user_errors_of_every_command_are_one_line(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = [
      (('train', '--config=configs/fmnist_cnn.py:runlocal', f'--workdir={a_file}'), 'is a file, not a directory'),
      (('train', '--config=configs/fmnist_cnn.py:runlocal', '--workdir=/proc/qjax-not-writable'),
       'cannot write there'),
      (('train', '--config=configs/fmnist_cnn.py:runlocal', f'--workdir={tmp_path}/w', '--config.mode=qat',
        '--config.quant.act.granularity=per_row'), "config.quant.act: granularity='per_row'"),
      (('train', '--config=configs/fmnist_cnn.py:runlocal', f'--workdir={tmp_path}/w', '--config.mode=qta'),
       "did you mean 'qat'"),
      (('sweep', '--config=configs/quickstart.py:runlocal', f'--root={tmp_path}/r', '--workers=abc'),
       '--workers=abc: expected a positive integer'),
      (('sweep', '--config=configs/quickstart.py:seeds=abc', f'--root={tmp_path}/r'),
       "--config=configs/quickstart.py:seeds=abc: config arg 'seeds=abc': expected seeds=<int>"),
      (('sweep', '--config=configs/quickstart.py:runlocal', f'--root={a_file}'), 'is a file'),
      (('report', str(tmp_path / 'nope')), 'no such sweep root'),
      (('board', str(tmp_path / 'nope')), 'no such logdir'),
      (('board', str(tmp_path), '--port=abc'), "invalid int value: 'abc'"),
      (('data', 'fetch', 'fashion_mnsit'), "did you mean 'fashion_mnist'?"),
      (('bench', '--config=configs/bench_fake_quant.py:runlocal', f'--workdir={a_file}'), 'is a file'),
  ]
  for args, text in cases:
    assert_one_error_line(cli(*args), text)
  assert not os.path.exists(tmp_path / 'w') and not os.path.exists(tmp_path / 'r')  # refused before any work


def test_a_config_that_is_not_a_python_file_is_one_line(tmp_path):
  """--config=README.md was an AttributeError traceback (importlib has no loader for it)."""
  with pytest.raises(config_cli.ConfigError, match=r'^--config=README.md: README.md is not a Python config file'):
    train.main(['--config=README.md', f'--workdir={tmp_path}/w'])
  with pytest.raises(config_cli.ConfigError, match='is not a Python config file'):
    sweep_cmd.run_sweep(['--config=README.md:runlocal', f'--root={tmp_path}/r'])
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('port', ['99999', '-5'])
def test_a_board_port_out_of_range_is_one_line(tmp_path, capsys, port):
  """It was an OverflowError traceback from TensorBoard's server."""
  from experiments.review import board  # noqa: PLC0415
  assert board.main([str(tmp_path), f'--port={port}']) == 2
  assert capsys.readouterr().err == f'error: --port={port}: expected 0..65535 (0 takes a free port)\n'


def test_a_rule_that_cannot_apply_to_the_model_is_one_line(tmp_path):
  """What the rules can only find out from the model's shapes (here a weight grouping that convolutions do not
  support) is a user's mistake too: one line naming the rule, the module and the op (qjax.flax.RuleError)."""
  r = cli('train', '--config=configs/fmnist_cnn.py:runlocal', f'--workdir={tmp_path}', '--config.mode=qat',
          '--config.quant.weight.granularity=per_group', '--config.quant.weight.group_size=7')
  assert_one_error_line(r, "error: rule 'default' at conv1 (conv): ", 'granularity="per_group" (group_size=7) is '
                        'not supported by quantized convolutions', '(--debug or QJAX_DEBUG=1 shows the traceback)')
  assert r.returncode == 1 and not (tmp_path / 'result.json').exists()


def test_debug_shows_the_traceback(tmp_path):
  args = ('train', '--config=configs/fmnist_cnn.py:runlocal', f'--workdir={tmp_path}', '--config.mode=qta')
  assert 'Traceback' in cli(*args, '--debug').stderr
  assert 'Traceback' in cli(*args, env={'QJAX_DEBUG': '1'}).stderr


def test_dataset_unavailable_offline_prints_the_fix_steps_without_a_traceback(tmp_path):
  r = cli('train', '--config=configs/fmnist_cnn.py:runlocal', '--config.data_source=auto', f'--workdir={tmp_path}',
          env={'QJAX_DATA_OFFLINE': '1', 'QJAX_DATA_DIR': str(tmp_path / 'cache'), 'QJAX_DATA_SOURCE': ''})
  assert_one_error_line(r, "could not get dataset 'fashion_mnist'", 'To get it, do one of:',
                        'unset QJAX_DATA_OFFLINE')


def test_a_full_disk_names_the_path_and_what_was_kept(tmp_path, monkeypatch, capsys):
  save = ckpt_lib.Checkpoints.save

  def save_until_full(self, step, tree):
    if step > 5:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.directory, str(step)))
    save(self, step, tree)

  monkeypatch.setattr(ckpt_lib.Checkpoints, 'save', save_until_full)
  rc = config_cli.main_guard(train.main, train.RunError, argv=[
      '--config=configs/fmnist_mlp.py:runlocal', '--config.num_train_steps=10', '--config.checkpoint_every_steps=5',
      '--config.model.hidden=(8,)', '--config.quant_summaries=false', f'--workdir={tmp_path}'])
  err = capsys.readouterr().err
  assert rc == 1 and 'Traceback' not in err
  assert f'error: No space left on device: {tmp_path}/checkpoints/10; checkpoints up to step 5 are kept' in err


def test_a_full_disk_in_a_sweep_fails_the_trial_and_still_tallies(tmp_path, monkeypatch):
  root = str(tmp_path / 'root')
  cfg = tmp_path / 'one.py'
  cfg.write_text('import ml_collections\n\ndef get_config(arg=None):\n  return ml_collections.ConfigDict({"x": 1})\n')
  write = sweep.fileio.write_json_atomic

  def full_for_errors(path, obj):  # the disk is full by the time the trial's error.json is written
    if path.endswith('error.json'):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    write(path, obj)

  monkeypatch.setattr(sweep.fileio, 'write_json_atomic', full_for_errors)
  out = []
  rc = sweep_cmd.run_sweep([f'--config={cfg}', f'--root={root}', '--index=0', '--trial_fn=test_cli:disk_full_trial'],
                       out=out.append)
  assert rc == 1
  failed = next(line for line in out if ' failed ' in line and 'default' in line)
  assert 'No space left on device' in failed and 'checkpoints so far are kept' in failed, failed
  assert 'error.json not written: No space left on device' in failed and 'see default/error.json' not in failed
  assert any(line.startswith('tally: 0 done, 0 skipped, 1 failed') for line in out), out


def disk_full_trial(config, workdir, log=print):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(workdir, 'checkpoints', '10'))


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tmp_path):
  work = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.train', '--config=configs/fmnist_mlp.py:runlocal',
                           '--config.num_train_steps=20000', '--config.checkpoint_every_steps=1',
                           '--config.eval_every_steps=20000', '--config.quant_summaries=false',
                           '--config.model.hidden=(8,)', f'--workdir={work}'], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          # As from a terminal: SIGINT not ignored, whatever the test runner's worker inherited.
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.monotonic() + 120
    while not any(d.isdigit() for d in os.listdir(work / 'checkpoints')) if (work / 'checkpoints').is_dir() else True:
      assert time.monotonic() < deadline and proc.poll() is None
      time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
      _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, err = proc.communicate()
      pytest.fail(f'no exit 60 s after SIGINT (this process: SIGINT {signal.getsignal(signal.SIGINT)}); '
                  f'stderr ends: {err[-1500:]}')
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130 and 'Traceback' not in err, err
  line = err.strip().splitlines()[-1]
  assert line.startswith('interrupted: checkpoints up to step ') and 'rerun the same command to resume' in line


def test_help_of_every_command_lists_its_flags():
  expected = {'train': ['--workdir', '--config.<key>', '--list_config', '--debug'], 'bench': ['--workdir', '--debug'],
              'sweep': ['--root', '--rerun_changed', '--list_config'], 'data': ['fetch', 'info', '--debug'],
              'report': ['root', '--debug'], 'board': ['--port', '--host', '--debug']}
  for module, flags in expected.items():
    r = cli(module, '--help')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, (module, r.stderr)
    for flag in flags:
      assert flag in r.stdout, (module, flag, r.stdout)


def test_list_config_without_a_config_file_exits_2():
  """It printed its error line but exited 0."""
  r = cli('train', '--list_config')
  assert_one_error_line(r, 'error: --list_config needs --config=<file>')
  assert r.returncode == 2 and r.stdout == ''
  with pytest.raises(config_cli.ConfigError, match='--list_config needs --config'):
    sweep_cmd.run_sweep(['--list_config'], out=lambda s: None)


def test_config_help_lists_every_key_with_value_and_comment():
  r = cli('train', '--config=configs/fmnist_cnn.py', '--config.quant.act.format=int4', '--help')
  assert r.returncode == 0 and '--workdir' in r.stdout
  lines = {line.split('=')[0].strip(): line for line in r.stdout.splitlines() if ' = ' in line}
  assert "'int4'" in lines['quant.act.format'] and '6000' in lines['num_train_steps']  # overrides applied
  assert "# 'auto' (cache, then fetch)" in lines['data_source'] and '# conv channels' in lines['model.features']
  assert len(lines) == len(config_cli.flatten(config_cli.to_dict(config_cli.load_file('configs/fmnist_cnn.py'))))
  only = cli('sweep', '--config=configs/quickstart.py:runlocal', '--list_config')
  assert only.returncode == 0 and only.stdout.lstrip().startswith('batch_size') and 'quant.weight.format' in only.stdout


def test_the_first_eta_excludes_compilation(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(progress.time, 'time', lambda: clock[0])
  stream = io.StringIO()
  bar = progress.Progress(1000, 0, stream=stream)
  clock[0] = 30.0  # the first step took 30 s: compilation
  bar.update(1)
  clock[0] = 40.0  # then 100 steps in 10 s: 10 steps/s, 899 steps left
  bar.update(101)
  last = stream.getvalue().splitlines()[-1]
  assert '10.0 steps/s' in last and 'eta 1:29' in last, last


def test_a_bit_width_key_points_at_the_format():
  """'--config.quant.bits=4' suggested 'quant.act' (the nearest key by spelling); qjax sets a bit-width by format."""
  from configs import quickstart
  cases = {
      'quant.weight.bits': ['--config.quant.weight.format=int4'],
      'quant.wbits': ['--config.quant.weight.format=int4'],
      'quant.act_bits': ['--config.quant.act.format=int4'],
      'quant.bit_width': ['--config.quant.act.format=int4', '--config.quant.grad.format=int4',
                          '--config.quant.weight.format=int4'],
  }
  for key, want in cases.items():
    with pytest.raises(config_cli.ConfigError, match=r'a bit-width is part of the format') as e:
      config_cli.set_key(quickstart.get_config(), key, '4')
    assert str(e.value).endswith('set ' + ' or '.join(want)), str(e.value)
  with pytest.raises(config_cli.ConfigError, match=r"unknown config key 'quant.bitz'; did you mean 'quant.act'\?$"):
    config_cli.set_key(quickstart.get_config(), 'quant.bitz', '4')  # not a bit-width name: the nearest key
