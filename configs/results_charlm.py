r"""The char-LM rows of docs/results.md: a Shakespeare character Transformer, float vs QAT W8A8 and W4A8.

    python -m experiments.sweep --config=configs/results_charlm.py --root=runs/results_charlm

Trials: the float model (1200 steps); fine-tuned from it for 300 steps each, a float model (the fair baseline:
equal total steps) and QAT at W8A8, W4A8 and W4A4. Metric: validation loss (nats/char) on held-out plays.
Targets: W8A8 within 1% of the equal-steps float validation loss, W4A8 within 3%; W4A4 reported.
Args (comma-separated): `seeds=N` repeats every trial over N seeds; `runlocal` shrinks it to a smoke test.
"""

import os

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  c = config_cli.load_file(os.path.join(_HERE, 'shakespeare_charlm.py') + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:  # sized for 2 CPU cores
    c.model.seq_len = 64
    c.eval_examples = 256
    c.num_train_steps = 1200
    c.eval_every_steps = 600
    c.checkpoint_every_steps = 300
  return c


def get_sweep(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  base, steps = (20, 20) if a['runlocal'] else (1200, 300)
  # Every fine-tune starts from the float model; the float one trains as long as the quantized ones, so
  # `loss - float` in the report compares models with equal total steps (labelled by them).
  fine_tune = {'init_from': sweeps.trial_ref(f'mode=float,steps={base}'), 'num_train_steps': steps,
               'optimizer.learning_rate': 3e-4, 'optimizer.warmup_steps': 0, 'eval_every_steps': steps}
  bits = {'w8a8': {'quant.weight.format': 'int8', 'quant.act.format': 'int8'},
          'w4a8': {'quant.weight.format': 'int4', 'quant.act.format': 'int8'},
          'w4a4': {'quant.weight.format': 'int4', 'quant.act.format': 'int4'}}
  total = sweeps.axis('steps', {str(base + steps): {}})
  sweep = sweeps.chain(
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float'}}), sweeps.axis('steps', {str(base): {}})),
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float', **fine_tune}}), total),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **fine_tune}}), total, sweeps.axis('bits', bits)),
  )
  if a['seeds'] > 1:
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/loss', 'eval/bits_per_char']
