r"""The conv suite: XLA's int8 conv against the patches + int8 matmul lowering, per conv shape, against f32.

    python -m experiments.bench --config=configs/bench_conv.py [--workdir=runs/bench/conv]

One group per shape (batch, H=W, C_in -> C_out, k x k, NHWC/HWIO, stride 1), timed interleaved against the f32
conv forward of that shape: XLA's int8 conv (s8 x s8 -> s32; up-cast to s32 by XLA:CPU below 17 features),
qjax.ops.conv_gemm.conv (k*k shifted slices of the padded input, then one int8 matmul, a chunk of examples at a
time), the same with the whole batch in one chunk (and with config.chunk_examples examples per chunk), with the
patches copied as int8 elements instead of 4-byte words (shapes of 16 or more features), built in one stage and in
two (k_w shifts, then k_h shifts of those; conv_gemm.patches), and the
patch construction of the whole batch alone (what the one-chunk lowering pays before its matmul), and the f32
kernel gradient (a QAT step's float backward) as XLA's transpose conv and as f32 patches^T . g. The
measurements behind qjax.ops.conv_gemm.CHUNK_PATCH_BYTES and TWO_STAGE_MIN_TAPS and qjax.ops.conv.cpu_slow_reason
come from this suite.

One group per strided conv of config.dlhs_shapes (BATCHxHxC_INxC_OUTxKxSTRIDE, SAME) times its input gradient,
an lhs-dilated conv, against XLA's f32 transpose conv: XLA's int8 conv, patches of the dilated g, and qjax's
sub-pixel patches (qjax.ops.conv_gemm.subpixel_plan).

For the convs XLA:CPU runs slowly, two formulations that reach its fast int8 conv instead of building patches: the
output features padded to 17, and (even widths) pixel pairs as features (`pair_kernel`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import harness as bench
from experiments.bench.groups import Group, GroupedSuite, Variant, maybe_inspect
from qjax.ops import conv as qconv
from qjax.ops import conv_gemm

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _parse_dims(s: str, n: int, what: str, form: str, example: str) -> tuple[int, ...]:
  """'256x28x1x6x5' -> (256, 28, 1, 6, 5): n integers joined by 'x', else a ValueError naming the form."""
  parts = str(s).lower().split('x')
  if len(parts) != n or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f'{what} {s!r}: expected {form}, like {example}')
  return tuple(int(p) for p in parts)


def parse_conv_shape(s: str) -> tuple[int, int, int, int, int]:
  """'256x28x1x6x5' -> (batch, H=W, C_in, C_out, k)."""
  return _parse_dims(s, 5, 'conv shape', 'BATCHxHxCINxCOUTxK', '256x28x1x6x5')  # type: ignore[return-value]


def pair_kernel(w: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
  """A stride-1 SAME conv kernel (k, k, C, O) as the kernel of the same conv over pixel pairs: an NHWC input of
  even width viewed as (N, H, W/2, 2C), a free reshape, and its output as (N, H, W/2, 2O). Pair p's output pixel
  2p + b reads input pixel 2(p + j) + a through tap t = 2j + a - b + lo (lo = (k - 1) // 2), zero where t falls
  outside the kernel: more features for XLA:CPU's fast int8 conv, at (width in pairs) * 4 / k times the MACs.
  Returns the (k, width in pairs, 2C, 2O) kernel and the pair padding of W (low, high)."""
  k, kw, c, o = w.shape
  lo = (kw - 1) // 2
  jmin, jmax = (-lo) // 2, (kw - lo) // 2
  wp = np.zeros((k, jmax - jmin + 1, 2, c, 2, o), w.dtype)
  for j in range(jmin, jmax + 1):
    for a in range(2):
      for b in range(2):
        t = 2 * j + a - b + lo
        if 0 <= t < kw:
          wp[:, j - jmin, a, :, b, :] = w[:, t]
  return wp.reshape(k, jmax - jmin + 1, 2 * c, 2 * o), (-jmin, jmax)


def pair_conv(x, wp, pad_w, k: int):
  """The int8 SAME conv of x (N, H, W, C), W even, with `pair_kernel`'s kernel: (N, H, W, O) in int32."""
  n, h, w, c = x.shape
  lo = (k - 1) // 2
  y = jax.lax.conv_general_dilated(x.reshape(n, h, w // 2, 2 * c), wp, (1, 1), ((lo, k - 1 - lo), pad_w),
                                   dimension_numbers=NHWC, preferred_element_type=jnp.int32)
  return y.reshape(n, h, w, wp.shape[-1] // 2)


def conv_group(config, b: int, h: int, cin: int, cout: int, k: int) -> Group:
  rng = np.random.default_rng(config.get('seed', 0))
  x = jnp.asarray(rng.standard_normal((b, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
  xq = jnp.asarray(rng.integers(-127, 128, x.shape), jnp.int8)
  wq = jnp.asarray(rng.integers(-127, 128, w.shape), jnp.int8)
  cp = qconv.conv_params(x.shape, w.shape, (1, 1), 'SAME', None, None, NHWC)
  f32 = jax.jit(lambda x, w: cp.conv(x, w))
  i8 = jax.jit(lambda x, w: cp.conv(x, w, jnp.int32))
  gemm = jax.jit(lambda x, w: conv_gemm.conv(x, w, cp))
  gemm_whole = jax.jit(lambda x, w: conv_gemm.conv(x, w, cp, chunk_bytes=1 << 40))
  stages = {n: jax.jit(lambda x, w, two=two: conv_gemm.conv(x, w, cp, two_stage=two))
            for n, two in (('one stage', False), ('two stages', True))}
  per_example = conv_gemm.example_patch_bytes(xq.shape, 1, cp, (k, k))
  chunked = {int(n): jax.jit(lambda x, w, n=int(n): conv_gemm.conv(x, w, cp, chunk_bytes=n * per_example))
             for n in config.get('chunk_examples', ()) if 0 < int(n) < b}
  patches = jax.jit(lambda x: conv_gemm.patches(x, cp, (k, k)))
  # Patches copied as int8 elements where qjax moves 4-byte words (conv_gemm.as_words): what the words save.
  elements = (jax.jit(lambda x, w: conv_gemm.conv(x, w, cp, words=False)) if conv_gemm.as_words(xq)[1]
              else None)
  c32 = max(cin, cout, int(config.get('pad_features', 32)))

  def padded(x, w):  # channels zero-padded so that XLA:CPU's fast int8 conv applies; output sliced back
    xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, c32 - cin)))
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, c32 - cin), (0, c32 - cout)))
    return cp.conv(xp, wp, jnp.int32)[..., :cout]
  pad_conv = jax.jit(padded)
  # The least padding that takes XLA:CPU's fast int8 conv (more than CPU_MIN_FEATURES features): the output's
  # features padded by zero kernel columns (17 for 16: 6% more MACs, where padding both to 32 costs 2-4x).
  o17 = qconv.CPU_MIN_FEATURES + 1
  pad_out = jax.jit(lambda x, w: cp.conv(x, jnp.pad(w, ((0, 0),) * 3 + ((0, o17 - cout),)), jnp.int32)[..., :cout])
  variants = {
      'f32 conv': Variant(lambda: f32(x, w), 'baseline', {'inspect': maybe_inspect(config, f32, x, w)}),
      'XLA int8 conv': Variant(lambda: i8(xq, wq), 'reference', {'inspect': maybe_inspect(config, i8, xq, wq)}),
      'patches + int8 dot': Variant(lambda: gemm(xq, wq), 'reference',
                                       {'inspect': maybe_inspect(config, gemm, xq, wq)}),
      'patches + int8 dot, one chunk': Variant(lambda: gemm_whole(xq, wq), 'reference'),
      **{f'patches in {n} + int8 dot': Variant(lambda f=f: f(xq, wq), 'reference') for n, f in stages.items()},
      **{f'patches + int8 dot, chunks of {n}': Variant(lambda f=f: f(xq, wq), 'reference')
         for n, f in chunked.items()},
      **({'patches + int8 dot, int8 elements': Variant(lambda: elements(xq, wq), 'reference')}
         if elements is not None else {}),
      'patches alone': Variant(lambda: patches(xq), 'reference'),
      f'int8 conv, features padded to {c32}': Variant(lambda: pad_conv(xq, wq), 'reference',
                                                      {'inspect': maybe_inspect(config, pad_conv, xq, wq)}),
  }
  # The float kernel gradient (a QAT step's float backward): XLA's transpose conv against the patch route in f32
  # (the measurements behind qjax.ops.conv.float_kernel_grad_by_patches).
  g = jnp.asarray(rng.standard_normal(f32(x, w).shape), jnp.float32)
  kg_xla = jax.jit(lambda x, g: jax.vjp(lambda w: cp.conv(x, w), w)[1](g)[0])
  kg_patches = jax.jit(lambda x, g: conv_gemm.kernel_grad(x, g, cp, (k, k), acc_t=jnp.float32))
  variants['f32 kernel gradient, XLA conv'] = Variant(lambda: kg_xla(x, g), 'reference')
  variants['f32 kernel gradient, patches^T . g'] = Variant(lambda: kg_patches(x, g), 'reference')
  slow = qconv.cpu_slow_reason(cp, x.shape, w.shape)
  if slow:
    variants[f'int8 conv, output features padded to {o17}'] = Variant(
        lambda: pad_out(xq, wq), 'reference', {'inspect': maybe_inspect(config, pad_out, xq, wq)})
    if h % 2 == 0:  # pixel pairs as features: twice the features, no patches to build
      wp, pad_w = pair_kernel(np.asarray(wq))
      wp = jnp.asarray(wp)
      pairs = jax.jit(lambda x, wp: pair_conv(x, wp, pad_w, k))
      variants['int8 conv of pixel pairs'] = Variant(lambda: pairs(xq, wp), 'reference',
                                                     {'inspect': maybe_inspect(config, pairs, xq, wp)})
  route = {'gemm': 'patches + int8 dot', 'fake': 'float', 'real': 'XLA int8 conv'}
  meta = {'shape': [b, h, cin, cout, k], 'xla_slow_reason': slow,
          'patch_bytes': qconv.patch_bytes(cp, x.shape, w.shape),
          'chunk_examples': conv_gemm.batch_chunk(x.shape, 1, cp, (k, k)),
          'two_stage_patches': k * k >= conv_gemm.TWO_STAGE_MIN_TAPS,
          'auto_route': route[qconv.cpu_int_route('auto', cp, x.shape, w.shape)],
          'float_kernel_grad_route': ('patches^T . g' if qconv.float_kernel_grad_by_patches(cp, x.shape, w.shape)
                                      else 'XLA conv')}
  return Group(f'conv {b}x{h}x{h} {cin}->{cout} {k}x{k}', variants, 'f32 conv', meta)


def parse_dlhs_shape(s: str) -> tuple[int, int, int, int, int, int]:
  """'256x28x16x32x3x2' -> (batch, H=W, C_in, C_out, k, stride) of the forward conv."""
  return _parse_dims(s, 6, 'input-gradient shape', 'BATCHxHxCINxCOUTxKxSTRIDE (the forward conv)',  # type: ignore
                     '256x28x16x32x3x2')


def dlhs_group(config, b: int, h: int, cin: int, cout: int, k: int, s: int) -> Group:
  """The input gradient of a strided conv (SAME): XLA's f32 transpose conv (what float training runs) against
  the int8 routes of the same lhs-dilated conv: XLA's int8 conv, patches of the dilated g, and qjax's sub-pixel
  patches (conv_gemm.subpixel_plan)."""
  rng = np.random.default_rng(config.get('seed', 0))
  x_shape, w_shape = (b, h, h, cin), (k, k, cin, cout)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  cp = qconv.conv_params(x_shape, w_shape, (s, s), 'SAME', None, None, NHWC)
  g_shape = jax.eval_shape(lambda x: cp.conv(x, w), jax.ShapeDtypeStruct(x_shape, jnp.float32)).shape
  g = jnp.asarray(rng.standard_normal(g_shape), jnp.float32)
  gq = jnp.asarray(rng.integers(-127, 128, g_shape), jnp.int8)
  wq = jnp.asarray(rng.integers(-127, 128, w_shape), jnp.int8)
  params, wt, _ = qconv.dlhs_conv(cp, x_shape, wq, g_shape)   # wt: the flipped, transposed kernel
  f32 = jax.jit(lambda g, w: jax.vjp(lambda x: cp.conv(x, w), jnp.zeros(x_shape, jnp.float32))[1](g)[0])
  i8 = jax.jit(lambda g, w: params.conv(g, w, jnp.int32))
  dilated = jax.jit(lambda g, w: conv_gemm.conv(g, w, params, subpixel=False))
  sub = jax.jit(lambda g, w: conv_gemm.conv(g, w, params))
  variants = {
      'f32 input gradient, XLA conv': Variant(lambda: f32(g, w), 'baseline'),
      'XLA int8 conv (lhs-dilated)': Variant(lambda: i8(gq, wt), 'reference',
                                             {'inspect': maybe_inspect(config, i8, gq, wt)}),
      'patches of the dilated g + int8 dot': Variant(lambda: dilated(gq, wt), 'reference',
                                                     {'inspect': maybe_inspect(config, dilated, gq, wt)}),
      'sub-pixel patches + int8 dot': Variant(lambda: sub(gq, wt), 'reference',
                                              {'inspect': maybe_inspect(config, sub, gq, wt)}),
  }
  plans = conv_gemm.subpixel_plans(params, g_shape, (k, k))
  meta = {'shape': [b, h, cin, cout, k, s], 'g_shape': list(g_shape),
          'xla_slow_reason': qconv.cpu_slow_reason(params, g_shape, wt.shape),
          'sub_pixel_taps': None if plans is None else [int(p[0].shape[0]) for p in plans]}
  return Group(f'input gradient {b}x{h}x{h} {cin}->{cout} {k}x{k} stride {s}', variants,
               'f32 input gradient, XLA conv', meta)


def conv_suite(config) -> GroupedSuite:
  def groups():
    for s in config.shapes:
      yield conv_group(config, *parse_conv_shape(s))
    for s in config.get('dlhs_shapes', ()):
      yield dlhs_group(config, *parse_dlhs_shape(s))
  return GroupedSuite('conv', groups, meta={'layout': 'NHWC/HWIO, SAME; forwards at stride 1, input gradients of '
                                                     'the dlhs_shapes strided convs'})


bench.register('conv')(conv_suite)
