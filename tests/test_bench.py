"""experiments/bench: the grouped suites' harness logic and the suites at tiny sizes (never asserts speed)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import xla_cpu

from experiments import timing
from experiments.bench import e2e, groups, kernels, markdown
from experiments.bench import harness as bench
from experiments.bench.groups import Group, Target, Variant
from experiments.config import cli as config_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {name: os.path.join(REPO, 'configs', f'bench_{name}.py')
           for name in ('raw_dot', 'qmatmul', 'train', 'e2e', 'memory')}
RESULT_KEYS = {'role', 'median_s', 'min_s', 'max_s', 'spread', 'samples_s', 'calls_per_sample',
               'page_faults_per_call', 'ratio', 'ratio_min', 'speedup', 'info'}
TOP_KEYS = {'schema', 'kind', 'suite', 'command', 'config', 'machine', 'timing', 'groups', 'targets', 'flags',
            'records', 'meta', 'warnings'}
ON_CPU = os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu'


def run_cli(tmp_path, name, *overrides):
  """The suite through the CLI's code path (bench.main), at its runlocal size; returns bench.json's content."""
  rounds = [] if name == 'memory' else ['--config.timing.rounds=2']  # memory times nothing
  rc = bench.main([f'--config={CONFIGS[name]}:runlocal', *overrides, *rounds, f'--workdir={tmp_path}'])
  assert rc == 0
  with open(tmp_path / 'bench.json') as f:
    return json.load(f)


def check_schema(data):
  assert set(data) == TOP_KEYS
  assert data['schema'] == bench.SCHEMA and data['kind'] == 'groups'
  for k in ('cpu_model', 'cpu_count', 'python', 'jax', 'jaxlib', 'device_kind', 'xla_flags', 'warnings'):
    assert k in data['machine'], k
  for g in data['groups']:
    assert set(g) == {'name', 'baseline', 'meta', 'results'}
    base = g['results'][g['baseline']]
    assert base['role'] == 'baseline' and base['ratio'] == 1.0
    for name, r in g['results'].items():
      assert set(r) == RESULT_KEYS, name
      assert r['role'] in groups.ROLES
      assert len(r['samples_s']) == 2 and r['min_s'] <= r['median_s'] <= r['max_s']
      assert r['ratio'] == pytest.approx(r['median_s'] / base['median_s'])
      assert r['ratio_min'] == pytest.approx(r['min_s'] / base['min_s'])
      assert r['speedup'] == pytest.approx(1.0 / r['ratio'])
  for t in data['targets']:
    assert set(t) == {'group', 'variant', 'text', 'max_ratio', 'ratio', 'met'}
    assert t['met'] == (t['ratio'] <= t['max_ratio'])


# ------------------------------------------------------------------------------------------- suites, CLI


def test_raw_dot_cli_json_markdown_and_tensorboard(tmp_path, capsys):
  data = run_cli(tmp_path, 'raw_dot', "--config.small_m=(1,)")
  check_schema(data)
  assert data['suite'] == 'raw_dot'
  assert [g['name'] for g in data['groups']] == ['32x32x32', '16x32x64', '1x64x64']
  assert list(data['groups'][0]['results']) == ['f32', 'bf16 -> f32', 'int8 -> int32', 'fp8 e4m3 -> f32']
  assert data['groups'][0]['meta']['shape'] == [32, 32, 32]
  insp = data['groups'][0]['results']['int8 -> int32']['info']['inspect']
  assert insp['matmuls'] == 1 and insp['lowered_int8'] == 1
  if ON_CPU:  # XLA:CPU runs the square int8 dot on YNN; a matrix-vector product (M = 1) only from jaxlib 0.12.1.
    assert insp['int8'] == 1 and insp['int8_fast'] == 1
    m1 = data['groups'][2]['results']['int8 -> int32']['info']['inspect']
    assert m1['int8_fast'] == int(xla_cpu.ONE_ROW_INT8_DOT_FAST)
    assert m1['int8_gemm_slow'] == 0  # M = 1 is not a GEMM: no warning for it
  assert data['timing'] == {'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'}
  assert data['config']['small_m'] == [1]
  md = (tmp_path / 'bench.md').read_text()
  assert md.startswith('## raw_dot') and '### 1x64x64' in md and '| int8 -> int32 |' in md and 'cpu_model' in md
  assert '## raw_dot' in capsys.readouterr().out
  from experiments.review import tensorboard as tb
  scalars = tb.read_scalars(tmp_path)
  assert 'raw_dot/32x32x32/f32/ratio' in scalars and 'raw_dot/1x64x64/int8_-_int32/median_ms' in scalars
  assert scalars['raw_dot/32x32x32/f32/ratio'][0][1] == pytest.approx(1.0)


def test_qmatmul_small_m_routing_in_result(tmp_path):
  # small_m=1 set explicitly (the default is 0 now): the routing machinery and its contrast variants.
  data = run_cli(tmp_path, 'qmatmul', "--config.squares=(64,)", "--config.mlp_shapes=()", "--config.small_m=(1,4)",
                 "--config.dynamic_target_shapes=('64x64x64',)", '--config.small_m_threshold=1')
  check_schema(data)
  big, small, four = data['groups']
  assert big['name'] == '64x64x64' and small['name'] == '1x64x64'
  assert big['meta']['routed_to_float'] is False and small['meta']['routed_to_float'] is True
  assert list(big['results']) == ['f32', 'dynamic int8', 'serving int8 W', 'serving int8 W, stored (N, K)',
                                  'int8 dot alone']
  assert list(small['results']) == ['f32', 'dynamic int8', 'serving int8 W', 'serving int8 W, stored (N, K)',
                                    'dynamic int8, small_m=0', 'serving int8 W, small_m=0',
                                    'dequantize-in-the-matmul (f32 dot of int8 W)', 'int8 GEMV as an int32 reduction',
                                    'int8 dot, stored (N, K): w . x^T', 'int8 dot, stored (N, K): x . w^T',
                                    'int8 dot alone']
  for name in ('w . x^T', 'x . w^T'):  # both products of the stored weight, one row padded to two, int8
    ref = small['results'][f'int8 dot, stored (N, K): {name}']
    assert ref['role'] == 'reference' and ref['info']['inspect']['lowered_int8'] == 1, ref
  stored = big['results']['serving int8 W, stored (N, K)']['info']['inspect']
  assert stored['lowered_int8'] == 1 and (not ON_CPU or stored['int8_fast'] == 1)
  for name in ('dynamic int8', 'serving int8 W'):
    r = small['results'][name]
    assert r['role'] == 'quantized' and r['info']['routed_to_float'] is True
    assert r['info']['route'].startswith('float (rows 1 <= small_m=1)')
    assert r['info']['inspect']['lowered_int8'] == 0  # routed: no int8 matmul at all
    assert big['results'][name]['info']['route'] == 'int8'
    assert big['results'][name]['info']['inspect']['lowered_int8'] == 1
    forced = small['results'][f'{name}, small_m=0']
    assert forced['role'] == 'contrast' and forced['info']['inspect']['lowered_int8'] == 1
    # 4 rows > small_m=1 run in int8; the contrast routes them to float to show what the threshold decided.
    assert four['results'][name]['info']['route'] == 'int8'
    assert four['results'][name]['info']['inspect']['lowered_int8'] == 1
    alt = four['results'][f'{name}, small_m=4']
    assert alt['role'] == 'contrast' and alt['info']['routed_to_float'] is True
    assert alt['info']['inspect']['lowered_int8'] == 0
    if ON_CPU:
      assert big['results'][name]['info']['inspect']['int8_fast'] == 1
  assert [(t['group'], t['variant']) for t in data['targets']] == [('64x64x64', 'dynamic int8')]
  # Flags are exactly the quantized variants slower than f32 (contrast and reference variants never flag).
  expect = [(g['name'], n) for g in data['groups'] for n, r in g['results'].items()
            if r['role'] == 'quantized' and r['ratio'] > 1.0]
  assert [(f['group'], f['variant']) for f in data['flags']] == expect


def test_train_matmul_keeps_all_three_int8_matmuls_fast(tmp_path):
  data = run_cli(tmp_path, 'train')
  check_schema(data)
  (g,) = data['groups']
  assert g['meta']['shape'] == [64, 64, 64] and g['baseline'] == 'f32'
  res = g['results']
  assert res['int8 x3, naive drhs']['role'] == 'contrast'
  assert res['int8 x3']['info']['config']['drhs_row_major'] is True
  assert res['int8 x3, naive drhs']['info']['config']['drhs_row_major'] is False
  assert res['int8 x3']['info']['inspect']['lowered_int8'] == 3
  assert res['int8 fwd, f32 bwd']['info']['matmuls_by_scope'] == {
      'fwd': 'int8 fast' if ON_CPU else res['int8 fwd, f32 bwd']['info']['matmuls_by_scope']['fwd'],
      'dlhs': 'f32', 'drhs': 'f32'}
  if ON_CPU:
    assert res['int8 x3']['info']['matmuls_by_scope'] == {'fwd': 'int8 fast', 'dlhs': 'int8 fast', 'drhs': 'int8 fast'}
    assert res['int8 x3']['info']['inspect']['int8_fast'] == 3
    naive = 'int8 fast' if xla_cpu.TRANSPOSED_INT8_DOT_FAST else 'int8 SLOW'  # tests/xla_cpu.py
    assert res['int8 x3, naive drhs']['info']['matmuls_by_scope']['drhs'] == naive
  (t,) = data['targets']
  assert t['variant'] == 'int8 x3' and t['max_ratio'] == 0.35
  assert not any('off XLA:CPU' in w for w in data['warnings'])  # the contrast's slow drhs does not warn


def test_e2e_learned_estimators_add_qat_variants_with_an_int8_forward(tmp_path, capsys):
  data = run_cli(tmp_path, 'e2e', "--config.models=('mlp',)", '--config.serve_batches=(8,)',
                 "--config.qat_estimators=('lsq','pact')", '--config.bare_kernels=False')
  train = data['groups'][0]
  assert list(train['results'])[-2:] == ['QAT lsq, int8 forward', 'QAT pact, int8 forward']
  for est in ('lsq', 'pact'):
    assert train['results'][f'QAT {est}, int8 forward']['info']['inspect']['lowered_int8'] == 2
    rule = data['meta']['rules'][f'qat_{est}'][-1]
    assert rule['weight']['estimator'] == rule['act']['estimator'] == est
  capsys.readouterr()
  assert bench.main([f'--config={CONFIGS["e2e"]}:runlocal', "--config.qat_estimators=('lsqq',)",
                     f'--workdir={tmp_path / "bad"}']) == 2
  err = capsys.readouterr().err
  assert "config.quant.weight: estimator='lsqq' is not one of" in err and "did you mean 'lsq'" in err
  assert not (tmp_path / 'bad' / 'bench.json').exists()


def test_e2e_mlp_runlocal(tmp_path, capsys):
  data = run_cli(tmp_path, 'e2e', "--config.models=('mlp',)", '--config.serve_batches=(8,)')
  out = capsys.readouterr().out
  check_schema(data)
  train, train_bare, serve, serve_bare = data['groups']
  assert train['name'] == 'mlp train b8' and serve['name'] == 'mlp serve b8'
  assert list(train['results']) == ['float step', 'QAT, int8 forward', 'QAT, fake-quant forward',
                                    'int8 training (fwd + bwd int8)']
  assert list(serve['results']) == ['float forward', 'PTQ int8 serving']
  ins = lambda g, n: g['results'][n]['info']['inspect']
  assert ins(train, 'float step')['lowered_int8'] == 0
  assert ins(train, 'QAT, fake-quant forward')['lowered_int8'] == 0
  assert ins(train, 'QAT, int8 forward')['lowered_int8'] == 2  # batch 8 > small_m=1: both Linear layers in int8
  srv = serve['results']['PTQ int8 serving']['info']
  assert srv['param_bytes'] < 0.5 * srv['float_param_bytes']  # int8 kernels served
  assert {t['variant'] for t in data['targets']} == {'QAT, int8 forward', 'QAT, fake-quant forward',
                                                     'int8 training (fwd + bwd int8)'}  # serving target: b >= 256
  assert data['meta']['peers_time_ratio']['Qwix PTQ int8 forward'] == 0.30
  assert data['meta']['rules']['int8_train'][-1]['grad']['format'] == 'int8'
  assert data['meta']['rules']['ptq'][-1]['act_static'] is True
  # The bare groups: the float program's matmuls alone. 784-32-10: two forward dots; the step adds dW of both
  # layers and dx of the second (not of the input).
  assert (train_bare['name'], serve_bare['name']) == ('mlp train b8 bare', 'mlp serve b8 bare')
  assert list(train_bare['results']) == list(kernels.BARE) and train_bare['baseline'] == kernels.FLOAT
  assert (serve_bare['meta']['bare']['dots'], train_bare['meta']['bare']['dots']) == (2, 5)
  # The bound holds for the variants whose every matmul is int8: not for the QAT steps (float backward).
  for g, of, quantized in ((train_bare, train, ['int8 training (fwd + bwd int8)']),
                           (serve_bare, serve, ['PTQ int8 serving'])):
    bare, res = g['meta']['bare'], g['results']
    assert bare['of'] == of['name']
    for form in kernels.INT8_FORMS:  # every bare GEMM on the fast kernel, in each layout
      assert res[form]['info']['inspect']['int8_fast'] == bare['dots'], form
    share = res[kernels.FLOAT]['median_s'] / of['results'][of['baseline']]['median_s']
    fastest = min(res[f]['ratio'] for f in kernels.INT8_FORMS)  # the bare kernel: the fastest layout
    assert bare['share'] == pytest.approx(share) and bare['kernel'] == pytest.approx(fastest)
    assert bare['kernel'] == pytest.approx(res[bare['kernel_form']]['ratio'])
    assert bare['bound'] == pytest.approx(1 - share + share * fastest)
    assert bare['quantized'] == {n: pytest.approx(of['results'][n]['ratio']) for n in quantized}
  md = (tmp_path / 'bench.md').read_text()
  assert '| mlp serve b8 | 2 + 0 |' in md
  bare = serve_bare['meta']['bare']
  # The bound as the run goes. Its wording depends on the timings (a loaded machine can replay the matmuls
  # alone slower than the whole float program: a share over 100%, whose bound says nothing), so build it from them.
  says_nothing = ' (says nothing)' if bare['share'] > 1.0 else ''
  assert (f"; bound {bare['bound']:.2f}x{says_nothing} (matmuls {markdown.fmt_share(bare['share'])} of float, "
          f"bare int8 kernel {bare['kernel']:.2f}x as {kernels.LAYOUT[bare['kernel_form']]})") in out


def test_e2e_char_lm_runlocal(tmp_path):
  """The char-LM Transformer end to end: training variants and serving groups at its own batches (sequences),
  with int8 matmuls in the quantized programs (the attention einsums and the dense layers)."""
  data = run_cli(tmp_path, 'e2e', "--config.models=('char_lm',)", '--config.bare_kernels=False')
  check_schema(data)
  names = [g['name'] for g in data['groups']]
  assert names == ['char_lm train b2', 'char_lm serve b1', 'char_lm serve b2']  # bare groups: the MLP's test
  train = data['groups'][0]['results']
  assert train['QAT, int8 forward']['info']['inspect']['lowered_int8'] > 0
  assert train['int8 training (fwd + bwd int8)']['info']['inspect']['lowered_int8'] > \
      train['QAT, int8 forward']['info']['inspect']['lowered_int8']
  assert data['groups'][2]['results']['PTQ int8 serving']['info']['inspect']['lowered_int8'] > 0


def test_e2e_batch_one_runs_int8(tmp_path):
  """At batch 1 (a matrix-vector product) the forward matmuls still run in int8 (padded to two rows on CPU, see
  qjax.ops.dot_general.min_free), in QAT, int8 training and PTQ serving."""
  data = run_cli(tmp_path, 'e2e', "--config.models=('mlp',)", '--config.serve_batches=(1,)',
                 '--config.train_batch=1', '--config.mlp_hidden=(64,)', '--config.bare_kernels=False')
  train, serve = data['groups']
  assert train['results']['QAT, int8 forward']['info']['inspect']['lowered_int8'] == 2
  full = train['results']['int8 training (fwd + bwd int8)']['info']['inspect']
  assert full['lowered_int8'] >= 4  # both forward matmuls, and drhs = x^T . g of both layers
  insp = serve['results']['PTQ int8 serving']['info']['inspect']
  assert insp['lowered_int8'] == 2 and insp['int8_slow'] == 0


def test_memory_records(tmp_path):
  data = run_cli(tmp_path, 'memory')
  check_schema(data)
  rec = data['records']
  assert data['groups'] == [] and rec['model'] == 'mlp 784-32-10'
  served = rec['served_param_bytes']
  assert served['float32'] > served['int8'] > served['int4 packed'] > 0
  assert rec['served_param_ratio_to_float']['int8'] < 0.3 and rec['served_param_ratio_to_float']['int4 packed'] < 0.16
  for label in ('float', 'QAT int8 forward', 'int8 training'):
    m = rec['train_step_memory'][label]
    assert m['argument_size_in_bytes'] > 0 and m['state_bytes'] > 0 and 'temp_size_in_bytes' in m
  q = rec['quantize_nnx_live_bytes']
  assert q['model_alone'] > 0 and q['after_quantize'] >= q['model_alone']
  assert q['ratio_after'] == pytest.approx(q['after_quantize'] / q['model_alone'])
  disk = rec['checkpoint_bytes']
  assert disk['float32'] > disk['int8'] > disk['int4 packed'] > 0
  assert rec['checkpoint_ratio_to_float']['int8'] == pytest.approx(disk['int8'] / disk['float32'])
  t, t8, t4 = data['targets']
  assert t['variant'] == 'quantize_nnx' and t['max_ratio'] == 1.3
  assert (t8['variant'], t8['max_ratio'], t4['variant'], t4['max_ratio']) == (
      'int8 checkpoint', 0.27, 'int4 packed checkpoint', 0.15)
  assert t8['met'] == (t8['ratio'] <= 0.27)
  assert '### records' in (tmp_path / 'bench.md').read_text()


def test_module_cli_and_fast_kernel_switched_off(tmp_path):
  """`python -m experiments.bench` finds suites of other modules; a run whose XLA_FLAGS turn YNN off warns from
  the flags (machine info) and from what the inspection saw (int8 GEMMs off the fast kernel), in log and JSON."""
  env = dict(os.environ, XLA_FLAGS='--xla_cpu_experimental_ynn_fusion_type=', JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'experiments.bench', f'--config={CONFIGS["raw_dot"]}:runlocal',
         '--config.small_m=()', '--config.mlp_shapes=()', "--config.dtypes=('int8',)", '--config.timing.rounds=1',
         f'--workdir={tmp_path}']
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr
  assert 'WARNING: XLA_FLAGS sets --xla_cpu_experimental_ynn_fusion_type=' in out.stdout
  assert "WARNING: 32x32x32 / int8 -> int32: 1 int8 matmul(s) off XLA:CPU's fast (YNN) kernel" in out.stdout
  data = json.loads((tmp_path / 'bench.json').read_text())
  assert data['command'].startswith('python -m experiments.bench --config=')
  assert any('8x slower' in w for w in data['warnings'])
  assert any("off XLA:CPU's fast" in w for w in data['warnings'])
  assert data['groups'][0]['results']['int8 -> int32']['info']['inspect']['int8_gemm_slow'] == 1


# -------------------------------------------------------------------------------------------- pure logic


def stats(*samples):
  return timing.make_stats(list(samples), 1, 0)


def synthetic_group():
  noop = lambda: None
  group = Group('g', {'f32': Variant(noop, 'baseline'), 'fast q': Variant(noop), 'slow q': Variant(noop),
                      'edge q': Variant(noop), 'contrast': Variant(noop, 'contrast'),
                      'ref': Variant(noop, 'reference', {'inspect': {'int8_gemm_slow': 2}})},
                'f32', targets=(Target('fast q', 0.5, 'fast'), Target('slow q', 0.9, 'slow')))
  st = {'f32': stats(1.0, 1.0, 1.0), 'fast q': stats(0.4, 0.5, 0.6), 'slow q': stats(1.5, 1.5, 2.0),
        'edge q': stats(1.04, 1.04, 1.04), 'contrast': stats(3.0, 3.0, 3.0), 'ref': stats(0.9, 0.9, 0.9)}
  return group, st


def test_group_result_ratios_and_flags_on_synthetic_stats():
  group, st = synthetic_group()
  g = groups.group_result(st, group)
  r = g['results']
  assert r['fast q']['ratio'] == 0.5 and r['fast q']['speedup'] == 2.0 and r['fast q']['ratio_min'] == 0.4
  assert r['slow q']['ratio'] == 1.5 and r['contrast']['role'] == 'contrast'
  flags = groups.slower_than_baseline([g])
  assert [f['variant'] for f in flags] == ['slow q', 'edge q']
  assert flags[0]['text'] == 'slow q is 1.50x the time of f32 on g (slower)'
  assert [f['variant'] for f in groups.slower_than_baseline([g], tolerance=0.05)] == ['slow q']
  both = groups.slower_than_baseline([g], roles=('quantized', 'contrast'))
  assert [f['variant'] for f in both] == ['slow q', 'edge q', 'contrast']
  targets = groups.check_targets(group, g)
  assert [(t['variant'], t['met']) for t in targets] == [('fast q', True), ('slow q', False)]
  assert targets[1]['ratio'] == 1.5 and targets[1]['max_ratio'] == 0.9
  warns = groups.slow_int8_warnings([g])
  assert len(warns) == 1 and warns[0].startswith("g / ref: 2 int8 matmul(s) off XLA:CPU's fast")


def test_markdown_summary_and_targets():
  group, st = synthetic_group()
  g = groups.group_result(st, group)
  result = {'suite': 's', 'warnings': ['w1'], 'groups': [g], 'targets': groups.check_targets(group, g),
            'flags': groups.slower_than_baseline([g]), 'records': {'a': {'b': 1.5}},
            'machine': {'cpu_model': 'x'}, 'command': 'c'}
  md = markdown.result_markdown(result)
  assert md.startswith('## s\n\n**WARNING:** w1')
  assert '| g | 1 s | 1.00x | 0.50x | 1.50x | 1.04x | 3.00x | 0.90x |' in md
  assert '| g | slow q | slow | <= 0.9x | 1.50x | NOT met |' in md
  assert '| g | fast q | fast | <= 0.5x | 0.50x | met |' in md
  assert 'Quantized configurations slower than float: 2' in md and '- FLAG: slow q is 1.50x' in md
  assert '### g' in md and '- a:\n  - b: 1.5' in md


def test_markdown_bound_table_and_target_column():
  noop = lambda: None
  all_int8 = {'inspect': {'matmuls': 5, 'int8': 5}}  # the bound applies to q
  group = Group('g', {'f32': Variant(noop, 'baseline'), 'q': Variant(noop, info=all_int8)}, 'f32',
                targets=(Target('q', 0.3, 'q'),))
  times = {kernels.FLOAT: 1.6, kernels.INT8: 0.8, kernels.INT8_NT: 0.4, kernels.INT8_TN: 0.6}
  bare = Group('g bare', {n: Variant(noop, 'baseline' if n == kernels.FLOAT else 'reference') for n in times},
               kernels.FLOAT, {'bare': {'of': 'g', 'dots': 3, 'convs': 2}})
  g = groups.group_result({'f32': stats(2.0, 2.0, 2.0), 'q': stats(1.4, 1.4, 1.4)}, group)
  gb = groups.group_result({n: stats(t, t, t) for n, t in times.items()}, bare)
  kernels.annotate([g, gb])
  result = {'suite': 's', 'warnings': [], 'groups': [g, gb], 'targets': groups.check_targets(group, g), 'flags': [],
            'records': {}, 'machine': {'cpu_model': 'x'}, 'command': 'c'}
  md = markdown.result_markdown(result)
  # share 1.6 / 2 = 0.8, kernel 0.4 / 1.6 = 0.25 (x . w^T, the fastest layout), bound 0.2 + 0.2 = 0.4: q at 0.7
  # keeps 0.3 of the 0.6 saving the bound allows.
  assert gb['meta']['bare']['kernel_form'] == kernels.INT8_NT
  assert '| g | 3 + 2 | 80% | 0.25x (x . w^T) | 0.40x | q 0.70x (50%) |' in md
  assert '| g | q | q | <= 0.3x | 0.70x | NOT met | 0.40x |' in md


def test_data_model_errors():
  noop = lambda: None
  with pytest.raises(ValueError, match="role='fast'"):
    Variant(noop, 'fast')
  with pytest.raises(ValueError, match="baseline 'x' is not one of a"):
    Group('g', {'a': Variant(noop, 'baseline')}, 'x')
  with pytest.raises(ValueError, match="target variant 'b'"):
    Group('g', {'a': Variant(noop, 'baseline')}, 'a', targets=(Target('b', 1.0, ''),))


def test_shapes_and_tags():
  assert groups.parse_shape('256x1024x4096') == (256, 1024, 4096)
  with pytest.raises(ValueError, match='MxKxN'):
    groups.parse_shape('256x1024')
  config = config_cli.load_file(CONFIGS['raw_dot'])
  shapes = groups.matmul_shapes(config)
  assert shapes[:4] == [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048)]
  assert (256, 1024, 4096) in shapes and (4096, 4096, 1024) in shapes and (1, 4096, 4096) in shapes
  assert (4096, 4096, 4096) not in shapes
  assert (4096, 4096, 4096) in groups.matmul_shapes(config_cli.load_file(f"{CONFIGS['raw_dot']}:full"))
  config.squares, config.small_m, config.small_m_kn = (32,), (32,), 32
  assert groups.matmul_shapes(config).count((32, 32, 32)) == 1
  assert groups.sanitize_tag('serving int8 W, small_m=0') == 'serving_int8_W_small_m=0'


def test_an_unknown_suite_names_the_nearest_and_lists_every_suite():
  """In a fresh process no suite had been imported yet, so the error said 'known: ' and listed none."""
  r = subprocess.run([sys.executable, '-m', 'experiments.bench', '--config=configs/bench_fake_quant.py:runlocal',
                      '--config.suite=fake_quantt'], cwd=REPO, capture_output=True, text=True,
                     env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
  assert ("error: config.suite='fake_quantt' is not one of the benchmark suites conv, e2e, fake_quant, gpu, memory, "
          "qmatmul, raw_dot, train_matmul; did you mean 'fake_quant'?") in r.stderr, r.stderr


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_configs(name):
  mod, _ = config_cli.load_module(CONFIGS[name])
  assert 'python -m experiments.bench' in mod.__doc__ and '--config=configs/bench_' in mod.__doc__
  assert 'runlocal' in mod.__doc__
  full, local = mod.get_config(None), mod.get_config('runlocal')
  assert 'module' not in full and bench.get_suite(full.suite) is bench.SUITES[full.suite]
  assert bench.SUITES[full.suite].__module__ == f'experiments.bench.{full.suite}'
  if 'timing' in full:
    assert full.timing.rounds >= 7 and full.timing.warmup >= 1 and local.timing.rounds < full.timing.rounds
  with pytest.raises(ValueError, match='unknown config arg'):
    mod.get_config('nope')


def test_small_m_blocked_float_product_is_the_routed_float_matmul():
  """The speed change behind the qmatmul suite's small-M serving figures (qjax.ops.dot_general): a routed float
  matmul of few rows against a large rhs runs blockwise over K, dequantizing a pre-quantized weight block by
  block; it stays an f32 matmul, equals the dynamic (fake-quantized) route bit for bit and the one-shot product
  within f32 rounding (exactly with power-of-two scales)."""
  import jax
  import numpy as np

  import qjax
  from qjax.ops import dot_general, inspect_matmuls, int8_dynamic
  dg = sys.modules['qjax.ops.dot_general']
  k, n = 1024, 1024
  assert dg._float_block_rows((2, k), (k, n), groups.DN) == 512
  assert dg._float_block_rows((33, k), (k, n), groups.DN) == 0  # more rows than _BLOCK_MAX_ROWS
  assert dg._float_block_rows((2, 64), (64, 48), groups.DN) == 0  # a small rhs: one plain dot
  assert dg._float_block_rows((1, 4096), (4096, 4096), groups.DN) == 256
  x = jax.random.normal(jax.random.key(0), (1, k))  # one row: routed (small_m=1)
  w = jax.random.normal(jax.random.key(1), (k, n))
  for po2 in (False, True):
    wspec = qjax.QuantSpec(granularity='per_channel', axis=1, po2_scale=po2)
    cfg = dataclasses.replace(int8_dynamic(bwd_bits=None, po2_scale=po2), small_m=1)
    f = jax.jit(lambda x, w, cfg=cfg: dot_general(x, w, groups.DN, config=cfg))
    wq = qjax.quantize(w, wspec)
    served, dynamic = f(x, wq), f(x, w)
    np.testing.assert_array_equal(served, dynamic)
    xh = qjax.fake_quant(x, qjax.QuantSpec(granularity='per_channel', axis=0, po2_scale=po2))
    ref = xh @ qjax.dequantize(wq)
    if po2:
      np.testing.assert_array_equal(served, ref)
    else:
      np.testing.assert_allclose(served, ref, rtol=1e-5, atol=1e-4)
    rep = inspect_matmuls(f, x, wq)
    assert rep.counts('lowered') == {'f32': 1} and rep.n_int8 == 0


def test_bench_rules_keep_the_act_format_as_written():
  """Benchmarks time signed act grids as recorded in docs/benchmarks.md, with no data probe, whatever train's
  default ('auto') is; an override still reaches them."""
  import ml_collections

  from experiments.bench import gpu as bench_gpu
  for kind in ('qat', 'qat_fake', 'int8_train', 'ptq', 'ptq_int4'):
    assert all(r.act_signedness == 'format' for r in e2e.quant_rules(kind, None)), kind
  fp8 = bench_gpu.gpu_rules('fp8_train', ml_collections.ConfigDict({'fp8_history': 4}))
  assert all(r.act_signedness == 'format' for r in fp8)
  cfg = ml_collections.ConfigDict({'quant_overrides': {'act_signedness': 'auto'}})
  assert all(r.act_signedness == 'auto' for r in e2e.quant_rules('qat', cfg))
