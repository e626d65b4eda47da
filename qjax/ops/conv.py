"""Quantized `conv_general_dilated`: a drop-in for `jax.lax.conv_general_dilated` with quantized fwd, dlhs, drhs.

    y = conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), config=cfg)
    nn.Conv(..., conv_general_dilated=make_conv_general_dilated(cfg))     # Flax linen and nnx

The same structure as `qjax.ops.dot_general`, with a convolution in place of the matmul:
  1. each operand goes through `fake_quant` with its fwd spec and estimator (STE, LSQ, PACT, ...), which gives
     the operand's gradient mask and the gradients of learned quantizer parameters;
  2. a `custom_vjp` convolution takes the on-grid operands with their scales and runs the forward either as a
     float conv of the on-grid values ('fake') or as int8 x int8 -> int32 (fp8 x fp8 -> f32) followed by the
     rescale ('real'). Its backward computes both gradients as convolutions, each quantized with its own config:
         dlhs = conv(g, rev(rhs)^T)     (the transpose of the conv in lhs; `config.dlhs`: lhs = g, rhs = kernel)
         drhs = conv(lhs^T, g)          (the transpose of the conv in rhs; `config.drhs`: lhs = input, rhs = g)
     built exactly like JAX's own transpose rules of `conv_general_dilated` (rev, padding, the swap of strides and
     dilations, feature groups <-> batch groups), so the kernel gradient is a real quantized convolution and never
     the exact zero of differentiating through `round` (AQT's conv).

Granularity inside a conv. Scales must be constant along every contracted dimension (input features and the
spatial window) to factor out of the integer accumulation, so 'per_channel' means one scale per index of the one
non-contracted dimension of each operand of each convolution:
    fwd    lhs (input):     per example (the lhs batch dim N)
           rhs (kernel):    per output feature (O)
    dlhs   lhs (g):         per example (the output batch dim N)
           rhs (kernel):    per input feature (I; per (group, input feature) for feature_group_count > 1)
    drhs   lhs (input):     per input feature (the lhs feature dim C)
           rhs (g):         per output feature (the output feature dim)
A spec's `axis` is ignored for 'per_channel' (the op sets it), and 'per_tensor' is always allowed.
'per_group' (sub-channel groups) is rejected with a ValueError: a conv contracts features and window together.

Asymmetric (and uint8) operands run natively in 'real' mode through zero-point cross terms, all in int32:
    sum (ql - zl)(qr - zr) = conv(ql, qr) - zl conv(1, qr) - zr conv(ql, 1) + zl zr conv(1, 1)
where conv(1, qr) convolves a ones-input (batch 1, or one per batch group) with the kernel, conv(ql, 1) the input
with a ones-kernel with one output feature per group, and conv(1, 1) counts the in-bounds taps; padding and
lhs dilation insert true zeros, which these terms account for exactly.

XLA:CPU (jaxlib 0.12) runs an s8 x s8 -> s32 conv natively (a YNNPACK `__ynn_fusion`) only in NHWC/HWIO/NHWC
layout with two spatial dims and more than 16 input or output features (strides, rhs dilation and feature groups
are fine); every other int8 conv is up-cast to s32 x s32 on Eigen, 9-27x slower than f32. So on CPU:
  - 'real' int convs of one or two spatial dims are moved to NHWC/HWIO first (int8 transposes pinned row-major;
    1-D convs get a size-1 spatial dim), which keeps the forward and both gradient convs on YNNPACK whatever the
    user's dimension numbers;
  - the convs XLA:CPU would up-cast (lhs-dilated ones, i.e. the input gradient of a strided conv, and those with
    <= 16 input and output features; `cpu_slow_reason`) run as patches + one int8 matmul per batch chunk
    (qjax.ops.conv_gemm), in 'real' and 'auto' mode; 'auto' runs those the lowering does not cover (grouped,
    3-D) as 'fake', 'real' as XLA's up-cast int8 conv. Convs of one input feature take the lowering too.
Batch-grouped convs (the kernel gradient of a grouped conv) are up-cast too but still beat XLA:CPU's f32 version,
so they stay int8; 3-D convs are up-cast. fp8 convs are up-cast to f32. See tests/test_conv.py.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from qjax import formats, quantizers
from qjax.ops import conv_gemm
from qjax.ops.config import DotConfig, MatmulConfig
from qjax.ops.dot_general import (
  check_operands,
  direct_flags,
  for_training,
  grid_only,
  native_kind,
  operand_result_type,
  quantize_forward,
  quantize_operand,
  same_grid,
  with_integers,
  zero_cotangent,
)
from qjax.spec import QuantSpec

ConvDimensionNumbers = lax.ConvDimensionNumbers
log = logging.getLogger('qjax')
_ROUTED: set = set()


@dataclasses.dataclass(frozen=True)
class ConvParams:
  """Everything of one `lax.conv_general_dilated` call but its operands (explicit padding, canonical dnums)."""
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  dnums: ConvDimensionNumbers
  feature_group_count: int = 1
  batch_group_count: int = 1

  def conv(self, a, b, preferred_element_type=None):
    return lax.conv_general_dilated(a, b, self.window_strides, self.padding, self.lhs_dilation, self.rhs_dilation,
                                    self.dnums, self.feature_group_count, self.batch_group_count,
                                    preferred_element_type=preferred_element_type)


def _dilate(n: int, d: int) -> int:
  return 0 if n == 0 else 1 + d * (n - 1)


def conv_params(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                dimension_numbers=None, feature_group_count=1, batch_group_count=1) -> ConvParams:
  """Canonicalizes lax's conv arguments: ConvDimensionNumbers, explicit (lo, hi) padding, dilation tuples."""
  dn = lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
  nsp = len(lhs_shape) - 2
  lhs_dilation = tuple(int(d) for d in (lhs_dilation or (1,) * nsp))
  rhs_dilation = tuple(int(d) for d in (rhs_dilation or (1,) * nsp))
  window_strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    if any(d != 1 for d in lhs_dilation):
      raise ValueError('conv_general_dilated: string padding is not implemented with lhs_dilation (transposed '
                       'convolution); give explicit (low, high) pairs')
    in_sp = [lhs_shape[d] for d in dn.lhs_spec[2:]]
    k_sp = [_dilate(rhs_shape[d], r) for d, r in zip(dn.rhs_spec[2:], rhs_dilation, strict=True)]
    padding = lax.padtype_to_pads(in_sp, k_sp, window_strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return ConvParams(window_strides, padding, lhs_dilation, rhs_dilation, dn, int(feature_group_count),
                    int(batch_group_count))


# ------------------------------------------------------------------------------- backward convolutions


def _spec_t(spec):
  return (spec[1], spec[0]) + tuple(spec[2:])


def _axis_out_of(src: int, size1: int, x):
  shape = list(x.shape)
  shape[src:src + 1] = [size1, shape[src] // size1]
  return x.reshape(shape)


def _axis_into(src: int, dst: int, x):
  """Merges axis src into axis dst (numbered after src's removal) as its major part."""
  perm = [i for i in range(x.ndim) if i != src]
  perm.insert(dst, src)
  shape = list(np.delete(np.array(x.shape), src))
  shape[dst] *= x.shape[src]
  return jnp.transpose(x, perm).reshape(shape)


def dlhs_conv(cp: ConvParams, lhs_shape, rhs, g_shape):
  """The conv computing the lhs gradient as conv(g, rhs_t) (JAX's transpose rule of conv_general_dilated in lhs).

  Returns (params, rhs_t, post) with post mapping the conv's output to lhs's layout."""
  dn = cp.dnums
  lhs_spec, rhs_spec, out_spec = dn
  fg, bg = cp.feature_group_count, cp.batch_group_count
  groups = fg if fg > 1 else bg
  k_sp = [rhs.shape[d] for d in rhs_spec[2:]]
  if groups > 1:  # Move the group out of the kernel's output features into its input features.
    rhs = _axis_into(rhs_spec[0], rhs_spec[1], _axis_out_of(rhs_spec[0], groups, rhs))
  in_sp = [lhs_shape[d] for d in lhs_spec[2:]]
  out_sp = [g_shape[d] for d in out_spec[2:]]
  padding = []
  for i, k, s, o, (lo, _), ld, rd in zip(in_sp, k_sp, cp.window_strides, out_sp, cp.padding, cp.lhs_dilation,
                                         cp.rhs_dilation, strict=True):
    before = _dilate(k, rd) - lo - 1
    padding.append((before, _dilate(i, ld) + _dilate(k, rd) - 1 - _dilate(o, s) - before))
  params = ConvParams(cp.lhs_dilation, tuple(padding), cp.window_strides, cp.rhs_dilation,
                      ConvDimensionNumbers(out_spec, _spec_t(rhs_spec), lhs_spec), groups, 1)

  def post(out):
    if bg > 1:
      out = _axis_into(lhs_spec[1], lhs_spec[0], _axis_out_of(lhs_spec[1], bg, out))
    return out
  return params, lax.rev(rhs, tuple(rhs_spec[2:])), post


def drhs_conv(cp: ConvParams, lhs_shape, rhs_shape, g_shape) -> ConvParams:
  """The conv computing the kernel gradient as conv(lhs^T, g) (JAX's transpose rule in rhs)."""
  dn = cp.dnums
  lhs_spec, rhs_spec, out_spec = dn
  fg, bg = cp.feature_group_count, cp.batch_group_count
  fg, bg = (bg, 1) if bg > 1 else (1, fg)
  in_sp = [lhs_shape[d] for d in lhs_spec[2:]]
  k_sp = [rhs_shape[d] for d in rhs_spec[2:]]
  out_sp = [g_shape[d] for d in out_spec[2:]]
  padding = []
  for i, k, s, o, (lo, _), ld, rd in zip(in_sp, k_sp, cp.window_strides, out_sp, cp.padding, cp.lhs_dilation,
                                         cp.rhs_dilation, strict=True):
    padding.append((lo, _dilate(o, s) - _dilate(i, ld) + _dilate(k, rd) - lo - 1))
  return ConvParams(cp.rhs_dilation, tuple(padding), cp.lhs_dilation, cp.window_strides,
                    ConvDimensionNumbers(_spec_t(lhs_spec), _spec_t(out_spec), _spec_t(rhs_spec)), fg, bg)


# ------------------------------------------------------------------------------------------ operand specs


def resolve_conv_spec(spec: QuantSpec | None, shape, channel_dim: int, where: str) -> QuantSpec | None:
  """Makes a conv operand's spec concrete: per_channel along `channel_dim` (see the module docstring)."""
  if spec is None:
    return None
  if spec.granularity == 'per_group':
    raise ValueError(f'{where}: granularity="per_group" (group_size={spec.group_size}) is not supported by '
                     'quantized convolutions, whose contraction mixes input features and the spatial window; '
                     'use granularity="per_channel" or "per_tensor"')
  if spec.granularity == 'per_channel':
    spec = spec.replace(axis=channel_dim) if shape[channel_dim] > 1 else spec.replace(granularity='per_tensor')
  return spec


def _check_specs(config: DotConfig):
  for name in ('fwd', 'dlhs', 'drhs'):
    mcfg = getattr(config, name)
    for side in ('lhs', 'rhs'):
      resolve_conv_spec(getattr(mcfg, side), (2,), 0, f'conv_general_dilated {name}.{side}')


# XLA:CPU (jaxlib 0.12) keeps an s8 conv on YNNPACK only when the lhs or rhs has more than this many features.
CPU_MIN_FEATURES = 16


def cpu_slow_reason(cp: ConvParams, lhs_shape, rhs_shape) -> str | None:
  """Why XLA:CPU would up-cast this int8 conv to a slow s32 conv (measured 9-27x slower than f32), or None."""
  if any(d != 1 for d in cp.lhs_dilation):
    return 'is lhs-dilated (the input gradient of a strided conv)'
  c, o = lhs_shape[cp.dnums.lhs_spec[1]], rhs_shape[cp.dnums.rhs_spec[0]]
  # One input feature is the exception: XLA's int8 conv then runs on its fast kernel (0.86x of f32 on a Xeon
  # with VNNI at 28x28, 1 -> 6 features, 5x5; 0.59-0.67x on a Zen 4), though the patch route beats it.
  if max(c, o) <= CPU_MIN_FEATURES and c > 1:
    return f'has {c} input and {o} output features (<= {CPU_MIN_FEATURES})'
  return None


# Where XLA:CPU's int8 conv is slow (cpu_slow_reason), the patches + int8 matmul lowering (qjax.ops.conv_gemm)
# is exact and beats both XLA's up-cast s32 conv and the f32 conv at any batch size, because it builds the patches
# of a few examples at a time (conv_gemm.CHUNK_PATCH_BYTES). Time ratios to the f32 conv forward of the same
# shape, batch 256, NHWC, SAME, one pinned core, process clock (`python -m experiments.bench
# --config=configs/bench_conv.py`, docs/benchmarks.md), Intel Xeon, AVX-512 VNNI + AMX, jax 0.12.0.1, 2026-12-05:
#   H, C_in -> C_out, k      XLA int8 conv          patches, whole batch     patches by chunks
#   28, 16 -> 16, 3x3        up-cast, 8.4x          1.25x                    0.49x
#   14, 6 -> 16, 5x5         up-cast, 4.4x          0.89x                    0.51x
#   28, 1 -> 6, 5x5          0.88x                  1.12x                    0.47x
#   14, 32 -> 32, 3x3        0.41x                  0.66x                    0.43x
# So 'auto' takes the lowering for XLA's slow convs and for one-input-feature convs, and leaves convs with more
# than 16 features on XLA's int8 conv, where the two are even. (Before the chunks, 'auto' ran slow convs whose
# patches exceeded 2 MiB as float convs.)


def patch_bytes(cp: ConvParams, lhs_shape, rhs_shape) -> int:
  """Bytes of the int8 patch matrix of this conv's whole batch (qjax.ops.conv_gemm builds it a chunk at a time):
  N * out spatial * kernel spatial * C."""
  lhs_spec, rhs_spec, _ = cp.dnums
  k_sp = [rhs_shape[d] for d in rhs_spec[2:]]
  out = 1
  for d, k, s, (lo, hi), ld, rd in zip(lhs_spec[2:], k_sp, cp.window_strides, cp.padding, cp.lhs_dilation,
                                       cp.rhs_dilation, strict=True):
    out *= max(0, (_dilate(lhs_shape[d], ld) + lo + hi - _dilate(k, rd)) // s + 1)
  return lhs_shape[lhs_spec[0]] * out * int(np.prod(k_sp)) * lhs_shape[lhs_spec[1]]


def gemm_route(cp: ConvParams, lhs_shape, rhs_shape) -> bool:
  """Whether 'auto' can run this int conv as patches + int8 matmul: the lowering covers it and it has more than
  one output feature (a matrix-vector product is off XLA:CPU's fast int8 kernel)."""
  return conv_gemm.supported(cp, lhs_shape) and rhs_shape[cp.dnums.rhs_spec[0]] > 1


def choose_mode(mcfg: MatmulConfig, aspec, bspec, where: str, cp: ConvParams | None = None, lhs_shape=None,
                rhs_shape=None) -> str:
  """'real', 'gemm' or 'fake' for one conv, raising when 'real' is asked of formats that cannot run natively.

  On XLA:CPU an int conv that XLA would up-cast to s32 (`cpu_slow_reason`) runs as 'gemm' (patches + one int8
  matmul, qjax.ops.conv_gemm: exact, on the fast kernel) when the lowering covers it; in 'auto' mode where
  `gemm_route` allows, else as 'fake'. A conv of one input feature takes the lowering in 'auto' on the same
  condition, else XLA's int8 conv."""
  if mcfg.mode == 'fake' or aspec is None or bspec is None:
    return 'fake'
  ka, kb = native_kind(aspec), native_kind(bspec)
  native = ka is not None and ka == kb
  if mcfg.mode == 'real' and not native:
    raise ValueError(f'{where}: mode="real" needs both operands in integer (<= 8 bit) or both in fp8 formats; '
                     f'got lhs format={aspec.format!r} ({aspec.estimator}), rhs format={bspec.format!r} '
                     f'({bspec.estimator}); use mode="auto" or "fake"')
  if not native:
    return 'fake'
  if ka == 'int' and cp is not None and jax.default_backend() == 'cpu':
    mode = cpu_int_route(mcfg.mode, cp, lhs_shape, rhs_shape)
    reason = cpu_slow_reason(cp, lhs_shape, rhs_shape)
    if reason and mcfg.mode == 'auto' and (where, reason, mode) not in _ROUTED:
      _ROUTED.add((where, reason, mode))
      how = 'patches + one int8 matmul' if mode == 'gemm' else 'a float conv of the quantized values'
      log.info('qjax: conv %s %s, which XLA:CPU runs as a slow s32 conv: running it as %s (mode="auto")',
               where, reason, how)
    return mode
  return 'real'


def cpu_int_route(mode: str, cp: ConvParams, lhs_shape, rhs_shape) -> str:
  """How an int8 conv runs on XLA:CPU under mode 'real' or 'auto': 'real' (XLA's int8 conv), 'gemm' (patches +
  one int8 matmul) or 'fake' (a float conv of the quantized values). The one rule for the forward, the input
  gradient and (through `_kernel_grad_by_patches`) the kernel gradient."""
  slow = cpu_slow_reason(cp, lhs_shape, rhs_shape)
  if mode == 'real':
    return 'gemm' if slow and conv_gemm.supported(cp, lhs_shape) else 'real'
  if slow:
    return 'gemm' if gemm_route(cp, lhs_shape, rhs_shape) else 'fake'
  if lhs_shape[cp.dnums.lhs_spec[1]] == 1 and gemm_route(cp, lhs_shape, rhs_shape):
    return 'gemm'
  return 'real'


# ------------------------------------------------------------------------------------------ real execution


def _place(v2, out_ndim: int, dn: ConvDimensionNumbers):
  """(n, f) array -> broadcastable to the conv output (n on its batch dim, f on its feature dim)."""
  ob, of = dn.out_spec[0], dn.out_spec[1]
  shape = [1] * out_ndim
  shape[ob], shape[of] = v2.shape
  return (v2 if ob < of else v2.T).reshape(shape)


def _lhs_to_out(v, cp: ConvParams, n_out_features: int, out_ndim: int):
  """A per-lhs-batch (or scalar) array -> conv output layout. With batch groups, output feature o of group b
  reads lhs batch b * N' + n."""
  v = v.reshape(-1)
  if v.size == 1:
    return v.reshape((1,) * out_ndim)
  bg = cp.batch_group_count
  if bg > 1:
    v2 = jnp.repeat(v.reshape(bg, -1).T, n_out_features // bg, axis=1)
  else:
    v2 = v[:, None]
  return _place(v2, out_ndim, cp.dnums)


def _rhs_to_out(v, cp: ConvParams, out_ndim: int):
  """A per-kernel-output-feature (or scalar) array -> conv output layout."""
  v = v.reshape(-1)
  if v.size == 1:
    return v.reshape((1,) * out_ndim)
  return _place(v[None, :], out_ndim, cp.dnums)


def _row_major(q, perm, expand_at: int | None):
  """Transposes an operand (qvalue, scale, zero point) by perm into a materialised row-major array, with a
  size-1 spatial dim inserted at `expand_at` (1-D convs). Without the layout constraint XLA:CPU folds the
  transpose back into the conv's dim labels and up-casts the s8 conv to s32 (see the module docstring)."""
  fix = lambda a: a if expand_at is None else jnp.expand_dims(a, expand_at)
  v = fix(jnp.transpose(lax.optimization_barrier(q.qvalue), perm))
  v = with_layout_constraint(v, Layout(major_to_minor=tuple(range(v.ndim))))
  zp = None if q.zero_point is None else fix(jnp.transpose(q.zero_point, perm))
  return dataclasses.replace(q, qvalue=v, scale=fix(jnp.transpose(q.scale, perm)), zero_point=zp)


def to_nhwc(lq, rq, cp: ConvParams):
  """Moves a conv with one or two spatial dims into NHWC/HWIO/NHWC (1-D gets a size-1 leading spatial dim),
  the layout of XLA:CPU's native s8 conv. Returns (lq, rq, params, back) with back(out) in cp's output layout."""
  lhs_spec, rhs_spec, out_spec = cp.dnums
  nsp = len(lhs_spec) - 2
  one = nsp == 1
  lq = _row_major(lq, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]), 1 if one else None)
  rq = _row_major(rq, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]), 0 if one else None)
  pad1 = lambda t, v: ((v,) + tuple(t)) if one else tuple(t)
  n = nsp + one
  dn = ConvDimensionNumbers((0, n + 1, *range(1, n + 1)), (n + 1, n, *range(n)), (0, n + 1, *range(1, n + 1)))
  params = ConvParams(pad1(cp.window_strides, 1), pad1(cp.padding, (0, 0)), pad1(cp.lhs_dilation, 1),
                      pad1(cp.rhs_dilation, 1), dn, cp.feature_group_count, cp.batch_group_count)
  out_perm = (out_spec[0], *out_spec[2:], out_spec[1])

  def back(out):
    return jnp.transpose(out[:, 0] if one else out, tuple(np.argsort(out_perm)))
  return lq, rq, params, back


def real_conv(lq, rq, cp: ConvParams, kind: str, nhwc: bool = False, gemm: bool = False) -> jax.Array:
  """Low-precision conv of two quantized operands (`quantizers.QArray`s), rescaled to f32. nhwc=True runs it
  in NHWC/HWIO layout (see `to_nhwc`); gemm=True computes every integer conv as patches + one int8 matmul
  (qjax.ops.conv_gemm), the same integers."""
  if nhwc:
    lq, rq, cp, back = to_nhwc(lq, rq, cp)
    return back(real_conv(lq, rq, cp, kind, gemm=gemm))
  acc_t = jnp.int32 if kind == 'int' else jnp.float32
  conv = (lambda a, b, t: conv_gemm.conv(a, b, cp, t)) if gemm else cp.conv
  if lq.qvalue.dtype != rq.qvalue.dtype:  # e4m3 x e5m2: lax convs take one dtype; bf16 holds both exactly.
    lq, rq = (dataclasses.replace(q, qvalue=q.qvalue.astype(jnp.bfloat16)) for q in (lq, rq))
  acc = conv(lq.qvalue, rq.qvalue, acc_t)
  dn = cp.dnums
  nd = acc.ndim
  n_out_f = rq.qvalue.shape[dn.rhs_spec[0]]
  lout = lambda a: _lhs_to_out(a, cp, n_out_f, nd)
  rout = lambda a: _rhs_to_out(a, cp, nd)
  lz, rz = lq.zero_point, rq.zero_point
  if lz is not None or rz is not None:
    groups = cp.feature_group_count * cp.batch_group_count
    ones_l = jnp.ones(tuple(cp.batch_group_count if d == dn.lhs_spec[0] else n
                            for d, n in enumerate(lq.qvalue.shape)), jnp.int8)
    ones_r = jnp.ones(tuple(groups if d == dn.rhs_spec[0] else n for d, n in enumerate(rq.qvalue.shape)), jnp.int8)
    per_group = lambda a: jnp.repeat(a, n_out_f // groups, axis=dn.out_spec[1])  # group -> its features
    if lz is not None:
      acc = acc - lout(lz) * conv(ones_l, rq.qvalue, jnp.int32)
    if rz is not None:
      acc = acc - per_group(conv(lq.qvalue, ones_r, jnp.int32)) * rout(rz)
    if lz is not None and rz is not None:
      acc = acc + lout(lz) * rout(rz) * per_group(conv(ones_l, ones_r, jnp.int32))
  return acc.astype(jnp.float32) * lout(lq.scale) * rout(rq.scale)


def _want_nhwc(cp: ConvParams, kind: str) -> bool:
  """Whether an int conv should move to NHWC/HWIO: on XLA:CPU, for 1-D and 2-D convs not already there."""
  lhs_spec, rhs_spec, out_spec = cp.dnums
  nsp = len(lhs_spec) - 2
  canonical = (lhs_spec == (0, nsp + 1, *range(1, nsp + 1)) and out_spec == lhs_spec
               and rhs_spec == (nsp + 1, nsp, *range(nsp)))
  return kind == 'int' and nsp in (1, 2) and not (canonical and nsp == 2) and jax.default_backend() == 'cpu'


def qconv(a, b, cp: ConvParams, mcfg: MatmulConfig, *, where: str, a_qparams=None, b_qparams=None, key=None,
          out_dtype=None, fwd_params: ConvParams | None = None, kernel_shape=None):
  """One quantized conv(a, b) under `mcfg`, per_channel resolved along a's batch and b's output-feature dims.

  For the kernel gradient (where='drhs'), `fwd_params` and `kernel_shape` describe the forward conv: when that
  conv runs as patches + int8 matmul, so does its kernel gradient (patches^T . g, qjax.ops.conv_gemm)."""
  out_dtype = out_dtype or jnp.result_type(a.dtype, b.dtype)
  aspec = resolve_conv_spec(mcfg.lhs, a.shape, cp.dnums.lhs_spec[0], f'{where}.lhs')
  bspec = resolve_conv_spec(mcfg.rhs, b.shape, cp.dnums.rhs_spec[0], f'{where}.rhs')
  if aspec is None and bspec is None:
    if fwd_params is not None and float_kernel_grad_by_patches(fwd_params, a.shape, kernel_shape):
      return _float_patch_kernel_grad(a, b, fwd_params, kernel_shape, out_dtype)
    return cp.conv(a, b, jnp.float32).astype(out_dtype)
  ka, kb = (None, None) if key is None else jax.random.split(key)
  mode = choose_mode(mcfg, aspec, bspec, where, cp, a.shape, b.shape)
  if fwd_params is not None and _kernel_grad_by_patches(mcfg, aspec, bspec, fwd_params, a.shape, kernel_shape):
    return _patch_kernel_grad(a, b, aspec, bspec, fwd_params, kernel_shape, a_qparams, b_qparams, ka, kb,
                              out_dtype)
  if fwd_params is not None and mode == 'gemm' and mcfg.mode == 'auto':
    mode = 'fake'  # The kernel-gradient conv's window is the output's size: its patches would be huge.
  if mode == 'fake':
    fq = lambda x, spec, qp, k: x.astype(jnp.float32) if spec is None or qp is not None else (
        quantizers.fake_quant(x.astype(jnp.float32), spec, key=k))
    return cp.conv(fq(a, aspec, a_qparams, ka), fq(b, bspec, b_qparams, kb), jnp.float32).astype(out_dtype)
  lq = quantize_operand(a, aspec, a_qparams, ka)
  rq = quantize_operand(b, bspec, b_qparams, kb)
  kind = native_kind(aspec)
  gemm = mode == 'gemm'
  return real_conv(lq, rq, cp, kind, nhwc=_want_nhwc(cp, kind) and not gemm, gemm=gemm).astype(out_dtype)


def _kernel_grad_by_patches(mcfg: MatmulConfig, aspec, bspec, fwd: ConvParams, lhs_shape, kernel_shape) -> bool:
  """The kernel gradient runs as patches^T . g when the forward conv takes the patches route on this backend
  and both operands are symmetric integers without a zero point in real execution (zero points would need
  in-bounds tap counts per row): not uint8, which real execution shifts into int8 with zero point -128."""
  if native_kind(aspec) != 'int' or native_kind(bspec) != 'int' or jax.default_backend() != 'cpu':
    return False
  if aspec.scheme != 'symmetric' or bspec.scheme != 'symmetric' or not conv_gemm.supported(fwd, lhs_shape):
    return False
  if any(_shifted_to_int8(s) for s in (aspec, bspec)):
    return False
  return mcfg.mode != 'fake' and cpu_int_route(mcfg.mode, fwd, lhs_shape, kernel_shape) == 'gemm'


def _shifted_to_int8(spec: QuantSpec) -> bool:
  """uint8 grids run as int8 with a zero point of -128 (`qjax.ops.dot_general`'s signed container)."""
  fmt = formats.element_format(spec.fmt)
  return isinstance(fmt, formats.IntFormat) and not fmt.signed and fmt.bits == 8


# A float kernel gradient (drhs without quantization: a QAT step's float backward) is, by JAX's transpose rule, a
# conv whose window is the output's size with the batch as its contraction; XLA:CPU runs it slowly where the
# input has many features. The same patches^T . g as the int8 route (qjax.ops.conv_gemm.kernel_grad), in f32, is
# faster there. Time ratios of patches^T . g to XLA's kernel-gradient conv, f32, batch 256, NHWC, SAME, one
# pinned core, process clock, AMD EPYC Zen 3 (AVX2), jax 0.12.0.1, 2026-12-06 (the conv suite's 'f32 kernel
# gradient' references, `python -m experiments.bench --config=configs/bench_conv.py`, docs/benchmarks.md):
#   H, C_in -> C_out, k      patches^T . g / XLA
#   28, 16 -> 16, 3x3        0.17x
#   14, 32 -> 32, 3x3        0.67x
#   28, 1 -> 6, 5x5          1.23x (XLA faster)
#   14, 6 -> 16, 5x5         1.21x (XLA faster)
# Not yet timed on a CPU with AVX-512.
FLOAT_KERNEL_GRAD_MIN_FEATURES = 16


def float_kernel_grad_by_patches(fwd: ConvParams, lhs_shape, kernel_shape) -> bool:
  """Whether the float kernel gradient of the conv fwd runs as f32 patches^T . g: on CPU, where the lowering
  covers the conv, for kernels of fewer than conv_gemm.TWO_STAGE_MIN_TAPS taps and inputs of at least
  FLOAT_KERNEL_GRAD_MIN_FEATURES features (the shapes measured faster above)."""
  if jax.default_backend() != 'cpu' or kernel_shape is None or not conv_gemm.supported(fwd, lhs_shape):
    return False
  rhs_spec = fwd.dnums.rhs_spec
  taps = int(np.prod([kernel_shape[d] for d in rhs_spec[2:]]))
  return 1 < taps < conv_gemm.TWO_STAGE_MIN_TAPS and lhs_shape[fwd.dnums.lhs_spec[1]] >= FLOAT_KERNEL_GRAD_MIN_FEATURES


def _float_patch_kernel_grad(a, g, fwd: ConvParams, kernel_shape, out_dtype):
  """dw = patches(a)^T . g in f32, in the kernel's layout."""
  rhs_spec = fwd.dnums.rhs_spec
  k_sp = tuple(kernel_shape[d] for d in rhs_spec[2:])
  dw = conv_gemm.kernel_grad(a.astype(jnp.float32), g.astype(jnp.float32), fwd, k_sp, acc_t=jnp.float32)
  return jnp.transpose(dw, tuple(np.argsort((*rhs_spec[2:], rhs_spec[1], rhs_spec[0])))).astype(out_dtype)


def _patch_kernel_grad(a, g, aspec, gspec, fwd: ConvParams, kernel_shape, a_qparams, g_qparams, ka, kg, out_dtype):
  """dw = patches(a)^T . g in int8 (a per input feature, g per output feature), rescaled, in the kernel's layout."""
  lq = quantize_operand(a, aspec, a_qparams, ka)
  gq = quantize_operand(g, gspec, g_qparams, kg)
  rhs_spec = fwd.dnums.rhs_spec
  k_sp = tuple(kernel_shape[d] for d in rhs_spec[2:])
  acc = conv_gemm.kernel_grad(lq.qvalue, gq.qvalue, fwd, k_sp)      # (KH, KW, C, O) int32
  dw = acc.astype(jnp.float32) * lq.scale.reshape(-1)[:, None] * gq.scale.reshape(-1)
  return jnp.transpose(dw, tuple(np.argsort((*rhs_spec[2:], rhs_spec[1], rhs_spec[0])))).astype(out_dtype)


# ------------------------------------------------------------------------------------------ the custom VJP


@dataclasses.dataclass(frozen=True)
class _Static:
  params: ConvParams
  config: DotConfig
  out_dtype: object
  direct: tuple[bool, bool] = (False, False)  # as qjax.ops.dot_general's: qparams carrying quantize(x)


def _qconv_forward(lhs_hat, rhs_hat, lqp, rqp, static: _Static):
  with jax.named_scope('fwd'):  # names the conv in HLO metadata (qjax.ops.inspect_matmuls shows it)
    return qconv(lhs_hat, rhs_hat, static.params, static.config.fwd, where='fwd', a_qparams=lqp, b_qparams=rqp,
                 out_dtype=static.out_dtype)


def _qconv_primal(lhs_hat, rhs_hat, lqp, rqp, key, static: _Static):
  return _qconv_forward(lhs_hat, rhs_hat, lqp, rqp, static)


def _qconv_fwd(lhs_hat, rhs_hat, lqp, rqp, key, static: _Static):
  lq, rq = for_training(lqp, rqp, static.direct)
  lres = grid_only(lqp)
  if lq is not None and lq.qvalue is None and _input_grid(lq, static, lhs_hat.shape) is not None:
    # The kernel gradient takes the input on its forward grid: quantize it once for both (as qjax.ops.dot_general
    # does); the backward then holds the int8 input in place of the f32 one.
    cp = static.params
    lq = lres = with_integers(lhs_hat, lqp, resolve_conv_spec(static.config.fwd.lhs, lhs_hat.shape,
                                                             cp.dnums.lhs_spec[0], 'fwd.lhs'))
  return _qconv_forward(lhs_hat, rhs_hat, lq, rq, static), (lhs_hat, rhs_hat, lres, grid_only(rqp), key)


def _input_grid(lqp, static: _Static, lhs_shape):
  """The input's forward grid where the kernel gradient quantizes it alike (ops.dot_general.forward_grid)."""
  cfg, lhs_spec = static.config, static.params.dnums.lhs_spec
  # The kernel-gradient conv (drhs_conv) takes the input with batch and features swapped: its "batch" is C.
  return same_grid(lqp, resolve_conv_spec(cfg.fwd.lhs, lhs_shape, lhs_spec[0], 'fwd.lhs'),
                   resolve_conv_spec(cfg.drhs.lhs, lhs_shape, lhs_spec[1], 'drhs.lhs'), lhs_shape)


def _qconv_bwd(static: _Static, res, g):
  lhs_hat, rhs_hat, lqp, rqp, key = res
  cfg, cp = static.config, static.params
  k1, k2 = (None, None) if key is None else jax.random.split(key)
  if g.size == 0:
    dlhs, drhs = jnp.zeros_like(lhs_hat), jnp.zeros_like(rhs_hat)
  else:
    with jax.named_scope('dlhs'):
      p1, rhs_t, post = dlhs_conv(cp, lhs_hat.shape, rhs_hat, g.shape)
      dlhs = post(qconv(g, rhs_t, p1, cfg.dlhs, where='dlhs', key=k1, out_dtype=lhs_hat.dtype))
    with jax.named_scope('drhs'):
      p2 = drhs_conv(cp, lhs_hat.shape, rhs_hat.shape, g.shape)
      lgrid = _input_grid(lqp, static, lhs_hat.shape)
      drhs = qconv(lhs_hat, g, p2, cfg.drhs, where='drhs', a_qparams=lgrid, key=k2, out_dtype=rhs_hat.dtype,
                   fwd_params=cp, kernel_shape=rhs_hat.shape)
  return dlhs, drhs, zero_cotangent(lqp), zero_cotangent(rqp), None


_qconv = jax.custom_vjp(_qconv_primal, nondiff_argnums=(5,))
_qconv.defvjp(_qconv_fwd, _qconv_bwd)


# ------------------------------------------------------------------------------------------- public op


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, out_sharding=None, *, config: DotConfig,
                         lhs_params=None, rhs_params=None, key: jax.Array | None = None):
  """Quantized `lax.conv_general_dilated`: same arguments plus `config` (see the module docstring).

  Args:
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count, preferred_element_type: as `jax.lax.conv_general_dilated`.
    precision, out_sharding: accepted for signature compatibility (Flax passes them) and ignored.
    config: the DotConfig of the forward conv and the two gradient convs (dlhs: g with the kernel, drhs: the
      input with g). per_channel means per example / per output feature (see the module docstring);
      `small_m` and `drhs_row_major` are matmul options and do not apply.
    lhs_params, rhs_params: quantizer parameters of the forward operands, as for `qjax.ops.dot_general`
      (learned 'scale' / 'offset' / 'alpha', or a static 'scale' and 'zero_point'), shaped like the resolved
      scale: (N, 1, ..) in lhs's layout per example, (.., O, ..) in rhs's layout per output feature.
    key: PRNG key for stochastic rounding (split across operands and the backward).
  Returns:
    conv(lhs, rhs) in `preferred_element_type` (default: the operands' result type), with
    out ~ conv(dequantize(q_lhs), dequantize(q_rhs)).
  """
  del precision, out_sharding
  out_dtype = preferred_element_type or operand_result_type(lhs, rhs)
  cp = conv_params(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count)
  if not check_operands('conv_general_dilated', lhs, rhs, config):
    return cp.conv(lhs, rhs, preferred_element_type)
  _check_specs(config)
  # Validate shapes and groups with lax's own messages before quantizing anything.
  jax.eval_shape(lambda a, b: cp.conv(a, b), jax.ShapeDtypeStruct(lhs.shape, jnp.float32),
                 jax.ShapeDtypeStruct(rhs.shape, jnp.float32))
  lspec = resolve_conv_spec(config.fwd.lhs, lhs.shape, cp.dnums.lhs_spec[0], 'conv_general_dilated fwd.lhs')
  rspec = resolve_conv_spec(config.fwd.rhs, rhs.shape, cp.dnums.rhs_spec[0], 'conv_general_dilated fwd.rhs')
  lhs_hat, rhs_hat, lqp, rqp, cfg, bwd_key = quantize_forward(config, lhs, rhs, lspec, rspec, lhs_params, rhs_params,
                                                              key, 'conv_general_dilated ')
  out = _qconv(lhs_hat, rhs_hat, lqp, rqp, bwd_key, _Static(cp, cfg, jnp.dtype(out_dtype),
                                                            direct_flags(lhs, rhs, lqp, rqp)))
  return out.astype(out_dtype)


def make_conv_general_dilated(config: DotConfig, **kwargs):
  """A function with `lax.conv_general_dilated`'s signature running the quantized op, for Flax's
  `nn.Conv(conv_general_dilated=...)` and `nnx.Conv(conv_general_dilated=...)`. kwargs: lhs_params, rhs_params,
  key."""
  def fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
         feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **unused):
    return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                feature_group_count, batch_group_count, precision, preferred_element_type,
                                config=config, **kwargs)
  return fn
