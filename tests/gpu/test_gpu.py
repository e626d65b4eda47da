"""qjax on a GPU: real int8 and fp8 execution equals fake quant, on the tensor-core GEMM kernels, checked in the
compiled HLO. Skipped without a GPU (JAX_PLATFORMS=cuda selects it; tests/conftest.py defaults to the CPU).

    JAX_PLATFORMS=cuda python -m pytest -q tests/gpu         (experiments/gpu.sh runs this first)

Exactness: power-of-two scales make every fake-quantized value q * 2^e, so an f32 matmul of the fake-quantized
operands is exact while the partial sums stay below 2^24 units, and equals the int32 matmul rescaled. fp8
products are exact in f32 too (3 + 3 mantissa bits), so fp8 real == fake up to the accumulation order and the
accumulator width of the fp8 tensor cores: compared with a tolerance of 2^-10 relative to the output scale.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import QuantSpec, ops
from qjax.ops import DotConfig, MatmulConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU (JAX_PLATFORMS=cuda)')

DN = (((1,), (0,)), ((), ()))
SHAPES = {'aligned': (256, 512, 128), 'odd': (30, 100, 6), 'llm': (2048, 1024, 4096)}


def operands(m, k, n, seed=0):
  """U[-1, 1] times 2^e per row of x and per column of w (e in -2..2): scales differ across channels."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (m, k)) * np.exp2(rng.integers(-2, 3, (m, 1)))
  w = rng.uniform(-1, 1, (k, n)) * np.exp2(rng.integers(-2, 3, (1, n)))
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)


def fwd_bwd(cfg):
  def run(x, w):
    y, vjp = jax.vjp(lambda x, w: ops.dot_general(x, w, DN, config=cfg), x, w)
    return (y, *vjp(jnp.cos(y)))
  return jax.jit(run)


def int8_config(mode):
  spec = QuantSpec(format='int8', granularity='per_channel', po2_scale=True)
  mm = MatmulConfig(spec, spec, mode)
  return DotConfig(fwd=mm, dlhs=mm, drhs=mm, small_m=0)


@pytest.mark.parametrize('shape', list(SHAPES))
def test_real_int8_equals_fake_on_gpu(shape):
  """Forward: real and fake each against the exact product of the quantized operands, computed in float64 on the
  host (so a failure says which side is off); then all three matmuls real == fake.

  Seen on an H200 (jax 0.11.2, 2026-12-04): at 256x512x128 the real forward came out exactly 2x the fake one;
  the reference check tells which side is wrong."""
  x, w = operands(*SHAPES[shape])
  real = fwd_bwd(int8_config('real'))(x, w)
  fake = fwd_bwd(int8_config('fake'))(x, w)
  xs = QuantSpec(format='int8', granularity='per_channel', axis=0, po2_scale=True)  # per row of x
  ws = QuantSpec(format='int8', granularity='per_channel', axis=1, po2_scale=True)  # per column of w
  ref = np.asarray(qjax.fake_quant(x, xs), np.float64) @ np.asarray(qjax.fake_quant(w, ws), np.float64)
  np.testing.assert_array_equal(np.asarray(fake[0], np.float64), ref, err_msg='fake fwd vs exact reference')
  np.testing.assert_array_equal(np.asarray(real[0], np.float64), ref, err_msg='real fwd vs exact reference')
  for r, f, what in zip(real, fake, ('fwd', 'dlhs', 'drhs'), strict=True):
    np.testing.assert_array_equal(np.asarray(r), np.asarray(f), err_msg=what)


@pytest.mark.parametrize('shape', list(SHAPES))
def test_int8_matmuls_run_on_gemm_kernels(shape):
  """All three int8 matmuls are s8 x s8 -> s32 on a cuBLAS / Triton GEMM kernel, none widened (odd dims padded)."""
  x, w = operands(*SHAPES[shape])
  rep = ops.inspect_matmuls(fwd_bwd(int8_config('real')), x, w)
  assert rep.platform == 'gpu'
  assert rep.n_int8 == rep.n_int8_fast == 3 and rep.n_int8_slow == 0, rep.summary()
  assert rep.fallbacks() == [], rep.summary()


def fp8_config(mode):
  e4 = QuantSpec(format='fp8_e4m3', po2_scale=True)
  e5 = QuantSpec(format='fp8_e5m2', po2_scale=True)
  return DotConfig(fwd=MatmulConfig(e4, e4, mode), dlhs=MatmulConfig(e5, e4, mode), drhs=MatmulConfig(e4, e5, mode),
                   small_m=0)


# Tolerance relative to the largest output: the gradient matmuls accumulate exactly (HIGHEST precision: cuBLASLt
# promotes to f32), the forward with fast accumulation (DEFAULT: Hopper's fp8 tensor cores keep about 14 bits of
# each product per block of the contraction). On an H200 the fast forward differed from fake by up to 3.7% of the
# largest output at 256x512x128 (2026-12-04), so its bound only catches gross errors.
FP8_ATOL = {'fwd': 2.0 ** -3, 'dlhs': 2.0 ** -10, 'drhs': 2.0 ** -10}


@pytest.mark.parametrize('shape', ['aligned', 'odd'])
def test_real_fp8_matches_fake_on_gpu(shape):
  x, w = operands(*SHAPES[shape], seed=1)
  real = fwd_bwd(fp8_config('real'))(x, w)
  fake = fwd_bwd(fp8_config('fake'))(x, w)
  for r, f, what in zip(real, fake, ('fwd', 'dlhs', 'drhs'), strict=True):
    r, f = np.asarray(r, np.float64), np.asarray(f, np.float64)
    assert np.all(np.isfinite(r)), what
    np.testing.assert_allclose(r, f, rtol=0, atol=FP8_ATOL[what] * np.max(np.abs(f)), err_msg=what)


def test_fp8_matmuls_run_in_fp8():
  x, w = operands(*SHAPES['llm'], seed=2)
  rep = ops.inspect_matmuls(fwd_bwd(fp8_config('real')), x, w)
  assert rep.n_fp8 == rep.n_fp8_fast == 3 and rep.n_widened == 0, rep.summary()


def test_prequantized_bf16_serving_on_gpu():
  """A bf16 activation times a pre-quantized int8 weight (QArray): bf16 result, the int8 GEMM on a library
  kernel, and the same values as the fake-quant forward."""
  from qjax import quantizers
  x, w = operands(*SHAPES['llm'], seed=3)
  cfg = dataclasses.replace(int8_config('real'), dlhs=MatmulConfig(), drhs=MatmulConfig())
  wq = quantizers.quantize(w, QuantSpec(format='int8', granularity='per_channel', axis=1, po2_scale=True))
  xb = x.astype(jnp.bfloat16)
  f = jax.jit(lambda x, w: ops.dot_general(x, w, DN, config=cfg))
  y = f(xb, wq)
  assert y.dtype == jnp.bfloat16
  fake = jax.jit(lambda x, w: ops.dot_general(x, w, DN, config=dataclasses.replace(
      cfg, fwd=dataclasses.replace(cfg.fwd, mode='fake'))))(xb, quantizers.dequantize(wq))
  assert fake.dtype == jnp.float32  # bf16 x (dequantized) f32: the fake path's result is f32; round it as y was
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(fake.astype(jnp.bfloat16), np.float32))
  rep = ops.inspect_matmuls(f, xb, wq)
  assert rep.n_int8 == rep.n_int8_fast == 1, rep.summary()


def test_bf16_model_backward_stays_bf16():
  """QAT of a bf16 layer: the float backward matmuls run in bf16 (not f32), as the float model's do."""
  x, w = operands(*SHAPES['llm'], seed=4)
  cfg = dataclasses.replace(int8_config('real'), dlhs=MatmulConfig(), drhs=MatmulConfig())
  rep = ops.inspect_matmuls(fwd_bwd(cfg), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  cats = sorted(m.category for m in rep.compiled)
  assert cats == ['bf16', 'bf16', 'int8'], rep.summary()


@pytest.mark.skipif(jax.device_count() < 2, reason='sharding needs two or more devices; this machine has one GPU')
def test_sharded_int8_forward_has_no_collective():
  """Weights sharded along the output dim: the quantized forward compiles with no collective, like float."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((jax.device_count(),), ('model',))
  x, w = operands(256, 512, 128 * jax.device_count())
  f = jax.jit(lambda x, w: ops.dot_general(x, w, DN, config=int8_config('real')),
              in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P(None, 'model'))))
  rep = ops.inspect_matmuls(f, x, w)
  assert rep.collectives == () and rep.n_int8_fast == 1, rep.summary()
  unsharded = jax.jit(lambda x, w: ops.dot_general(x, w, DN, config=int8_config('real')))(x, w)
  np.testing.assert_array_equal(np.asarray(f(x, w)), np.asarray(unsharded))
