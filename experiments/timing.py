"""Timing helpers for benchmarks: interleaved sampling, ratios, machine info and a markdown table.

    stats = time_interleaved({'x*1.0': f, 'fake_quant': g})   # round-robin: f, g, f, g, ...
    print(markdown_table(stats, baseline='x*1.0'))

Variants are sampled round-robin, so that every ratio compares samples taken at the same moment: load from
other processes, clock changes and the per-process page-fault state (docs/benchmarks.md) hit all variants alike. A
sample is an inner loop of calls lasting about `min_time` seconds, each call synchronised with
`jax.block_until_ready`; its value is the mean time of one call. `Stats` keeps the median, min, max and the
spread (max - min) / median of the samples, and the minor page faults per call (`resource.getrusage`), which
reveal fresh output buffers being faulted in on every call.

A leaf of `experiments` (like fileio): the bench suites and a training run's serving latency share it.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from experiments import version
from qjax.ops import cpu

# Environment variables that change malloc's behaviour and therefore page-fault counts and timings.
MALLOC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_ARENA_MAX',
              'MALLOC_TOP_PAD_', 'GLIBC_TUNABLES')
YNN_FLAG = 'xla_cpu_experimental_ynn_fusion_type'
# 'wall': elapsed time. 'process': CPU time of this process (all its threads, user + system, so page faults
# count): on a machine loaded by other processes it leaves out the time this one waits to be scheduled, and
# with one core (taskset) it equals the elapsed time of an unloaded machine.
CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}


class Stats(NamedTuple):
  """Per-call times in seconds over the samples of one variant."""
  median: float
  min: float
  max: float
  spread: float                   # (max - min) / median
  samples: tuple[float, ...]      # mean time of one call, per sample, in the order taken
  calls_per_sample: int
  page_faults_per_call: float     # minor faults (getrusage ru_minflt) per call, over all samples

  def to_dict(self) -> dict[str, Any]:
    return {'median_s': self.median, 'min_s': self.min, 'max_s': self.max, 'spread': self.spread,
            'samples_s': list(self.samples), 'calls_per_sample': self.calls_per_sample,
            'page_faults_per_call': self.page_faults_per_call}


def make_stats(samples: list[float], calls_per_sample: int, faults: int) -> Stats:
  med = statistics.median(samples)
  lo, hi = min(samples), max(samples)
  spread = (hi - lo) / med if med > 0 else math.inf
  n = max(1, len(samples) * calls_per_sample)
  return Stats(med, lo, hi, spread, tuple(samples), calls_per_sample, faults / n)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _block(out):
  return jax.block_until_ready(out)


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 2, rounds: int = 9,
                     min_time: float = 0.05, sync: Callable[[Any], Any] | None = None,
                     clock: str | Callable[[], float] = 'wall', sync_each: bool = True) -> dict[str, Stats]:
  """Times zero-argument callables round-robin; returns {name: Stats} in the order of `fns`.

  Args:
    fns: name -> callable taking no arguments (close over the inputs). Its result is synchronised.
    warmup: calls of each variant before timing (compiles, first-touch of buffers).
    rounds: samples per variant; round r calls every variant once, in the order of `fns`.
    min_time: target seconds per sample; the inner loop count of each variant is set from its last warm-up
      call (at least 1), so fast variants are repeated more often than slow ones.
    sync: called on each result (default `jax.block_until_ready`).
    clock: 'wall' (time.perf_counter), 'process' (time.process_time: CPU time, steadier on a loaded
      machine; see CLOCKS) or a callable returning seconds.
    sync_each: synchronise every call (default). False synchronises only the last call of each sample, so an
      accelerator's queue stays full and the host's dispatch and synchronisation latency (tens of microseconds,
      a tenth of a 4096^3 bf16 matmul on an H200) is hidden, as in a training loop. Calls that depend on earlier
      ones (a training step on its state) still time correctly: the device runs them in order.
  """
  if not fns:
    raise ValueError('fns is empty: pass {name: callable}')
  if rounds < 1 or warmup < 0 or min_time < 0:
    raise ValueError(f'need rounds >= 1, warmup >= 0, min_time >= 0; got {rounds}, {warmup}, {min_time}')
  sync = sync or _block
  if isinstance(clock, str):
    if clock not in CLOCKS:
      raise ValueError(f'clock={clock!r} is not one of {", ".join(CLOCKS)} (or a callable)')
    clock = CLOCKS[clock]
  calls = {}
  for name, fn in fns.items():
    dt = 0.0
    for _ in range(max(warmup, 1)):
      t0 = clock()
      sync(fn())
      dt = clock() - t0
    calls[name] = max(1, math.ceil(min_time / dt)) if dt > 0 else 1
  samples: dict[str, list[float]] = {name: [] for name in fns}
  faults = dict.fromkeys(fns, 0)
  for _ in range(rounds):
    for name, fn in fns.items():
      n = calls[name]
      f0 = _minor_faults()
      t0 = clock()
      if sync_each:
        for _ in range(n):
          sync(fn())
      else:
        out = None
        for _ in range(n):
          out = fn()
        sync(out)
      t1 = clock()
      faults[name] += _minor_faults() - f0
      samples[name].append((t1 - t0) / n)
  return {name: make_stats(samples[name], calls[name], faults[name]) for name in fns}


def ratios(stats: dict[str, Stats], baseline: str, *, field: str = 'median') -> dict[str, float]:
  """{name: stats[name].<field> / stats[baseline].<field>} (the baseline's own ratio is 1.0)."""
  if baseline not in stats:
    raise ValueError(f'baseline={baseline!r} is not one of the variants: {", ".join(stats)}')
  base = getattr(stats[baseline], field)
  return {name: (getattr(s, field) / base if base > 0 else math.inf) for name, s in stats.items()}


def xla_flags_warning(flags: str | None) -> str | None:
  """A warning when XLA_FLAGS overrides the YNN fusion type (an empty value turns YNN off: int8 dots ~8x
  slower on XLA:CPU), else None."""
  if not flags or YNN_FLAG not in flags:
    return None
  value = None
  for tok in flags.split():
    name, eq, v = tok.lstrip('-').partition('=')
    if name == YNN_FLAG:
      value = v if eq else ''
  if value is None:
    value = '?'
  if value.strip() in ('', '""', "''"):
    return (f'XLA_FLAGS sets --{YNN_FLAG}= (empty): YNNPACK fusions are off, int8 dots run ~8x slower on '
            'XLA:CPU; these timings do not show the default configuration')
  return (f'XLA_FLAGS overrides --{YNN_FLAG}={value}: timings may differ from the default configuration '
          '(an empty value makes int8 ~8x slower)')


def simd_warning(cpu_flags, platform: str) -> str | None:
  """A warning when the CPU lacks the int8 dot-product instructions (VNNI) that XLA:CPU's fast int8 GEMM needs
  for its 3-4x over f32: without them (AVX2 only) that kernel runs at ~1.2-1.55x f32, which bounds every int8
  speed-up measured here (docs/benchmarks.md). None on accelerators or with VNNI / AMX."""
  if platform != 'cpu':
    return None
  if set(cpu_flags) & cpu.INT8_DOT_FLAGS:
    return None
  return ('this CPU has no VNNI (avx512_vnni / avx_vnni) or AMX: XLA:CPU\'s int8 GEMM runs at ~1.2-1.55x f32 on '
          'AVX2 alone (3.4-4.1x with VNNI), so int8 speed-ups here are bounded by that; compare quantized rows '
          'with the bare int8 kernel of the same run')


def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
  out = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if not line.strip():
          break
        k, _, v = line.partition(':')
        out[k.strip()] = v.strip()
  except OSError:
    pass
  return out


def _cpu_model(cpuinfo: dict[str, str]) -> str:
  name = cpuinfo.get('model name') or platform.processor() or platform.machine()
  if 'cpu family' in cpuinfo and 'model' in cpuinfo:
    name += f" (family {cpuinfo['cpu family']} model {cpuinfo['model']})"
  return name


def _version(module: str) -> str | None:
  try:
    mod = __import__(module)
  except ImportError:
    return None
  return getattr(mod, '__version__', None)


def machine_info() -> dict[str, Any]:
  """What a timing depends on: CPU, cores and affinity, load, versions, device, XLA and malloc settings."""
  try:
    affinity = sorted(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    affinity = None
  flags = os.environ.get('XLA_FLAGS', '')
  warning = xla_flags_warning(flags)
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  dev = jax.devices()[0]
  cpuinfo = _cpuinfo()
  cpu_flags = set(cpuinfo.get('flags', '').split())
  return {
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'cpu_model': _cpu_model(cpuinfo),
      'cpu_simd': [f for f in ('avx2', 'avx512f', 'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'amx_int8')
                   if f in cpu_flags],
      'cpu_count': os.cpu_count(),
      'affinity': affinity,
      'loadavg': list(load) if load else None,
      'python': sys.version.split()[0],
      'jax': _version('jax'),
      'jaxlib': _version('jaxlib'),
      'flax': _version('flax'),
      'platform': dev.platform,
      'device_kind': dev.device_kind,
      'device_count': jax.device_count(),
      'xla_flags': flags,
      'malloc_env': {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
      'code': version.CODE,
      'warnings': [w for w in (warning, simd_warning(cpu_flags, dev.platform)) if w],
  }


def _fmt_time(s: float) -> str:
  """Three significant digits in s, ms or us, chosen after rounding (0.9996 s is '1 s', not '1e+03 ms')."""
  for unit, scale in (('us', 1e6), ('ms', 1e3)):
    if float(f'{s * scale:.3g}') < 1000:
      return f'{s * scale:.3g} {unit}'
  return f'{s:.3g} s'


def markdown_table(stats: dict[str, Stats], baseline: str | None = None) -> str:
  """One row per variant: median, min, max, spread, ratio to the baseline (median and min), faults per call."""
  head = ['variant', 'median', 'min', 'max', 'spread']
  if baseline is not None:
    r_med, r_min = ratios(stats, baseline), ratios(stats, baseline, field='min')
    head += [f'ratio vs {baseline} (median)', 'ratio (min)']
  head += ['faults/call', 'calls x samples']
  rows = []
  for name, s in stats.items():
    row = [name, _fmt_time(s.median), _fmt_time(s.min), _fmt_time(s.max), f'{s.spread:.0%}']
    if baseline is not None:
      row += [f'{r_med[name]:.2f}x', f'{r_min[name]:.2f}x']
    row += [f'{s.page_faults_per_call:.0f}', f'{s.calls_per_sample} x {len(s.samples)}']
    rows.append(row)
  return format_rows(head, rows)


def format_rows(head: list[str], rows: list[list[Any]]) -> str:
  """A markdown table from a header and rows of cells (any str()-able values)."""
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def machine_table(info: dict[str, Any]) -> str:
  """machine_info() as a two-column markdown table."""
  keys = ('date', 'cpu_model', 'cpu_simd', 'cpu_count', 'affinity', 'loadavg', 'python', 'jax', 'jaxlib', 'flax',
          'platform', 'device_kind', 'xla_flags', 'malloc_env', 'code')
  rows = []
  for k in keys:
    v = info.get(k)
    if k == 'loadavg' and v:
      v = ', '.join(f'{a:.2f}' for a in v)
    if k == 'code' and v:
      v = v['commit'][:12] + (' (with local changes)' if v['dirty'] else '')
    rows.append([k, f'`{v}`' if k in ('xla_flags', 'malloc_env') else v])
  return format_rows(['', ''], rows)
