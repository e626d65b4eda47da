"""experiments/timing.py and the bench harness: logic on tiny functions (never asserts speed)."""

import json
import math
import mmap
import os

import numpy as np
import pytest
import xla_cpu

from experiments import timing
from experiments.bench import fake_quant as fq_suite
from experiments.bench import harness as bench
from experiments.config import cli as config_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'bench_fake_quant.py')


class FakeClock:
  """A clock that only moves when a timed function says so: every duration is exact."""

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_round_robin_order_and_exact_stats():
  clock, log = FakeClock(), []

  def make(name, dt):
    def fn():
      log.append(name)
      clock.t += dt
    return fn

  fns = {'a': make('a', 1.0), 'b': make('b', 3.0), 'c': make('c', 0.5)}
  stats = timing.time_interleaved(fns, warmup=2, rounds=3, min_time=0.0, sync=lambda out: out, clock=clock)
  # Warm-up calls per variant first (in order), then one sample of each variant per round, round-robin.
  assert log == ['a', 'a', 'b', 'b', 'c', 'c'] + ['a', 'b', 'c'] * 3
  assert list(stats) == ['a', 'b', 'c']
  for name, dt in (('a', 1.0), ('b', 3.0), ('c', 0.5)):
    s = stats[name]
    assert s.median == s.min == s.max == dt
    assert s.spread == 0.0 and s.samples == (dt, dt, dt) and s.calls_per_sample == 1
    assert s.page_faults_per_call >= 0
  assert timing.ratios(stats, 'a') == {'a': 1.0, 'b': 3.0, 'c': 0.5}


def test_inner_loop_count_from_min_time():
  clock, log = FakeClock(), []

  def fast():
    log.append('fast')
    clock.t += 0.01

  def slow():
    log.append('slow')
    clock.t += 0.3

  stats = timing.time_interleaved({'fast': fast, 'slow': slow}, warmup=1, rounds=2, min_time=0.25,
                                  sync=lambda out: out, clock=clock)
  assert stats['fast'].calls_per_sample == 25 and stats['slow'].calls_per_sample == 1
  assert log == ['fast', 'slow'] + (['fast'] * 25 + ['slow']) * 2
  assert stats['fast'].median == pytest.approx(0.01)


def test_samples_vary_and_spread():
  clock = FakeClock()
  durations = iter([1.0, 2.0, 4.0, 3.0])  # warm-up, then three samples

  def fn():
    clock.t += next(durations)

  (s,) = timing.time_interleaved({'f': fn}, warmup=1, rounds=3, min_time=0.0, sync=lambda o: o, clock=clock).values()
  assert s.samples == (2.0, 4.0, 3.0)
  assert (s.median, s.min, s.max) == (3.0, 2.0, 4.0)
  assert s.spread == pytest.approx((4.0 - 2.0) / 3.0)


def test_sync_each_false_syncs_once_per_sample():
  """sync_each=False: the calls of one sample are queued and only the last result is synchronised."""
  clock = FakeClock()
  synced, calls = [], []

  def fn():
    clock.t += 0.25
    calls.append(len(calls))
    return calls[-1]

  (s,) = timing.time_interleaved({'f': fn}, warmup=1, rounds=2, min_time=1.0, sync=synced.append, clock=clock,
                                 sync_each=False).values()
  assert s.calls_per_sample == 4 and len(calls) == 1 + 2 * 4
  assert synced == [0, 4, 8]  # the warm-up call, then the last call of each sample
  assert s.median == pytest.approx(0.25)


def test_real_clock_and_jax_sync():
  import jax.numpy as jnp
  x = jnp.ones((8, 8))
  stats = timing.time_interleaved({'add': lambda: x + 1, 'mul': lambda: x * 2}, warmup=1, rounds=2, min_time=0.0)
  for s in stats.values():
    assert s.median > 0 and len(s.samples) == 2 and math.isfinite(s.spread)


def test_page_faults_are_counted():
  # A fresh anonymous 32 MiB mapping touched on every call must fault its pages in; a no-op does not (on average).
  # (Not np.empty: glibc may serve a freed 32 MiB block again from its heap, already faulted in, and count nothing.)
  size = 32 * 2 ** 20

  def alloc():
    with mmap.mmap(-1, size) as m:
      for i in range(0, size, 16 * mmap.PAGESIZE):
        m[i] = 1

  stats = timing.time_interleaved({'alloc': alloc, 'noop': lambda: None}, warmup=1, rounds=3, min_time=0.0,
                                  sync=lambda o: o)
  assert stats['alloc'].page_faults_per_call >= 16  # 16 even with 2 MiB (transparent huge) pages
  assert stats['noop'].page_faults_per_call < stats['alloc'].page_faults_per_call


def test_process_clock():
  stats = timing.time_interleaved({'sum': lambda: sum(range(20000))}, warmup=1, rounds=2, min_time=0.0,
                                  sync=lambda o: o, clock='process')
  assert stats['sum'].median > 0


def test_bad_arguments():
  with pytest.raises(ValueError, match='fns is empty'):
    timing.time_interleaved({})
  with pytest.raises(ValueError, match="clock='cpu' is not one of wall, process"):
    timing.time_interleaved({'a': lambda: None}, clock='cpu')
  with pytest.raises(ValueError, match='rounds >= 1'):
    timing.time_interleaved({'a': lambda: None}, rounds=0)
  stats = {'a': timing.make_stats([1.0], 1, 0)}
  with pytest.raises(ValueError, match="baseline='b' is not one of the variants: a"):
    timing.ratios(stats, 'b')


def test_ratios_fields():
  stats = {'base': timing.make_stats([2.0, 4.0, 3.0], 1, 0), 'v': timing.make_stats([3.0, 9.0, 6.0], 2, 12)}
  assert timing.ratios(stats, 'base') == {'base': 1.0, 'v': 2.0}
  assert timing.ratios(stats, 'base', field='min') == {'base': 1.0, 'v': 1.5}
  assert stats['v'].page_faults_per_call == 2.0  # 12 faults over 3 samples x 2 calls
  d = stats['v'].to_dict()
  assert d['median_s'] == 6.0 and d['samples_s'] == [3.0, 9.0, 6.0] and d['calls_per_sample'] == 2


def test_markdown_table():
  stats = {'x * 1.0': timing.make_stats([0.010, 0.012, 0.011], 4, 0),
           'fake_quant': timing.make_stats([0.020, 0.024, 0.022], 2, 8)}
  md = timing.markdown_table(stats, 'x * 1.0')
  lines = md.splitlines()
  assert lines[0].startswith('| variant | median | min | max | spread | ratio vs x * 1.0 (median) | ratio (min)')
  assert lines[1].startswith('|---|')
  assert len(lines) == 4
  assert '| fake_quant | 22 ms | 20 ms | 24 ms | 18% | 2.00x | 2.00x | 1 | 2 x 3 |' == lines[3]
  assert all(line.count('|') == lines[0].count('|') for line in lines)
  assert timing.markdown_table(stats).count('ratio') == 0


@pytest.mark.parametrize('flags, expect', [
    ('', None),
    (None, None),
    ('--xla_cpu_use_thunk_runtime=false', None),
    ('--xla_cpu_experimental_ynn_fusion_type=', '8x slower'),
    ('--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=""', '8x slower'),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_dot,dot', 'overrides'),
])
def test_xla_flags_warning(flags, expect):
  w = timing.xla_flags_warning(flags)
  if expect is None:
    assert w is None
  else:
    assert expect in w and timing.YNN_FLAG in w


def test_machine_info(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=')
  monkeypatch.setenv('MALLOC_ARENA_MAX', '1')
  monkeypatch.setenv('MALLOC_MMAP_MAX_', '0')  # no mmap at all: no call page-faults (docs/benchmarks.md)
  info = timing.machine_info()
  for k in ('date', 'cpu_model', 'cpu_count', 'affinity', 'python', 'jax', 'jaxlib', 'flax', 'device_kind',
            'xla_flags', 'malloc_env', 'warnings'):
    assert k in info
  assert info['malloc_env']['MALLOC_ARENA_MAX'] == '1' and info['malloc_env']['MALLOC_MMAP_MAX_'] == '0'
  assert sum('8x' in w for w in info['warnings']) == 1  # plus the VNNI warning on CPUs without it
  assert set(info['affinity']) <= set(range(os.cpu_count()))
  json.dumps(info)  # Serialisable as is.
  assert 'cpu_model' in timing.machine_table(info)


def test_simd_warning():
  assert timing.simd_warning(['avx2', 'fma'], 'cpu') is not None and 'VNNI' in timing.simd_warning(['avx2'], 'cpu')
  assert timing.simd_warning(['avx2', 'avx512_vnni'], 'cpu') is None
  assert timing.simd_warning(['avx2', 'avx_vnni'], 'cpu') is None
  assert timing.simd_warning(['avx2'], 'gpu') is None


# ------------------------------------------------------------------------------------------------- bench


RESULT_KEYS = {'median_s', 'min_s', 'max_s', 'spread', 'samples_s', 'calls_per_sample', 'page_faults_per_call',
               'ratio', 'ratio_min'}


def test_bench_fake_quant_json_schema(tmp_path):
  """The fake_quant suite at a tiny size through the CLI's code path: bench.json and bench.md."""
  lines = []
  config, flags = config_cli.parse_argv([f'--config={CONFIG}:runlocal', '--config.shape=(64, 32)',
                                        '--config.timing.rounds=2'])
  result = bench.run(config, str(tmp_path), echo=lines.append)
  with open(tmp_path / 'bench.json') as f:
    data = json.load(f)
  assert data == json.loads(json.dumps(result, default=str))
  assert set(data) == {'schema', 'suite', 'command', 'config', 'machine', 'baseline', 'timing', 'results', 'meta',
                       'warnings'}
  assert data['schema'] == 1 and data['suite'] == 'fake_quant' and data['baseline'] == 'x * 1.0'
  assert flags == {}
  assert data['config']['shape'] == [64, 32] and data['config']['quant']['granularity'] == 'per_channel'
  assert set(data['results']) == {'x * 1.0', 'fake_quant', 'calibrate only', 'fake_quant, scale given'}
  for name, r in data['results'].items():
    assert set(r) == RESULT_KEYS, name
    assert len(r['samples_s']) == 2 and r['min_s'] <= r['median_s'] <= r['max_s']
    assert r['ratio'] == pytest.approx(r['median_s'] / data['results']['x * 1.0']['median_s'])
  assert data['results']['x * 1.0']['ratio'] == 1.0
  assert data['meta']['shape'] == [64, 32] and data['meta']['spec']['format'] == 'int8'
  assert any(op.startswith('fusion') for op in data['meta']['entry_ops']['fake_quant'])
  assert data['timing'] == {'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'}
  assert data['machine']['cpu_count'] >= 1
  md = (tmp_path / 'bench.md').read_text()
  assert md.startswith('## fake_quant') and '| fake_quant |' in md and 'cpu_model' in md
  assert lines and lines[-1] == md.rstrip('\n')


def test_bench_before_variant_matches(tmp_path):
  import jax.numpy as jnp

  from qjax import QuantSpec, fake_quant
  x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32).at[0, 0].set(np.nan)
  spec = QuantSpec(granularity='per_channel')
  # The old code divides by the scale (amax / qmax, x / s), which XLA:CPU of jaxlib 0.12.0.x compiled to the
  # same bits as today's multiplications by reciprocals; jaxlib 0.12.1 does not (60 of 2048 values an ulp apart).
  # Today's absmax scale is rounded up by an ulp where amax * (1 / scale) would pass qmax (qjax.calibration), so
  # today's fake_quant gets the old scale as a static one: the quantization arithmetic is what is compared.
  amax = np.nanmax(np.abs(np.asarray(x)), axis=0, keepdims=True)
  scale = jnp.asarray(amax, jnp.float32) / 127
  before, now = np.asarray(fq_suite._fake_quant_before(x, spec)), np.asarray(fake_quant(x, spec, {'scale': scale}))
  if xla_cpu.DIVISION_AS_RECIPROCAL_BITS:
    np.testing.assert_array_equal(before, now)
  else:
    np.testing.assert_array_equal(np.isnan(before), np.isnan(now))
    np.testing.assert_array_max_ulp(before, now, maxulp=1)
  config, _ = config_cli.parse_argv([f'--config={CONFIG}:runlocal', '--config.before=true', '--config.timing.rounds=1',
                                    '--config.extra_variants=false'])
  result = bench.run(config, echo=lambda s: None)
  assert set(result['results']) == {'x * 1.0', 'fake_quant', 'fake_quant before (e1c5dff)'}


def test_bench_cli(tmp_path, capsys):
  rc = bench.main([f'--config={CONFIG}:runlocal', '--config.shape=(32, 32)', '--config.extra_variants=false',
                   '--config.timing.rounds=1', f'--workdir={tmp_path}'])
  assert rc == 0
  out = capsys.readouterr().out
  assert '| x * 1.0 |' in out and '| fake_quant |' in out and 'calibrate only' not in out
  assert set(json.loads((tmp_path / 'bench.json').read_text())['results']) == {'x * 1.0', 'fake_quant'}


def test_bench_prints_flag_warning(monkeypatch, tmp_path):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=')
  bench.register('tiny_test_suite')(lambda config: bench.Suite({'a': lambda: None, 'b': lambda: None}, 'a'))
  lines = []
  config = config_cli.load_file(f'{CONFIG}:runlocal')
  config.suite = 'tiny_test_suite'
  result = bench.run(config, str(tmp_path), echo=lines.append)
  assert lines[0].startswith('WARNING: XLA_FLAGS sets --xla_cpu_experimental_ynn_fusion_type=')
  assert result['warnings'] and '**WARNING:**' in (tmp_path / 'bench.md').read_text()
  assert result['meta'] == {} and set(result['results']) == {'a', 'b'}


def test_registry():
  fn = lambda config: bench.Suite({'a': lambda: None}, 'a')
  bench.register('tiny_registry_suite')(fn)
  assert bench.get_suite('tiny_registry_suite') is fn
  bench.register('tiny_registry_suite')(fn)  # Registering the same function again is harmless.
  with pytest.raises(ValueError, match='already registered'):
    bench.register('tiny_registry_suite')(lambda config: None)
  with pytest.raises(ValueError, match=r"config.suite='no_such_suite' is not one of the benchmark suites .*fake_quant"):
    bench.get_suite('no_such_suite')
  config = config_cli.load_file(f'{CONFIG}:runlocal')
  config.suite = 'tiny_registry_suite'
  bench.register('tiny_bad_baseline')(lambda config: bench.Suite({'a': lambda: None}, 'zzz'))
  config.suite = 'tiny_bad_baseline'
  with pytest.raises(ValueError, match="baseline 'zzz' is not one of a"):
    bench.run(config, echo=lambda s: None)


def test_suite_from_module(tmp_path, monkeypatch):
  """A suite in its own module (experiments/bench/<name>.py, or config.module) is imported on first use."""
  pkg = tmp_path / 'benchpkg'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'my_suite.py').write_text(
      'from experiments import bench\n'
      "@bench.register('from_module')\n"
      'def suite(config):\n'
      "  return bench.Suite({'base': lambda: 1, 'other': lambda: 2}, 'base', {'note': 'hi'})\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = config_cli.load_file(f'{CONFIG}:runlocal')
  config.suite = 'from_module'
  config.module = 'benchpkg.my_suite'
  result = bench.run(config, echo=lambda s: None)
  assert result['meta'] == {'note': 'hi'} and set(result['results']) == {'base', 'other'}


def test_suite_with_own_runner(tmp_path):
  seen = {}

  class Custom:
    def run(self, config, workdir, *, info, echo):
      seen.update(workdir=workdir, info=info)
      echo('custom')
      return {'custom': True}

  bench.register('tiny_custom_runner')(lambda config: Custom())
  config = config_cli.load_file(f'{CONFIG}:runlocal')
  config.suite = 'tiny_custom_runner'
  lines = []
  assert bench.run(config, str(tmp_path), echo=lines.append) == {'custom': True}
  assert seen['workdir'] == str(tmp_path) and 'cpu_model' in seen['info'] and lines[-1] == 'custom'


def test_entry_ops():
  text = '''HloModule m

%fused (p: f32[4]) -> f32[4] {
  ROOT %a = f32[4]{0} abs(%p)
}

ENTRY %main (x.1: f32[4]) -> f32[4] {
  %x.1 = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(%x.1), kind=kLoop, calls=%fused
  %y = f32[1]{0} fusion(%f), kind=kCustom, calls=%fused, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %c = (f32[4]{0}) conditional(%p, %t, %t), branch_computations={%a, %b}
  ROOT %r = f32[4]{0} copy(%f)
}
'''
  assert fq_suite.entry_ops(text) == ['fusion:kLoop f32[4]', 'fusion:kCustom:ynn f32[1]', 'conditional (f32[4])',
                                   'copy f32[4]']


def test_code_version_names_the_checkout_commit_and_nothing_outside_a_checkout(tmp_path):
  import subprocess

  from experiments import version
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip()
  here = version.code_version()
  assert here['commit'] == head and isinstance(here['dirty'], bool)
  assert version.code_version(str(tmp_path)) == {}  # not a git checkout: nothing claimed
  table = timing.machine_table({**timing.machine_info(), 'code': {'commit': 'a' * 40, 'dirty': True}})
  assert '| code | aaaaaaaaaaaa (with local changes) |' in table


def test_times_switch_unit_after_rounding():
  """0.9996 s printed as '1e+03 ms' in every bench table."""
  assert [timing._fmt_time(s) for s in (0.9996, 0.0009996, 0.0009994, 1.5, 0.0123, 2.5e-6)] == [
      '1 s', '1 ms', '999 us', '1.5 s', '12.3 ms', '2.5 us']
