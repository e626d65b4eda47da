r"""Benchmark: the experiments' models quantized by qjax.flax rules against the float model, end to end.

Steady figures (one core; malloc pinned and huge pages against page faults; docs/benchmarks.md):
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
  MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 taskset -c 1 python -m experiments.bench \
    --config=configs/bench_e2e.py --workdir=runs/bench/e2e_1c
Both cores: the same without `taskset -c 1`. Loaded machine: add --config.timing.clock=process.
One model: --config.models="('mlp',)". Smoke (tests): `:runlocal`. Sub-byte weights (packed in the serving
tree): `:weight=int4` (or int3, int2) quantizes every weight at that width, activations at int8.

Models: the NNX MLP 784-2048-2048-10, the Linen LeNet-5 and ResNet, and the NNX char-LM Transformer of
experiments/models/, unmodified, quantized by
rules built from experiments/config/quant.py's defaults (int8 weights per channel, int8 activations per tensor) the
way `python -m experiments.train` builds them; adam; steps jitted with the state donated. Groups:
  <model> train b256   float step vs QAT (real int8 forward), QAT (fake-quant forward), int8 training (forward
                       and both backward matmuls int8: mode quantized_training); with
                       "--config.qat_estimators=('lsq','pact')" also QAT with learned steps (LSQ) or clips (PACT)
  <model> serve b<B>   float forward vs the PTQ int8 serving forward (calibrated static activation ranges,
                       weights converted to int8 by convert_nnx / convert_linen), per batch in serve_batches
After every group, a '<group> bare' group times the float program's dots and convs alone, as written and as int8
GEMMs of the same arithmetic (--config.bare_kernels=False skips them): the report's bound table gives the matmul
share of float, the bare int8 kernel's ratio on the model's own shapes and the bound (the time ratio if only the
matmuls got faster; experiments/bench/kernels.py).
Targets (time ratios to float): QAT int8 forward <= 0.75x, QAT fake-quant <= 1.1x, int8 training <= 0.53x
(>= 1.9x faster), PTQ serving at batch >= 256 <= 0.27x. Peers as measured on an AVX-512 VNNI EPYC (jax 0.10.2): Qwix QAT
0.86x, Qwix PTQ forward 0.30x, AQT int8-forward 0.88x, AQT fully quantized 2.8x, Qwix fully quantized 1.8-1.9x.
Expected (Intel Xeon with VNNI, 2026-12-05): matmul shares of 54-99% of the float programs (39% for the
char-LM's page-faulting forward at 256 sequences), bare int8 kernels at 0.11-0.22x on the models' own shapes
(0.51x at LeNet-5's batch 1, 2.2x for the MLP's single row), bounds of 0.12x (MLP serving) to 0.57x. On an
AVX2-only AMD Zen 3 (2026-12-06, jax 0.12.0.1): bare int8 kernels at 0.20-0.87x, bounds of 0.36x to 0.90x, the
MLP's one-row serving at 0.66-0.73x and its int8 training step at 0.83x (91% of its bound's saving); on jax
0.12.1 (two runs): bare int8 kernels at 0.16-0.89x, the MLP's one-row serving at 0.38-0.41x (float's matrix-vector
product is slower there), its int8 training step at 0.87-0.92x, the char-LM's serving at 1 and 8 sequences
slower than float (1.08-1.23x). On an AMD Zen 4 with AVX-512 VNNI (jax 0.12.1, 2026-12-07, run U):
bare int8 kernels at 0.08-0.36x, the MLP's one-row serving at 0.29x, LeNet-5's serving at 0.47-0.88x, the
ResNet's at 0.57-0.75x, the char-LM's at 0.59-0.72x, int8 training steps at 0.47x (MLP), 0.55x (LeNet-5), 0.53x
(ResNet) and 0.59x (char-LM).
Takes ~15 min (one model: --config.models="('char_lm',)").
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: comma-separated 'runlocal' (a tiny MLP, batches of 8), 'weight=<int format>' (every weight's width)."""
  a = config_cli.config_args(arg, runlocal=False, weight='int8')
  c = ml_collections.ConfigDict()
  c.suite = 'e2e'
  c.models = ('mlp', 'lenet5', 'resnet', 'char_lm')
  # The char-LM (experiments/bench/e2e.py: CHARLM: d_model 128, 2 layers, 128-character windows) trains at 32
  # sequences and serves 1, 8, 64 and 256 sequences; override any of its sizes here.
  c.charlm = ml_collections.ConfigDict({'train_batch': 32, 'serve_batches': (1, 8, 64, 256)})
  c.mlp_hidden = (2048, 2048)
  c.train_batch = 256
  c.serve_batches = (1, 8, 64, 256, 1024)   # 1 row: int8, padded to two rows on CPU (decode)
  c.calibration_batches = 2
  # Extra QAT variants (int8 forward) whose weights and activations learn their quantizer parameters, one per
  # estimator named here, e.g. ('lsq', 'pact'): what learning the steps or clips costs per step.
  c.qat_estimators = ()
  c.quant_overrides = ml_collections.ConfigDict()   # e.g. {'act__granularity': 'per_channel'} ('__' for '.')
  if a['weight'] != 'int8':
    c.quant_overrides.weight__format = a['weight']
  c.seed = 0
  c.inspect = True
  # Time the float program's matmuls alone, as written and as int8 GEMMs: the bare kernel and the bound it sets.
  c.bare_kernels = True
  c.flag_tolerance = 0.0
  c.timing = ml_collections.ConfigDict({'warmup': 3, 'rounds': 9, 'min_time': 0.3, 'clock': 'wall'})
  if a['runlocal']:
    c.mlp_hidden = (32,)
    c.models = ('mlp', 'lenet5', 'char_lm')
    c.charlm = ml_collections.ConfigDict({'d_model': 16, 'num_heads': 2, 'num_layers': 1, 'seq_len': 8,
                                          'train_batch': 2, 'serve_batches': (1, 2)})
    c.train_batch = 8
    c.serve_batches = (1, 8)
    c.calibration_batches = 1
    c.timing = ml_collections.ConfigDict({'warmup': 1, 'rounds': 2, 'min_time': 0.001, 'clock': 'wall'})
  return c
