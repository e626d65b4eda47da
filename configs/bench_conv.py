r"""Benchmark: int8 convolutions on XLA:CPU: XLA's int8 conv vs patches + one int8 matmul, against the f32 conv.

Steady figures (one core; malloc pinned and huge pages, docs/benchmarks.md):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
  MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 taskset -c 1 python -m experiments.bench --config=configs/bench_conv.py \
    --workdir=runs/bench/conv --config.timing.clock=process
Smoke (tests): `:runlocal`.

Shapes (batch x H x C_in x C_out x k): LeNet-5's convs (1 -> 6 and 6 -> 16 at 5x5), the ResNet's 16 -> 16 3x3 at
28x28 and 32 -> 32 at 14x14. Expected (Intel Xeon with VNNI, 2026-12-05): XLA's int8 conv 0.83x for one input
feature, 4.2-8.1x (up-cast to s32) for 6 and 16 features and 0.43x for 32; the patch lowering by chunks 0.28-0.67x
(qjax's route for all but the 32 -> 32 conv), in one chunk 0.24-2.05x; patches in two stages 0.27-0.33x for the
5x5 kernels (qjax's choice) and 1.40x for the 16 -> 16 3x3 one (one stage: 0.64x). For the convs XLA runs
slowly, XLA's int8 conv with its output features padded to 17 (on the fast kernel): 2.15x (6 -> 16) and 0.83x
(16 -> 16), slower than the patches (2026-12-06). On an AMD Zen 4 with VNNI (jax 0.12.1, 2026-12-07 late, commit
a348258, patches of 16+ int8 features moved as 4-byte words, chunks that divide the batch): patches 0.23x, 0.30x,
0.48x and 0.40x (XLA's int8 conv 0.56x, up-cast 4.53x and 7.02x, 0.51x); the f32 kernel gradient as
patches^T . g 1.28x and 1.38x against XLA's conv 1.28x and 1.25x for the 16 -> 16 and 32 -> 32 convs (that route
is not faster on this CPU).
The input gradients of the ResNet's stride-2 convs (config.dlhs_shapes; the same run): XLA's int8 conv 5.9-9.8x
(up-cast; 0.68x for the 1x1), patches of the dilated g 0.91-1.31x, qjax's sub-pixel patches 0.38-0.48x.
Pixel pairs as features (Zen 4, 2026-12-08): 0.42x for 6 -> 16 and 0.65x for 16 -> 16, against the patches' 0.30x
and 0.49x in the same run.
About 1 minute. `"--config.chunk_examples=(1,2,4,8,16,32)"` adds a variant per chunk size (the figures behind
qjax.ops.conv_gemm.CHUNK_PATCH_BYTES).
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None or 'runlocal' (tiny shapes)."""
  a = config_cli.config_args(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.suite = 'conv'
  c.shapes = ('256x28x1x6x5', '256x14x6x16x5', '256x28x16x16x3', '256x14x32x32x3')
  # The input gradients of the ResNet's strided convs (forward BATCHxHxC_INxC_OUTxKxSTRIDE, SAME): lhs-dilated
  # convs, which XLA:CPU up-casts to s32 whatever their features.
  c.dlhs_shapes = ('256x28x16x32x3x2', '256x28x16x32x1x2', '256x14x32x64x3x2')
  c.pad_features = 32           # the padded variant's feature count (XLA's fast int8 conv needs more than 16)
  c.chunk_examples = ()         # extra variants: the patch lowering with this many examples per chunk, e.g. (1,4,16)
  c.seed = 0
  c.inspect = True
  c.flag_tolerance = 0.0
  c.timing = ml_collections.ConfigDict({'warmup': 2, 'rounds': 7, 'min_time': 0.1, 'clock': 'wall'})
  if a['runlocal']:
    c.shapes = ('4x8x1x6x5', '4x8x6x16x3')
    c.dlhs_shapes = ('4x9x4x6x3x2',)
    c.timing = ml_collections.ConfigDict({'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'})
  return c
