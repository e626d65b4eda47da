"""Quantized `dot_general`: a drop-in for `jax.lax.dot_general` with separately quantized fwd, dlhs and drhs.

    out = dot_general(lhs, rhs, dimension_numbers, config=DotConfig(...))

How it composes (each piece differentiable in its own right):
  1. each operand goes through `fake_quant` with its fwd spec and estimator (STE, LSQ, PACT, ...), which gives
     the operand's gradient mask and the gradients of learned quantizer parameters;
  2. a `custom_vjp` matmul takes the fake-quantized operands (exactly on their grids) with their scales, runs
     the forward in low precision (int8 x int8 -> int32, rescaled by the outer product of the scales) or as a
     float matmul, and in its backward computes dlhs = g . rhs^T and drhs = lhs^T . g with their own configs.

Real integer execution accumulates in int32 and applies scales after the contraction. Asymmetric operands
run natively through zero-point cross terms:
    sum_k (ql - zl)(qr - zr) = sum ql qr - zl sum_k qr - zr sum_k ql + K zl zr.
Sub-channel (per-group) scales split the contraction dim K into K/g groups, run one int32 dot per group as
a batch dimension, and sum the rescaled groups in f32. Widths below 8 bits live in int8 containers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from qjax import calibration, formats, quantizers
from qjax import granularity as gran
from qjax.ops import cpu
from qjax.ops.config import DotConfig, MatmulConfig
from qjax.spec import QuantSpec

log = logging.getLogger('qjax')
_ROUTED: set = set()

Dims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def canonical_dims(dimension_numbers) -> Dims:
  (lc, rc), (lb, rb) = dimension_numbers
  t = lambda a: tuple(int(i) for i in a)
  return (t(lc), t(rc)), (t(lb), t(rb))


def free_dims(ndim: int, contracting, batch) -> tuple[int, ...]:
  return tuple(d for d in range(ndim) if d not in contracting and d not in batch)


# ---------------------------------------------------------------------------------------- operand specs


def resolve_spec(spec: QuantSpec | None, shape, contracting, batch, where: str) -> QuantSpec | None:
  """Makes an op-relative spec concrete for one operand (see qjax.ops.config): per_channel keeps every
  non-contracted dim, per_group groups along the last contracting dim of the dimension numbers (both operands
  group the same pair). With several contracting dims, as a DenseGeneral over (heads, head_dim) has, each index of
  the others holds its own groups: the groups of `group_size` consecutive elements of the flattened contraction,
  where the grouped dim is the minor one and `group_size` divides it."""
  if spec is None:
    return None
  ndim = len(shape)
  if spec.granularity == 'per_channel':
    axes = tuple(d for d in range(ndim) if d not in contracting)
    spec = spec.replace(axis=axes) if axes else spec.replace(granularity='per_tensor')
  elif spec.granularity == 'per_group':
    if not contracting:
      raise ValueError(f'{where}: granularity="per_group" groups along a contracting dim, but this operand '
                       f'contracts none (shape {tuple(shape)})')
    spec = spec.replace(axis=contracting[-1])
  try:
    gran.scale_shape(tuple(shape), spec)
  except ValueError as e:
    raise ValueError(f'{where}: {e}') from None
  return spec


def native_kind(spec: QuantSpec | None) -> str | None:
  """'int' or 'fp8' when the spec's qvalues can feed a low-precision matmul directly, else None (also for
  methods whose output is off their grid, e.g. LSQ+'s float offset: `Method.native`)."""
  if spec is None or not spec.method.native:
    return None
  fmt = formats.element_format(spec.fmt)
  if isinstance(fmt, formats.IntFormat):
    return 'int'
  if isinstance(fmt, formats.FloatFormat) and fmt.bits == 8:
    return 'fp8'
  return None


def _rows(shape, contracting) -> int:
  return math.prod(n for d, n in enumerate(shape) if d not in contracting)


def choose_mode(mcfg: MatmulConfig, lspec, rspec, lshape, dims: Dims, small_m: int, where: str) -> str:
  """'real' or 'fake' for one matmul, raising when 'real' is asked of formats that cannot run natively."""
  kl, kr = native_kind(lspec), native_kind(rspec)
  native = kl is not None and kl == kr
  if mcfg.mode == 'fake' or lspec is None or rspec is None:
    return 'fake'
  if mcfg.mode == 'real':
    if not native:
      raise ValueError(f'{where}: mode="real" needs both operands in integer (<= 8 bit) or both in fp8 formats; '
                       f'got lhs format={lspec.format!r} ({lspec.estimator}), rhs format={rspec.format!r} '
                       f'({rspec.estimator}); use mode="auto" or "fake"')
    return 'real'
  if not native:
    return 'fake'
  rows = _rows(lshape, dims[0][0])
  if rows <= small_m:
    key = (where, tuple(lshape))
    if key not in _ROUTED:
      _ROUTED.add(key)
      log.info('qjax: %s has %d rows (<= small_m=%d): running it as a float matmul of the quantized values, '
               'faster than int8 on XLA:CPU for matrix-vector shapes; set small_m=0 to force int8', where, rows,
               small_m)
    return 'fake'
  return 'real'


# ------------------------------------------------------------------------------------ operand quantization


# A quantized operand is a `quantizers.QArray` everywhere in the ops: x ~ (qvalue - zero_point) * scale. An
# operand's grid handed from the forward fake quant to the matmul (qparams) is a QArray too: with qvalue None
# (x_hat is re-quantized on it, exactly), or with the qvalue of a pre-quantized (serving) weight.


def _to_signed_container(q: quantizers.QArray, spec: QuantSpec) -> quantizers.QArray:
  """uint grids move into int8 containers: 8-bit ones by a shift of 128 of both qvalue and zero point (then
  the values are an int8 grid: format 'int8')."""
  fmt = formats.element_format(spec.fmt)
  if not isinstance(fmt, formats.IntFormat) or fmt.signed:
    return q
  if fmt.bits < 8:
    return dataclasses.replace(q, qvalue=q.qvalue.astype(jnp.int8))
  zp = jnp.zeros(q.scale.shape, jnp.int32) if q.zero_point is None else q.zero_point
  return quantizers.QArray((q.qvalue.astype(jnp.int32) - 128).astype(jnp.int8), q.scale, zp - 128, 'int8')


def grid_of(scale, zero_point, spec: QuantSpec) -> quantizers.QArray:
  """A grid-only QArray (qvalue None): the scale and integer zero point an operand is quantized with."""
  zp = None if zero_point is None else jnp.round(zero_point).astype(jnp.int32)
  return quantizers.QArray(None, scale, zp, spec.format, spec.codebook)


def quantize_operand(x, spec: QuantSpec, qparams: quantizers.QArray | None = None, key=None) -> quantizers.QArray:
  """Quantizes x for a matmul. With qparams (a QArray) x is already on that grid: a given qvalue (pre-quantized
  weights) is used as is, else x is re-quantized exactly with the given scale and zero point."""
  if qparams is None:  # A group holding a NaN / inf gets scale NaN: its row / column of the product is NaN.
    scale, zp = calibration.calibrate(lax.stop_gradient(x), spec, poison=True)
    scale, zp = lax.optimization_barrier((scale, zp))  # not recomputed per element (see `_fq_operand`)
    qa = quantizers.quantize(x, spec, key=key, scale=scale, zero_point=zp)
  elif qparams.qvalue is not None:
    qa = qparams
  else:
    qa = quantizers.quantize(x, spec.replace(rounding='nearest'), scale=qparams.scale, zero_point=qparams.zero_point)
  return _to_signed_container(qa, spec)


# ------------------------------------------------------------------------------------- real execution


def _to_out(a, ndim, contracting, batch, side: str, n_other_free: int):
  """Moves an operand-shaped array (size 1 on contracting dims) into the dot_general output layout
  (batch..., lhs_free..., rhs_free...), with size-1 dims for the other operand's free dims."""
  free = free_dims(ndim, contracting, batch)
  a = jnp.transpose(a, tuple(batch) + free + tuple(contracting))
  a = a.reshape(a.shape[:len(batch) + len(free)])
  nb = len(batch)
  if side == 'lhs':
    return a.reshape(a.shape + (1,) * n_other_free)
  return a.reshape(a.shape[:nb] + (1,) * n_other_free + a.shape[nb:])


def _group(q: quantizers.QArray, dims_side, g: int):
  """Splits the last contracting dim c into (C/g, g), contracted along g: the group index, and every other
  contracting dim (whose indices hold groups of their own), become batch dims, appended after the batch dims."""
  *others, c = dims_side[0]
  batch = dims_side[1]
  shape = q.qvalue.shape
  new_shape = shape[:c] + (shape[c] // g, g) + shape[c + 1:]
  remap = lambda d: d if d < c else d + 1
  s_groups = q.scale.shape[c]  # C/g (per_group) or 1 (shared along C)
  sshape = q.scale.shape[:c] + (s_groups, 1) + q.scale.shape[c + 1:]
  zp = None if q.zero_point is None else q.zero_point.reshape(sshape)
  newq = dataclasses.replace(q, qvalue=q.qvalue.reshape(new_shape), scale=q.scale.reshape(sshape), zero_point=zp)
  return newq, ((c + 1,), tuple(remap(b) for b in batch) + tuple(remap(d) for d in others) + (c,))


# cuBLAS(Lt) runs int8 GEMMs only when the matrices' leading dims are multiples of 4, and fp8 ones at multiples of
# 16; XLA:GPU otherwise widens the operands or leaves the dot to a slower kernel (qjax.hlo names such a
# fallback). Zero rows and columns change no sum of products, so padding to 16 keeps real execution exact.
GPU_PAD_MULTIPLE = 16


def pad_multiple() -> int:
  """The multiple that low-precision dot dims are zero-padded to on this backend (16 on GPU, 0: no padding)."""
  return GPU_PAD_MULTIPLE if jax.default_backend() == 'gpu' else 0


def min_free(side: str = 'lhs') -> int:
  """The fewest rows of an int8 dot's lhs (side='lhs') or columns of its rhs ('rhs') on this backend: 2 on CPU
  where XLA's fast (YNNPACK) kernel refuses a matrix-vector product and the generic loop it falls back to is
  several times slower than f32; a second, zero row puts it back on the fast kernel (docs/benchmarks.md, decode).
  jaxlib 0.12.1's fast kernel takes a single lhs row (`cpu.one_row_int8_dot_fast`) but still not a single rhs
  column, so there the lhs gets no padding: the padded row cost 6-46% more time than the single one in an ad-hoc
  timing on a Zen 3 (1 x 784..4096 x 10..4096, s8 x s8 -> s32 against the weight stored (N, K), 2026-12-06); in
  the MLP's and LeNet-5's PTQ serving at one row (the e2e suite's programs, in-process A/B) the difference was
  within the noise (0.91-1.02x of the padded program's time). 0 (no padding) on other backends."""
  if jax.default_backend() != 'cpu':
    return 0
  return 0 if side == 'lhs' and cpu.one_row_int8_dot_fast() else 2


# Few rows against a 2-D int8 weight stored with its contracting dim minor (a served weight stored transposed,
# qjax.flax.serving, or an (out, in) kernel used as kernel.T): XLA:CPU's int8 GEMM is fastest with the weight as
# the lhs, (N, K) . (M, K)^T -> (N, M), then the small result transposed. Time ratios to the f32 product of the
# same shape with one activation row quantized per call, one pinned core, process clock, Intel Xeon with AVX-512
# VNNI + AMX, jax 0.12.0.1, 2026-12-05 (`python -m experiments.bench --config=configs/bench_qmatmul.py
# "--config.squares=()" "--config.mlp_shapes=()" "--config.small_m=(1,2,8)"`, docs/benchmarks.md):
#   M x K x N            w (K, N) row-major, x . w     w stored (N, K), w . x^T
#   1 x 4096 x 4096      0.74x (one row padded to two)  0.24x
#   2 x 4096 x 4096      0.65x                          0.21x
#   8 x 4096 x 4096      0.31x                          0.11x
# Past SWAP_MAX_ROWS the stored weight is the GEMM's rhs, x . w^T (the MLP's serving forward at batch 256 and
# 1024 then runs at 0.17x / 0.18x of float, as it did with row-major weights: 0.15x / 0.17x).
SWAP_MAX_ROWS = 64
# On a CPU without int8 dot-product instructions (AVX2 alone: qjax.ops.cpu) the fewest rows go the other way
# round, x . w^T over the weight as stored. Time ratios of x (M, K) . w^T to w (N, K) . x^T, s8 x s8 -> s32 (one
# row padded to two), one pinned core, process clock, AMD EPYC Zen 3 (AVX2), jax 0.12.0.1, 2026-12-06 (the
# qmatmul suite's references 'int8 dot, stored (N, K): ...', `python -m experiments.bench
# --config=configs/bench_qmatmul.py "--config.squares=()" "--config.small_m=(1,2,4,8)" "--config.mlp_shapes=
# ('1x784x2048',...)"`, docs/benchmarks.md):
#   K x N          M = 1     2       4       8
#   784 x 2048     0.51x     0.50x   0.67x   1.09x
#   2048 x 2048    0.55x     0.52x   0.85x   1.12x
#   4096 x 4096    0.85x     0.76x   0.94x   1.29x
# With VNNI the weight as the lhs won from one row on (the Xeon table above); x . w^T was not timed there at few
# rows, so the rule applies without VNNI only.
FEW_ROWS_WITHOUT_VNNI = 4


def weight_as_lhs(m: int) -> bool:
  """Whether m rows against a 2-D int8 weight stored (N, K) and contracted along K run as w . x^T, the weight as
  the GEMM's lhs (else as x . w^T): up to SWAP_MAX_ROWS rows, but for the first FEW_ROWS_WITHOUT_VNNI rows on a
  CPU without int8 dot-product instructions."""
  if m > SWAP_MAX_ROWS:
    return False
  return not (m <= FEW_ROWS_WITHOUT_VNNI and cpu.int8_dot_product() is False)


def _minor_contracted(a, b, dims: Dims, rhs_minor: int | None) -> bool:
  """Whether b is a 2-D integer weight contracted along its minor dim in memory (rhs_minor, default the last) by
  a (..., K) contracted along its last dim, on CPU: the case `_weight_lhs_dot` handles."""
  (lc, rc), (lb, rb) = dims
  if jax.default_backend() != 'cpu' or lb or rb or b.ndim != 2 or len(rc) != 1 or lc != (a.ndim - 1,):
    return False
  if not (jnp.issubdtype(a.dtype, jnp.integer) and jnp.issubdtype(b.dtype, jnp.integer)):
    return False
  return rc[0] == (1 if rhs_minor is None else rhs_minor)


def _weight_lhs_dot(a, b, rc: int, acc_t, min_rows: int, min_cols: int) -> jax.Array:
  """a (..., K) . b (K at dim rc of 2-D b, b's minor dim in memory) with b as stored, (N, K): as (b' . a2^T)^T,
  the weight as the GEMM's lhs, where `weight_as_lhs` says so (few rows), else as a2 . b'^T. Written out
  rather than left to XLA, whose transpose folding on a transposed view gives a dot XLA:CPU up-casts to s32."""
  bt = jnp.transpose(b) if rc == 0 else b                        # (N, K); cancels a stored transpose
  a2 = a.reshape(-1, a.shape[-1])                                # (M, K)
  m = a2.shape[0]
  nt = (((1,), (1,)), ((), ()))
  least = min_cols if weight_as_lhs(m) else min_rows            # a2 is the rhs of w . x^T, the lhs of x . w^T
  if m < least:
    a2 = lax.pad(a2, jnp.zeros((), a2.dtype), [(0, least - m, 0), (0, 0, 0)])
  if not weight_as_lhs(m):
    out = lax.dot_general(a2, bt, nt, preferred_element_type=acc_t)[:m]   # (M, N)
    return out.reshape(*a.shape[:-1], bt.shape[0])
  out = lax.dot_general(bt, a2, nt, preferred_element_type=acc_t)    # (N, M)
  # The barrier keeps XLA from folding the transpose back into the dot (which restores the slower form).
  out = lax.optimization_barrier(out)[:, :m]
  return jnp.transpose(out).reshape(*a.shape[:-1], bt.shape[0])


def low_precision_dot(a, b, dims: Dims, acc_t, multiple: int | None = None, precision=None,
                      min_rows: int | None = None, rhs_minor: int | None = None) -> jax.Array:
  """lax.dot_general(a, b, dims) of int8 / fp8 operands accumulating in acc_t. With multiple > 0 (default: 16
  on GPU, see pad_multiple) every contracting dim and the minor-most free dim of each operand are zero-padded
  to that multiple; a single row of a (column of b) is zero-padded to min_rows rows when min_rows > 1 (default:
  `min_free` of its side, 2 on CPU but for a's row with jaxlib 0.12.1). The result is sliced back: the same
  values, on the library kernel. `precision` goes to lax.dot_general (for fp8 on GPU it selects the
  accumulation, see FP8_PRECISION).
  `rhs_minor` is b's minor-most dim in memory when b is a transposed view (QArray.minor_dim); a 2-D integer b
  contracted along it is multiplied as stored, few rows with b as the GEMM's lhs (`_weight_lhs_dot`)."""
  multiple = pad_multiple() if multiple is None else multiple
  min_cols = min_free('rhs') if min_rows is None else min_rows
  min_rows = min_free() if min_rows is None else min_rows
  (lc, rc), (lb, rb) = dims
  if not multiple and _minor_contracted(a, b, dims, rhs_minor):
    rows = math.prod(a.shape[:-1])
    if rows <= SWAP_MAX_ROWS or rc[0] != b.ndim - 1:
      return _weight_lhs_dot(a, b, rc[0], acc_t, min_rows, min_cols)
  lf, rf = free_dims(a.ndim, lc, lb), free_dims(b.ndim, rc, rb)
  pad_a, pad_b = [0] * a.ndim, [0] * b.ndim
  if multiple:
    for cl, cr in zip(lc, rc, strict=True):
      pad_a[cl] = pad_b[cr] = -a.shape[cl] % multiple
    if lf:
      pad_a[lf[-1]] = -a.shape[lf[-1]] % multiple
    if rf:
      pad_b[rf[-1]] = -b.shape[rf[-1]] % multiple
  if jnp.issubdtype(a.dtype, jnp.integer):
    for x, free, pad, least in ((a, lf, pad_a, min_rows), (b, rf, pad_b, min_cols)):
      if least > 1 and free and math.prod(x.shape[d] for d in free) == 1:
        pad[free[-1]] = least - 1
  if any(pad_a) or any(pad_b):
    zero = lambda x: jnp.zeros((), x.dtype)
    a = lax.pad(a, zero(a), [(0, p, 0) for p in pad_a])
    b = lax.pad(b, zero(b), [(0, p, 0) for p in pad_b])
    out = lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc_t)
    limit = list(out.shape)
    nb = len(lb)
    if lf:
      limit[nb + len(lf) - 1] -= pad_a[lf[-1]]
    if rf:
      limit[-1] -= pad_b[rf[-1]]
    return lax.slice(out, (0,) * out.ndim, tuple(limit))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc_t)


# fp8 accumulation per matmul, as Transformer Engine, torchao's float8 training and XLA's own FP8 recipe choose it:
# XLA:GPU runs an fp8 dot of DEFAULT precision with cuBLASLt's fast accumulation (Hopper's fp8 tensor cores then
# keep about 14 bits of each product and promote to f32 rarely: faster, less exact), and one of HIGHEST precision
# with periodic promotion to f32. The forward takes the fast mode; the gradient matmuls, whose sums over the
# batch cancel more, the exact one. Other backends ignore it. Measured on an H200 with jax 0.11.2 (tests/gpu,
# 2026-12-04): DEFAULT and HIGHEST gave the same error, 3.5e-5 of the sum of |products| at K=512, so that XLA
# version does not act on the distinction.
FP8_PRECISION = {'fwd': lax.Precision.DEFAULT, 'dlhs': lax.Precision.HIGHEST, 'drhs': lax.Precision.HIGHEST}


def real_dot(lq: quantizers.QArray, rq: quantizers.QArray, dims: Dims, kind: str, group: int = 0,
             precision=None) -> jax.Array:
  """Low-precision dot_general of two quantized operands, rescaled to f32 in the output layout."""
  (lc, rc), (lb, rb) = dims
  n_groups = len(lc) if group else 0  # batch dims the grouping appends, summed out after the rescale
  if group:
    lq, (lc, lb) = _group(lq, (lc, lb), group)
    rq, (rc, rb) = _group(rq, (rc, rb), group)
    dims = ((lc, rc), (lb, rb))
  acc_t = jnp.int32 if kind == 'int' else jnp.float32
  acc = low_precision_dot(lq.qvalue, rq.qvalue, dims, acc_t, precision=precision, rhs_minor=rq.minor_dim)
  ln, rn = lq.qvalue.ndim, rq.qvalue.ndim
  nlf, nrf = len(free_dims(ln, lc, lb)), len(free_dims(rn, rc, rb))
  lout = lambda a: _to_out(a, ln, lc, lb, 'lhs', nrf)
  rout = lambda a: _to_out(a, rn, rc, rb, 'rhs', nlf)
  if lq.zero_point is not None or rq.zero_point is not None:
    # Zero-point cross terms, all in int32 (exact).
    if lq.zero_point is not None:
      rsum = jnp.sum(rq.qvalue.astype(jnp.int32), axis=rc, keepdims=True)
      acc = acc - lout(lq.zero_point) * rout(rsum)
    if rq.zero_point is not None:
      lsum = jnp.sum(lq.qvalue.astype(jnp.int32), axis=lc, keepdims=True)
      acc = acc - lout(lsum) * rout(rq.zero_point)
    if lq.zero_point is not None and rq.zero_point is not None:
      k = math.prod(lq.qvalue.shape[d] for d in lc)
      acc = acc + k * lout(lq.zero_point) * rout(rq.zero_point)
  out = acc.astype(jnp.float32) * lout(lq.scale) * rout(rq.scale)
  if group:  # The group dims were appended after the original batch dims.
    out = jnp.sum(out, axis=tuple(range(len(lb) - n_groups, len(lb))))
  return out


def _group_size(lspec: QuantSpec, rspec: QuantSpec, where: str) -> int:
  gl = lspec.group_size if lspec.granularity == 'per_group' else 0
  gr = rspec.group_size if rspec.granularity == 'per_group' else 0
  if gl and gr and gl != gr:
    raise ValueError(f'{where}: lhs group_size={gl} and rhs group_size={gr} differ; real execution needs equal '
                     'groups (or one operand per-channel)')
  return gl or gr


def _row_major_transpose(q: quantizers.QArray, perm) -> quantizers.QArray:
  """Transposes an operand into a materialised row-major array. XLA:CPU otherwise folds the transpose into
  the dot as a column-major operand, which it up-casts to int32 off the fast kernel (see docs/benchmarks.md)."""
  v = lax.optimization_barrier(q.qvalue)  # Keep the quantization out of the transpose kernel.
  v = with_layout_constraint(jnp.transpose(v, perm), Layout(major_to_minor=tuple(range(v.ndim))))
  zp = None if q.zero_point is None else jnp.transpose(q.zero_point, perm)
  return dataclasses.replace(q, qvalue=v, scale=jnp.transpose(q.scale, perm), zero_point=zp)


# A float matmul of few rows (a matrix-vector product: small-M routing, fake mode) against a large 2-D rhs runs
# blockwise over the contraction: each block of rhs rows is made float (sliced, or dequantized from int8 for a
# pre-quantized weight) in cache and multiplied at once. Dequantizing a whole int8 weight first writes (and
# page-faults) a fresh f32 copy 4x its size, several times the cost of the product itself (docs/benchmarks.md).
# Every float matmul of these shapes takes this path, so a served (pre-quantized) and a QAT (fake-quantized)
# forward multiply the same block values in the same order: their outputs stay bitwise equal.
_BLOCK_MAX_ROWS = 32            # lhs rows (non-contracted size) up to which the blocked product is used
_BLOCK_MIN_ELEMENTS = 1 << 20   # rhs elements (K * N) from which it pays (a 4 MiB f32 rhs)
_BLOCK_ELEMENTS = 1 << 20       # target rhs elements per block (kb * N)


def _float_block_rows(lshape, rshape, dims: Dims) -> int:
  """Rows kb of rhs per block for a blocked float matmul of lhs (..., K) . rhs (K, N), or 0 (a plain dot)."""
  (lc, rc), (lb, rb) = dims
  if lb or rb or len(rshape) != 2 or rc != (0,) or lc != (len(lshape) - 1,):
    return 0
  k, n = rshape
  if _rows(lshape, lc) > _BLOCK_MAX_ROWS or k * n < _BLOCK_MIN_ELEMENTS:
    return 0
  kb = 1 << max(0, min(max(1, _BLOCK_ELEMENTS // n), k // 2).bit_length() - 1)  # a power of two, 2+ blocks
  while kb >= 16 and k % kb:
    kb //= 2
  return kb if 16 <= kb < k else 0


def _prequantized(qparams: quantizers.QArray | None, spec: QuantSpec) -> quantizers.QArray | None:
  """The QArray of a pre-quantized operand (qparams carry its qvalue: a served weight, or `_fq_operand`'s
  quantize(x) in a forward without differentiation, whose dequantized values are x_hat's) whose scale (and zero
  point) is constant along the contraction dim 0 (per channel or per tensor), else None."""
  if qparams is None or qparams.qvalue is None:
    return None
  if qparams.scale.shape[0] != 1 or (qparams.zero_point is not None and qparams.zero_point.shape[0] != 1):
    return None
  if qparams.minor_dim is not None:  # stored transposed: blocks of its rows would be strided copies
    return None
  return qparams


def _blocked_float_dot(a, b, kb: int):
  """f32 a (..., K) . b (K, N) as a sum over blocks of kb rows of b; b is an f32 array or a QArray (dequantized
  block by block, to the same values as `quantizers.dequantize`)."""
  k = a.shape[-1]
  n = b.shape[1]
  lead = a.shape[:-1]
  a2 = a.reshape(-1, k)
  ab = jnp.transpose(a2.reshape(a2.shape[0], k // kb, kb), (1, 0, 2))  # (K/kb, rows, kb)
  if isinstance(b, quantizers.QArray):
    blocks = (b.qvalue.reshape(k // kb, kb, n), b.scale, b.zero_point)
    make = lambda blk: quantizers.dequantize(quantizers.QArray(blk[0], blk[1], blk[2], b.format, b.codebook))
    xs = (ab, blocks[0])

    def body(acc, x):
      return acc + lax.dot(x[0], make((x[1], blocks[1], blocks[2])), preferred_element_type=jnp.float32), None
  else:
    xs = (ab, b.reshape(k // kb, kb, n))

    def body(acc, x):
      return acc + lax.dot(x[0], x[1], preferred_element_type=jnp.float32), None
  acc, _ = lax.scan(body, jnp.zeros((a2.shape[0], n), jnp.float32), xs)
  return acc.reshape(lead + (n,))


def matmul(a, b, dims: Dims, mcfg: MatmulConfig, *, where: str, small_m: int = 0, a_qparams=None,
           b_qparams=None, key=None, out_dtype=None, row_major_lhs: bool = False, float_dtype=jnp.float32,
           precision=None):
  """One quantized matmul dot_general(a, b, dims) under `mcfg`; returns out_dtype (default a's dtype).

  A matmul left in float (both specs None) runs in `float_dtype`: the op's own compute dtype, so that the float
  backward of a bfloat16 model runs in bfloat16 as the unquantized model's does (accumulating in f32). The float
  and fake-quant matmuls take the caller's `precision` (what lax.dot_general's precision selects on GPU / TPU:
  TF32 or bf16 passes for f32 operands); low-precision ones choose their own."""
  out_dtype = out_dtype or jnp.result_type(a.dtype, b.dtype)
  if a.ndim == 0 or b.ndim == 0:
    # A scalar operand: the cotangent of a full contraction (an einsum 'i,i->' or 'ij,ji->'), whose gradient
    # matmuls are outer products with it. Quantizers take rank >= 1, so both operands get a trailing size-1 dim
    # to contract: the product is the same, and a scalar's one scale is its per-tensor scale.
    a, b, a_qparams, b_qparams = a[..., None], b[..., None], _trailing_one(a_qparams), _trailing_one(b_qparams)
    (lc, rc), batch = dims
    dims = ((lc + (a.ndim - 1,), rc + (b.ndim - 1,)), batch)
  (lc, rc), (lb, rb) = dims
  lspec = resolve_spec(mcfg.lhs, a.shape, lc, lb, f'{where}.lhs')
  rspec = resolve_spec(mcfg.rhs, b.shape, rc, rb, f'{where}.rhs')
  if lspec is None and rspec is None:
    return lax.dot_general(a.astype(float_dtype), b.astype(float_dtype), dims, precision=precision,
                           preferred_element_type=jnp.float32).astype(out_dtype)
  ka, kb = (None, None) if key is None else jax.random.split(key)
  mode = choose_mode(mcfg, lspec, rspec, a.shape, dims, small_m, where)
  if mode == 'fake':
    fq = lambda x, spec, qp, k: x.astype(jnp.float32) if spec is None else (
        quantizers.fake_quant(x.astype(jnp.float32), spec, key=k) if qp is None else x.astype(jnp.float32))
    ah = fq(a, lspec, a_qparams, ka)
    block = _float_block_rows(a.shape, b.shape, dims)
    if block:
      src = _prequantized(b_qparams, rspec) if rspec is not None else None
      if src is None:
        src = fq(b, rspec, b_qparams, kb)
      return _blocked_float_dot(ah, src, block).astype(out_dtype)
    bh = fq(b, rspec, b_qparams, kb)
    return lax.dot_general(ah, bh, dims, precision=precision, preferred_element_type=jnp.float32).astype(out_dtype)
  group = _group_size(lspec, rspec, where)
  lq = quantize_operand(a, lspec, a_qparams, ka)
  rq = quantize_operand(b, rspec, b_qparams, kb)
  if row_major_lhs and not group:
    # lhs^T . g: put lhs's contracting dims last, so the dot contracts lhs on its minor dim.
    free = free_dims(a.ndim, lc, lb)
    perm = tuple(lb) + tuple(sorted(free)) + tuple(lc)
    lq = _row_major_transpose(lq, perm)
    pos = {d: i for i, d in enumerate(perm)}
    dims = ((tuple(pos[d] for d in lc), rc), (tuple(range(len(lb))), rb))
  kind = native_kind(lspec)
  precision = FP8_PRECISION.get(where) if kind == 'fp8' else None
  return real_dot(lq, rq, dims, kind, group, precision).astype(out_dtype)


def _trailing_one(q: quantizers.QArray | None) -> quantizers.QArray | None:
  """A grid or quantized operand for the operand with a trailing size-1 dim (`matmul`'s scalar case): its
  qvalue and its keepdims-shaped scale and zero point gain the same dim."""
  if q is None:
    return None
  one = lambda v: None if v is None else jnp.asarray(v)[..., None]
  return dataclasses.replace(q, qvalue=one(q.qvalue), scale=one(q.scale), zero_point=one(q.zero_point))


# ----------------------------------------------------------------------------------- backward dimensions


def dlhs_dims(dims: Dims, lhs_ndim: int, rhs_ndim: int):
  """dimension numbers of g . rhs^T, and the permutation taking its result to lhs's layout."""
  (lc, rc), (lb, rb) = dims
  nb = len(lb)
  lf, rf = free_dims(lhs_ndim, lc, lb), free_dims(rhs_ndim, rc, rb)
  g_rf = tuple(range(nb + len(lf), nb + len(lf) + len(rf)))
  d = ((g_rf, rf), (tuple(range(nb)), rb))
  # Result: (batch, lf..., rc sorted...). lc[i] pairs with rc[i].
  rc_sorted = sorted(rc)
  src = {}
  for i, b in enumerate(lb):
    src[b] = i
  for j, f in enumerate(lf):
    src[f] = nb + j
  for c_l, c_r in zip(lc, rc, strict=True):
    src[c_l] = nb + len(lf) + rc_sorted.index(c_r)
  return d, tuple(src[i] for i in range(lhs_ndim))


def drhs_dims(dims: Dims, lhs_ndim: int, rhs_ndim: int):
  """dimension numbers of lhs^T . g (lhs first), and the permutation taking its result to rhs's layout."""
  (lc, rc), (lb, rb) = dims
  nb = len(lb)
  lf, rf = free_dims(lhs_ndim, lc, lb), free_dims(rhs_ndim, rc, rb)
  g_lf = tuple(range(nb, nb + len(lf)))
  d = ((lf, g_lf), (lb, tuple(range(nb))))
  # Result: (batch, lc sorted..., rf...).
  lc_sorted = sorted(lc)
  src = {}
  for i, b in enumerate(rb):
    src[b] = i
  for c_l, c_r in zip(lc, rc, strict=True):
    src[c_r] = nb + lc_sorted.index(c_l)
  for j, f in enumerate(rf):
    src[f] = nb + len(lc) + j
  return d, tuple(src[i] for i in range(rhs_ndim))


# ---------------------------------------------------------------------------------------- the custom VJP


@dataclasses.dataclass(frozen=True)
class _Static:
  dims: Dims
  config: DotConfig
  out_dtype: object
  float_dtype: object = jnp.float32  # dtype of matmuls left in float (the operands' own: bf16 models stay bf16)
  direct: tuple[bool, bool] = (False, False)  # (lhs, rhs) qparams carry quantize(x) (`_fq_operand`), not a QArray's
  precision: object = None  # the caller's lax precision, for the matmuls that run in float (fake or unquantized)


def _qdot_forward(lhs_hat, rhs_hat, lqp, rqp, static: _Static):
  cfg = static.config
  with jax.named_scope('fwd'):  # names the matmul in HLO metadata (qjax.ops.inspect_matmuls shows it)
    return matmul(lhs_hat, rhs_hat, static.dims, cfg.fwd, where='fwd', small_m=cfg.small_m, a_qparams=lqp,
                  b_qparams=rqp, out_dtype=static.out_dtype, float_dtype=static.float_dtype,
                  precision=static.precision)


def _qdot_primal(lhs_hat, rhs_hat, lqp, rqp, key, static: _Static):
  return _qdot_forward(lhs_hat, rhs_hat, lqp, rqp, static)


def _qdot_fwd(lhs_hat, rhs_hat, lqp, rqp, key, static: _Static):
  (lq, lres), (rq, rres) = _shared_integers(lhs_hat, rhs_hat, lqp, rqp, static)
  return _qdot_forward(lhs_hat, rhs_hat, lq, rq, static), (lhs_hat, rhs_hat, lres, rres, key)


def _shared_integers(lhs_hat, rhs_hat, lqp, rqp, static: _Static):
  """((lq, residual), (rq, residual)): a forward operand that a backward matmul takes on its forward grid gets
  x_hat's integers (`with_integers`: the direct qvalues where `_fq_operand` took them, else x_hat requantized)
  for both; the backward's residual is then that QArray, else the grid alone (`grid_only`: a pre-quantized
  operand's integers stay with the caller, as before)."""
  cfg, dims = static.config, static.dims
  (lc, rc), (lb, rb) = dims
  d1, _ = dlhs_dims(dims, lhs_hat.ndim, rhs_hat.ndim)
  d2, _ = drhs_dims(dims, lhs_hat.ndim, rhs_hat.ndim)
  lq, rq = for_training(lqp, rqp, static.direct)
  out = []
  for x, q, qp, fwd, bwd, sides, bwd_sides, side, where in (
      (lhs_hat, lq, lqp, cfg.fwd.lhs, cfg.drhs.lhs, (lc, lb), (d2[0][0], d2[1][0]), 'lhs', 'drhs.lhs'),
      (rhs_hat, rq, rqp, cfg.fwd.rhs, cfg.dlhs.rhs, (rc, rb), (d1[0][1], d1[1][1]), 'rhs', 'dlhs.rhs')):
    if q is not None and q.qvalue is None and forward_grid(q, fwd, bwd, x.shape, sides, bwd_sides,
                                                         where) is not None:
      q = with_integers(x, qp, resolve_spec(fwd, x.shape, *sides, f'fwd.{side}'))
      out.append((q, q))
    else:
      out.append((q, grid_only(q)))
  return tuple(out)


def with_integers(x_hat, q: quantizers.QArray, spec: QuantSpec) -> quantizers.QArray:
  """The grid q with x_hat's integers on it, for the forward's real matmul and a backward one to share.

  Where a backward matmul quantizes x_hat on its forward grid (`forward_grid`), both would requantize x_hat
  (x_hat / scale, exact); XLA:CPU does not always merge the two passes (its dot canonicalisation reshapes one
  of them: the char-LM's activations). Quantized once here, the forward and the backward multiply the same
  int8 array, and the backward holds it in place of the f32 x_hat (dead under jit; an eager `jax.vjp` keeps
  both). The e2e suite's char-LM int8 training step, one pinned core of a Zen 4 without page faults: 119-120 ms
  -> 111-113 ms, 0.68-0.70x -> 0.63-0.65x of float (docs/benchmarks.md, 2026-12-07).

  Where q already carries the integers taken straight from x (`_fq_operand`'s direct qvalues: nearest rounding
  on an integer grid) they are x_hat's own, and the pass takes them as they are: requantizing x_hat made XLA fuse
  fake_quant's rounding into the same pass and round every element twice, and nothing else reads x_hat then. The
  char-LM's step: 103-105 ms -> 98-99 ms in three in-process A/Bs, its 17 forward quantizing passes 10.4 ms
  -> 4.6 ms in a thunk profile (docs/benchmarks.md, 2026-12-07 evening). The barrier materialises the integers:
  else XLA fuses the quantization into each transposing reader again (the attention's q and k are read in two
  layouts).
  """
  if q.qvalue is None:
    q = quantizers.quantize(x_hat, spec.replace(rounding='nearest'), scale=q.scale, zero_point=q.zero_point)
  return dataclasses.replace(q, qvalue=lax.optimization_barrier(q.qvalue))


def for_training(lqp, rqp, direct: tuple[bool, bool]):
  """The forward's grids under differentiation: without the qvalues `_fq_operand` took straight from x. Where the
  backward keeps x_hat (a float backward, or one on another grid), x_hat is materialised for it anyway, and
  requantizing x_hat is cheaper than a second read of x, whose producers XLA fuses into every reader (the e2e
  suite's MLP int8 training step: 0.57x of float this way, 0.69x with the direct qvalues in training;
  docs/benchmarks.md, 2026-12-05 evening). Where a backward matmul shares the forward's grid, the backward holds
  the integers instead and the direct qvalues serve both (`with_integers`). Without differentiation (serving,
  evaluation) x_hat is dead code and the direct qvalues are the cheaper route."""
  return tuple(grid_only(q) if d else q for q, d in zip((lqp, rqp), direct, strict=True))


def direct_flags(lhs, rhs, lqp, rqp) -> tuple[bool, bool]:
  """Which operands' qparams carry a qvalue computed from a float operand (not a pre-quantized QArray)."""
  return tuple(q is not None and q.qvalue is not None and not isinstance(x, quantizers.QArray)
               for x, q in ((lhs, lqp), (rhs, rqp)))


def grid_only(q: quantizers.QArray | None) -> quantizers.QArray | None:
  """q without its qvalue: what the backward keeps of a forward operand's grid (it needs only the scale's shape for
  a zero cotangent), so that training does not hold an int8 copy of every activation until the backward. Where
  a backward matmul takes the operand on its forward grid, it keeps the integers instead, in place of the f32
  x_hat (`with_integers`)."""
  return None if q is None else dataclasses.replace(q, qvalue=None)


def forward_grid(qp: quantizers.QArray | None, fwd_spec: QuantSpec | None, bwd_spec: QuantSpec | None, shape,
                 fwd_sides, bwd_sides, where: str) -> quantizers.QArray | None:
  """The forward operand's grid `qp` where a backward matmul quantizes the same x_hat under the same spec (the
  estimator aside, which does not change the grid) with a scale of the same shape, else None. `*_sides` are the
  operand's (contracting, batch) dims in each matmul; `where` names the backward operand ('drhs.lhs') in errors.

  x_hat lies on that grid exactly, so its integers are x_hat / scale: the backward needs no calibration pass over
  x_hat (a per-tensor activation's absmax in every drhs of int8 training), and it multiplies exactly the x_hat the
  forward did. Recalibrating would give the same grid only where the forward's scale was x_hat's own absmax; a
  static, percentile, delayed or learned scale gave a second grid and a second rounding."""
  if qp is None or fwd_spec is None or bwd_spec is None:
    return None
  side = where.split('.')[-1]
  return same_grid(qp, resolve_spec(fwd_spec, shape, *fwd_sides, f'fwd.{side}'),
                   resolve_spec(bwd_spec, shape, *bwd_sides, where), shape)


def same_grid(qp: quantizers.QArray | None, fwd: QuantSpec | None, bwd: QuantSpec | None, shape):
  """`qp` where the resolved forward and backward specs of an operand of `shape` name the same grid, else None
  (`forward_grid`; the conv's backward resolves its specs its own way)."""
  if qp is None or fwd is None or bwd is None:
    return None
  same = fwd.replace(estimator=QuantSpec.estimator) == bwd.replace(estimator=QuantSpec.estimator)
  return qp if same and tuple(qp.scale.shape) == gran.scale_shape(tuple(shape), bwd) else None


def _qdot_bwd(static: _Static, res, g):
  lhs_hat, rhs_hat, lqp, rqp, key = res
  cfg, dims = static.config, static.dims
  (lc, rc), (lb, rb) = dims
  k1, k2 = (None, None) if key is None else jax.random.split(key)
  d1, perm1 = dlhs_dims(dims, lhs_hat.ndim, rhs_hat.ndim)
  with jax.named_scope('dlhs'):
    rgrid = forward_grid(rqp, cfg.fwd.rhs, cfg.dlhs.rhs, rhs_hat.shape, (rc, rb), (d1[0][1], d1[1][1]), 'dlhs.rhs')
    dlhs = matmul(g, rhs_hat, d1, cfg.dlhs, where='dlhs', small_m=cfg.small_m, key=k1, out_dtype=lhs_hat.dtype,
                  b_qparams=rgrid, float_dtype=static.float_dtype, precision=static.precision)
  d2, perm2 = drhs_dims(dims, lhs_hat.ndim, rhs_hat.ndim)
  with jax.named_scope('drhs'):
    lgrid = forward_grid(lqp, cfg.fwd.lhs, cfg.drhs.lhs, lhs_hat.shape, (lc, lb), (d2[0][0], d2[1][0]), 'drhs.lhs')
    drhs = matmul(lhs_hat, g, d2, cfg.drhs, where='drhs', small_m=cfg.small_m, key=k2, out_dtype=rhs_hat.dtype,
                  a_qparams=lgrid, row_major_lhs=cfg.drhs_row_major, float_dtype=static.float_dtype,
                  precision=static.precision)
  return jnp.transpose(dlhs, perm1), jnp.transpose(drhs, perm2), zero_cotangent(lqp), zero_cotangent(rqp), None


def zero_cotangent(q: quantizers.QArray | None):
  """The (zero) cotangent of a grid / pre-quantized operand: zeros for its float scale, None for integers and for
  a qvalue the residuals dropped (`grid_only`)."""
  if q is None:
    return None
  zero = lambda a: None if a is None or not jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros_like(a)
  return dataclasses.replace(q, qvalue=zero(q.qvalue), scale=zero(q.scale), zero_point=zero(q.zero_point))


_qdot = jax.custom_vjp(_qdot_primal, nondiff_argnums=(5,))
_qdot.defvjp(_qdot_fwd, _qdot_bwd)


# ------------------------------------------------------------------------------------------ public op


def check_operands(op: str, lhs, rhs, config: DotConfig) -> bool:
  """Shared by dot_general and conv: the operands are float (or QArrays); False when the config quantizes nothing
  (the op then runs as lax's), where a QArray operand is an error."""
  for name, x in (('lhs', lhs), ('rhs', rhs)):
    if not isinstance(x, quantizers.QArray) and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{op} {name}: quantized ops take float operands, got dtype {x.dtype}')
  if config.fwd.quantized or config.dlhs.quantized or config.drhs.quantized:
    return True
  if isinstance(lhs, quantizers.QArray) or isinstance(rhs, quantizers.QArray):
    raise ValueError(f'{op}: a pre-quantized (QArray) operand needs a config whose fwd spec names its format')
  return False


def quantize_forward(config: DotConfig, lhs, rhs, lspec, rspec, lhs_params, rhs_params, key, where: str = ''):
  """Shared by dot_general and conv: fake-quantizes both forward operands (`_fq_operand`) and chooses the forward's
  mode: an operand whose method is not native (off an integer grid, e.g. LSQ+) is already fake-quantized, so the
  forward takes it as a float and runs in 'fake' mode ('real' is then an error). `where` prefixes messages.

  Returns (lhs_hat, rhs_hat, lhs qparams, rhs qparams, the config with the resolved forward, the backward's key).
  """
  keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
  lhs_hat, lqp = _fq_operand(lhs, lspec, lhs_params, keys[0], f'{where}fwd.lhs')
  rhs_hat, rqp = _fq_operand(rhs, rspec, rhs_params, keys[1], f'{where}fwd.rhs')
  fwd = config.fwd
  if (lspec is not None and lqp is None) or (rspec is not None and rqp is None):
    if fwd.mode == 'real':
      est = (lspec if lqp is None else rspec).estimator
      raise ValueError(f'{where}fwd: mode="real" cannot run estimator {est!r} natively (its output is off an '
                       'integer grid); use mode="auto"')
    fwd = dataclasses.replace(fwd, mode='fake')
  fwd = dataclasses.replace(fwd, lhs=_on_grid(lspec, lqp), rhs=_on_grid(rspec, rqp))
  return lhs_hat, rhs_hat, lqp, rqp, dataclasses.replace(config, fwd=fwd), keys[2]


def _on_grid(spec: QuantSpec | None, qparams) -> QuantSpec | None:
  """The forward's spec of an operand: None where it stays float (fake mode); a method that is native for this
  call only (QDrop without a key) as the default estimator, which the mode choice reads as native (its qparams
  hold the grid; the gradient is the operand's own, taken through x_hat)."""
  if spec is None or qparams is None:
    return None
  return spec if spec.method.native else spec.replace(estimator=QuantSpec.estimator)  # the default: native


def _fq_operand(x, spec: QuantSpec | None, params, key, where: str):
  """fake_quant of one forward operand through its method (`spec.method`, see qjax.methods).

  Returns (x_hat f32, qparams) with qparams a QArray of the grid x_hat sits on exactly when the method is native
  (an integer or fp8 grid, so the matmul can run in low precision), else None. With nearest rounding qparams also
  carries qvalue = quantize(x) on that grid, the integers of x_hat (`grid_units` is shared by both), for the real
  matmul to use; it is dead code where the matmul runs in fake mode. `params` is a dict, or a callable
  `(resolved_spec, x) -> dict` (how Flax layers fetch or create their quantizer state), or None (dynamic). `x` may
  be a QArray (pre-quantized serving weights): then it is used as is.
  """
  if isinstance(x, quantizers.QArray):
    if spec is None or spec.format != x.format:
      raise ValueError(f'{where}: a pre-quantized operand of format {x.format!r} needs a spec of that format, '
                       f'got {None if spec is None else spec.format!r}')
    return quantizers.dequantize(x, jnp.float32), x
  x32 = x.astype(jnp.float32)
  if spec is None:
    return x32, None
  if callable(params):
    params = params(spec, x)
  method = spec.method
  params = method.prepare(x32, spec, params, where=f'{where}: ')
  dynamic = not method.learned and 'scale' not in params
  if not dynamic:
    # x is read by the quantization and by the non-finite reduction below: materialise it once. Without the
    # barrier XLA:CPU fuses x's producers (a residual block's BatchNorm, add and ReLU) into each reader: the
    # ResNet's PTQ serving at batch 256 ran at 1.07x of float without it, 0.83x with it (an ad-hoc A/B of the e2e
    # suite's programs; the suite itself: docs/benchmarks.md, 2026-12-05 evening).
    x32 = lax.optimization_barrier(x32)
  zero = warn_if_clipping_negatives(x32, spec, where if where.startswith('conv') else f'dot_general {where}')
  if dynamic:
    # Dynamic: one calibration for the fake quant and the matmul. Its own reduction flags a scale group holding
    # a NaN / inf with scale NaN, so that real (integer) execution, whose qvalues cannot hold a NaN, returns NaN
    # for that row / column as fake mode does (no extra pass over x).
    scale, zp = calibration.calibrate(lax.stop_gradient(x32), spec, poison=True)
    # Materialise the scale: else XLA fuses its arithmetic (the absmax key's conversion, the zero and non-finite
    # selects, the nextafter that keeps the absmax inside the grid) into every elementwise pass over x, and where
    # the scale varies along x's minor dim (a weight's per-output-channel scale) it is recomputed for each
    # element: 5.6 ms to quantize the MLP's 2048 x 2048 weight, against 1.1 ms for the same pass with a per-row
    # scale, which LLVM hoists out of the inner loop. The e2e suite's MLP int8 training step: 0.61x -> 0.46x
    # of float (docs/benchmarks.md, 2026-12-07).
    scale, zp = lax.optimization_barrier((scale, zp))
    params = {'scale': scale} if zp is None else {'scale': scale, 'zero_point': zp.astype(jnp.float32)}
  x_hat = method.fake_quant(x32, spec, params, key)
  if not method.native_for(key):
    return _with_check(x_hat, None, zero)
  scale, zp = method.grid(x32, spec, params, poison=True)
  flagged = scale
  if not dynamic:
    # Static (PTQ) and learned (LSQ, PACT) scales come without a look at x: one reduction of its non-finite flag
    # per scale group (scale-sized; a scale-sized all-reduce where the contraction is sharded, like a dynamic
    # scale's) poisons those groups' scales, so real execution returns NaN where fake mode does. It costs one
    # more read of x (XLA:CPU does not fuse the reduction into the quantization pass). sum(x - x) is NaN exactly
    # when x holds a NaN or an inf, and it is a plain f32 sum: 0.75 ms over 256x28x28x16 on XLA:CPU against
    # 2.09 ms for any(~isfinite(x)), whose predicate reduction does not vectorise (each jitted alone, an ad-hoc
    # microbenchmark; sum(x * 0) made XLA materialise the zeros in a model).
    xs = lax.stop_gradient(x32)
    flagged = jnp.where(jnp.isnan(gran.reduce(xs - xs, gran.scale_shape(x.shape, spec), jnp.sum)), jnp.nan, scale)
  zq = None if zp is None else lax.stop_gradient(zp)
  qp = grid_of(lax.stop_gradient(flagged), zq, spec)
  if spec.rounding == 'nearest' and method.integer_grid:
    # The integers straight from x, for the forward without differentiation (serving, evaluation; see
    # `for_training`): requantizing x_hat (x_hat / scale, round, clip on top of fake_quant's rounding) cost about
    # as much again as the quantization itself, and there x_hat has no other use. They are taken on the unflagged
    # grid: a flagged group's integers are meaningless either way, since the flagged scale that dequantizes the
    # product is NaN, and so the quantization and the matmul need not wait for the flag's reduction. The MLP's
    # one-row PTQ serving was faster so in each of five ad-hoc in-process A/Bs of the e2e suite's programs (one
    # pinned core of a 2-core Zen 3, 2026-12-06): 0.67-0.78x of float before, 0.53-0.69x after (no flag at all:
    # 0.64-0.68x); LeNet-5 at batch 1 and the ResNet at batch 8 within noise.
    xin = lax.stop_gradient(method.quantize_input(x32, spec, params))
    q = quantizers.quantize(xin, spec, scale=lax.stop_gradient(scale), zero_point=zq)
    qp = dataclasses.replace(qp, qvalue=q.qvalue)
  return _with_check(x_hat, qp, zero)


def _with_check(x_hat, qp, zero):
  """Takes the sign check's +0.0 (`warn_if_clipping_negatives`) off what the op computes with, so that its
  callback is not dead code: x_hat, read by fake-mode matmuls and the backward, and the grid's scale, read by
  real ones (x - 0.0 is x bit for bit, -0.0 included; x + 0.0 would turn -0.0 into +0.0)."""
  if zero is None:
    return x_hat, qp
  return x_hat - zero, None if qp is None else dataclasses.replace(qp, scale=qp.scale - zero)


_WARNED: set = set()


def _warn_negatives(where: str, fmt: str, negative) -> None:
  if bool(negative) and (where, fmt) not in _WARNED:
    _WARNED.add((where, fmt))
    warnings.warn(f'qjax: {where} is quantized on the unsigned symmetric grid {fmt!r}, which clips its negative '
                  'values to 0; use a signed format, scheme="asymmetric", or make the input non-negative (e.g. a '
                  'ReLU before it)', stacklevel=2)


def _report_negatives(where: str, fmt: str, negative):
  """The host side of the check in a compiled program: warns (once), returns the zero the program adds."""
  _warn_negatives(where, fmt, np.any(negative))
  return np.zeros(np.shape(negative), np.float32)


def warn_if_clipping_negatives(x, spec: QuantSpec, where: str):
  """Warns once per op operand when a symmetric unsigned grid (uint formats, scheme='symmetric'; not a method
  that clips its input itself, like PACT, whose clip at 0 is its ReLU) meets negative values.

  A concrete x is checked now (returns None). For a traced x this returns an f32 zero that the caller must take
  into what the op computes with (`_with_check`): the zero comes from a host callback that runs only when a
  negative value actually arrives (`lax.cond` on the predicate), so a non-negative input never calls the host.
  Returns None when no check applies.

  Why a `pure_callback` whose result is used, not a `jax.debug.callback`: a debug callback is an effect, and any
  effect takes a jitted function off JAX's C++ dispatch path, even in a branch never taken. A 4-layer MLP's uint8
  forward took 1.4-1.5x as long at 1 and 8 rows (1.08x at 256) with the callback called unconditionally, and
  1.14-1.18x with it in a `lax.cond`, as without the check; 1.01-1.05x this way (ad-hoc in-process A/Bs, one
  pinned core of a 2-core AMD EPYC Zen 3, 2026-12-06). A jitted `x + 1` took 160-330 us per call with such a
  branch against 10 us. The
  predicate is a float min-reduction, which vectorises on XLA:CPU where a predicate `any` does not."""
  fmt = formats.element_format(spec.fmt)
  if (not isinstance(fmt, formats.IntFormat) or fmt.signed or spec.scheme != 'symmetric'
      or spec.method.clips_input or (where, spec.format) in _WARNED):
    return None
  negative = jnp.min(lax.stop_gradient(x), initial=0.0) < 0  # a NaN compares False: not a negative value
  if not isinstance(negative, jax.core.Tracer):
    _warn_negatives(where, spec.format, negative)
    return None
  host = functools.partial(_report_negatives, where, spec.format)
  out = jax.ShapeDtypeStruct((), jnp.float32)
  return lax.cond(negative, lambda n: jax.pure_callback(host, out, n, vmap_method='broadcast_all'),
                  lambda n: jnp.zeros((), jnp.float32), negative)


def operand_result_type(lhs, rhs):
  """The float dtype of an op's result: the operands' result type, where a pre-quantized (QArray) operand takes
  the other operand's dtype (a bfloat16 model served with int8 weights keeps bfloat16 activations); f32 when
  both are QArrays."""
  dtypes = [x.dtype for x in (lhs, rhs) if not isinstance(x, quantizers.QArray)]
  return jnp.result_type(*dtypes) if dtypes else jnp.dtype(jnp.float32)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None, *,
                config: DotConfig, lhs_params: dict | None = None, rhs_params: dict | None = None,
                key: jax.Array | None = None):
  """Quantized `lax.dot_general`: same arguments plus `config` (see qjax.ops.config).

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type: as `jax.lax.dot_general` (precision
      applies to the matmuls that run in float or fake quant; the integer and fp8 ones choose their own).
    out_sharding: accepted for signature compatibility (Flax passes it); the output sharding follows XLA.
    config: the DotConfig of the forward and both gradient matmuls.
    lhs_params, rhs_params: quantizer parameters of the forward operands, the mapping their method declares
      (`qjax.methods`: learned ones, 'scale' for lsq, 'scale'/'offset' for lsq_plus, 'alpha' for pact,
      or for methods that learn nothing a static range 'scale', optional 'zero_point'), or a callable
      (resolved_spec, operand) -> such a dict. Without them the operand is calibrated on the fly.
    lhs, rhs may also be QArrays (pre-quantized weights for serving): their qvalues feed the matmul directly.
    key: PRNG key for stochastic rounding (split across operands and the backward).
  Returns:
    lhs . rhs in `preferred_element_type` (default: the operands' result type), with
    out ~ dequantize(q_lhs) . dequantize(q_rhs).
  """
  del out_sharding
  dims = canonical_dims(dimension_numbers)
  # Python scalars and NumPy arrays, as lax.dot_general takes them.
  lhs, rhs = (x if isinstance(x, quantizers.QArray) else jnp.asarray(x) for x in (lhs, rhs))
  out_dtype = preferred_element_type or operand_result_type(lhs, rhs)
  (lc, rc), (lb, rb) = dims
  if not check_operands('dot_general', lhs, rhs, config):
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=preferred_element_type)
  if not any(isinstance(x, quantizers.QArray) for x in (lhs, rhs)) and 0 in (lhs.ndim, rhs.ndim):
    # A scalar operand (lax takes one): both get a trailing size-1 dim to contract, as in `matmul`.
    return dot_general(lhs[..., None], rhs[..., None], ((lc + (lhs.ndim,), rc + (rhs.ndim,)), (lb, rb)), precision,
                       preferred_element_type, config=config, lhs_params=lhs_params, rhs_params=rhs_params, key=key)
  lspec = resolve_spec(config.fwd.lhs, lhs.shape, lc, lb, 'fwd.lhs')
  rspec = resolve_spec(config.fwd.rhs, rhs.shape, rc, rb, 'fwd.rhs')
  lhs_hat, rhs_hat, lqp, rqp, cfg, bwd_key = quantize_forward(config, lhs, rhs, lspec, rspec, lhs_params, rhs_params,
                                                              key)
  in_dtype = operand_result_type(lhs, rhs)
  float_dtype = in_dtype if in_dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  static = _Static(dims, cfg, jnp.dtype(out_dtype), jnp.dtype(float_dtype), direct_flags(lhs, rhs, lqp, rqp),
                   precision)
  out = _qdot(lhs_hat, rhs_hat, lqp, rqp, bwd_key, static)
  return out.astype(out_dtype)


def make_dot_general(config: DotConfig, **kwargs):
  """A function with `lax.dot_general`'s signature running the quantized op, for Flax's `dot_general=`."""
  def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **unused):
    return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, config=config, **kwargs)
  return fn
