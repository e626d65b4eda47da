r"""The accuracy table of docs/results.md for Fashion-MNIST (LeNet-5 CNN): float, QAT and PTQ at 8/4/3/2 bits.

    python -m experiments.sweep --config=configs/results_fmnist.py:seeds=3 --root=runs/results_fmnist
    python -m experiments.report runs/results_fmnist

Trials: the float CNN (6000 steps), then from it: a float fine-tune (1500 steps: the fair baseline, equal total
steps); QAT fine-tunes (1500 steps) at W8A8 (STE) and W4A4, W3A3, W2A2 with LSQ learned steps, the low-bit trials
keeping the first and last layers at 8 bits (quant.first_last_8bit, as LSQ, PACT and DoReFa do), W4A4 also with
STE; W2A2 LSQ also fine-tuned 3x longer (4500 steps, against a 4500-step float fine-tune); PTQ at W8A8, and
with 4-bit weights (8-bit activations) per-channel vs per-tensor in every layer (the effect of Krishnamoorthi
2018, table 5). Activation grids are unsigned after ReLU (quant.act_signedness='auto').
Targets (mean over seeds, against the equal-steps float): W4A4 within 0.5 points, W3A3 within 1.0, W2A2 within
2.0; QAT and PTQ W8A8 within the seed spread; PTQ W4 per-channel clearly ahead of per-tensor.
Args (comma-separated): `seeds=N` repeats every trial over N seeds; `runlocal` shrinks it to a smoke test on the
committed fixtures.
"""

import os

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  c = config_cli.load_file(os.path.join(_HERE, 'fmnist_cnn.py') + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:
    c.num_train_steps = 6000
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 1000
    c.quant.calibration_batches = 16
  return c


def get_sweep(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  base, steps = (20, 20) if a['runlocal'] else (6000, 1500)
  fine_tune = {'init_from': sweeps.trial_ref(f'mode=float,steps={base}'), 'num_train_steps': steps,
               'optimizer.learning_rate': 5e-4, 'optimizer.warmup_steps': 0 if a['runlocal'] else 50,
               'eval_every_steps': steps}
  lsq = {'quant.weight.estimator': 'lsq', 'quant.act.estimator': 'lsq'}
  fl8 = {'quant.first_last_8bit': True}  # the low-bit literature's convention (LSQ, PACT, DoReFa)
  wa = lambda b: {'quant.weight.format': f'int{b}', 'quant.act.format': f'int{b}'}
  qat = {
      'w8a8': wa(8),
      'w4a4': {**wa(4), **fl8},
      'w4a4_lsq': {**wa(4), **lsq, **fl8},
      'w3a3_lsq': {**wa(3), **lsq, **fl8},
      'w2a2_lsq': {**wa(2), **lsq, **fl8},
  }
  ptq = {
      'w8a8': wa(8),
      'w4a8_per_channel': {'quant.weight.format': 'int4', 'quant.weight.granularity': 'per_channel'},
      'w4a8_per_tensor': {'quant.weight.format': 'int4', 'quant.weight.granularity': 'per_tensor'},
  }
  total = sweeps.axis('steps', {str(base + steps): {}})
  # W2A2 also with a 3x longer fine-tune (LSQ fine-tunes for 90 epochs; 1500 steps of 128 are 3.2), against the
  # float fine-tune of the same length.
  long = {**fine_tune, 'num_train_steps': 3 * steps, 'eval_every_steps': 3 * steps}
  long_total = sweeps.axis('steps', {str(base + 3 * steps): {}})
  sweep = sweeps.chain(
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float'}}), sweeps.axis('steps', {str(base): {}})),
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float', **fine_tune}}), total),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **fine_tune}}), total, sweeps.axis('bits', qat)),
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float', **long}}), long_total),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **long}}), long_total,
                     sweeps.axis('bits', {'w2a2_lsq': qat['w2a2_lsq']})),
      sweeps.product(sweeps.axis('mode', {'ptq': {'mode': 'ptq', 'init_from': sweeps.trial_ref(
          f'mode=float,steps={base}')}}), sweeps.axis('steps', {str(base): {}}), sweeps.axis('bits', ptq)),
  )
  if a['seeds'] > 1:
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/accuracy', 'eval/loss']
