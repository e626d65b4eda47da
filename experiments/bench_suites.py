r"""Speed suites: quantized matmuls and models against float, every figure a ratio taken in the same run.

    python -m experiments.bench --config=configs/bench_raw_dot.py [--workdir=runs/bench/raw_dot]
    (also configs/bench_qmatmul.py, bench_train.py, bench_e2e.py, bench_memory.py; `:runlocal` for a smoke run)

Suites (config.module = 'experiments.bench_suites'; registered with experiments.bench):
  raw_dot       lax.dot_general in f32, bf16 -> f32, int8 -> int32 and fp8 -> f32 over square, MLP-like and
                small-M shapes: what XLA's kernels give before any quantization work.
  qmatmul       qjax.ops.dot_general forward: dynamic int8 (quantize both operands, int8 matmul, rescale) and
                serving with pre-quantized int8 weights (a QArray rhs), against f32; the small-M routing.
  train_matmul  forward + both backward matmuls (jax.vjp) with int8 in all three, the row-major drhs form and the
                naive one (drhs_row_major=False), against the f32 forward + backward.
  e2e           the experiments' MLP (NNX) and LeNet-5 (Linen) quantized by qjax.flax rules built from
                experiments.quant_config (as `python -m experiments.train` builds them): QAT steps with a real
                int8 or a fake-quant forward, the int8 training step, and the PTQ int8 serving forward.
  memory        served parameter bytes (f32 / int8 / packed int4), compiled training-step memory, and the live
                bytes of quantize_nnx relative to the model alone. No timing.

A grouped suite times several groups; each group is one interleaved timing (timing.time_interleaved) with its own
float baseline (the f32 matmul of that shape, the float model's step), so every ratio compares samples of the
same moment. Per variant the result records its role ('baseline'; 'quantized' = a qjax configuration as
researchers run it; 'contrast' = a form kept to show what the library avoids; 'reference' = a building block
such as the bare int8 dot), the inspection of its compiled program (qjax.ops.inspect_matmuls: matmuls that run
in int8, on XLA:CPU's fast kernel or not) and, for qjax matmuls, the small-M routing decision. The report flags
every 'quantized' variant slower than its baseline (ratio > 1 + config.flag_tolerance) and checks the issue's
targets, all stated as time ratios to the baseline.

bench.json of a grouped suite: {schema: 1, kind: 'groups', suite, command, config, machine, timing,
groups: [{name, baseline, meta, results: {variant: {role, median_s, min_s, max_s, spread, samples_s,
calls_per_sample, page_faults_per_call, ratio, ratio_min, speedup, info}}}], targets: [{group, variant, text,
max_ratio, ratio, met}], flags: [{group, variant, role, ratio, text}], records, meta, warnings}.
ratio = median time / the baseline's median time (below 1: faster than float); speedup = 1 / ratio.
TensorBoard scalars (experiments.tb) go to <workdir>: '<suite>/<group>/<variant>/ratio', '.../median_ms'.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from experiments import bench, configlib, timing
from experiments.fileio import write_json_atomic

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
  """An issue target: variant's median time / the baseline's must be <= max_ratio."""
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


def _fmt_ratio(r: float) -> str:
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
    rows.append([name, r['role'], _fmt_s(r['median_s']), f"{r['spread']:.0%}", _fmt_ratio(r['ratio']),
                 _fmt_ratio(r['speedup']), _fmt_insp(r.get('info') or {}), f"{r['page_faults_per_call']:.0f}", note])
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
      row.append('' if r is None else _fmt_ratio(r['ratio']))
    rows.append(row)
  return timing.format_rows(['group', 'baseline median'] + names, rows)


def result_markdown(result: dict[str, Any]) -> str:
  lines = [f"## {result['suite']}", '']
  for w in result['warnings']:
    lines += [f'**WARNING:** {w}', '']
  if result['groups']:
    lines += ['Time ratio to each group\'s baseline (median of the samples; below 1 is faster):', '',
              summary_markdown(result['groups']), '']
  if result['targets']:
    rows = [[t['group'], t['variant'], t['text'], f"<= {t['max_ratio']:.3g}x", _fmt_ratio(t['ratio']),
             'met' if t['met'] else 'NOT met'] for t in result['targets']]
    lines += ['Targets:', '', timing.format_rows(['group', 'variant', 'target', 'max time ratio', 'measured', ''],
                                                  rows), '']
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
    echo(f"{suite.name} / {g['name']}: " + ', '.join(
        f"{n} {_fmt_ratio(r['ratio'])}" for n, r in g['results'].items() if n != g['baseline']))
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
    warnings.append('malloc settings not pinned: set MALLOC_MMAP_THRESHOLD_=33554432 '
                    'MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1 '
                    '(page faults on fresh outputs: docs/benchmarks.md)')
  result = {
      'schema': bench.SCHEMA,
      'kind': 'groups',
      'suite': suite.name,
      'command': bench._command(),
      'config': configlib.to_dict(config),
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
  from experiments.tb import SummaryWriter  # noqa: PLC0415 (tensorboard imports are slow)
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
  from qjax.ops import inspect as qinspect  # noqa: PLC0415
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


def _maybe_inspect(config, fn, *args) -> dict[str, Any]:
  return inspect_info(fn, *args) if config.get('inspect', True) else {}


# -------------------------------------------------------------------------------------------- raw_dot


def _operands(m, k, n, seed=0):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (k, n), jnp.float32) / (k ** 0.5)
  return x, w


def raw_dot_suite(config) -> GroupedSuite:
  """lax.dot_general at each shape in f32 (baseline), bf16 x bf16 -> f32, int8 x int8 -> int32 and
  fp8 (e4m3) x fp8 -> f32: the kernels XLA gives before qjax adds quantization."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415

  dtypes = tuple(config.get('dtypes', ('bf16', 'int8', 'fp8')))

  def groups():
    for m, k, n in matmul_shapes(config):
      x, w = _operands(m, k, n, config.get('seed', 0))
      cast = {
          'f32': (jnp.float32, jnp.float32),
          'bf16': (jnp.bfloat16, jnp.float32),
          'int8': (jnp.int8, jnp.int32),
          'fp8': (jnp.float8_e4m3fn, jnp.float32),
      }
      names = {'f32': 'f32', 'bf16': 'bf16 -> f32', 'int8': 'int8 -> int32', 'fp8': 'fp8 e4m3 -> f32'}
      variants = {}
      for d in ('f32',) + dtypes:
        in_t, out_t = cast[d]
        if d == 'int8':
          a = jnp.clip(jnp.round(x * 40), -127, 127).astype(jnp.int8)
          b = jnp.clip(jnp.round(w * 40 * k ** 0.5), -127, 127).astype(jnp.int8)
        else:
          a, b = x.astype(in_t), w.astype(in_t)
        f = jax.jit(lambda a, b, out_t=out_t: lax.dot_general(a, b, DN, preferred_element_type=out_t))
        info = {'inspect': _maybe_inspect(config, f, a, b)}
        variants[names[d]] = Variant(lambda f=f, a=a, b=b: f(a, b), 'baseline' if d == 'f32' else 'reference', info)
      yield Group(shape_name(m, k, n), variants, 'f32',
                  {'shape': [m, k, n], 'gflop': 2 * m * k * n / 1e9})

  return GroupedSuite('raw_dot', groups, meta={'dimension_numbers': 'contract lhs dim 1 with rhs dim 0'})


# -------------------------------------------------------------------------------------------- qmatmul


def qmatmul_suite(config) -> GroupedSuite:
  """qjax.ops.dot_general forward at each shape against f32:
    dynamic int8       int8_dynamic(bwd_bits=None): per-row activation and per-column weight absmax scales computed
                       in the call, int8 x int8 -> int32, rescale (small-M rows routed to float by default)
    serving int8 W     the weight pre-quantized outside the jit (a QArray, int8 per output column); only the
                       activations are quantized in the call
    int8 dot alone     (reference) the bare int8 x int8 -> int32 dot of pre-quantized operands, no rescale
  and for the small-M shapes (config.small_m rows) also both qjax variants on the other side of the routing
  decision ('contrast'): forced int8 (small_m=0) where rows <= small_m, else routed to float (small_m=rows)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415

  import qjax  # noqa: PLC0415
  from qjax.ops import config as qconfig  # noqa: PLC0415
  from qjax.ops import dot_general as qdot_general  # noqa: PLC0415

  cfg = qconfig.int8_dynamic(bwd_bits=None)
  if config.get('small_m_threshold', -1) >= 0:
    cfg = dataclasses.replace(cfg, small_m=int(config.small_m_threshold))
  wspec = qjax.QuantSpec(format='int8', granularity='per_channel', axis=1)
  dyn_target = {parse_shape(s) for s in config.get('dynamic_target_shapes', ())}
  small_rows = set(config.get('small_m', ()))

  def qfn(c):
    return jax.jit(lambda x, w: qdot_general(x, w, DN, config=c))

  def groups():
    for m, k, n in matmul_shapes(config):
      x, w = _operands(m, k, n, config.get('seed', 0))
      wq = jax.jit(lambda w: qjax.quantize(w, wspec))(w)
      xq = jax.jit(lambda x: qjax.quantize(x, qjax.QuantSpec(format='int8', granularity='per_channel', axis=0)))(x)
      f32 = jax.jit(lambda a, b: lax.dot_general(a, b, DN))
      i8 = jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.int32))
      routed = m <= cfg.small_m
      route = f'float (rows {m} <= small_m={cfg.small_m})' if routed else 'int8'
      variants = {
          'f32': Variant(lambda x=x, w=w, f=f32: f(x, w), 'baseline', {'inspect': _maybe_inspect(config, f32, x, w)}),
      }
      fd, fs = qfn(cfg), qfn(cfg)
      variants['dynamic int8'] = Variant(lambda x=x, w=w, f=fd: f(x, w), 'quantized',
                                         {'inspect': _maybe_inspect(config, fd, x, w), 'route': route,
                                          'routed_to_float': routed, 'small_m': cfg.small_m})
      variants['serving int8 W'] = Variant(lambda x=x, w=wq, f=fs: f(x, w), 'quantized',
                                           {'inspect': _maybe_inspect(config, fs, x, wq), 'route': route,
                                            'routed_to_float': routed, 'small_m': cfg.small_m})
      # Small-M shapes also time the other side of the routing decision ('contrast'), so the benchmark shows
      # whether the threshold picks the faster path on this machine.
      if routed:
        alt, alt_name, alt_route = dataclasses.replace(cfg, small_m=0), 'small_m=0', 'int8 (forced)'
      elif m in small_rows:
        alt, alt_name, alt_route = dataclasses.replace(cfg, small_m=m), f'small_m={m}', f'float (rows {m}, forced)'
      else:
        alt = None
      if alt is not None:
        gd, gs = qfn(alt), qfn(alt)
        for name, f, wv in (('dynamic int8', gd, w), ('serving int8 W', gs, wq)):
          variants[f'{name}, {alt_name}'] = Variant(
              lambda x=x, w=wv, f=f: f(x, w), 'contrast',
              {'inspect': _maybe_inspect(config, f, x, wv), 'route': alt_route, 'routed_to_float': not routed,
               'small_m': alt.small_m})
      variants['int8 dot alone'] = Variant(lambda a=xq.qvalue, b=wq.qvalue, f=i8: f(a, b), 'reference',
                                           {'inspect': _maybe_inspect(config, i8, xq.qvalue, wq.qvalue)})
      targets = []
      if (m, k, n) in dyn_target:
        targets.append(Target('dynamic int8', 0.4, 'forward-only dynamic int8 >= 2.5x faster than f32'))
      if m >= 256:
        targets.append(Target('serving int8 W', 1 / 3, 'serving with pre-quantized int8 weights, M >= 256: '
                                                        '>= 3.0x faster than f32'))
      yield Group(shape_name(m, k, n), variants, 'f32',
                  {'shape': [m, k, n], 'rows': m, 'small_m': cfg.small_m, 'routed_to_float': routed},
                  tuple(targets))

  meta = {'config': cfg.to_dict(), 'weight_spec': wspec.to_dict()}
  return GroupedSuite('qmatmul', groups, meta=meta)


# --------------------------------------------------------------------------------------- train_matmul


def _fwd_bwd(dot):
  """jitted (x, w, g) -> (y, dx, dw): the forward and both backward matmuls of y = dot(x, w) (jax.vjp)."""
  import jax  # noqa: PLC0415

  def f(x, w, g):
    y, vjp = jax.vjp(dot, x, w)
    dx, dw = vjp(g)
    return y, dx, dw
  return jax.jit(f)


def _scopes_fast(insp: dict[str, Any]) -> dict[str, str]:
  """{'fwd': 'int8 fast', 'dlhs': 'int8 SLOW', 'drhs': 'f32'}: how each named matmul (qjax scopes) runs."""
  out = {}
  for op in insp.get('ops', []):
    if not op['scope']:
      continue
    if 's8' not in op['signature']:
      out[op['scope']] = op['signature'].split(' ')[0]
    elif op['fast'] and not op['widened']:
      out[op['scope']] = 'int8 fast'
    else:
      out[op['scope']] = 'int8 SLOW'
  return {k: out[k] for k in ('fwd', 'dlhs', 'drhs') if k in out}


def train_matmul_suite(config) -> GroupedSuite:
  """Training-style matmul (forward + dlhs + drhs via jax.vjp) of (B x K) . (K x N) against f32:
    int8 x3            int8_dynamic(): int8 in all three matmuls, drhs as row-major lhs^T . g (fast kernel)
    int8 x3, naive drhs    the same with drhs_row_major=False (XLA up-casts the transposed int8 operand)
    int8 fwd, f32 bwd  int8_dynamic(bwd_bits=None): only the forward in int8"""
  import jax  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415

  from qjax.ops import config as qconfig  # noqa: PLC0415
  from qjax.ops import dot_general as qdot_general  # noqa: PLC0415

  b, k, n = (int(v) for v in config.train_shape)
  full = qconfig.int8_dynamic()
  cfgs = {
      'int8 x3': ('quantized', full),
      'int8 x3, naive drhs': ('contrast', dataclasses.replace(full, drhs_row_major=False)),
      'int8 fwd, f32 bwd': ('quantized', qconfig.int8_dynamic(bwd_bits=None)),
  }

  def groups():
    x, w = _operands(b, k, n, config.get('seed', 0))
    g = jax.random.normal(jax.random.key(7), (b, n))
    f32 = _fwd_bwd(lambda x, w: lax.dot_general(x, w, DN))
    variants = {'f32': Variant(lambda: f32(x, w, g), 'baseline', {'inspect': _maybe_inspect(config, f32, x, w, g)})}
    for name, (role, c) in cfgs.items():
      f = _fwd_bwd(lambda x, w, c=c: qdot_general(x, w, DN, config=c))
      insp = _maybe_inspect(config, f, x, w, g)
      fast = _scopes_fast(insp)
      variants[name] = Variant(lambda f=f: f(x, w, g), role,
                               {'inspect': insp, 'matmuls_by_scope': fast, 'config': c.to_dict(),
                                'route': ', '.join(f'{s} {v}' for s, v in fast.items())})
    targets = (Target('int8 x3', 0.35, 'int8 fwd + both bwd matmuls <= 0.35x the f32 fwd+bwd time'),)
    yield Group(f'{b}x{k} . {k}x{n} fwd+bwd', variants, 'f32', {'shape': [b, k, n]}, targets)

  return GroupedSuite('train_matmul', groups, meta={'shape': [b, k, n]})


# -------------------------------------------------------------------------------------------------- e2e

# Peer figures as the issue quotes them (time ratio to the float step / forward). Separate measurements of the
# same peers gave the ranges in PEERS_NOTE (jax 0.10.2, AVX-512 VNNI EPYC); none of them is rerun by this suite.
PEERS = {
    'Qwix QAT step (w8a8)': 0.86,
    'Qwix PTQ int8 forward': 0.30,
    'AQT int8-forward config (config_v4)': 0.88,
    'AQT fully quantized (fwd + bwd int8)': 2.8,
    'Qwix fully quantized (QT w8a8g8)': '1.8-1.9',
}
PEERS_NOTE = ('as quoted by the issue; separate measurements gave Qwix QAT 0.72-1.08x, Qwix PTQ forward 0.59-0.77x, '
              'Qwix QT 2.25-2.79x, AQT config_v4 0.77-0.93x, AQT fully_quantized 3.1-3.8x (jax 0.10.2, AVX-512 VNNI '
              'EPYC, not this suite\'s machine)')


def quant_rules(kind: str, config=None):
  """Rules as `python -m experiments.train` builds them from experiments.quant_config's defaults (int8 weights
  per channel, int8 activations per tensor; activation grids signed as written, act_signedness='format'):
    'qat'          mode 'auto' (real int8 forward), float backward
    'qat_fake'     mode 'fake' (fake-quant forward, float matmul)
    'int8_train'   'qat' plus int8 gradients (mode quantized_training: grad int8, both backward matmuls int8)
    'ptq'          static per-tensor activation ranges (calibrated), for int8 serving
    'ptq_int4'     'ptq' with int4 weights (packed two per byte when served)
  `config.quant_overrides` (dotted keys of config.quant, e.g. {'act.granularity': 'per_channel'}) apply first."""
  from experiments import quant_config  # noqa: PLC0415
  q = quant_config.default_quant_config()
  # Activation grids as the format is written: no probe run on data before the timed programs, and the same
  # grids as every figure in docs/benchmarks.md (train's default decides them from data, 'auto').
  q.act_signedness = 'format'
  for key, value in dict((config.get('quant_overrides') or {}) if config is not None else {}).items():
    configlib.set_key(q, key.replace('__', '.'), value)
  if kind == 'qat_fake':
    q.mode = 'fake'
  elif kind == 'int8_train':
    q.grad.format = 'int8'
  elif kind == 'ptq_int4':
    q.weight.format = 'int4'
  elif kind not in ('qat', 'ptq'):
    raise ValueError(f'rules kind {kind!r} is not one of qat, qat_fake, int8_train, ptq, ptq_int4')
  return quant_config.build_rules(q, ptq=kind.startswith('ptq'))


# The char-LM of the e2e suite: the Shakespeare config's size (configs/shakespeare_charlm.py), 65 characters;
# config.charlm overrides any of these (bench_gpu's also sets dtype, batches and sizes).
CHARLM = {'d_model': 128, 'num_heads': 4, 'num_layers': 2, 'seq_len': 128, 'vocab_size': 65, 'dtype': 'float32',
          'train_batch': 32, 'serve_batches': (1, 8, 64, 256)}


def charlm_config(config) -> dict:
  return {**CHARLM, **dict((config.get('charlm') if config is not None else None) or {})}


def _model_def(name: str, config):
  import ml_collections  # noqa: PLC0415

  from experiments import models  # noqa: PLC0415
  mc = ml_collections.ConfigDict({'name': name})
  if name == 'mlp':
    mc.hidden = tuple(config.mlp_hidden)
  if name == 'char_lm':
    c = charlm_config(config)
    mc.update({k: c[k] for k in ('d_model', 'num_heads', 'num_layers', 'dtype')})
    return models.build(mc, vocab_size=c['vocab_size'], seq_len=c['seq_len'])
  return models.build(mc, num_classes=10)


def _batch(b: int, seed: int = 0, name: str = 'mlp', config=None):
  """A random batch for model `name`: 28x28 images and labels, or (char_lm) token windows and next tokens."""
  import jax  # noqa: PLC0415
  kx, ky = jax.random.split(jax.random.key(seed))
  if name == 'char_lm':
    c = charlm_config(config)
    tok = jax.random.randint(kx, (b, c['seq_len'] + 1), 0, c['vocab_size'])
    return tok[:, :-1], tok[:, 1:]  # (batch, seq) inputs, (batch, seq) targets
  return jax.random.uniform(kx, (b, 28, 28)), jax.random.randint(ky, (b,), 0, 10)


class _Stepper:
  """A donated, jitted train step over a state kept here; each call advances the state (as a real run does)."""

  def __init__(self, trainer, state, x, y):
    import jax  # noqa: PLC0415
    self.step = jax.jit(trainer.train_step, donate_argnums=0)
    self.state, self.x, self.y = state, x, y

  def __call__(self):
    self.state, metrics = self.step(self.state, self.x, self.y)
    return self.state, metrics


def _train_variant(md, rules, x, y, config, role):
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from experiments import trainers  # noqa: PLC0415
  trainer = trainers.make(md, optax.adam(1e-3), rules)
  state = trainer.init(jax.random.key(config.get('seed', 0)), x)
  stepper = _Stepper(trainer, state, x, y)
  info = {'inspect': _maybe_inspect(config, stepper.step, state, x, y)}
  return Variant(stepper, role, info)


def _serving_forward(md, rules, x, config):
  """(jitted forward, its variables) of the model: float when rules is None, else quantized by rules, calibrated
  on x (static activation ranges) and converted for int8 serving."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  from experiments import summaries, trainers  # noqa: PLC0415
  trainer = trainers.make(md, optax.adam(1e-3), rules)
  state = trainer.init(jax.random.key(config.get('seed', 0)), x)
  if rules is not None:
    cal = jax.jit(trainer.calibrate_step)
    for _ in range(int(config.get('calibration_batches', 2))):
      state = cal(state, x)
  fwd, args, _, _ = summaries.serving_forward(trainer, state, x, rules)
  return jax.jit(fwd), args[0]


def e2e_suite(config) -> GroupedSuite:
  """Per model in config.models: a training group at config.train_batch (float step baseline; QAT int8 forward,
  QAT fake-quant forward, int8 training) and a serving group per batch in config.serve_batches (the char-LM:
  config.charlm's train_batch and serve_batches, in sequences; see CHARLM) (float forward
  baseline; PTQ int8 serving forward). Steps are jitted with the state donated, as experiments.train runs them."""
  import jax  # noqa: PLC0415

  def groups():
    for name in config.models:
      md = _model_def(name, config)
      train_batch = charlm_config(config)['train_batch'] if name == 'char_lm' else config.train_batch
      serve_batches = charlm_config(config)['serve_batches'] if name == 'char_lm' else config.serve_batches
      x, y = _batch(train_batch, config.get('seed', 0), name, config)
      variants = {'float step': _train_variant(md, None, x, y, config, 'baseline')}
      variants['QAT, int8 forward'] = _train_variant(md, quant_rules('qat', config), x, y, config, 'quantized')
      variants['QAT, fake-quant forward'] = _train_variant(md, quant_rules('qat_fake', config), x, y, config,
                                                           'quantized')
      variants['int8 training (fwd + bwd int8)'] = _train_variant(md, quant_rules('int8_train', config), x, y,
                                                                  config, 'quantized')
      targets = (Target('QAT, int8 forward', 0.75, 'QAT step with real int8 forward <= 0.75x float step'),
                 Target('QAT, fake-quant forward', 1.1, 'QAT step with fake-quant forward <= 1.1x float step'),
                 Target('int8 training (fwd + bwd int8)', 0.53,
                        'int8 fwd + quantized bwd step >= 1.9x faster than float (<= 0.53x)'))
      yield Group(f'{name} train b{train_batch}', variants, 'float step',
                  {'model': name, 'batch': train_batch, 'hidden': list(config.mlp_hidden) if name == 'mlp'
                   else None}, targets)
      del variants
      gc.collect()
      for b in serve_batches:
        xs, _ = _batch(b, config.get('seed', 0) + 1, name, config)
        ff, fv = _serving_forward(md, None, xs, config)
        qf, qv = _serving_forward(md, quant_rules('ptq', config), xs, config)
        variants = {
            'float forward': Variant(lambda f=ff, v=fv, xs=xs: f(v, xs), 'baseline',
                                     {'inspect': _maybe_inspect(config, ff, fv, xs)}),
            'PTQ int8 serving': Variant(lambda f=qf, v=qv, xs=xs: f(v, xs), 'quantized',
                                        {'inspect': _maybe_inspect(config, qf, qv, xs),
                                         'param_bytes': _tree_bytes(qv), 'float_param_bytes': _tree_bytes(fv)}),
        }
        targets = ((Target('PTQ int8 serving', 0.27, 'PTQ int8 serving forward, batch >= 256: <= 0.27x float'),)
                   if b >= 256 else ())
        yield Group(f'{name} serve b{b}', variants, 'float forward', {'model': name, 'batch': b}, targets)
    jax.clear_caches()

  rules = {k: [r.to_dict() for r in quant_rules(k, config)] for k in ('qat', 'qat_fake', 'int8_train', 'ptq')}
  meta = {'peers_time_ratio': PEERS, 'peers_note': PEERS_NOTE, 'rules': rules}
  return GroupedSuite('e2e', groups, meta=meta)


# ----------------------------------------------------------------------------------------------- memory


def _tree_bytes(tree) -> int:
  import jax  # noqa: PLC0415
  return int(sum(getattr(a, 'nbytes', 0) for a in jax.tree.leaves(tree)))


def live_bytes() -> int:
  """Bytes of all live jax arrays of this process."""
  import jax  # noqa: PLC0415
  gc.collect()
  return int(sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()))


class LivePeak:
  """Samples the live jax array bytes every `interval` seconds on a thread (a context manager); `.peak` is the
  largest sample (a lower bound of the true peak: XLA temporaries inside a jitted call are not live arrays)."""

  def __init__(self, interval: float = 0.002):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  def _run(self):
    import jax  # noqa: PLC0415
    while not self._stop.is_set():
      try:
        self.peak = max(self.peak, sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()))
      except Exception:  # noqa: BLE001,S110 -- an array deleted while summing; the next sample counts.
        pass
      self._stop.wait(self.interval)

  def __enter__(self):
    self.peak = live_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, live_bytes())


def _compiled_memory(fn, *args) -> dict[str, Any]:
  m = fn.lower(*args).compile().memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                                         'temp_size_in_bytes') if hasattr(m, k)}
  peak = getattr(m, 'peak_memory_in_bytes', None)
  if peak:
    out['peak_memory_in_bytes'] = int(peak)
  return out


def memory_records(config) -> dict[str, Any]:
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from experiments import summaries, trainers  # noqa: PLC0415
  from qjax import flax as qflax  # noqa: PLC0415

  md = _model_def('mlp', config)
  x, y = _batch(config.train_batch, config.get('seed', 0))
  out: dict[str, Any] = {'model': f"mlp 784-{'-'.join(str(h) for h in config.mlp_hidden)}-10"}

  # Parameters as served, in memory and as an orbax checkpoint (orbax's defaults: zstd, OCDBT).
  served, on_disk = {}, {}
  for label, kind in (('float32', None), ('int8', 'ptq'), ('int4 packed', 'ptq_int4')):
    _, variables = _serving_forward(md, None if kind is None else quant_rules(kind, config), x, config)
    served[label] = _tree_bytes(variables)
    on_disk[label] = summaries.checkpoint_bytes(variables)
  out['served_param_bytes'] = served
  out['served_param_ratio_to_float'] = {k: v / served['float32'] for k, v in served.items()}
  out['checkpoint_bytes'] = on_disk
  out['checkpoint_ratio_to_float'] = {k: v / on_disk['float32'] for k, v in on_disk.items()}

  # Compiled training-step memory (donated state).
  steps = {}
  for label, kind in (('float', None), ('QAT int8 forward', 'qat'), ('int8 training', 'int8_train')):
    trainer = trainers.make(md, optax.adam(1e-3), None if kind is None else quant_rules(kind, config))
    state = trainer.init(jax.random.key(0), x)
    steps[label] = _compiled_memory(jax.jit(trainer.train_step, donate_argnums=0), state, x, y)
    steps[label]['state_bytes'] = _tree_bytes(state)
    del trainer, state
  out['train_step_memory'] = steps
  stats = jax.local_devices()[0].memory_stats()
  out['device_memory_stats'] = stats if stats else 'not available on this backend (None)'

  # Live bytes of quantize_nnx on the MLP relative to the model alone.
  gc.collect()
  base = live_bytes()
  model = md.make(nnx.Rngs(0))
  model_bytes = live_bytes() - base
  with LivePeak() as lp:
    qflax.quantize_nnx(model, quant_rules('qat', config), x)
  after = live_bytes() - base
  out['quantize_nnx_live_bytes'] = {
      'model_alone': model_bytes, 'after_quantize': after, 'sampled_peak_during_quantize': lp.peak - base,
      'ratio_after': after / model_bytes, 'ratio_peak': (lp.peak - base) / model_bytes,
      'note': 'live jax arrays (jax.live_arrays) including the sample batch; the peak is sampled every 2 ms on a '
              'thread (XLA temporaries inside the jitted creation run are not counted)'}
  del model
  return out


def memory_targets(records: dict[str, Any]) -> list[dict[str, Any]]:
  out = []
  q = records.get('quantize_nnx_live_bytes') or {}
  if q:
    ratio = max(q['ratio_after'], q['ratio_peak'])
    out.append({'group': 'memory', 'variant': 'quantize_nnx', 'text': 'peak memory of quantizing by rules <= 1.3x '
                'the model alone', 'max_ratio': 1.3, 'ratio': ratio, 'met': bool(ratio <= 1.3)})
  ck = records.get('checkpoint_ratio_to_float') or {}
  for label, limit in (('int8', 0.27), ('int4 packed', 0.15)):
    if label in ck:
      out.append({'group': 'memory', 'variant': f'{label} checkpoint', 'text': f'orbax serving checkpoint, {label} '
                  f'weights: <= {limit}x the float one', 'max_ratio': limit, 'ratio': ck[label],
                  'met': bool(ck[label] <= limit)})
  return out


def memory_suite(config) -> GroupedSuite:
  """No timing: parameter bytes as served, compiled training-step memory, live bytes of quantize_nnx."""
  return GroupedSuite('memory', lambda: iter(()), records=lambda: memory_records(config),
                      record_targets=memory_targets)


# ---------------------------------------------------------------------------------------------- register

SUITE_FNS = {'raw_dot': raw_dot_suite, 'qmatmul': qmatmul_suite, 'train_matmul': train_matmul_suite,
             'e2e': e2e_suite, 'memory': memory_suite}
for _name, _fn in SUITE_FNS.items():
  bench.register(_name)(_fn)
