"""The policy: for each hooked op, which rule decides it, which operands are weights, and its quantizer state.

A Session holds the rule set and a backend (qjax.flax.state: Linen or NNX variables). For each op a hook hands
it (qjax.flax.hooks), `run_op`
  1. finds the rule (first match on the module path and op name; the root module's path is '');
  2. classifies each operand: a weight when it traces back to a param of the model through shape ops
     (qjax.flax.provenance), with the param's path and the axis map; an activation otherwise;
  3. records what it decided (RuleSet.record: the per-op report) and warns, once, where a spec found nothing;
  4. runs the qjax op with the quantizer state of each operand (learned steps, static ranges, amax histories).

Phases (`Session.phase`; a rule's `mode` is the matmul execution mode): 'train' (QAT; statistics update where
the backend is training), 'record' (also keeps each operand, its spec and state: PTQ conversion, per-layer
statistics), 'serve' (weights read from ServingWeights), 'probe' (float ops, no state: op order and activation
minima), 'trace' (float ops, no state: the abstract pre-pass of an eager call, which stores each operand's origin
by use site), 'capture' (float ops, calibration statistics; qjax.flax.capture).

State names: '<op><index>_<side>_<what>', e.g. 'dot_general0_rhs_scale', prefixed by '<method>_' for ops run
from a method other than __call__ (setup-style modules: 'decode_dot_general0_lhs_scale').
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from qjax import calibration, quantizers
from qjax import granularity as gran
from qjax.flax import hooks, provenance, serving
from qjax.flax.rules import RuleError, RuleSet
from qjax.ops.conv import conv_general_dilated as q_conv
from qjax.ops.dot_general import dot_general as q_dot_general
from qjax.ops.einsum import einsum as q_einsum
from qjax.spec import QuantSpec

_STATE_NAME = re.compile(r'^(qjax_)?(\w+_)?(dot_general|conv|einsum)\d+_(lhs|rhs)_\w+$')


def is_quantizer_name(name: str) -> bool:
  """Whether a variable name is one of a quantizer state's ('dot_general0_rhs_scale', 'decode_einsum1_lhs_count')."""
  return _STATE_NAME.match(name) is not None


def restart_ranges(tree):
  """`tree` (variables, a trainer's state, an nnx.State) with every static activation range's batch count set to
  0, so that the next batch run in training mode (a calibration step) initialises the range and the batches after
  it average in (`act_static`; see `Session._ema`). PTQ calibrates so after its methods have changed the model:
  SmoothQuant, AWQ and rotations change what each layer's input is, and ranges measured before them (at init)
  served a LeNet-5 at chance accuracy with AWQ and int4 activations."""
  def restart(path, leaf):
    names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    name = next((n for n in reversed(names) if isinstance(n, str) and n != 'value'), '')
    return jnp.zeros_like(leaf) if name.endswith('_count') and is_quantizer_name(name) else leaf
  return jax.tree_util.tree_map_with_path(restart, tree)


@dataclasses.dataclass
class Record:
  """One forward operand of a quantized op, seen in 'record' mode (PTQ conversion, layer statistics)."""
  module: Any
  path: str
  weight_name: str | None  # the weight's param path in the params tree ('wte/embedding'), None for activations
  spec: QuantSpec          # resolved for this operand (its axes in the operand's layout)
  state: dict              # the quantizer params used (learned step, static range), {} when dynamic
  prefix: str              # '<op><index>_<side>'
  x: Any                   # the operand
  kept_8bit: bool = False  # the op is the model's first or last quantized op, kept at 8 bits (first_last_8bit)
  origin: provenance.Origin | None = None
  rule: str = ''


def compiled_records(fn, *args) -> list:
  """fn(*args)'s records (fn runs a model in record mode and returns its Records) from one jitted program rather
  than op by op: run eagerly, every op of the model compiles on its own for its shape (hundreds of programs: 18 s
  of a small ResNet's PTQ run). The records' static parts (paths, specs, origins) are taken at trace time, their
  arrays (quantizer state, operand) are the program's outputs; `module` stays the traced one (its path and type
  are what callers read)."""
  traced = []

  def arrays(*a):
    traced[:] = fn(*a)
    return [(r.state, r.x) for r in traced]
  out = jax.jit(arrays)(*args)
  return [dataclasses.replace(r, state=st, x=x) for r, (st, x) in zip(traced, out, strict=True)]


@dataclasses.dataclass(frozen=True)
class WeightUse:
  """How a quantized op quantizes a weight: its resolved spec (operand layout), the origin (param -> operand),
  and where the op keeps the weight's learned quantizer params (host module path, state name prefix)."""
  spec: QuantSpec
  origin: provenance.Origin
  host: tuple
  prefix: str


@dataclasses.dataclass(frozen=True)
class Operand:
  """What one operand of an op is: `origin` (a weight) or None (an activation), and why not a weight."""
  origin: provenance.Origin | None
  why: str = ''


class Session:
  """Rules plus the state backend of one quantized model, and its phase (module docstring)."""

  def __init__(self, ruleset: RuleSet, backend):
    self.ruleset = ruleset
    self.backend = backend
    self.phase = 'train'
    self.creating = False  # quantize_nnx's first run: NNX transforms (nnx.scan, nnx.jit) carry new state out
    self.records: list[Record] = []
    self.probe_mins: dict[tuple[str, str, int, str], Any] = {}
    self.origins: dict[tuple, Operand] = {}  # use site -> operand, from the 'trace' pre-pass of eager calls
    self.capture = None                      # the capture collector (qjax.flax.capture) in 'capture' mode
    self._warned: set = set()
    self.weight_uses: dict[str, WeightUse] = {}  # param path -> how its first quantized op quantizes it
    self.reads: dict[int, tuple] = {}            # id(quantized read) -> (read, param path, float param)
    self.read_floats: dict[str, Any] = {}        # param path -> the float param of this call's quantized read

  @property
  def serving(self) -> bool:
    """Params are read as ServingWeights: serve mode, or the eager pre-pass of a serve-mode call."""
    return self.phase == 'serve' or (self.phase == 'trace' and getattr(self, 'outer_phase', None) == 'serve')

  # ---- probes

  def probe(self, run) -> None:
    """Runs the model once in probe mode (every op in float, no quantizer state) so that the rule set learns the
    order of its quantized ops (first_last_8bit) and, where a rule has act_signedness='auto', each activation
    operand's minimum; then RuleSet.fix_order. `run(abstract)` runs the model and returns `self.probe_mins`
    from inside its trace."""
    phase, self.phase = self.phase, 'probe'
    self.probe_mins = {}
    try:
      mins = run(not self.ruleset.needs_data)
    finally:
      self.phase, self.probe_mins = phase, {}
    self.ruleset.fix_order(None if not self.ruleset.needs_data else mins)

  def trace_origins(self, run, key=None) -> None:
    """The pre-pass of an eager call: `run()` traces the model abstractly in 'trace' mode, where every operand
    can be traced back to its param; the origins are kept by use site for the eager run (whose concrete
    operands carry no provenance). `key` (hashable: the call's structure and input shapes) caches them."""
    cache = self.__dict__.setdefault('_origin_cache', {})
    try:
      if key is not None and key in cache:
        self.origins = cache[key]
        return
    except TypeError:  # an unhashable static argument: no caching
      key = None
    phase, self.phase, self.outer_phase = self.phase, 'trace', self.phase
    self.origins = {}
    try:
      run()
    except Exception as e:  # noqa: BLE001 -- e.g. Python control flow on values: the eager run may still work
      self.origins = {}
      warnings.warn(f'qjax: an eager call could not be traced abstractly first ({type(e).__name__}: '
                    f'{str(e)[:200]}); its operands carry no provenance, so weights derived from params by shape '
                    'ops (kernel.T, reshapes) are taken for activations in this call; run the model under jax.jit',
                    stacklevel=4)
      return
    finally:
      self.phase = phase
    if key is not None:
      cache[key] = self.origins

  # ---- quantized reads of weights (tied weights)

  def quantized_read(self, path: str, v, learned):
    """What the model reads for param `path` (float value v) while it runs in QAT: for a weight of a quantized
    op, the weight as that op quantizes it, w_hat = backward(quantize(replay(w))) dequantized in w's dtype, with
    the op's straight-through / learned-step gradient; None (read v as it is) for other params, or when the op's
    quantizer params are not there yet (`learned(host, name)` returns None: init).

    This makes a tied weight one quantized weight, in QAT as in serving: uses that are no quantized op (the
    embedding lookup of a tied LM head) read the same quantized table that serving stores, so that the serving
    forward equals the QAT evaluation forward bit for bit. The quantized op itself still gets the float param
    (run_op replays the model's shape ops on it): its forward and gradients are unchanged. Where nothing else
    reads the weight, XLA drops w_hat. How each weight is quantized is learned from the model's first quantized
    run (init, add_quant_vars, quantize_nnx's sample run); before it, params read as they are."""
    use = self.weight_uses.get(path)
    if use is None or self.phase not in ('train', 'record', 'trace') or tuple(getattr(v, 'shape', ())) != \
        use.origin.shape or not use.origin.invertible or not jnp.issubdtype(v.dtype, jnp.floating):
      return None
    state = {}
    for name in use.spec.learned:
      val = learned(use.host, f'{use.prefix}_{name}')
      if val is None:
        return None
      state[name] = val
    x = provenance.replay(use.origin, v)
    sg = jax.lax.stop_gradient
    try:
      q = quantizers.quantize(sg(x), use.spec, {k: sg(a) for k, a in state.items()} or None)
      exact = provenance.backward(use.origin, q).dequantize(v.dtype)
      # The read's forward is the served table, which QDrop never drops: its gradient is the method's without a
      # key (QDrop's: the clipped STE's, named as such so that QDrop does not warn that it trains without one).
      gspec = use.spec.method.keyless_spec(use.spec)
      fq = provenance.replay(use.origin, quantizers.fake_quant(x, gspec, state or None).astype(v.dtype),
                             back=True)
    except (ValueError, TypeError):  # e.g. a learned step stacked for nnx.scan read outside it: read as it is
      return None
    out = sg(exact) + (fq - sg(fq))  # the forward is exactly the served table; the gradient fake_quant's
    for o in {id(out): out, id(provenance.unwrap(out)): provenance.unwrap(out)}.values():  # under grad: primal
      self.reads[id(o)] = (o, path, v)
    self.read_floats[path] = v
    return out

  def end_call(self) -> None:
    """The outermost quantized call returned: forget its quantized reads."""
    self.reads.clear()
    self.read_floats.clear()

  def _float_operand(self, o: Operand, x):
    """A weight operand that the model made from a quantized read: the same shape ops on the float param."""
    if o.origin is None or not o.origin.read or o.origin.param not in self.read_floats:
      return x
    return provenance.replay(o.origin, self.read_floats[o.origin.param]).astype(x.dtype)

  # ---- classifying operands

  def classify(self, fr, site: tuple, x) -> Operand:
    if self.phase != 'trace' and not provenance.has_trace(x) and site in self.origins:
      return self.origins[site]  # an eager operand: what the abstract pre-pass found at this use site
    origin = provenance.trace_back(x, lambda v: fr.state.lookup(fr, v))
    if origin is None and fr.state.refresh(fr):  # params created since the index was built (init)
      origin = provenance.trace_back(x, lambda v: fr.state.lookup(fr, v))
    out = Operand(origin, '' if origin is not None else _why(x))
    if self.phase == 'trace':
      self.origins[site] = out
    return out

  def _weight_label(self, fr, o: Operand) -> str | None:
    """The name reports show for a weight: the param's name within the module using it, else its full path."""
    if o.origin is None:
      return None
    own = f'{fr.path}/' if fr.path else ''
    p = o.origin.param
    return p[len(own):] if own and p.startswith(own) and '/' not in p[len(own):] else p

  # ---- the ops

  def dot_general(self, fr, lhs, rhs, dims, precision, preferred_element_type, orig, via: str = ''):

    def q(lhs, rhs, cfg, lp, rp, key):
      return q_dot_general(lhs, rhs, dims, precision, preferred_element_type, config=cfg, lhs_params=lp,
                           rhs_params=rp, key=key)
    (lc, rc), _ = dims
    # A per-channel scale reduces the contracting axes only: it keeps one scale per batch index too
    # (qjax.ops.dot_general.resolve_spec), so the report lists batch axes among a weight's channel axes.
    return self.run_op(fr, 'dot_general', lhs, rhs, orig, q, (tuple(lc), tuple(rc)), (tuple(lc), tuple(rc)), via)

  def conv(self, fr, lhs, rhs, args, orig, via: str = ''):

    def q(lhs, rhs, cfg, lp, rp, key):
      return q_conv(lhs, rhs, *args, config=cfg, lhs_params=lp, rhs_params=rp, key=key)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, args[4])
    lhs_red = tuple(dn.lhs_spec[1:])              # input features and spatial axes
    rhs_red = tuple(dn.rhs_spec[1:])              # the kernel's input-feature and spatial axes
    return self.run_op(fr, 'conv', lhs, rhs, orig, q, (lhs_red, rhs_red),
                       ((dn.lhs_spec[1],), (dn.rhs_spec[1],)), via, window=args)

  def einsum(self, fr, subscripts, lhs, rhs, preferred_element_type, orig):

    def q(lhs, rhs, cfg, lp, rp, key):
      return q_einsum(subscripts, lhs, rhs, config=cfg, lhs_params=lp, rhs_params=rp, key=key,
                      preferred_element_type=preferred_element_type)
    red = _einsum_reduced(subscripts, lhs.ndim, rhs.ndim)
    return self.run_op(fr, 'einsum', lhs, rhs, orig, q, red[0], red[1])

  def unreachable(self, fr, kind, a, b, orig, why):
    """A matmul the hooks see but cannot run as one quantized op: listed in the report, run in float."""
    self.ruleset.record_unreachable(fr.path, kind, tuple(a.shape), tuple(b.shape), why)
    with _inside():
      return orig()

  def run_op(self, fr, op: str, lhs, rhs, orig, q, reduced=((), ()), contracting=((), ()), via: str = '',
             window=None):
    """One hooked op. reduced: per operand the axes its per-channel scale reduces (the contracting axes for
    matmuls; features and window for convs); contracting: the contracting axes (for capture); window: a
    conv's arguments after its operands (strides, padding, dilations, dimension numbers, groups: for capture's
    im2col patches)."""
    index = fr.counters.get(op, 0)
    fr.counters[op] = index + 1
    prefix = f'{op}{index}' if fr.method == '__call__' else f'{fr.method}_{op}{index}'
    found = self.ruleset.find(fr.path, op)
    site = (fr.path, fr.method, op, index)
    lo, ro = self.classify(fr, site + ('lhs',), lhs), self.classify(fr, site + ('rhs',), rhs)
    lhs, rhs = self._float_operand(lo, lhs), self._float_operand(ro, rhs)
    lw, rw = self._weight_label(fr, lo), self._weight_label(fr, ro)
    weights = tuple(n for n in (lw, rw) if n)
    info = dict(origins=(lo.origin, ro.origin), reduced=reduced, via=via,
                shapes=(tuple(lhs.shape), tuple(rhs.shape)), whys=(lo.why, ro.why))
    if self.phase == 'capture':
      with _inside():
        out = orig()
      if self.capture is not None and found is not None and not found[1].keep_float:
        self.capture.add(fr, prefix, op, lhs, rhs, lo, ro, contracting, out, window)
      return out
    if found is None or found[1].keep_float or self.phase == 'trace':
      if found is not None:
        self.ruleset.record(fr.path, op, index, found[1], weights, None, (lw or 'act', rw or 'act'), **info)
      with _inside():
        return orig()
    i, rule = found
    rule = self.ruleset.effective(fr.path, op, index, rule)
    try:
      cfg = rule.dot_config(lo.origin is not None, ro.origin is not None,
                            *self.ruleset.act_specs(fr.path, op, index, rule))
    except ValueError as e:
      raise RuleError(f'rule {rule.label!r} at {fr.path or "<root>"} ({op}): {e}') from None
    self.ruleset.record(fr.path, op, index, rule, weights, cfg, (lw or 'act', rw or 'act'), **info)
    self._warn_constants(fr, op, rule, (lo, ro), (lhs, rhs))
    if self.phase == 'probe':
      if rule.act_signedness == 'auto':
        for side, o, x in (('lhs', lo, lhs), ('rhs', ro, rhs)):
          if o.origin is None:
            k = (fr.path, op, index, side)
            m = jnp.min(jax.lax.stop_gradient(x)).astype(jnp.float32)
            self.probe_mins[k] = jnp.minimum(self.probe_mins[k], m) if k in self.probe_mins else m
      with _inside():
        return orig()
    kept = (fr.path, op, index) in self.ruleset.kept_8bit
    if self.phase == 'serve':
      lhs, rhs = self._served(fr, lo, lhs), self._served(fr, ro, rhs)
    lp = self._params_cb(fr, rule, f'{prefix}_lhs', lo, lhs, kept)
    rp = self._params_cb(fr, rule, f'{prefix}_rhs', ro, rhs, kept)
    key = self._key(fr, rule, cfg)
    with _inside():
      try:
        return q(lhs, rhs, cfg, lp, rp, key)
      except ValueError as e:
        raise RuleError(f'rule {rule.label!r} at {fr.path or "<root>"} ({op}): {e}') from None

  def _served(self, fr, o: Operand, x):
    """A served weight operand as its QArray in the operand's layout (its stored param's qvalues and scale
    moved along the operand's shape ops); other operands as they are."""
    if o.origin is None:
      return x
    sw = fr.state.param_value(fr, o.origin.param)
    if not serving.is_serving(sw):
      return x
    try:
      return provenance.forward(o.origin, sw.to_qarray())
    except ValueError as e:
      raise ValueError(f'{fr.path or "<root>"}: the served weight {o.origin.param} reaches this op through '
                       f'{o.origin.describe()}: {e}') from None

  def _warn_constants(self, fr, op, rule, operands, xs) -> None:
    """Warns once per rule and op when its weight spec meets an operand that is a constant but no param."""
    if rule.weight is None or any(o.origin is not None for o in operands):
      return
    for side, o, x in zip(('lhs', 'rhs'), operands, xs, strict=True):
      if o.why.startswith('a constant'):
        key = (rule.label, fr.path, op, side)
        if key not in self._warned:
          self._warned.add(key)
          warnings.warn(f'qjax: rule {rule.label!r} has a weight spec, but the {side} of {fr.path or "<root>"} '
                        f'({op}, shape {tuple(x.shape)}) is {o.why}; it is quantized as an activation',
                        stacklevel=5)

  def _key(self, fr, rule, cfg):
    specs = [s for s in (cfg.fwd.lhs, cfg.fwd.rhs, cfg.dlhs.lhs, cfg.dlhs.rhs, cfg.drhs.lhs, cfg.drhs.rhs)
             if s is not None]
    if any(s.rounding == 'stochastic' for s in specs):
      return fr.state.rng(fr, rule)
    if any(s.method.random_in_training() for s in specs):  # QDrop: random in training only
      return fr.state.training_rng(fr, rule)
    return None

  # ---- quantizer state

  def _params_cb(self, fr, rule, prefix: str, o: Operand, operand, kept: bool = False):
    """The params callable handed to the op for one forward operand (see qjax.ops.dot_general)."""
    if isinstance(operand, quantizers.QArray):
      return None
    weight = o.origin.param if o.origin is not None else None

    def cb(spec: QuantSpec, x):
      out = self._state_for(fr, rule, prefix, spec, x, o)
      if (weight is not None and self.phase in ('train', 'record') and spec.rounding != 'stochastic'
          and not rule.delayed_scaling):
        host = (tuple(str(p) for p in getattr(fr.module, 'path', ())) if fr.state.name == 'linen'
                else tuple(p for p in fr.path.split('/') if p))  # Linen: within its root scope; NNX: the model
        self.weight_uses.setdefault(weight, WeightUse(spec, dataclasses.replace(o.origin, read=False), host,
                                                      prefix))
      if self.phase == 'record':
        self.records.append(Record(fr.module, fr.path, weight, spec, out, prefix, x, kept, o.origin, rule.label))
      return out
    return cb

  def _state_for(self, fr, rule, prefix, spec, x, o: Operand):
    x = jax.lax.stop_gradient(x)
    is_weight = o.origin is not None
    if spec.learned:
      return {name: fr.state.param(fr, f'{prefix}_{name}',
                                       lambda n=name: quantizers.init_params(x, spec)[n], o.origin, x.shape)
              for name in spec.learned}
    if rule.delayed_scaling:
      return self._delayed(fr, rule, prefix, spec, x)
    if rule.act_static and not is_weight:
      return self._ema(fr, rule, prefix, spec, x)
    return {}

  def _ema(self, fr, rule, prefix, spec, x):
    # One range per tensor (QuantRule checks the act granularity when the rule is made).
    scale, zp = calibration.calibrate(x, spec)
    zp = jnp.zeros_like(scale) if zp is None else zp.astype(jnp.float32)
    count = fr.state.stat(fr, f'{prefix}_count', lambda: jnp.zeros((), jnp.float32))
    ema_s = fr.state.stat(fr, f'{prefix}_scale', lambda: scale)
    ema_z = fr.state.stat(fr, f'{prefix}_zero_point', lambda: zp)
    if fr.state.training(fr):
      # The first batch initialises the average; the mean of the first n batches follows, until their window
      # fills (n = 1 / (1 - decay): 100 at 0.99), then the EMA. Without the mean, N calibration batches weighed
      # the first one 0.99^(N-1) (86% of 16) and the range was that batch's.
      n = count.get()
      d = jnp.where(n > 0, jnp.minimum(rule.ema_decay, n / (n + 1)), 0.0)
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
    hist = fr.state.stat(fr, f'{prefix}_amax_history', lambda: jnp.zeros((rule.delayed_scaling,), jnp.float32))
    h = hist.get()
    past = jnp.max(h)
    use = jnp.where(past > 0, past, amax)  # no history yet: current scaling
    if fr.state.training(fr):
      hist.set(jnp.roll(h, 1).at[0].set(amax))
    scale = calibration.symmetric_scale(use.reshape((1,) * x.ndim), spec)
    return {'scale': scale}


def _inside():
  return hooks.inside_op()


def _why(x) -> str:
  """Why operand x is not a weight, for reports and warnings."""
  v = provenance.unwrap(x)
  eqn = getattr(v, 'parent', None) if isinstance(v, jax.core.Tracer) else None
  if eqn is not None:
    return f'made by {eqn.primitive.name}, not from a param by shape ops'
  if isinstance(v, jax.core.Tracer):
    return 'an input of the traced function'
  return 'a constant that is not a param of the model'


def _einsum_reduced(subscripts: str, lnd: int, rnd: int):
  """(reduced axes of lhs, of rhs), (contracting axes of lhs, of rhs) of a two-operand einsum: reduced are the
  axes whose letter is not in the output (what a per-channel scale reduces: batch letters keep a scale each, as
  in `qjax.ops.dot_general.resolve_spec`); contracting those not in the output and in both operands, paired as
  `lax.dot_general` pairs them (the rhs axis i carries the letter of the lhs axis i). Ellipses
  count as batch, aligned from the right as broadcasting aligns them; an implicit output (no '->') keeps them."""
  ins, arrow, out = subscripts.replace(' ', '').partition('->')
  a, b = ins.split(',')
  if not arrow:
    letters = [c for c in a + b if c != '.']
    out = ('...' if '...' in a + b else '') + ''.join(sorted(c for c in set(letters) if letters.count(c) == 1))

  def n_ell(s, nd):
    return nd - len(s.replace('...', '')) if '...' in s else 0
  m = max(n_ell(a, lnd), n_ell(b, rnd))

  def expand(s, n):  # the last n of the m broadcast dims
    return s.replace('...', ''.join(chr(0x100 + m - n + i) for i in range(n)))
  a, b, out = expand(a, n_ell(a, lnd)), expand(b, n_ell(b, rnd)), expand(out, m)
  red = lambda s: tuple(i for i, c in enumerate(s) if c not in out)
  lc = tuple(i for i, c in enumerate(a) if c not in out and c in b)
  return (red(a), red(b)), (lc, tuple(b.index(a[i]) for i in lc))


def call_signature(*parts):
  """A hashable key of a call for trace_origins: the tree structure, the shapes and dtypes of its array leaves,
  and its other leaves as they are (None when one is unhashable)."""
  leaves, treedef = jax.tree.flatten(parts)
  sig = []
  for leaf in leaves:
    if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
      sig.append((tuple(leaf.shape), str(leaf.dtype)))
    else:
      try:
        hash(leaf)
      except TypeError:
        return None
      sig.append(('static', type(leaf).__name__, leaf))
  return treedef, tuple(sig)
