"""Methods applied in order to one layer: `run(layer, [('smoothquant', {...}), ('gptq', {...})])`.

The order the papers compose them in: rotation, then SmoothQuant or AWQ scaling, then a rounding method (GPTQ,
AdaRound, or AWQ's own), then bias correction. A layer that no rounding method reached is rounded to nearest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qjax.ptq import layer as L
from qjax.ptq import registry


def normalize(methods) -> list[tuple[str, dict[str, Any]]]:
  """'gptq' | ['smoothquant', 'gptq'] | [('gptq', {'damp': 0.1})] -> [(name, full params)], checked."""
  if isinstance(methods, str) or (isinstance(methods, tuple) and len(methods) == 2 and isinstance(methods[1], dict)):
    methods = [methods]
  out = []
  for m in methods:
    name, given = (m, {}) if isinstance(m, str) else m
    out.append((name, registry.params(name, given)))
  return out


def run(layer: L.Layer, methods: Sequence) -> L.Layer:
  """Applies the methods to the layer in order; the result always has layer.q."""
  for name, params in normalize(methods):
    layer = registry.get(name).run(layer, **params)
  return layer if layer.q is not None else registry.get('rtn').run(layer)
