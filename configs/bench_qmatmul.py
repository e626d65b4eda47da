r"""Benchmark: qjax's quantized matmul forward (dynamic int8, serving with pre-quantized int8 weights) vs f32.

Steady figures (one core; malloc pinned and huge pages against page faults; docs/benchmarks.md):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
  MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 taskset -c 1 python -m experiments.bench \
    --config=configs/bench_qmatmul.py --workdir=runs/bench/qmatmul_1c
Both cores: the same without `taskset -c 1`. Loaded machine: add --config.timing.clock=process.
With 4096^3: `:full`. Smoke (tests): `:runlocal`.

Variants per shape (one group each, timed interleaved against the f32 dot of that shape):
  dynamic int8          qjax.ops.dot_general with int8_dynamic(bwd_bits=None): absmax scales of both operands in
                        the call, int8 x int8 -> int32 on XLA's fast kernel, rescale
  serving int8 W        the weight pre-quantized (QArray, per output column); activations quantized in the call
  int8 dot alone        (reference) the bare int8 dot of pre-quantized operands: the ceiling
  ..., small_m=0|M     (contrast, small M) the qjax variants on the other side of the routing (int8 | float)
Targets: dynamic 2048^3 and 256x1024x4096 >= 2.5x faster than f32 (time <= 0.4x); serving, M >= 256:
>= 3.0x (<= 0.33x); M = 1..32: no quantized configuration slower than f32 (the report flags any).
Takes ~4 min.
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None, 'full' (adds 4096^3) or 'runlocal' (tiny shapes)."""
  a = config_cli.config_args(arg, full=False, runlocal=False)
  c = ml_collections.ConfigDict()
  c.suite = 'qmatmul'
  c.squares = (256, 512, 1024, 2048)
  c.mlp_shapes = ('256x1024x4096', '4096x4096x1024')
  c.small_m = (1, 2, 8, 32)
  c.small_m_kn = 4096
  c.dynamic_target_shapes = ('2048x2048x2048', '256x1024x4096')
  c.small_m_threshold = -1       # >= 0 overrides DotConfig.small_m (rows routed to float); -1 keeps the default
  c.seed = 0
  c.inspect = True
  c.flag_tolerance = 0.0
  c.timing = ml_collections.ConfigDict({'warmup': 2, 'rounds': 9, 'min_time': 0.1, 'clock': 'wall'})
  if a['full']:
    c.squares = (256, 512, 1024, 2048, 4096)
  elif a['runlocal']:
    c.squares = (32,)
    c.mlp_shapes = ('16x32x64',)
    c.small_m = (1, 4)
    c.small_m_kn = 64
    c.dynamic_target_shapes = ('32x32x32',)
    c.timing = ml_collections.ConfigDict({'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'})
  return c
