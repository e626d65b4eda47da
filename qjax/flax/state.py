"""Backends: where a quantized model's params are found and its quantizer state lives (Linen or NNX).

Both give the Session (qjax.flax.session) the same interface:
  lookup(fr, v)         (param path, shape) when v is, by identity, a param of the model (or the float read of a
                        ServingWeight), else None;
  refresh(fr)           rebuilds the param index (params created since, during init); True when it changed;
  param_value(fr, path) the param stored at path (a float array or a ServingWeight);
  param(fr, name, init, origin, shape)   a learned quantizer param (LSQ step, PACT clip);
  stat(fr, name, init)  a statistic (EMA range, amax history), with get/set;
  training(fr)          whether statistics update; rng(fr, rule) the 'quant' PRNG key; training_rng(fr, rule)
                        that key while training, else None (for methods random in training only, QDrop).

Linen state goes through Module.has_variable / get_variable / put_variable, which work from any method,
including plain methods of setup()-style modules (Module.param / Module.variable only work in setup or compact
methods). Learned params are created only where 'params' is mutable (init, or `add_quant_vars` for pretrained
params); statistics only where 'qjax_stats' is. NNX state is nnx.Param / QuantStat attributes 'qjax_<name>'.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from flax.core import meta

from qjax.flax import hooks, provenance, serving
from qjax.flax.serving import scale_names

# The Linen collection of quantizer statistics. Not 'quant_stats': Qwix registers that name with nnx.bridge for its
# own variable type (overwrite=True), so in a process that imports both, ToNNX would hand qjax's statistics to
# Qwix's class (and back).
STATS = 'qjax_stats'


@dataclasses.dataclass
class Var:
  get: Any
  set: Any


def _key(v) -> int:
  """Identity of a param value; a ServingWeight is known by its qvalue array, since NNX copies the container
  on every read (Variable.get_value) and Linen's unboxing rebuilds it, while the arrays stay the same."""
  return id(v.qvalue) if serving.is_serving(v) else id(v)


class _Index:
  """id(value) -> (path, shape) and path -> value of params (ServingWeights as leaves); a module's own params,
  backed by the index of every param of the model, which the outermost frame builds once per run."""

  def __init__(self, items, parent: _Index | None = None):
    self.by_id, self.by_path, self.parent = {}, {}, parent
    for path, v in items:
      self.by_path[path] = v
      hit = (path, tuple(getattr(v, 'shape', ())))
      self.by_id.setdefault(_key(v), hit)
      if not serving.is_serving(v):  # under jax.grad the walk meets the param's primal
        self.by_id.setdefault(id(provenance.unwrap(v)), hit)

  def by_identity(self, k):
    hit = self.by_id.get(k)
    return hit if hit is not None or self.parent is None else self.parent.by_identity(k)

  def at(self, path):
    if path in self.by_path:
      return self.by_path[path]
    return None if self.parent is None else self.parent.at(path)

  def __len__(self) -> int:
    return len(self.by_path) + (0 if self.parent is None else len(self.parent))


class _Backend:
  def _root(self, fr):
    """The outermost running frame of this backend (a Linen model inside nnx.bridge.ToNNX has its own)."""
    return next((f for f in hooks.stack() if f.state is fr.state), fr)

  def lookup(self, fr, v):
    read = fr.session.reads.get(id(v))
    if read is not None and read[0] is v:  # a quantized read of a tied weight (Session.quantized_read)
      return read[1], tuple(v.shape), True
    hit = serving.served(v)
    if hit is not None and hit[1] is not None:
      return hit[1], hit[0].shape
    return self._index(fr).by_identity(_key(hit[0]) if hit is not None else id(v))

  def param_value(self, fr, path):
    if self._index(fr).at(path) is None:
      self.refresh(fr)
    return self._index(fr).at(path)

  def _index(self, fr) -> _Index:
    if fr.param_index is None:
      root = self._root(fr)
      if root is fr:
        fr.param_index = _Index(list(self._own(fr)) + list(self._all(fr)))
      else:
        fr.param_index = _Index(self._own(fr), self._index(root))
    return fr.param_index

  def refresh(self, fr) -> bool:
    """Rebuilds the indexes of fr and of the outermost frame (params created since, in init); True when they
    changed. Only where params are being created (Linen init); NNX params exist before the model runs."""
    if not self._may_grow(fr):
      return False
    old = None if fr.param_index is None else len(fr.param_index)
    root = self._root(fr)
    root.param_index = fr.param_index = None
    return old != len(self._index(fr))


def _join(*parts) -> str:
  return '/'.join(str(p) for p in parts if str(p))


class LinenBackend(_Backend):
  name = 'linen'

  def _may_grow(self, fr) -> bool:
    return fr.module.scope is not None and fr.module.is_mutable_collection('params')

  def _own(self, fr):
    if fr.module.scope is None or fr.nested:  # a nested apply's params are the caller's arrays, not params
      return []
    p = fr.module.variables.get('params', {})
    return [(_join(fr.path, k), meta.unbox(v)) for k, v in p.items() if not hasattr(v, 'items')]

  def _all(self, root):
    out = []

    def walk(tree, prefix):
      for k, v in tree.items():
        if hasattr(v, 'items') and not serving.is_serving(v):
          walk(v, _join(prefix, k))
        else:
          out.append((_join(prefix, k), meta.unbox(v)))
    if root.module.scope is not None:
      walk(root.module.variables.get('params', {}), root.path)
    return out

  def param(self, fr, name, init, origin, x_shape):
    m = fr.module
    if m.has_variable('params', name):
      return meta.unbox(m.get_variable('params', name))
    if not m.is_mutable_collection('params'):
      raise ValueError(f'{fr.path or "<root>"}: the quantizer param {name!r} is missing from the params; for '
                       'pretrained (float) params call qjax.flax.add_quant_vars(qmodel, variables, *inputs) first')
    v = init()
    box = self._box(fr, origin, x_shape)
    m.put_variable('params', name, v if box is None else box.replace(value=v, names=scale_names(
        box.names, x_shape, v.shape)))
    return v

  def _box(self, fr, origin, x_shape):
    """The weight's partitioning box (nn.Partitioned / nn.LogicallyPartitioned), if it is the module's own
    param used as stored."""
    if origin is None or origin.steps or fr.module.scope is None:
      return None
    name = origin.param.rsplit('/', 1)[-1]
    box = fr.module.variables.get('params', {}).get(name)
    if not isinstance(box, meta.Partitioned) or len(box.names) != len(x_shape):
      return None
    return box

  def stat(self, fr, name, init) -> Var:
    m = fr.module
    if not m.has_variable(STATS, name):
      if not m.is_mutable_collection(STATS) and m.is_initializing():
        raise ValueError(f'{fr.path or "<root>"}: the quantizer statistic {name!r} cannot be created: '
                         f"'{STATS}' is not mutable here while initialising, which happens inside a Linen lifted "
                         f"transform (nn.scan, nn.vmap) whose variable_axes lack '{STATS}'; add it, e.g. "
                         f"variable_axes={{'params': 0, '{STATS}': 0}}")
      if not m.is_mutable_collection(STATS):
        raise ValueError(f'{fr.path or "<root>"}: the quantizer statistic {name!r} is missing from '
                         f"'{STATS}'; create it with init, or for pretrained params with "
                         'qjax.flax.add_quant_vars(qmodel, variables, *inputs)')
      m.put_variable(STATS, name, init())
    mutable = m.is_mutable_collection(STATS)
    return Var(lambda: m.get_variable(STATS, name),
               lambda val: m.put_variable(STATS, name, val) if mutable else None)

  def training(self, fr) -> bool:
    return fr.module.is_mutable_collection(STATS)

  def rng(self, fr, rule):
    if not fr.module.has_rng('quant'):
      raise ValueError(f'rule {rule.label!r} at {fr.path or "<root>"}: stochastic rounding needs a "quant" PRNG '
                       "stream: pass rngs={'quant': key} to apply")
    return fr.module.make_rng('quant')

  def training_rng(self, fr, rule):
    # Linen has no train flag of its own: a 'quant' stream passed to apply is the sign of a training step.
    return fr.module.make_rng('quant') if fr.module.has_rng('quant') else None


class NnxBackend(_Backend):
  name = 'nnx'

  def _may_grow(self, fr) -> bool:
    return False

  def _own(self, fr):
    return [(_join(fr.path, k), v.get_value()) for k, v in vars(fr.module).items() if isinstance(v, nnx.Param)]

  def _all(self, root):
    out = []
    for path, node in nnx.iter_graph(root.module):
      if isinstance(node, nnx.Param) and not str(path[-1]).startswith('qjax_'):
        out.append((_join(root.path, *path), node.get_value()))
    return out

  def param(self, fr, name, init, origin, x_shape):
    attr = f'qjax_{name}'
    var = getattr(fr.module, attr, None)
    if var is None:
      require_eager(fr, attr)
      v = init()
      var = nnx.Param(v, **self._sharding(fr, origin, x_shape, v.shape))
      setattr(fr.module, attr, var)
    return var.get_value()

  def _sharding(self, fr, origin, x_shape, shape) -> dict:
    """Metadata of a weight quantizer's Param: the weight's out_sharding with None on reduced axes."""
    if origin is None or origin.steps:
      return {}
    var = vars(fr.module).get(origin.param.rsplit('/', 1)[-1])
    if var is None or not hasattr(var, 'get_metadata'):
      return {}
    md = var.get_metadata()
    names = md.get('out_sharding')
    if not names or len(names) != len(x_shape):
      return {}
    out = {'out_sharding': scale_names(names, x_shape, shape)}
    out.update({k: md[k] for k in ('mesh', 'sharding_rules') if md.get(k) is not None})
    return out

  def stat(self, fr, name, init) -> Var:
    attr = f'qjax_{name}'
    var = getattr(fr.module, attr, None)
    if var is None:
      require_eager(fr, attr)
      var = QuantStat(init())
      setattr(fr.module, attr, var)
    return Var(var.get_value, var.set_value)

  def training(self, fr) -> bool:
    return not getattr(fr.module, 'use_running_average', False)

  def rng(self, fr, rule):
    rngs = getattr(fr.module, 'qjax_rngs', None)
    if rngs is None:
      raise ValueError(f'rule {rule.label!r} at {fr.path or "<root>"}: stochastic rounding needs '
                       'quantize_nnx(..., seed=...)')
    return rngs.quant()

  def training_rng(self, fr, rule):
    if not self.training(fr):
      return None
    if getattr(fr.module, 'qjax_rngs', None) is None:
      raise ValueError(f'rule {rule.label!r} at {fr.path or "<root>"}: a method that is random in training '
                       '(QDrop) needs quantize_nnx(..., seed=...) to train; model.eval() runs it without')
    return fr.module.qjax_rngs.quant()


def require_eager(fr, attr):
  if fr.session.creating:
    return
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(nnx.state(fr.module))):
    raise ValueError(f'{fr.path or "<root>"}: quantizer state {attr!r} does not exist yet and cannot be created '
                     'inside a jax transform; call qjax.flax.quantize_nnx(model, rules, *sample_inputs) (it runs '
                     'the model once eagerly to create the state)')


def _quant_stat_type():

  class QuantStat(nnx.Variable):
    """Range statistics of a quantizer (EMA of activation ranges, amax histories): not trained by optax."""
  return QuantStat


QuantStat = _quant_stat_type()


def _register():
  # nnx.bridge converts variables to and from Linen collections by this name (ToNNX-wrapped Linen models).
  nnx.register_variable_name(STATS, QuantStat, overwrite=True)


_register()
