r"""Sanity check of docs/results.md on MNIST (LeNet-5 CNN): float, QAT W8A8 / W4A4 and PTQ W8A8.

    python -m experiments.sweep --config=configs/results_mnist.py:seeds=3 --root=runs/results_mnist

Trials: the float CNN (3000 steps), then fine-tuned from it for 500 steps at 5e-4: the float model again (the
equal-steps baseline of the QAT rows) and QAT at W8A8 and W4A4; PTQ W8A8 from the 3000-step model.
Expected: float >= 98.5% test accuracy, every quantized variant within a few tenths of a point.
Args (comma-separated): `seeds=N` repeats every trial over N seeds; `runlocal` shrinks it to a smoke test.
"""

import os

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  c = config_cli.load_file(os.path.join(_HERE, 'mnist_cnn.py') + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:
    c.num_train_steps = 3000
    c.eval_every_steps = 3000
  return c


def get_sweep(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  base, steps = (20, 20) if a['runlocal'] else (3000, 500)
  fine_tune = {'init_from': sweeps.trial_ref(f'mode=float,steps={base}'), 'num_train_steps': steps,
               'optimizer.learning_rate': 5e-4, 'optimizer.warmup_steps': 0, 'eval_every_steps': steps}
  bits = {'w8a8': {'quant.weight.format': 'int8', 'quant.act.format': 'int8'},
          'w4a4': {'quant.weight.format': 'int4', 'quant.act.format': 'int4'}}
  total = sweeps.axis('steps', {str(base + steps): {}})
  sweep = sweeps.chain(
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float'}}), sweeps.axis('steps', {str(base): {}})),
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float', **fine_tune}}), total),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **fine_tune}}), total, sweeps.axis('bits', bits)),
      sweeps.product(sweeps.axis('mode', {'ptq': {'mode': 'ptq', 'init_from': sweeps.trial_ref(
          f'mode=float,steps={base}')}}), sweeps.axis('steps', {str(base): {}}),
          sweeps.axis('bits', {'w8a8': bits['w8a8']})),
  )
  if a['seeds'] > 1:
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/accuracy', 'eval/loss']
