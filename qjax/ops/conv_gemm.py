"""Integer convolutions as one int8 matmul over patches (im2col), for the shapes XLA:CPU's int8 conv runs slowly.

XLA:CPU runs an s8 x s8 -> s32 convolution on its fast kernel (YNNPACK) only with more than 16 input or output
features; below that it up-casts to s32 and runs 4-27x slower than the f32 conv (qjax.ops.conv). Its int8 matmul
has no such limit, so a conv can be rewritten as

    patches[n, oh, ow, (i, j, c)] = x_pad[n, oh * s + i * d, ow * s + j * d, c]     (k_h * k_w shifted slices)
    y[n, oh, ow, o]              = sum_(i, j, c) patches[n, oh, ow, (i, j, c)] * w[i, j, c, o]

one s8 x s8 -> s32 matmul with K = k_h * k_w * C_in. `x_pad` is x with the conv's padding (negative padding
crops) and its lhs dilation as interior zeros, so the same code computes the forward conv and the input-gradient
conv of a strided one. The kernel gradient reuses the forward's patches: dw[(i, j, c), o] = patches^T . g, with
patches^T materialised row-major so that XLA:CPU keeps that matmul on its fast kernel too (as in
qjax.ops.dot_general's drhs). Integer sums are exact, so each path equals XLA's conv bit for bit. The input
gradient of a strided conv (an lhs-dilated conv) convolves g itself, with the stride's output phases as features
(`subpixel_plan`), instead of the dilated g whose patches are mostly zeros.

The batch is processed in chunks whose patch matrix stays in cache (CHUNK_PATCH_BYTES): the k*k shifted copies
of a whole large batch cost as much as the f32 conv itself, those of a few examples at a time almost nothing.

`lax.conv_general_dilated_patches` is not used: on int8 it lowers to a conv with a one-hot kernel, which takes
XLA:CPU's slow int8 conv path itself (40-225x slower than f32, measured).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

# Patch bytes per batch chunk. Time ratios to the f32 conv forward of the whole batch (256), NHWC, SAME, int8
# operands, one pinned core, process clock, Intel Xeon with AVX-512 VNNI + AMX, jax 0.12.0.1, 2026-12-05
# (`python -m experiments.bench --config=configs/bench_conv.py "--config.chunk_examples=(1,2,4,8,16,32)"`,
# docs/benchmarks.md), by examples per chunk (the whole batch in one chunk: the previous lowering):
#   H, C_in -> C_out, k      one chunk    1       2       4       8       16      32     bytes per example
#   28, 16 -> 16, 3x3        1.25x        0.51x   0.47x   0.48x   0.54x   0.67x   0.78x  113 KiB
#   14, 6 -> 16, 5x5         0.89x        0.55x   0.50x   0.52x   0.48x   0.49x   0.54x  29 KiB
#   28, 1 -> 6, 5x5          1.12x        0.46x   0.36x   0.39x   0.39x   0.40x   0.42x  20 KiB
#   14, 32 -> 32, 3x3        0.66x        0.50x   0.47x   0.45x   0.44x   0.52x   0.57x  56 KiB
# XLA's own int8 conv on the same shapes: up-cast to s32 and 4.4-8.4x slower (6 -> 16, 16 -> 16), 0.88x (one
# input feature), 0.41x (32 -> 32). The optimum is flat between about 100 and 500 KiB of patches per chunk on this
# CPU (2 MiB of L2 per core); 256 KiB leaves room for the chunk's int32 output where the L2 is smaller.
CHUNK_PATCH_BYTES = 256 << 10


def _dilate(n: int, d: int) -> int:
  return 0 if n == 0 else 1 + d * (n - 1)


def supported(cp, lhs_shape) -> bool:
  """Whether the patch formulation covers this conv: two spatial dims, no feature or batch groups."""
  return len(lhs_shape) == 4 and cp.feature_group_count == 1 and cp.batch_group_count == 1


def to_nhwc(x, spec):
  """An operand from its dim order `spec` (batch/out-feature first, feature second, spatial after) to
  (spec[0], spatial..., spec[1]): NHWC for inputs and outputs, HWIO-like (O, H, W, I) order for kernels."""
  return jnp.transpose(x, (spec[0], *spec[2:], spec[1]))


# Kernels of this many taps or more build their patches in two stages (`patches`). Time ratios to the f32 conv
# forward of the shape, batch 256, NHWC, SAME, chunked, one stage vs two (the conv suite, `python -m
# experiments.bench --config=configs/bench_conv.py`, one pinned core, process clock, the Xeon of the table above,
# 2026-12-05, docs/benchmarks.md): 28x28 1 -> 6 5x5 0.49x -> 0.27x, 14x14 6 -> 16 5x5 0.58x -> 0.33x; the ResNet's
# 28x28 16 -> 16 3x3 0.64x -> 1.40x (slower), 14x14 32 -> 32 3x3 0.43x -> 0.38x (XLA's own int8 conv runs that one,
# 0.43x). End to end (the e2e suite's programs, ad-hoc A/B in one process): LeNet-5 PTQ serving 1.04x -> 0.80x at
# batch 1, 0.70x -> 0.58x at 256; the ResNet's serving at batch 256 0.82x -> 1.10x. So 5x5 kernels take two
# stages and 3x3 kernels keep one.
TWO_STAGE_MIN_TAPS = 10


# Patches are copied a 4-byte word per element where a pixel's features fill at least MIN_WORDS whole words
# (`as_words`). XLA:CPU copies each slice an element at a time, so an int8 slice of 16 features moves 16 elements
# per pixel, a uint32 view of it 4; XLA expands the view into shifts and masks fused into the slices, which cost
# less than the byte copies. Time ratios to the f32 conv forward, batch 256, NHWC, SAME, patches of 256 KiB per
# chunk, one pinned core, process clock, AMD EPYC Zen 4 (family 25 model 17, AVX-512 VNNI), jax 0.12.1,
# 2026-12-07: the conv suite's 'patches + int8 dot' and its 'int8 elements' variant (`python -m experiments.bench
# --config=configs/bench_conv.py --config.timing.clock=process`, with a 7x7 64 -> 64 shape added; docs/benchmarks.md):
#   H, C_in -> C_out, k      int8 elements    uint32 words
#   28, 16 -> 16, 3x3        0.77x            0.59x
#   14, 32 -> 32, 3x3        0.63x            0.53x         (XLA's own int8 conv: 0.50x, qjax's route there)
#   7, 64 -> 64, 3x3         0.46x            0.41x         (XLA's own int8 conv: 0.36x, qjax's route there)
# Fewer features gained nothing when forced into words (ad hoc, a script bypassing MIN_WORDS, not a repo command):
# 28, 4 -> 16 0.42x -> 0.44x and 8 -> 16 0.53x -> 0.53x; a uint16 view of LeNet-5's 6 features (3 half-words) made
# its 5x5 conv slower, 0.30-0.35x -> 0.56-0.66x. Hence whole words, and at least MIN_WORDS of them.
# The words are viewed as int8 again slice by slice, before the concatenate: viewing the concatenated patch matrix
# was a pass of its own (2.1 ms of each 11.7 ms loop of the ResNet's 16 -> 16 convs in a thunk profile of its PTQ
# serving at batch 256). In-process A/Bs on the Zen 4 above (ad hoc, 2026-12-07 evening, docs/benchmarks.md): that
# conv alone 0.57x -> 0.50x of f32, the e2e suite's ResNet PTQ serving at 256 0.633-0.637x -> 0.607-0.611x of
# float, at 8 0.66x -> 0.60x, its int8 training step 0.543x -> 0.523x.
WORD_BYTES = 4
MIN_WORDS = 4


def as_words(x) -> tuple[jax.Array, bool]:
  """(..., C) of 1- or 2-byte elements -> ((..., C * itemsize / 4) uint32 view of the same bytes, True) when a
  pixel's C features fill at least MIN_WORDS whole 4-byte words, else (x, False). Zero bytes are a zero word, so
  zero padding is unchanged; `from_words` undoes it."""
  size = x.dtype.itemsize
  c = x.shape[-1] * size
  if size >= WORD_BYTES or c % WORD_BYTES or c < MIN_WORDS * WORD_BYTES:
    return x, False
  return lax.bitcast_convert_type(x.reshape(*x.shape[:-1], c // WORD_BYTES, WORD_BYTES // size), jnp.uint32), True


def from_words(w, dtype) -> jax.Array:
  """(..., k) uint32 words -> (..., k * 4 / itemsize) elements of `dtype`: the inverse of `as_words`."""
  x = lax.bitcast_convert_type(w, dtype)             # (..., k, 4 / itemsize)
  return x.reshape(*x.shape[:-2], -1)


def patches(x, cp, k_sp, two_stage: bool | None = None, words: bool = True) -> jax.Array:
  """(N, OH, OW, k_h * k_w * C) patches of an NHWC array for a conv with params cp and kernel spatial size k_sp,
  in (i, j, c) order along the last dim.

  One stage: k_h * k_w shifted slices of x, concatenated. Two stages (two_stage=True; by default kernels of
  TWO_STAGE_MIN_TAPS taps or more):
  the k_w shifts along W concatenated on features, (N, H', OW, k_w * C) in (j, c) order, then k_h shifts of that
  along H: k_h + k_w slices instead of k_h * k_w. XLA:CPU runs each slice as its own kernel (it does not fuse
  them into the concatenate), which at 25 taps costs more than the small matmul they feed. Either way the
  slices move whole 4-byte words where a pixel's features fill them (`as_words`; words=False copies elements,
  for the conv suite's comparison): the same bytes, in the same (i, j, c) order. Each final slice is viewed as
  int8 again before the concatenate, which XLA fuses into it: viewing the concatenated words instead was a pass of
  its own over the whole patch matrix (see WORD_BYTES)."""
  # The barrier materialises x once: without it XLA fuses x's producer (the quantization of a float activation)
  # into each of the k*k slices and recomputes it k*k times.
  x = lax.optimization_barrier(x)
  dtype = x.dtype
  x, packed = as_words(x) if words else (x, False)
  cols = _patch_slices(x, cp, k_sp, two_stage)
  return jnp.concatenate([from_words(c, dtype) for c in cols] if packed else cols, axis=-1)


def _patch_slices(x, cp, k_sp, two_stage: bool | None) -> list[jax.Array]:
  """The slices whose concatenation on the last dim is the patches (`patches`)."""
  zero = jnp.zeros((), x.dtype)
  spatial = [(lo, hi, ld - 1) for (lo, hi), ld in zip(cp.padding, cp.lhs_dilation, strict=True)]
  pads = [(0, 0, 0), *spatial, (0, 0, 0)]
  xp = lax.pad(x, zero, pads)  # (N, H', W', C)
  out_sp = [(p - _dilate(k, rd)) // s + 1 for p, k, rd, s in
            zip(xp.shape[1:3], k_sp, cp.rhs_dilation, cp.window_strides, strict=True)]
  if two_stage is None:
    two_stage = int(k_sp[0]) * int(k_sp[1]) >= TWO_STAGE_MIN_TAPS
  if two_stage:
    rows = _shifts(xp, 2, k_sp[1], cp.rhs_dilation[1], cp.window_strides[1], out_sp[1])  # (N, H', OW, KW*C)
    return _shift_list(rows, 1, k_sp[0], cp.rhs_dilation[0], cp.window_strides[0], out_sp[0])  # KH x (N, OH, OW, KW*C)
  cols = []
  for i in range(k_sp[0]):
    for j in range(k_sp[1]):
      start = (0, i * cp.rhs_dilation[0], j * cp.rhs_dilation[1], 0)
      limit = (xp.shape[0], start[1] + (out_sp[0] - 1) * cp.window_strides[0] + 1,
               start[2] + (out_sp[1] - 1) * cp.window_strides[1] + 1, xp.shape[3])
      cols.append(lax.slice(xp, start, limit, (1, *cp.window_strides, 1)))
  return cols


def _shift_list(x, axis: int, k: int, dilation: int, stride: int, n_out: int) -> list[jax.Array]:
  """The k shifted (by i * dilation), strided slices of n_out positions of x along `axis`, in i order."""
  out = []
  for i in range(k):
    start = [0] * x.ndim
    limit = list(x.shape)
    strides = [1] * x.ndim
    start[axis] = i * dilation
    limit[axis] = start[axis] + (n_out - 1) * stride + 1
    strides[axis] = stride
    out.append(lax.slice(x, start, limit, strides))
  return out


def _shifts(x, axis: int, k: int, dilation: int, stride: int, n_out: int) -> jax.Array:
  """`_shift_list` concatenated on the last (feature) dim."""
  out = _shift_list(x, axis, k, dilation, stride, n_out)
  return out[0] if k == 1 else jnp.concatenate(out, axis=-1)


def example_patch_bytes(x_shape, itemsize: int, cp, k_sp) -> int:
  """Bytes of one example's patches for an NHWC input of shape x_shape: OH * OW * KH * KW * C * itemsize."""
  out = 1
  for n, k, s, (lo, hi), ld, rd in zip(x_shape[1:3], k_sp, cp.window_strides, cp.padding, cp.lhs_dilation,
                                       cp.rhs_dilation, strict=True):
    out *= max(0, (_dilate(n, ld) + lo + hi - _dilate(k, rd)) // s + 1)
  return out * int(k_sp[0]) * int(k_sp[1]) * int(x_shape[3]) * itemsize


def batch_chunk(x_shape, itemsize: int, cp, k_sp, chunk_bytes: int | None = None) -> int:
  """Examples per chunk: as many as keep the chunk's patches within chunk_bytes (default CHUNK_PATCH_BYTES),
  at least one, at most the batch; lowered to the largest divisor of the batch if that is at least half as many.

  Why a divisor: a chunk that does not divide the batch pads the whole input to a multiple of it and slices the
  whole output back (`_chunked`, `_map_batch`), two copies as large as the batch's input and output. At batch 256
  LeNet-5's 28x28 1 -> 6 conv took chunks of 13 (now 8, a divisor), and 3 or 6 examples per chunk made the
  ResNet's serving 15% slower than 2 or 4. In-process A/Bs (ad hoc, one pinned core of a Zen 4, 2026-12-07 night,
  docs/benchmarks.md), time ratios to float at batch 256: LeNet-5 PTQ serving 0.505x -> 0.438x, int8 training
  0.544x -> 0.527x; ResNet PTQ serving 0.592x -> 0.577x, int8 training 0.534x -> 0.497x."""
  limit = CHUNK_PATCH_BYTES if chunk_bytes is None else chunk_bytes
  n = int(x_shape[0])
  c = int(max(1, min(n, limit // max(1, example_patch_bytes(x_shape, itemsize, cp, k_sp)))))
  d = max(d for d in range(1, c + 1) if n % d == 0)
  return d if 2 * d >= c else c


def _chunked(x, chunk: int):
  """(N, ...) -> (k, c, ...): k chunks of c <= chunk examples, zero-padded at the end by fewer than k examples."""
  k = -(-x.shape[0] // chunk)
  c = -(-x.shape[0] // k)
  x = jnp.pad(x, [(0, k * c - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(k, c, *x.shape[1:])


def _map_batch(f, x, chunk: int):
  """f over the batch of x in chunks of at most `chunk` examples (a loop in the program, not unrolled; padding
  examples are dropped from the result): f(x) exactly, for f that maps each example on its own.

  The loop reads and writes each chunk as one flat row: XLA:CPU's dynamic slice and update of a (c, H, W, C) block
  inside a stacked batch cost more than of a row of the same bytes. In-process A/Bs (ad hoc, one pinned core of a
  Zen 4, 2026-12-07 evening, docs/benchmarks.md): the ResNet's 28x28 16 -> 16 conv at batch 256 9.7 -> 8.8 ms;
  the e2e suite's PTQ serving at 256, ResNet 0.614x -> 0.592x and LeNet-5 0.544x -> 0.521x of float; LeNet-5's
  int8 training step 36.0-37.1 -> 36.8-37.6 ms, a cost within 2%. The kernel gradient's loop (`kernel_grad`) keeps
  its blocks: read as rows there, LeNet-5's training step took 1.8-2.2 ms longer."""
  if chunk >= x.shape[0]:
    return f(x)
  xs = _chunked(x, chunk)                                      # (k, c, ...)
  out = jax.eval_shape(f, jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype)).shape
  y = lax.map(lambda row: f(row.reshape(xs.shape[1:])).reshape(-1), xs.reshape(xs.shape[0], -1))  # (k, c * ...)
  return y.reshape(-1, *out[1:])[:x.shape[0]]


# The input gradient of a stride-s conv is a conv over g dilated by s: (s^2 - 1) / s^2 of its patches are the
# dilation's zeros. The sub-pixel form (`subpixel_plan`) convolves g itself with the s^2 output phases as output
# features: per output pixel (and per input feature) the patches shrink from k^2 bytes to about ceil(k / s)^2 /
# s^2, the matmul from k^2 MACs per output feature to about ceil(k / s)^2 (3x3, stride 2: 9x fewer patch bytes,
# 2.25x fewer MACs). Time ratios to XLA's f32 input gradient (the transpose conv that float training runs), batch
# 256, SAME, one pinned core, process clock, AMD EPYC Zen 4 (family 25 model 17, AVX-512 VNNI), jax 0.12.1,
# 2026-12-07 (the conv suite's input-gradient groups: `python -m experiments.bench --config=configs/bench_conv.py
# --config.timing.clock=process "--config.shapes=()"`, docs/benchmarks.md):
#   forward conv                   XLA int8 (s32)   dilated-g patches   sub-pixel patches
#   28, 16 -> 32, 3x3, stride 2    7.59x            1.30x               0.58x
#   28, 16 -> 32, 1x1, stride 2    0.87x            3.22x               0.44x
#   14, 32 -> 64, 3x3, stride 2    11.97x           1.42x               0.58x
# So lhs-dilated convs with unit strides always take the sub-pixel form. (XLA's int8 conv of the sub-pixel conv
# itself, which has more than 16 features, was no faster than its patches: 7.4-8.0 ms against 7.2 ms and 4.8 ms
# against 3.9 ms for the two 3x3 shapes; an ad-hoc script, not a repo command.)
def subpixel_plan(n: int, k: int, lo: int, hi: int, d: int):
  """One spatial dim of a stride-1, undilated-kernel conv over x dilated by d (d - 1 zeros between elements),
  padded (lo, hi), as one conv over x itself whose d output phases are output features ("sub-pixel").

  Output position p = d * m + phase sums the taps i with (p + i - lo) % d == 0, which read x[m + u] at
  u = (phase + i - lo) // d: for each phase, consecutive u. So with U the union of those u, y[d * m + phase] =
  sum_u x[m + u] * kernel_c[u, phase], kernel_c[u, phase] = w[i] (the tap reading u at that phase, else a zero
  tap). Phases that no tap reaches (a kernel smaller than d) are zero and left out of the conv. Returns
  (idx, phases, (lo', hi'), out, m): idx (U, len(phases)) of tap indices (k for the zero tap) for the phases
  that have taps, the padding of x for the stride-1 conv of U taps, the dilated conv's output size out and the
  phase conv's m = ceil(out / d); or None when no tap ever reads x (the output is all zero)."""
  out = _dilate(n, d) + lo + hi - k + 1
  taps = {((ph + i - lo) // d, ph): i for ph in range(d) for i in range(k) if (ph + i - lo) % d == 0}
  if out <= 0 or not taps:
    return None
  umin = min(u for u, _ in taps)
  span = max(u for u, _ in taps) - umin + 1
  phases = sorted({ph for _, ph in taps})
  idx = np.full((span, len(phases)), k)
  for (u, ph), i in taps.items():
    idx[u - umin, phases.index(ph)] = i
  m = -(-out // d)
  return idx, tuple(phases), (-umin, m - 1 + span - n + umin), out, m


def _interleave(y, axis: int, phases: tuple[int, ...], d: int):
  """y with len(phases) phases on `axis` -> d phases, the missing ones zero (static slices and zeros,
  concatenated)."""
  if len(phases) == d:
    return y
  zero = jnp.zeros(y.shape[:axis] + (1,) + y.shape[axis + 1:], y.dtype)
  parts = [lax.slice_in_dim(y, phases.index(p), phases.index(p) + 1, axis=axis) if p in phases else zero
           for p in range(d)]
  return jnp.concatenate(parts, axis=axis)


def subpixel_plans(cp, x_shape, k_sp):
  """The two dims' `subpixel_plan`s for an NHWC input of x_shape when the conv is lhs-dilated with unit strides
  and rhs dilation (the input gradient of a strided conv), else None."""
  if all(d == 1 for d in cp.lhs_dilation) or any(s != 1 for s in (*cp.window_strides, *cp.rhs_dilation)):
    return None
  plans = [subpixel_plan(n, int(k), lo, hi, d) for n, k, (lo, hi), d in
           zip(x_shape[1:3], k_sp, cp.padding, cp.lhs_dilation, strict=True)]
  return None if None in plans else plans


def conv(a, b, cp, acc_t=jnp.int32, chunk_bytes: int | None = None, two_stage: bool | None = None,
         words: bool = True, subpixel: bool = True) -> jax.Array:
  """cp.conv(a, b, acc_t) (a conv of integer operands in cp's layout) as patches . kernel, one int8 matmul per
  batch chunk (`batch_chunk`); two_stage and words pick the patch construction (`patches`; two_stage None: by the
  kernel's taps). An lhs-dilated conv with unit strides (the input gradient of a strided conv) runs as the conv
  of x itself with the output phases as features (`subpixel_plan`) unless subpixel=False: the dilated input's
  patches are mostly zeros."""
  lhs_spec, rhs_spec, out_spec = cp.dnums
  x = to_nhwc(a, lhs_spec)                                     # (N, H, W, C)
  w = jnp.transpose(b, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (KH, KW, C, O)
  plans = subpixel_plans(cp, x.shape, w.shape[:2]) if subpixel else None
  if plans is None:
    y = _nhwc_conv(x, w, cp, acc_t, chunk_bytes, two_stage, words)
  else:
    (ih, qh, ph, oh, mh), (iw, qw, pw, ow, mw) = plans
    dh, dw = cp.lhs_dilation
    c, o = w.shape[2:]
    wz = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))        # a zero tap at index (KH, KW)
    wc = wz[ih[:, None, :, None], iw[None, :, None, :]]       # (UH, UW, AH, AW, C, O): the phases with taps
    ah, aw = wc.shape[2:4]
    wc = jnp.transpose(wc, (0, 1, 4, 2, 3, 5)).reshape(*wc.shape[:2], c, ah * aw * o)
    cp1 = dataclasses.replace(cp, window_strides=(1, 1), padding=(ph, pw), lhs_dilation=(1, 1))
    y = _nhwc_conv(x, wc, cp1, acc_t, chunk_bytes, two_stage, words)  # (N, MH, MW, AH*AW*O)
    n = y.shape[0]
    y = jnp.transpose(y.reshape(n, mh, mw, ah, aw, o), (0, 1, 3, 2, 4, 5))  # (N, MH, AH, MW, AW, O)
    y = _interleave(_interleave(y, 2, qh, dh), 4, qw, dw)     # (N, MH, DH, MW, DW, O)
    y = y.reshape(n, mh * dh, mw * dw, o)[:, :oh, :ow]        # (N, OH, OW, O)
  inv = [0] * 4
  for pos, d in enumerate((out_spec[0], *out_spec[2:], out_spec[1])):
    inv[d] = pos
  return jnp.transpose(y, inv)


def _nhwc_conv(x, w, cp, acc_t, chunk_bytes, two_stage, words) -> jax.Array:
  """(N, H, W, C) x (KH, KW, C, O) -> (N, OH, OW, O) by patches . kernel a batch chunk at a time (cp: padding,
  strides and dilations)."""
  k_sp = w.shape[:2]
  wm = w.reshape(-1, w.shape[-1])                              # (KH*KW*C, O)
  if k_sp == (1, 1) and all(v == 1 for v in (*cp.window_strides, *cp.lhs_dilation)) and \
     all(p == (0, 0) for p in cp.padding):                    # the patches are x itself: one matmul, no copies
    return lax.dot_general(x, wm, (((3,), (0,)), ((), ())), preferred_element_type=acc_t)

  def chunk_conv(xc):                                          # (n, H, W, C) -> (n, OH, OW, O)
    p = patches(xc, cp, k_sp, two_stage, words)                # (n, OH, OW, KH*KW*C)
    return lax.dot_general(p, wm, (((3,), (0,)), ((), ())), preferred_element_type=acc_t)
  return _map_batch(chunk_conv, x, batch_chunk(x.shape, x.dtype.itemsize, cp, k_sp, chunk_bytes))


def kernel_grad(a, g, cp, k_sp, acc_t=jnp.int32, chunk_bytes: int | None = None) -> jax.Array:
  """The kernel gradient of the conv cp(a, w) for the output gradient g, as patches(a)^T . g summed over batch
  chunks (`batch_chunk`; integer sums, so exact in any order), returned in the (KH, KW, C, O) order (the caller
  moves it to the kernel's layout)."""
  lhs_spec, _, out_spec = cp.dnums
  x = to_nhwc(a, lhs_spec)                                      # (N, H, W, C)
  gm = to_nhwc(g, out_spec)                                     # (N, OH, OW, O)

  def chunk_grad(xc, gc):                                       # one chunk's (K, O) sum
    p = patches(xc, cp, k_sp)                                   # (n, OH, OW, KH*KW*C)
    p2 = p.reshape(-1, p.shape[-1])                             # (M, K)
    g2 = gc.reshape(-1, gc.shape[-1])                           # (M, O)
    # (K, M) materialised row-major: XLA:CPU otherwise folds the transpose into the dot as a column-major operand
    # and up-casts it to s32 off the fast kernel.
    pt = with_layout_constraint(jnp.transpose(lax.optimization_barrier(p2)), Layout(major_to_minor=(0, 1)))
    return lax.dot_general(pt, g2, (((1,), (0,)), ((), ())), preferred_element_type=acc_t)  # (K, O)
  chunk = batch_chunk(x.shape, x.dtype.itemsize, cp, k_sp, chunk_bytes)
  if chunk >= x.shape[0]:
    dw = chunk_grad(x, gm)
  else:  # zero-padded examples have a zero g, so they add nothing
    zero = jnp.zeros((int(np.prod(k_sp)) * x.shape[-1], gm.shape[-1]), acc_t)
    dw, _ = lax.scan(lambda acc, xg: (acc + chunk_grad(*xg), None), zero, (_chunked(x, chunk), _chunked(gm, chunk)))
  return dw.reshape(*k_sp, x.shape[-1], gm.shape[-1])
