"""From `config.quant` (names and numbers) to qjax rules.

    config.quant.weight / act / grad    QuantSpec fields; format '' leaves that operand in float
    config.quant.float_layers           regex of module paths kept in float ('' for none)
    config.quant.groups.<name>          per-layer-group overrides: module_path plus partial weight/act/grad fields,
                                        or keep_float=True (old name: float) to leave the group in float
    config.quant.mode, bwd_mode, act_static, ema_decay, delayed_scaling, small_m (QuantRule fields)
    config.quant.first_last_8bit        keep the model's first and last quantized ops (execution order) at 8 bits,
                                        the convention of LSQ, PACT and DoReFa (QuantRule.first_last_8bit)
    config.quant.act_signedness         'auto' (default here: unsigned grid for activations that are non-negative
                                        on the first batch) | 'format' (act format as written) | 'signed' |
                                        'unsigned'

Rules are built in order: float_layers, then the groups (in their order), then the default rule '.*'.
"""

from __future__ import annotations

import dataclasses
import types

import ml_collections

from qjax.flax import QuantRule
from qjax.spec import QuantSpec

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(QuantSpec) if f.name not in ('axis', 'codebook'))

# The QuantRule fields config.quant carries as plain keys, with QuantRule's own defaults (read from the dataclass,
# so the config cannot drift from the library).
RULE_FIELDS = ('mode', 'bwd_mode', 'act_static', 'ema_decay', 'delayed_scaling', 'small_m', 'first_last_8bit',
               'act_signedness')
RULE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(QuantRule) if f.name in RULE_FIELDS}


def spec_config(**overrides) -> ml_collections.ConfigDict:
  """A ConfigDict holding every QuantSpec field (so each one can be overridden on the command line)."""
  d = {f.name: f.default for f in dataclasses.fields(QuantSpec) if f.name in SPEC_FIELDS}
  unknown = set(overrides) - set(d)
  if unknown:
    raise ValueError(f'unknown QuantSpec fields {sorted(unknown)}; valid: {", ".join(SPEC_FIELDS)}')
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def default_quant_config() -> ml_collections.ConfigDict:
  q = ml_collections.ConfigDict()
  q.weight = spec_config(format='int8', granularity='per_channel')
  q.act = spec_config(format='int8', granularity='per_tensor')
  q.grad = spec_config(format='')
  q.float_layers = ''
  q.groups = ml_collections.ConfigDict()
  # One line per key: --list_config shows the '# comment' after each assignment (config_cli.comments).
  d = types.SimpleNamespace(**RULE_DEFAULTS)
  q.mode = d.mode
  q.bwd_mode = d.bwd_mode
  q.act_static = d.act_static
  q.ema_decay = d.ema_decay
  q.delayed_scaling = d.delayed_scaling
  q.small_m = d.small_m  # forward matmuls with <= this many rows run as float matmuls of quantized values; 0: int8
  q.first_last_8bit = d.first_last_8bit  # the first and last quantized ops at 8 bits (low-bit literature's convention)
  # The runner always has data, so its activation grids follow it (the library's QuantRule defaults to 'format':
  # 'auto' needs a float probe run on sample inputs). After ReLU a signed grid wastes half its levels.
  q.act_signedness = 'auto'  # unsigned act grids where the first batch's activations are >= 0; 'format' as written
  q.calibration_batches = 16
  return q


def _spec(base: dict, override: dict | None, where: str, ptq: bool = False) -> QuantSpec | None:
  d = dict(base)
  d.update(override or {})
  if not d.get('format'):
    return None
  if ptq:  # PTQ trains nothing: no learned quantizer parameters
    d['estimator'] = 'ste'

  try:
    return QuantSpec(**{k: v for k, v in d.items() if k in SPEC_FIELDS})
  except ValueError as e:
    raise ValueError(f'config.{where}: {e}') from None


def _rule(where: str, ptq: bool, *args, **kwargs) -> QuantRule:
  """QuantRule(*args, **kwargs), its errors prefixed with the config key they come from (PTQ's static activation
  ranges are act_static=True, which the user did not write)."""
  try:
    return QuantRule(*args, **kwargs)
  except ValueError as e:
    fix = ''
    if 'act granularity must be' in str(e):  # static ranges with a per-token act grid (a QAT config, mode=ptq)
      fix = f'; add --config.{where}.act.granularity=per_tensor'
    raise ValueError(f'config.{where}{" (mode=ptq sets act_static)" if ptq else ""}: {e}{fix}') from None


def build_rules(quant: ml_collections.ConfigDict, *, ptq: bool = False) -> list[QuantRule]:
  """The ordered rule list for config.quant (PTQ uses static activation ranges)."""
  q = quant.to_dict()
  common = {k: q[k] for k in RULE_FIELDS}
  common['act_static'] = q['act_static'] or ptq
  rules = []
  if q['float_layers']:
    rules.append(_rule('quant.float_layers', ptq, q['float_layers'], keep_float=True, name='float_layers'))
  for name, g in q['groups'].items():
    g = dict(g)
    path = g.pop('module_path', None)
    if not path:
      raise ValueError(f'config.quant.groups.{name}: needs a module_path regex')
    keep_float = [g.pop(k) for k in ('keep_float', 'float') if k in g]  # `float`: the name before QuantRule's rename
    if len(keep_float) > 1:
      raise ValueError(f'config.quant.groups.{name}: give keep_float or its old name float, not both')
    if any(keep_float):
      rules.append(_rule(f'quant.groups.{name}', ptq, path, keep_float=True, name=name))
      continue
    specs = {k: _spec(q[k], g.pop(k, None), f'quant.groups.{name}.{k}', ptq) for k in ('weight', 'act', 'grad')}
    extra = {k: g.pop(k) for k in list(g) if k in common}
    if ptq:
      specs['grad'] = None
    if g:
      raise ValueError(f'config.quant.groups.{name}: unknown fields {sorted(g)}')
    rules.append(_rule(f'quant.groups.{name}', ptq, path, name=name, **specs, **{**common, **extra}))
  specs = {k: _spec(q[k], None, f'quant.{k}', ptq) for k in ('weight', 'act', 'grad')}
  if ptq:
    specs['grad'] = None
  if specs['weight'] is None and specs['act'] is None and specs['grad'] is None:
    raise ValueError('config.quant: weight, act and grad formats are all empty; nothing would be quantized '
                     '(use mode="float" for a float run)')
  rules.append(_rule('quant', ptq, '.*', name='default', **specs, **common))
  return rules
