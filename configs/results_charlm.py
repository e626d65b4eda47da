r"""The char-LM rows of docs/results.md: a Shakespeare character Transformer, float vs QAT W8A8 and W4A8.

    python -m experiments.sweep --config=configs/results_charlm.py --root=runs/results_charlm

QAT is fine-tuned from the float model. Metric: validation loss (nats/char) on held-out plays.
Targets (issue 5): W8A8 within 1% of the float validation loss, W4A8 within 3%.
"""

import os

from experiments import configlib, sweeps

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = configlib.config_args(arg, runlocal=False)
  c = configlib.load_file(os.path.join(_HERE, 'shakespeare_charlm.py') + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:  # sized for 2 CPU cores
    c.model.seq_len = 64
    c.eval_examples = 256
    c.num_train_steps = 1200
    c.eval_every_steps = 600
    c.checkpoint_every_steps = 300
  return c


def get_sweep(arg=None):
  runlocal = configlib.config_args(arg, runlocal=False)['runlocal']
  steps = 20 if runlocal else 300
  fine_tune = {'init_from': sweeps.trial_ref('mode=float'), 'num_train_steps': steps,
               'optimizer.learning_rate': 3e-4, 'optimizer.warmup_steps': 0, 'eval_every_steps': steps}
  bits = {'w8a8': {'quant.weight.format': 'int8', 'quant.act.format': 'int8'},
          'w4a8': {'quant.weight.format': 'int4', 'quant.act.format': 'int8'}}
  return sweeps.chain(
      sweeps.axis('mode', {'float': {'mode': 'float'}}),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **fine_tune}}), sweeps.axis('bits', bits)),
  )


def metrics():
  return ['eval/loss', 'eval/bits_per_char']
