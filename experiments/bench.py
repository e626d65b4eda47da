r"""Benchmarks: time a suite's variants side by side and report ratios to its baseline.

    python -m experiments.bench --config=configs/bench_fake_quant.py [--workdir=runs/bench/fake_quant]
        [--config.key=value ...]

prints a markdown table (median/min/max per call, spread, ratio to the baseline, page faults per call) and the
machine's details, and with --workdir writes `bench.json` (schema below) and `bench.md` there. How to get
steady figures (taskset, malloc settings): docs/benchmarks.md.

Suites. `config.suite` names a function `suite(config) -> Suite` registered with `@register('<name>')`. A
name that is not registered yet is imported from the module `experiments.bench_<name>` (or `config.module`
when set), which registers it on import; so a new suite lives in its own module and needs no edit here.
A Suite holds zero-argument callables (close over inputs, jit inside the suite), the baseline's name and a
`meta` dict recorded as is (shapes, specs, HLO notes). All variants are timed by `timing.time_interleaved`
with `config.timing.{warmup, rounds, min_time, clock}` (clock: 'wall' or 'process', see timing.CLOCKS).
A suite function may instead return an object with its own `run(config, workdir, *, info, echo) -> dict`
(several groups, each timed interleaved against its own baseline: experiments/bench_suites.py); bench prints
the machine's warnings and hands over to it.

bench.json: {schema: 1, suite, command, config, machine (timing.machine_info()), baseline, timing,
results: {variant: {median_s, min_s, max_s, spread, samples_s, calls_per_sample, page_faults_per_call,
ratio, ratio_min}}, meta, warnings}.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from experiments import configlib, timing

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
  """The suite function registered as `name`, importing `module` (default experiments.bench_<name>) first if
  needed; ValueError naming the known suites otherwise."""
  if name not in SUITES:
    mod = module or f'experiments.bench_{name}'
    try:
      importlib.import_module(mod)
    except ModuleNotFoundError as e:
      if e.name != mod:  # The module exists but one of its imports does not: show that.
        raise
  if name not in SUITES:
    raise ValueError(f'config.suite={name!r} is not a registered benchmark suite; known: '
                     f'{", ".join(sorted(SUITES))} (or add experiments/bench_{name}.py with @bench.register)')
  return SUITES[name]


def run(config, workdir: str | None = None, *, echo: Callable[[str], Any] = print) -> dict[str, Any]:
  """Builds the suite, times it, prints the report, writes bench.json and bench.md to workdir (if given)."""
  info = timing.machine_info()
  for w in info['warnings']:
    echo(f'WARNING: {w}')
  suite = get_suite(config.suite, config.get('module'))(config)
  if not isinstance(suite, Suite):  # A suite that times several groups itself (experiments.bench_suites).
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
      'command': _command(),
      'config': configlib.to_dict(config),
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


def _command() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith(os.path.join('experiments', 'bench.py')):
    argv = ['python', '-m', 'experiments.bench'] + argv[1:]
  return ' '.join(argv)


def report_markdown(result: dict[str, Any], stats: dict[str, timing.Stats]) -> str:
  lines = [f"## {result['suite']}", '', timing.markdown_table(stats, result['baseline']), '']
  for w in result['warnings']:
    lines += [f'**WARNING:** {w}', '']
  lines += [timing.machine_table(result['machine']), '', f"command: `{result['command']}`"]
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------ suites


def entry_ops(compiled_text: str) -> list[str]:
  """The top-level operations of a compiled HLO module's ENTRY computation (fusions, custom calls, ...) with
  their output shapes, e.g. 'fusion:kLoop f32[4096,4096]': a rough count of the passes over memory."""
  entry = compiled_text.split('\nENTRY ', 1)[-1]
  ops = []
  for line in entry.splitlines()[1:]:
    line = line.strip()
    if not line or line == '}' or '=' not in line:
      continue
    rhs = line.split('=', 1)[1].strip()
    # 'f32[4096,4096]{1,0} fusion(%x), kind=kLoop, ...' -> 'fusion:kLoop'
    parts = rhs.split(' ', 1)
    op = parts[1].split('(', 1)[0] if len(parts) > 1 else rhs
    if op in ('parameter', 'constant', 'bitcast', 'tuple', 'get-tuple-element'):
      continue
    kind = ''
    if 'kind=' in rhs:
      kind = ':' + rhs.split('kind=', 1)[1].split(',', 1)[0].split('}', 1)[0]
    if '__ynn_fusion' in rhs:
      kind += ':ynn'
    shape = re.sub(r'\{[^}]*\}', '', parts[0]) if len(parts) > 1 else ''  # Layouts dropped.
    ops.append(f'{op}{kind} {shape}'.strip())
  return ops


@register('fake_quant')
def fake_quant_suite(config) -> Suite:
  """fake_quant(x, QuantSpec(**config.quant)) against `x * 1.0` (XLA folds it to a copy: one read, one write),
  both jitted, on an f32 array of config.shape. With config.extra_variants also the two halves of
  fake_quant: calibration alone and fake_quant at a given scale; with config.before the forward as it was
  before the speed-ups of docs/benchmarks.md."""
  import jax
  import jax.numpy as jnp

  import qjax

  shape = tuple(config.shape)
  x = jax.random.normal(jax.random.key(config.get('seed', 0)), shape, jnp.float32)
  spec = qjax.QuantSpec(**configlib.to_dict(config.quant))
  jits = {
      'x * 1.0': jax.jit(lambda x: x * 1.0),
      'fake_quant': jax.jit(lambda x: qjax.fake_quant(x, spec)),
  }
  args = {'x * 1.0': (x,), 'fake_quant': (x,)}
  if config.get('extra_variants', False):
    scale, zero_point = jax.jit(lambda x: qjax.calibrate(x, spec))(x)
    jits['calibrate only'] = jax.jit(lambda x: qjax.calibrate(x, spec))
    jits['fake_quant, scale given'] = jax.jit(
        lambda x, s, z: qjax.fake_quant(x, spec, {'scale': s, **({} if z is None else {'zero_point': z})}))
    args['calibrate only'] = (x,)
    args['fake_quant, scale given'] = (x, scale, zero_point)
  if config.get('before', False):
    jits['fake_quant before (e1c5dff)'] = jax.jit(lambda x: _fake_quant_before(x, spec))
    args['fake_quant before (e1c5dff)'] = (x,)
  meta = {'shape': list(shape), 'dtype': 'float32', 'spec': spec.to_dict(), 'array_mib': x.nbytes / 2 ** 20,
          'entry_ops': {name: entry_ops(f.lower(*args[name]).compile().as_text()) for name, f in jits.items()}}
  fns = {name: (lambda f=f, a=args[name]: f(*a)) for name, f in jits.items()}
  return Suite(fns, baseline='x * 1.0', meta=meta)


def _fake_quant_before(x, spec):
  """The forward of fake_quant as of commit e1c5dff (symmetric absmax, integer formats), for before/after
  timings: absmax over a masked copy of x, x / scale, and a round trip through the int8 container."""
  import jax.numpy as jnp

  from qjax import formats
  from qjax import granularity as gran

  fmt = spec.fmt
  if not isinstance(fmt, formats.IntFormat) or spec.scheme != 'symmetric' or spec.calibration != 'absmax':
    raise ValueError('config.before needs a symmetric absmax integer spec')
  sshape = gran.scale_shape(x.shape, spec)
  amax = gran.reduce(jnp.abs(jnp.where(jnp.isfinite(x), x, 0.0)), sshape, jnp.max)
  scale = amax / fmt.qmax
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  s = gran.expand(scale, x.shape)
  y = x / s
  q = jnp.where(jnp.isnan(y), 0.0, jnp.clip(jnp.round(y), fmt.qmin, fmt.qmax)).astype(fmt.container)
  return jnp.where(jnp.isnan(x), x, q.astype(jnp.float32) * s)


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
  if configlib.wants_help(argv):
    print(configlib.help_text(__doc__, {'workdir': '=<dir>: also write bench.json and bench.md there'}, argv))
    return 0
  config, flags = configlib.parse_argv(argv)
  configlib.check_flags(flags, ('workdir',))
  workdir = flags.pop('workdir', None)
  if workdir:
    workdir = configlib.writable_dir(workdir, 'workdir')
  try:
    run(config, workdir)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  # Run the importable module's main: suite modules register into experiments.bench.SUITES, not __main__'s.
  from experiments import bench as _bench
  sys.exit(configlib.main_guard(_bench.main))
