"""Markdown of a grouped suite's result: one table per group, the summary of flags and targets, the records."""

from __future__ import annotations

import math
from typing import Any

from experiments import timing
from experiments.bench import kernels


def fmt_ratio(r: float) -> str:
  return f'{r:.2f}x'


def _fmt_insp(info: dict[str, Any]) -> str:
  insp = info.get('inspect')
  if not insp:
    return ''
  if 'error' in insp or 'matmuls' not in insp:
    return 'n/a'
  s = f"{insp['int8']}/{insp['matmuls']}"
  if insp.get('int8_fast') is not None:
    s += f" ({insp['int8_fast']} fast)"
  if insp.get('int8_slow'):
    s += f", {insp['int8_slow']} slow"
  return s


def _fmt_s(s: float) -> str:
  return timing._fmt_time(s)


def group_markdown(g: dict[str, Any]) -> str:
  head = ['variant', 'role', 'median', 'spread', f"time vs {g['baseline']}", 'speed-up', 'int8 matmuls (fast)',
          'faults/call', 'notes']
  rows = []
  for name, r in g['results'].items():
    note = (r.get('info') or {}).get('route', '')
    rows.append([name, r['role'], _fmt_s(r['median_s']), f"{r['spread']:.0%}", fmt_ratio(r['ratio']),
                 fmt_ratio(r['speedup']), _fmt_insp(r.get('info') or {}), f"{r['page_faults_per_call']:.0f}", note])
  return timing.format_rows(head, rows)


def summary_markdown(groups: list[dict[str, Any]]) -> str:
  """One row per group, one column per variant: time ratio to the group's baseline (median)."""
  names: list[str] = []
  for g in groups:
    for n in g['results']:
      if n not in names:
        names.append(n)
  rows = []
  for g in groups:
    base = g['results'][g['baseline']]
    row = [g['name'], _fmt_s(base['median_s'])]
    for n in names:
      r = g['results'].get(n)
      row.append('' if r is None else fmt_ratio(r['ratio']))
    rows.append(row)
  return timing.format_rows(['group', 'baseline median'] + names, rows)


def _kept(k: float, share: float) -> str:
  # A share over 100%: the matmuls replayed alone took longer than the whole float program (kernels' docstring),
  # so the bound, and a share of its saving, say nothing. nan: the int8 GEMMs alone were no faster than float,
  # so the bound leaves no saving to keep a share of.
  if share > 1.0:
    return 'matmul share over 100%: no bound'
  return 'bound >= 1x, no saving to keep' if math.isnan(k) else f'{k:.0%}'


def fmt_share(share: float) -> str:
  """The matmul share as a percentage; one decimal where rounding would hide which side of 100% it is on."""
  return f'{share:.1%}' if round(share * 100) == 100 and share != 1.0 else f'{share:.0%}'


def _bound(bare: dict[str, Any]) -> str:
  return fmt_ratio(bare['bound']) + (' (says nothing: share over 100%)' if bare['share'] > 1.0 else '')


def _form(bare: dict[str, Any]) -> str:
  """The layout of the fastest bare int8 GEMMs (kernels.LAYOUT); results written before there were three
  layouts timed x . w only."""
  return kernels.LAYOUT[bare.get('kernel_form', kernels.INT8)]


def bare_markdown(groups: list[dict[str, Any]]) -> str:
  """One row per group with a bound (experiments/bench/kernels.py): the float program's matmul share, the bare
  int8 kernel's ratio on its shapes, the bound, and per quantized variant of the group it measures its ratio and
  the share of the bound's time saving it keeps; '' when no group has one."""
  rows = []
  for g in groups:
    bare = g['meta'].get('bare') or {}
    if 'bound' not in bare:
      continue
    kept = '; '.join(f'{n} {fmt_ratio(r)} ({_kept(bare["kept"][n], bare["share"])})'
                     for n, r in bare['quantized'].items())
    rows.append([bare['of'], f"{bare['dots']} + {bare['convs']}", fmt_share(bare['share']),
                 f"{fmt_ratio(bare['kernel'])} ({_form(bare)})", _bound(bare), kept])
  if not rows:
    return ''
  return timing.format_rows(['group', 'dots + convs', 'matmul share of float', 'bare int8 kernel', 'bound',
                             'quantized (kept of the bound\'s saving)'], rows)


def result_markdown(result: dict[str, Any]) -> str:
  lines = [f"## {result['suite']}", '']
  for w in result['warnings']:
    lines += [f'**WARNING:** {w}', '']
  if result['groups']:
    lines += ['Time ratio to each group\'s baseline (median of the samples; below 1 is faster):', '',
              summary_markdown(result['groups']), '']
  bare = bare_markdown(result['groups'])
  if bare:
    lines += ['The float program\'s matmuls alone, as written and as int8 GEMMs (experiments/bench/kernels.py): '
              'bound = 1 - share + share x kernel, the time ratio if only the matmuls got faster:', '', bare, '']
  if result['targets']:
    bounds = {g['meta']['bare']['of']: g['meta']['bare'] for g in result['groups']
              if 'bound' in (g['meta'].get('bare') or {})}
    rows = [[t['group'], t['variant'], t['text'], f"<= {t['max_ratio']:.3g}x", fmt_ratio(t['ratio']),
             'met' if t['met'] else 'NOT met',
             '' if t['group'] not in bounds else _bound(bounds[t['group']])] for t in result['targets']]
    lines += ['Targets:', '', timing.format_rows(['group', 'variant', 'target', 'max time ratio', 'measured', '',
                                                  'bound'], rows), '']
  flagged = [f for f in result['flags'] if f['role'] == 'quantized']
  lines += [f'Quantized configurations slower than float: {len(flagged)}', '']
  lines += [f"- FLAG: {f['text']}" for f in flagged]
  if flagged:
    lines.append('')
  for g in result['groups']:
    lines += [f"### {g['name']}", '', group_markdown(g), '']
  if result.get('records'):
    lines += ['### records', '', records_markdown(result['records']), '']
  lines += [timing.machine_table(result['machine']), '', f"command: `{result['command']}`"]
  return '\n'.join(lines)


def records_markdown(records: dict[str, Any]) -> str:
  """Untimed records as nested bullet lists (numbers as they are)."""
  lines = []

  def walk(d, indent):
    for k, v in d.items():
      if isinstance(v, dict):
        lines.append(f"{'  ' * indent}- {k}:")
        walk(v, indent + 1)
      else:
        lines.append(f"{'  ' * indent}- {k}: {_fmt_value(v)}")
  walk(records, 0)
  return '\n'.join(lines)


def _fmt_value(v) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)
