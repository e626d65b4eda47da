"""The PTQ-methods table of docs/results.md from a finished sweep root: method x weight format, with the metric,
the float reference, serving bytes and the method's wall time (from each trial's result.json).

    python -m experiments.review.ptq_table runs/results_ptq_fmnist [--metric=eval/accuracy]
"""

from __future__ import annotations

import os
import sys

import numpy as np

from experiments import fileio
from experiments.config import cli as config_cli


def setting(quant) -> str:
  """A trial's quantization in a few characters: 'W4' (per-channel weights), 'W3 g64' (groups of 64), 'W8A8',
  'W4 per-tensor'."""
  w, a = quant['weight'], quant['act']
  bits = lambda f: ''.join(ch for ch in f if ch.isdigit())
  out = f'W{bits(w["format"])}' + (f'A{bits(a["format"])}' if a['format'] else '')
  return out + {'per_group': f' g{w["group_size"]}', 'per_tensor': ' per-tensor'}.get(w['granularity'], '')


def rows(root: str, metric: str = 'eval/accuracy'):
  """([float results], [(method, setting, metric, serving bytes, method seconds, seed)]) of the trials.

  Only PTQ trials are rows: a QAT trial has no train.ptq entry and would read as 'rtn', its accuracy averaged
  with the PTQ run's as another seed.
  """
  floats, out = [], []
  for name in sorted(os.listdir(root)):
    if not os.path.isfile(os.path.join(root, name, 'result.json')):
      continue
    r = fileio.read_result(os.path.join(root, name))
    if r is None:
      continue
    c = r['config']
    if r['mode'] == 'float':
      floats.append(r)
      continue
    if r['mode'] != 'ptq':
      continue
    if metric not in r['metrics']:
      raise config_cli.ConfigError(f'--metric={metric}: trial {name} has no such metric'
                                   f'{config_cli.did_you_mean(metric, r["metrics"])} (has: {", ".join(r["metrics"])})')
    info = r.get('train', {}).get('ptq')
    method = '+'.join(m[0] for m in info['methods']) if info else c.get('ptq', {}).get('method', 'rtn')
    if info and any(m[0] == 'gptq' and m[1].get('act_order') for m in info['methods']):
      method += ' (act-order)'
    if info and any(m[0] == 'bias_correction' and m[1].get('empirical') for m in info['methods']):
      method += ' (empirical)'
    if info and info.get('sequential'):
      method += ', sequential'
    if c.get('ptq', {}).get('fold_batchnorm'):
      method += ', BatchNorm folded'
    if c.get('ptq', {}).get('equalize'):
      method += ', equalized'
    out.append((method, setting(c['quant']), r['metrics'][metric], r.get('serving_bytes'),
                info['wall_time_sec'] if info else 0.0, c.get('seed', 0)))
  return floats, out


def _stat(values) -> str:
  """'0.9042' for one value; 'mean +- std' (sample std) over seeds for several."""
  v = np.asarray(values, np.float64)
  return f'{v[0]:.4f}' if len(v) == 1 else f'{v.mean():.4f} ± {v.std(ddof=1):.4f}'


def table(root: str, metric: str = 'eval/accuracy') -> str:
  """Method x setting; over several seeds each cell is mean ± std, with n seeds said once above the table."""
  floats, rs = rows(root, metric)
  fmts = sorted({f for _, f, *_ in rs}, key=lambda f: ('A' in f, -int(f[1]), -len(f), f))
  methods = sorted(dict.fromkeys(m for m, *_ in rs), key=lambda m: (m != 'rtn', m))  # the baseline first
  by: dict = {}
  for m, f, v, b, t, _ in rs:
    by.setdefault((m, f), []).append((v, b, t))
  seeds = sorted({seed for *_, seed in rs} | {r['config'].get('seed', 0) for r in floats})
  ref = (f'{_stat([r["metrics"][metric] for r in floats])} ({floats[0]["serving_bytes"]:,} bytes)' if floats
         else 'n/a')
  head = (f'float {metric}: {ref}' + (f'; {len(seeds)} seeds, mean ± std' if len(seeds) > 1 else '') +
          '\n\n| method | ' + ' | '.join(f'{f}: {metric} / bytes / method s' for f in fmts) + ' |')
  lines = [head, '|---|' + '---|' * len(fmts)]
  for m in methods:
    cells = []
    for f in fmts:
      v = by.get((m, f))
      cells.append('—' if v is None else
                   f'{_stat([x[0] for x in v])} / {v[0][1]:,} / {np.mean([x[2] for x in v]):.1f}')
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  """The command line; a mistake (no such root, an unknown --metric) is one `error:` line (config_cli.main_guard)."""
  return config_cli.main_guard(_main, argv=argv)


def _main(argv: list[str]) -> int:
  parser = config_cli.ArgParser(prog='python -m experiments.review.ptq_table', description=__doc__.split('\n')[0])
  parser.add_argument('root', help='the PTQ sweep root (e.g. runs/results_ptq_fmnist)')
  parser.add_argument('--metric', default='eval/accuracy', help='the result metric to tabulate (default: %(default)s)')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.root):
    raise config_cli.ConfigError(f'no such sweep root: {os.path.abspath(args.root)}')
  print(table(args.root, args.metric))
  return 0


if __name__ == '__main__':
  sys.exit(main())
