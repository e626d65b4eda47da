"""NNX: quantize an unmodified NNX model in place by rules, and convert it in place for int8 serving.

    q = qjax.flax.quantize_nnx(model, rules, x)        # no copy of the model is made; q.report()
    y = model(x)                                        # QAT forward (statistics update unless model.eval())
    served = qjax.flax.convert_nnx(q, x)                # kernels become ServingWeights (int8 / packed int4)
    y = served(x)                                       # as convert_linen's result: served.report(), .weights

Every module of the model gets a quantized subclass (`__class__` swap) whose `__call__` pushes the module on
qjax's interception stack; layers that keep their op as an attribute (LinearGeneral, Conv, Einsum) get qjax's
hooks there, and MultiHeadAttention's default attention_fn runs its einsums where qjax sees them (instead
of the fused jax.nn.dot_product_attention) when a rule quantizes them. State lives on the modules as nnx.Param
/ QuantStat attributes named 'qjax_*', so nnx.jit, nnx.scan, optimizers and checkpoints see it like any other
variable.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import zlib

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge
from flax.nnx.bridge import variables as bv
from flax.nnx.nn import attention as nnx_attention
from flax.nnx.nn import dtypes
from jax import lax

from qjax.flax import hooks, intercept, provenance, serving
from qjax.flax import linen as qlinen
from qjax.flax.linen import _serving_weight
from qjax.flax.rules import RuleSet
from qjax.flax.session import Session, call_signature, compiled_records, is_quantizer_name
from qjax.flax.state import STATS, LinenBackend, NnxBackend

_SUBCLASSES: dict[type, type] = {}


def _trace_if_eager(module, session, args, kwargs, method: str = '__call__') -> None:
  """The outermost call of a model whose variables are concrete (an eager run, or a model closed over by a
  jax.jit) first traces the model abstractly, with its variables as traced inputs, so that operands can be
  traced back to their params (concrete values carry no provenance; qjax.flax.provenance)."""
  if session.phase in ('probe', 'trace') or session.creating or any(
      provenance.has_trace(x) for x in jax.tree.leaves(nnx.state(module))):
    return
  graphdef, state = nnx.split(module)

  def run(state, *a, **k):
    getattr(nnx.merge(graphdef, state), method)(*a, **k)
  try:
    key = call_signature(graphdef, method, session.phase, state, args, kwargs)
  except TypeError:
    key = None
  session.trace_origins(lambda: intercept.jit_call(run, state, args, kwargs, abstract=True), key)


_reads_tls = threading.local()


@contextlib.contextmanager
def _quantized_reads(session: Session, root: nnx.Module):
  """While a quantized NNX model runs in QAT, reading a param that is a weight of a quantized op
  (`self.embedding[...]`, `get_value()`) gives that weight as its op quantizes it (Session.quantized_read: a
  tied table is one quantized weight, as served). Installed by the outermost quantized call only."""
  if session.serving or not session.weight_uses:
    yield
    return
  orig = nnx.Variable.get_value
  modules: dict = {}

  def learned(host, name):
    path = '/'.join(host)
    # the running instance first (inside nnx.scan / nnx.vmap it holds this layer's slice), else the model's
    mod = next((f.module for f in reversed(hooks.stack()) if f.path == path and isinstance(f.module, nnx.Module)),
               None)
    if mod is None:
      if not modules:
        modules.update({_path_str(p): m for p, m in nnx.iter_modules(root)})
      mod = modules.get(path)
    var = getattr(mod, f'qjax_{name}', None)
    return None if var is None else orig(var)

  def get_value(self, **kw):
    v = orig(self, **kw)
    if (kw.get('index', ...) is not ... or not isinstance(self, nnx.Param) or getattr(_reads_tls, 'busy', False)
        or not hooks.stack()):
      return v
    _reads_tls.busy = True
    try:
      fr = hooks.stack()[-1]
      hit = fr.state.lookup(fr, v)
      if hit is None or len(hit) > 2 or hit[0] not in session.weight_uses:
        return v
      out = session.quantized_read(hit[0], v, learned)
      return v if out is None else out
    finally:
      _reads_tls.busy = False
  nnx.Variable.get_value = get_value
  try:
    yield
  finally:
    nnx.Variable.get_value = orig


def _quantized_call(self, *args, **kwargs):
  """__call__ of the quantized module classes: runs the original inside the interception context."""
  parent = super(_SUBCLASSES[self._qjax_base], self).__call__
  session = getattr(self, '_qjax_session', None)
  if session is None:
    return parent(*args, **kwargs)
  with _call_scope(self, session, args, kwargs) as (st, outermost):
    if outermost:
      st.enter_context(_quantized_reads(session, self))
    st.enter_context(hooks.frame(self, self._qjax_path, session))
    return parent(*args, **kwargs)


@contextlib.contextmanager
def _call_scope(module, session: Session, args, kwargs):
  """The frame of a quantized module's call: the op hooks installed, and around the outermost quantized call
  (the model's own), an eager trace first (`_trace_if_eager`) and the session's end-of-call work after. Yields
  (an ExitStack for the caller's contexts, whether this call is the outermost)."""
  outermost = not hooks.stack()
  if outermost:
    _trace_if_eager(module, session, args, kwargs)
  try:
    with contextlib.ExitStack() as st:
      st.enter_context(hooks.patched())
      yield st, outermost
  finally:
    if outermost:
      serving.clear()
      session.end_call()
  if outermost and session.phase != 'probe':  # the outermost quantized module returned: it ran once
    session.ruleset.check_first_run()


def _tonnx_call(self, *args, rngs=None, method=None, mutable=None, **kwargs):
  """__call__ of a quantized nnx.bridge.ToNNX: its Linen module runs under the Linen interceptor, with state in
  the Linen collections that ToNNX keeps as NNX variables ('qjax_stats' as QuantStat). Its metadata are class
  attributes of a per-instance subclass: ToNNX hands every instance attribute to Linen as a variable."""

  cls = type(self)
  session, prefix, backend = cls._qjax_session, cls._qjax_path, cls._qjax_linen
  parent = super(cls, self).__call__
  if mutable is None:
    if session.creating:
      mutable = ['params', STATS]
    elif session.phase == 'train' and not self.use_running_average and not any(
        getattr(f.module, 'use_running_average', False) for f in hooks.stack() if f.state is session.backend):
      mutable = [STATS]

  def interceptor(next_fun, a, k, context):
    if context.method_name == 'setup':
      return next_fun(*a, **k)
    with qlinen.linen_frame(context.module, context.method_name, prefix, session, backend):
      return next_fun(*a, **k)
  with _call_scope(self, session, args, kwargs) as (st, _):
    st.enter_context(nn.intercept_methods(interceptor))
    if session.serving:
      st.enter_context(qlinen._serving_params(prefix))
    else:
      st.enter_context(qlinen.quantized_reads(session, prefix))
    return parent(*args, rngs=rngs, method=method, mutable=mutable or False, **kwargs)


def _get_eval(self) -> bool:
  return getattr(self, 'to_nnx__qjax_eval', False)


def _set_eval(self, value) -> None:
  self.to_nnx__qjax_eval = bool(value)


def _tonnx_class(cls: type, session: Session, path: str) -> type:
  """A quantized ToNNX's class. Its `use_running_average` (what `model.eval()` / `train()` set, and what stops
  range statistics from updating in evaluation) is kept as `to_nnx__qjax_eval`: ToNNX hands every other instance
  attribute to Linen as a variable, and a plain attribute is part of the graph, so jitted calls retrace when the
  mode changes."""
  return type(cls.__name__, (cls,), {'__module__': cls.__module__, '__qualname__': cls.__qualname__,
                                     '__call__': _tonnx_call, '_qjax_base': cls, '_qjax_session': session,
                                     '_qjax_path': path, '_qjax_linen': LinenBackend(),
                                     'use_running_average': property(_get_eval, _set_eval)})


def _method(name: str, fn):
  """A public method of a quantized module class: runs under a frame of its own (ops it runs belong to this
  module and method: `nnx.Embed.attend` computes the tied head at the embedding's path)."""
  def method(self, *args, **kwargs):
    session = getattr(self, '_qjax_session', None)
    if session is None:
      return fn(self, *args, **kwargs)
    outermost = not hooks.stack()
    if outermost:
      _trace_if_eager(self, session, args, kwargs, name)
    try:
      with contextlib.ExitStack() as st:
        st.enter_context(hooks.patched())
        if outermost:
          st.enter_context(_quantized_reads(session, self))
        st.enter_context(hooks.frame(self, self._qjax_path, session, name))
        return fn(self, *args, **kwargs)
    finally:
      if outermost:
        serving.clear()
        session.end_call()
  method.__name__ = method.__qualname__ = name
  method.__doc__ = fn.__doc__
  return method


def _public_methods(cls: type) -> dict:
  """Plain public methods the class defines (not nnx.Module's own API)."""
  out = {}
  for klass in reversed(cls.__mro__):
    if klass in nnx.Module.__mro__:
      continue
    for name, fn in vars(klass).items():
      if inspect.isfunction(fn) and not name.startswith('_') and not hasattr(nnx.Module, name):
        out[name] = fn
  return out


def _quantized_class(cls: type) -> type:
  # A plain subclass (no mixin base, no __slots__) keeps the object layout, so `__class__` can be swapped.
  if getattr(cls, '_qjax_base', None) is not None:
    return cls
  if cls not in _SUBCLASSES:
    methods = {name: _method(name, fn) for name, fn in _public_methods(cls).items()}
    _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
        **methods, '__module__': cls.__module__, '__qualname__': cls.__qualname__, '__call__': _quantized_call,
        '_qjax_base': cls})
  return _SUBCLASSES[cls]


def _path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def _is_default(fn, attr: str, current) -> bool:
  orig = hooks.ORIG.get('einsum' if attr == 'einsum_op' else attr)
  return fn is None or fn is current or fn is hooks.HOOKS[attr] or (orig is not None and fn is orig)


def _attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                  dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                  promote_dtype=dtypes.promote_dtype, is_causal=False, **kwargs):
  """nnx.dot_product_attention through its two jnp.einsum calls when a rule quantizes this module's einsums.

  Without dropout and sown weights, nnx.dot_product_attention calls the fused jax.nn.dot_product_attention,
  whose einsums are out of qjax's reach; this runs Flax's explicit path instead (the same math).
  """
  fr = hooks.current()
  rule = None if fr is None else fr.session.ruleset.peek(fr.path, 'einsum')
  if rule is not None and rule.keep_float:
    _keep_attention_float(fr, rule)
  if rule is None or rule.keep_float or kwargs:
    return nnx.dot_product_attention(query, key, value, bias=bias, mask=mask, broadcast_dropout=broadcast_dropout,
                                     dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                                     deterministic=deterministic, dtype=dtype, precision=precision, module=module,
                                     promote_dtype=promote_dtype, is_causal=is_causal, **kwargs)
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  weights = nnx_attention.dot_product_attention_weights(
      query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, query.dtype, precision,
      module, promote_dtype, is_causal)
  if weights.shape[-3] != value.shape[-2]:  # grouped-query attention, as in Flax
    q_heads, v_heads = weights.shape[-3], value.shape[-2]
    weights = weights.reshape(weights.shape[:-3] + (v_heads, q_heads // v_heads) + weights.shape[-2:])
    out = jnp.einsum('...hgqk,...kh1d->...qhgd', weights, jnp.expand_dims(value, -2), precision=precision)
    return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))
  return jnp.einsum('...hqk,...khd->...qhd', weights, value, precision=precision)


def _keep_attention_float(fr, rule) -> None:
  """A keep_float rule decides this module's einsums: the attention runs as the model wrote it (the fused kernel,
  bit for bit the float model's), and the rule is used like one that leaves hooked ops in float: marked as
  matched (no 'matched no op' warning) and its two einsums listed as float in the report."""
  rs = fr.session.ruleset
  rs.find(fr.path, 'einsum')
  if fr.session.phase == 'capture':  # as Session.run_op: a capture run records no decisions
    return
  for _ in range(2):  # softmax(q . k^T) and weights . v
    index = fr.counters.get('einsum', 0)
    fr.counters['einsum'] = index + 1
    rs.record(fr.path, 'einsum', index, rule, (), None)


class QuantizedNnx:
  """What quantize_nnx returns, the NNX counterpart of QuantizedLinen: the model (quantized in place), its
  rules, `report()` and `records(...)`. For compatibility it also answers the RuleSet's own attributes
  (`quantized()`, `unused_rules()`, `matches`, ...) as quantize_nnx returned the RuleSet before."""

  def __init__(self, model: nnx.Module, rules: RuleSet):
    self.model = model
    self.rules = rules

  def report(self) -> str:
    return self.rules.report()

  def records(self, *args, **kwargs) -> list:
    return records(self.model, *args, **kwargs)

  def __getattr__(self, name):
    if name in ('model', 'rules'):
      raise AttributeError(name)
    return getattr(self.rules, name)


def quantize_nnx(model: nnx.Module, rules, *sample_args, seed: int | None = None,
                 **sample_kwargs) -> QuantizedNnx:
  """Quantizes an NNX model in place by rules; returns a QuantizedNnx (its `report()` lists what was quantized).

  With sample inputs the model runs once eagerly, creating the quantizer state (learned steps, statistics)
  that jit-compiled steps then update. `seed` enables stochastic rounding (a 'quant' RNG stream per module).
  Transactional: if anything fails (a rule, the sample run), every module gets back its class and attributes
  (the same objects) and the error propagates; the model is exactly as before.
  """
  ruleset = rules if isinstance(rules, RuleSet) else RuleSet(rules)
  if ruleset.needs_probe and not (sample_args or sample_kwargs):
    raise ValueError('a rule has first_last_8bit=True or act_signedness="auto": quantize_nnx needs sample inputs '
                     'to learn which ops run first and last and which activations are non-negative '
                     '(quantize_nnx(model, rules, *sample_inputs))')
  saved = [(m, type(m), dict(vars(m))) for _, m in nnx.iter_modules(model)]
  try:
    _quantize_modules(model, Session(ruleset, NnxBackend()), seed, sample_args, sample_kwargs)
  except BaseException:
    for m, cls, attrs in saved:
      object.__setattr__(m, '__class__', cls)
      vars(m).clear()
      vars(m).update(attrs)
    raise
  return QuantizedNnx(model, ruleset)


_CONTAINERS = tuple(getattr(nnx, n) for n in ('List', 'Dict') if hasattr(nnx, n))


def _quantize_modules(model, session, seed, sample_args, sample_kwargs) -> None:
  tonnx = [p for p, m in nnx.iter_modules(model) if isinstance(m, bridge.ToNNX)]
  for path, module in nnx.iter_modules(model):
    if any(tuple(path[:len(t)]) == tuple(t) for t in tonnx):
      if tuple(path) in map(tuple, tonnx):
        module.__class__ = _tonnx_class(type(module), session, _path_str(path))
      continue
    module.__class__ = _quantized_class(type(module))
    module._qjax_session = session
    module._qjax_path = _path_str(path)
    # Default ops become qjax's hooks; an op the user plugged in explicitly (a qjax op with its own config)
    # is left alone.
    for attr, default in (('dot_general', lambda: lax.dot_general),
                          ('conv_general_dilated', lambda: lax.conv_general_dilated),
                          ('einsum_op', lambda: jnp.einsum)):
      if hasattr(module, attr) and _is_default(getattr(module, attr), attr, default()):
        setattr(module, attr, hooks.HOOKS[attr])
    if getattr(module, 'attention_fn', None) is nnx.dot_product_attention:
      module.attention_fn = _attention_fn
    if not hasattr(module, 'use_running_average'):
      module.use_running_average = False
    if seed is not None and not isinstance(module, _CONTAINERS):
      # A container (nnx.List) runs no op itself, and a str key beside its int keys would break its pytree.
      module.qjax_rngs = nnx.Rngs(quant=zlib.crc32(f'{seed}/{module._qjax_path}'.encode()))  # not hash(): salted
  if sample_args or sample_kwargs:
    _create_state(model, session, sample_args, sample_kwargs)


def _is_qjax_state(path, _) -> bool:
  return str(path[-1]).startswith('qjax_')


def _create_state(model: nnx.Module, session: Session, args, kwargs) -> None:
  """Runs the model once, jit-compiled (eager ops would each compile on their own), and adds the quantizer
  state it created to the model. Only that new state leaves the compiled function: the model's own arrays stay
  the same objects and are never copied (nnx.jit would return every variable as a new buffer, doubling the
  model's memory), and nothing else the run changed (batch statistics, RNG counts) is kept."""
  graphdef, state = nnx.split(model)


  def run(state, *args, **kwargs):
    m = nnx.merge(graphdef, state)
    m(*args, **kwargs)
    linen = {}  # per ToNNX module: the quantizer variables its Linen module created, as Linen collections
    for path, sub in nnx.iter_modules(m):
      if isinstance(sub, bridge.ToNNX):
        attrs = {k: v for k, v in vars(sub).items() if not k.startswith(('to_nnx__', '_pytree__'))}
        linen[path] = _only_quantizer_vars(bv.nnx_attrs_to_linen_vars(attrs))
    return nnx.state(m, _is_qjax_state), linen
  if session.ruleset.needs_probe:  # first_last_8bit, act_signedness='auto': a float run before any state
    _probe(graphdef, state, session, args, kwargs)
  session.creating = True
  try:
    new, linen = intercept.jit_call(run, state, args, kwargs)
  finally:
    session.creating = False
  nnx.update(model, new)
  subs = dict(nnx.iter_modules(model))
  for path, variables in linen.items():  # merged into the ToNNX's attributes the way ToNNX merges updates
    sub = subs[path]
    for name, value in bv.linen_vars_to_nnx_attrs(variables).items():
      old = vars(sub).get(name)
      setattr(sub, name, nnx.data(bv._recursive_merge(old, value) if isinstance(old, dict) else value))


def _probe(graphdef, state, session: Session, args, kwargs) -> None:
  """Runs the model once in the session's probe mode (float ops, no state kept): Session.probe."""
  def probe(state, *args, **kwargs):
    nnx.merge(graphdef, state)(*args, **kwargs)
    return dict(session.probe_mins)
  session.probe(lambda abstract: intercept.jit_call(probe, state, args, kwargs, abstract=abstract))


def reprobe_nnx(model: nnx.Module, *sample_args, **sample_kwargs) -> None:
  """Measures again, on sample inputs, what quantize_nnx's probe measured (the quantized ops' order, the
  activations' minima for act_signedness='auto'), after the quantized `model` changed: new weights, or PTQ's
  online input ops (a rotation turns a non-negative input into a signed one). RuleSet.forget_probe."""
  sessions = {id(m._qjax_session): m._qjax_session for _, m in nnx.iter_modules(model)
              if getattr(m, '_qjax_session', None) is not None}
  if len(sessions) != 1:
    raise ValueError(f'reprobe_nnx needs a model quantize_nnx quantized (found {len(sessions)} sessions)')
  session = next(iter(sessions.values()))
  session.ruleset.forget_probe()
  if session.ruleset.needs_probe:
    graphdef, state = nnx.split(model)
    _probe(graphdef, state, session, sample_args, sample_kwargs)


def _only_quantizer_vars(tree):
  """The leaves of a Linen variables dict whose names are quantizer state names (session.is_quantizer_name)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      sub = _only_quantizer_vars(v)
      if sub:
        out[k] = sub
    elif is_quantizer_name(str(k)):
      out[k] = v
  return out


def convert_nnx(model: nnx.Module | QuantizedNnx, *sample_args, int4_pack: bool = True,
                **sample_kwargs) -> serving.Served:
  """PTQ conversion in place: each quantized weight param becomes a ServingWeight. Returns a serving.Served, as
  convert_linen does: `served(x)` serves (jit-compiled), `served.model` is the model (converted in place),
  `served.weights` maps each served weight's path to its ServingWeight, `served.report()` lists them.

  Runs the model once (jit-compiled, in eval mode) on sample inputs to learn which params are weights of quantized
  ops (by provenance), with which spec and quantizer state; quantizes each weight operand as the QAT forward does
  and stores it in the param's own layout (see qjax.flax.convert_linen), so that the serving forward equals the
  QAT evaluation forward bit for bit. A param shared by several quantized ops is stored once.
  """
  if isinstance(model, QuantizedNnx):
    model = model.model
  session = _session_of(model)
  model.eval()
  modules = {_path_str(p): m for p, m in nnx.iter_modules(model)}
  variables = {_path_str(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}
  graphdef, state = nnx.split(model)
  meta, problems = [], {}

  def run(state, *args, **kwargs):
    session.records = []
    nnx.merge(graphdef, state)(*args, **kwargs)
    meta[:] = session.records
    shape = lambda path: tuple(variables[path].shape) if path in variables else ()
    return serving.quantize_uses(session.records, problems, shape)
  session.phase = 'record'
  try:
    qarrays = intercept.jit_call(run, state, sample_args, sample_kwargs)
  finally:
    session.phase, session.records = 'train', []
  for i, r in enumerate([r for r in meta if r.weight_name is not None]):
    q = problems.get(i)
    if isinstance(q, tuple) and q[0] == 'stacked':
      raise ValueError(f'convert_nnx: {r.weight_name} has shape {tuple(variables[r.weight_name].shape)} but its op '
                       f'saw {q[1]}: weights used inside an NNX transform over stacked layers (nnx.scan, '
                       'nnx.vmap) cannot be converted to ServingWeights yet')
  weights = serving.merge_uses(meta, qarrays, problems)
  todo = []  # checked before anything changes
  for path, (q, uses) in weights.items():
    var = variables.get(path)
    if not isinstance(var, nnx.Variable):
      raise ValueError(f'convert_nnx: the weight {path} that a quantized op used is not a param of the model')
    if not isinstance(var.get_value(), serving.ServingWeight) and tuple(var.shape) != tuple(q.qvalue.shape):
      raise ValueError(f'convert_nnx: {path} has shape {tuple(var.shape)} but its op saw '
                       f'{tuple(q.qvalue.shape)}: weights used inside an NNX transform over stacked layers '
                       '(nnx.scan, nnx.vmap) cannot be converted to ServingWeights yet')
    todo.append((path, var, q, uses))
  for _, var, q, uses in todo:
    if isinstance(var.get_value(), serving.ServingWeight):
      continue  # already converted
    md = var.get_metadata()
    sw = _serving_weight(var.get_value(), q, uses[0].spec, int4_pack, md.get('out_sharding'))
    if md.get('mesh') is not None and sw.names is not None:  # placed as the float weight was, scales included
      sw = jax.tree.map(lambda a, p, m=md['mesh']: jax.device_put(a, jax.sharding.NamedSharding(m, p)), sw,
                        sw.partition_specs())
    var.set_value(sw)
    for r in uses:
      module = modules.get(r.path)
      for learned in r.spec.learned:
        if module is not None and hasattr(module, f'qjax_{r.prefix}_{learned}'):
          delattr(module, f'qjax_{r.prefix}_{learned}')
        elif not isinstance(r.module, nnx.Module):  # a Linen module inside an nnx.bridge.ToNNX
          _drop_tonnx_var(modules, r, f"{r.prefix}_{learned}")
  session.phase = 'serve'
  return serving.Served('nnx', model, nnx.state(model), tuple(path for path, *_ in todo))


def _drop_tonnx_var(modules: dict, r, name: str) -> None:
  """Removes the Linen variable `name` of record r's module from the ToNNX that holds it (a learned step folded
  into a ServingWeight). ToNNX keeps a Linen module's variables as attributes: nested dicts by submodule name."""
  host = tuple(str(p) for p in getattr(r.module, 'path', ()))
  for tpath, t in modules.items():
    if not isinstance(t, bridge.ToNNX) or (tpath and r.path != tpath and not r.path.startswith(tpath + '/')):
      continue
    if not host:
      if name in vars(t):
        delattr(t, name)
      return
    node = vars(t).get(host[0])
    for k in host[1:]:
      node = node[k] if node is not None and k in node else None
    if node is not None and name in node:
      del node[name]
    return


def _session_of(model: nnx.Module) -> Session:
  sessions = {m._qjax_session for _, m in nnx.iter_modules(model) if getattr(m, '_qjax_session', None)}
  if len(sessions) != 1:
    raise ValueError('this needs a model quantized by quantize_nnx')
  return next(iter(sessions))


def records(model: nnx.Module, *args, compiled: bool = False, **kwargs) -> list:
  """Runs model(*args, **kwargs) in record mode; returns per forward operand of each quantized op a
  session.Record (see QuantizedLinen.records). compiled=True runs it as one jitted program over the model's
  state (`session.compiled_records`; kwargs are static; the model itself is not changed); inside a caller's
  jax.jit / nnx.jit either way is compiled."""
  if compiled:
    graphdef, state = nnx.split(model)
    return compiled_records(lambda s, *a: records(nnx.merge(graphdef, s), *a, **kwargs), state, *args)
  session = _session_of(model)
  phase, session.phase, session.records = session.phase, 'record', []
  try:
    model(*args, **kwargs)
    return session.records
  finally:
    session.phase, session.records = phase, []
