r"""Sanity check of docs/results.md on MNIST (LeNet-5 CNN): float, QAT W8A8 / W4A4 and PTQ W8A8.

    python -m experiments.sweep --config=configs/results_mnist.py --root=runs/results_mnist

Expected: float >= 98.5% test accuracy, every quantized variant within a few tenths of a point.
"""

import os

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False)
  c = config_cli.load_file(os.path.join(_HERE, 'mnist_cnn.py') + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:
    c.num_train_steps = 3000
    c.eval_every_steps = 3000
  return c


def get_sweep(arg=None):
  runlocal = config_cli.config_args(arg, runlocal=False)['runlocal']
  steps = 20 if runlocal else 500
  fine_tune = {'init_from': sweeps.trial_ref('mode=float'), 'num_train_steps': steps,
               'optimizer.learning_rate': 5e-4, 'optimizer.warmup_steps': 0, 'eval_every_steps': steps}
  bits = {'w8a8': {'quant.weight.format': 'int8', 'quant.act.format': 'int8'},
          'w4a4': {'quant.weight.format': 'int4', 'quant.act.format': 'int4'}}
  return sweeps.chain(
      sweeps.axis('mode', {'float': {'mode': 'float'}}),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **fine_tune}}), sweeps.axis('bits', bits)),
      sweeps.product(sweeps.axis('mode', {'ptq': {'mode': 'ptq', 'init_from': sweeps.trial_ref('mode=float')}}),
                     sweeps.axis('bits', {'w8a8': bits['w8a8']})),
  )


def metrics():
  return ['eval/accuracy', 'eval/loss']
