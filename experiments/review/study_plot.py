"""A study's figure: the metric against bits, one line per method, error bars over seeds, the float model as a
reference line (matplotlib, Agg backend).

What is a bit setting and what is a method is read from the trials' swept labels: the label that names bits
(`bits=w4a4`, `bits=w3a3_lsq`, or a weight format `w=int3`) gives the bits (W4A4) and a method suffix (lsq); the
other labels that differ between the quantized configurations of one mode (`estimator=lsq`) name the method.
Labels that are constant within a mode (the mode itself, `steps` where the float model trained longer than the
fine-tunes) name no method, so a sweep of estimator x bits gives one line per estimator. PTQ and QAT are separate
lines when a study has both.
"""


from __future__ import annotations

import dataclasses
import io
import math
import re

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.transforms import ScaledTranslation

from experiments.review.results import Config, float_reference

# w4a4, W8, w4a8_per_channel, w3a3-lsq, w4g128: weight bits, activation bits, the rest (a method's name, or the
# group size written without a separator).
_BITS = re.compile(r'^w(\d+)(?:a(\d+))?(?:[_-](.+)|(g\d+))?$', re.IGNORECASE)
_INT = re.compile(r'^u?int(\d+)$')  # int4, uint8: a weight format label
PERCENT_METRICS = ('accuracy',)  # fractions, drawn in percent as the docs' tables give them


@dataclasses.dataclass(frozen=True)
class Point:
  """One configuration at one bit setting: its metric's mean and std over seeds."""
  bits: float     # weight bits: the x position
  setting: str    # the tick's name, e.g. 'W4A4'
  mean: float
  std: float
  seeds: int
  label: str      # the configuration, as the report's table names it


@dataclasses.dataclass(frozen=True)
class Series:
  name: str
  points: tuple[Point, ...]  # fewest bits first


@dataclasses.dataclass(frozen=True)
class Study:
  """What the figure draws: the quantized series and the float references (name, mean, std, seeds)."""
  series: tuple[Series, ...]
  floats: tuple[tuple[str, float, float, int], ...]
  method_keys: tuple[str, ...]

  @property
  def settings(self) -> dict[float, list[str]]:
    """x position -> the bit settings drawn there (W4A4 and W4A8 share weight bits 4)."""
    out: dict[float, list[str]] = {}
    for p in sorted((p for s in self.series for p in s.points), key=lambda p: (p.bits, p.setting)):
      if p.setting not in out.setdefault(p.bits, []):
        out[p.bits].append(p.setting)
    return out


def parse_bits(value: str) -> tuple[float, str, str] | None:
  """'w4a8_per_channel' -> (4.0, 'W4A8', 'per_channel'); 'w3g64' (groups of 64) -> (3.0, 'W3', 'g64'); an
  integer weight format 'int3' -> (3.0, 'W3', '') (a sweep axis over config.quant.weight.format); None for a value
  that names no bits this way."""
  m = _INT.match(str(value))
  if m:
    return float(m.group(1)), f'W{m.group(1)}', ''
  m = _BITS.match(str(value))
  if not m:
    return None
  w, a, rest, group = m.groups()
  return float(w), f'W{w}' + (f'A{a}' if a else ''), rest or group or ''


def bits_key(configs: list[Config]) -> str | None:
  """The swept label that names the bits: one whose every quantized value parses as w<N>[a<M>][_method]."""
  quantized = [c for c in configs if c.mode != 'float']
  keys = dict.fromkeys(k for c in quantized for k in c.values)
  for k in keys:
    if all(k in c.values and parse_bits(c.values[k]) for c in quantized):
      return k
  return None


def _method_keys(configs: list[Config], bits: str | None) -> list[str]:
  """Labels other than the bits that differ between quantized configurations of the same mode. Without a bits
  label (labels derived from the configs: `weight.format=int4`), the labels naming formats or bits are the bits."""
  out = []
  for k in dict.fromkeys(k for c in configs for k in c.values):
    if k in (bits, 'mode') or (bits is None and re.search(r'format|bits', k.rsplit('.', 1)[-1])):
      continue
    by_mode: dict[str, set] = {}
    for c in configs:
      by_mode.setdefault(c.mode, set()).add(c.values.get(k))
    if any(len(v) > 1 for v in by_mode.values()):
      out.append(k)
  return out


def study_series(configs: list[Config]) -> Study:
  """The series of `configs` (as results.summarize gives them): one per (mode where several, method), each point a
  configuration's eval metric (mean, std over seeds) at its bits; the float configurations the quantized ones
  compare with (results.float_reference) are the references."""
  ok = [c for c in configs if not math.isnan(c.metric[0])]
  floats = [c for c in ok if c.mode == 'float']
  quantized = [c for c in ok if c.mode != 'float']
  key = bits_key(quantized)
  methods = _method_keys(quantized, key)
  several_modes = len({c.mode for c in quantized}) > 1
  series: dict[str, list[Point]] = {}
  for c in quantized:
    parsed = parse_bits(c.values[key]) if key else None
    bits, setting, suffix = parsed or (c.weight_bits, f'W{c.weight_bits:g}', '')
    parts = ([c.mode.upper()] if several_modes and c.mode else []) + [c.values.get(k, '') for k in methods]
    parts += [suffix.replace('_', ' ')] if suffix else []
    name = ' '.join(p for p in parts if p) or (c.mode.upper() or 'quantized')
    series.setdefault(name, []).append(Point(bits, setting, c.metric[0], c.metric[1], c.seeds, c.label))
  refs: dict[int, tuple[Config, list[str]]] = {}  # float configuration -> the modes it is the reference of
  for c in quantized:
    r = float_reference(c, floats)
    if r is not None and c.mode.upper() not in refs.setdefault(id(r), (r, []))[1]:
      refs[id(r)][1].append(c.mode.upper())
  if not refs and len(floats) == 1:
    refs = {id(floats[0]): (floats[0], [])}
  return Study(
      series=tuple(Series(n, tuple(sorted(ps, key=lambda p: (p.bits, p.setting)))) for n, ps in series.items()),
      floats=tuple((_float_name(r, floats, modes if several_modes else []), r.metric[0], r.metric[1], r.seeds)
                   for r, modes in refs.values()),
      method_keys=tuple(methods))


def _float_name(ref: Config, floats: list[Config], modes: list[str]) -> str:
  """'float' or, where several float configurations were run, what tells them apart ('float, steps=4000'), and
  whose reference it is where the study has several modes ('float, steps=6000 (PTQ)')."""
  varying = [k for k in ref.values if len({f.values.get(k) for f in floats}) > 1]
  name = ', '.join(['float'] + [f'{k}={ref.values[k]}' for k in varying])
  return name + (f' ({", ".join(modes)})' if modes else '')


def no_figure_reason(study: Study) -> str | None:
  """Why there is no figure (one line), or None: a line over bits needs two bit settings."""
  settings = study.settings
  if len(settings) >= 2:
    return None
  if not settings:
    return 'no quantized configuration has finished'
  return f'the quantized configurations have one bit setting ({", ".join(next(iter(settings.values())))})'


def _scale(metric: str) -> tuple[float, str]:
  name = metric.split('/')[-1]
  return (100.0, f'{name} (%)') if name in PERCENT_METRICS else (1.0, name)


def study_figure(study: Study, metric: str, higher: bool):
  """The metric against bits (weight bits, log scale, fewest on the left; ticks name the settings), one line per
  method with error bars of one std over seeds, each float reference a dashed line over a band of its std. Lines
  at the same bits are shifted sideways by a few points so their error bars do not hide each other (the data stay
  at the true bits); the legend sits right of the axes, off the data."""
  matplotlib.use('Agg')
  scale, ylabel = _scale(metric)
  fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
  n = len(study.series)
  step = min(5.0, 30.0 / max(n, 1))  # points between neighbouring lines at one x
  for i, s in enumerate(study.series):
    shift = ScaledTranslation((i - (n - 1) / 2) * step / 72, 0, fig.dpi_scale_trans)
    xs = [p.bits for p in s.points]
    ys = [p.mean * scale for p in s.points]
    errs = [p.std * scale if p.seeds > 1 else 0.0 for p in s.points]
    # past the ten colours of the cycle, lines differ by marker and dash too
    style = dict(color=f'C{i % 10}', marker='osD^v'[i // 10 % 5], ls=('-', '--', ':', '-.')[i // 10 % 4])
    bars = ax.errorbar(xs, ys, yerr=errs, ms=4, lw=1.3, capsize=3, label=s.name, zorder=3, **style)
    for artist in bars.get_children():  # shifted after drawing: the axes' limits were set from the true data
      artist.set_transform(artist.get_transform() + shift)
  for j, (name, mean, std, seeds) in enumerate(study.floats):
    color = 'black' if j == 0 else 'dimgray'
    ax.axhspan((mean - std) * scale, (mean + std) * scale, color=color, alpha=0.12, lw=0, zorder=1)
    spread = f' ± {std * scale:.2f}' if seeds > 1 else ''
    ax.axhline(mean * scale, color=color, ls='--' if j == 0 else ':', lw=1.1, zorder=2,
               label=f'{name}: {mean * scale:.2f}{spread}')
  settings = study.settings
  ax.set_xscale('log', base=2)
  ax.set_xticks(list(settings), ['\n'.join(v) for v in settings.values()])
  ax.minorticks_off()
  lo, hi = min(settings), max(settings)
  ax.set_xlim(lo / 1.25, hi * 1.25)
  seeds = sorted({p.seeds for s in study.series for p in s.points})
  ax.set_xlabel('bits (weights and activations; placed by weight bits)')
  ax.set_ylabel(f'{ylabel}, {"higher" if higher else "lower"} is better')
  ax.set_title(f'{ylabel.split(" (")[0]} vs bits: mean ± std over {"/".join(map(str, seeds))} seeds', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0), fontsize=8, title=', '.join(study.method_keys) or None,
            title_fontsize=8, frameon=False)
  fig.tight_layout()
  return fig


def plot_study(configs: list[Config], metric: str, higher: bool) -> tuple[bytes | None, str]:
  """A PNG of `study_figure` and '', or None and the one-line reason there is none."""
  study = study_series(configs)
  reason = no_figure_reason(study)
  if reason:
    return None, reason
  fig = study_figure(study, metric, higher)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue(), ''
