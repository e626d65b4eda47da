"""Number formats: integer grids, low-precision floats, codebooks and MX blocks.

The bottom layer of qjax: no gradients, no Flax. A format answers three questions: which values can a
quantized element take (its grid), which container dtype holds it, and how a scaled value is rounded onto
the grid. Formats are parsed from short names so that configs stay plain data:

  int2 .. int8      signed integers, full range [-2^(b-1), 2^(b-1)-1]
  int1              binary {-1, +1}: qvalue = sign(x) (0 maps to +1)
  int2n .. int8n    signed, narrow (symmetric) range [-(2^(b-1)-1), 2^(b-1)-1], e.g. int8n = [-127, 127]
  uint1 .. uint8    unsigned integers [0, 2^b - 1]
  fp8_e4m3          float8 e4m3fn (max 448), saturating
  fp8_e5m2          float8 e5m2 (max 57344), saturating
  fp4_e2m1          float4 e2m1fn (max 6), saturating
  nf4               the 16-level NormalFloat codebook of QLoRA
  mxint8, mxfp8, mxfp4   OCP MX blocks: one power-of-two (E8M0) scale per 32 elements along an axis

Edge cases (written down, as they are easy to get wrong):

  | input      | int formats                     | float formats              | codebooks        |
  |------------|---------------------------------|----------------------------|------------------|
  | |x| > max  | clipped to qmin / qmax          | saturated to +-max         | nearest (edge)   |
  | +-inf      | qmax / qmin                     | +-max                      | edge level       |
  | NaN        | qvalue 0                        | NaN (fp4: 0)               | level 0          |
  | ties       | half to even                    | half to even (XLA convert) | lower index      |

fake_quant keeps NaN and +-inf as they are in every format (a diverging run must not look finite), and the
quantized ops carry a non-finite operand group into their result as NaN (see `qjax.ops.dot_general`).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

# The 16 NormalFloat-4 levels (QLoRA, arXiv:2305.14314, appendix E): quantiles of N(0, 1) rescaled to [-1, 1],
# with an exact zero.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

MX_BLOCK = 32

_FLOATS = {
    # name: (dtype, max finite value, mantissa bits, min normal exponent, E8M0 emax of the element)
    'fp8_e4m3': (jnp.float8_e4m3fn, 448.0, 3, -6, 8),
    'fp8_e5m2': (jnp.float8_e5m2, 57344.0, 2, -14, 15),
    'fp4_e2m1': (jnp.float4_e2m1fn, 6.0, 1, 0, 2),
}

FORMAT_NAMES = (
    'int1..int8', 'int2n..int8n', 'uint1..uint8', *_FLOATS, 'nf4', 'codebook', 'mxint8', 'mxfp8', 'mxfp4')


@dataclasses.dataclass(frozen=True)
class IntFormat:
  """Integers of `bits` bits: qvalue in [qmin, qmax], held in an int8 (or uint8) container."""
  bits: int
  signed: bool = True
  narrow: bool = False

  @property
  def binary(self) -> bool:
    """Signed 1-bit is the binary grid {-1, +1} (BNN/XNOR-Net sign quantization), not {-1, 0}."""
    return self.signed and self.bits == 1

  @property
  def qmin(self) -> int:
    if not self.signed:
      return 0
    if self.binary:
      return -1
    return -(2 ** (self.bits - 1)) + int(self.narrow)

  @property
  def qmax(self) -> int:
    if not self.signed:
      return 2 ** self.bits - 1
    if self.binary:
      return 1
    return 2 ** (self.bits - 1) - 1

  @property
  def container(self):
    return jnp.int8 if self.signed else jnp.uint8

  @property
  def name(self) -> str:
    return f"{'' if self.signed else 'u'}int{self.bits}{'n' if self.narrow else ''}"


@dataclasses.dataclass(frozen=True)
class FloatFormat:
  """A low-precision float (fp8 e4m3fn / e5m2, fp4 e2m1fn); casts saturate at +-max instead of overflowing."""
  name: str

  @property
  def dtype(self):
    return _FLOATS[self.name][0]

  @property
  def max(self) -> float:
    return _FLOATS[self.name][1]

  @property
  def mantissa_bits(self) -> int:
    return _FLOATS[self.name][2]

  @property
  def min_normal_exp(self) -> int:
    return _FLOATS[self.name][3]

  @property
  def emax(self) -> int:
    return _FLOATS[self.name][4]

  @property
  def bits(self) -> int:
    return 4 if self.name.startswith('fp4') else 8


@dataclasses.dataclass(frozen=True)
class CodebookFormat:
  """A non-uniform grid: qvalue is an index into `levels` (sorted, within [-1, 1]); x ~ levels[qvalue] * scale."""
  name: str
  levels: tuple[float, ...]

  @property
  def bits(self) -> int:
    return max(1, math.ceil(math.log2(len(self.levels))))


@dataclasses.dataclass(frozen=True)
class MXFormat:
  """OCP MX: elements of `element` format sharing one power-of-two scale per `block` values along an axis."""
  name: str
  element: IntFormat | FloatFormat
  block: int = MX_BLOCK

  @property
  def bits(self) -> int:
    return self.element.bits


Format = IntFormat | FloatFormat | CodebookFormat | MXFormat

_INT_RE = re.compile(r'^(u?)int(\d+)(n?)$')


def parse_format(name: str, codebook: tuple[float, ...] | None = None) -> Format:
  """Returns the format named `name`; raises ValueError naming the allowed names or bit range."""
  if not isinstance(name, str):
    raise ValueError(f'format must be a string such as "int8", got {name!r}')
  m = _INT_RE.match(name)
  if m:
    bits = int(m.group(2))
    if not 1 <= bits <= 8:
      raise ValueError(f'format {name!r}: bits must be in 1..8, got {bits}')
    if m.group(3) and (m.group(1) or bits == 1):
      raise ValueError(f'format {name!r}: narrow range ("n" suffix) applies to signed formats of 2..8 bits')
    return IntFormat(bits, signed=not m.group(1), narrow=bool(m.group(3)))
  if name in _FLOATS:
    return FloatFormat(name)
  if name == 'nf4':
    return CodebookFormat('nf4', NF4_LEVELS)
  if name == 'codebook':
    if not codebook or len(codebook) < 2:
      raise ValueError('format "codebook" needs codebook=(level, ...) with at least 2 levels')
    levels = tuple(sorted(float(v) for v in codebook))
    if len(set(levels)) != len(levels):
      raise ValueError(f'codebook levels must be distinct, got {codebook}')
    if len(levels) > 256:
      raise ValueError(f'codebook has {len(levels)} levels; at most 256 fit a uint8 qvalue')
    return CodebookFormat('codebook', levels)
  if name == 'mxint8':
    return MXFormat(name, IntFormat(8, narrow=True))
  if name == 'mxfp8':
    return MXFormat(name, FloatFormat('fp8_e4m3'))
  if name == 'mxfp4':
    return MXFormat(name, FloatFormat('fp4_e2m1'))
  raise ValueError(f'unknown format {name!r}; allowed: {", ".join(FORMAT_NAMES)}')


# ----------------------------------------------------------------------------------------------- rounding


def round_nearest(x: jax.Array) -> jax.Array:
  """Round half to even (IEEE default): 0.5 -> 0, 1.5 -> 2, -2.5 -> -2."""
  return jnp.round(x)


def uniform_noise(key: jax.Array | None, shape: tuple[int, ...], rounding: str) -> jax.Array | None:
  """The U[0, 1) draws of stochastic rounding (None for rounding='nearest')."""
  if rounding == 'nearest':
    return None
  if key is None:
    raise ValueError('rounding="stochastic" needs a PRNG key: pass key=jax.random.key(...)')
  return jax.random.uniform(key, shape, jnp.float32)


def round_to_grid(y: jax.Array, noise: jax.Array | None) -> jax.Array:
  """Nearest (half to even) when noise is None, else floor(y + u): rounds up with probability y - floor(y),
  so E[result] = y (unbiased stochastic rounding)."""
  return round_nearest(y) if noise is None else jnp.floor(y + noise)


def floor_log2(a: jax.Array) -> jax.Array:
  """floor(log2(a)) for a > 0, exactly (from the exponent bits; XLA:CPU's log2 gives 12.999999 for 2^13)."""
  return (jnp.frexp(a.astype(jnp.float32))[1] - 1).astype(jnp.float32)


def exp2_int(e: jax.Array) -> jax.Array:
  """2^e for integer-valued e, exactly (XLA:CPU's exp2 is off by an ulp for |e| >= 13). f32 subnormals flush
  to zero on CPU, so keep e >= -126."""
  e = jnp.asarray(e)
  return jnp.ldexp(jnp.ones(e.shape, jnp.float32), e.astype(jnp.int32))


def float_ulp(y: jax.Array, fmt: FloatFormat) -> jax.Array:
  """Spacing of `fmt`'s grid around |y| (subnormal spacing below the smallest normal)."""
  e = floor_log2(jnp.maximum(jnp.abs(y), 1e-30))
  e = jnp.maximum(e, fmt.min_normal_exp)
  return exp2_int(e - fmt.mantissa_bits)


def _kept(q: jax.Array) -> jax.Array:
  """The float8/float4 cast kept in the program. XLA:GPU drops an f32 -> narrow float -> f32 round trip as an
  excess-precision simplification (xla_allow_excess_precision, on by default), which would make fake quant an
  identity: on an H200 (jax 0.11.2, 2026-12-04) fake fp8 matmuls came out 1-1.5% (of the sum of |products|) off
  the exact product of the fp8 values while the real fp8 matmul was within 3e-5 (tests/gpu). The barrier keeps
  the rounding; other backends do not drop the pair."""
  return lax.optimization_barrier(q) if jax.default_backend() == 'gpu' else q


def cast_float(y: jax.Array, fmt: FloatFormat, noise: jax.Array | None = None) -> jax.Array:
  """Casts f32 `y` to `fmt` saturating at +-max; NaN stays NaN (fp4 has none: 0).

  With `noise` (U[0,1) draws) rounds stochastically between the two neighbouring grid points.
  """
  y = y.astype(jnp.float32)
  if noise is not None:
    ulp = float_ulp(y, fmt)
    y = jnp.floor(y / ulp + noise) * ulp
  y = jnp.clip(y, -fmt.max, fmt.max)  # NaN passes through clip.
  if fmt.name == 'fp4_e2m1':
    y = jnp.where(jnp.isnan(y), 0.0, y)
  return _kept(y.astype(fmt.dtype))


def nearest_level(y: jax.Array, levels: tuple[float, ...]) -> jax.Array:
  """Index of the codebook level nearest to y (ties to the lower index), as uint8. NaN -> 0."""
  lv = jnp.asarray(levels, jnp.float32)
  mids = (lv[1:] + lv[:-1]) / 2  # Decision boundaries between neighbouring levels.
  y = jnp.where(jnp.isnan(y), lv[0], y.astype(jnp.float32))
  return jnp.searchsorted(mids, y, side='left').astype(jnp.uint8)


def ml_dtype_max(fmt: FloatFormat) -> float:
  """Largest finite value of the format according to ml_dtypes (cross-check of the table above)."""
  return float(ml_dtypes.finfo(np.dtype(fmt.dtype)).max)


# ----------------------------------------------------------------------------------- onto and off the grid


def element_format(fmt: Format) -> IntFormat | FloatFormat | CodebookFormat:
  """The per-element format (MX blocks quantize their elements in the element format)."""
  return fmt.element if isinstance(fmt, MXFormat) else fmt


def to_grid(y: jax.Array, fmt: Format, noise: jax.Array | None = None) -> jax.Array:
  """Maps scaled values y = x / scale + zero_point onto the format's grid; returns qvalue in its container.

  int: clip(round(y), qmin, qmax) as int8/uint8 (binary: sign, 0 -> +1, stochastic: +1 with probability
  clip((1 + y) / 2, 0, 1); NaN -> 0).
  float: saturating cast to the float8/float4 dtype.  codebook: index of the nearest level (uint8).
  `noise` (U[0,1) draws, see `uniform_noise`) switches to stochastic rounding.
  """
  fmt = element_format(fmt)
  y = y.astype(jnp.float32)
  if isinstance(fmt, IntFormat):
    return grid_values(y, fmt, noise).astype(fmt.container)
  if isinstance(fmt, FloatFormat):
    return cast_float(y, fmt, noise)
  if noise is not None:
    raise ValueError(f'rounding="stochastic" is not defined for codebook format {fmt.name!r}; use "nearest"')
  return nearest_level(y, fmt.levels)


def grid_values(y: jax.Array, fmt: Format, noise: jax.Array | None = None) -> jax.Array:
  """from_grid(to_grid(y, fmt, noise), fmt): the grid point of y as f32, bit for bit.

  Integer grids skip the round trip through the int8/uint8 container (a pack and an unpack per element, the
  costliest part of fake_quant's elementwise pass on AVX2); -0.0 becomes +0.0 as the container would make it.
  """
  efmt = element_format(fmt)
  if not isinstance(efmt, IntFormat):
    return from_grid(to_grid(y, fmt, noise), fmt)
  y = y.astype(jnp.float32)
  if efmt.binary and noise is None:
    q = jnp.where(y >= 0, 1.0, -1.0)
  elif efmt.binary:
    # Stochastic binarization (BinaryConnect, Courbariaux et al. 2015): +1 with probability clip((1 + y) / 2,
    # 0, 1), so E[q] = y on [-1, 1]. floor((1 + y) / 2 + u) is 1 with that probability where it is in [0, 1).
    q = jnp.clip(2.0 * jnp.floor((1.0 + y) * 0.5 + noise) - 1.0, -1.0, 1.0)
  else:
    q = jnp.clip(round_to_grid(y, noise), efmt.qmin, efmt.qmax)  # +-inf land on the edges.
  return jnp.where(jnp.isnan(y) | (q == 0), 0.0, q)  # NaN -> 0, -0.0 -> +0.0.


def from_grid(qvalue: jax.Array, fmt: Format) -> jax.Array:
  """The f32 value of each grid point (inverse of `to_grid` on the grid)."""
  fmt = element_format(fmt)
  if isinstance(fmt, CodebookFormat):
    return jnp.asarray(fmt.levels, jnp.float32)[qvalue.astype(jnp.int32)]
  return qvalue.astype(jnp.float32)


def grid_max(fmt: Format) -> float:
  """Largest magnitude on the element grid: qmax for ints, max finite for floats, max |level| for codebooks."""
  fmt = element_format(fmt)
  if isinstance(fmt, IntFormat):
    return float(fmt.qmax)
  if isinstance(fmt, FloatFormat):
    return fmt.max
  return max(abs(v) for v in fmt.levels)


def end_half_steps(fmt: Format) -> tuple[float, float]:
  """Half the grid's step at its (lowest, highest) end, in grid units: how far beyond an end a value still rounds
  onto it with no more error than rounding gives inside the grid (ints 0.5; floats half the top binade's step;
  codebooks half the gap between the two end levels)."""
  fmt = element_format(fmt)
  if isinstance(fmt, IntFormat):
    return 0.5, 0.5
  if isinstance(fmt, FloatFormat):
    half = 2.0 ** (fmt.emax - fmt.mantissa_bits - 1)
    return half, half
  lv = fmt.levels
  return (lv[1] - lv[0]) / 2, (lv[-1] - lv[-2]) / 2


def grid_range(fmt: Format) -> tuple[float, float]:
  """(lowest, highest) representable value of the element grid, in grid units."""
  fmt = element_format(fmt)
  if isinstance(fmt, IntFormat):
    return float(fmt.qmin), float(fmt.qmax)
  if isinstance(fmt, FloatFormat):
    return -fmt.max, fmt.max
  return fmt.levels[0], fmt.levels[-1]
