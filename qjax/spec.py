"""QuantSpec: how one tensor is quantized, as a frozen, hashable, serialisable value.

A spec names a format, a granularity, a scheme, a calibration, a rounding mode and a gradient estimator. It
holds only names and numbers so that configs and sweeps can carry it and results files can record it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from qjax import formats, registry

GRANULARITIES = ('per_tensor', 'per_channel', 'per_group')
SCHEMES = ('symmetric', 'asymmetric')
CALIBRATIONS = ('absmax', 'absmax_half_step', 'minmax', 'percentile', 'mse')
ROUNDINGS = ('nearest', 'stochastic')


def check_choice(field: str, value: Any, allowed: tuple[str, ...], where: str = '') -> None:
  """Raises ValueError naming the field, the allowed values and the closest match."""
  if value in allowed:
    return
  raise ValueError(f'{where}{field}={value!r} is not one of {", ".join(allowed)}{registry.near(value, allowed)}')


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How to quantize one tensor.

  Attributes:
    format: number format name, see `qjax.formats` (int1..int8, int8n, uint4, fp8_e4m3, nf4, mxfp4, ...).
    granularity: 'per_tensor' (one scale), 'per_channel' (one scale per index of `axis`), or 'per_group'
      (the dimension `axis` split into groups of `group_size`; every other dimension keeps its own scale).
    axis: the channel axes (per_channel) or the grouped axis (per_group). Negative values count from the end.
    group_size: elements per group along `axis` (per_group; MX formats force 32).
    scheme: 'symmetric' (zero_point = 0) or 'asymmetric' (integer zero_point; integer formats only).
    calibration: 'absmax' (scale = absmax / qmax), 'absmax_half_step' (scale = absmax / (qmax + 1/2), using the
      -(qmax + 1) end of full-range signed integer grids; see `qjax.calibration`), 'minmax' (asymmetric),
      'percentile' or 'mse' (clip-ratio search minimising ||x - fake_quant(x)||^2).
    percentile: the percentile of |x| (or of x at both ends, asymmetric) for calibration='percentile'.
    po2_scale: round scales up to a power of two.
    rounding: 'nearest' (half to even) or 'stochastic' (unbiased; needs a PRNG key).
    estimator: the quantizer method, by its registered name (`qjax.registry.names()`, `qjax.registered`): 'ste',
      'clipped_ste', 'lsq', 'lsq_plus', 'pact', 'ewgs', ..., or one you registered.
    ewgs_delta: EWGS's delta >= 0 (finite).
    codebook: the levels of format='codebook' (within [-1, 1]); only with format='codebook'.

  Specs that would be accepted but mean nothing raise ValueError at construction, naming the reason: a
  group_size with per_tensor / per_channel, a codebook with another format, levels outside [-1, 1], a
  non-integer axis, per_channel with no axis, a non-finite or negative ewgs_delta.
  """
  format: str = 'int8'
  granularity: str = 'per_tensor'
  axis: int | tuple[int, ...] = -1
  group_size: int = 0
  scheme: str = 'symmetric'
  calibration: str = 'absmax'
  percentile: float = 99.9
  po2_scale: bool = False
  rounding: str = 'nearest'
  estimator: str = 'ste'
  ewgs_delta: float = 1e-3
  codebook: tuple[float, ...] | None = None

  def __post_init__(self):
    axis = self.axis
    if isinstance(axis, (list, tuple)):
      axis = tuple(_int_axis(a, axis) for a in axis)
    else:
      axis = _int_axis(axis, axis)
    object.__setattr__(self, 'axis', axis)
    if self.codebook is not None:
      if self.format != 'codebook':
        raise ValueError(f'codebook= only applies to format="codebook"; format={self.format!r} has its own grid '
                         '(drop codebook, or set format="codebook")')
      levels = tuple(float(v) for v in self.codebook)
      bad = [v for v in levels if not -1.0 <= v <= 1.0]
      if bad:
        raise ValueError(f'codebook levels must lie within [-1, 1] (the scale carries the magnitude); got {bad}')
      object.__setattr__(self, 'codebook', levels)
    if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)):
      raise ValueError(f'group_size must be an integer, got {self.group_size!r}')
    if self.group_size < 0:
      raise ValueError(f'group_size must be >= 0 (0: no groups), got {self.group_size}')
    fmt = self.fmt  # Validates the format name and bit-width.
    check_choice('granularity', self.granularity, GRANULARITIES)
    check_choice('scheme', self.scheme, SCHEMES)
    check_choice('calibration', self.calibration, CALIBRATIONS)
    check_choice('rounding', self.rounding, ROUNDINGS)
    method = registry.get(self.estimator)  # ValueError naming the registered methods
    if isinstance(fmt, formats.MXFormat):
      if self.group_size not in (0, fmt.block):
        raise ValueError(f'format={self.format!r} shares one scale per {fmt.block} elements; '
                         f'group_size must be {fmt.block} (or 0), got {self.group_size}')
      object.__setattr__(self, 'granularity', 'per_group')
      object.__setattr__(self, 'group_size', fmt.block)
    if self.group_size and self.granularity != 'per_group':
      raise ValueError(f'group_size={self.group_size} only applies to granularity="per_group"; with '
                       f'granularity={self.granularity!r} it would be ignored (drop it, or use per_group)')
    if self.granularity == 'per_channel' and self.axis == ():
      raise ValueError('granularity="per_channel" needs at least one channel axis, got axis=() (that is one '
                       'scale for the whole tensor: say granularity="per_tensor")')
    if self.granularity == 'per_group':
      if self.group_size < 1:
        raise ValueError(f'granularity="per_group" needs group_size >= 1, got group_size={self.group_size}')
      if not isinstance(self.axis, int):
        raise ValueError(f'granularity="per_group" groups along one axis; got axis={self.axis}')
    is_int = isinstance(fmt, formats.IntFormat)
    if self.scheme == 'asymmetric':
      if not is_int or fmt.binary:
        raise ValueError(f'scheme="asymmetric" needs an integer format of 2..8 bits (or uint1), '
                         f'got format={self.format!r}')
      if self.calibration == 'absmax':
        raise ValueError('calibration="absmax" does not fit scheme="asymmetric"; '
                         'use one of minmax, percentile, mse')
    elif self.calibration == 'minmax':
      raise ValueError('calibration="minmax" does not fit scheme="symmetric"; '
                       'use scheme="asymmetric", or one of absmax, percentile, mse')
    method.check(self)  # the method's own constraints (integer formats only, one scheme, ...)
    if self.calibration == 'absmax_half_step' and not (is_int and fmt.signed and not fmt.narrow and fmt.bits > 1
                                                       and self.scheme == 'symmetric'):
      raise ValueError(f'calibration="absmax_half_step" uses the -(qmax + 1) end of a full-range signed integer '
                       f'grid: it needs scheme="symmetric" and one of int2..int8, got format={self.format!r}, '
                       f'scheme={self.scheme!r} (use calibration="absmax")')
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f'percentile must be in (0, 100], got {self.percentile}')
    if not (isinstance(self.ewgs_delta, (int, float)) and math.isfinite(self.ewgs_delta) and self.ewgs_delta >= 0):
      raise ValueError(f'ewgs_delta must be a finite number >= 0, got {self.ewgs_delta!r}')

  @property
  def fmt(self) -> formats.Format:
    return formats.parse_format(self.format, self.codebook)

  @property
  def bits(self) -> int:
    return self.fmt.bits

  @property
  def method(self):
    """The registered quantizer method named by `estimator` (see `qjax.methods`)."""
    return registry.get(self.estimator)

  @property
  def learned(self) -> tuple[str, ...]:
    """Names of the learnable quantizer parameters this spec's method declares."""
    return tuple(p.name for p in self.method.learned)

  def replace(self, **changes) -> QuantSpec:
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['axis'] = list(self.axis) if isinstance(self.axis, tuple) else self.axis
    if self.codebook is not None:
      d['codebook'] = list(self.codebook)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in d:
      if k not in fields:
        check_choice('QuantSpec field', k, tuple(sorted(fields)))
    return cls(**d)


def _int_axis(a, axis) -> int:
  """An axis as int; ValueError for anything that is not an integer (1.5 would silently become 1)."""
  if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
    raise ValueError(f'axis must be an integer or a tuple of integers, got axis={axis!r}')
  return int(a)


def int_spec(bits: int, **kwargs) -> QuantSpec:
  """Shorthand: a signed integer spec of `bits` bits (ValueError outside 1..8)."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:  # True is an int in Python
    raise ValueError(f'bits must be an integer in 1..8, got {bits!r}')
  return QuantSpec(format=f'int{bits}', **kwargs)
