r"""The GPU suite: int8 and fp8 against bfloat16 on an accelerator, every figure a ratio taken in the same run.

    python -m experiments.bench --config=configs/bench_gpu.py --workdir=runs/gpu/bench
    bash experiments/gpu.sh [OUTDIR]       # the GPU tests, then this suite, all output in one folder

Groups (each timed interleaved against its own bfloat16 baseline, experiments/bench/groups.py):
  gemm MxKxN      lax.dot_general: bf16 x bf16 -> bf16 (baseline), f32, int8 x int8 -> int32, fp8 e4m3 x e4m3 ->
                  f32 and e5m2 x e4m3 -> f32 (the gradient matmul of fp8 training): what XLA's kernels give.
  qdot MxKxN      qjax.ops.dot_general forward on bf16 operands: dynamic int8 (both operands quantized in the
                  call), serving int8 W (pre-quantized weight, a QArray), dynamic fp8, and the bare int8 dot of
                  already quantized operands (the ceiling of the first two).
  charlm train    the experiments' char-LM Transformer in bfloat16 (config.charlm: d_model, layers, heads,
                  batch x seq), one adam step jitted with the state donated: the bf16 step (baseline), QAT with
                  an int8 forward, QAT with a fake-quant forward, int8 training (all three matmuls int8) and fp8
                  training (e4m3 forward, e5m2 gradients, delayed scaling over an amax history).
  charlm serve bB the bf16 forward (baseline) and the PTQ int8 serving forward (calibrated static activation
                  ranges, int8 weights converted by convert_nnx) at batch B sequences.
Records (untimed): compiled memory of every step and forward (XLA's memory analysis), the device's memory
statistics, and the device, driver, CUDA and jax versions (jax.print_environment_info).

Timing syncs once per sample (config.timing.sync_each=False), so the GPU's queue stays full as in training.
Every variant records the inspection of its compiled program (qjax.ops.inspect_matmuls): int8 / fp8 matmuls on a
tensor-core GEMM kernel (cuBLAS(Lt) custom call or Triton GEMM fusion) or not, and why not (`fallbacks`).
A group that fails (an XLA error on one variant, out of memory) is recorded with its error and the run goes on;
config.time_budget_s skips the groups that would start after that many seconds.

On the CPU the suite runs too (bfloat16 is emulated there, so the ratios mean little): `:runlocal` is the smoke
test of tests/test_bench_gpu.py.
"""

from __future__ import annotations

import dataclasses
import gc
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from experiments import models
from experiments.bench import e2e
from experiments.bench import harness as bench
from experiments.bench.groups import (
  DN,
  Group,
  GroupedSuite,
  Target,
  Variant,
  matmul_operands,
  maybe_inspect,
  parse_shape,
  shape_name,
)
from experiments.bench.memory import compiled_memory
from experiments.config import quant as quant_config
from experiments.training import summaries, trainers
from qjax import quantizers
from qjax.ops import config as qconfig
from qjax.ops import dot_general as qdot_general
from qjax.spec import QuantSpec

BASELINE = 'bf16'
DTYPES = {
    'bf16': (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),   # (lhs, rhs, output)
    'f32': (jnp.float32, jnp.float32, jnp.float32),
    'int8 -> int32': (jnp.int8, jnp.int8, jnp.int32),
    'fp8 e4m3 -> f32': (jnp.float8_e4m3fn, jnp.float8_e4m3fn, jnp.float32),
    'fp8 e5m2 x e4m3 -> f32': (jnp.float8_e5m2, jnp.float8_e4m3fn, jnp.float32),
}
# Time ratios to bf16 asked of an H200 (the targets; the int8 and fp8 hardware ceilings are 0.5x).
GEMM_TARGETS = {'int8 -> int32': 0.6, 'fp8 e4m3 -> f32': 0.6}
TRAIN_TARGETS = {'QAT, int8 forward': 0.85, 'fp8 training (delayed scaling)': 0.8}
SERVE_TARGET = ('PTQ int8 serving', 0.6, 64)   # variant, max ratio, at this batch


# ---------------------------------------------------------------------------------------------- operands


def _gemm_operands(m: int, k: int, n: int, seed: int = 0):
  """f32 x (m, k) ~ N(0, 1) and w (k, n) ~ N(0, 1/k), and their casts per DTYPES name (int8: scaled to use the
  grid without clipping much)."""
  x, w = matmul_operands(m, k, n, seed)
  out = {}
  for name, (lt, rt, _) in DTYPES.items():
    if lt == jnp.int8:
      out[name] = (jnp.clip(jnp.round(x * 40), -127, 127).astype(jnp.int8),
                   jnp.clip(jnp.round(w * 40 * k ** 0.5), -127, 127).astype(jnp.int8))
    else:
      out[name] = (x.astype(lt), w.astype(rt))
  return out


def _dot(out_t):
  return jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=out_t))


# ----------------------------------------------------------------------------------------------- groups


def gemm_group(config, m: int, k: int, n: int) -> Group:
  ops = _gemm_operands(m, k, n, config.get('seed', 0))
  variants = {}
  for name, (_, _, out_t) in DTYPES.items():
    f = _dot(out_t)
    a, b = ops[name]
    role = 'baseline' if name == BASELINE else 'reference'
    variants[name] = Variant(lambda f=f, a=a, b=b: f(a, b), role, {'inspect': maybe_inspect(config, f, a, b)})
  targets = ()
  if (m, k, n) == tuple(config.target_shape):
    targets = tuple(Target(v, r, f'{v} GEMM at {shape_name(m, k, n)} <= {r}x bf16')
                    for v, r in GEMM_TARGETS.items())
  return Group(f'gemm {shape_name(m, k, n)}', variants, BASELINE,
                  {'shape': [m, k, n], 'tflop': 2 * m * k * n / 1e12}, targets)


def qdot_group(config, m: int, k: int, n: int) -> Group:
  x, w = matmul_operands(m, k, n, config.get('seed', 0))
  x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  int8 = qconfig.int8_dynamic(bwd_bits=None)
  fp8 = dataclasses.replace(qconfig.fp8(), dlhs=qconfig.MatmulConfig(), drhs=qconfig.MatmulConfig())
  wspec = QuantSpec(format='int8', granularity='per_channel', axis=1)   # one scale per output column
  wq = jax.jit(lambda w: quantizers.quantize(w.astype(jnp.float32), wspec))(w)
  variants = {}
  bf16 = _dot(jnp.bfloat16)
  variants[BASELINE] = Variant(lambda: bf16(x, w), 'baseline', {'inspect': maybe_inspect(config, bf16, x, w)})
  for name, cfg, rhs in (('dynamic int8', int8, w), ('serving int8 W', int8, wq), ('dynamic fp8', fp8, w)):
    f = jax.jit(lambda x, r, cfg=cfg: qdot_general(x, r, DN, config=cfg))
    variants[name] = Variant(lambda f=f, r=rhs: f(x, r), 'quantized',
                                {'inspect': maybe_inspect(config, f, x, rhs), 'config': cfg.to_dict()})
  xq = jax.jit(lambda x: quantizers.quantize(x.astype(jnp.float32), wspec.replace(axis=0)))(x)
  bare = _dot(jnp.int32)
  variants['bare int8 dot'] = Variant(lambda: bare(xq.qvalue, wq.qvalue), 'reference',
                                         {'inspect': maybe_inspect(config, bare, xq.qvalue, wq.qvalue)})
  return Group(f'qdot {shape_name(m, k, n)}', variants, BASELINE, {'shape': [m, k, n]})


def charlm_def(config) -> models.ModelDef:
  return e2e.model_def('char_lm', config)


def charlm_batch(config, batch: int, seed: int = 0):
  return e2e.random_batch(batch, seed, 'char_lm', config)   # (batch, seq) inputs and next-token targets


def gpu_rules(kind: str, config):
  """Rules of one quantized configuration: e2e.quant_rules' kinds, plus 'fp8_train' (e4m3 weights and
  activations per tensor, e5m2 gradients, delayed scaling over config.fp8_history steps)."""
  if kind != 'fp8_train':
    return e2e.quant_rules(kind, config)
  q = quant_config.default_quant_config()
  q.act_signedness = 'format'  # fp8 grids have no unsigned form; no probe run before the timed step
  q.weight.format, q.weight.granularity = 'fp8_e4m3', 'per_tensor'
  q.act.format, q.act.granularity = 'fp8_e4m3', 'per_tensor'
  q.grad.format, q.grad.granularity = 'fp8_e5m2', 'per_tensor'
  q.delayed_scaling = int(config.fp8_history)
  return quant_config.build_rules(q)


TRAIN_KINDS = {
    'QAT, int8 forward': 'qat',
    'QAT, fake-quant forward': 'qat_fake',
    'int8 training (fwd + bwd int8)': 'int8_train',
    'fp8 training (delayed scaling)': 'fp8_train',
}


def _train_variant(md, rules, x, y, config, role, memory: dict, label: str) -> Variant:
  trainer = trainers.make(md, optax.adam(1e-4), rules)
  state = trainer.init(jax.random.key(config.get('seed', 0)), x)
  stepper = e2e.Stepper(trainer, state, x, y)
  memory[label] = {**compiled_memory(stepper.step, state, x, y), 'state_bytes': summaries.tree_bytes(state)}
  return Variant(stepper, role, {'inspect': maybe_inspect(config, stepper.step, state, x, y)})


def train_group(config, memory: dict) -> Group:
  md = charlm_def(config)
  c = config.charlm
  x, y = charlm_batch(config, c.train_batch)
  variants = {'bf16 step': _train_variant(md, None, x, y, config, 'baseline', memory, 'train / bf16 step')}
  for name in config.train_variants:
    variants[name] = _train_variant(md, gpu_rules(TRAIN_KINDS[name], config), x, y, config, 'quantized', memory,
                                    f'train / {name}')
  targets = tuple(Target(v, r, f'char-LM {v} step <= {r}x the bf16 step')
                  for v, r in TRAIN_TARGETS.items() if v in variants)
  meta = {'model': 'char_lm', 'batch': c.train_batch, 'seq_len': c.seq_len, 'd_model': c.d_model,
          'num_layers': c.num_layers, 'dtype': c.dtype}
  return Group(f'charlm train b{c.train_batch}x{c.seq_len}', variants, 'bf16 step', meta, targets)


def serve_group(config, batch: int, memory: dict) -> Group:
  md = charlm_def(config)
  x, _ = charlm_batch(config, batch, seed=1)
  ff, fv = e2e.serving_forward(md, None, x, config)
  qf, qv = e2e.serving_forward(md, gpu_rules('ptq', config), x, config)
  memory[f'serve b{batch} / bf16 forward'] = compiled_memory(ff, fv, x)
  memory[f'serve b{batch} / PTQ int8 serving'] = compiled_memory(qf, qv, x)
  variants = {
      'bf16 forward': Variant(lambda: ff(fv, x), 'baseline', {'inspect': maybe_inspect(config, ff, fv, x)}),
      'PTQ int8 serving': Variant(lambda: qf(qv, x), 'quantized',
                                     {'inspect': maybe_inspect(config, qf, qv, x),
                                      'param_bytes': summaries.tree_bytes(qv),
                                      'float_param_bytes': summaries.tree_bytes(fv)}),
  }
  name, limit, at = SERVE_TARGET
  targets = (Target(name, limit, f'char-LM PTQ serving (int8 weights) at batch {at} <= {limit}x bf16'),) \
      if batch == at else ()
  return Group(f'charlm serve b{batch}', variants, 'bf16 forward', {'batch': batch}, targets)


def _failed_group(name: str, err: BaseException) -> Group:
  """A placeholder group for one that could not be built: its error is recorded, nothing is timed but a no-op."""
  return Group(name, {'(failed)': Variant(lambda: None, 'baseline')}, '(failed)',
                  {'error': f'{type(err).__name__}: {str(err)[:2000]}'})


# ------------------------------------------------------------------------------------------------ records


def environment() -> dict[str, Any]:
  """The device, driver, CUDA and library versions as jax reports them (nvidia-smi included on GPU)."""
  out: dict[str, Any] = {'devices': [str(d) for d in jax.devices()], 'device_kind': jax.devices()[0].device_kind}
  try:
    out['jax_environment'] = jax.print_environment_info(return_string=True)
  except Exception as e:  # noqa: BLE001 -- informational only
    out['jax_environment'] = f'unavailable: {e}'
  try:
    q = 'name,driver_version,memory.total,clocks.max.sm'
    out['nvidia_smi'] = subprocess.run(['nvidia-smi', f'--query-gpu={q}', '--format=csv,noheader'],
                                       capture_output=True, text=True, timeout=30).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    out['nvidia_smi'] = None
  return out


def gpu_suite(config) -> GroupedSuite:
  t_start = time.perf_counter()
  memory: dict[str, Any] = {}
  skipped: list[str] = []

  def builders():
    for s in config.gemm_shapes:
      shape = parse_shape(s)
      yield f'gemm {s}', lambda shape=shape: gemm_group(config, *shape)
    for s in config.qdot_shapes:
      shape = parse_shape(s)
      yield f'qdot {s}', lambda shape=shape: qdot_group(config, *shape)
    # The first serving batch (the target's) runs before the long training group, the others after it, so a
    # time budget that runs out costs the least informative groups.
    serve = [(f'charlm serve b{b}', lambda b=b: serve_group(config, b, memory)) for b in config.charlm.serve_batches]
    yield from serve[:1]
    if config.charlm.train_batch:
      yield 'charlm train', lambda: train_group(config, memory)
    yield from serve[1:]

  def groups():
    for name, build in builders():
      if time.perf_counter() - t_start > config.time_budget_s:
        skipped.append(name)
        continue
      try:
        group = build()
      except Exception as e:  # noqa: BLE001 -- recorded in the results; the other groups still run
        print(f'gpu suite: group {name!r} failed: {type(e).__name__}: {str(e)[:500]}', flush=True)
        group = _failed_group(name, e)
      yield group
      del group
      gc.collect()
    jax.clear_caches()

  def records():
    stats = jax.local_devices()[0].memory_stats()
    return {'environment': environment(), 'compiled_memory': memory, 'skipped_for_time': skipped,
            'device_memory_stats': stats if stats else 'not available on this backend (None)'}

  meta = {'rules': {k: [r.to_dict() for r in gpu_rules(k, config)] for k in set(TRAIN_KINDS.values()) | {'ptq'}}}
  return GroupedSuite('gpu', groups, meta=meta, records=records)


bench.register('gpu')(gpu_suite)
