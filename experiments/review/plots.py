"""The Pareto plots of a report: the metric against weight bits, serving bytes or latency, the front highlighted and
every point labelled without overlaps (matplotlib, Agg backend)."""


from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.pyplot as plt

from experiments.review.results import (
  AXIS_UNITS,
  Config,
)


def fmt_delta(v: tuple[float, str], digits: int = 4) -> str:
  """A difference from float with its significance, to the digits of the means beside it (`fmt_pm`):
  '-0.0067', '+0.0001 (n.s.)'."""
  d, sig = v
  return '' if math.isnan(d) else f'{d:+.{digits}f}' + (f' ({sig})' if sig else '')


def fmt_pm(ms: tuple[float, float], digits: int = 4) -> str:
  m, s = ms
  if math.isnan(m):
    return 'n/a'
  return f'{m:.{digits}f} ± {s:.{digits}f}'


def fmt_num(x: float, fmt: str = '{:.0f}') -> str:
  return 'n/a' if x is None or math.isnan(x) else fmt.format(x)


METRIC_UNITS = {'accuracy': 'fraction of the test set', 'loss': 'nats', 'bits_per_char': 'bits per character'}


def plot_front(configs: list[Config], axis: str, xlabel: str, metric: str, higher: bool) -> bytes | None:
  """A PNG of `pareto_figure`; None when no configuration has that cost."""
  fig = pareto_figure(configs, axis, xlabel, metric, higher)
  if fig is None:
    return None
  buf = io.BytesIO()
  fig.savefig(buf, format='png', bbox_inches='tight')
  plt.close(fig)
  return buf.getvalue()


def pareto_figure(configs: list[Config], axis: str, xlabel: str, metric: str, higher: bool):
  """Score against one cost: the front as a step line, error bars over seeds, units on both axes, labels placed
  so none overlaps another (one that finds no free place is left out) and the front named in a caption below."""
  pts = [c for c in configs if not math.isnan(c.cost(axis)) and not math.isnan(c.score)]
  if not pts:
    return None
  matplotlib.use('Agg')
  fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
  labels = []
  for c in sorted(pts, key=lambda c: (c.cost(axis), -c.score)):
    on = c.front[axis]
    std = c.serving_metric[1] if not math.isnan(c.serving_metric[0]) else c.metric[1]
    ax.errorbar(c.cost(axis), c.score, yerr=std if c.seeds > 1 and std else None,
                fmt='x' if c.far_below_float else 'o', ms=8 if on else 5, color='tab:red' if on else 'tab:gray',
                capsize=3, zorder=3)
    labels.append((not on, ax.annotate(','.join(c.values.values()) or c.label, (c.cost(axis), c.score),
                              textcoords='offset points', xytext=(6, 4), fontsize=7,
                              color='black' if on else 'dimgray')))
  front = sorted((c for c in pts if c.front[axis]), key=lambda c: c.cost(axis))
  if front:
    ax.step([c.cost(axis) for c in front], [c.score for c in front], where='post', color='tab:red', alpha=0.6,
            label='Pareto front')
    ax.legend(loc='lower right' if higher else 'upper right', fontsize=8)
  if axis in ('weight_bits', 'serving_bytes') and min(c.cost(axis) for c in pts) > 0:
    ax.set_xscale('log', base=2)
  name = metric.split('/')[-1]
  ax.set_xlabel(f'{xlabel} ({AXIS_UNITS.get(axis, axis)})')
  ax.set_ylabel(f'{name} ({METRIC_UNITS.get(name, metric)}; {"higher" if higher else "lower"} is better)')
  ax.set_title(f'{name} vs {xlabel}')
  ax.grid(alpha=0.3)
  caption = 'Pareto front, cheapest first: ' + (' → '.join(c.label for c in front) or 'none')
  collapsed = [c.label for c in pts if c.far_below_float]
  if collapsed:
    caption += f'\nx: far below the float model, kept off the front: {", ".join(collapsed)}'
  fig.text(0.01, 0.005, caption, fontsize=7, va='bottom', ha='left', wrap=True)
  fig.tight_layout(rect=(0, 0.06 + 0.03 * bool(collapsed), 1, 1))
  place_labels(fig, sorted(labels, key=lambda p: p[0]))  # the front's labels first
  return fig


def place_labels(fig, labels) -> None:
  """Moves each annotation of (thin, label) pairs to the first of a few offsets around its point where it overlaps
  no label placed before it and stays inside the axes; one that finds no such place is hidden (a `thin` label, off
  the front, only tries the places next to its point), so labels never lie on top of each other.
  """
  renderer = fig.canvas.get_renderer()
  ax_box = labels[0][1].axes.get_window_extent(renderer) if labels else None
  near = [(6, 4), (6, -11), (-6, 4), (-6, -11)]
  far = [(6, 15), (6, -22), (6, 26), (6, -33)]
  placed = []
  for thin, label in labels:
    for dx, dy in near if thin else near + far:
      label.set_position((dx, dy))
      label.set_horizontalalignment('left' if dx > 0 else 'right')
      box = label.get_window_extent(renderer)
      inside = ax_box.x0 <= box.x0 and box.x1 <= ax_box.x1 and ax_box.y0 <= box.y0 and box.y1 <= ax_box.y1
      if inside and not any(box.overlaps(other) for other in placed):
        placed.append(box)
        break
    else:
      label.set_visible(False)
