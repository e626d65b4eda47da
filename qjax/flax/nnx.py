"""NNX: quantize an unmodified NNX model in place by rules, and convert it in place for int8 serving.

    report = qjax.flax.quantize_nnx(model, rules, x)   # no copy of the model is made
    y = model(x)                                        # QAT forward (statistics update unless model.eval())
    qjax.flax.convert_nnx(model, x)                     # kernels become ServingWeights (int8 / packed int4)

Every module of the model gets a quantized subclass (`__class__` swap) whose `__call__` pushes the module on
qjax's interception stack; layers that keep their op as an attribute (LinearGeneral, Conv, Einsum) get qjax's
hooks there, and MultiHeadAttention's default attention_fn runs its einsums where qjax sees them (instead
of the fused jax.nn.dot_product_attention) when a rule quantizes them. State lives on the modules as nnx.Param
/ QuantStat attributes named 'qjax_*', so nnx.jit, nnx.scan, optimizers and checkpoints see it like any other
variable.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import attention as nnx_attention
from flax.nnx.nn import dtypes
from jax import lax

from qjax.flax import intercept
from qjax.flax.linen import _serving_weight
from qjax.flax.rules import RuleSet

_SUBCLASSES: dict[type, type] = {}


def _quantized_call(self, *args, **kwargs):
  """__call__ of the quantized module classes: runs the original inside the interception context."""
  parent = super(_SUBCLASSES[self._qjax_base], self).__call__
  session = getattr(self, '_qjax_session', None)
  if session is None:
    return parent(*args, **kwargs)
  with intercept.patched(), intercept.frame(self, self._qjax_path, session):
    out = parent(*args, **kwargs)
  if not intercept._stack() and session.mode != 'probe':  # the outermost quantized module returned: it ran once
    session.ruleset.check_first_run()
  return out


def _quantized_class(cls: type) -> type:
  # A plain subclass (no mixin base, no __slots__) keeps the object layout, so `__class__` can be swapped.
  if getattr(cls, '_qjax_base', None) is not None:
    return cls
  if cls not in _SUBCLASSES:
    _SUBCLASSES[cls] = type(cls.__name__, (cls,), {
        '__module__': cls.__module__, '__qualname__': cls.__qualname__, '__call__': _quantized_call,
        '_qjax_base': cls})
  return _SUBCLASSES[cls]


def _path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def _is_default(fn, attr: str, current) -> bool:
  orig = intercept._ORIG.get('einsum' if attr == 'einsum_op' else attr)
  return fn is None or fn is current or fn is intercept.HOOKS[attr] or (orig is not None and fn is orig)


def _attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                  dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                  promote_dtype=dtypes.promote_dtype, is_causal=False, **kwargs):
  """nnx.dot_product_attention through its two jnp.einsum calls when a rule quantizes this module's einsums.

  Without dropout and sown weights, nnx.dot_product_attention calls the fused jax.nn.dot_product_attention,
  whose einsums are out of qjax's reach; this runs Flax's explicit path instead (the same math).
  """
  fr = intercept.current()
  rule = None if fr is None else fr.session.ruleset.peek(fr.path, 'einsum')
  if rule is None or rule.float or kwargs:
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


def quantize_nnx(model: nnx.Module, rules, *sample_args, seed: int | None = None, **sample_kwargs) -> RuleSet:
  """Quantizes an NNX model in place by rules; returns the RuleSet (its `report()` lists what was quantized).

  With sample inputs the model runs once eagerly, creating the quantizer state (learned steps, statistics)
  that jit-compiled steps then update. `seed` enables stochastic rounding (a 'quant' RNG stream per module).
  """
  ruleset = rules if isinstance(rules, RuleSet) else RuleSet(rules)
  session = intercept.Session(ruleset, 'nnx')
  for path, module in nnx.iter_modules(model):
    module.__class__ = _quantized_class(type(module))
    module._qjax_session = session
    module._qjax_path = _path_str(path)
    # Default ops become qjax's hooks; an op the user plugged in explicitly (a qjax op with its own config)
    # is left alone.
    for attr, default in (('dot_general', lambda: lax.dot_general),
                          ('conv_general_dilated', lambda: lax.conv_general_dilated),
                          ('einsum_op', lambda: jnp.einsum)):
      if hasattr(module, attr) and _is_default(getattr(module, attr), attr, default()):
        setattr(module, attr, intercept.HOOKS[attr])
    if callable(getattr(module, 'promote_dtype', None)):
      module.promote_dtype = intercept.tracking_promote_dtype(module.promote_dtype)
    if getattr(module, 'attention_fn', None) is nnx.dot_product_attention:
      module.attention_fn = _attention_fn
    if not hasattr(module, 'use_running_average'):
      module.use_running_average = False
    if seed is not None:
      module.qjax_rngs = nnx.Rngs(quant=zlib.crc32(f'{seed}/{module._qjax_path}'.encode()))  # not hash(): salted
  if ruleset.needs_probe and not (sample_args or sample_kwargs):
    raise ValueError('a rule has first_last_8bit=True or act_signedness="auto": quantize_nnx needs sample inputs '
                     'to learn which ops run first and last and which activations are non-negative '
                     '(quantize_nnx(model, rules, *sample_inputs))')
  if sample_args or sample_kwargs:
    _create_state(model, session, sample_args, sample_kwargs)
  return ruleset


def _is_qjax_state(path, _) -> bool:
  return str(path[-1]).startswith('qjax_')


def _create_state(model: nnx.Module, session: intercept.Session, args, kwargs) -> None:
  """Runs the model once, jit-compiled (eager ops would each compile on their own), and adds the quantizer
  state it created to the model. Only that new state leaves the compiled function: the model's own arrays stay
  the same objects and are never copied (nnx.jit would return every variable as a new buffer, doubling the
  model's memory), and nothing else the run changed (batch statistics, RNG counts) is kept."""
  graphdef, state = nnx.split(model)

  def run(state, *args, **kwargs):
    m = nnx.merge(graphdef, state)
    m(*args, **kwargs)
    return nnx.state(m, _is_qjax_state)
  if session.ruleset.needs_probe:  # first_last_8bit, act_signedness='auto': a float run before any state

    def probe(state, *args, **kwargs):
      nnx.merge(graphdef, state)(*args, **kwargs)
      return dict(session.probe_mins)
    session.probe(lambda abstract: intercept.jit_call(probe, state, args, kwargs, abstract=abstract))
  session.creating = True
  try:
    new = intercept.jit_call(run, state, args, kwargs)
  finally:
    session.creating = False
  nnx.update(model, new)


def convert_nnx(model: nnx.Module, *sample_args, int4_pack: bool = True, **sample_kwargs) -> int:
  """PTQ conversion in place: each quantized weight param becomes a ServingWeight; returns how many.

  Runs the model once (jit-compiled, in eval mode) on sample inputs to learn which params are weights of quantized
  ops, with which spec and quantizer state; quantizes them with the calibration (or learned step) the QAT forward
  uses, so that the serving forward equals the QAT evaluation forward bit for bit.
  """
  sessions = {m._qjax_session for _, m in nnx.iter_modules(model) if getattr(m, '_qjax_session', None)}
  if len(sessions) != 1:
    raise ValueError('convert_nnx needs a model quantized by quantize_nnx')
  (session,) = sessions
  model.eval()
  modules = {_path_str(p): m for p, m in nnx.iter_modules(model)}
  graphdef, state = nnx.split(model)

  def own(r):  # a weight of the model as the op saw it (not one layer of stacked weights inside nnx.scan)
    var = vars(modules[r.path]).get(r.weight_name) if r.weight_name and r.path in modules else None
    return isinstance(var, nnx.Variable) and tuple(var.shape) == tuple(r.x.shape)

  def run(state, *args, **kwargs):  # the weights' quantizer state (learned steps, delayed scales) as values
    session.records = []
    nnx.merge(graphdef, state)(*args, **kwargs)
    return [r.state if own(r) else {} for r in session.records]
  session.mode = 'record'
  try:
    states = intercept.jit_call(run, state, sample_args, sample_kwargs)
  finally:
    session.mode = 'train'
  todo = []  # checked before anything changes
  for r, state in zip(session.records, states, strict=True):
    if r.weight_name is None:
      continue
    module = modules.get(r.path)
    var = vars(module).get(r.weight_name) if module is not None else None
    if not isinstance(var, nnx.Variable):
      raise ValueError(f'convert_nnx: the weight {r.path}/{r.weight_name} that a quantized op used is not a param '
                       'of the model')
    if not isinstance(var.get_value(), intercept.ServingWeight) and tuple(var.shape) != tuple(r.x.shape):
      raise ValueError(f'convert_nnx: {r.path}/{r.weight_name} has shape {tuple(var.shape)} but its op saw '
                       f'{tuple(r.x.shape)}: weights used inside an NNX transform over stacked layers (nnx.scan, '
                       'nnx.vmap) cannot be converted to ServingWeights yet')
    todo.append((module, r, state))
  done = 0
  for module, r, state in todo:
    name, spec, prefix = r.weight_name, r.spec, r.prefix
    var = vars(module)[name]
    if isinstance(var.get_value(), intercept.ServingWeight):
      continue  # already converted, or a weight used by several ops
    md = var.get_metadata()
    sw = _serving_weight(var.get_value(), spec, state, int4_pack, md.get('out_sharding'))
    if md.get('mesh') is not None and sw.names is not None:  # placed as the float weight was, scales included
      sw = jax.tree.map(lambda a, p, m=md['mesh']: jax.device_put(a, jax.sharding.NamedSharding(m, p)), sw,
                        sw.partition_specs())
    setattr(module, name, nnx.Param(sw))
    for learned in spec.learned:
      if hasattr(module, f'qjax_{prefix}_{learned}'):
        delattr(module, f'qjax_{prefix}_{learned}')
    module.promote_dtype = intercept.tracking_promote_dtype(intercept.serving_promote_dtype)
    done += 1
  session.mode = 'serve'
  return done
