"""experiments.report on a hand-made sweep root: the per-configuration table, Pareto fronts, plots, TensorBoard."""

import csv
import json
import math
import os

import pytest

from experiments import fileio
from experiments.review import report, results, study_plot
from experiments.review import tensorboard as tb


def _trial(root, name, labels, config, result=None, error=None):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  fileio.write_json_atomic(os.path.join(workdir, 'config.json'), config)
  if result is not None:
    fileio.write_json_atomic(os.path.join(workdir, 'result.json'), {**result, 'config': config})
  if error is not None:
    fileio.write_json_atomic(os.path.join(workdir, 'error.json'), error)
  return {'name': name, 'labels': labels, 'index': 0}


def _config(mode, fmt, seed):
  return {'mode': mode, 'seed': seed, 'quant': {'weight': {'format': fmt}, 'act': {'format': fmt}}}


def _result(acc, serving_acc=None, nbytes=1000, sps=50.0, latency=None):
  r = {'metrics': {'eval/accuracy': acc, 'eval/loss': 1 - acc}, 'serving_bytes': nbytes,
       'train': {'steps_per_sec': sps}, 'matmuls': {'int8': 3, 'total': 5}, 'wall_time_sec': 10.0}
  if serving_acc is not None:
    r['serving_metrics'] = {'eval/accuracy': serving_acc, 'eval/loss': 1 - serving_acc}
  if latency is not None:
    r['latency'] = latency
  return r


@pytest.fixture
def root(tmp_path):
  """float (2 seeds), qat w8 (2 seeds), qat w4, ptq w4 (worse than qat w4 at equal cost), ptq w2 (failed)."""
  root = str(tmp_path)
  listed = [
      _trial(root, 'mode=float,seed=0', {'mode': 'float', 'bits': 'w32', 'seed': '0'}, _config('float', '', 0),
             _result(0.90, nbytes=4000, sps=100.0, latency=2.0)),
      _trial(root, 'mode=float,seed=1', {'mode': 'float', 'bits': 'w32', 'seed': '1'}, _config('float', '', 1),
             _result(0.92, nbytes=4000, sps=100.0, latency={'median_ms': 4.0})),
      _trial(root, 'mode=qat,bits=w8,seed=0', {'mode': 'qat', 'bits': 'w8', 'seed': '0'}, _config('qat', 'int8', 0),
             _result(0.89, 0.88, nbytes=1000, sps=40.0, latency={'serving_ms': 1.0, 'ratio_to_float': 0.5})),
      _trial(root, 'mode=qat,bits=w8,seed=1', {'mode': 'qat', 'bits': 'w8', 'seed': '1'}, _config('qat', 'int8', 1),
             _result(0.91, 0.90, nbytes=1000, sps=60.0)),
      _trial(root, 'mode=qat,bits=w4,seed=0', {'mode': 'qat', 'bits': 'w4', 'seed': '0'}, _config('qat', 'int4', 0),
             _result(0.85, 0.84, nbytes=600)),
      _trial(root, 'mode=ptq,bits=w4,seed=0', {'mode': 'ptq', 'bits': 'w4', 'seed': '0'}, _config('ptq', 'int4', 0),
             _result(0.70, 0.60, nbytes=600, sps=0.0)),
      _trial(root, 'mode=ptq,bits=w2,seed=0', {'mode': 'ptq', 'bits': 'w2', 'seed': '0'}, _config('ptq', 'int2', 0),
             error={'type': 'RunError', 'message': 'config.init_from is not a finished run'}),
      {'name': 'mode=qat,bits=w2,seed=0', 'labels': {'mode': 'qat', 'bits': 'w2', 'seed': '0'}, 'index': 7},
  ]
  fileio.write_json_atomic(os.path.join(root, 'sweep.json'), {
      'config': 'configs/hand.py', 'metrics': ['eval/accuracy', 'eval/loss'], 'trials': listed,
      'hparam_keys': ['mode', 'quant.weight.format']})
  return root


def test_pareto_front():
  # cost, value: (1, .5) front; (2, .5) dominated by it; (2, .9) front; (3, .9) dominated (tie in value);
  # (4, .95) front; NaN never on the front.
  costs = [1, 2, 2, 3, 4, float('nan'), 5]
  values = [0.5, 0.5, 0.9, 0.9, 0.95, 0.99, float('nan')]
  assert results.pareto_front(costs, values) == [True, False, True, False, True, False, False]
  # Lower is better (bits/char): the same points mirrored.
  assert results.pareto_front([1, 2, 3], [2.0, 1.5, 1.6], higher=False) == [True, True, False]
  assert results.pareto_front([1, 1], [0.5, 0.5]) == [True, True]  # equal points do not dominate each other
  assert results.pareto_front([], []) == []


def test_summary_groups_seeds_and_computes_fronts(root):
  trials, manifest = results.load_trials(root)
  assert [t['status'] for t in trials] == ['done'] * 6 + ['failed', 'not run']
  configs, metric, higher = results.summarize(trials)
  assert (metric, higher) == ('eval/accuracy', True)
  by = {c.label: c for c in configs}
  assert set(by) == {'mode=float,bits=w32', 'mode=qat,bits=w8', 'mode=qat,bits=w4', 'mode=ptq,bits=w4'}
  f = by['mode=float,bits=w32']
  assert f.seeds == 2 and f.metric[0] == pytest.approx(0.91) and f.metric[1] == pytest.approx(math.sqrt(2e-4))
  assert math.isnan(f.serving_metric[0]) and f.score == pytest.approx(0.91) and f.weight_bits == 32
  assert f.latency_ms == pytest.approx(3.0) and f.train_step_ms == pytest.approx(10.0)
  q8 = by['mode=qat,bits=w8']
  assert q8.score == pytest.approx(0.89) and q8.weight_bits == 8 and q8.int8_matmuls == '3/5'
  assert q8.train_step_ms == pytest.approx((25.0 + 1000 / 60) / 2)
  assert q8.latency_ms == pytest.approx(1.0) and q8.latency_ratio == pytest.approx(0.5)  # one seed has it
  assert math.isnan(f.latency_ratio)  # results without a side-by-side float timing
  assert math.isnan(by['mode=ptq,bits=w4'].train_step_ms)  # PTQ trains nothing
  fronts = {c.label: c.front for c in configs}
  assert fronts['mode=qat,bits=w4']['weight_bits'] and fronts['mode=qat,bits=w8']['weight_bits']
  assert fronts['mode=float,bits=w32']['weight_bits'] and not fronts['mode=ptq,bits=w4']['weight_bits']
  assert fronts['mode=qat,bits=w4']['serving_bytes'] and not fronts['mode=ptq,bits=w4']['serving_bytes']
  # Differences from float, with their significance: qat w8 (2 seeds) is 0.02 below float (2 seeds), more
  # than either's seed std (0.0141): significant; qat w4 has one seed.
  assert q8.vs_float[0] == pytest.approx(0.89 - 0.91) and q8.vs_float[1] == ''
  assert by['mode=qat,bits=w4'].vs_float == (pytest.approx(0.84 - 0.91), '1 seed')
  assert math.isnan(f.vs_float[0])
  # Only the ratio to float ranks latency: the float rows have none here, qat w8 has one.
  assert fronts['mode=qat,bits=w8']['latency_ratio'] and not fronts['mode=float,bits=w32']['latency_ratio']


def test_report_files_and_tensorboard(root):
  paths = report.write_report(root)
  rows = list(csv.DictReader(open(paths['csv'])))
  assert len(rows) == 4  # one per configuration
  row = next(r for r in rows if r['mode'] == 'qat' and r['bits'] == 'w8')
  assert row['seeds'] == '2' and float(row['accuracy_mean']) == pytest.approx(0.90)
  assert float(row['serving_accuracy_mean']) == pytest.approx(0.89) and row['serving_bytes'] == '1000.0'
  assert row['front_weight_bits'] == 'True' and row['trials'] == 'mode=qat,bits=w8,seed=0 mode=qat,bits=w8,seed=1'
  md = open(paths['report']).read()
  assert '| qat | w8 | 2 | 8 | 0.9000 ± 0.0141 | 0.8900 ± 0.0141 | -0.0200 |' in md  # to the means' digits
  assert float(row['accuracy_minus_float']) == pytest.approx(-0.02) and row['significance'] == ''
  assert '| ptq | w4 | 1 | 4 | 0.7000 ± 0.0000 | 0.6000 ± 0.0000 |' in md
  assert 'accuracy vs weight bits: `mode=qat,bits=w4` → `mode=qat,bits=w8` → `mode=float,bits=w32`' in md
  assert '`mode=ptq,bits=w2,seed=0`: RunError: config.init_from is not a finished run' in md
  assert '## Not finished' in md and '`mode=qat,bits=w2,seed=0`' in md
  assert 'experiments.bench' in md and 'python -m experiments.board' in md
  for axis in ('weight_bits', 'serving_bytes', 'latency_ratio'):
    assert open(paths[axis], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  tags = tb.read_tags(root)
  assert tags['images'] == {'pareto/accuracy_vs_weight_bits', 'pareto/accuracy_vs_serving_bytes',
                            'pareto/accuracy_vs_latency_ratio', 'study/accuracy_vs_bits'}
  assert open(paths['study'], 'rb').read(8) == b'\x89PNG\r\n\x1a\n' and '](accuracy_vs_bits.png)' in md
  assert tags['text'] == {'report'} and tags['hparams'] == {'_hparams_/experiment'}
  # Rewriting replaces the root summaries instead of adding to them.
  report.write_report(root)
  events = sorted(f for f in os.listdir(root) if f.startswith('events.out.tfevents'))
  assert len(events) == 2 and events[0].endswith(('.hparams_experiment', '.report'))


def test_an_interrupted_trial_is_interrupted_as_the_sweep_calls_it(root):
  """Checkpoints and no result: `sweep --dry_run` said interrupted, the report said not run."""
  workdir = os.path.join(root, 'mode=qat,bits=w2,seed=0')
  # Stopped before its first checkpoint (orbax makes the directory first): a rerun starts afresh, as the runner
  # says ('no checkpoint was saved yet'), so it is not run, not interrupted.
  os.makedirs(os.path.join(workdir, 'checkpoints', '10.orbax-checkpoint-tmp-1'))
  assert fileio.run_status(workdir) == 'pending'
  os.makedirs(os.path.join(workdir, 'checkpoints', '10'))
  trials, _ = results.load_trials(root)
  assert [t['status'] for t in trials] == ['done'] * 6 + ['failed', 'interrupted']
  assert fileio.run_status(workdir) == 'interrupted'  # what the sweep's trial_status returns
  md = open(report.write_report(root)['report']).read()
  assert '8 trials: 6 finished, 1 failed, 0 running, 1 interrupted, 0 not run.' in md
  assert '## Not finished' in md and 'rerunning the sweep command resumes them' in md


def test_latency_front_uses_the_ratio_to_float_and_keeps_collapsed_trials_off(tmp_path):
  root = str(tmp_path)
  # Absolute times come from different moments (the float trial ran on a busy machine): only ratios compare.
  listed = [
      _trial(root, 'mode=float', {'mode': 'float'}, _config('float', '', 0),
             _result(0.90, nbytes=4000, latency={'serving_ms': 5.0, 'ratio_to_float': 1.0})),
      _trial(root, 'mode=qat,bits=w8', {'mode': 'qat', 'bits': 'w8'}, _config('qat', 'int8', 0),
             _result(0.89, 0.89, nbytes=1000, latency={'serving_ms': 6.0, 'ratio_to_float': 0.6})),
      _trial(root, 'mode=ptq,bits=w2', {'mode': 'ptq', 'bits': 'w2'}, _config('ptq', 'int2', 0),
             _result(0.11, 0.10, nbytes=300, latency={'serving_ms': 0.5, 'ratio_to_float': 0.3})),
  ]
  fileio.write_json_atomic(os.path.join(root, 'sweep.json'), {'config': 'configs/hand.py', 'trials': listed})
  configs, _, _ = results.summarize(results.load_trials(root)[0])
  by = {c.label: c for c in configs}
  assert by['mode=qat,bits=w8'].front['latency_ratio'] and by['mode=float'].front['latency_ratio']
  w2 = by['mode=ptq,bits=w2']
  assert w2.far_below_float and not any(w2.front.values())  # cheapest and fastest, but at chance
  assert not by['mode=qat,bits=w8'].far_below_float and not by['mode=float'].far_below_float
  paths = report.write_report(root)
  md = open(paths['report']).read()
  assert 'far below the float model' in md and '`mode=ptq,bits=w2`' in md.split('far below the float model')[1]
  row = next(r for r in csv.DictReader(open(paths['csv'])) if r['bits'] == 'w2')
  assert row['far_below_float'] == 'True' and row['front_serving_bytes'] == 'False'


def test_without_manifest_labels_come_from_differing_keys(tmp_path):
  root = str(tmp_path)
  for fmt in ('int8', 'int4'):
    for seed in (0, 1):
      _trial(root, f'{fmt}-{seed}', None, _config('qat', fmt, seed), _result(0.8 + (fmt == 'int8') * 0.1))
  trials, _ = results.load_trials(root)
  assert trials[0]['labels'] == {'act.format': 'int4', 'weight.format': 'int4', 'seed': '0'}
  configs, _, _ = results.summarize(trials)
  assert sorted((c.label, c.seeds) for c in configs) == [('act.format=int4,weight.format=int4', 2),
                                                         ('act.format=int8,weight.format=int8', 2)]
  assert report.main([root]) == 0 and report.main([]) == 2 and report.main([str(tmp_path / 'nope')]) == 2
  json.load(open(os.path.join(root, 'int8-0', 'result.json')))  # the trials' files are untouched


def test_significance_is_judged_by_the_seed_spread():
  assert results.significance(0.3, (3, 3), (0.2, 0.4)) == 'n.s.'    # within the larger spread
  assert results.significance(-0.5, (3, 3), (0.2, 0.4)) == ''       # beyond both
  assert results.significance(0.5, (1, 3), (0.0, 0.1)) == '1 seed'
  assert results.significance(float('nan'), (3, 3), (0.1, 0.1)) == ''


def test_each_model_is_compared_with_its_own_float_run():
  def cfg(model, mode, acc, std, seeds=3):
    return results.Config(label=f'{model},{mode}', values={'model': model, 'mode': mode}, trials=[], seeds=seeds,
                         metric=(acc, std), serving_metric=(float('nan'), float('nan')), loss=(0.0, 0.0),
                         weight_bits=8, serving_bytes=1.0, train_step_ms=1.0, latency_ms=1.0, int8_matmuls='',
                         wall_time_s=1.0, mode=mode)
  cs = [cfg('cnn', 'float', 0.90, 0.01), cfg('resnet', 'float', 0.93, 0.01),
        cfg('cnn', 'qat', 0.895, 0.01), cfg('resnet', 'qat', 0.90, 0.01)]
  results.compare_to_float(cs)
  assert cs[2].vs_float == (pytest.approx(-0.005), 'n.s.')
  assert cs[3].vs_float == (pytest.approx(-0.03), '')


def test_collapse_is_judged_against_each_models_own_float_run():
  """A small model 0.01 below its own float (0.45) was 'far below float' against the big model's 0.95, and so was
  kept off every front."""
  def cfg(model, mode, acc):
    return results.Config(label=f'{model},{mode}', values={'model': model, 'mode': mode}, trials=[], seeds=1,
                          metric=(acc, 0.0), serving_metric=(float('nan'), float('nan')), loss=(0.0, 0.0),
                          weight_bits=8, serving_bytes=1.0, train_step_ms=1.0, latency_ms=1.0, int8_matmuls='',
                          wall_time_s=1.0, mode=mode)
  cs = [cfg('big', 'float', 0.95), cfg('small', 'float', 0.45), cfg('small', 'qat', 0.44), cfg('big', 'ptq', 0.40)]
  results.mark_far_below_float(cs, higher=True)
  assert [c.far_below_float for c in cs] == [False, False, False, True]


def _lm_result(bpc, served_loss):
  """As the runner wrote an LM's result before it added served bits per character: loss and accuracy only."""
  return {'metrics': {'eval/loss': bpc * math.log(2), 'eval/accuracy': 0.5, 'eval/bits_per_char': bpc},
          'serving_metrics': {'eval/loss': served_loss, 'eval/accuracy': 0.5}, 'serving_bytes': 1000}


def test_an_lm_is_ranked_by_its_served_bits_per_char_and_a_diverged_seed_keeps_it_off_the_fronts(tmp_path):
  root = str(tmp_path)
  listed = []
  runs = {('float', 'w32'): [(2.0, None), (2.1, None)],
          ('qat', 'int4'): [(2.06, 2.5), (2.06, 2.5)],  # fake-quant 2.06 bits/char, served 2.5 nats = 3.61 bits
          ('qat', 'int3'): [(2.2, 1.5), (2.2, 1.5)],    # served 2.16 bits/char: cheaper and better than int4
          ('ptq', 'int2'): [(2.2, 1.5), (2.3, 1.6), (float('nan'), float('nan'))]}
  for (mode, fmt), seeds in runs.items():
    for seed, (bpc, served) in enumerate(seeds):
      r = _lm_result(bpc, served)
      if served is None:
        del r['serving_metrics']
      name = f'mode={mode},w={fmt},seed={seed}'
      listed.append(_trial(root, name, {'mode': mode, 'w': fmt, 'seed': str(seed)}, _config(mode, fmt, seed), r))
  fileio.write_json_atomic(os.path.join(root, 'sweep.json'), {'config': 'configs/hand.py', 'trials': listed})
  configs, metric, higher = results.summarize(results.load_trials(root)[0])
  assert (metric, higher) == ('eval/bits_per_char', False)
  by = {c.label: c for c in configs}
  assert by['mode=qat,w=int4'].score == pytest.approx(2.5 / math.log(2))  # the served model, not the fake-quant
  assert by['mode=qat,w=int3'].score == pytest.approx(1.5 / math.log(2))
  assert not by['mode=qat,w=int4'].front['weight_bits'] and by['mode=qat,w=int3'].front['weight_bits']
  ptq = by['mode=ptq,w=int2']
  assert ptq.nonfinite == 1 and ptq.seeds == 3 and math.isnan(ptq.score) and math.isnan(ptq.vs_float[0])
  assert not any(ptq.front.values())
  md = open(report.write_report(root)['report']).read()
  row = next(line for line in md.splitlines() if line.startswith('| ptq | int2 '))
  assert '| 3 (1 non-finite) |' in row and row.endswith('| none: non-finite |')
  assert '`mode=ptq,w=int2` (1 of 3 seeds)' in md
  csv_row = next(r for r in csv.DictReader(open(os.path.join(root, 'results.csv'))) if r['w'] == 'int2')
  assert csv_row['nonfinite_seeds'] == '1'


def _study_root(root, bits_settings, accs):
  """An estimator x bits study over seeds 0-2 with float baselines at 3000 and 4000 steps; `accs[(est, bits)]` are
  the three seeds' accuracies."""
  listed = []
  for steps, base in (('3000', 0.80), ('4000', 0.90)):
    for seed in range(3):
      labels = {'mode': 'float', 'steps': steps, 'seed': str(seed)}
      listed.append(_trial(root, f'mode=float,steps={steps},seed={seed}', labels, _config('float', '', seed),
                           _result(base + 0.01 * seed)))
  for est in ('ste', 'lsq'):
    for b in bits_settings:
      for seed in range(3):
        labels = {'mode': 'qat', 'steps': '4000', 'estimator': est, 'bits': f'w{b}a{b}', 'seed': str(seed)}
        listed.append(_trial(root, f'mode=qat,steps=4000,estimator={est},bits=w{b}a{b},seed={seed}', labels,
                             _config('qat', f'int{b}', seed), _result(accs[(est, b)][seed])))
  fileio.write_json_atomic(os.path.join(root, 'sweep.json'), {'config': 'configs/hand.py', 'trials': listed})
  return root


def test_study_figure_series_are_the_seed_means_and_stds_of_each_estimator_and_bits(tmp_path):
  accs = {('ste', 4): [0.88, 0.89, 0.90], ('ste', 2): [0.70, 0.75, 0.77],
          ('lsq', 4): [0.89, 0.89, 0.89], ('lsq', 2): [0.85, 0.86, 0.84]}
  root = _study_root(str(tmp_path), (4, 2), accs)
  configs, metric, higher = results.summarize(results.load_trials(root)[0])
  study = study_plot.study_series(configs)
  assert study.method_keys == ('estimator',)  # mode and steps name no method: constant over the QAT runs
  got = {s.name: [(p.bits, p.setting, p.mean, p.std, p.seeds) for p in s.points] for s in study.series}
  # Hand-computed: ste W2A2 mean 0.74, sample std sqrt(((-.04)^2 + .01^2 + .03^2) / 2) = sqrt(0.0013).
  assert got == {'ste': [(2.0, 'W2A2', pytest.approx(0.74), pytest.approx(math.sqrt(0.0013)), 3),
                         (4.0, 'W4A4', pytest.approx(0.89), pytest.approx(0.01), 3)],
                 'lsq': [(2.0, 'W2A2', pytest.approx(0.85), pytest.approx(0.01), 3),
                         (4.0, 'W4A4', pytest.approx(0.89), pytest.approx(0.0), 3)]}
  # The reference is the equal-steps float (mean 0.91, std 0.01 over seeds), not the 3000-step one it started from.
  assert study.floats == (('float, steps=4000', pytest.approx(0.91), pytest.approx(0.01), 3),)
  paths = report.write_report(root)
  assert paths['study'] == os.path.join(root, 'accuracy_vs_bits.png')
  md = open(paths['report']).read()
  assert '## accuracy vs bits' in md and '![accuracy vs bits](accuracy_vs_bits.png)' in md
  assert 'study/accuracy_vs_bits' in tb.read_tags(root)['images']


def test_no_study_figure_for_one_bit_setting_and_the_report_says_why(tmp_path):
  accs = {('ste', 4): [0.88, 0.89, 0.90], ('lsq', 4): [0.89, 0.89, 0.89]}
  root = _study_root(str(tmp_path), (4,), accs)
  open(os.path.join(root, 'accuracy_vs_bits.png'), 'wb').write(b'stale')  # from an earlier, larger sweep
  paths = report.write_report(root)
  assert 'study' not in paths and not os.path.exists(os.path.join(root, 'accuracy_vs_bits.png'))
  md = open(paths['report']).read()
  assert 'No accuracy-vs-bits figure: the quantized configurations have one bit setting (W4A4).' in md
  assert not any(t.startswith('study/') for t in tb.read_tags(root)['images'])
