r"""Benchmark: per-channel int8 fake_quant of a (4096, 4096) f32 array vs a plain `x * 1.0` round trip.

Steady figures (one core, huge pages for the fresh 64 MiB outputs; see docs/benchmarks.md):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 taskset -c 1 \
    python -m experiments.bench --config=configs/bench_fake_quant.py --workdir=runs/bench/fake_quant
Both cores: the same without `taskset -c 1`. Smoke: --config=configs/bench_fake_quant.py:runlocal

Both variants are jitted and timed interleaved in one run. `x * 1.0` is folded by XLA into a copy (read 64 MiB,
write 64 MiB); fake_quant with calibration='absmax' must also read x once more to find the per-channel
scales, so about 1.5x is the memory-traffic floor. Aim: fake_quant <= 2x `x * 1.0`.
Expected (docs/benchmarks.md; AMD EPYC Zen 3, AVX2, jax 0.12, 2026-11-26): fake_quant ~1.7x on one core
(calibration ~0.55x, the elementwise pass ~1.15x); 2.45x before the speed-ups
(--config.before=true times that forward too). Page faults hide it all without huge pages: ~1.1x, both ~60 ms.
Takes ~30 s.
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg='runlocal'` shrinks it to a (256, 256) array and a few short samples."""
  a = config_cli.config_args(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.suite = 'fake_quant'       # experiments/bench/fake_quant.py
  config.shape = (4096, 4096)
  config.seed = 0
  config.quant = ml_collections.ConfigDict()
  config.quant.format = 'int8'
  config.quant.granularity = 'per_channel'
  config.quant.axis = -1            # One scale per column: scale shape (1, 4096).
  config.quant.calibration = 'absmax'
  config.quant.estimator = 'ste'
  config.extra_variants = True      # Also time calibration alone and fake_quant at a given scale.
  config.before = False             # Also time the forward as of commit e1c5dff (before/after, benchmarks.md).
  config.timing = ml_collections.ConfigDict()
  config.timing.warmup = 2
  config.timing.rounds = 15
  config.timing.min_time = 0.2      # Seconds per sample.
  config.timing.clock = 'wall'      # 'process': CPU time, steadier when other processes load the machine.
  if a['runlocal']:
    config.shape = (256, 256)
    config.timing.warmup = 1
    config.timing.rounds = 3
    config.timing.min_time = 0.001
  return config
