"""Configs of quantized matmuls: one MatmulConfig per matmul of a dot_general's forward and backward.

A dot_general out = lhs . rhs has three matmuls:

    fwd   out  = lhs . rhs        fwd.lhs quantizes lhs,  fwd.rhs quantizes rhs
    dlhs  dlhs = g . rhs^T        dlhs.lhs quantizes g,   dlhs.rhs quantizes rhs
    drhs  drhs = lhs^T . g        drhs.lhs quantizes lhs, drhs.rhs quantizes g

Each operand gets a QuantSpec or None (left in float). Inside an op, granularity is relative to the
contraction, so one spec fits all three matmuls: 'per_channel' means one scale per non-contracted index (per
token of activations, per output channel of weights), 'per_group' means sub-channel groups of `group_size`
along the contraction dimension. `mode` picks how a matmul runs:

    'fake'  quantize-dequantize both operands, then a float matmul (any format)
    'real'  low-precision execution: int8 x int8 -> int32 (any integer grid of <= 8 bits, asymmetric included),
            fp8 x fp8 -> f32; raises when the formats cannot run natively
    'auto'  'real' when both operands can run natively, else 'fake'

Configs are frozen dataclasses: hashable (usable as static jit arguments), and `to_dict`/`from_dict`
round-trip them through JSON for results files and sweeps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qjax.spec import QuantSpec, check_choice

MODES = ('fake', 'real', 'auto')


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  """Quantization of one matmul: a spec (or None: float) per operand, and the execution mode."""
  lhs: QuantSpec | None = None
  rhs: QuantSpec | None = None
  mode: str = 'auto'

  def __post_init__(self):
    check_choice('mode', self.mode, MODES)
    for name in ('lhs', 'rhs'):
      v = getattr(self, name)
      if isinstance(v, dict):
        object.__setattr__(self, name, QuantSpec.from_dict(v))
      elif v is not None and not isinstance(v, QuantSpec):
        raise ValueError(f'MatmulConfig.{name} must be a QuantSpec, a dict or None, got {type(v).__name__}')

  @property
  def quantized(self) -> bool:
    return self.lhs is not None or self.rhs is not None

  def to_dict(self) -> dict[str, Any]:
    return {'lhs': self.lhs and self.lhs.to_dict(), 'rhs': self.rhs and self.rhs.to_dict(), 'mode': self.mode}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> MatmulConfig:
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class DotConfig:
  """The three matmuls of a quantized dot_general (see the module docstring).

  Attributes:
    fwd, dlhs, drhs: MatmulConfig of the forward and the two gradient matmuls.
    drhs_row_major: compute drhs as (row-major lhs^T) . g, so that XLA:CPU keeps the int8 weight-gradient
      matmul on its fast kernel (a transposed operand would otherwise be up-cast to int32).
    small_m: route forward matmuls whose non-contracted lhs size (rows) is at most this to 'fake' (float)
      execution in 'auto' mode. The default 0 routes nothing: where XLA:CPU's fast (YNNPACK) kernel refuses a dot
      with a single row (jaxlib 0.12.0.x), qjax pads it to two rows (qjax.ops.dot_general.min_free), which with
      pre-quantized int8 weights runs at 0.73x the f32 matrix-vector product (1 and 2 cores, 4096x4096, Intel
      Xeon with VNNI), where the float route ran at 1.54-1.67x (docs/benchmarks.md, decode).
  """
  fwd: MatmulConfig = MatmulConfig()
  dlhs: MatmulConfig = MatmulConfig()
  drhs: MatmulConfig = MatmulConfig()
  drhs_row_major: bool = True
  small_m: int = 0

  def __post_init__(self):
    for name in ('fwd', 'dlhs', 'drhs'):
      v = getattr(self, name)
      if isinstance(v, dict):
        object.__setattr__(self, name, MatmulConfig.from_dict(v))

  def to_dict(self) -> dict[str, Any]:
    return {'fwd': self.fwd.to_dict(), 'dlhs': self.dlhs.to_dict(), 'drhs': self.drhs.to_dict(),
            'drhs_row_major': self.drhs_row_major, 'small_m': self.small_m}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> DotConfig:
    return cls(**d)


def int_dynamic(bits: int = 8, *, bwd_bits: int | None = 8, mode: str = 'auto', stochastic_grads: bool = False,
                **spec_kwargs) -> DotConfig:
  """Weights and activations of `bits` bits (int2..int8) with per-channel dynamic absmax scales in all three matmuls.

  bwd_bits=None leaves the two gradient matmuls in float. Gradients use stochastic rounding when asked.
  """
  spec = QuantSpec(format=f'int{bits}', granularity='per_channel', **spec_kwargs)
  fwd = MatmulConfig(spec, spec, mode)
  if bwd_bits is None:
    return DotConfig(fwd=fwd)
  b = QuantSpec(format=f'int{bwd_bits}', granularity='per_channel', **spec_kwargs)
  g = b.replace(rounding='stochastic') if stochastic_grads else b
  return DotConfig(fwd=fwd, dlhs=MatmulConfig(g, b, mode), drhs=MatmulConfig(b, g, mode))


def int8_dynamic(bits: int = 8, **kwargs) -> DotConfig:
  """int_dynamic(8, **kwargs): int8 with per-channel dynamic scales in all three matmuls. `bits` stays for the
  calls that write int8_dynamic(8); another width is int_dynamic(bits), so this name never returns int4."""
  if bits != 8:
    raise ValueError(f'int8_dynamic({bits}) would not be int8: use qjax.ops.int_dynamic({bits})')
  return int_dynamic(8, **kwargs)


def fp8(mode: str = 'auto') -> DotConfig:
  """FP8 training recipe: e4m3 forward, e5m2 gradients (per-tensor current scaling)."""
  e4 = QuantSpec(format='fp8_e4m3')
  e5 = QuantSpec(format='fp8_e5m2')
  return DotConfig(fwd=MatmulConfig(e4, e4, mode), dlhs=MatmulConfig(e5, e4, mode),
                   drhs=MatmulConfig(e4, e5, mode))
