"""The review images read at a glance: the per-layer SQNR bars and the Pareto plots (geometry checked on the
matplotlib figures the PNGs are drawn from)."""

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from experiments.review import plots, results  # noqa: E402
from experiments.training import summaries  # noqa: E402


def _rows():  # as summaries.layer_stats gives them: one row per quantized operand ('<op><i>_lhs' / '_rhs')
  def row(path, op, side, operand, sqnr):
    return {'layer': f'{path}/{op}_{side}', 'path': path, 'op': op, 'operand': operand, 'sqnr_db': sqnr}
  return [
      row('hidden', 'dot_general0', 'lhs', 'act', 20.0), row('hidden', 'dot_general0', 'rhs', 'kernel', 30.0),
      row('head', 'dot_general0', 'lhs', 'act', 25.0),                                   # activations only
      row('block', 'conv0', 'rhs', 'kernel', 140.0),                                     # off the scale: capped
      row('block', 'dot_general0', 'rhs', 'kernel', 12.0),
  ]


def test_sqnr_bars_are_centred_on_their_ticks_with_the_legend_off_the_data():
  fig = summaries.sqnr_figure(_rows())
  ax = fig.axes[0]
  fig.canvas.draw()
  ticks = list(ax.get_xticks())
  labels = [t.get_text() for t in ax.get_xticklabels()]
  # Named as the rules report names layers: the module path, with the op where a path has several.
  assert labels == ['hidden', 'head', 'block/conv0', 'block/dot_general0']
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


def _config(label, bits, score, *, std=0.0, seeds=1, front=False, far=False):
  nan = float('nan')
  return results.Config(label=label, values={'bits': label}, trials=[label], seeds=seeds, metric=(score, std),
                       serving_metric=(nan, nan), loss=(nan, nan), weight_bits=bits, serving_bytes=nan,
                       train_step_ms=nan, latency_ms=nan, int8_matmuls='n/a', wall_time_s=nan,
                       front={'weight_bits': front}, far_below_float=far)


def test_pareto_labels_never_overlap_and_the_caption_names_the_front():
  crowd = [_config(f'w4-variant-{i}', 4, 0.80 + 0.001 * i) for i in range(9)]  # nine points in one spot
  configs = crowd + [_config('w8', 8, 0.9, std=0.01, seeds=3, front=True), _config('w32', 32, 0.91, front=True),
                     _config('w2', 2, 0.1, far=True), _config('w4-best', 4, 0.85, front=True)]
  fig = plots.pareto_figure(configs, 'weight_bits', 'weight bits', 'eval/accuracy', True)
  ax = fig.axes[0]
  renderer = fig.canvas.get_renderer()
  shown = [t.get_window_extent(renderer) for t in ax.texts if t.get_visible()]
  assert len(shown) >= 4
  assert not any(a.overlaps(b) for i, a in enumerate(shown) for b in shown[i + 1:])
  caption = fig.texts[0].get_text()
  assert 'w4-best → w8 → w32' in caption and 'far below the float model' in caption and 'w2' in caption
  assert 'bits per weight' in ax.get_xlabel() and 'fraction of the test set' in ax.get_ylabel()
  with_err = [c for c in ax.containers if getattr(c, 'has_yerr', False)]
  assert len(with_err) == 1  # only the configuration run over several seeds has an error bar
  plt.close(fig)
