r"""Sweep declarations for config files, and their expansion into trials.

A config module may define `get_sweep(arg)` next to `get_config(arg)`:

    from experiments import sweeps

    def get_sweep(arg=None):
      return sweeps.product(
          sweeps.axis('mode', {'float': {'mode': 'float', 'quant.weight.format': ''}, 'qat': {'mode': 'qat'}}),
          sweeps.zipped(sweeps.axis('quant.weight.format', ['int8', 'int4'], name='w'),
                        sweeps.axis('quant.act.format', ['int8', 'int4'], name='a')),
          sweeps.axis('seed', [0, 1]))

Axes:
  axis('quant.weight.format', ['int8', 'int4'])   one dotted config key; each value is also its label
  axis('bits', {'w8a8': {...}, 'w4a4': {...}})    named settings: a label -> {dotted key: value} (several keys)
Combinators (each takes axes or sweeps):
  product(a, b, ...)   every combination (later factors vary fastest)
  zipped(a, b, ...)    element-wise (equal lengths)
  chain(a, b, ...)     one after the other (e.g. a float baseline once, then quantized runs)
A value may be `trial_ref('mode=float')`: the workdir of the trial with those labels (and the same labels on
the axes both trials share, e.g. the seed); the referring trial then runs after it (PTQ from a float trial).

Each trial gets a readable name from the swept labels only (`mode=qat,w=int4,a=int4,seed=0`; a key's short
name is its last dotted segment, or more segments when that is ambiguous, or `name=`), a deterministic id
(sha256 of its resolved config) and the workdir `<root>/<name>/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from experiments.config import cli as config_cli

__all__ = ['Sweep', 'Trial', 'TrialRef', 'axis', 'chain', 'expand', 'hparam_domains', 'label', 'product',
           'short_key_names', 'trial_ref', 'zipped']


@dataclasses.dataclass(frozen=True)
class TrialRef:
  """A placeholder for another trial's workdir, resolved by `expand`."""
  labels: tuple[tuple[str, str], ...]

  def __str__(self) -> str:
    return ','.join(f'{k}={v}' for k, v in self.labels)


def trial_ref(labels: str) -> TrialRef:
  """The workdir of the trial labelled `labels` ('mode=float' or 'mode=float,bits=w8a8'); see the module doc."""
  pairs = []
  for part in labels.split(','):
    k, eq, v = part.partition('=')
    if not eq or not k:
      raise config_cli.ConfigError(f'trial_ref({labels!r}): expected name=label pairs like "mode=float"')
    pairs.append((k.strip(), v.strip()))
  return TrialRef(tuple(pairs))


@dataclasses.dataclass(frozen=True)
class _Axis:
  key: str                 # a dotted config key, or the name of a named-settings axis
  name: str | None         # the explicit short name
  settings: bool           # True: values are {label: {key: value}}


@dataclasses.dataclass(frozen=True)
class _Point:
  labels: tuple[tuple[_Axis, str], ...]
  overrides: tuple[tuple[str, Any], ...]


class Sweep:
  """An ordered list of points; each point is labels (axis -> label) plus config overrides."""

  def __init__(self, points: Sequence[_Point], axes: Sequence[_Axis]):
    self.points = list(points)
    self.axes = list(dict.fromkeys(axes))

  def __len__(self) -> int:
    return len(self.points)

  def __repr__(self) -> str:
    return f'Sweep({len(self.points)} points over {", ".join(a.key for a in self.axes)})'


def label(value: Any) -> str:
  """A config value as a trial label: 'true', '0.001', '4-8', filename-safe."""
  if isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, float):
    text = f'{value:g}'
  elif isinstance(value, (tuple, list)):
    text = '-'.join(label(v) for v in value)
  else:
    text = str(value)
  text = text or 'none'
  return re.sub(r'[^A-Za-z0-9._+-]', '_', text)


def axis(key: str, values: Sequence[Any] | Mapping[str, Mapping[str, Any]], *, name: str | None = None) -> Sweep:
  """One swept dimension: `key` over `values`, or named settings `{label: {dotted key: value}}`."""
  if isinstance(values, Mapping):
    ax = _Axis(key, name or key, True)
    points = []
    for text, setting in values.items():
      if not isinstance(setting, Mapping):
        raise config_cli.ConfigError(f'axis({key!r}): setting {text!r} must be a dict of dotted key -> value')
      points.append(_Point(((ax, label(text)),), tuple(setting.items())))
  else:
    ax = _Axis(key, name, False)
    points = []
    for v in values:
      if isinstance(v, Mapping):
        if key not in v:
          raise config_cli.ConfigError(
              f'axis({key!r}): a dict value needs {key!r} in it for its label, or use the named form '
              f'axis({key!r}, {{"label": {{...}}}})')
        points.append(_Point(((ax, label(v[key])),), tuple(v.items())))
      else:
        points.append(_Point(((ax, label(v)),), ((key, v),)))
  if not points:
    raise config_cli.ConfigError(f'axis({key!r}) has no values')
  return Sweep(points, [ax])


def _merge(parts: Sequence[_Point]) -> _Point:
  labels, overrides, seen = [], {}, set()
  for p in parts:
    for ax, label in p.labels:
      if ax.key in seen:
        raise config_cli.ConfigError(f'axis {ax.key!r} appears twice in one product/zip')
      seen.add(ax.key)
      labels.append((ax, label))
    for k, v in p.overrides:
      if k in overrides and overrides[k] != v:
        raise config_cli.ConfigError(f'config key {k!r} is set by two combined axes ({overrides[k]!r} and {v!r})')
      overrides[k] = v
  return _Point(tuple(labels), tuple(overrides.items()))


def product(*sweeps: Sweep) -> Sweep:
  """Every combination of the given axes/sweeps (the last varies fastest)."""
  points = [_merge(combo) for combo in itertools.product(*(s.points for s in sweeps))]
  return Sweep(points, [a for s in sweeps for a in s.axes])


def zipped(*sweeps: Sweep) -> Sweep:
  """Element-wise combination of axes/sweeps of equal length (e.g. weight bits with activation bits)."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise config_cli.ConfigError(f'zipped() needs sweeps of one length, got lengths {[len(s) for s in sweeps]}')
  points = [_merge(combo) for combo in zip(*(s.points for s in sweeps), strict=True)]
  return Sweep(points, [a for s in sweeps for a in s.axes])


def chain(*sweeps: Sweep) -> Sweep:
  """The points of each sweep, one sweep after the other."""
  return Sweep([p for s in sweeps for p in s.points], [a for s in sweeps for a in s.axes])


def short_key_names(keys: Sequence[str]) -> dict[str, str]:
  """Dotted config key -> its shortest unambiguous dotted suffix among `keys` (as `short_names` names axes)."""
  return short_names([_Axis(k, None, False) for k in keys])


def short_names(axes: Sequence[_Axis]) -> dict[str, str]:
  """Axis key -> short name: the explicit name, else the shortest unambiguous dotted suffix of the key."""
  keys = list(dict.fromkeys(a.key for a in axes))
  explicit = {a.key: a.name for a in axes if a.name}
  out = {}
  for key in keys:
    if key in explicit:
      out[key] = explicit[key]
      continue
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      cand = '.'.join(parts[-n:])
      clash = [k for k in keys if k != key and (explicit.get(k) == cand or k == cand or k.endswith('.' + cand))]
      if not clash:
        break
    out[key] = cand
  names = list(out.values())
  dup = {n for n in names if names.count(n) > 1}
  if dup:
    raise config_cli.ConfigError(f'two axes share the short name(s) {sorted(dup)}; give them distinct name=')
  return out


# ----------------------------------------------------------------------------------------------- expansion


@dataclasses.dataclass
class Trial:
  index: int
  name: str
  id: str
  labels: dict[str, str]                     # short axis name -> label
  overrides: dict[str, Any]                  # dotted key -> value (references resolved)
  config: ml_collections.ConfigDict
  deps: list[int] = dataclasses.field(default_factory=list)
  refs: dict[str, str] = dataclasses.field(default_factory=dict)  # dotted key -> name of the referenced trial

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.name)

  def manifest(self) -> dict[str, Any]:
    return {'index': self.index, 'name': self.name, 'id': self.id, 'labels': self.labels,
            'overrides': self.overrides, 'deps': self.deps, 'refs': self.refs}


def config_id(config) -> str:
  """sha256 (12 hex digits) of the resolved config as sorted JSON."""
  text = json.dumps(config_cli.to_dict(config), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def get_sweep(module, arg: str | None) -> Sweep | None:
  fn = getattr(module, 'get_sweep', None)
  if fn is None:
    return None
  # get_sweep(arg=None) or get_sweep(): chosen by the signature, so a TypeError raised inside a user's sweep
  # function surfaces as itself.
  takes_arg = bool(inspect.signature(fn).parameters)
  sweep = fn(arg) if takes_arg else fn()
  if not isinstance(sweep, Sweep):
    raise config_cli.ConfigError(f'get_sweep() must return a sweep built with experiments.sweeps, got {sweep!r}')
  return sweep


def _resolve_ref(ref: TrialRef, point_labels: dict[str, str], all_labels: list[dict[str, str]],
                 names: list[str], where: str) -> int:
  want = dict(ref.labels)
  matches = []
  for j, labels in enumerate(all_labels):
    if any(labels.get(k) != v for k, v in want.items()):
      continue
    if all(labels[k] == point_labels[k] for k in labels if k in point_labels and k not in want):
      matches.append(j)
  if len(matches) != 1:
    found = ', '.join(names[j] for j in matches) or 'none'
    raise config_cli.ConfigError(f'{where}: trial_ref({str(ref)!r}) must match exactly one trial; matches: {found}')
  return matches[0]


def expand(module, arg: str | None, root: str, overrides: Sequence[tuple[str, Any]] = ()) -> list[Trial]:
  """The trials of a config module's sweep (one trial when it has no get_sweep), with resolved configs."""
  root = os.path.abspath(root)
  base = module.get_config(arg)
  for k, v in overrides:
    config_cli.set_key(base, k, v)
  sweep = get_sweep(module, arg) or Sweep([_Point((), ())], [])
  short = short_names(sweep.axes)
  swept = {k for p in sweep.points for k, _ in p.overrides}
  clash = sorted(swept & {k for k, _ in overrides})
  if clash:
    raise config_cli.ConfigError(f'--config.{clash[0]} is swept by get_sweep(); it cannot also be set on the '
                                'command line (change the sweep, or drop the flag)')
  all_labels = [{short[ax.key]: label for ax, label in p.labels} for p in sweep.points]
  names = [','.join(f'{k}={v}' for k, v in labels.items()) or 'default' for labels in all_labels]
  seen = {}
  for i, n in enumerate(names):
    if n in seen:
      raise config_cli.ConfigError(f'points {seen[n]} and {i} of the sweep are both named {n!r}; '
                                  'give the settings distinct labels')
    seen[n] = i
  trials = []
  for i, p in enumerate(sweep.points):
    config = base.copy_and_resolve_references()
    resolved, deps, refs = {}, [], {}
    for k, v in p.overrides:
      if isinstance(v, TrialRef):
        j = _resolve_ref(v, all_labels[i], all_labels, names, f'trial {names[i]!r}, key {k!r}')
        deps.append(j)
        refs[k] = names[j]
        v = os.path.join(root, names[j])
      try:
        config_cli.set_key(config, k, v)
      except (TypeError, ValueError) as e:
        raise config_cli.ConfigError(f'trial {names[i]!r}: {e}') from None
      resolved[k] = v
    trials.append(Trial(i, names[i], config_id(config), all_labels[i], resolved, config, deps, refs))
  _check_ids(trials)
  _check_acyclic(trials)
  return trials


def _check_ids(trials: list[Trial]) -> None:
  by_id = {}
  for t in trials:
    if t.id in by_id:
      raise config_cli.ConfigError(f'trials {by_id[t.id]!r} and {t.name!r} resolve to the same config '
                                  f'(id {t.id}); a sweep point must change the config')
    by_id[t.id] = t.name


def _check_acyclic(trials: list[Trial]) -> None:
  state = {}

  def visit(i, path):
    if state.get(i) == 'done':
      return
    if i in path:
      raise config_cli.ConfigError(f'trial_ref cycle: {" -> ".join(trials[j].name for j in path + [i])}')
    for j in trials[i].deps:
      visit(j, path + [i])
    state[i] = 'done'

  for t in trials:
    visit(t.index, [])


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def is_seed_key(key: str) -> bool:
  return key.replace('/', '.').rsplit('.', 1)[-1] == 'seed'


def hparam_domains(trials: Sequence[Trial]) -> dict[str, list[Any]]:
  """Dotted swept key -> the values the trials' configs hold there (seeds and trial references left out).

  Names are the full dotted keys, as the runner's per-trial HParams sessions record them.
  """
  keys = dict.fromkeys(k for t in trials for k in t.overrides)
  ref_keys = {k for t in trials for k in t.refs}
  out = {}
  for k in keys:
    if is_seed_key(k) or k in ref_keys:
      continue
    values = []
    for t in trials:
      v = _get(t.config, k)
      if isinstance(v, (list, tuple)):
        v = str(v)
      if v not in values:
        values.append(v)
    out[k] = values
  return out
