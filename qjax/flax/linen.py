"""Linen: quantize an unmodified Linen model by rules, and convert it for int8 serving.

    qmodel = qjax.flax.quantize_linen(model, rules)
    variables = qmodel.init(key, x)                      # params + 'quant_stats'
    y, upd = qmodel.apply(variables, x, mutable=['quant_stats'])   # training: statistics update
    y = qmodel.apply(variables, x)                        # evaluation: statistics frozen
    serving = qjax.flax.convert_linen(qmodel, variables, x)  # int8 (or packed int4) kernels, no float kernels
    y = qmodel.serving().apply(serving, x)                # real int8 matmuls; equals the QAT eval output
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from flax.core import scope as scope_mod

from qjax.flax import intercept
from qjax.flax.rules import RuleSet
from qjax.spec import check_choice


class QuantizedLinen:
  """A Linen model whose ops are quantized by rules. `init`/`apply` mirror the model's own."""

  def __init__(self, model: nn.Module, rules, *, session: intercept.Session | None = None):
    self.model = model
    self.rules = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    self.session = session or intercept.Session(self.rules, 'linen')

  def _interceptor(self, next_fun, args, kwargs, context):
    module = context.module
    path = '/'.join(str(p) for p in module.path)
    if callable(getattr(module, 'promote_dtype', None)):
      fn = intercept.serving_promote_dtype if self.session.mode == 'serve' else module.promote_dtype
      object.__setattr__(module, 'promote_dtype', intercept.tracking_promote_dtype(fn))
    with intercept.frame(module, path, self.session):
      return next_fun(*args, **kwargs)

  @contextlib.contextmanager
  def _context(self):
    with contextlib.ExitStack() as stack:
      stack.enter_context(intercept.patched())
      stack.enter_context(nn.intercept_methods(self._interceptor))
      if self.session.mode == 'serve':
        stack.enter_context(_serving_params())
      yield

  def prepare(self, method: str, state, *args, **kwargs) -> None:
    """Runs the probe the rules need (first_last_8bit, act_signedness='auto'; see qjax.flax.rules) now, with
    model.init(state=rngs, ...) or model.apply(state=variables, ...) (`method` 'init' | 'apply'). init and
    apply probe by themselves when needed; call this first when they run inside jax.jit, since
    act_signedness='auto' measures activations and needs concrete inputs (and pass the pretrained variables
    with 'apply' when fine-tuning, so that they are measured on the model that will be quantized)."""
    check_choice('method', method, ('init', 'apply'))
    self._probe(getattr(self.model, method), state, args, kwargs)

  def _probe(self, fn, state, args, kwargs) -> None:
    """When the rules need it (RuleSet.needs_probe: first_last_8bit, act_signedness='auto'), runs
    fn(state, *args, **kwargs) once in the session's probe mode (Session.probe): float ops, no state kept."""
    if not self.rules.needs_probe:
      return

    def run(state, *args, **kwargs):
      fn(state, *args, **kwargs)
      return dict(self.session.probe_mins)

    def go(abstract):
      with self._context():
        return intercept.jit_call(run, state, args, kwargs, abstract=abstract)
    self.session.probe(go)

  def init(self, rngs, *args, **kwargs):
    self._probe(self.model.init, rngs, args, kwargs)
    with self._context():
      out = self.model.init(rngs, *args, **kwargs)
    self.rules.check_first_run()
    return out

  def apply(self, variables, *args, **kwargs):
    self._probe(self.model.apply, variables, args, kwargs)
    with self._context():
      out = self.model.apply(variables, *args, **kwargs)
    self.rules.check_first_run()
    return out

  def serving(self) -> QuantizedLinen:
    """The same model and rules, reading ServingWeights (see convert_linen)."""
    s = intercept.Session(self.rules, 'linen')
    s.mode = 'serve'
    return QuantizedLinen(self.model, self.rules, session=s)

  def report(self) -> str:
    return self.rules.report()


def quantize_linen(model: nn.Module, rules) -> QuantizedLinen:
  """Quantizes an unmodified Linen model by an ordered list of QuantRules (first match wins)."""
  return QuantizedLinen(model, rules)


_orig_param = scope_mod.Scope.param


@contextlib.contextmanager
def _serving_params():
  # Linen checks a stored param's shape against its initializer; a ServingWeight is not the float kernel's
  # shape (packed int4 is half its size), so reading one skips that check.
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if self.has_variable('params', name):
      v = self.get_variable('params', name)
      if isinstance(v, intercept.ServingWeight):
        self.reserve(name, 'params')
        return nn.meta.unbox(v) if unbox else v  # its arrays may carry partitioning boxes
    return _orig_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
  scope_mod.Scope.param = param
  try:
    yield
  finally:
    scope_mod.Scope.param = _orig_param


def convert_linen(qmodel: QuantizedLinen, variables: dict[str, Any], *args, int4_pack: bool = True,
                  **kwargs) -> dict[str, Any]:
  """PTQ conversion: a serving variable tree in which every quantized weight is a ServingWeight.

  Runs the model (jit-compiled, in evaluation mode) on sample inputs to learn which params are weights of
  quantized ops, with which spec and quantizer state, then quantizes them with the same calibration (or learned
  step) the QAT forward uses, so the serving forward equals the QAT evaluation forward bit for bit. 4-bit (or
  narrower) integer weights are packed two per byte when `int4_pack`. Statistics collections are kept; learned
  step params of weights are dropped.
  """
  session = intercept.Session(qmodel.rules, 'linen')
  session.mode = 'record'
  rec = QuantizedLinen(qmodel.model, qmodel.rules, session=session)

  def run(v, *args, **kwargs):  # Returns the weights' quantizer state (learned steps, delayed scales) as values.
    session.records = []
    rec.apply(v, *args, **kwargs)
    return [r.state if r.weight_name is not None else {} for r in session.records]
  states = intercept.jit_call(run, variables, args, kwargs)
  params = jax.tree.map(lambda x: x, dict(variables['params']))  # shallow-copied nested dicts
  params = _unfreeze(params)
  for r, state in zip(session.records, states, strict=True):
    if r.weight_name is None:
      continue
    module, name, spec, prefix = r.module, r.weight_name, r.spec, r.prefix
    scope_path = module.path
    node = params
    for p in scope_path:
      node = node[p]
    w = node[name]
    node[name] = _serving_weight(w, spec, state, int4_pack)
    for learned in spec.learned:  # the weight's learned step is folded into the ServingWeight
      node.pop(f'{prefix}_{learned}', None)
  out = dict(variables)
  out['params'] = params
  return out


def _unfreeze(tree):
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def _serving_weight(w, spec, state, int4_pack, names=None):
  """The ServingWeight of float weight w. Its sharding names come from a Linen partitioning box on w (then its
  arrays get boxes too: qvalue w's names, scale and zero_point None on reduced axes) or from `names` (NNX)."""
  from qjax import formats  # noqa: PLC0415
  box = w if isinstance(w, nn.meta.Partitioned) else None
  w = nn.meta.unbox(w)
  fmt = spec.fmt
  pack = (int4_pack and isinstance(fmt, formats.IntFormat) and fmt.signed and fmt.bits <= 4 and w.ndim >= 1)
  q = _quantize_weight(w, dict(state), spec)  # one compiled program, not one per op
  names = box.names if box is not None else names
  names = tuple(names) if names and len(names) == w.ndim else None
  sw = intercept.ServingWeight.from_qarray(q, pack, names)
  qv, scale, zp = sw.qvalue, sw.scale, sw.zero_point
  if box is not None and names is not None:
    sn = intercept.scale_names(names, w.shape, scale.shape)
    sw = dataclasses.replace(sw, qvalue=box.replace(value=qv), scale=box.replace(value=scale, names=sn),
                             zero_point=None if zp is None else box.replace(value=zp, names=sn))
  return sw


@functools.partial(jax.jit, static_argnums=(2,))
def _quantize_weight(w, state, spec):
  """The weight's QArray on the grid the QAT forward used: its method's (learned step, PACT clip, static range,
  delayed scale), or the spec's calibration when the op kept no state."""
  from qjax import quantizers  # noqa: PLC0415
  return quantizers.quantize(w, spec, state or None)
