"""Paths written for GPUs, checked on the CPU: padding of low-precision dots, bf16 float matmuls, bf16 serving.

Padding (qjax.ops.dot_general.low_precision_dot):
On GPU every int8 / fp8 dot's contracting dims and minor-most free dims are zero-padded to multiples of 16 so
that cuBLAS(Lt) takes it; the result is sliced back. Here the padding is forced on the CPU (multiple=16, or
pad_multiple patched) and the results must equal the unpadded integer products exactly, for odd shapes, batch
dims, two contracting dims, asymmetric (zero-point) operands and per-group scales, forward and both gradients.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from qjax import QuantSpec, ops
from qjax.ops import DotConfig, MatmulConfig

dg = importlib.import_module('qjax.ops.dot_general')


def dn(lc, rc, lb=(), rb=()):
  return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


CASES = {
    'mk_kn odd': ((30, 100), (100, 6), dn((1,), (0,))),
    'mk_nk': ((17, 33), (5, 33), dn((1,), (1,))),
    'batch': ((3, 7, 20), (3, 20, 9), dn((2,), (1,), (0,), (0,))),
    'two contract': ((3, 6, 5), (5, 7, 3), dn((0, 2), (2, 0))),
    'aligned': ((32, 64), (64, 16), dn((1,), (0,))),
}


@pytest.mark.parametrize('name', list(CASES))
def test_padded_int8_dot_is_exact(name):
  ls, rs, dims = CASES[name]
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.integers(-128, 128, ls), jnp.int8)
  b = jnp.asarray(rng.integers(-128, 128, rs), jnp.int8)
  want = lax.dot_general(a.astype(jnp.int32), b.astype(jnp.int32), dims)
  got = jax.jit(lambda a, b: dg.low_precision_dot(a, b, dims, jnp.int32, multiple=16))(a, b)
  assert got.shape == want.shape and got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)


def test_padding_shows_in_the_program_only_when_needed():
  ls, rs, dims = CASES['mk_kn odd']
  a, b = jnp.ones(ls, jnp.int8), jnp.ones(rs, jnp.int8)
  text = jax.jit(lambda a, b: dg.low_precision_dot(a, b, dims, jnp.int32, multiple=16)).lower(a, b).as_text()
  assert 'tensor<32x112xi8>' in text and 'tensor<112x16xi8>' in text  # (30, 100) -> (32, 112); (100, 6) -> (112, 16)
  ls, rs, dims = CASES['aligned']
  a, b = jnp.ones(ls, jnp.int8), jnp.ones(rs, jnp.int8)
  text = jax.jit(lambda a, b: dg.low_precision_dot(a, b, dims, jnp.int32, multiple=16)).lower(a, b).as_text()
  assert 'stablehlo.pad' not in text


def test_padded_fp8_dot_is_exact():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.standard_normal((9, 40)), jnp.float8_e4m3fn)
  b = jnp.asarray(rng.standard_normal((40, 3)), jnp.float8_e5m2)
  dims = dn((1,), (0,))
  want = lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims)
  got = dg.low_precision_dot(a, b, dims, jnp.float32, multiple=16)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('scheme,granularity', [('symmetric', 'per_channel'), ('asymmetric', 'per_channel'),
                                                ('symmetric', 'per_group')])
def test_quantized_op_unchanged_by_gpu_padding(monkeypatch, scheme, granularity):
  """The whole op (forward, dlhs, drhs in real int8) gives the same values with the GPU padding forced on."""
  kw = dict(format='int8', granularity=granularity, scheme=scheme, po2_scale=True)
  if scheme == 'asymmetric':
    kw['calibration'] = 'minmax'
  if granularity == 'per_group':
    kw['group_size'] = 20
  spec = QuantSpec(**kw)
  mm = MatmulConfig(spec, spec, 'real')
  # Groups of 20 divide K = 100 of the forward only: the gradient matmuls use per-channel scales.
  bspec = spec.replace(granularity='per_channel', group_size=0) if granularity == 'per_group' else spec
  bwd = MatmulConfig(bspec, bspec, 'real')
  cfg = DotConfig(fwd=mm, dlhs=bwd, drhs=bwd, small_m=0)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((30, 100)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((100, 6)), jnp.float32)
  dims = dn((1,), (0,))

  def run(x, w):
    f = lambda x, w: ops.dot_general(x, w, dims, config=cfg)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(jnp.cos(y)))

  base = jax.jit(run)(x, w)
  monkeypatch.setattr(dg, 'pad_multiple', lambda: 16)
  jax.clear_caches()  # the traced program of `run` is cached; retrace with the padding on
  padded = jax.jit(run)(x, w)
  text = jax.jit(run).lower(x, w).as_text()
  assert 'stablehlo.pad' in text
  for b, p in zip(base, padded, strict=True):
    np.testing.assert_array_equal(p, b)


def test_bf16_operands_keep_bf16_float_matmuls():
  """QAT of a bfloat16 layer: the forward is int8, and the float backward matmuls (dlhs, drhs) take bfloat16
  operands as the float model's do (they used to run in f32 on the f32 fake-quantized values)."""
  spec = QuantSpec(format='int8', granularity='per_channel')
  cfg = DotConfig(fwd=MatmulConfig(spec, spec, 'real'), small_m=0)
  x = jnp.ones((32, 64), jnp.bfloat16)
  w = jnp.ones((64, 16), jnp.bfloat16)

  def run(x, w):
    y, vjp = jax.vjp(lambda x, w: ops.dot_general(x, w, dn((1,), (0,)), config=cfg), x, w)
    return (y, *vjp(y))
  rep = ops.inspect_matmuls(run, x, w)
  assert sorted(m.category for m in rep.lowered) == ['bf16', 'bf16', 'int8'], rep.summary()
  y, dx, dw = jax.jit(run)(x, w)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  rep32 = ops.inspect_matmuls(run, x32, w32)
  assert sorted(m.category for m in rep32.lowered) == ['f32', 'f32', 'int8']


def test_prequantized_weight_keeps_activation_dtype():
  """Serving a bfloat16 model: activation (bf16) times a pre-quantized weight (QArray) gives bf16, not f32."""
  from qjax import quantizers
  spec = QuantSpec(format='int8', granularity='per_channel', axis=1)
  wq = quantizers.quantize(jnp.ones((64, 16), jnp.float32), spec)
  op_spec = QuantSpec(format='int8', granularity='per_channel')  # op-relative: per row of x, per column of w
  cfg = DotConfig(fwd=MatmulConfig(op_spec, op_spec, 'real'))
  y = ops.dot_general(jnp.ones((8, 64), jnp.bfloat16), wq, dn((1,), (0,)), config=cfg)
  assert y.dtype == jnp.bfloat16
  y32 = ops.dot_general(jnp.ones((8, 64), jnp.float32), wq, dn((1,), (0,)), config=cfg)
  assert y32.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32))


def test_fp8_accumulation_per_matmul():
  """fp8 training: the forward dot asks for DEFAULT precision (cuBLASLt fast accumulation on GPU), both gradient
  dots for HIGHEST (periodic promotion to f32), as the FP8 recipes do."""
  e4, e5 = QuantSpec(format='fp8_e4m3'), QuantSpec(format='fp8_e5m2')
  cfg = DotConfig(fwd=MatmulConfig(e4, e4, 'real'), dlhs=MatmulConfig(e5, e4, 'real'),
                  drhs=MatmulConfig(e4, e5, 'real'), small_m=0)
  x, w = jnp.ones((32, 64)), jnp.ones((64, 16))

  def run(x, w):
    y, vjp = jax.vjp(lambda x, w: ops.dot_general(x, w, dn((1,), (0,)), config=cfg), x, w)
    return (y, *vjp(y))
  text = jax.jit(run).lower(x, w).as_text()
  dots = [line for line in text.splitlines() if 'stablehlo.dot_general' in line and 'f8E' in line]
  assert len(dots) == 3
  assert sum('precision = [HIGHEST, HIGHEST]' in d for d in dots) == 2, dots
  assert sum('HIGHEST' not in d for d in dots) == 1, dots  # the forward: DEFAULT (printed as no precision)


@pytest.mark.parametrize('fmt', ['fp8_e4m3', 'fp8_e5m2', 'fp4_e2m1'])
def test_float_cast_kept_on_gpu(monkeypatch, fmt):
  """XLA:GPU drops an f32 -> float8 -> f32 round trip (excess precision), which made fake fp8 an identity on an
  H200: on the GPU path the cast sits behind an optimization barrier, and the fake-quant values are unchanged."""
  from qjax import fake_quant
  formats = importlib.import_module('qjax.formats')
  spec = QuantSpec(format=fmt, po2_scale=True)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64, 48)), jnp.float32)
  f = jax.jit(lambda x: fake_quant(x, spec))
  want = np.asarray(f(x))
  barriers = lambda: str(jax.make_jaxpr(lambda x: fake_quant(x, spec))(x)).count('optimization_barrier')
  on_cpu = barriers()
  monkeypatch.setattr(formats.jax, 'default_backend', lambda: 'gpu')
  assert barriers() == on_cpu + 1
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: fake_quant(x, spec))(x)), want)
  assert np.any(want != np.asarray(x))  # the cast rounds: fake quant is not the identity
