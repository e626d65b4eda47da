r"""Benchmark (no timing): memory of quantized models.

  python -m experiments.bench --config=configs/bench_memory.py --workdir=runs/bench/memory
Smoke (tests): `:runlocal`.

On the NNX MLP 784-2048-2048-10 (batch 256):
  served_param_bytes     parameters as served: float32, int8 (convert_nnx) and int4 packed two per byte
  train_step_memory      the compiled training step (donated state): argument / output / alias / temp bytes from
                         jax.jit(...).lower(...).compile().memory_analysis(), for float, QAT and int8 training
  quantize_nnx_live_bytes  live jax array bytes before and after quantize_nnx, and the peak sampled during it,
                         relative to the model alone (target <= 1.3x)
Expected: int8 ~0.25x and int4 ~0.13x of the float parameter bytes (biases and scales stay f32); quantize_nnx
adds only scales and statistics. Takes ~1 min.
"""

import ml_collections

from experiments.config import cli as config_cli


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """arg: None or 'runlocal' (a tiny MLP)."""
  a = config_cli.config_args(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.suite = 'memory'
  c.mlp_hidden = (2048, 2048)
  c.train_batch = 256
  c.calibration_batches = 1
  c.quant_overrides = ml_collections.ConfigDict()
  c.seed = 0
  if a['runlocal']:
    c.mlp_hidden = (32,)
    c.train_batch = 8
  return c
