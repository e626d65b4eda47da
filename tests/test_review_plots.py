"""The review images read at a glance: the per-layer SQNR bars and the Pareto plots (geometry checked on the
matplotlib figures the PNGs are drawn from)."""

import matplotlib
import pytest

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from experiments.review import plots, results, study_plot  # noqa: E402
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


def _study_config(values, mode, bits, acc, std, seeds=3):
  nan = float('nan')
  return results.Config(label=','.join(f'{k}={v}' for k, v in values.items()), values=values, trials=[],
                        seeds=seeds, metric=(acc, std), serving_metric=(nan, nan), loss=(nan, nan), weight_bits=bits,
                        serving_bytes=nan, train_step_ms=nan, latency_ms=nan, int8_matmuls='n/a', wall_time_s=nan,
                        mode=mode)


def _estimator_study():
  """Six estimators with long names at three bit settings, and two floats (the fine-tunes' baseline: 4000 steps)."""
  cs = [_study_config({'mode': 'float', 'steps': s}, 'float', 32, acc, 0.004)
        for s, acc in (('3000', 0.900), ('4000', 0.902))]
  for i, est in enumerate(['ste', 'clipped_ste', 'pact', 'lsq', 'lsq_plus_with_a_long_name', 'ewgs']):
    for b in (4, 3, 2):
      cs.append(_study_config({'mode': 'qat', 'steps': '4000', 'estimator': est, 'bits': f'w{b}a{b}'}, 'qat', b,
                              0.9 - 0.03 * (4 - b) * (1 + i / 5), 0.002 * (1 + i)))
  return cs


def test_study_figure_draws_each_method_over_bits_with_the_float_line_and_no_overlapping_text():
  study = study_plot.study_series(_estimator_study())
  fig = study_plot.study_figure(study, 'eval/accuracy', True)
  ax = fig.axes[0]
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  # One line per estimator, at the true bits (the sideways shift is a display offset), in percent.
  bars = {c.get_label(): c for c in ax.containers}
  assert list(bars) == ['ste', 'clipped_ste', 'pact', 'lsq', 'lsq_plus_with_a_long_name', 'ewgs']
  assert list(bars['lsq'].lines[0].get_xdata()) == [2, 3, 4]
  assert list(bars['ste'].lines[0].get_ydata()) == pytest.approx([84.0, 87.0, 90.0])
  # Error bars: one std each side, in percent (ewgs: 0.012 -> 1.2 points).
  segments = bars['ewgs'].lines[2][0].get_segments()
  assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2 * 1.2] * 3)
  floats = [line for line in ax.get_lines() if line.get_label().startswith('float')]
  # Only the fine-tunes' own float baseline (4000 steps), not the 3000-step model they started from.
  assert [line.get_label() for line in floats] == ['float, steps=4000: 90.20 ± 0.40']
  assert list(floats[0].get_ydata()) == pytest.approx([90.2, 90.2])
  assert [t.get_text() for t in ax.get_xticklabels()] == ['W2A2', 'W3A3', 'W4A4']
  assert ax.get_xticks()[0] < ax.get_xticks()[-1]  # fewest bits on the left
  # Tick labels, legend entries, axis labels and title never overlap one another; the legend is off the data.
  texts = [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
  texts += [ax.xaxis.label, ax.yaxis.label, ax.title]
  boxes = [t.get_window_extent(renderer) for t in texts]
  assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
  legend = ax.get_legend()
  entries = [t.get_window_extent(renderer) for t in legend.get_texts()]
  assert not any(a.overlaps(b) for i, a in enumerate(entries) for b in entries[i + 1:])
  assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
  assert all(t.get_fontsize() >= 8 for t in legend.get_texts())  # readable
  plt.close(fig)


def test_study_figure_separates_modes_and_reads_methods_from_the_bits_label():
  cs = [_study_config({'mode': 'float', 'steps': '6000'}, 'float', 32, 0.91, 0.002),
        _study_config({'mode': 'float', 'steps': '7500'}, 'float', 32, 0.92, 0.001),
        _study_config({'mode': 'qat', 'steps': '7500', 'bits': 'w8a8'}, 'qat', 8, 0.91, 0.002),
        _study_config({'mode': 'qat', 'steps': '7500', 'bits': 'w4a4'}, 'qat', 4, 0.90, 0.003),
        _study_config({'mode': 'qat', 'steps': '7500', 'bits': 'w4a4_lsq'}, 'qat', 4, 0.905, 0.002),
        _study_config({'mode': 'qat', 'steps': '7500', 'bits': 'w2a2_lsq'}, 'qat', 2, 0.88, 0.002),
        _study_config({'mode': 'ptq', 'steps': '6000', 'bits': 'w8a8'}, 'ptq', 8, 0.909, 0.002),
        _study_config({'mode': 'ptq', 'steps': '6000', 'bits': 'w4a8_per_channel'}, 'ptq', 4, 0.89, 0.008)]
  study = study_plot.study_series(cs)
  series = {s.name: [(p.setting, p.mean) for p in s.points] for s in study.series}
  assert series == {'QAT': [('W4A4', 0.90), ('W8A8', 0.91)], 'QAT lsq': [('W2A2', 0.88), ('W4A4', 0.905)],
                    'PTQ': [('W8A8', 0.909)], 'PTQ per channel': [('W4A8', 0.89)]}
  assert {name: mean for name, mean, _, _ in study.floats} == {'float, steps=7500 (QAT)': 0.92,
                                                               'float, steps=6000 (PTQ)': 0.91}
  assert study.settings == {2.0: ['W2A2'], 4.0: ['W4A4', 'W4A8'], 8.0: ['W8A8']}
  fig = study_plot.study_figure(study, 'eval/accuracy', True)
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ['W2A2', 'W4A4\nW4A8', 'W8A8']
  plt.close(fig)


def test_a_weight_format_axis_gives_the_bits_and_twelve_methods_stay_distinct():
  """A PTQ sweep over method x w=int4/int3/int2 (configs/results_ptq_fmnist.py): one line per method over the
  weight bits, not one per (method, format); past ten lines the colours repeat, so marker or dash differ."""
  cs = [_study_config({'mode': 'float'}, 'float', 32, 0.91, 0.002)]
  methods = [f'method_{i}' for i in range(12)]
  cs += [_study_config({'mode': 'ptq', 'method': m, 'w': f'int{b}'}, 'ptq', b, 0.9 - 0.01 * (4 - b), 0.003)
         for m in methods for b in (4, 3, 2)]
  study = study_plot.study_series(cs)
  assert [s.name for s in study.series] == methods and study.method_keys == ('method',)
  assert [p.setting for p in study.series[0].points] == ['W2', 'W3', 'W4']
  fig = study_plot.study_figure(study, 'eval/accuracy', True)
  bars = fig.axes[0].containers
  styles = [(c.lines[0].get_color(), c.lines[0].get_marker(), c.lines[0].get_linestyle()) for c in bars]
  assert len(set(styles)) == 12 and styles[0][0] == styles[10][0]
  plt.close(fig)


def test_group_sizes_in_the_bits_label_are_their_own_lines():
  """configs/results_ptq_charlm.py's labels: bits=w4g128 / w3g64 / w8a8; one line per method and group size."""
  assert study_plot.parse_bits('w3g64') == (3.0, 'W3', 'g64')
  assert study_plot.parse_bits('w4x') is None  # no separator: only a group size may follow the bits
  cs = [_study_config({'mode': 'float'}, 'float', 32, 1.97, 0.01)]
  cs += [_study_config({'mode': 'ptq', 'method': 'gptq', 'bits': f'w{b}g{g}'}, 'ptq', b, 2.0 + (4 - b) / 10, 0.01)
         for b in (4, 3, 2) for g in (128, 64)]
  cs.append(_study_config({'mode': 'ptq', 'method': 'rtn', 'bits': 'w8a8'}, 'ptq', 8, 1.97, 0.01))
  series = {s.name: [p.setting for p in s.points] for s in study_plot.study_series(cs).series}
  assert series == {'gptq g128': ['W2', 'W3', 'W4'], 'gptq g64': ['W2', 'W3', 'W4'], 'rtn': ['W8A8']}


def test_no_study_figure_for_one_bit_setting():
  cs = [_study_config({'mode': 'float'}, 'float', 32, 0.9, 0.01)]
  cs += [_study_config({'mode': 'qat', 'estimator': e, 'bits': 'w4a4'}, 'qat', 4, 0.89, 0.01) for e in ('ste', 'lsq')]
  png, reason = study_plot.plot_study(cs, 'eval/accuracy', True)
  assert png is None and reason == 'the quantized configurations have one bit setting (W4A4)'
  assert study_plot.plot_study(cs[:1], 'eval/accuracy', True) == (None, 'no quantized configuration has finished')
