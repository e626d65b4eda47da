r"""Benchmark: int8 and fp8 against bfloat16 on a GPU (raw GEMMs, qjax's quantized dot_general, the char-LM).

On a GPU machine (the tests and this suite, all output in one folder, in under 10 minutes on an H200):
  bash experiments/gpu.sh runs/gpu
The suite alone:
  python -m experiments.bench --config=configs/bench_gpu.py --workdir=runs/gpu/bench
Smoke (tests, any CPU): --config=configs/bench_gpu.py:runlocal.

Shapes (M x K x N): GEMMs at 4096^3 and 8192^3; the quantized op at 8192^3 and at the char-LM's MLP shape
(64 x 512 tokens, d_model 1024 -> 4096). The char-LM: d_model 1024, 8 layers, 16 heads, batch 64 x 512
tokens, bfloat16 compute with f32 parameters, adam. Targets on an H200 (time ratio to bf16, lower is faster):
int8 GEMM <= 0.6x at 8192^3 (the hardware ceiling is 0.5x), fp8 GEMM <= 0.6x, char-LM QAT step with an int8
forward <= 0.85x, fp8 training step <= 0.8x, PTQ serving (int8 weights) at batch 64 <= 0.6x.
Measured figures: docs/benchmarks.md (GPU section).
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None (the H200 run) or 'runlocal' (tiny shapes and model, runs on a CPU)."""
  a = config_cli.config_args(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.suite = 'gpu'
  c.gemm_shapes = ('4096x4096x4096', '8192x8192x8192')
  c.target_shape = (8192, 8192, 8192)      # the GEMM shape the targets apply to
  c.qdot_shapes = ('8192x8192x8192', '32768x1024x4096')
  c.charlm = ml_collections.ConfigDict({
      'd_model': 1024, 'num_layers': 8, 'num_heads': 16, 'seq_len': 512, 'vocab_size': 65, 'dtype': 'bfloat16',
      'train_batch': 64, 'serve_batches': (64, 8, 1)})   # the first batch runs before the training group
  # Also known: 'QAT, fake-quant forward' (left out: one more compile of the 8-layer step, about a minute).
  c.train_variants = ('QAT, int8 forward', 'int8 training (fwd + bwd int8)', 'fp8 training (delayed scaling)')
  c.fp8_history = 16                       # amax history length of fp8 delayed scaling
  c.calibration_batches = 2
  c.quant_overrides = ml_collections.ConfigDict()
  c.seed = 0
  c.inspect = True
  c.flag_tolerance = 0.0
  c.time_budget_s = 420.0                  # groups that would start later are skipped (and listed)
  c.timing = ml_collections.ConfigDict({'warmup': 2, 'rounds': 7, 'min_time': 0.1, 'clock': 'wall',
                                        'sync_each': False})
  if a['runlocal']:
    c.gemm_shapes = ('32x64x48',)
    c.target_shape = (32, 64, 48)
    c.qdot_shapes = ('30x100x6',)
    c.charlm.update({'d_model': 32, 'num_layers': 1, 'num_heads': 2, 'seq_len': 16, 'train_batch': 4,
                     'serve_batches': (2,)})
    c.train_variants = ('QAT, int8 forward', 'fp8 training (delayed scaling)')
    c.calibration_batches = 1
    c.timing = ml_collections.ConfigDict({'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall',
                                          'sync_each': False})
  return c
