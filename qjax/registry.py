"""The method registry: config names ('ste', 'lsq', 'pact', ...) -> quantizer-method objects.

A leaf module (it imports nothing from qjax), so that `qjax.spec` can check an estimator name and its method's
constraints at construction while the methods themselves live above it (`qjax.methods` registers the built-in
ones, one line each). Specs, rules and sweeps keep naming methods by string; every consumer (fake_quant,
quantize, init_params, the ops, Flax rules, metrics, serving conversion) asks this registry, and no estimator
name is spelled out anywhere else. See docs/extending.md for adding a method.
"""

from __future__ import annotations

import difflib
from typing import Any

_METHODS: dict[str, Any] = {}


def register(method) -> Any:
  """Registers `method` under `method.name` (ValueError when the name is taken); returns it."""
  name = method.name
  if name in _METHODS and _METHODS[name] is not method:
    raise ValueError(f'a quantizer method named {name!r} is already registered ({_METHODS[name]!r})')
  _METHODS[name] = method
  return method


def names() -> tuple[str, ...]:
  """The registered names, in registration order."""
  return tuple(_METHODS)


def get(name: str):
  """The method registered as `name`; ValueError naming the registered ones and the closest match."""
  try:
    return _METHODS[name]
  except (KeyError, TypeError):
    raise ValueError(f'estimator={name!r} is not one of {", ".join(_METHODS)}{near(name, _METHODS)}') from None


def near(name: Any, choices) -> str:
  """' (did you mean 'x'?)' naming the choice nearest `name`, or '' when none is near: the hint of every
  invalid-choice error in qjax."""
  close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''
