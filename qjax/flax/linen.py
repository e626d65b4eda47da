"""Linen: quantize an unmodified Linen model by rules, and convert it for int8 serving.

    qmodel = qjax.flax.quantize_linen(model, rules)
    variables = qmodel.init(key, x)                      # params + 'qjax_stats'
    variables = qjax.flax.add_quant_vars(qmodel, pretrained, x)  # or: float params of a checkpoint + quantizer vars
    y, upd = qmodel.apply(variables, x, mutable=['qjax_stats'])   # training: statistics update
    y = qmodel.apply(variables, x)                        # evaluation: statistics frozen
    served = qjax.flax.convert_linen(qmodel, variables, x)   # int8 (or packed int4) kernels, no float kernels
    y = served(x)                                         # real int8 matmuls; equals the QAT eval output
    served.variables, served.weights, served.report()     # the serving tree; {path: ServingWeight}; sizes
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
from flax.core import scope as scope_mod

from qjax import formats
from qjax.flax import hooks, intercept, provenance, serving
from qjax.flax.rules import RuleSet
from qjax.flax.session import Session, call_signature, compiled_records
from qjax.flax.state import STATS, LinenBackend
from qjax.spec import check_choice


class QuantizedLinen:
  """A Linen model whose ops are quantized by rules. `init`/`apply` mirror the model's own."""

  def __init__(self, model: nn.Module, rules, *, session: Session | None = None):
    self.model = model
    self.rules = rules if isinstance(rules, RuleSet) else RuleSet(rules)
    self.session = session or Session(self.rules, LinenBackend())

  def _interceptor(self, next_fun, args, kwargs, context):
    if context.method_name == 'setup':
      return next_fun(*args, **kwargs)
    with linen_frame(context.module, context.method_name, '', self.session, self.session.backend):
      return next_fun(*args, **kwargs)

  @contextlib.contextmanager
  def _context(self):
    with contextlib.ExitStack() as stack:
      stack.enter_context(hooks.patched())
      stack.enter_context(nn.intercept_methods(self._interceptor))
      if self.session.serving:
        stack.enter_context(_serving_params())
      else:
        stack.enter_context(quantized_reads(self.session))
      try:
        yield
      finally:
        if not hooks.stack():
          serving.clear()
          self.session.end_call()

  def _run(self, fn, state, args, kwargs):
    """fn(state, *args, **kwargs) under the hooks. When the variables are concrete (an eager call, or variables
    closed over by the caller's jax.jit), the call is first traced abstractly with them as traced inputs, so
    that operands can be traced back to their params (concrete values carry no provenance)."""
    if not any(provenance.has_trace(leaf) for leaf in jax.tree.leaves(state)):
      def go():
        with self._context():
          intercept.jit_call(fn, state, args, kwargs, abstract=True)
      self.session.trace_origins(go, call_signature(fn.__name__, self.session.phase, state, args, kwargs))
    with self._context():
      return fn(state, *args, **kwargs)

  def prepare(self, method: str, state, *args, **kwargs) -> None:
    """Runs the probe the rules need (first_last_8bit, act_signedness='auto'; see qjax.flax.rules) now, with
    model.init(state=rngs, ...) or model.apply(state=variables, ...) (`method` 'init' | 'apply'). init and
    apply probe by themselves when needed; call this first when they run inside jax.jit, since
    act_signedness='auto' measures activations and needs concrete inputs (and pass the pretrained variables
    with 'apply' when fine-tuning, so that they are measured on the model that will be quantized)."""
    check_choice('method', method, ('init', 'apply'))
    self._probe(getattr(self.model, method), state, args, kwargs)

  def reprobe(self, method: str, state, *args, **kwargs) -> None:
    """`prepare` again after the model changed (new weights, PTQ's online input ops): the activations' minima
    and the ops' order are measured anew on concrete inputs (RuleSet.forget_probe)."""
    self.rules.forget_probe()
    self.prepare(method, state, *args, **kwargs)

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
    out = self._run(self.model.init, rngs, args, kwargs)
    self.rules.check_first_run()
    return out

  def apply(self, variables, *args, **kwargs):
    if isinstance(variables, serving.Served):  # what convert_linen returns
      variables = variables.variables
    self._probe(self.model.apply, variables, args, kwargs)
    out = self._run(self.model.apply, variables, args, kwargs)
    self.rules.check_first_run()
    return out

  def serving(self) -> QuantizedLinen:
    """The same model and rules, reading ServingWeights (see convert_linen)."""
    s = Session(self.rules, LinenBackend())
    s.phase = 'serve'
    return QuantizedLinen(self.model, self.rules, session=s)

  def report(self) -> str:
    return self.rules.report()

  def records(self, variables, *args, compiled: bool = False, **kwargs) -> list:
    """Runs apply(variables, *args, **kwargs) in record mode and returns, per forward operand of each quantized
    op, a session.Record (module path, weight param path or None, resolved spec, quantizer state, operand).
    compiled=True runs it as one jitted program (`session.compiled_records`; kwargs are static) instead of op by
    op; inside a caller's jax.jit either way is compiled and the records' arrays are the trace's values."""
    if compiled:
      return compiled_records(lambda v, *a: self.records(v, *a, **kwargs), variables, *args)
    s = Session(self.rules, LinenBackend())
    s.phase = 'record'
    QuantizedLinen(self.model, self.rules, session=s).apply(variables, *args, **kwargs)
    return s.records


@contextlib.contextmanager
def linen_frame(module: nn.Module, method: str, prefix: str, session: Session, backend):
  """The interception frame of a running Linen method (path = `prefix` + the module's path).

  A module run by a nested `apply` from inside the model (Hugging Face's tied LM heads call
  `self.lm_head.apply({'params': {'kernel': wte.T}}, x)`) has a root scope of its own, whose variables are the
  caller's arrays and whose collections are not mutable. Its frame is hosted by the innermost enclosing module
  of the model: the path reads `<host path>/<nested module name>[/<its path>]`, its quantizer state lives in
  the host's variables under the prefix '<nested name>_' ('lm_head_dot_general0_rhs_scale'), and its own
  params are not taken for params of the model (its kernel is traced back to the model's param it was made
  from, `transformer/wte/embedding`)."""
  scope = module.scope
  root = scope.root if scope is not None else None
  mine = [f for f in hooks.stack() if f.state is backend]
  rel = None
  if mine and root is not None and root is not mine[0].scope_root:
    same = next((f for f in mine if f.scope_root is root and f.nested), None)
    if same is not None:
      rel = '/'.join([same.nested.split('/')[0], *(str(p) for p in module.path)])
    elif not module.path:  # a new root scope at path (): a nested apply (lifted transforms keep their paths)
      rel = str(module.name or 'apply')
  if rel is None:
    path = '/'.join(str(p) for p in (prefix, *module.path) if str(p))
    with hooks.frame(module, path, session, method, backend) as fr:
      fr.scope_root = root
      yield
    return
  host = next(f for f in reversed(mine) if not f.nested)
  path = '/'.join(p for p in (host.path, rel) if p)
  tag = rel.replace('/', '_') + ('' if method == '__call__' else f'_{method}')
  with hooks.frame(host.module, path, session, tag, backend) as fr:
    fr.scope_root, fr.nested = root, rel
    yield


def quantize_linen(model: nn.Module, rules) -> QuantizedLinen:
  """Quantizes an unmodified Linen model by an ordered list of QuantRules (first match wins)."""
  return QuantizedLinen(model, rules)


_orig_param = scope_mod.Scope.param


@contextlib.contextmanager
def _serving_params(prefix: str = ''):
  # A ServingWeight param reads as its dequantized float (serving.read), which the hooks recognise as that
  # weight; Linen's shape check against the initializer is skipped for it.
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if self.has_variable('params', name):
      v = self.get_variable('params', name)
      if isinstance(v, serving.ServingWeight):
        self.reserve(name, 'params')
        path = '/'.join(str(p) for p in (prefix, *self.path, name) if str(p))  # prefix: a ToNNX's NNX path
        return serving.read(nn.meta.unbox(v), path)  # its arrays may carry partitioning boxes
    return _orig_param(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
  scope_mod.Scope.param = param
  try:
    yield
  finally:
    scope_mod.Scope.param = _orig_param


@contextlib.contextmanager
def quantized_reads(session: Session, prefix: str = ''):
  """While a quantized Linen model runs in QAT, a param that is a weight of a quantized op reads as that op
  quantizes it (Session.quantized_read: tied weights are one quantized weight, as served)."""
  prev = scope_mod.Scope.param

  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    v = prev(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    if not session.weight_uses:
      return v
    root = self.root

    def learned(host, name):
      node = root.variables().get('params', {})
      for k in host:
        node = node.get(k, {}) if hasattr(node, 'get') else {}
      val = node.get(name) if hasattr(node, 'get') else None
      return None if val is None else nn.meta.unbox(val)
    out = session.quantized_read('/'.join(str(p) for p in (prefix, *self.path, name) if str(p)), nn.meta.unbox(v),
                                 learned)
    return v if out is None else out
  scope_mod.Scope.param = param
  try:
    yield
  finally:
    scope_mod.Scope.param = prev


def convert_linen(qmodel: QuantizedLinen, variables: dict[str, Any], *args, int4_pack: bool = True,
                  **kwargs) -> serving.Served:
  """PTQ conversion: a serving.Served (`served(x)` serves, `served.report()`, `served.weights`) whose variables
  are a serving variable tree in which every quantized weight is a ServingWeight; it is that tree too
  (`served['params']`, `qmodel.serving().apply(served, x)`). convert_nnx returns the same kind of result.

  Runs the model (jit-compiled, in evaluation mode) on sample inputs to learn which params are weights of
  quantized ops (by provenance: a param, or a transpose / reshape / cast of one), with which spec and quantizer
  state; quantizes each weight operand as the QAT forward does and stores it in the param's own layout
  (a kernel stored (out, in) and used as `kernel.T` keeps its (out, in) layout, its scale per output row), so
  the serving forward equals the QAT evaluation forward bit for bit. A param used by several quantized ops
  (tied embeddings) is stored once (serving.merge_uses). 4-bit (or narrower) integer weights are packed two per
  byte when `int4_pack`. Statistics collections are kept; learned step params of weights are dropped.
  """
  meta, problems = [], {}

  def run(v, *args, **kwargs):
    records = [_from_variables(r, v) for r in qmodel.records(v, *args, **kwargs)]
    meta[:] = records
    return serving.quantize_uses(records, problems)
  qarrays = intercept.jit_call(run, variables, args, kwargs)
  weights = serving.merge_uses(meta, qarrays, problems)
  params = _unfreeze(variables['params'])
  for path, (q, uses) in weights.items():
    *parents, name = path.split('/')
    node = params
    for p in parents:
      node = node[p]
    node[name] = _serving_weight(node[name], q, uses[0].spec, int4_pack)
    for r in uses:  # a weight's learned step is folded into the ServingWeight
      mnode = params
      for p in r.module.path:
        mnode = mnode.get(p, {})
      for learned in r.spec.learned:
        mnode.pop(f'{r.prefix}_{learned}', None)
  out = dict(variables)
  out['params'] = params
  return serving.Served('linen', qmodel.serving(), out, tuple(weights))


def _from_variables(r, variables):
  """A weight record whose operand and learned quantizer params are taken from the variables (the model's shape
  ops replayed on the param: the same values), not from the op's trace: inside a lifted transform (nn.remat,
  nn.jit) the op's own values belong to an inner trace and cannot leave it."""
  if r.weight_name is None or r.origin is None:
    return r

  def at(path):
    node = variables.get('params', {})
    for k in path:
      if not hasattr(node, 'get') or k not in node:
        return None
      node = node[k]
    return nn.meta.unbox(node)
  w = at(r.origin.param.split('/'))
  if w is None or serving.is_serving(w) or tuple(w.shape) != tuple(r.origin.shape):
    return r  # e.g. a layer of params stacked by nn.scan: the op's own slice
  state = dict(r.state)
  host = tuple(str(p) for p in getattr(r.module, 'path', ()))
  for name in r.spec.learned:
    val = at((*host, f'{r.prefix}_{name}'))
    if val is not None:
      state[name] = val
  x = provenance.replay(r.origin, w).astype(r.x.dtype)
  return dataclasses.replace(r, x=x, state=state)


def add_quant_vars(qmodel: QuantizedLinen, variables: dict[str, Any], *args, **kwargs) -> dict[str, Any]:
  """Pretrained models: `variables` (float params, e.g. a checkpoint) plus the quantizer variables the rules
  need, initialised from the sample inputs as each method declares (LSQ / PACT steps from the first batch's
  weights and activations, act_static ranges from the first batch, empty amax histories).

  Runs apply(variables, *args, **kwargs) once with 'params' and 'qjax_stats' mutable and keeps only the
  variables it created: every param already in `variables` is returned untouched (the same arrays).
  """
  _, new = qmodel.apply(variables, *args, mutable=['params', STATS], **kwargs)
  out = {k: v for k, v in variables.items()}
  params = _unfreeze(variables['params'])
  _add_missing(params, _unfreeze(new['params']))
  out['params'] = params
  if STATS in new:
    stats = _unfreeze(variables.get(STATS, {}))
    _add_missing(stats, _unfreeze(new[STATS]))
    out[STATS] = stats
  return out


def _add_missing(dst: dict, src: dict) -> None:
  for k, v in src.items():
    if k not in dst:
      dst[k] = v
    elif isinstance(dst[k], dict) and isinstance(v, dict):
      _add_missing(dst[k], v)


def _unfreeze(tree):
  if isinstance(tree, dict) or (hasattr(tree, 'items') and not isinstance(tree, serving.ServingWeight)):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


def _serving_weight(w, q, spec, int4_pack, names=None):
  """The ServingWeight storing QArray q (the param's quantized values in its layout) in place of float param w.
  Its sharding names come from a Linen partitioning box on w (then its arrays get boxes too: qvalue w's names,
  scale and zero_point None on reduced axes) or from `names` (NNX)."""
  box = w if isinstance(w, nn.meta.Partitioned) else None
  w = nn.meta.unbox(w)
  fmt = spec.fmt
  pack = (int4_pack and isinstance(fmt, formats.IntFormat) and fmt.signed and fmt.bits <= 4 and w.ndim >= 1)
  names = box.names if box is not None else names
  names = tuple(names) if names and len(names) == w.ndim else None
  sw = serving.ServingWeight.from_qarray(q, pack, names)
  qv, scale, zp = sw.qvalue, sw.scale, sw.zero_point
  if box is not None and names is not None:
    sn = serving.scale_names(names, w.shape, scale.shape)
    qn = tuple(names)[::-1] if sw.transposed else tuple(names)
    sw = dataclasses.replace(sw, qvalue=box.replace(value=qv, names=qn), scale=box.replace(value=scale, names=sn),
                             zero_point=None if zp is None else box.replace(value=zp, names=sn))
  return sw
