r"""The benchmark harness: time a suite's variants side by side and report ratios to its baseline.

    python -m experiments.bench --config=configs/bench_fake_quant.py [--workdir=runs/bench/fake_quant]
        [--config.key=value ...]

prints a markdown table (median/min/max per call, spread, ratio to the baseline, page faults per call) and the
machine's details, and with --workdir writes `bench.json` (schema below) and `bench.md` there. How to get
steady figures (taskset, malloc settings): docs/benchmarks.md.

Suites. `config.suite` names a function `suite(config) -> Suite` registered with `@register('<name>')`. A
name that is not registered yet is imported from the module `experiments.bench.<name>` (or `config.module`
when set), which registers it on import; so a new suite lives in its own module and needs no edit here.
A Suite holds zero-argument callables (close over inputs, jit inside the suite), the baseline's name and a
`meta` dict recorded as is (shapes, specs, HLO notes). All variants are timed by `timing.time_interleaved`
with `config.timing.{warmup, rounds, min_time, clock}` (clock: 'wall' or 'process', see timing.CLOCKS).
A suite function may instead return an object with its own `run(config, workdir, *, info, echo) -> dict`
(several groups, each timed interleaved against its own baseline: experiments/bench/groups.py); bench prints
the machine's warnings and hands over to it.

bench.json: {schema: 1, suite, command, config, machine (timing.machine_info()), baseline, timing,
results: {variant: {median_s, min_s, max_s, spread, samples_s, calls_per_sample, page_faults_per_call,
ratio, ratio_min}}, meta, warnings}.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from experiments import timing
from experiments.config import cli as config_cli

SCHEMA = 1


class Suite(NamedTuple):
  fns: dict[str, Callable[[], Any]]
  baseline: str
  meta: dict[str, Any] = {}


SUITES: dict[str, Callable[[Any], Suite]] = {}


def register(name: str):
  """Decorator: registers `fn(config) -> Suite` as suite `name` (ValueError if the name is taken)."""
  def deco(fn):
    if name in SUITES and SUITES[name] is not fn:
      raise ValueError(f'benchmark suite {name!r} is already registered (by {SUITES[name].__module__})')
    SUITES[name] = fn
    return fn
  return deco


def get_suite(name: str, module: str | None = None) -> Callable[[Any], Suite]:
  """The suite function registered as `name`, importing `module` (default experiments.bench.<name>) first if
  needed; a ConfigError naming the nearest and every known suite otherwise."""
  if name not in SUITES:
    mod = module or f'experiments.bench.{name}'
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name != mod:  # The module exists but one of its imports does not: show that.
        raise
  if name not in SUITES:
    _import_suites()
  if name not in SUITES:
    raise config_cli.ConfigError(f'config.suite={name!r} is not one of the benchmark suites {", ".join(sorted(SUITES))}'
                                 f'{config_cli.did_you_mean(name, SUITES)} (a new suite: experiments/bench/{name}.py '
                                 'with @bench.register)')
  return SUITES[name]


def _import_suites() -> None:
  """Imports every module of experiments/bench, so that the suites they register on import can be listed (an
  unknown config.suite listed none: only the suites imported so far were registered)."""
  for m in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
    if not m.name.startswith('_'):
      with contextlib.suppress(ImportError):  # a suite whose optional dependency is missing is not listed
        importlib.import_module(f'experiments.bench.{m.name}')


def run(config, workdir: str | None = None, *, echo: Callable[[str], Any] = print) -> dict[str, Any]:
  """Builds the suite, times it, prints the report, writes bench.json and bench.md to workdir (if given)."""
  info = timing.machine_info()
  for w in info['warnings']:
    echo(f'WARNING: {w}')
  suite = get_suite(config.suite, config.get('module'))(config)
  if not isinstance(suite, Suite):  # A suite that times several groups itself (experiments/bench/groups.py).
    return suite.run(config, workdir, info=info, echo=echo)
  if suite.baseline not in suite.fns:
    raise ValueError(f'suite {config.suite!r}: baseline {suite.baseline!r} is not one of {", ".join(suite.fns)}')
  t = config.get('timing') or {}
  kw = {k: t[k] for k in ('warmup', 'rounds', 'min_time', 'clock') if k in t}
  stats = timing.time_interleaved(suite.fns, **kw)
  r_med = timing.ratios(stats, suite.baseline)
  r_min = timing.ratios(stats, suite.baseline, field='min')
  result = {
      'schema': SCHEMA,
      'suite': config.suite,
      'command': command(),
      'config': config_cli.to_dict(config),
      'machine': info,
      'baseline': suite.baseline,
      'timing': kw,
      'results': {name: {**s.to_dict(), 'ratio': r_med[name], 'ratio_min': r_min[name]} for name, s in stats.items()},
      'meta': suite.meta,
      'warnings': info['warnings'],
  }
  md = report_markdown(result, stats)
  echo(md)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'bench.json'), 'w') as f:
      json.dump(result, f, indent=2, default=str)
    with open(os.path.join(workdir, 'bench.md'), 'w') as f:
      f.write(md + '\n')
  return result


def command() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join('experiments', 'bench', '__main__.py')):
    argv = ['python', '-m', 'experiments.bench'] + argv[1:]
  return ' '.join(argv)


def report_markdown(result: dict[str, Any], stats: dict[str, timing.Stats]) -> str:
  lines = [f"## {result['suite']}", '', timing.markdown_table(stats, result['baseline']), '']
  for w in result['warnings']:
    lines += [f'**WARNING:** {w}', '']
  lines += [timing.machine_table(result['machine']), '', f"command: `{result['command']}`"]
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
  if config_cli.wants_help(argv):
    print(config_cli.help_text(__doc__, {'workdir': '=<dir>: also write bench.json and bench.md there'}, argv))
    return 0
  config, flags = config_cli.parse_argv(argv)
  config_cli.check_flags(flags, ('workdir',))
  workdir = flags.pop('workdir', None)
  if workdir:
    workdir = config_cli.writable_dir(workdir, 'workdir')
  try:
    run(config, workdir)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


