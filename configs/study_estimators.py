r"""Estimator study on Fashion-MNIST (LeNet-5 CNN, or the small ResNet): STE, clipped STE, PACT, LSQ, LSQ+, EWGS,
DSQ and QDrop at W4A4, W3A3, W2A2.

    python -m experiments.sweep --config=configs/study_estimators.py:seeds=3 --root=runs/study_estimators
    python -m experiments.report runs/study_estimators

Trials: one float CNN (3000 steps) per seed, then QAT fine-tunes from it (1000 steps, Adam 5e-4), the first and
last layers at 8 bits (quant.first_last_8bit) and unsigned activation grids after ReLU, with the estimator on
weights and activations as its paper uses it: STE (Bengio et al. 2013), clipped STE, PACT (Choi et al. 2018:
learned activation clip, DoReFa weights), LSQ (Esser et al. 2020), LSQ+ (Bhalgat et al. 2020: LSQ weights,
asymmetric activations with a learned offset), EWGS (Lee et al. 2021), DSQ (Gong et al. 2019: a learned soft
quantizer in the backward) and QDrop (Wei et al. 2022: each activation element left float with probability 0.5
while training, clipped STE otherwise; its weights clipped STE, so the clipped STE row is its contrast). Also the
equal-steps float fine-tune.
Trends the literature reports: LSQ ahead of STE and PACT at 2-3 bits; EWGS ahead of STE at 2 bits. (LSQ+'s
asymmetric activations pay off after Swish/GELU; this CNN has ReLUs, so little gain is expected here.)
Args (comma-separated): `seeds=N` repeats every trial over N seeds; `runlocal` shrinks it to a smoke test;
`activation=swish` (or gelu) builds the CNN with that activation instead of ReLU and runs the estimators whose
contrast it tests, STE, LSQ and LSQ+ (LSQ+ should lead LSQ there, its learned offset fitting the negative tail):

    python -m experiments.sweep --config=configs/study_estimators.py:seeds=3,activation=swish \
        --root=runs/study_estimators_swish

`model=resnet` runs the estimators on configs/fmnist_resnet.py instead: its float model (4000 steps, the recipe of
the ResNet PTQ table), then 500-step QAT fine-tunes (the 2-core budget: a ResNet step costs about 5x a LeNet-5
step). Its stem and head stay float, as that config keeps them, so every quantized op is a block conv. All eight
estimators run, 72 QAT runs (3-5 CPU-minutes each; DSQ and QDrop are the slower); the literature's contrasts
(LSQ, EWGS against STE) come first in the sweep's order, then LSQ+, DSQ and QDrop:

    python -m experiments.sweep --config=configs/study_estimators.py:seeds=3,model=resnet \
        --root=runs/study_estimators_resnet --workers=2
"""

import os

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))

ESTIMATORS = {  # weight, activation (and the activation scheme where the method needs one)
    'ste': {'quant.weight.estimator': 'ste', 'quant.act.estimator': 'ste'},
    'clipped_ste': {'quant.weight.estimator': 'clipped_ste', 'quant.act.estimator': 'clipped_ste'},
    'pact': {'quant.weight.estimator': 'dorefa', 'quant.act.estimator': 'pact'},
    'lsq': {'quant.weight.estimator': 'lsq', 'quant.act.estimator': 'lsq'},
    'lsq_plus': {'quant.weight.estimator': 'lsq', 'quant.act.estimator': 'lsq_plus',
                 'quant.act.scheme': 'asymmetric', 'quant.act.calibration': 'minmax'},
    'ewgs': {'quant.weight.estimator': 'ewgs', 'quant.act.estimator': 'ewgs'},
    'dsq': {'quant.weight.estimator': 'dsq', 'quant.act.estimator': 'dsq'},
    # QDrop drops activation quantization; with nothing dropped it is the clipped STE, so that is its weights'.
    'qdrop': {'quant.weight.estimator': 'clipped_ste', 'quant.act.estimator': 'qdrop'},
}


NON_RELU_ESTIMATORS = ('ste', 'lsq', 'lsq_plus')


MODELS = {'cnn': 'fmnist_cnn.py', 'resnet': 'fmnist_resnet.py'}
STEPS = {'cnn': (3000, 1000), 'resnet': (4000, 500)}  # float steps, QAT fine-tune steps


def _args(arg):
  a = config_cli.config_args(arg, runlocal=False, seeds=1, activation='relu', model='cnn')
  if a['model'] not in MODELS:
    raise config_cli.ConfigError(f"config arg model={a['model']!r}: expected one of {', '.join(MODELS)}")
  return a


def get_config(arg=None):
  a = _args(arg)
  c = config_cli.load_file(os.path.join(_HERE, MODELS[a['model']]) + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:
    c.num_train_steps = STEPS[a['model']][0]
    c.eval_every_steps = 1000 if a['model'] == 'cnn' else 2000
    c.checkpoint_every_steps = 1000
  # LeNet-5: first and last layers at 8 bits; the ResNet keeps its stem and head float (its config's convention).
  c.quant.first_last_8bit = a['model'] == 'cnn'
  c.quant_summaries = False
  if a['activation'] != 'relu':
    c.model.activation = a['activation']
  return c


def get_sweep(arg=None):
  a = _args(arg)
  estimators = ESTIMATORS if a['activation'] == 'relu' else {k: ESTIMATORS[k] for k in NON_RELU_ESTIMATORS}
  if a['model'] == 'resnet':  # the literature's contrasts (LSQ, EWGS vs STE) run first
    order = ('ste', 'clipped_ste', 'lsq', 'ewgs', 'pact', 'lsq_plus', 'dsq', 'qdrop')
    estimators = {k: estimators[k] for k in order}
  base, steps = (20, 20) if a['runlocal'] else STEPS[a['model']]
  fine_tune = {'init_from': sweeps.trial_ref(f'mode=float,steps={base}'), 'num_train_steps': steps,
               'optimizer.learning_rate': 5e-4, 'optimizer.warmup_steps': 0, 'eval_every_steps': steps}
  bits = {f'w{b}a{b}': {'quant.weight.format': f'int{b}', 'quant.act.format': f'int{b}'} for b in (4, 3, 2)}
  total = sweeps.axis('steps', {str(base + steps): {}})
  sweep = sweeps.chain(
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float'}}), sweeps.axis('steps', {str(base): {}})),
      sweeps.product(sweeps.axis('mode', {'float': {'mode': 'float', **fine_tune}}), total),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat', **fine_tune}}), total,
                     sweeps.axis('estimator', estimators), sweeps.axis('bits', bits)),
  )
  if a['seeds'] > 1:
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/accuracy', 'eval/loss']
