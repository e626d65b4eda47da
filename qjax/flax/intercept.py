"""Interception: a model's dot_general / conv / einsum calls run through qjax ops, decided per module by rules.

While a quantized model runs, a thread-local stack holds the module being executed (pushed by Linen's
`nn.intercept_methods`, or by the quantized NNX module classes). `jax.lax.dot_general`,
`jax.lax.conv_general_dilated` and `jax.numpy.einsum` are replaced, only while such a model runs and only
for the thread running it, by hooks that look up the current module's path in the rule set, tell weights
(params of the module, by identity) from activations, fetch or create the module's quantizer state, and call
the qjax op. Standard Flax layers that store their op as an attribute (nnx.LinearGeneral, nnx.Conv,
nnx.Einsum) get the hooks as attributes. Nothing is cloned: models are quantized in place.

State (all ordinary Flax variables):
  learned quantizer parameters (LSQ step, LSQ+ offset, PACT alpha)  Linen 'params' / NNX nnx.Param
  range statistics (EMA of activation ranges, amax histories)      Linen 'quant_stats' / NNX QuantStat
Names: '<op><index>_<side>_<what>', e.g. 'dot_general0_lhs_scale' (Linen) or 'qjax_dot_general0_lhs_scale'
(NNX attribute). Statistics update in training mode only: Linen when 'quant_stats' is mutable, NNX unless
`model.eval()` set `use_running_average`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax import calibration, formats, packing, quantizers
from qjax import granularity as gran
from qjax.flax.rules import RuleSet
from qjax.spec import QuantSpec

STATS = 'quant_stats'
_tls = threading.local()
_LOCK = threading.Lock()
_ORIG: dict[str, Any] = {}
_installed = 0


# ----------------------------------------------------------------------------------------- serving weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServingWeight:
  """The storage form of a weight's QArray for serving: its int8 qvalues (or 2/3/4-bit values packed), scale,
  zero point and format, plus the weight's shape and sharding names. `from_qarray` packs, `to_qarray` unpacks:
  inside the ops a served weight is the QArray again (x ~ (qvalue - zero_point) * scale).

  Replaces a float kernel in a converted parameter tree, so that no float kernel is left.
  """
  qvalue: jax.Array                    # int8 (shape of the weight) or uint8 packed along axis 0 (qjax.packing)
  scale: jax.Array
  zero_point: jax.Array | None
  format: str = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  packed: bool = dataclasses.field(default=False, metadata=dict(static=True))
  names: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))  # the weight's sharding

  def partition_specs(self) -> ServingWeight:
    """A ServingWeight of PartitionSpecs (for jax.device_put / jit shardings) from the float weight's sharding
    names: qvalue keeps them, scale and zero_point have None on their reduced (size-1) axes."""
    P = jax.sharding.PartitionSpec
    if self.names is None:
      return dataclasses.replace(self, qvalue=P(), scale=P(), zero_point=None if self.zero_point is None else P())
    sn = P(*scale_names(self.names, self.shape, _shape(self.scale)))
    return dataclasses.replace(self, qvalue=P(*self.names), scale=sn, zero_point=None if self.zero_point is None
                               else sn)

  def __getitem__(self, idx):  # nnx layers read kernels as `self.kernel[...]`
    if idx is Ellipsis:
      return self
    raise TypeError('a ServingWeight can only be read whole (`[...]`)')

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def dtype(self):
    return jnp.float32

  @classmethod
  def from_qarray(cls, q: quantizers.QArray, pack: bool = False, names: tuple | None = None) -> ServingWeight:
    """Stores QArray q (packing 2-, 3- or 4-bit qvalues densely along axis 0 when `pack`; qjax.packing)."""
    # Sub-byte packing hook (issue 13): 2-, 3- and 4-bit values packed at their own width (qjax.packing).
    qvalue = packing.pack(q.qvalue, packing.width(q.fmt)) if pack else q.qvalue
    return cls(qvalue, q.scale, q.zero_point, q.format, tuple(q.qvalue.shape), pack, names)

  def to_qarray(self) -> quantizers.QArray:
    bits = packing.width(formats.parse_format(self.format)) if self.packed else None
    q = packing.unpack(self.qvalue, bits, self.shape) if self.packed else self.qvalue
    return quantizers.QArray(q, self.scale, self.zero_point, self.format)


def _shape(a) -> tuple[int, ...]:
  return tuple(getattr(a, 'value', a).shape)  # a Linen Partitioned box holds its array as .value


def scale_names(names, weight_shape, scale_shape) -> tuple:
  """Sharding names of a weight's scale: the weight's names, None on the axes the scale reduces (size 1)."""
  return tuple(None if s == 1 and w != 1 else n for n, w, s in zip(names, weight_shape, scale_shape, strict=True))


def pack_int4(q: jax.Array) -> jax.Array:
  """Packs int8 values in [-8, 7] two per byte along axis 0 (odd sizes padded): (n, ...) -> (ceil(n/2), ...)."""
  return packing.pack(q, 4)


def unpack_int4(p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of pack_int4: sign-extends each nibble back to int8."""
  return packing.unpack(p, 4, shape)


def _is_serving(x) -> bool:
  return isinstance(x, ServingWeight)


def serving_promote_dtype(*args, dtype=None, inexact=True):
  """Flax's promote_dtype that passes ServingWeights through (Linen: *args; NNX: one tuple)."""
  from flax.linen import dtypes as ldt  # noqa: PLC0415 (flax imported lazily in hooks)
  nnx_style = len(args) == 1 and isinstance(args[0], tuple)
  items = list(args[0] if nnx_style else args)
  idx = [i for i, a in enumerate(items) if a is not None and not _is_serving(a)]
  promoted = ldt.promote_dtype(*[items[i] for i in idx], dtype=dtype, inexact=inexact)
  for i, v in zip(idx, promoted, strict=True):
    items[i] = v
  return tuple(items) if nnx_style else items


def tracking_promote_dtype(fn):
  """Wraps a layer's promote_dtype so that its outputs stay known as the params they came from: under eager
  jax.grad (linearize) even a same-dtype cast returns a new tracer, which identity alone would take for an
  activation."""
  if getattr(fn, '_qjax_tracking', False):
    return fn

  def promote(*args, **kwargs):
    out = fn(*args, **kwargs)
    fr = current()
    ins = args[0] if len(args) == 1 and isinstance(args[0], tuple) else args
    if fr is not None and isinstance(out, (tuple, list)) and len(out) == len(ins):
      fr.casts.extend((a, b) for a, b in zip(ins, out, strict=True) if a is not None and b is not a)
    return out
  promote._qjax_tracking = True
  return promote


def jit_call(fn, state, args, kwargs, abstract: bool = False):
  """jax.jit of fn(state, *args, **kwargs) with the array leaves of the sample inputs traced, not closed over
  (XLA would constant-fold the model over constant inputs, slowly) and their other leaves static.
  `abstract=True` only traces it (jax.eval_shape): nothing runs and only output shapes come back."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  idx = [i for i, a in enumerate(leaves) if isinstance(a, (jax.Array, np.ndarray))]

  def call(state, arrays):
    full = list(leaves)
    for i, a in zip(idx, arrays, strict=True):
      full[i] = a
    a, k = jax.tree.unflatten(treedef, full)
    return fn(state, *a, **k)
  arrays = [leaves[i] for i in idx]
  return jax.eval_shape(call, state, arrays) if abstract else jax.jit(call)(state, arrays)


# ------------------------------------------------------------------------------------------- the stack


@dataclasses.dataclass
class Frame:
  module: Any
  path: str
  session: Session
  counters: dict[str, int] = dataclasses.field(default_factory=dict)
  casts: list = dataclasses.field(default_factory=list)  # (param, its promote_dtype output) pairs


def _stack() -> list[Frame]:
  if not hasattr(_tls, 'stack'):
    _tls.stack, _tls.inside = [], 0
  return _tls.stack


def current() -> Frame | None:
  s = _stack()
  return s[-1] if s and not _tls.inside else None


@contextlib.contextmanager
def frame(module, path: str, session: Session):
  s = _stack()
  s.append(Frame(module, path, session))
  try:
    yield
  finally:
    s.pop()


@contextlib.contextmanager
def _inside_op():
  _stack()
  _tls.inside += 1
  try:
    yield
  finally:
    _tls.inside -= 1


# ------------------------------------------------------------------------------------------- the hooks


def _hooked_frame() -> Frame | None:
  """The module frame that a call of a hooked op belongs to. None for calls made by qjax's own op code, which
  must run the original op: JAX may trace that code after run_op returned but while the module still runs
  (a custom_vjp's forward when jax.grad linearizes an nnx.scan body)."""
  fr = current()
  if fr is None:
    return None
  caller = sys._getframe(2).f_globals.get('__name__', '')
  if caller.startswith('qjax.') and not caller.startswith('qjax.flax'):
    return None
  return fr


def _dot_general_hook(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  fr = _hooked_frame()
  if fr is None:
    return _ORIG['dot_general'](lhs, rhs, dimension_numbers, precision=precision,
                                preferred_element_type=preferred_element_type, **kw)
  from qjax.ops.dot_general import dot_general as q_dot_general  # noqa: PLC0415

  def q(lhs, rhs, cfg, lp, rp, key):
    return q_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, config=cfg,
                           lhs_params=lp, rhs_params=rp, key=key)
  orig = lambda: _ORIG['dot_general'](lhs, rhs, dimension_numbers, precision=precision,
                                      preferred_element_type=preferred_element_type, **kw)
  return fr.session.run_op(fr, 'dot_general', lhs, rhs, orig, q)


def _conv_hook(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kw):
  args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, precision, preferred_element_type)
  fr = _hooked_frame()
  orig = lambda: _ORIG['conv_general_dilated'](lhs, rhs, *args, **kw)
  if fr is None:
    return orig()
  from qjax.ops.conv import conv_general_dilated as q_conv  # noqa: PLC0415

  def q(lhs, rhs, cfg, lp, rp, key):
    return q_conv(lhs, rhs, *args, config=cfg, lhs_params=lp, rhs_params=rp, key=key)
  return fr.session.run_op(fr, 'conv', lhs, rhs, orig, q)


def _einsum_hook(subscripts, *operands, precision=None, preferred_element_type=None, _dot_general=None, **kw):
  fr = _hooked_frame()
  if _dot_general is not None:  # Linen attention passes `_dot_general=jax.lax.dot_general` (or its own)
    kw['_dot_general'] = _ORIG.get('dot_general') if _dot_general is _dot_general_hook else _dot_general
  orig = lambda: _ORIG['einsum'](subscripts, *operands, precision=precision,
                                 preferred_element_type=preferred_element_type, **kw)
  if fr is None or len(operands) != 2 or not isinstance(subscripts, str):
    return orig()
  from qjax.ops.einsum import einsum as q_einsum  # noqa: PLC0415

  def q(lhs, rhs, cfg, lp, rp, key):  # serving weights arrive as QArrays, which qjax.ops.einsum takes
    return q_einsum(subscripts, lhs, rhs, config=cfg, lhs_params=lp, rhs_params=rp, key=key,
                    preferred_element_type=preferred_element_type)
  return fr.session.run_op(fr, 'einsum', operands[0], operands[1], orig, q)


def _install():
  import jax.lax as lax_mod  # noqa: PLC0415
  import jax.numpy as jnp_mod  # noqa: PLC0415
  _ORIG.setdefault('dot_general', lax_mod.dot_general)
  _ORIG.setdefault('conv_general_dilated', lax_mod.conv_general_dilated)
  _ORIG.setdefault('einsum', jnp_mod.einsum)
  lax_mod.dot_general = _dot_general_hook
  lax_mod.conv_general_dilated = _conv_hook
  jnp_mod.einsum = _einsum_hook


def _uninstall():
  import jax.lax as lax_mod  # noqa: PLC0415
  import jax.numpy as jnp_mod  # noqa: PLC0415
  lax_mod.dot_general = _ORIG['dot_general']
  lax_mod.conv_general_dilated = _ORIG['conv_general_dilated']
  jnp_mod.einsum = _ORIG['einsum']


@contextlib.contextmanager
def patched():
  """Installs the hooks while any quantized model runs (they pass through for other threads and code)."""
  global _installed
  with _LOCK:
    if _installed == 0:
      _install()
    _installed += 1
  try:
    yield
  finally:
    with _LOCK:
      _installed -= 1
      if _installed == 0:
        _uninstall()


HOOKS = {'dot_general': _dot_general_hook, 'conv_general_dilated': _conv_hook, 'einsum_op': _einsum_hook}


# ------------------------------------------------------------------------------------------- the session


@dataclasses.dataclass
class Record:
  """One forward operand of a quantized op, seen in 'record' mode (PTQ conversion, layer statistics)."""
  module: Any
  path: str
  weight_name: str | None  # the param's name for weights, None for activations
  spec: QuantSpec
  state: dict              # the quantizer params used (learned step, static range), {} when dynamic
  prefix: str              # '<op><index>_<side>'
  x: Any                   # the operand
  kept_8bit: bool = False  # the op is the model's first or last quantized op, kept at 8 bits (first_last_8bit)


class Session:
  """Rules plus the state backend of one quantized model (Linen or NNX), and its mode.

  mode: 'train' (QAT/calibration; statistics update where mutable), 'record' (collects, per weight operand,
  the spec it is quantized with, for PTQ conversion), 'serve' (weights arrive as ServingWeights), 'probe'
  (every op runs in float; only the order of quantized ops and activation minima are kept: see `probe`).
  """

  def __init__(self, ruleset: RuleSet, backend: str):
    self.ruleset = ruleset
    self.backend = backend
    self.mode = 'train'
    self.creating = False  # quantize_nnx's first run: NNX transforms (nnx.scan, nnx.jit) carry new state out
    self.records: list[Record] = []
    self.probe_mins: dict[tuple[str, str, int, str], Any] = {}  # probe mode: activation minima (act_signedness)

  def probe(self, run) -> None:
    """Runs the model once in probe mode (every op in float, no quantizer state) so that the rule set learns the
    order of its quantized ops (first_last_8bit) and, where a rule has act_signedness='auto', each activation
    operand's minimum; then RuleSet.fix_order. `run(abstract)` runs the model, returning `self.probe_mins`
    from inside its trace: traced only (jax.eval_shape) when no minimum is wanted, else jit-compiled on the
    sample inputs."""
    mode, self.mode = self.mode, 'probe'
    self.probe_mins = {}
    try:
      mins = run(not self.ruleset.needs_data)
    finally:
      self.mode, self.probe_mins = mode, {}
    self.ruleset.fix_order(None if not self.ruleset.needs_data else mins)

  # ---- weights

  def weight_name(self, fr: Frame, x) -> str | None:
    """The name of the module's param that operand x is (by identity, or a cast of it), else None."""
    params = self._own_params(fr.module)
    for name, v in params.items():
      if x is v:
        return name
    for a, b in fr.casts:  # x came out of the layer's promote_dtype: the param that went in
      if x is b:
        name = next((n for n, v in params.items() if a is v), None)
        if name is not None:
          return name
    if _is_serving(x):
      return None
    for name, v in params.items():  # a cast of a param (e.g. bf16 compute of f32 params) is still that param
      if hasattr(v, 'shape') and hasattr(x, 'shape') and tuple(v.shape) == tuple(x.shape) and v.dtype != x.dtype:
        return name
    if not isinstance(x, jax.core.Tracer):  # eager calls on host (numpy) params: the operand is a converted copy
      for name, v in params.items():
        if (hasattr(v, 'shape') and not isinstance(v, jax.core.Tracer) and tuple(v.shape) == tuple(x.shape)
            and np.array_equal(np.asarray(v), np.asarray(x))):
          return name
    return None

  def _own_params(self, module) -> dict[str, Any]:
    if self.backend == 'linen':
      from flax.core import meta  # noqa: PLC0415
      p = module.variables.get('params', {}) if module.scope is not None else {}
      return {k: meta.unbox(v) for k, v in p.items() if not isinstance(v, dict)}
    from flax import nnx  # noqa: PLC0415
    out = {}
    for k, v in vars(module).items():
      if isinstance(v, nnx.Param):
        out[k] = v.get_value()
    return out

  # ---- the op

  def run_op(self, fr: Frame, op: str, lhs, rhs, orig, q):
    index = fr.counters.get(op, 0)
    fr.counters[op] = index + 1
    found = self.ruleset.find(fr.path, op)
    lw, rw = self.weight_name(fr, lhs), self.weight_name(fr, rhs)
    if self.mode == 'serve':
      lw = lw or self._serving_name(fr, lhs)
      rw = rw or self._serving_name(fr, rhs)
    weights = tuple(n for n in (lw, rw) if n)
    if found is None or found[1].float:
      if found is not None:
        self.ruleset.record(fr.path, op, index, found[1], weights, None, (lw or 'act', rw or 'act'))
      if _is_serving(lhs) or _is_serving(rhs):
        raise ValueError(f'{fr.path}: a serving (quantized) weight reached an op that no rule quantizes')
      with _inside_op():
        return orig()
    i, rule = found
    rule = self.ruleset.effective(fr.path, op, index, rule)
    try:
      cfg = rule.dot_config(lw is not None, rw is not None, *self.ruleset.act_specs(fr.path, op, index, rule))
    except ValueError as e:
      raise ValueError(f'rule {rule.label!r} at {fr.path} ({op}): {e}') from None
    self.ruleset.record(fr.path, op, index, rule, weights, cfg, (lw or 'act', rw or 'act'))
    if self.mode == 'probe':  # the op order and activation minima are wanted: run in float, create no state
      if rule.act_signedness == 'auto':
        for side, name, x in (('lhs', lw, lhs), ('rhs', rw, rhs)):
          if name is None and not _is_serving(x):
            k = (fr.path, op, index, side)
            m = jnp.min(jax.lax.stop_gradient(x)).astype(jnp.float32)
            self.probe_mins[k] = jnp.minimum(self.probe_mins[k], m) if k in self.probe_mins else m
      with _inside_op():
        return orig()
    prefix = f'{op}{index}'
    kept = (fr.path, op, index) in self.ruleset.kept_8bit
    lp = self._params_cb(fr, rule, f'{prefix}_lhs', lw, lhs, kept)
    rp = self._params_cb(fr, rule, f'{prefix}_rhs', rw, rhs, kept)
    lhs = lhs.to_qarray() if _is_serving(lhs) else lhs
    rhs = rhs.to_qarray() if _is_serving(rhs) else rhs
    key = self._key(fr, rule, cfg)
    with _inside_op():
      try:
        return q(lhs, rhs, cfg, lp, rp, key)
      except ValueError as e:
        raise ValueError(f'rule {rule.label!r} at {fr.path} ({op}): {e}') from None

  def _serving_name(self, fr, x) -> str | None:
    if not _is_serving(x):
      return None
    return next((k for k, v in self._own_params(fr.module).items() if v is x), 'weight')

  def _key(self, fr: Frame, rule, cfg):
    specs = [cfg.fwd.lhs, cfg.fwd.rhs, cfg.dlhs.lhs, cfg.dlhs.rhs, cfg.drhs.lhs, cfg.drhs.rhs]
    if not any(s is not None and s.rounding == 'stochastic' for s in specs):
      return None
    if self.backend == 'linen':
      if not fr.module.has_rng('quant'):
        raise ValueError(f'rule {rule.label!r} at {fr.path}: stochastic rounding needs a "quant" PRNG stream: '
                         "pass rngs={'quant': key} to apply")
      return fr.module.make_rng('quant')
    rngs = getattr(fr.module, 'qjax_rngs', None)
    if rngs is None:
      raise ValueError(f'rule {rule.label!r} at {fr.path}: stochastic rounding needs quantize_nnx(..., seed=...)')
    return rngs.quant()

  # ---- quantizer state

  def _params_cb(self, fr: Frame, rule, prefix: str, weight_name: str | None, operand, kept: bool = False):
    """The params callable handed to the op for one forward operand (see qjax.ops.dot_general)."""
    if _is_serving(operand):
      return None

    def cb(spec: QuantSpec, x):
      out = self._state_for(fr, rule, prefix, spec, x, weight_name=weight_name)
      if self.mode == 'record':
        self.records.append(Record(fr.module, fr.path, weight_name, spec, out, prefix, x, kept))
      return out
    return cb

  def _state_for(self, fr, rule, prefix, spec, x, *, weight_name):
    x = jax.lax.stop_gradient(x)
    is_weight = weight_name is not None
    if spec.learned:
      return {name: self._param(fr, f'{prefix}_{name}', lambda n=name: quantizers.init_params(x, spec)[n],
                                weight_name, x.shape)
              for name in spec.learned}
    if rule.delayed_scaling:
      return self._delayed(fr, rule, prefix, spec, x)
    if rule.act_static and not is_weight:
      return self._ema(fr, rule, prefix, spec, x)
    return {}

  def _training(self, fr) -> bool:
    if self.backend == 'linen':
      return fr.module.is_mutable_collection(STATS)
    return not getattr(fr.module, 'use_running_average', False)

  def _ema(self, fr, rule, prefix, spec, x):
    if spec.granularity != 'per_tensor':
      raise ValueError(f'rule {rule.label!r}: act_static keeps one range per tensor; act granularity must be '
                       f'"per_tensor", got {spec.granularity!r}')
    scale, zp = calibration.calibrate(x, spec)
    zp = jnp.zeros_like(scale) if zp is None else zp.astype(jnp.float32)
    count = self._stat(fr, f'{prefix}_count', lambda: jnp.zeros((), jnp.float32))
    ema_s = self._stat(fr, f'{prefix}_scale', lambda: scale)
    ema_z = self._stat(fr, f'{prefix}_zero_point', lambda: zp)
    if self._training(fr):
      d = jnp.where(count.get() > 0, rule.ema_decay, 0.0)  # the first batch initialises the average
      ema_s.set(d * ema_s.get() + (1 - d) * scale)
      ema_z.set(d * ema_z.get() + (1 - d) * zp)
      count.set(count.get() + 1)
    out = {'scale': ema_s.get()}
    if spec.scheme == 'asymmetric':
      out['zero_point'] = jnp.round(ema_z.get())
    return out

  def _delayed(self, fr, rule, prefix, spec, x):
    if spec.granularity != 'per_tensor' or spec.scheme != 'symmetric':
      raise ValueError(f'rule {rule.label!r}: delayed_scaling keeps one amax history per tensor; it needs '
                       f'granularity="per_tensor" and scheme="symmetric", got {spec.granularity!r}/{spec.scheme!r}')
    amax = calibration.absmax(x, gran.scale_shape(x.shape, spec)).reshape(())
    hist = self._stat(fr, f'{prefix}_amax_history', lambda: jnp.zeros((rule.delayed_scaling,), jnp.float32))
    h = hist.get()
    past = jnp.max(h)
    use = jnp.where(past > 0, past, amax)  # no history yet: current scaling
    if self._training(fr):
      hist.set(jnp.roll(h, 1).at[0].set(amax))
    scale = calibration.symmetric_scale(use.reshape((1,) * x.ndim), spec)
    return {'scale': scale}

  # ---- backends

  def _param(self, fr, name, init, weight_name=None, x_shape=()):
    """A learned quantizer param. The param of a weight's quantizer inherits the weight's sharding annotation
    (Linen nn.with_partitioning box, NNX out_sharding metadata), with None on the axes its shape reduces."""
    if self.backend == 'linen':
      box = self._linen_box(fr, weight_name, x_shape)
      if box is None:
        return fr.module.param(name, lambda rng: init())

      def boxed(rng):
        v = init()
        return box.replace(value=v, names=scale_names(box.names, x_shape, v.shape))
      return fr.module.param(name, boxed)
    from flax import nnx  # noqa: PLC0415
    attr = f'qjax_{name}'
    var = getattr(fr.module, attr, None)
    if var is None:
      _require_eager(fr, attr)
      v = init()
      var = nnx.Param(v, **self._nnx_sharding(fr, weight_name, x_shape, v.shape))
      setattr(fr.module, attr, var)
    return var.get_value()

  def _linen_box(self, fr, weight_name, x_shape):
    """The Linen weight's partitioning box (nn.Partitioned / nn.LogicallyPartitioned), if it has one."""
    if weight_name is None or fr.module.scope is None:
      return None
    from flax.core import meta  # noqa: PLC0415
    box = fr.module.variables.get('params', {}).get(weight_name)
    if not isinstance(box, meta.Partitioned) or len(box.names) != len(x_shape):
      return None
    return box

  def _nnx_sharding(self, fr, weight_name, x_shape, shape) -> dict:
    """Metadata of an NNX weight quantizer's Param: the weight's out_sharding with None on reduced axes."""
    var = vars(fr.module).get(weight_name) if weight_name is not None else None
    if var is None or not hasattr(var, 'get_metadata'):
      return {}
    md = var.get_metadata()
    names = md.get('out_sharding')
    if not names or len(names) != len(x_shape):
      return {}
    out = {'out_sharding': scale_names(names, x_shape, shape)}
    out.update({k: md[k] for k in ('mesh', 'sharding_rules') if md.get(k) is not None})
    return out

  def _stat(self, fr, name, init) -> _Var:
    if self.backend == 'linen':
      v = fr.module.variable(STATS, name, init)
      return _Var(lambda: v.value, lambda val: setattr(v, 'value', val) if fr.module.is_mutable_collection(STATS)
                  else None)
    attr = f'qjax_{name}'
    var = getattr(fr.module, attr, None)
    if var is None:
      _require_eager(fr, attr)
      var = QuantStat(init())
      setattr(fr.module, attr, var)
    return _Var(var.get_value, var.set_value)


@dataclasses.dataclass
class _Var:
  get: Any
  set: Any


def _require_eager(fr, attr):
  from flax import nnx  # noqa: PLC0415
  if fr.session.creating:
    return
  if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(nnx.state(fr.module))):
    raise ValueError(f'{fr.path}: quantizer state {attr!r} does not exist yet and cannot be created inside a '
                     'jax transform; call qjax.flax.quantize_nnx(model, rules, *sample_inputs) (it runs the '
                     'model once eagerly to create the state)')


def _quant_stat_type():
  from flax import nnx  # noqa: PLC0415

  class QuantStat(nnx.Variable):
    """Range statistics of a quantizer (EMA of activation ranges, amax histories): not trained by optax."""
  return QuantStat


QuantStat = _quant_stat_type()
