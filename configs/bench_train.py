r"""Benchmark: a training-style matmul (forward + dlhs + drhs) with int8 in all three, vs the f32 fwd + bwd.

Steady figures (one core; malloc pinned and huge pages against page faults; docs/benchmarks.md):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
  MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 taskset -c 1 python -m experiments.bench \
    --config=configs/bench_train.py --workdir=runs/bench/train_1c
Both cores: the same without `taskset -c 1`. Loaded machine: add --config.timing.clock=process.
Smoke (tests): `:runlocal`.

(256 x 2048) . (2048 x 2048) through jax.vjp, jitted. Variants:
  int8 x3               int8_dynamic(): forward, dlhs = g.W^T and drhs = x^T.g all int8 x int8 -> int32, drhs with
                        a row-major x^T (layout constraint) so all three stay on XLA's fast kernel (recorded per matmul)
  int8 x3, naive drhs   (contrast) drhs_row_major=False: XLA up-casts the transposed int8 operand to int32
  int8 fwd, f32 bwd     only the forward in int8
Target: int8 x3 <= 0.35x the f32 fwd+bwd time. Expected (Zen 5, VNNI): each int8 matmul ~4.2x f32 on one core;
the naive drhs ~0.4x. Takes ~1 min.
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None or 'runlocal' (tiny shape)."""
  a = config_cli.config_args(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.suite = 'train_matmul'
  c.train_shape = (256, 2048, 2048)   # B, K, N: x (B, K), w (K, N)
  c.seed = 0
  c.inspect = True
  c.flag_tolerance = 0.0
  c.timing = ml_collections.ConfigDict({'warmup': 2, 'rounds': 11, 'min_time': 0.2, 'clock': 'wall'})
  if a['runlocal']:
    c.train_shape = (64, 64, 64)   # int8 in all three matmuls
    c.timing = ml_collections.ConfigDict({'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'})
  return c
