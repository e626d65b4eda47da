"""qjax.ops.inspect_matmuls: matmul counts and dtypes from lowered StableHLO and compiled HLO, XLA:CPU's YNN
fast kernel, compiler widening, op_name origins, the report's summary/to_dict, and parsing of GPU-style HLO."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xla_cpu
from jax import lax

from qjax import hlo as qi
from qjax import ops

on_cpu = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU fast-kernel (YNN) behaviour')
DN = (((1,), (0,)), ((), ()))


def _mm(dtype, acc=None):
  return lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=acc)


def test_category():
  assert qi.category('s8', 's8') == 'int8'
  assert qi.category('u8', 's8') == 'int8'
  assert qi.category('s4', 's4') == 'int8'
  assert qi.category('s32', 's32') == 'int'
  assert qi.category('f8e4m3fn', 'f8e5m2') == 'fp8'
  assert qi.category('bf16', 'bf16') == 'bf16'
  assert qi.category('f32', 'f32') == 'f32'
  assert qi.category('bf16', 'f32') == 'mixed'


@on_cpu
def test_int8_dot_is_counted_and_fast():
  x, w = jnp.ones((64, 128), jnp.int8), jnp.ones((128, 32), jnp.int8)
  rep = ops.inspect_matmuls(_mm(jnp.int8, jnp.int32), x, w)
  assert rep.platform == 'cpu'
  assert rep.n_lowered == rep.lowered_int8 == 1
  (low,), (comp,) = rep.lowered, rep.compiled
  assert low.signature == comp.signature == 's8 x s8 -> s32'
  assert (low.lhs_shape, low.rhs_shape, low.out_shape) == ((64, 128), (128, 32), (64, 32))
  assert comp.fusion == '__ynn_fusion' and comp.fast and not comp.widened
  assert rep.n_int8 == rep.n_int8_fast == rep.n_fast == 1
  assert rep.n_int8_off_fast == rep.n_widened == rep.n_int8_slow == 0
  assert low.op_name.endswith('dot_general') and comp.op_name.endswith('dot_general')
  assert 'test_inspect.py:' in low.source and 'test_inspect.py:' in comp.source  # the lambda in _mm
  assert rep.collectives == () and rep.collective_counts() == {}


@on_cpu
def test_weight_gradient_form_by_jaxlib_version():
  """s8 x^T . g written with contraction dim 0 on both sides: XLA:CPU of jaxlib 0.12.0.x up-casts it to s32 x s32;
  jaxlib 0.12.1 runs it on YNN (tests/xla_cpu.py)."""
  x, g = jnp.ones((256, 128), jnp.int8), jnp.ones((256, 64), jnp.int8)
  f = lambda a, b: lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  rep = ops.inspect_matmuls(f, x, g)
  assert rep.lowered_int8 == 1
  (m,) = rep.compiled
  if xla_cpu.TRANSPOSED_INT8_DOT_FAST:
    assert m.fast and not m.widened and m.signature == 's8 x s8 -> s32'
    assert rep.n_int8 == rep.n_int8_fast == 1 and rep.n_widened == rep.n_int8_slow == 0
    return
  assert m.widened and m.signature == 's32<-s8 x s32<-s8 -> s32' and not m.fast
  assert m.category == 'int' and m.source_category == 'int8'
  assert rep.n_int8 == 0 and rep.n_int8_widened == rep.n_int8_slow == rep.n_widened == 1
  assert 'widened by the compiler' in rep.summary() and 'NOT fast' in rep.summary()


@on_cpu
def test_int8_matrix_vector_and_f32_output_are_widened():
  """M = 1 (YNN refuses GEMV) with an f32 result: both operands are converted to f32 by the compiler; the
  compiler drops the dot's metadata, so the op_name is borrowed from its converts."""
  rep = ops.inspect_matmuls(_mm(jnp.int8, jnp.float32), jnp.ones((1, 64), jnp.int8), jnp.ones((64, 32), jnp.int8))
  assert rep.lowered[0].signature == 's8 x s8 -> f32'
  (m,) = rep.compiled
  assert m.widened and m.lhs == m.rhs == 'f32' and m.lhs_from == m.rhs_from == 's8' and not m.fast
  assert m.op_name.endswith('dot_general')
  assert rep.n_int8_slow == 1


@on_cpu
def test_fp8_is_widened_on_cpu():
  x, w = jnp.ones((8, 64), jnp.float8_e4m3fn), jnp.ones((64, 16), jnp.float8_e4m3fn)
  rep = ops.inspect_matmuls(_mm(None, jnp.float32), x, w)
  assert rep.lowered_fp8 == 1 and rep.counts('lowered') == {'fp8': 1}
  (m,) = rep.compiled
  assert m.source_category == 'fp8' and m.widened and m.category == 'f32'
  assert rep.n_int8_widened == 0 and rep.n_widened == 1


def test_bf16_f32_and_counts():
  def f(a, b, c):
    return (a @ b).astype(jnp.float32) @ c
  a, b, c = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((16, 32), jnp.bfloat16), jnp.ones((32, 4), jnp.float32)
  rep = ops.inspect_matmuls(f, a, b, c)
  assert rep.lowered_bf16 == 1 and rep.lowered_f32 == 1 and rep.lowered_int8 == rep.lowered_fp8 == 0
  assert rep.counts('lowered') == {'bf16': 1, 'f32': 1}
  assert rep.signatures('lowered') == {'bf16 x bf16 -> bf16': 1, 'f32 x f32 -> f32': 1}
  assert rep.n_compiled == 2
  with pytest.raises(ValueError, match='stage'):
    rep.counts('optimized')


def test_autodiff_origins_in_op_names():
  """Forward matmuls read jvp()/dot_general under autodiff, the backward ones transpose(jvp())/dot_general."""
  loss = lambda x, w: jnp.sum(jnp.tanh(x @ w))
  rep = ops.inspect_matmuls(jax.grad(loss, argnums=(0, 1)), jnp.ones((16, 32)), jnp.ones((32, 8)))
  names = sorted(qi._short_name(m.op_name) for m in rep.lowered)
  assert names == ['jvp()/dot_general', 'transpose(jvp())/dot_general', 'transpose(jvp())/dot_general']
  assert all(m.op_name.startswith('jit(') for m in rep.lowered)
  # Compiled dots keep the origin, though XLA may name a dot after a transpose it folded into it.
  compiled = sorted(qi._short_name(m.op_name).split('/')[0] for m in rep.compiled)
  assert compiled == ['jvp()', 'transpose(jvp())', 'transpose(jvp())']
  assert rep.counts('compiled') == {'f32': 3}
  summary = rep.summary()
  assert 'transpose(jvp())/dot_general' in summary and 'jvp()/dot_general' in summary


@on_cpu
def test_int8_convolution():
  def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                    preferred_element_type=jnp.int32)
  rep = ops.inspect_matmuls(conv, jnp.ones((2, 8, 8, 16), jnp.int8), jnp.ones((3, 3, 16, 32), jnp.int8))
  (low,), (comp,) = rep.lowered, rep.compiled
  assert low.op == comp.op == 'conv'
  assert low.signature == 's8 x s8 -> s32' and low.out_shape == (2, 8, 8, 32)
  assert comp.op_name.endswith('conv_general_dilated') and comp.category == 'int8'


def test_no_matmuls():
  rep = ops.inspect_matmuls(lambda x: jnp.sin(x) * 2, jnp.ones((4, 4)))
  assert rep.n_lowered == rep.n_compiled == 0 and rep.counts() == {}
  assert rep.n_int8_slow == 0
  assert 'lowered 0 matmul(s) [none]' in rep.summary()


def test_matmul_in_a_scan_is_counted_once():
  def f(x, ws):
    return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]
  rep = ops.inspect_matmuls(f, jnp.ones((4, 16)), jnp.ones((3, 16, 16)))
  assert rep.n_lowered == 1 and rep.n_compiled == 1


def test_accepts_jitted_functions_lowered_and_abstract_args():
  f = functools.partial(lambda a, b, scale: (a @ b) * scale, scale=2.0)
  a, b = jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4), jnp.float32)
  assert ops.inspect_matmuls(f, a, b).n_lowered == 1
  jitted = jax.jit(lambda a, b, n: functools.reduce(lambda acc, _: acc @ b, range(n), a), static_argnums=2)
  sq = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  assert ops.inspect_matmuls(jitted, sq, sq, 3).n_lowered == 3  # the jitted function's own .lower (static n)
  lowered = jax.jit(lambda a, b: a @ b).lower(a, b)
  assert ops.inspect_matmuls(lowered).n_lowered == 1
  with pytest.raises(ValueError, match='no arguments'):
    ops.inspect_matmuls(lowered, a)
  kw = ops.inspect_matmuls(lambda a, *, b: a @ b, a, b=b)
  assert kw.n_lowered == 1


def test_qjax_op_report_and_dict():
  cfg = ops.int8_dynamic(8)
  x, w = jnp.ones((64, 128)), jnp.ones((128, 32))
  loss = lambda a, b: jnp.sum(ops.dot_general(a, b, DN, config=cfg) ** 2)
  rep = ops.inspect_matmuls(jax.grad(loss, argnums=(0, 1)), x, w)
  assert rep.lowered_int8 == 3
  d = json.loads(json.dumps(rep.to_dict()))
  assert d['platform'] == rep.platform
  assert d['lowered']['int8'] == 3 and d['lowered']['counts'] == {'int8': 3}
  assert d['compiled']['n'] == rep.n_compiled and d['compiled']['int8_slow'] == rep.n_int8_slow
  assert len(d['matmuls']) == rep.n_lowered + rep.n_compiled
  m = d['matmuls'][0]
  assert {'stage', 'op', 'op_name', 'source', 'lhs', 'rhs', 'out', 'signature', 'category', 'fast', 'widened'} <= set(m)
  lines = rep.summary().splitlines()
  assert len(lines) == 2 + rep.n_lowered + rep.n_compiled + len(rep.notes)
  if rep.on_cpu:
    assert rep.n_int8_fast == 3 and rep.summary().count('fast (__ynn_fusion)') == 3


# --------------------------------------------------------------------------------- parsing without a device


GPU_HLO = '\n'.join([
    'HloModule jit_f, entry_computation_layout={(s8[128,256]{1,0}, s8[256,64]{1,0})->s32[128,64]{1,0}}',
    '',
    '%add (x: s32[], y: s32[]) -> s32[] {',
    '  %x = s32[] parameter(0)',
    '  %y = s32[] parameter(1)',
    '  ROOT %add.1 = s32[] add(s32[] %x, s32[] %y)',
    '}',
    '',
    '%triton_gemm_computation (parameter_0: s8[128,256], parameter_1: s8[256,64]) -> s32[128,64] {',
    '  %parameter_0 = s8[128,256]{1,0} parameter(0)',
    '  %parameter_1 = s8[256,64]{1,0} parameter(1)',
    '  ROOT %dot.1 = s32[128,64]{1,0} dot(s8[128,256]{1,0} %parameter_0, s8[256,64]{1,0} %parameter_1),'
    ' lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp()/dot_general"'
    ' source_file="/home/me/model.py" source_line=12}',
    '}',
    '',
    '%convert_computation (parameter_0.1: s8[64,32]) -> f32[64,32] {',
    '  %parameter_0.1 = s8[64,32]{1,0} parameter(0)',
    '  ROOT %convert.1 = f32[64,32]{1,0} convert(s8[64,32]{1,0} %parameter_0.1),'
    ' metadata={op_name="jit(f)/dot_general"}',
    '}',
    '',
    'ENTRY %main.4 (Arg_0.1: s8[128,256], Arg_1.2: s8[256,64], Arg_2.3: s8[64,32], Arg_3.4: f32[32,16])'
    ' -> (s32[128,64], f32[64,16]) {',
    '  %Arg_0.1 = s8[128,256]{1,0} parameter(0), metadata={op_name="x"}',
    '  %Arg_1.2 = s8[256,64]{1,0} parameter(1)',
    '  %Arg_2.3 = s8[64,32]{1,0} parameter(2)',
    '  %Arg_3.4 = f32[32,16]{1,0} parameter(3)',
    '  %triton_gemm = s32[128,64]{1,0} fusion(s8[128,256]{1,0} %Arg_0.1, s8[256,64]{1,0} %Arg_1.2),'
    ' kind=kCustom, calls=%triton_gemm_computation, metadata={op_name="jit(f)/jvp()/dot_general"},'
    ' backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm","triton_ge'
    'mm_config":{"block_m":"64"}}}',
    '  %loop_convert_fusion = f32[64,32]{1,0} fusion(s8[64,32]{1,0} %Arg_2.3), kind=kLoop,'
    ' calls=%convert_computation',
    '  %custom-call.1 = (f32[64,16]{1,0}, s8[0]{0}) custom-call(f32[64,32]{1,0} %loop_convert_fusion,'
    ' f32[32,16]{1,0} %Arg_3.4), custom_call_target="__cublas$gemm",'
    ' metadata={op_name="jit(f)/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1}}',
    '  %get-tuple-element = f32[64,16]{1,0} get-tuple-element((f32[64,16]{1,0}, s8[0]{0})'
    ' %custom-call.1), index=0',
    '  %all-reduce-start = s32[128,64]{1,0} all-reduce-start(s32[128,64]{1,0} %triton_gemm),'
    ' replica_groups={{0,1}}, to_apply=%add',
    '  %all-reduce-done = s32[128,64]{1,0} all-reduce-done(s32[128,64]{1,0} %all-reduce-start)',
    '  ROOT %tuple = (s32[128,64]{1,0}, f32[64,16]{1,0}) tuple(s32[128,64]{1,0} %all-reduce-done,'
    ' f32[64,16]{1,0} %get-tuple-element)',
    '}',
    '',
])


def test_parse_gpu_style_hlo():
  """GPU: Triton GEMM fusions and cuBLAS custom calls are matmuls on the fast (tensor-core) kernel."""
  ms = qi.parse_compiled(GPU_HLO, 'gpu')
  assert [m.op for m in ms] == ['dot', 'dot']
  tri, cublas = ms
  assert tri.signature == 's8 x s8 -> s32' and tri.fusion == '__triton_gemm' and tri.fast is True
  assert tri.op_name == 'jit(f)/jvp()/dot_general' and tri.source.endswith('model.py:12') and tri.fallback == ''
  assert cublas.fusion == '__cublas$gemm' and cublas.signature == 'f32<-s8 x f32 -> f32' and cublas.widened
  assert cublas.out_shape == (64, 16) and cublas.fast is True
  (c,) = qi.parse_collectives(GPU_HLO)
  assert c.op == 'all-reduce' and c.operands == (('s32', (128, 64)),) and str(c) == 'all-reduce(s32[128,64])'
  rep = qi.MatmulReport('gpu', (), tuple(ms), (c,), ('note',))
  assert rep.n_fast == 2 and rep.n_int8_fast == 1 and rep.n_int8_off_fast == 0
  assert rep.n_int8 == 1 and rep.n_widened == 1 and rep.n_int8_widened == rep.n_int8_slow == 0  # s8 x f32: mixed
  assert rep.collective_counts() == {'all-reduce': 1} and rep.fallbacks() == []
  s = rep.summary()
  assert 'on a tensor-core GEMM kernel: 1' in s and '__cublas$gemm' in s
  assert 'collectives (1): all-reduce(s32[128,64])' in s
  json.dumps(rep.to_dict())


GPU_FALLBACK_HLO = '\n'.join([
    'HloModule jit_g',
    '',
    '%wide_gemm (p0: s8[128,256], p1: s8[256,64]) -> f32[128,64] {',
    '  %p0 = s8[128,256]{1,0} parameter(0)',
    '  %p1 = s8[256,64]{1,0} parameter(1)',
    '  %c0 = bf16[128,256]{1,0} convert(s8[128,256]{1,0} %p0)',
    '  %c1 = bf16[256,64]{1,0} convert(s8[256,64]{1,0} %p1)',
    '  ROOT %dot.2 = f32[128,64]{1,0} dot(bf16[128,256]{1,0} %c0, bf16[256,64]{1,0} %c1),'
    ' lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(g)/fwd/dot_general"}',
    '}',
    '',
    '%loop_dot (q0: s8[30,100], q1: s8[100,6]) -> s32[30,6] {',
    '  %q0 = s8[30,100]{1,0} parameter(0)',
    '  %q1 = s8[100,6]{1,0} parameter(1)',
    '  ROOT %dot.3 = s32[30,6]{1,0} dot(s8[30,100]{1,0} %q0, s8[100,6]{1,0} %q1),'
    ' lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(g)/dlhs/dot_general"}',
    '}',
    '',
    'ENTRY %main (a: s8[128,256], b: s8[256,64], c: s8[30,100], d: s8[100,6], e: f8e4m3fn[32,64],'
    ' f: f8e4m3fn[64,16]) -> f32[128,64] {',
    '  %a = s8[128,256]{1,0} parameter(0)',
    '  %b = s8[256,64]{1,0} parameter(1)',
    '  %c = s8[30,100]{1,0} parameter(2)',
    '  %d = s8[100,6]{1,0} parameter(3)',
    '  %e = f8e4m3fn[32,64]{1,0} parameter(4)',
    '  %f = f8e4m3fn[64,16]{1,0} parameter(5)',
    '  %w = f32[128,64]{1,0} fusion(s8[128,256]{1,0} %a, s8[256,64]{1,0} %b), kind=kCustom, calls=%wide_gemm,'
    ' backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}',
    '  %l = s32[30,6]{1,0} fusion(s8[30,100]{1,0} %c, s8[100,6]{1,0} %d), kind=kLoop, calls=%loop_dot',
    '  %g = (f32[32,16]{1,0}, s8[0]{0}) custom-call(f8e4m3fn[32,64]{1,0} %e, f8e4m3fn[64,16]{1,0} %f),'
    ' custom_call_target="__cublas$lt$matmul$f8", metadata={op_name="jit(g)/drhs/dot_general"}',
    '  ROOT %r = f32[128,64]{1,0} copy(f32[128,64]{1,0} %w)',
    '}',
    '',
])


def test_gpu_fallbacks_are_named():
  """GPU: an int8 dot widened inside its GEMM fusion, and one left to the loop emitter (dims off cuBLAS's
  alignment), are slow with a reason; a cuBLASLt fp8 call is fast."""
  wide, loop, f8 = qi.parse_compiled(GPU_FALLBACK_HLO, 'gpu')
  assert wide.fast and wide.widened and wide.signature == 'bf16<-s8 x bf16<-s8 -> f32'
  assert wide.fallback == 'widened by the compiler'
  assert not loop.fast and loop.category == 'int8'
  assert loop.fallback == ('not on a tensor-core GEMM kernel (kLoop); int8 dims not multiples of 4: '
                           'lhs [30,100], rhs [100,6]')
  assert f8.fast and f8.category == 'fp8' and f8.fallback == '' and f8.fusion == '__cublas$lt$matmul$f8'
  rep = qi.MatmulReport('gpu', (), (wide, loop, f8))
  assert rep.n_int8_slow == 2 and rep.n_fp8 == rep.n_fp8_fast == 1 and len(rep.fallbacks()) == 2
  assert 'int8 dims not multiples of 4' in rep.summary()
  assert qi.parse_compiled(GPU_FALLBACK_HLO, 'tpu')[1].fast is None  # no fast notion on TPU


def test_parse_lowered_locations():
  text = '\n'.join([
      'module @jit_f {',
      '  func.func public @main(%arg0: tensor<4x8xi8>, %arg1: tensor<8x2xi8>) -> (tensor<4x2xi32>) {',
      '    %0 = stablehlo.dot_general %arg0, %arg1, contracting_dims = [1] x [0] : (tensor<4x8xi8>,'
      ' tensor<8x2xi8>) -> tensor<4x2xi32> loc(#loc5)',
      '    %1 = "stablehlo.dot_general"(%arg0, %arg1) <{dot_dimension_numbers = #stablehlo.dot<>}> :'
      ' (tensor<4x8xui8>, tensor<8x2xf8E4M3FN>) -> tensor<4x2xf32> loc(#loc6)',
      '    return %0 : tensor<4x2xi32> loc(#loc)',
      '  } loc(#loc)',
      '} loc(#loc)',
      '#loc = loc(unknown)',
      '#loc1 = loc("/site-packages/lib/layer.py":10:3)',
      '#loc2 = loc("/home/me/model.py":42:5 to :20)',
      '#loc3 = loc(callsite(#loc1 at #loc2))',
      '#loc5 = loc("jit(f)/jvp()/dot_general"(#loc3))',
      '',
  ])
  a, b = qi.parse_lowered(text)
  assert a.signature == 's8 x s8 -> s32' and a.lhs_shape == (4, 8) and a.out_shape == (4, 2)
  assert a.op_name == 'jit(f)/jvp()/dot_general' and a.source.endswith('model.py:42')
  assert b.signature == 'u8 x f8e4m3fn -> f32' and b.op_name == '' and b.category == 'mixed'


def test_real_int8_values_unchanged_by_inspection():
  """Inspecting compiles a separate executable: the function still runs and gives the same values."""
  x = jnp.asarray(np.arange(-64, 64).reshape(8, 16), jnp.int8)
  w = jnp.asarray(np.arange(16 * 4).reshape(16, 4) % 7 - 3, jnp.int8)
  f = _mm(jnp.int8, jnp.int32)
  ops.inspect_matmuls(f, x, w)
  np.testing.assert_array_equal(f(x, w), np.asarray(x, np.int32) @ np.asarray(w, np.int32))
