"""Methods applied in order to one layer: `run(layer, [('smoothquant', {...}), ('gptq', {...})])`.

The order the papers compose them in: rotation, then SmoothQuant or AWQ scaling, then a rounding method (GPTQ,
AdaRound, or AWQ's own), then bias correction. A layer that no rounding method reached is rounded to nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qjax.ptq import layer as L
from qjax.ptq import registry


def check_order(names: Sequence[str]) -> None:
  """ValueError unless the methods come in an order that composes (the module docstring): a rotation first, a
  scaling (SmoothQuant, AWQ) before any method that sets the integer weights, at most one rounding method besides
  AWQ (whose scaling a later GPTQ or AdaRound keeps), and bias correction after every
  rounding method, whose kernel its bias must match (Nagel et al. 2019: b' = b + E[x] (W - W_hat) for the W_hat
  served; computed for RTN's W_hat and served with GPTQ's, it doubled the output shift instead of removing it)."""
  for i, name in enumerate(names):
    before, m = names[:i], registry.get(name)
    if name == 'rotation' and before:
      raise ValueError(f'rotation must come first, not after {before[-1]}')
    sets_q = [b for b in before if registry.get(b).rounds or b == 'bias_correction']
    if m.changes_input and sets_q:
      raise ValueError(f'{name} changes the float kernel and its input; it must come before a rounding method or '
                       f'bias correction (here {sets_q[0]})')
    earlier = [b for b in before if registry.get(b).rounds and not registry.get(b).changes_input]
    if m.rounds and earlier:  # AWQ's rounding may be replaced: its scaling (changes_input) is what stays
      raise ValueError(f'{earlier[0]} and {name} both choose the integer weights, and {name} would silently '
                       f'replace what {earlier[0]} chose; keep one of them')
    if m.rounds and 'bias_correction' in before:
      raise ValueError(f'bias_correction must come after {name}: it corrects the bias for the kernel the '
                       'rounding method chooses')


def normalize(methods) -> list[tuple[str, dict[str, Any]]]:
  """'gptq' | ['smoothquant', 'gptq'] | [('gptq', {'damp': 0.1})] -> [(name, full params)], checked (each
  method's parameters, and their order: `check_order`)."""
  if isinstance(methods, str) or (isinstance(methods, tuple) and len(methods) == 2 and isinstance(methods[1], dict)):
    methods = [methods]
  out = []
  for m in methods:
    name, given = (m, {}) if isinstance(m, str) else m
    out.append((name, registry.params(name, given)))
  check_order([n for n, _ in out])
  return out


def run(layer: L.Layer, methods: Sequence) -> L.Layer:
  """Applies the methods to the layer in order; the result always has layer.q."""
  for name, params in normalize(methods):
    layer = registry.get(name).run(layer, **params)
  return layer if layer.q is not None else registry.get('rtn').run(layer)
