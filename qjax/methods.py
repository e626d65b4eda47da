"""Quantizer methods: one object per method, declaring everything a consumer needs in one place.

A method (`Method`) declares
  - its learned parameters (`Learned`: name, shape relative to the scale shape, initialisation from data,
    constraint), so that `qjax.init_params`, Flax rules and serving conversion can create, train and fold them;
  - its forward / backward: `fake_quant(x, spec, params, key)`, built on one `jax.custom_vjp` (the six classic
    ones in `qjax.estimators`, new ones in their own file);
  - the integer grid it produces, `grid(x, spec, params) -> (scale, zero_point)` with
    x ~ (qvalue - zero_point) * scale, used by `quantize`, by real (integer) matmuls and by serving conversion,
    and `quantize_input` (what is put on that grid, e.g. PACT's clipped x);
  - its constraints on the spec (`check`: integer formats only, one scheme, ...).
`qjax.registered` registers each method under its config name, one line each; everything else asks
`qjax.registry`. Adding a method: docs/extending.md.

Params: a method with learned parameters takes exactly those (`params={'scale': s}` for LSQ); a method without
takes an optional static range {'scale', 'zero_point'} (else the spec's calibration runs on x, without gradient).
Learned values are broadcast to the scale shape and constrained (`Learned.lower` / `upper`, a clamp with a
straight-through gradient, `bounded`) wherever they are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qjax import calibration, estimators, formats, registry
from qjax import granularity as gran
from qjax.spec import QuantSpec

Params = Mapping[str, jax.Array]


class Learned(NamedTuple):
  """A learned quantizer parameter.

  Attributes:
    name: its key in params (and in Flax: '<op><i>_<side>_<name>').
    init: (x, spec) -> initial value, calibrated on x (already stop-gradient'ed), of the scale shape.
    lower, upper: the forward uses clip(value, lower, upper) with a straight-through gradient (`bounded`): a
      step size stays positive whatever the optimizer does; None: unbounded on that side.
    shape: 'scale' (the spec's scale shape: one value per scale group). The only shape so far.
  """
  name: str
  init: Callable[[jax.Array, QuantSpec], jax.Array]
  lower: float | None = None
  upper: float | None = None
  shape: str = 'scale'


def bounded(v, lower: float | None, upper: float | None):
  """clip(v, lower, upper) in the forward, identity in the backward (straight-through clamp)."""
  if lower == estimators.STEP_FLOOR and upper is None:
    return estimators.positive(v)
  v = jnp.asarray(v)
  return (v - jax.lax.stop_gradient(v)) + jax.lax.stop_gradient(jnp.clip(v, lower, upper))


def fit(a, sshape) -> jax.Array | None:
  """a as f32 broadcast to the scale shape (None stays None)."""
  return None if a is None else jnp.broadcast_to(jnp.asarray(a, jnp.float32), sshape)


@dataclasses.dataclass(frozen=True)
class Method:
  """A quantizer method (see the module docstring). Subclasses set the fields and override `fake_quant`
  (and `grid` / `quantize_input` / `check` when they differ from the calibrated grid).

  Attributes:
    name: the config name (`QuantSpec.estimator`).
    learned: the learned parameters.
    needs_int: only integer formats.
    schemes: the schemes it supports.
    native: its fake-quant output lies on `grid()` (an integer / fp8 grid), so the ops may run it as a real
      low-precision matmul; False (e.g. LSQ+'s float offset, or elements left off the grid): the ops run it in
      fake mode.
    integer_grid: `quantize` (and serving conversion) can represent its output as a QArray.
    clips_input: it clips x to a learned range itself (PACT), so an unsigned grid's clip at 0 is intended (the
      ops' warning about negative inputs on symmetric unsigned grids stays quiet).
  """
  name: str
  learned: tuple[Learned, ...] = ()
  needs_int: bool = False
  schemes: tuple[str, ...] = ('symmetric', 'asymmetric')
  native: bool = True
  integer_grid: bool = True
  clips_input: bool = False

  # ---- spec and params

  def check(self, spec: QuantSpec) -> None:
    """Raises ValueError when the spec cannot use this method."""
    fmt = spec.fmt
    if self.needs_int and not isinstance(fmt, formats.IntFormat):
      ok = ', '.join(n for n in _names_without_int()) or 'ste'
      raise ValueError(f'estimator={self.name!r} needs an integer format; format={spec.format!r} supports {ok}')
    if spec.scheme not in self.schemes:
      raise ValueError(f'estimator={self.name!r} needs scheme="{self.schemes[0]}", got scheme={spec.scheme!r}')

  def learned_names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.learned)

  def native_for(self, key) -> bool:
    """`native` for a call with this PRNG key (None: no key): a method whose training forward leaves the grid
    only with a key (QDrop) is native without one, so evaluation and serving run it as a real matmul."""
    return self.native

  def keyless_spec(self, spec):
    """The spec to differentiate where no PRNG key reaches the quantizer by design (a rule's tied-weight read,
    whose forward is the served table): the spec itself, for methods that draw no random numbers."""
    return spec

  def random_in_training(self) -> bool:
    """Its training forward draws random numbers (QDrop's drop mask), so the Flax layers hand it a PRNG key
    while training; without a key it must act as its evaluation forward."""
    return False

  def init(self, x: jax.Array, spec: QuantSpec) -> dict[str, jax.Array]:
    """Initial learned parameters, calibrated on x ({} when the method learns nothing)."""
    x = jax.lax.stop_gradient(x)
    return {p.name: p.init(x, spec) for p in self.learned}

  def prepare(self, x: jax.Array, spec: QuantSpec, params: Params | None, where: str = '') -> dict[str, Any]:
    """params checked against the declaration, broadcast to the scale shape and constrained."""
    params = dict(params or {})
    sshape = gran.scale_shape(x.shape, spec)
    names = self.learned_names()
    allowed = names or ('scale', 'zero_point')
    extra = [k for k in params if k not in allowed]
    if extra:
      raise ValueError(f'{where}estimator={self.name!r} takes params {", ".join(allowed)}; got {", ".join(extra)}')
    if names:
      missing = [n for n in names if n not in params]
      if missing:
        raise ValueError(f'{where}estimator={self.name!r} needs learned {", ".join(missing)} in its params '
                         '(see qjax.init_params)')
      return {p.name: bounded(fit(params[p.name], sshape), p.lower, p.upper) for p in self.learned}
    out = {k: fit(v, sshape) for k, v in params.items() if v is not None}
    if 'zero_point' in out and 'scale' not in out:
      raise ValueError(f'{where}a zero_point needs a scale too')
    if 'scale' in out and spec.scheme == 'asymmetric' and 'zero_point' not in out:
      raise ValueError(f'{where}scheme="asymmetric" with an explicit scale needs zero_point too')
    return out

  # ---- the grid

  def grid(self, x: jax.Array, spec: QuantSpec, params: Params, *, poison: bool = False):
    """(scale, zero_point) of the integer grid: the static range in params, else calibrated on x (without
    gradient; `poison`: scale NaN for groups holding a non-finite value, see `qjax.calibration`)."""
    if 'scale' in params:
      return params['scale'], params.get('zero_point')
    return calibration.calibrate(jax.lax.stop_gradient(x), spec, poison=poison)

  def quantize_input(self, x: jax.Array, spec: QuantSpec, params: Params) -> jax.Array:
    """What is put on the grid by `quantize` (x itself; PACT: x clipped to its learned range)."""
    return x

  # ---- the forward and its custom_vjp

  def fake_quant(self, x: jax.Array, spec: QuantSpec, params: Params, key: jax.Array | None) -> jax.Array:
    raise NotImplementedError(self.name)


def _names_without_int() -> tuple[str, ...]:
  return tuple(n for n in registry.names() if not registry.get(n).needs_int)


# ------------------------------------------------------------------------ calibrated grids (STE family)


def _calibrated_grid(method: Method, x, spec, params):
  """The grid of a method without learned parameters, for its forward: static, or calibrated and materialised."""
  if 'scale' in params:
    scale, zero_point = params['scale'], params.get('zero_point')
  else:
    scale, zero_point = calibration.calibrate(jax.lax.stop_gradient(x), spec)
    # Materialise the small calibrated scale: else XLA fuses its producer (a few selects) into the elementwise
    # pass and recomputes it for every element (~8% of per-channel fake_quant's time, docs/benchmarks.md).
    scale, zero_point = jax.lax.optimization_barrier((scale, zero_point))
  scale = jax.lax.stop_gradient(scale)
  if zero_point is not None:
    zero_point = jax.lax.stop_gradient(jnp.round(zero_point).astype(jnp.float32))
  return scale, zero_point


@dataclasses.dataclass(frozen=True)
class Calibrated(Method):
  """Fake quant on the calibrated (or static) grid; the estimator `fn(x, scale, zero_point, noise, spec)`
  decides the backward only (STE, clipped STE, EWGS)."""
  fn: Callable[..., jax.Array] | None = None

  def fake_quant(self, x, spec, params, key):
    scale, zero_point = _calibrated_grid(self, x, spec, params)
    return self.fn(x, scale, zero_point, formats.uniform_noise(key, x.shape, spec.rounding), spec)


STE = Calibrated('ste', fn=lambda x, s, z, n, spec: estimators.ste(x, s, z, n, fmt=spec.fmt))
CLIPPED_STE = Calibrated('clipped_ste', fn=lambda x, s, z, n, spec: estimators.clipped_ste(x, s, z, n, fmt=spec.fmt))
EWGS = Calibrated('ewgs', needs_int=True,
                  fn=lambda x, s, z, n, spec: estimators.ewgs(x, s, z, n, fmt=spec.fmt, delta=spec.ewgs_delta))


# ---------------------------------------------------------------------------------------- LSQ and LSQ+


def _lsq_init(x, spec):
  return estimators.lsq_init(x, gran.scale_shape(x.shape, spec), spec.fmt)


@dataclasses.dataclass(frozen=True)
class LSQ(Method):
  """Learned step size (Esser et al., 2020): params {'scale'}, the step, positive (see `estimators.lsq`)."""
  learned: tuple[Learned, ...] = (Learned('scale', _lsq_init, lower=estimators.STEP_FLOOR),)
  needs_int: bool = True
  schemes: tuple[str, ...] = ('symmetric',)

  def grid(self, x, spec, params, *, poison=False):
    return params['scale'], None

  def fake_quant(self, x, spec, params, key):
    return estimators.lsq(x, params['scale'], formats.uniform_noise(key, x.shape, spec.rounding), fmt=spec.fmt)


def _lsq_plus_scale(x, spec):
  return calibration.calibrate(x, spec)[0]


def _lsq_plus_offset(x, spec):
  scale, zero_point = calibration.calibrate(x, spec)
  return -zero_point.astype(jnp.float32) * scale


@dataclasses.dataclass(frozen=True)
class LSQPlus(Method):
  """LSQ+ (Bhalgat et al., 2020): params {'scale', 'offset'}; x_hat = clip(round((x - b) / s)) s + b. Its
  float offset is no integer zero point (native=False); `grid` gives zero_point = -b / s (quantize rounds it)."""
  learned: tuple[Learned, ...] = (Learned('scale', _lsq_plus_scale, lower=estimators.STEP_FLOOR),
                                  Learned('offset', _lsq_plus_offset))
  needs_int: bool = True
  schemes: tuple[str, ...] = ('asymmetric',)
  native: bool = False

  def grid(self, x, spec, params, *, poison=False):
    return params['scale'], -params['offset'] / params['scale']

  def fake_quant(self, x, spec, params, key):
    noise = formats.uniform_noise(key, x.shape, spec.rounding)
    return estimators.lsq_plus(x, params['scale'], params['offset'], noise, fmt=spec.fmt)


# ------------------------------------------------------------------------------------------------- PACT


def _pact_init(x, spec):
  return calibration.calibrate(x, spec)[0] * spec.fmt.qmax


@dataclasses.dataclass(frozen=True)
class PACT(Method):
  """PACT (Choi et al., 2018): params {'alpha'}, the learned clip, positive; grid scale = alpha / qmax."""
  learned: tuple[Learned, ...] = (Learned('alpha', _pact_init, lower=estimators.STEP_FLOOR),)
  needs_int: bool = True
  schemes: tuple[str, ...] = ('symmetric',)
  clips_input: bool = True

  def grid(self, x, spec, params, *, poison=False):
    return params['alpha'] * (1.0 / spec.fmt.qmax), None

  def quantize_input(self, x, spec, params):
    a = gran.expand(params['alpha'], x.shape)
    return jnp.clip(x, -a if spec.fmt.qmin < 0 else 0.0, a).astype(x.dtype)

  def fake_quant(self, x, spec, params, key):
    return estimators.pact(x, params['alpha'], formats.uniform_noise(key, x.shape, spec.rounding), fmt=spec.fmt)


LSQ_METHOD = LSQ('lsq')
LSQ_PLUS = LSQPlus('lsq_plus')
PACT_METHOD = PACT('pact')
