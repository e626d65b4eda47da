r"""Grouped suites: several groups, each timed interleaved against its own float baseline, and their report.

same moment. Per variant the result records its role ('baseline'; 'quantized' = a qjax configuration as
researchers run it; 'contrast' = a form kept to show what the library avoids; 'reference' = a building block
such as the bare int8 dot), the inspection of its compiled program (qjax.ops.inspect_matmuls: matmuls that run
in int8, on XLA:CPU's fast kernel or not) and, for qjax matmuls, the small-M routing decision. The report flags
every 'quantized' variant slower than its baseline (ratio > 1 + config.flag_tolerance) and checks the suite's
targets, all stated as time ratios to the baseline.

bench.json of a grouped suite: {schema: 1, kind: 'groups', suite, command, config, machine, timing,
groups: [{name, baseline, meta, results: {variant: {role, median_s, min_s, max_s, spread, samples_s,
calls_per_sample, page_faults_per_call, ratio, ratio_min, speedup, info}}}], targets: [{group, variant, text,
max_ratio, ratio, met}], flags: [{group, variant, role, ratio, text}], records, meta, warnings}.
ratio = median time / the baseline's median time (below 1: faster than float); speedup = 1 / ratio.
TensorBoard scalars (experiments/review/tensorboard.py) go to <workdir>: '<suite>/<group>/<variant>/ratio',
'.../median_ms'.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from experiments import timing
from experiments.bench import harness as bench
from experiments.bench import kernels
from experiments.bench.markdown import fmt_ratio, fmt_share, result_markdown
from experiments.config import cli as config_cli
from experiments.fileio import write_json_atomic
from experiments.review.tensorboard import SummaryWriter
from qjax import hlo as qinspect

ROLES = ('baseline', 'quantized', 'contrast', 'reference')
DN = (((1,), (0,)), ((), ()))  # (M, K) . (K, N)


# ------------------------------------------------------------------------------------------- data model


@dataclasses.dataclass
class Variant:
  """One timed callable: `fn()` runs it once (close over inputs, jit outside); `info` is recorded as is."""
  fn: Callable[[], Any]
  role: str = 'quantized'
  info: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.role not in ROLES:
      raise ValueError(f'role={self.role!r} is not one of {", ".join(ROLES)}')


@dataclasses.dataclass(frozen=True)
class Target:
  """A speed target: variant's median time / the baseline's must be <= max_ratio."""
  variant: str
  max_ratio: float
  text: str


@dataclasses.dataclass
class Group:
  """Variants timed together against one baseline (e.g. one matmul shape)."""
  name: str
  variants: dict[str, Variant]
  baseline: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  targets: tuple[Target, ...] = ()

  def __post_init__(self):
    if self.baseline not in self.variants:
      raise ValueError(f'group {self.name!r}: baseline {self.baseline!r} is not one of {", ".join(self.variants)}')
    for t in self.targets:
      if t.variant not in self.variants:
        raise ValueError(f'group {self.name!r}: target variant {t.variant!r} is not one of {", ".join(self.variants)}')


@dataclasses.dataclass
class GroupedSuite:
  """What a grouped suite function returns. `groups()` builds the groups lazily, one at a time (so inputs and
  compiled programs of one shape are freed before the next); `records()` returns untimed results."""
  name: str
  groups: Callable[[], Iterable[Group]]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  records: Callable[[], dict[str, Any]] | None = None
  record_targets: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None

  def run(self, config, workdir: str | None = None, *, info: dict[str, Any] | None = None,
          echo: Callable[[str], Any] = print) -> dict[str, Any]:
    return run_grouped(self, config, workdir, info=info, echo=echo)


# ------------------------------------------------------------------------------------------- pure helpers


def group_result(stats: dict[str, timing.Stats], group: Group) -> dict[str, Any]:
  """The JSON of one timed group: per variant its stats, role, ratio to the baseline and info."""
  r_med = timing.ratios(stats, group.baseline)
  r_min = timing.ratios(stats, group.baseline, field='min')
  results = {}
  for name, s in stats.items():
    v = group.variants[name]
    ratio = r_med[name]
    results[name] = {'role': v.role, **s.to_dict(), 'ratio': ratio, 'ratio_min': r_min[name],
                     'speedup': (1.0 / ratio) if ratio > 0 else float('inf'), 'info': v.info}
  return {'name': group.name, 'baseline': group.baseline, 'meta': group.meta, 'results': results}


def slower_than_baseline(groups: list[dict[str, Any]], *, tolerance: float = 0.0,
                         roles: Iterable[str] = ('quantized',)) -> list[dict[str, Any]]:
  """Flags: every variant of one of `roles` whose median time exceeds its group's baseline by more than
  `tolerance` (ratio > 1 + tolerance)."""
  roles = tuple(roles)
  out = []
  for g in groups:
    for name, r in g['results'].items():
      if name == g['baseline'] or r['role'] not in roles:
        continue
      if r['ratio'] > 1.0 + tolerance:
        out.append({'group': g['name'], 'variant': name, 'role': r['role'], 'ratio': r['ratio'],
                    'text': f"{name} is {r['ratio']:.2f}x the time of {g['baseline']} on {g['name']} (slower)"})
  return out


def check_targets(group: Group, result: dict[str, Any]) -> list[dict[str, Any]]:
  """One entry per target of the group: the measured ratio and whether it meets the target."""
  out = []
  for t in group.targets:
    ratio = result['results'][t.variant]['ratio']
    out.append({'group': group.name, 'variant': t.variant, 'text': t.text, 'max_ratio': t.max_ratio,
                'ratio': ratio, 'met': bool(ratio <= t.max_ratio)})
  return out


def slow_int8_warnings(groups: list[dict[str, Any]]) -> list[str]:
  """Warnings for int8 matrix products (both output dims > 1) of 'quantized' or 'reference' variants that run off
  XLA:CPU's fast kernel or widened: the sign of XLA_FLAGS (or a jax version) that switched the kernels off."""
  out = []
  for g in groups:
    for name, r in g['results'].items():
      insp = (r.get('info') or {}).get('inspect') or {}
      n = insp.get('int8_gemm_slow', 0)
      if r['role'] in ('quantized', 'reference') and n and insp.get('platform', 'cpu') != 'cpu':
        out.append(f"{g['name']} / {name}: {n} int8 matmul(s) off the tensor-core GEMM kernel or widened by the "
                   f"compiler: {'; '.join(insp.get('fallbacks') or [])}")
      elif r['role'] in ('quantized', 'reference') and n:
        out.append(f"{g['name']} / {name}: {n} int8 matmul(s) off XLA:CPU's fast (YNN) kernel or widened by the "
                   'compiler; check XLA_FLAGS (an empty --xla_cpu_experimental_ynn_fusion_type makes '
                   'int8 ~8x slower)')
  return out


def sanitize_tag(s: str) -> str:
  """A TensorBoard-friendly tag piece: spaces and odd characters become '_'."""
  return re.sub(r'[^A-Za-z0-9_.=\-^+]+', '_', s).strip('_')


def parse_shape(s: str) -> tuple[int, int, int]:
  """'256x1024x4096' -> (256, 1024, 4096) (M x K x N)."""
  parts = str(s).lower().replace('*', 'x').split('x')
  if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f'shape {s!r}: expected MxKxN, like 256x1024x4096')
  return tuple(int(p) for p in parts)  # type: ignore[return-value]


def shape_name(m: int, k: int, n: int) -> str:
  return f'{m}x{k}x{n}'


def matmul_shapes(config) -> list[tuple[int, int, int]]:
  """Squares n^3 (config.squares), MLP-like shapes (config.mlp_shapes) and small M (config.small_m rows with
  K = N = config.small_m_kn), in that order, without repeats."""
  shapes = [(n, n, n) for n in config.squares]
  shapes += [parse_shape(s) for s in config.mlp_shapes]
  shapes += [(m, config.small_m_kn, config.small_m_kn) for m in config.small_m]
  seen, out = set(), []
  for s in shapes:
    if s not in seen:
      seen.add(s)
      out.append(s)
  return out



# ----------------------------------------------------------------------------------------------- runner


def run_grouped(suite: GroupedSuite, config, workdir: str | None = None, *, info: dict[str, Any] | None = None,
                echo: Callable[[str], Any] = print) -> dict[str, Any]:
  """Times every group of the suite, writes bench.json, bench.md and TensorBoard scalars to workdir."""
  info = info if info is not None else timing.machine_info()
  t = config.get('timing') or {}
  kw = {k: t[k] for k in ('warmup', 'rounds', 'min_time', 'clock', 'sync_each') if k in t}
  groups, targets = [], []
  for group in suite.groups():
    t0 = time.perf_counter()
    stats = timing.time_interleaved({n: v.fn for n, v in group.variants.items()}, **kw)
    g = group_result(stats, group)
    g['meta'] = {**g['meta'], 'seconds': round(time.perf_counter() - t0, 2)}
    groups.append(g)
    targets += check_targets(group, g)
    kernels.annotate(groups)  # a bare group's bound, once the group it measures has run
    bare = g['meta'].get('bare') or {}
    echo(f"{suite.name} / {g['name']}: " + ', '.join(
        f"{n} {fmt_ratio(r['ratio'])}" for n, r in g['results'].items() if n != g['baseline'])
        + (f"; bound {fmt_ratio(bare['bound'])}{' (says nothing)' if bare['share'] > 1.0 else ''} "
           f"(matmuls {fmt_share(bare['share'])} of float, bare int8 kernel "
           f"{fmt_ratio(bare['kernel'])} as {kernels.LAYOUT[bare['kernel_form']]})" if 'bound' in bare else ''))
    if workdir:  # A run stopped later (time limit, lost machine) still leaves the groups measured so far.
      write_json_atomic(os.path.join(workdir, 'bench.partial.json'),
                        {'suite': suite.name, 'machine': info, 'groups': groups, 'targets': targets})
    del group, stats
    gc.collect()
  records = suite.records() if suite.records is not None else {}
  if suite.record_targets is not None:
    targets += suite.record_targets(records)
  flags = slower_than_baseline(groups, tolerance=float(config.get('flag_tolerance', 0.0)),
                               roles=tuple(config.get('flag_roles', ('quantized',))))
  warnings = list(info.get('warnings', [])) + slow_int8_warnings(groups)
  if not info.get('malloc_env'):
    warnings.append('malloc settings not pinned: set MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_MMAP_MAX_=0 '
                    'MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1 '
                    '(page faults on fresh outputs: docs/benchmarks.md)')
  result = {
      'schema': bench.SCHEMA,
      'kind': 'groups',
      'suite': suite.name,
      'command': bench.command(),
      'config': config_cli.to_dict(config),
      'machine': info,
      'timing': kw,
      'groups': groups,
      'targets': targets,
      'flags': flags,
      'records': records,
      'meta': suite.meta,
      'warnings': warnings,
  }
  for w in warnings[len(info.get('warnings', [])):]:
    echo(f'WARNING: {w}')
  md = result_markdown(result)
  echo(md)
  if workdir:
    write_outputs(result, md, workdir)
    partial = os.path.join(workdir, 'bench.partial.json')
    if os.path.exists(partial):
      os.remove(partial)
  return result



def write_outputs(result: dict[str, Any], md: str, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'bench.json'), 'w') as f:
    json.dump(result, f, indent=2, default=str)
  with open(os.path.join(workdir, 'bench.md'), 'w') as f:
    f.write(md + '\n')
  with SummaryWriter(workdir) as w:
    suite = sanitize_tag(result['suite'])
    for g in result['groups']:
      for name, r in g['results'].items():
        tag = f"{suite}/{sanitize_tag(g['name'])}/{sanitize_tag(name)}"
        w.scalar(f'{tag}/ratio', r['ratio'], step=0)
        w.scalar(f'{tag}/median_ms', r['median_s'] * 1e3, step=0)
    for t in result['targets']:
      w.scalar(f"{suite}/targets/{sanitize_tag(t['group'])}/{sanitize_tag(t['variant'])}", t['ratio'], step=0)
    w.text(f'{suite}/report', md, step=0)


# --------------------------------------------------------------------------------------------- inspection


def inspect_info(fn, *args) -> dict[str, Any]:
  """Counts of the compiled matmuls of jitted fn(*args) (qjax.ops.inspect_matmuls), and per matmul its origin
  (fwd/dlhs/drhs scope), signature and whether it runs on the fast kernel."""
  try:
    rep = qinspect.inspect_matmuls(fn, *args)
  except Exception as e:  # noqa: BLE001 -- a failed inspection is recorded, the timing still runs.
    return {'error': f'{type(e).__name__}: {e}'}
  ops, gemm_slow = [], 0
  for m in rep.compiled:
    found = re.search(r'[(/](fwd|dlhs|drhs)[)/]', m.op_name)  # 'jit(f)/transpose(jvp(drhs))/dot_general'
    scope = found.group(1) if found else ''
    slow = (m.category == 'int8' and m.fast is False) or (m.widened and m.source_category == 'int8')
    if m.op == 'dot' and slow and len(m.out_shape) >= 2 and min(m.out_shape[-2:]) > 1:
      gemm_slow += 1
    ops.append({'op': m.op, 'scope': scope, 'signature': m.signature, 'fast': m.fast, 'widened': m.widened,
                'out_shape': list(m.out_shape), 'kernel': m.fusion, 'fallback': m.fallback})
  return {'platform': rep.platform, 'matmuls': rep.n_compiled, 'int8': rep.n_int8, 'int8_fast': rep.n_int8_fast,
          'int8_slow': rep.n_int8_slow, 'fp8': rep.n_fp8, 'fp8_fast': rep.n_fp8_fast, 'fast': rep.n_fast,
          'lowered_int8': rep.lowered_int8, 'lowered_fp8': rep.lowered_fp8, 'int8_gemm_slow': gemm_slow,
          'fallbacks': rep.fallbacks(), 'ops': ops}


def maybe_inspect(config, fn, *args) -> dict[str, Any]:
  return inspect_info(fn, *args) if config.get('inspect', True) else {}



def matmul_operands(m, k, n, seed=0):
  """(x (m, k), w (k, n)) in f32, w scaled by 1/sqrt(k): the operands of one matmul shape."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / (k ** 0.5)
  return x, w
