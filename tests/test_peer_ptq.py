"""experiments/training/peer_ptq.py: Qwix's PTQ through its own API on a qjax testbed model, and the table."""

import json

import jax
import jax.numpy as jnp
import pytest

from experiments.config import cli as config_cli
from experiments.models import LeNet5
from experiments.training import peer_ptq

qwix = pytest.importorskip('qwix')


@pytest.fixture(scope='module')
def lenet():
  m = LeNet5()
  x = jax.random.normal(jax.random.key(0), (32, 28, 28))
  params = m.init(jax.random.key(1), x)['params']
  return m, params, x


def _rel(y, ref):
  return float(jnp.mean((y - ref) ** 2) / jnp.mean(ref ** 2))


def test_qwix_rtn_quantizes_exactly_the_named_layers_at_the_named_width(lenet):
  m, params, x = lenet
  ref = m.apply({'params': params}, x)
  apply8, _ = peer_ptq.qwix_ptq(m, params, [x], 'rtn', 8, 'fc1|fc2|head', x)
  apply4, _ = peer_ptq.qwix_ptq(m, params, [x], 'rtn', 4, 'fc1|fc2|head', x)
  e8, e4 = _rel(apply8(x), ref), _rel(apply4(x), ref)
  assert 0 < e8 < 1e-3 < e4  # int8 close to float, int4 clearly coarser: the width reached Qwix
  # A rule naming no layer leaves the model float (to jit's reassociation, far below int4's error).
  apply_none, _ = peer_ptq.qwix_ptq(m, params, [x], 'rtn', 4, 'no_such_layer', x)
  assert _rel(apply_none(x), ref) < 1e-10


def test_qwix_awq_calibrates_on_the_given_batches(lenet):
  m, params, x = lenet
  ref = m.apply({'params': params}, x)
  apply, seconds = peer_ptq.qwix_ptq(m, params, [x, x * 0.5], 'awq', 4, 'fc1|fc2|head', x)
  assert seconds > 0 and 0 < _rel(apply(x), ref) < 0.2


def test_qwix_smoothquant_serves_smoothed_weights_with_float_activations(lenet):
  """Qwix's SmoothQuant quantizes the weights (an int4 error far above float's jit noise, int8's far below
  int4's; its scales divide the input and multiply the kernel, so only weight rounding is left) and rounds
  differently from Qwix's RTN (the smoothing moved the weights). A float model would give errors near 1e-14."""
  m, params, x = lenet
  ref = m.apply({'params': params}, x)
  sq8, seconds = peer_ptq.qwix_ptq(m, params, [x], 'smoothquant', 8, 'fc1|fc2|head', x)
  sq4, _ = peer_ptq.qwix_ptq(m, params, [x], 'smoothquant', 4, 'fc1|fc2|head', x)
  rtn4, _ = peer_ptq.qwix_ptq(m, params, [x], 'rtn', 4, 'fc1|fc2|head', x)
  e8, e4 = _rel(sq8(x), ref), _rel(sq4(x), ref)
  assert seconds > 0 and 1e-9 < e8 < 1e-2 and 10 * e8 < e4 < 0.5, (e8, e4)
  assert not jnp.allclose(sq4(x), rtn4(x))


def test_table_has_a_column_per_width_and_tool_and_says_where_a_peer_failed():
  h = 'absmax_half_step'
  rows = [{'tool': 'qjax', 'grid': 'absmax', 'method': 'rtn', 'bits': 4, 'eval/accuracy': 0.81, 'seconds': None},
          {'tool': 'qwix', 'grid': h, 'method': 'rtn', 'bits': 4, 'eval/accuracy': 0.8, 'seconds': 0.5},
          {'tool': 'qjax', 'grid': 'absmax', 'method': 'gptq', 'bits': 3, 'eval/accuracy': 0.79, 'seconds': 2.0},
          {'tool': 'qwix', 'grid': h, 'method': 'gptq', 'bits': 3,
           'error': "TypeError: data type 'int3' not understood"}]
  md = peer_ptq.render(rows, 'eval/accuracy', 0.85).splitlines()
  assert md[0].startswith('float eval/accuracy: 0.8500')
  assert md[2] == ('| method | W4 qjax (absmax / qmax) | W4 Qwix (absmax / (qmax + 1/2)) | W3 qjax (absmax / qmax) | '
                   'W3 Qwix (absmax / (qmax + 1/2)) |')
  assert md[4] == '| rtn | 0.8100 | 0.8000 / 0.5 | — | — |'
  assert md[5] == "| gptq | — | — | 0.7900 / 2.0 | fails: TypeError: data type 'int3' not understood |"


def test_a_config_without_a_peer_section_is_a_clear_error():
  with pytest.raises(config_cli.ConfigError, match='no `peer` section'):
    peer_ptq.main(['--config=configs/fmnist_cnn.py:runlocal', '--workdir=/tmp/never-written'])


def test_an_unknown_metric_is_refused_before_anything_runs(tmp_path):
  """It was a KeyError once the float model and the first PTQ row had run."""
  with pytest.raises(config_cli.ConfigError, match=r"^config.peer.metric='eval/acc' is not one of eval/accuracy, "
                                                  r"eval/loss; did you mean 'eval/accuracy'\?$"):
    peer_ptq.main(['--config=configs/peer_ptq_fmnist.py:runlocal', f'--workdir={tmp_path / "w"}',
                   '--config.peer.metric=eval/acc'])
  assert not (tmp_path / 'w').exists()


def test_rows_of_another_config_are_never_reused(tmp_path):
  (tmp_path / 'peer_ptq.json').write_text('{"config": {"seed": 7}, "peer": {}, "rows": []}')
  config = config_cli.load_file('configs/peer_ptq_fmnist.py:runlocal')
  with pytest.raises(config_cli.ConfigError, match='holds the rows of another config'):
    peer_ptq.run_study(config, str(tmp_path), log=lambda *a: None)
  assert not (tmp_path / 'float').exists()  # refused before anything ran


def test_cells_over_seeds_are_mean_and_std_and_a_failure_in_any_seed_shows():
  h = 'absmax_half_step'
  rows = [{'seed': s, 'tool': 'qjax', 'grid': 'absmax', 'method': 'gptq', 'bits': 2, 'eval/accuracy': a,
           'seconds': t} for s, a, t in ((0, 0.80, 2.0), (1, 0.84, 4.0))]
  rows += [{'seed': 0, 'tool': 'qwix', 'grid': h, 'method': 'gptq', 'bits': 2, 'eval/accuracy': 0.7, 'seconds': 9.0},
           {'seed': 1, 'tool': 'qwix', 'grid': h, 'method': 'gptq', 'bits': 2, 'error': 'OOM: out of memory'}]
  md = peer_ptq.render(rows, 'eval/accuracy', [0.90, 0.92]).splitlines()
  # mean 0.82, sample std sqrt(((0.02)^2 * 2) / 1) = 0.0283; float: mean 0.91, std 0.0141
  assert md[0] == ('float eval/accuracy: 0.9100 ± 0.0141; cell: eval/accuracy / method seconds over 2 seeds '
                   '(mean ± sample std)')
  assert md[4] == '| gptq | 0.8200 ± 0.0283 / 3.0 | fails: OOM: out of memory |'


def test_seed_0_stays_in_the_workdir_and_a_rerun_with_more_seeds_runs_only_the_new_seed(tmp_path):
  config = config_cli.load_file('configs/peer_ptq_fmnist.py:runlocal')
  with config.unlocked():
    config.peer.methods, config.peer.qjax_grids = ('rtn',), ('absmax',)
  assert tuple(config.peer.seeds) == (0,)
  quiet = lambda *a: None
  rows = peer_ptq.run_study(config, str(tmp_path), log=quiet)
  assert [(r['seed'], r['tool']) for r in rows] == [(0, 'qjax'), (0, 'qwix')]
  assert (tmp_path / 'float' / 'result.json').exists() and (tmp_path / 'qjax' / 'rtn_w4_absmax').is_dir()
  assert config_cli.load_file('configs/peer_ptq_fmnist.py:runlocal,seeds=3').peer.seeds == (0, 1, 2)
  with config.unlocked():
    config.peer.seeds = (0, 1)
  more = peer_ptq.run_study(config, str(tmp_path), log=quiet)
  assert more[:2] == rows and [(r['seed'], r['tool']) for r in more[2:]] == [(1, 'qjax'), (1, 'qwix')]
  # seed 1: its own float model (its own initialisation and data order) under <workdir>/seed1
  stored = json.loads((tmp_path / 'seed1' / 'float' / 'result.json').read_text())
  assert stored['config']['seed'] == 1 and (tmp_path / 'seed1' / 'qjax' / 'rtn_w4_absmax' / 'result.json').exists()
  assert 'over 2 seeds' in (tmp_path / 'peer_ptq.md').read_text()
