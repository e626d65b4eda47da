"""qjax.ops.conv_gemm: integer convs as patches + one int8 matmul, and the conv op's use of it on XLA:CPU.

The lowering must equal XLA's integer conv bit for bit for every conv parameter it accepts (strides, padding
including negative, lhs and rhs dilation, layouts), its kernel gradient must equal the exact gradient, and the
quantized op in 'real' / 'auto' mode must equal fake quant (power-of-two scales) in the forward and both
gradients on the shapes where it is chosen (LeNet-5's convs).
"""

import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QuantSpec, ops, quantizers
from qjax.ops import DotConfig, MatmulConfig

conv = importlib.import_module('qjax.ops.conv')
cg = importlib.import_module('qjax.ops.conv_gemm')
NHWC = ('NHWC', 'HWIO', 'NHWC')

CASES = {  # lhs shape, rhs shape, strides, padding, lhs dilation, rhs dilation, dimension numbers
    'lenet1': ((4, 12, 12, 1), (5, 5, 1, 6), (1, 1), 'SAME', None, None, NHWC),
    'strided_rhs_dilated': ((2, 11, 9, 6), (3, 3, 6, 16), (2, 2), 'VALID', None, (2, 1), NHWC),
    'nchw_asym_pad': ((2, 6, 10, 9), (16, 6, 3, 3), (1, 2), [(1, 2), (0, 1)], None, None, ('NCHW', 'OIHW', 'NCHW')),
    'lhs_dilated_negative_pad': ((2, 7, 7, 4), (3, 3, 4, 5), (1, 1), [(2, 1), (1, -1)], (2, 2), None, NHWC),
    'odd_batch_nchw': ((5, 3, 6, 6), (4, 3, 3, 3), (1, 1), 'SAME', None, None, ('NCHW', 'OIHW', 'NCHW')),
    # kernels of TWO_STAGE_MIN_TAPS taps or more build their patches in two stages (W shifts, then H shifts)
    'two_stage_strided_rhs_dilated': ((2, 13, 11, 3), (4, 3, 3, 5), (2, 1), 'VALID', None, (1, 2), NHWC),
    'two_stage_lhs_dilated_negative_pad': ((2, 7, 8, 2), (5, 2, 2, 3), (1, 2), [(2, 1), (1, -1)], (2, 1), None,
                                           NHWC),
    'two_stage_nchw': ((3, 2, 9, 7), (4, 2, 5, 5), (1, 1), 'SAME', None, None, ('NCHW', 'OIHW', 'NCHW')),
    # 16 and more int8 features: the patches move uint32 words (as_words), whatever the layout and padding
    'words_strided': ((3, 9, 8, 16), (3, 3, 16, 5), (1, 2), 'SAME', None, None, NHWC),
    'words_nchw_lhs_dilated_negative_pad': ((2, 20, 7, 6), (3, 20, 3, 3), (1, 1), [(2, 1), (1, -1)], (2, 2),
                                            None, ('NCHW', 'OIHW', 'NCHW')),
    'two_stage_words_rhs_dilated': ((2, 11, 10, 32), (5, 5, 32, 3), (1, 1), 'VALID', None, (1, 2), NHWC),
    # lhs-dilated with unit strides (a strided conv's input gradient) runs sub-pixel (conv_gemm.subpixel_plan):
    # the ResNet's 3x3 stride-2 SAME input gradient, a 1x1 one (half of the phases have no tap), dilation 3 on H
    # only with a 4x2 kernel and negative padding
    'sub_pixel_3x3_stride2_dlhs': ((3, 5, 5, 4), (3, 3, 4, 3), (1, 1), [(1, 1), (1, 1)], (2, 2), None, NHWC),
    'sub_pixel_1x1_stride2_dlhs': ((3, 4, 5, 6), (1, 1, 6, 5), (1, 1), [(0, 1), (0, 1)], (2, 2), None, NHWC),
    'sub_pixel_d3_asym': ((2, 4, 5, 3), (4, 2, 3, 2), (1, 1), [(2, 3), (0, -1)], (3, 1), None, NHWC),
}


@pytest.mark.parametrize('name', [n for n in CASES if n.startswith('two_stage')] + ['lenet1'])
def test_two_stage_patches_equal_one_stage(name, monkeypatch):
  """The two-stage patches are the one-stage ones, element for element, in the same (i, j, c) order; the default
  for these kernels is two stages, and two_stage= overrides it both ways."""
  ls, rs, strides, padding, lhs_d, rhs_d, dn = CASES[name]
  cp = conv.conv_params(ls, rs, strides, padding, lhs_d, rhs_d, dn)
  x = cg.to_nhwc(jnp.asarray(np.random.default_rng(0).integers(-128, 128, ls), jnp.int8), cp.dnums.lhs_spec)
  k_sp = tuple(rs[d] for d in cp.dnums.rhs_spec[2:])
  assert k_sp[0] * k_sp[1] >= cg.TWO_STAGE_MIN_TAPS
  two = cg.patches(x, cp, k_sp)
  np.testing.assert_array_equal(two, cg.patches(x, cp, k_sp, two_stage=False))
  monkeypatch.setattr(cg, 'TWO_STAGE_MIN_TAPS', 10 ** 9)
  one = cg.patches(x, cp, k_sp)
  np.testing.assert_array_equal(two, one)
  np.testing.assert_array_equal(one, cg.patches(x, cp, k_sp, two_stage=True))


@pytest.mark.parametrize('dtype, features, packed', [
    (jnp.int8, 16, True), (jnp.uint8, 20, True), (jnp.bfloat16, 8, True), (jnp.int8, 12, False),
    (jnp.int8, 6, False), (jnp.bfloat16, 6, False), (jnp.float32, 16, False)])
def test_as_words_round_trips_the_bytes(dtype, features, packed):
  """Features that fill at least MIN_WORDS 4-byte words travel as uint32 words, each holding its 4 bytes in
  order (little-endian), and come back bit for bit; others (12 int8 features: 3 words) stay as they are."""
  rng = np.random.default_rng(3)
  raw = rng.integers(0, 256, (2, 3, features * np.dtype(dtype).itemsize), np.uint8)
  x = jnp.asarray(raw.view(np.dtype(dtype)))
  w, words = cg.as_words(x)
  assert words == packed
  if not packed:
    assert w is x
    return
  assert w.dtype == jnp.uint32 and w.shape == (2, 3, raw.shape[-1] // 4)
  np.testing.assert_array_equal(np.asarray(w), raw.reshape(2, 3, -1, 4).astype(np.uint32) @ (256 ** np.arange(4)))
  back = cg.from_words(w, x.dtype)
  assert back.dtype == x.dtype and back.shape == x.shape
  np.testing.assert_array_equal(np.asarray(back).view(np.uint8), raw)


@pytest.mark.parametrize('two_stage', [False, True])
@pytest.mark.parametrize('name', ['words_strided', 'words_nchw_lhs_dilated_negative_pad',
                                  'two_stage_words_rhs_dilated'])
def test_word_patches_equal_element_patches(name, two_stage, monkeypatch):
  """Patches built from uint32 words are the int8 ones, byte for byte, in (i, j, c) order; words=False (the
  conv suite's comparison) copies elements, as as_words disabled does."""
  ls, rs, strides, padding, lhs_d, rhs_d, dn = CASES[name]
  cp = conv.conv_params(ls, rs, strides, padding, lhs_d, rhs_d, dn)
  x = cg.to_nhwc(jnp.asarray(np.random.default_rng(0).integers(-128, 128, ls), jnp.int8), cp.dnums.lhs_spec)
  k_sp = tuple(rs[d] for d in cp.dnums.rhs_spec[2:])
  assert cg.as_words(x)[1]
  words = jax.jit(lambda x: cg.patches(x, cp, k_sp, two_stage))(x)
  unpacked = jax.jit(lambda x: cg.patches(x, cp, k_sp, two_stage, words=False))(x)
  assert 'ui32' in jax.jit(lambda x: cg.patches(x, cp, k_sp, two_stage)).lower(x).as_text()
  assert 'ui32' not in jax.jit(lambda x: cg.patches(x, cp, k_sp, two_stage, words=False)).lower(x).as_text()
  monkeypatch.setattr(cg, 'as_words', lambda x: (x, False))
  elements = jax.jit(lambda x: cg.patches(x, cp, k_sp, two_stage))(x)
  assert words.dtype == elements.dtype == unpacked.dtype == jnp.int8
  np.testing.assert_array_equal(words, elements)
  np.testing.assert_array_equal(unpacked, elements)


@pytest.mark.parametrize('two_stage', [False, True])
def test_word_patches_are_concatenated_as_int8(two_stage):
  """Each word slice is viewed as int8 before the concatenate: no uint32 array of the patch matrix's width is left
  in the compiled program (viewing the concatenated words was a pass of its own over the whole matrix)."""
  ls, rs, strides, padding, lhs_d, rhs_d, dn = CASES['words_strided']
  cp = conv.conv_params(ls, rs, strides, padding, lhs_d, rhs_d, dn)
  x = jnp.zeros(ls, jnp.int8)
  k_sp = tuple(rs[d] for d in cp.dnums.rhs_spec[2:])
  hlo = jax.jit(lambda x: cg.patches(x, cp, k_sp, two_stage)).lower(x).compile().as_text()
  width = int(np.prod(k_sp)) * ls[-1] // cg.WORD_BYTES  # the patch matrix in words: 36
  assert 'u32[' in hlo
  assert not re.search(rf'u32\[[\d,]*,{width}\]', hlo)


def test_chunk_loop_reads_and_writes_flat_rows():
  """The batch-chunk loop carries its input and output as one row per chunk (`_map_batch`): (k, c * H * W * C),
  not stacked (k, c, H, W, C) blocks, whose dynamic slices and updates cost XLA:CPU more. The result stays exact
  (test_patch_conv_and_kernel_grad_are_exact)."""
  x, w = jnp.zeros((8, 12, 12, 16), jnp.int8), jnp.zeros((3, 3, 16, 8), jnp.int8)
  cp = conv.conv_params(x.shape, w.shape, (1, 1), 'SAME', None, None, NHWC)
  chunk_bytes = 2 * cg.example_patch_bytes(x.shape, 1, cp, (3, 3))  # 2 examples per chunk: 4 chunks
  hlo = jax.jit(lambda a, b: cg.conv(a, b, cp, chunk_bytes=chunk_bytes)).lower(x, w).compile().as_text()
  loops = re.findall(r'= \(([^)]*)\) while\(', hlo)
  assert len(loops) == 1
  state = loops[0]
  assert 's32[4,2304]' in state and 's8[4,4608]' in state, state  # 2 * 12 * 12 * 8 outputs, 2 * 12 * 12 * 16 inputs


def test_two_stage_conv_of_a_3x3_kernel_is_exact():
  """A 3x3 kernel (one stage by default) with its patches in two stages, strided: XLA's integer conv exactly."""
  cp = conv.conv_params((3, 9, 8, 4), (3, 3, 4, 5), (2, 1), 'SAME', None, None, NHWC)
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.integers(-128, 128, (3, 9, 8, 4)), jnp.int8)
  b = jnp.asarray(rng.integers(-128, 128, (3, 3, 4, 5)), jnp.int8)
  want = cp.conv(a.astype(jnp.int32), b.astype(jnp.int32), jnp.int32)
  np.testing.assert_array_equal(cg.conv(a, b, cp, two_stage=True), want)
  np.testing.assert_array_equal(cg.conv(a, b, cp, chunk_bytes=1, two_stage=True), want)


def test_batch_chunk_prefers_a_divisor_of_the_batch():
  """LeNet-5's 28x28 1 -> 6 5x5 SAME conv has 19,600 patch bytes per example: 13 fit in 256 KiB, 8 divide 256.
  Batch 5 with room for 2 takes 1 (no padding); with room for 3 or 4 it keeps them (1 is less than half: the
  last chunk is padded); batch 12 with room for 5 takes 4; room for more than the batch takes the batch."""
  cp = conv.conv_params((256, 28, 28, 1), (5, 5, 1, 6), (1, 1), 'SAME', None, None, NHWC)
  per = cg.example_patch_bytes((256, 28, 28, 1), 1, cp, (5, 5))
  assert per == 28 * 28 * 25 and (256 << 10) // per == 13
  assert cg.batch_chunk((256, 28, 28, 1), 1, cp, (5, 5)) == 8
  for n, room, want in [(5, 2, 1), (5, 3, 3), (5, 4, 4), (12, 5, 4), (12, 13, 12), (7, 1, 1)]:
    assert cg.batch_chunk((n, 28, 28, 1), 1, cp, (5, 5), room * per) == want, (n, room)


# Examples per chunk by (batch, room for examples): the room, or the whole batch if smaller, lowered to the
# largest divisor of the batch that is at least half of it (batch 5 with room for 3 keeps 3: the padded path).
CHUNKS = {(2, 1): 1, (2, 2): 2, (2, 3): 2, (3, 1): 1, (3, 2): 1, (3, 3): 3, (4, 1): 1, (4, 2): 2, (4, 3): 2,
          (5, 1): 1, (5, 2): 1, (5, 3): 3}


@pytest.mark.parametrize('chunk', [None, 1, 2, 3])
@pytest.mark.parametrize('name', list(CASES))
def test_patch_conv_and_kernel_grad_are_exact(name, chunk):
  """Exact for the whole batch in one chunk and with room for 1, 2 and 3 examples per chunk (CHUNKS: batch 5
  with room for 3 runs chunks of 3, the last zero-padded)."""
  ls, rs, st, pad, ld, rd, dn = CASES[name]
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.integers(-128, 128, ls), jnp.int8)
  b = jnp.asarray(rng.integers(-128, 128, rs), jnp.int8)
  cp = conv.conv_params(ls, rs, st, pad, ld, rd, dn)
  rhs_spec = cp.dnums.rhs_spec
  k_sp = tuple(rs[d] for d in rhs_spec[2:])
  x_shape = cg.to_nhwc(a, cp.dnums.lhs_spec).shape
  per_example = cg.example_patch_bytes(x_shape, 1, cp, k_sp)
  chunk_bytes = 1 << 40 if chunk is None else chunk * per_example
  assert cg.batch_chunk(x_shape, 1, cp, k_sp, chunk_bytes) == (x_shape[0] if chunk is None else
                                                                CHUNKS[x_shape[0], chunk])
  want = cp.conv(a.astype(jnp.int32), b.astype(jnp.int32), jnp.int32)
  got = jax.jit(lambda a, b: cg.conv(a, b, cp, chunk_bytes=chunk_bytes))(a, b)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)
  if cg.subpixel_plans(cp, x_shape, k_sp) is not None:  # the patches of the dilated input: exact too
    np.testing.assert_array_equal(cg.conv(a, b, cp, chunk_bytes=chunk_bytes, subpixel=False), want)
  g = jnp.asarray(rng.integers(-128, 128, want.shape), jnp.int8)
  exact = jax.grad(lambda w: jnp.sum(cp.conv(a.astype(jnp.float32), w, jnp.float32) * g))(b.astype(jnp.float32))
  dw = cg.kernel_grad(a, g, cp, k_sp, chunk_bytes=chunk_bytes)   # (KH, KW, C, O)
  dw = jnp.transpose(dw, np.argsort((*rhs_spec[2:], rhs_spec[1], rhs_spec[0])))
  np.testing.assert_array_equal(dw.astype(jnp.float32), exact)


def test_subpixel_plan_by_hand():
  """A 3x3 stride-2 SAME conv over 9 positions has 5 outputs; its input gradient dilates g (5) by 2 and pads
  (1, 1): 9 outputs. Position p = 2m reads tap 1 at g[m]; p = 2m + 1 reads tap 0 at g[m] and tap 2 at g[m + 1]:
  two taps u = 0, 1, the zero tap (index 3) where a phase has none, g padded (0, 1) for m < 5. A 1x1 stride-2
  VALID conv (28 -> 14): only phase 0 has a tap."""
  idx, phases, pad, out, m = cg.subpixel_plan(5, 3, 1, 1, 2)
  np.testing.assert_array_equal(idx, [[1, 0], [3, 2]])
  assert (phases, pad, out, m) == ((0, 1), (0, 1), 9, 5)
  idx, phases, pad, out, m = cg.subpixel_plan(14, 1, 0, 1, 2)
  np.testing.assert_array_equal(idx, [[0]])
  assert (phases, pad, out, m) == ((0,), (0, 0), 28, 14)
  assert cg.subpixel_plan(3, 2, -5, 0, 2) is None  # the padding crops everything the taps could read


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU routing')
def test_strided_conv_input_gradient_runs_sub_pixel():
  """The input gradient of a 3x3 stride-2 conv (6 -> 4 features, 'auto'): one int8 matmul of g's 2x2 sub-pixel
  patches (K = 2 * 2 * 4) against the four output phases of the 6 input features (N = 4 * 6), not of the dilated
  g's 3x3 patches (K = 36, N = 6), three quarters of which are zeros."""
  xs, ws, st, pad = OP_CASES['strided 6->4']
  rep = ops.inspect_matmuls(_fwd_bwd(_config('auto'), st, pad), jnp.ones(xs), jnp.ones(ws))
  dlhs = [m for m in rep.compiled if 'dlhs' in m.op_name]
  assert [(m.op, m.category, m.fast, m.rhs_shape) for m in dlhs] == [('dot', 'int8', True, (16, 24))], rep.summary()


def _config(mode):
  s = QuantSpec(format='int8', granularity='per_channel', po2_scale=True)
  m = MatmulConfig(s, s, mode)
  return DotConfig(fwd=m, dlhs=m, drhs=m)


def _operand(rng, shape, channel_axis):
  e = [1] * len(shape)
  e[channel_axis] = shape[channel_axis]
  return jnp.asarray(rng.uniform(-1, 1, shape) * np.exp2(rng.integers(-2, 3, e)), jnp.float32)


def _fwd_bwd(cfg, strides, padding):
  def run(x, w):
    f = lambda x, w: ops.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC, config=cfg)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(jnp.cos(y)))
  return jax.jit(run)


OP_CASES = {  # input, kernel, strides, padding
    'lenet conv1 1->6': ((8, 28, 28, 1), (5, 5, 1, 6), (1, 1), 'SAME'),
    'lenet conv2 6->16': ((8, 14, 14, 6), (5, 5, 6, 16), (1, 1), 'VALID'),
    'strided 6->4': ((4, 9, 9, 6), (3, 3, 6, 4), (2, 2), 'SAME'),
}


@pytest.mark.parametrize('name', list(OP_CASES))
@pytest.mark.parametrize('mode', ['real', 'auto'])
def test_patch_route_equals_fake_quant(name, mode):
  xs, ws, st, pad = OP_CASES[name]  # small batches: 'auto' takes the patch route too (patch matrix < 2 MiB)
  rng = np.random.default_rng(1)
  x, w = _operand(rng, xs, 0), _operand(rng, ws, 3)
  want = _fwd_bwd(_config('fake'), st, pad)(x, w)
  got = _fwd_bwd(_config(mode), st, pad)(x, w)
  for a, b, what in zip(got, want, ('fwd', 'dlhs', 'drhs'), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=what)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU routing')
@pytest.mark.parametrize('batch', [8, 256])
def test_auto_routes_lenet_convs_to_patches(batch):
  """LeNet-5's conv2 (6 -> 16 features; XLA would up-cast its int8 conv to s32): 'auto' runs the forward, the
  input gradient and the kernel gradient as int8 matmuls on the YNN kernel, at batch 8 and at batch 256, where
  the patches are built a chunk of examples at a time (the dots sit in loops). conv1 (one input feature) takes
  the patch route too (it beats XLA's int8 conv there)."""
  xs, ws, st, pad = OP_CASES['lenet conv2 6->16']
  xs = (batch, *xs[1:])
  rep = ops.inspect_matmuls(_fwd_bwd(_config('auto'), st, pad), jnp.ones(xs), jnp.ones(ws))
  assert rep.n_int8 == rep.n_int8_fast == 3 and rep.n_int8_slow == 0, rep.summary()
  assert {m.op for m in rep.compiled} == {'dot'}
  looped = sum('while/body' in m.op_name for m in rep.compiled)
  assert looped == (3 if batch == 256 else 1), rep.summary()  # batch 8: only the dlhs (full padding) is chunked
  conv1 = OP_CASES['lenet conv1 1->6']
  xs1 = (batch, *conv1[0][1:])
  rep1 = ops.inspect_matmuls(_fwd_bwd(_config('auto'), conv1[2], conv1[3]), jnp.ones(xs1), jnp.ones(conv1[1]))
  assert [(m.op, m.category) for m in rep1.lowered if 'fwd' in m.op_name] == [('dot', 'int8')], rep1.summary()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU routing')
def test_auto_runs_uncovered_slow_convs_in_float():
  """A feature-grouped conv of <= 16 features: XLA would up-cast it and the patch lowering does not cover
  groups, so 'auto' runs it as a float conv of the quantized values and 'real' as XLA's (slow) int8 conv."""
  x, w = jnp.ones((2, 8, 8, 8)), jnp.ones((3, 3, 4, 8))
  f = lambda mode: jax.jit(lambda x, w: ops.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                                                   feature_group_count=2, config=_config(mode)))
  assert [m.category for m in ops.inspect_matmuls(f('auto'), x, w).lowered] == ['f32']
  assert [m.category for m in ops.inspect_matmuls(f('real'), x, w).lowered] == ['int8']


def test_patch_bytes():
  cp = conv.conv_params((256, 14, 14, 6), (5, 5, 6, 16), (1, 1), 'SAME', None, None, NHWC)
  assert conv.patch_bytes(cp, (256, 14, 14, 6), (5, 5, 6, 16)) == 256 * 14 * 14 * 25 * 6
  cp = conv.conv_params((2, 9, 9, 3), (3, 3, 3, 4), (2, 2), 'VALID', None, None, NHWC)
  assert conv.patch_bytes(cp, (2, 9, 9, 3), (3, 3, 3, 4)) == 2 * 4 * 4 * 9 * 3


def test_conv_bench_suite_runlocal(tmp_path):
  from experiments.bench import harness as bench
  config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'bench_conv.py')
  assert bench.main([f'--config={config}:runlocal', f'--workdir={tmp_path}']) == 0
  data = json.loads((tmp_path / 'bench.json').read_text())
  one, six, dlhs = data['groups']
  assert set(dlhs['results']) == {'f32 input gradient, XLA conv', 'XLA int8 conv (lhs-dilated)',
                                  'patches of the dilated g + int8 dot', 'sub-pixel patches + int8 dot'}
  assert dlhs['meta']['sub_pixel_taps'] == [2, 2] and dlhs['meta']['xla_slow_reason']  # 3x3 stride 2
  for v in ('patches of the dilated g + int8 dot', 'sub-pixel patches + int8 dot'):
    assert dlhs['results'][v]['info']['inspect']['int8_fast'] == 1
  assert dlhs['results']['XLA int8 conv (lhs-dilated)']['info']['inspect']['int8_fast'] == 0
  assert set(one['results']) == {'f32 conv', 'XLA int8 conv', 'patches + int8 dot', 'patches + int8 dot, one chunk',
                                 'patches in one stage + int8 dot', 'patches in two stages + int8 dot',
                                 'patches alone', 'int8 conv, features padded to 32',
                                 'f32 kernel gradient, XLA conv', 'f32 kernel gradient, patches^T . g'}
  # runlocal's convs have 1 and 6 input features: their float kernel gradient stays XLA's conv
  assert one['meta']['float_kernel_grad_route'] == six['meta']['float_kernel_grad_route'] == 'XLA conv'
  assert one['meta']['two_stage_patches'] and not six['meta']['two_stage_patches']  # 5x5 and 3x3 kernels
  assert one['meta']['xla_slow_reason'] is None and one['meta']['auto_route'] == 'patches + int8 dot'  # small
  assert six['meta']['xla_slow_reason'] and six['meta']['auto_route'] == 'patches + int8 dot'
  gemm = six['results']['patches + int8 dot']['info']['inspect']
  assert gemm['int8'] == gemm['int8_fast'] == 1
  # XLA's slow int8 conv (6 -> 16 features) has a variant with its output padded to 17 features, which XLA runs
  # on the fast kernel; the one-input-feature conv, already fast, has none.
  assert set(six['results']) - set(one['results']) == {'int8 conv, output features padded to 17',
                                                         'int8 conv of pixel pairs'}
  for v in ('int8 conv, output features padded to 17', 'int8 conv of pixel pairs'):  # 6 -> 16 as pairs: 12 -> 32
    padded = six['results'][v]['info']['inspect']
    assert padded['int8'] == padded['int8_fast'] == 1, v
  assert six['results']['XLA int8 conv']['info']['inspect']['int8_fast'] == 0


@pytest.mark.parametrize('k, c, o', [(3, 16, 16), (5, 6, 16), (1, 3, 5)])
def test_the_bench_pixel_pair_conv_is_the_conv(k, c, o):
  """The conv suite's pixel-pair formulation (experiments.bench.conv.pair_kernel) equals XLA's int32 conv."""
  from experiments.bench import conv as bench_conv
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.integers(-127, 128, (2, 6, 8, c)), jnp.int8)
  w = rng.integers(-127, 128, (k, k, c, o)).astype(np.int8)
  wp, pad_w = bench_conv.pair_kernel(w)
  cp = conv.conv_params(x.shape, w.shape, (1, 1), 'SAME', None, None, NHWC)
  got = bench_conv.pair_conv(x, jnp.asarray(wp), pad_w, k)
  np.testing.assert_array_equal(got, cp.conv(x, jnp.asarray(w), jnp.int32))


FLOAT_KG_CASES = {  # input, kernel, strides, padding, dimension numbers, patch route expected
    'resnet 16->16 3x3': ((6, 10, 10, 16), (3, 3, 16, 16), (1, 1), 'SAME', NHWC, True),
    'strided nchw 16->8 3x3': ((5, 16, 9, 9), (8, 16, 3, 3), (2, 2), 'SAME', ('NCHW', 'OIHW', 'NCHW'), True),
    'lenet conv2 6->16 5x5': ((4, 14, 14, 6), (5, 5, 6, 16), (1, 1), 'VALID', NHWC, False),
}


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU routing')
@pytest.mark.parametrize('name', list(FLOAT_KG_CASES))
def test_float_kernel_gradient_runs_as_patches_where_chosen(name):
  """QAT with a float backward: the kernel gradient of a 3x3 conv over >= 16 input features runs as f32
  patches^T . g (a dot, where XLA's transpose conv is up to 6x slower: qjax.ops.conv.float_kernel_grad_by_patches),
  a 5x5 conv of 6 features keeps XLA's conv. Either way it equals the float kernel gradient of the fake-quantized
  conv (the STE passes it to w, whose absmax grid holds every value) to f32 rounding."""
  xs, ws, st, pad, dnums, patched = FLOAT_KG_CASES[name]
  s = QuantSpec(format='int8', granularity='per_channel', po2_scale=True)
  cfg = DotConfig(fwd=MatmulConfig(s, s, 'auto'))  # dlhs, drhs: float
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
  w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
  f = lambda x, w: ops.conv_general_dilated(x, w, st, pad, dimension_numbers=dnums, config=cfg)
  y, vjp = jax.vjp(f, x, w)
  g = jnp.cos(y)
  got = jax.jit(lambda x, w, g: jax.vjp(f, x, w)[1](g)[1])(x, w, g)
  ldn = jax.lax.conv_dimension_numbers(xs, ws, dnums)
  x_hat = quantizers.fake_quant(x, s.replace(axis=ldn.lhs_spec[0]))
  w_hat = quantizers.fake_quant(w, s.replace(axis=ldn.rhs_spec[0]))
  want = jax.vjp(lambda w: jax.lax.conv_general_dilated(x_hat, w, st, pad, dimension_numbers=dnums), w_hat)[1](g)[0]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))
  cp = conv.conv_params(xs, ws, st, pad, None, None, dnums)
  assert conv.float_kernel_grad_by_patches(cp, xs, ws) is patched
  rep = ops.inspect_matmuls(lambda x, w, g: jax.vjp(f, x, w)[1](g)[1], x, w, g)
  drhs = [(m.op, m.category) for m in rep.lowered if 'drhs' in m.op_name]
  assert drhs == ([('dot', 'f32')] if patched else [('conv', 'f32')]), rep.summary()


def test_conv_suite_shapes_parse_or_name_the_form():
  from experiments.bench import conv as conv_suite
  assert conv_suite.parse_conv_shape('256x28x1x6x5') == (256, 28, 1, 6, 5)
  assert conv_suite.parse_dlhs_shape('4x9x4x6x3x2') == (4, 9, 4, 6, 3, 2)
  with pytest.raises(ValueError, match='expected BATCHxHxCINxCOUTxK, like'):
    conv_suite.parse_conv_shape('256x28x1x6x5x2')   # a stride belongs to dlhs_shapes
  with pytest.raises(ValueError, match=r'expected BATCHxHxCINxCOUTxKxSTRIDE \(the forward conv\)'):
    conv_suite.parse_dlhs_shape('256x28x16x32x3')
  with pytest.raises(ValueError, match='conv shape'):
    conv_suite.parse_conv_shape('256x28x1x6xk')
