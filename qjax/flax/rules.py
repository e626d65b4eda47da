"""Rules: which ops of which modules are quantized, and how. Plain data, so configs and sweeps can hold them.

A rule set is an ordered list of `QuantRule`s; for each op (dot_general, conv, einsum) met while a model
runs, the first rule whose `module_path` regex fully matches the module's path ('encoder/layers_0/attn/query')
and whose `op_names` contain the op decides. A rule with `float=True` leaves the op in float.

For an op with one weight operand (a param of the module, e.g. a Dense kernel) and one activation, `weight`
quantizes the weight and `act` the activation; an op of two activations (attention scores) uses `act` for
both. `grad` quantizes the incoming gradient of the two backward matmuls (dlhs = g.W^T, drhs = X^T.g); the
other operand of each backward matmul reuses the forward spec (learned parameters aside). `grad=None` keeps
the backward in float.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from qjax.ops.config import MODES, DotConfig, MatmulConfig
from qjax.spec import QuantSpec, check_choice

OP_NAMES = ('dot_general', 'conv', 'einsum')


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
    ema_decay: decay of that EMA.
    delayed_scaling: > 0 keeps an amax history of this length per forward operand and scales with its
      maximum (fp8 delayed scaling, as in Transformer Engine); the current amax is rolled in after use.
    float: leave matched ops unquantized (a rule that excludes, e.g., the first and last layers).
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
  float: bool = False
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
      if isinstance(v, dict):
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
    if self.delayed_scaling < 0:
      raise ValueError(f'rule {label!r}: delayed_scaling must be >= 0, got {self.delayed_scaling}')
    if self.act_static and self.act is not None and self.act.learned:
      raise ValueError(f'rule {label!r}: act_static keeps range statistics; it cannot be combined with the '
                       f'learned estimator {self.act.estimator!r}')
    if not self.float and self.weight is None and self.act is None and self.grad is None:
      raise ValueError(f'rule {label!r}: quantizes nothing (weight, act and grad are all None); '
                       'set float=True to keep matched ops in float')

  @property
  def label(self) -> str:
    return self.name or self.module_path

  def matches(self, path: str, op: str) -> bool:
    return op in self.op_names and self._regex.fullmatch(path) is not None

  def dot_config(self, lhs_is_weight: bool, rhs_is_weight: bool) -> DotConfig:
    """The DotConfig of one op given which operands are weights."""
    lw = self.weight if lhs_is_weight else self.act
    rw = self.weight if rhs_is_weight else self.act
    fwd = MatmulConfig(lw, rw, self.mode)
    if self.grad is None:
      return DotConfig(fwd=fwd)
    strip = lambda s: None if s is None else s.replace(estimator='ste')  # bwd matmuls learn nothing
    return DotConfig(fwd=fwd, dlhs=MatmulConfig(self.grad, strip(rw), self.bwd_mode),
                     drhs=MatmulConfig(strip(lw), self.grad, self.bwd_mode))

  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for k in ('weight', 'act', 'grad'):
      d[k] = d[k] and d[k].to_dict()
    d['op_names'] = list(self.op_names)
    return d


@dataclasses.dataclass
class Match:
  """One op that a rule decided, for reports."""
  path: str
  op: str
  rule: str
  weight_operands: tuple[str, ...]
  config: str


class RuleSet:
  """An ordered rule list with bookkeeping: which rules matched, and what was quantized how."""

  def __init__(self, rules):
    rules = [r if isinstance(r, QuantRule) else QuantRule(**dict(r)) for r in rules]
    if not rules:
      raise ValueError('the rule list is empty: nothing would be quantized')
    self.rules = tuple(rules)
    self.used: set[int] = set()
    self.matches: dict[tuple[str, str, int], Match] = {}

  def find(self, path: str, op: str) -> tuple[int, QuantRule] | None:
    for i, rule in enumerate(self.rules):
      if rule.matches(path, op):
        self.used.add(i)
        return i, rule
    return None

  def peek(self, path: str, op: str) -> QuantRule | None:
    """The rule that decides (path, op), without marking it used."""
    return next((r for r in self.rules if r.matches(path, op)), None)

  def record(self, path: str, op: str, index: int, rule: QuantRule, weights: tuple[str, ...], config) -> None:
    desc = 'float' if config is None else _describe(config)
    self.matches[(path, op, index)] = Match(path, op, rule.label, weights, desc)

  def unused_rules(self) -> list[QuantRule]:
    return [r for i, r in enumerate(self.rules) if i not in self.used]

  def report(self) -> str:
    lines = [f'{m.path:40s} {m.op:12s} rule={m.rule!r:20s} {m.config}' for m in self.matches.values()]
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
