r"""Benchmark: lax.dot_general in f32, bf16 -> f32, int8 -> int32 and fp8 -> f32 (the kernels XLA gives).

Steady figures (one core; malloc pinned and huge pages against page faults; docs/benchmarks.md):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
  MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 taskset -c 1 python -m experiments.bench \
    --config=configs/bench_raw_dot.py --workdir=runs/bench/raw_dot_1c
Both cores: the same without `taskset -c 1`. Loaded machine: add --config.timing.clock=process.
With 4096^3: --config=configs/bench_raw_dot.py:full.
Smoke (tests): --config=configs/bench_raw_dot.py:runlocal. Sizes: --config.squares='(256,1024)'.

Shapes (M x K x N): squares 256..2048 (4096 in `full`), MLP-like 256x1024x4096 and 4096x4096x1024, small M
(1, 2, 8, 32 rows with K = N = 4096). Each shape is one group timed interleaved against its f32 dot.
Expected on a 2-core AMD Zen 5 with jax 0.12 (measured earlier there): int8 -> int32 ~3.4-4.1x faster than f32
and bf16 -> f32 ~2x for M >= 256; at M = 1 every low-precision dtype is ~10x slower than f32 (XLA's YNN kernel
refuses matrix-vector products); fp8 runs up-cast to f32. With jaxlib 0.12.1 int8 at M = 1 runs on the fast
kernel (an AVX2-only Zen 3, 2026-12-06: 0.74-0.84x of f32 at 1x4096x4096, against 3.5-3.75x with 0.12.0.1).
Takes ~3 min (~6 min with `full`).
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None (squares up to 2048), 'full' (adds 4096^3), 'runlocal' (tiny shapes, a few short samples)."""
  a = config_cli.config_args(arg, full=False, runlocal=False)
  c = ml_collections.ConfigDict()
  c.suite = 'raw_dot'
  c.squares = (256, 512, 1024, 2048)
  c.mlp_shapes = ('256x1024x4096', '4096x4096x1024')
  c.small_m = (1, 2, 8, 32)
  c.small_m_kn = 4096
  c.dtypes = ('bf16', 'int8', 'fp8')
  c.seed = 0
  c.inspect = True               # record the compiled matmuls of every variant (int8 / fast kernel counts)
  c.flag_tolerance = 0.0
  c.timing = ml_collections.ConfigDict({'warmup': 2, 'rounds': 9, 'min_time': 0.1, 'clock': 'wall'})
  if a['full']:
    c.squares = (256, 512, 1024, 2048, 4096)
  elif a['runlocal']:
    c.squares = (32,)
    c.mlp_shapes = ('16x32x64',)
    c.small_m = (1, 4)
    c.small_m_kn = 64
    c.timing = ml_collections.ConfigDict({'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'})
  return c
