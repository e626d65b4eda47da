"""experiments/bench/gpu.py at its runlocal size on the CPU: the suite's structure, targets, records and its
resilience (never asserts speed; the GPU figures come from experiments/gpu.sh on a GPU machine)."""

import json
import os

from experiments.bench import gpu as bench_gpu
from experiments.bench import harness as bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'bench_gpu.py')


def test_gpu_suite_runlocal(tmp_path):
  rc = bench.main([f'--config={CONFIG}:runlocal', f'--workdir={tmp_path}'])
  assert rc == 0
  data = json.loads((tmp_path / 'bench.json').read_text())
  names = [g['name'] for g in data['groups']]
  # The target batch's serving group runs before the training group.
  assert names == ['gemm 32x64x48', 'qdot 30x100x6', 'charlm serve b2', 'charlm train b4x16']
  gemm, qdot, serve, train = data['groups']
  assert gemm['baseline'] == 'bf16' and set(gemm['results']) == set(bench_gpu.DTYPES)
  assert gemm['results']['int8 -> int32']['info']['inspect']['lowered_int8'] == 1
  assert gemm['results']['fp8 e4m3 -> f32']['info']['inspect']['lowered_fp8'] == 1
  assert set(qdot['results']) == {'bf16', 'dynamic int8', 'serving int8 W', 'dynamic fp8', 'bare int8 dot'}
  assert qdot['results']['dynamic int8']['info']['inspect']['lowered_int8'] == 1
  assert qdot['results']['dynamic fp8']['info']['inspect']['lowered_fp8'] == 1
  assert set(train['results']) == {'bf16 step', 'QAT, int8 forward', 'fp8 training (delayed scaling)'}
  # fp8 training: forward and both backward matmuls of every quantized layer lowered in fp8.
  fp8 = train['results']['fp8 training (delayed scaling)']['info']['inspect']
  assert fp8['lowered_fp8'] > 0 and fp8['lowered_fp8'] % 3 == 0
  assert serve['results']['PTQ int8 serving']['info']['inspect']['lowered_int8'] > 0
  assert {t['variant'] for t in data['targets']} == {'int8 -> int32', 'fp8 e4m3 -> f32', 'QAT, int8 forward',
                                                     'fp8 training (delayed scaling)'}
  rec = data['records']
  assert {'train / bf16 step', 'serve b2 / PTQ int8 serving'} <= set(rec['compiled_memory'])
  assert rec['environment']['device_kind'] and rec['skipped_for_time'] == []
  assert data['config']['timing']['sync_each'] is False


def test_gpu_suite_survives_a_failing_group_and_the_time_budget(tmp_path, monkeypatch):
  """A group that raises is recorded with its error and the rest still run; groups past the budget are listed."""
  def boom(*a, **k):
    raise RuntimeError('RESOURCE_EXHAUSTED: out of memory (simulated)')
  monkeypatch.setattr(bench_gpu, 'qdot_group', boom)
  rc = bench.main([f'--config={CONFIG}:runlocal', '--config.charlm.train_batch=0', f'--workdir={tmp_path}'])
  assert rc == 0
  data = json.loads((tmp_path / 'bench.json').read_text())
  failed = [g for g in data['groups'] if g['meta'].get('error')]
  assert [g['name'] for g in failed] == ['qdot 30x100x6'] and 'out of memory' in failed[0]['meta']['error']
  assert [g['name'] for g in data['groups']][-1] == 'charlm serve b2'
  rc = bench.main([f'--config={CONFIG}:runlocal', '--config.time_budget_s=0', f'--workdir={tmp_path / "b"}'])
  data = json.loads((tmp_path / 'b' / 'bench.json').read_text())
  assert data['groups'] == [] and data['records']['skipped_for_time'][0] == 'gemm 32x64x48'
