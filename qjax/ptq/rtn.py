"""Round-to-nearest: every weight on the nearest point of its calibrated grid (the PTQ baseline)."""

from qjax.ptq import layer as L
from qjax.ptq import registry


def _run(layer: L.Layer) -> L.Layer:
  return layer.replace(q=L.rtn(layer.w, layer.spec))


registry.register(registry.PTQMethod('rtn', _run, {}, rounds=True))
