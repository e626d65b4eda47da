"""The review images read at a glance: the per-layer SQNR bars and the Pareto plots (geometry checked on the
matplotlib figures the PNGs are drawn from)."""

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from experiments import summaries  # noqa: E402


def _rows():
  return [
      {'layer': 'hidden/dot_general', 'path': 'hidden', 'operand': 'kernel', 'sqnr_db': 30.0},
      {'layer': 'hidden/dot_general', 'path': 'hidden', 'operand': 'act', 'sqnr_db': 20.0},
      {'layer': 'head/dot_general', 'path': 'head', 'operand': 'act', 'sqnr_db': 25.0},   # activations only
      {'layer': 'block/conv', 'path': 'block', 'operand': 'kernel', 'sqnr_db': 140.0},   # off the scale: capped
      {'layer': 'block/dot_general', 'path': 'block', 'operand': 'kernel', 'sqnr_db': 12.0},
  ]


def test_sqnr_bars_are_centred_on_their_ticks_with_the_legend_off_the_data():
  fig = summaries.sqnr_figure(_rows())
  ax = fig.axes[0]
  fig.canvas.draw()
  ticks = list(ax.get_xticks())
  labels = [t.get_text() for t in ax.get_xticklabels()]
  # Named as the rules report names layers: the module path, with the op where a path has several.
  assert labels == ['hidden', 'head', 'block/conv', 'block/dot_general']
  centres = {}
  for bar in ax.patches:  # each bar lies within half a tick of its own
    centre = bar.get_x() + bar.get_width() / 2
    centres.setdefault(round(centre), []).append(centre)
  assert sorted(centres) == ticks
  for tick in ticks:
    assert abs(sum(centres[tick]) / len(centres[tick]) - tick) < 1e-9, (tick, centres[tick])
  assert len(ax.patches) == 5 and max(b.get_height() for b in ax.patches) <= 99.0
  legend = ax.get_legend().get_window_extent()
  assert not legend.overlaps(ax.get_window_extent())
  plt.close(fig)
  assert summaries.sqnr_chart(_rows())[:8] == b'\x89PNG\r\n\x1a\n'
