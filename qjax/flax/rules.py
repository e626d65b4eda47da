"""Rules: which ops of which modules are quantized, and how. Plain data, so configs and sweeps can hold them.

A rule set is an ordered list of `QuantRule`s; for each op (dot_general, conv, einsum) met while a model
runs, the first rule whose `module_path` regex fully matches the module's path ('encoder/layers_0/attn/query';
the root module's path is '', shown as '<root>' in reports, and a rule may name it either way) and whose
`op_names` contain the op decides. A rule with `keep_float=True` leaves the op in float.

For an op with one weight operand (a param of the module, e.g. a Dense kernel) and one activation, `weight`
quantizes the weight and `act` the activation; an op of two activations (attention scores) uses `act` for
both. `grad` quantizes the incoming gradient of the two backward matmuls (dlhs = g.W^T, drhs = X^T.g); the
other operand of each backward matmul reuses the forward spec (learned parameters aside). `grad=None` keeps
the backward in float.

Rules with `first_last_8bit=True` keep the model's first and last quantized ops (in execution order, over all
rules: the convention of LSQ, PACT, DoReFa and most low-bit papers) at 8 bits. Execution order is only known
once the model has run, so a RuleSet whose rules ask for it is probed first: the model runs once in float
(abstractly where the backend allows) while the rule set records which ops it would quantize, in order; the
first and last of them then run with `eight_bit(spec)` for their weight and activation specs from the very
first real run on (so learned steps are initialised for the 8-bit grid).

`act_signedness` chooses the activation grid's sign: 'format' (the default) uses the act format as written;
'signed' / 'unsigned' force int<b> / uint<b> of the same bit-width; 'auto' decides per activation operand from
data: the probe run (on the sample inputs of the first init / quantize_nnx call, i.e. the first batch) records
each activation operand's minimum, and an operand whose minimum is >= 0 (after ReLU, softmax) gets the unsigned
grid, any other the signed one. It is decided from calibration statistics, not from the producing op, because
the hooks see only the tensor, not the op that made it. 'auto' changes symmetric integer grids only
(asymmetric grids already place their zero point from the data; float formats have no unsigned form).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax

from qjax import formats
from qjax.ops.config import MODES, DotConfig, MatmulConfig
from qjax.spec import QuantSpec, check_choice

OP_NAMES = ('dot_general', 'conv', 'einsum')
ACT_SIGNEDNESS = ('format', 'auto', 'signed', 'unsigned')


class RuleError(ValueError):
  """A rule cannot apply to an op it matched, as the model stands (e.g. a group size that does not divide the
  op's contraction, mode='real' for formats without a native matmul): the message names the rule, the op's
  module path and the op. Found when the model first runs quantized (init), since it needs the op's shapes."""


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One rule; see the module docstring.

  Attributes:
    module_path: regex, fully matched against the '/'-joined module path.
    op_names: ops the rule applies to, among 'dot_general', 'conv', 'einsum'.
    weight, act, grad: QuantSpecs (or dicts of QuantSpec fields) or None.
    mode: 'auto' | 'real' | 'fake' for the forward matmul; bwd_mode for the two gradient matmuls.
    act_static: static-range activations: keep an EMA of the activation range in a statistics collection
      (updated in training mode only) and quantize with it in evaluation and serving.
    ema_decay: decay of that EMA (the running mean of the first 1 / (1 - ema_decay) batches, then the EMA).
    delayed_scaling: > 0 keeps an amax history of this length per forward operand and scales with its
      maximum (fp8 delayed scaling, as in Transformer Engine); the current amax is rolled in after use.
    keep_float: leave matched ops unquantized (a rule that excludes, e.g., the first and last layers).
    small_m: DotConfig.small_m of matched ops: forward matmuls with at most this many rows run as float
      matmuls of the quantized values in 'auto' mode (default 0: none; one-row dots are padded to two on CPU).
    first_last_8bit: when the model's first or last quantized op (execution order, over all rules) is decided
      by this rule, its weight and act specs are raised to 8 bits (`eight_bit`); see the module docstring.
    act_signedness: 'format' | 'auto' | 'signed' | 'unsigned': the activation grid's sign (module docstring).
    name: shown in reports and errors (default: the regex).
  """
  module_path: str = '.*'
  op_names: tuple[str, ...] = OP_NAMES
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  grad: QuantSpec | None = None
  mode: str = 'auto'
  bwd_mode: str = 'auto'
  act_static: bool = False
  ema_decay: float = 0.99
  delayed_scaling: int = 0
  keep_float: bool = False
  small_m: int = 0
  first_last_8bit: bool = False
  act_signedness: str = 'format'
  name: str = ''

  def __post_init__(self):
    label = self.label
    try:
      object.__setattr__(self, '_regex', re.compile(self.module_path))
    except re.error as e:
      raise ValueError(f'rule {label!r}: module_path={self.module_path!r} is not a valid regex: {e}') from None
    ops = (self.op_names,) if isinstance(self.op_names, str) else tuple(self.op_names)
    for op in ops:
      check_choice('op_names', op, OP_NAMES, where=f'rule {label!r}: ')
    object.__setattr__(self, 'op_names', ops)
    for field in ('weight', 'act', 'grad'):
      v = getattr(self, field)
      if _is_mapping(v):  # a dict, or an ml_collections ConfigDict
        try:
          object.__setattr__(self, field, QuantSpec.from_dict(dict(v)))
        except ValueError as e:
          raise ValueError(f'rule {label!r}: {field}: {e}') from None
      elif v is not None and not isinstance(v, QuantSpec):
        raise ValueError(f'rule {label!r}: {field} must be a QuantSpec, a dict or None, got {type(v).__name__}')
    check_choice('mode', self.mode, MODES, where=f'rule {label!r}: ')
    check_choice('bwd_mode', self.bwd_mode, MODES, where=f'rule {label!r}: ')
    if self.grad is not None and self.grad.learned:
      raise ValueError(f'rule {label!r}: grad uses estimator={self.grad.estimator!r}; gradients have no '
                       'learned quantizer parameters (use ste)')
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f'rule {label!r}: ema_decay must be in [0, 1), got {self.ema_decay}')
    if self.small_m < 0:
      raise ValueError(f'rule {label!r}: small_m must be >= 0, got {self.small_m}')
    if self.delayed_scaling < 0:
      raise ValueError(f'rule {label!r}: delayed_scaling must be >= 0, got {self.delayed_scaling}')
    if self.act_static and self.act is not None and self.act.learned:
      raise ValueError(f'rule {label!r}: act_static keeps range statistics; it cannot be combined with the '
                       f'learned estimator {self.act.estimator!r}')
    if self.act_static and not self.delayed_scaling and self.act is not None and (
        self.act.granularity != 'per_tensor'):
      raise ValueError(f'rule {label!r}: act_static keeps one range per tensor; act granularity must be '
                       f'"per_tensor", got {self.act.granularity!r}')
    check_choice('act_signedness', self.act_signedness, ACT_SIGNEDNESS, where=f'rule {label!r}: ')
    if self.act is not None and self.act_signedness in ('signed', 'unsigned') and not isinstance(
        self.act.fmt, formats.IntFormat):
      raise ValueError(f'rule {label!r}: act_signedness={self.act_signedness!r} needs an integer act format; '
                       f'{self.act.format!r} has no signed/unsigned forms (use act_signedness="format")')
    if self.act is not None and self.act_signedness != 'format':
      for signed in (False, True):  # the grids the rule may pick must be valid specs: say so now, not mid-run
        try:
          with_signedness(self.act, signed)
        except ValueError as e:
          raise ValueError(f'rule {label!r}: act_signedness={self.act_signedness!r}: the '
                           f'{"signed" if signed else "unsigned"} act grid is not a valid spec: {e}') from None
    if not self.keep_float and self.weight is None and self.act is None and self.grad is None:
      raise ValueError(f'rule {label!r}: quantizes nothing (weight, act and grad are all None); '
                       'set keep_float=True to keep matched ops in float')

  @property
  def label(self) -> str:
    return self.name or self.module_path

  def matches(self, path: str, op: str) -> bool:
    """The op at module `path` ('' for the root module, which a rule may also name '<root>') is this rule's."""
    if op not in self.op_names:
      return False
    return self._regex.fullmatch(path) is not None or (path == '' and self._regex.fullmatch('<root>') is not None)

  def dot_config(self, lhs_is_weight: bool, rhs_is_weight: bool, lhs_act: QuantSpec | None = None,
                 rhs_act: QuantSpec | None = None) -> DotConfig:
    """The DotConfig of one op given which operands are weights; lhs_act / rhs_act replace `act` for that side
    (the grid act_signedness chose for it; the backward matmuls reuse it, like every forward spec)."""
    lw = self.weight if lhs_is_weight else lhs_act or self.act
    rw = self.weight if rhs_is_weight else rhs_act or self.act
    fwd = MatmulConfig(lw, rw, self.mode)
    if self.grad is None:
      return DotConfig(fwd=fwd, small_m=self.small_m)
    strip = lambda s: None if s is None else s.replace(estimator=QuantSpec.estimator)  # bwd: the default (STE)
    return DotConfig(fwd=fwd, dlhs=MatmulConfig(self.grad, strip(rw), self.bwd_mode),
                     drhs=MatmulConfig(strip(lw), self.grad, self.bwd_mode), small_m=self.small_m)

  @property
  def needs_rng(self) -> bool:
    """Its specs round stochastically or use a method that is random in training (QDrop): the model needs a
    'quant' PRNG stream (Linen: `rngs={'quant': key}`; NNX: `quantize_nnx(..., seed=...)`)."""
    specs = [s for s in (self.weight, self.act, self.grad) if s is not None]
    return not self.keep_float and any(s.rounding == 'stochastic' or s.method.random_in_training() for s in specs)

  def at_8bit(self) -> QuantRule:
    """This rule with its weight and act specs at 8 bits (for a first or last op); grad is unchanged."""
    return dataclasses.replace(self, weight=eight_bit(self.weight), act=eight_bit(self.act))

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for k in ('weight', 'act', 'grad'):
      d[k] = d[k] and d[k].to_dict()
    d['op_names'] = list(self.op_names)
    return d


def eight_bit(spec: QuantSpec | None) -> QuantSpec | None:
  """The 8-bit version of a spec, keeping granularity, scheme, calibration and estimator: an integer grid of
  fewer bits becomes int8 (uint8 when unsigned, int8n when narrow), an MX format mxint8, any other format of
  fewer than 8 bits (fp4, nf4, codebook) int8. Specs of 8 bits or more are returned as they are."""
  if spec is None or spec.bits >= 8:
    return spec
  fmt = spec.fmt
  if isinstance(fmt, formats.IntFormat):
    name = 'int8n' if fmt.narrow else 'int8' if fmt.signed else 'uint8'
  else:
    name = 'mxint8' if isinstance(fmt, formats.MXFormat) else 'int8'
  return dataclasses.replace(spec, format=name, codebook=None)


def with_signedness(spec: QuantSpec | None, signed: bool) -> QuantSpec | None:
  """spec on the signed (int<b>) or unsigned (uint<b>) integer grid of the same bit-width; other formats, and
  grids that already have that sign, are returned as they are."""
  fmt = None if spec is None else spec.fmt
  if not isinstance(fmt, formats.IntFormat) or fmt.signed == signed:
    return spec
  return dataclasses.replace(spec, format=f'int{fmt.bits}' if signed else f'uint{fmt.bits}')


def _is_mapping(v) -> bool:
  return isinstance(v, Mapping) or (hasattr(v, 'keys') and hasattr(v, '__getitem__') and not isinstance(v, type))


def _to_rule(i: int, r) -> QuantRule:
  """A QuantRule from a QuantRule or a dict of its fields (as a config holds it)."""
  if isinstance(r, QuantRule):
    return r
  if not _is_mapping(r):
    raise ValueError(f'rule {i}: a rule is a QuantRule or a dict of its fields, got {type(r).__name__} {r!r}')
  d = dict(r)
  if 'float' in d:  # the field's name before keep_float, still accepted where configs and command lines hold it
    if 'keep_float' in d:
      raise ValueError(f'rule {i}: give keep_float or its old name float, not both')
    d['keep_float'] = d.pop('float')
  fields = tuple(sorted(f.name for f in dataclasses.fields(QuantRule)))
  for k in d:
    check_choice('QuantRule field', k, fields, where=f'rule {i} ({d.get("name") or d.get("module_path", ".*")!r}): ')
  return QuantRule(**d)


@dataclasses.dataclass
class Match:
  """One op that a rule decided, for reports.

  Attributes:
    path, op: the module path and the op ('dot_general', 'conv', 'einsum').
    rule: the deciding rule's label.
    weight_operands: names of the operands that are the module's params (e.g. ('kernel',)); () for an op of two
      activations (attention scores).
    config: a one-line description of the forward (and backward) quantization, or 'float'.
    lhs, rhs: what each operand is: 'act', or the weight param's name.
    dot_config: the DotConfig the op runs with (None: float).
    kept_8bit: the op is the model's first or last quantized op, kept at 8 bits by its rule's first_last_8bit.
    act_signedness: how the activation grids were chosen (the rule's act_signedness).
    lhs_weight, rhs_weight: the weight operand's param path in the params tree ('wte/embedding'), or None.
    lhs_channels, rhs_channels: the param axes a weight operand keeps per channel (its axes that the op does
      not reduce, mapped back through the shape ops between param and operand), e.g. (0,) for a kernel stored
      (out, in) and used as `kernel.T`.
    via: the function the model called when it was not the op itself ('matmul' for `@` / jnp.matmul, 'dot').
    shapes: the operands' shapes.
  """
  path: str
  op: str
  rule: str
  weight_operands: tuple[str, ...]
  config: str
  lhs: str = 'act'
  rhs: str = 'act'
  dot_config: DotConfig | None = None
  kept_8bit: bool = False
  act_signedness: str = 'format'
  lhs_weight: str | None = None
  rhs_weight: str | None = None
  lhs_channels: tuple = ()
  rhs_channels: tuple = ()
  via: str = ''
  shapes: tuple = ()

  def describe_operands(self) -> str:
    parts = []
    for side, w, ch in (('lhs', self.lhs_weight, self.lhs_channels), ('rhs', self.rhs_weight, self.rhs_channels)):
      if w is not None:
        parts.append(f'{side}=param {w} (channel axes {tuple(ch)})')
    return ', '.join(parts)


class RuleSet:
  """An ordered rule list with bookkeeping: which rules matched, and what was quantized how."""

  def __init__(self, rules):
    rules = [_to_rule(i, r) for i, r in enumerate(rules)]
    if not rules:
      raise ValueError('the rule list is empty: nothing would be quantized')
    self.rules = tuple(rules)
    self.used: set[int] = set()
    self.matches: dict[tuple[str, str, int], Match] = {}
    self.seen: dict[tuple[str, str], None] = {}  # every (module path, op) looked up, in order
    self._checked = False
    self.kept_8bit: set[tuple[str, str, int]] = set()  # (path, op, index) of the first and last quantized ops
    self.act_min: dict[tuple[str, str, int, str], float] = {}  # (path, op, index, side) -> probe minimum
    self.unreachable: dict[tuple, str] = {}  # matmuls seen but not quantizable: (path, kind, shapes) -> why
    self.weighted: set[int] = set()          # rules that found a weight operand in some op they matched
    self.no_weight: dict[int, list[str]] = {}  # rules with a weight spec: ops they matched without a weight
    self.needs_data = any(r.act_signedness == 'auto' for r in self.rules)
    self.order_known = not (self.needs_data or any(r.first_last_8bit for r in self.rules))

  @property
  def needs_rng(self) -> bool:
    """Some rule needs a 'quant' PRNG stream (QuantRule.needs_rng)."""
    return any(r.needs_rng for r in self.rules)

  @property
  def learns(self) -> bool:
    """Some rule quantizes with learned quantizer params (an LSQ step, a PACT clip, ...): the model then has
    'params' that the unquantized model lacks. Gradients have none (a grad spec with a learned estimator is
    refused)."""
    return any(s is not None and s.learned for r in self.rules if not r.keep_float for s in (r.weight, r.act))

  @property
  def needs_probe(self) -> bool:
    """A rule asks for first_last_8bit or act_signedness='auto' and no probe has run yet (module docstring).
    `needs_data`: the probe must run on real inputs (for the activations' minima), not only be traced."""
    return not self.order_known

  def fix_order(self, act_min: Mapping[tuple[str, str, int, str], float] | None = None) -> None:
    """Called after a probe run: takes the first and last quantized ops it recorded as the ops kept at 8 bits
    (where their rule has first_last_8bit) and keeps the activation minima it measured (act_signedness='auto'),
    then forgets the probe's bookkeeping so reports describe real runs."""
    q = [k for k, m in self.matches.items() if m.config != 'float']
    ends = {q[0], q[-1]} if q else set()
    self.kept_8bit = {k for k in ends if self.peek(k[0], k[1]).first_last_8bit}
    try:
      self.act_min = {k: float(v) for k, v in (act_min or {}).items()}
    except jax.errors.ConcretizationTypeError:
      raise ValueError("act_signedness='auto' decides each activation grid from data, which a jax transform "
                       'hides: call QuantizedLinen.prepare (or init) on concrete inputs outside jax.jit first, or '
                       'quantize_nnx with sample inputs') from None
    self.order_known = True
    self.used, self.matches, self.seen = set(), {}, {}
    self.weighted, self.no_weight, self.unreachable = set(), {}, {}

  def forget_probe(self) -> None:
    """Drops what a probe measured (the quantized ops' order, the activations' minima), so that the next call
    probes again: after a change to the model that moves them, e.g. PTQ's online input ops (a rotation turns
    a non-negative input into a signed one). A no-op for rules that need no probe."""
    self.order_known = not (self.needs_data or any(r.first_last_8bit for r in self.rules))
    self.act_min, self.kept_8bit = {}, set()

  def act_specs(self, path: str, op: str, index: int, rule: QuantRule) -> tuple[QuantSpec | None, QuantSpec | None]:
    """The act spec of each side (lhs, rhs) of an op, by the rule's act_signedness (module docstring). Under
    'auto', an operand the probe did not see (or measured no minimum for) keeps the format as written."""
    mode = rule.act_signedness
    if mode in ('signed', 'unsigned'):
      spec = with_signedness(rule.act, mode == 'signed')
      return spec, spec
    if mode == 'format' or rule.act is None or rule.act.scheme != 'symmetric':
      return rule.act, rule.act
    out = []
    for side in ('lhs', 'rhs'):
      m = self.act_min.get((path, op, index, side))
      out.append(rule.act if m is None else with_signedness(rule.act, m < 0))
    return out[0], out[1]

  def effective(self, path: str, op: str, index: int, rule: QuantRule) -> QuantRule:
    """The rule an op runs with: `rule`, or its 8-bit version for a first or last op it keeps at 8 bits."""
    return rule.at_8bit() if (path, op, index) in self.kept_8bit else rule

  def find(self, path: str, op: str) -> tuple[int, QuantRule] | None:
    self.seen[(path, op)] = None
    for i, rule in enumerate(self.rules):
      if rule.matches(path, op):
        self.used.add(i)
        return i, rule
    return None

  def peek(self, path: str, op: str) -> QuantRule | None:
    """The rule that decides (path, op), without marking it used."""
    return next((r for r in self.rules if r.matches(path, op)), None)

  def record(self, path: str, op: str, index: int, rule: QuantRule, weights: tuple[str, ...], config,
             operands: tuple[str, str] = ('act', 'act'), *, origins=(None, None), reduced=((), ()), via: str = '',
             shapes: tuple = (), whys: tuple[str, str] = ('', '')) -> None:
    """Records what an op was decided to be. origins: per operand its provenance.Origin (a weight) or None;
    reduced: per operand the axes its scale reduces (the others are its channel axes)."""
    desc = 'float' if config is None else _describe(config)
    channels = []
    for o, red, shape in zip(origins, reduced, shapes or ((), ()), strict=True):
      keep = [a for a in range(len(shape)) if a not in red] if o is not None else []
      channels.append(tuple(o.axes[a] for a in keep) if o is not None else ())
    self.matches[(path, op, index)] = Match(
        path, op, rule.label, weights, desc, operands[0], operands[1], config, (path, op, index) in self.kept_8bit,
        rule.act_signedness, origins[0] and origins[0].param, origins[1] and origins[1].param, channels[0],
        channels[1], via, tuple(shapes))
    i = self.rules.index(rule) if rule in self.rules else next(
        (j for j, r in enumerate(self.rules) if r.label == rule.label), -1)
    if any(o is not None for o in origins):
      self.weighted.add(i)
    elif rule.weight is not None and not rule.keep_float:
      why = '; '.join(f'{s} is {w}' for s, w in zip(('lhs', 'rhs'), whys, strict=True) if w)
      site = f'{path or "<root>"} ({op}{index}{", " + why if why else ""})'
      if site not in self.no_weight.setdefault(i, []):
        self.no_weight[i].append(site)

  def record_unreachable(self, path: str, kind: str, a_shape, b_shape, why: str) -> None:
    """A matmul the model computes where no rule can reach it (run in float): listed in the report."""
    self.unreachable[(path, kind, tuple(a_shape), tuple(b_shape))] = why
    self.seen[(path, f'{kind}, not reachable')] = None

  def check_first_run(self) -> None:
    """Called after a model's first run: warns (once) about rules that matched no op, naming them, and when no
    op was quantized at all."""
    if self._checked:
      return
    self._checked = True
    unused = ', '.join(repr(r.label) for r in self.unused_rules())
    seen = ', '.join(f'{p or "<root>"} ({op})' for p, op in self.seen) or 'none'
    if not self.quantized():
      warnings.warn(f'qjax: the rules quantized no op of the model (rules that matched no op: {unused or "none"}; '
                    f'the ops the model ran: {seen})', stacklevel=3)
    elif unused:
      warnings.warn(f'qjax: rules that matched no op: {unused}; check their module_path regex and op_names '
                    'against the paths in RuleSet.report()', stacklevel=3)
    for i, ops in self.no_weight.items():
      if i not in self.weighted and 0 <= i < len(self.rules):
        warnings.warn(f'qjax: rule {self.rules[i].label!r} has a weight spec, but none of the {len(ops)} op(s) it '
                      f'matched has an operand derived from a param of the model, so it quantizes no weight: '
                      f'{"; ".join(ops[:3])}{" ..." if len(ops) > 3 else ""}', stacklevel=3)
    for (path, kind, a, b), why in self.unreachable.items():
      warnings.warn(f'qjax: not quantized, not reachable: {kind} at {path or "<root>"} of shapes {a} x {b} '
                    f'({why})', stacklevel=3)

  def unused_rules(self) -> list[QuantRule]:
    return [r for i, r in enumerate(self.rules) if i not in self.used]

  def report(self) -> str:
    lines = [f'{m.path or "<root>":40s} {m.op:12s} rule={m.rule!r:20s} lhs={m.lhs} rhs={m.rhs}  {m.config}'
             + ('  (first/last op: kept at 8 bits)' if m.kept_8bit else '')
             + (f'  (act grid: {m.act_signedness})' if m.act_signedness != 'format' and m.config != 'float' else '')
             + (f'  [{m.describe_operands()}]' if m.describe_operands() else '')
             + (f'  (via {m.via})' if m.via else '')
             for m in self.matches.values()]
    lines += [f'{path or "<root>":40s} {kind:12s} not quantized, not reachable: shapes {a} x {b} ({why})'
              for (path, kind, a, b), why in self.unreachable.items()]
    unused = self.unused_rules()
    if unused:
      lines.append('rules that matched nothing: ' + ', '.join(repr(r.label) for r in unused))
    return '\n'.join(lines)

  def quantized(self) -> list[Match]:
    return [m for m in self.matches.values() if m.config != 'float']


def _describe(cfg: DotConfig) -> str:
  s = lambda spec: 'f' if spec is None else f'{spec.format}/{spec.granularity[4:]}/{spec.estimator}'
  out = f'fwd[{s(cfg.fwd.lhs)} x {s(cfg.fwd.rhs)}, {cfg.fwd.mode}]'
  if cfg.dlhs.quantized or cfg.drhs.quantized:
    out += f' bwd[g={s(cfg.dlhs.lhs)}, {cfg.dlhs.mode}]'
  return out
