"""The PTQ method registry: config names ('rtn', 'gptq', 'awq', ...) -> PTQMethod.

A method is a function over one `Layer` (qjax.ptq.layer) and its parameters, returning the updated Layer, plus
its parameter defaults (the paper's). Each method's module registers itself; `qjax/ptq/__init__.py` imports the
modules, one line each. Adding a method touches its own file and that one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from qjax import registry as qjax_registry

_METHODS: dict[str, PTQMethod] = {}


@dataclasses.dataclass(frozen=True)
class PTQMethod:
  """name: the config name; run(layer, **params) -> Layer; defaults: every parameter with its default;
  changes_input: it adds an online input transform (rotation or per-channel scale), so the statistics later
  methods see are of the transformed input; rounds: it decides the integer weights (layer.q); check(params)
  raises ValueError for a parameter value the method cannot run with (no data needed), so that a run can refuse
  it before it trains or calibrates anything."""
  name: str
  run: Callable[..., Any]
  defaults: Mapping[str, Any]
  changes_input: bool = False
  rounds: bool = False
  check: Callable[[Mapping[str, Any]], None] | None = None


def register(method: PTQMethod) -> PTQMethod:
  if method.name in _METHODS and _METHODS[method.name] is not method:
    raise ValueError(f'a PTQ method named {method.name!r} is already registered')
  _METHODS[method.name] = method
  return method


def names() -> tuple[str, ...]:
  return tuple(_METHODS)


near = qjax_registry.near  # ' (did you mean 'x'?)' naming the choice nearest `name`, or ''


def get(name: str) -> PTQMethod:
  """The method registered as `name`; ValueError naming the registered ones and the closest match."""
  try:
    return _METHODS[name]
  except (KeyError, TypeError):
    raise ValueError(f'PTQ method {name!r} is not one of {", ".join(_METHODS)}{near(name, _METHODS)}') from None


def params(name: str, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The method's defaults overridden by `given`; ValueError for a parameter the method does not have, or (its
  `check`) a value it cannot run with, as '<method>.<parameter> ...'."""
  m = get(name)
  given = dict(given or {})
  unknown = sorted(set(given) - set(m.defaults))
  if unknown:
    raise ValueError(f'PTQ method {name!r} has no parameter {unknown[0]!r}{near(unknown[0], m.defaults)}; its '
                     f'parameters: {", ".join(m.defaults) or "none"}')
  out = {**m.defaults, **given}
  if m.check is not None:
    m.check(out)
  return out


def at_least(name: str, key: str, value, low) -> None:
  """ValueError '<name>.<key> must be >= low' unless it is."""
  if not value >= low:
    raise ValueError(f'{name}.{key} must be >= {low}, got {value!r}')


def within(name: str, key: str, value, low, high) -> None:
  """ValueError '<name>.<key> must be in [low, high]' unless it is."""
  if not low <= value <= high:
    raise ValueError(f'{name}.{key} must be in [{low}, {high}], got {value!r}')
