r"""PTQ methods on Fashion-MNIST (LeNet-5 CNN, or the small ResNet): method x weight bits, weight-only.

    python -m experiments.sweep --config=configs/results_ptq_fmnist.py:seeds=3 --root=runs/results_ptq_fmnist
    python -m experiments.review.ptq_table runs/results_ptq_fmnist
    python -m experiments.sweep --config=configs/results_ptq_fmnist.py:model=resnet --root=runs/results_ptq_resnet

Trials: the float CNN (6000 steps, as configs/results_fmnist.py), then PTQ from it with per-channel int4 / int3 /
int2 weights in every layer (convs included) and float activations, calibrated on 16 batches of 128 images
(AWQ and AdaRound see 2048 rows per layer), by each method: rtn, gptq, gptq with act-order, awq, adaround (10k
iterations per layer, the paper's default), bias_correction, gptq followed by bias_correction, and gptq (with and
without act-order) and adaround calibrated sequentially (config.ptq.sequential: each layer on the inputs of the
already-quantized earlier layers), and sequentially calibrated empirical bias correction, alone and after gptq or
adaround.
Both models: W8A8 and W4A8 (per-channel weights, int8 per-tensor static activations, unsigned where the
calibration batch is non-negative) for rtn, smoothquant, and smoothquant then gptq, and on LeNet-5 rotation
(which applies to the dense layers: a rotation of a convolution's im2col features has no form on its input);
on LeNet-5 also W8A4 (4-bit per-tensor activations, where round-to-nearest activations do lose accuracy).
No group columns here: LeNet-5's dense fan-ins (400, 120, 84) take no group of 64 or 128, and qjax's quantized
convolutions have per-channel or per-tensor scales only (their contraction mixes channels and window).
On the ResNet also BatchNorm folding (config.ptq.fold_batchnorm, qjax.ptq.batchnorm): rtn and gptq on folded
and unfolded convs, with per-channel and per-tensor int8 and int4 weights, and per-tensor after folding and
cross-layer equalization (config.ptq.equalize, qjax.ptq.equalization);
`--only='fold=|method=(rtn|gptq),w=int4(,seed|$)'` runs those alone, with the unfolded per-channel int4 trials
they compare with. On LeNet-5 rtn and gptq with
per-tensor int8 and int4 weights, with and without equalization (`--only='equalize='`).
`:runlocal` shrinks it to a smoke test on the fixtures. `:model=resnet` runs the same on configs/fmnist_resnet.py
(its 4000 float steps; its stem and head stay float, as that config keeps them). `seeds=N` repeats every trial over
N seeds (each seed trains its own float model); the table gives mean +- std.
"""

import os

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))

MODELS = {'cnn': 'fmnist_cnn.py', 'resnet': 'fmnist_resnet.py'}
METHODS = {
    'rtn': {'ptq.method': 'rtn'},
    'gptq': {'ptq.method': 'gptq'},
    'gptq_act_order': {'ptq.method': 'gptq', 'ptq.gptq.act_order': True},
    'awq': {'ptq.method': 'awq'},
    'adaround': {'ptq.method': 'adaround'},
    'bias_correction': {'ptq.method': 'bias_correction'},
    'gptq+bias_correction': {'ptq.method': 'gptq,bias_correction'},
    # Each layer calibrated on the inputs of the already-quantized earlier layers (GPTQ's and AdaRound's protocol).
    'gptq_sequential': {'ptq.method': 'gptq', 'ptq.sequential': True},
    'gptq_act_order_sequential': {'ptq.method': 'gptq', 'ptq.gptq.act_order': True, 'ptq.sequential': True},
    'adaround_sequential': {'ptq.method': 'adaround', 'ptq.sequential': True},
    # Empirical bias correction (the float model's mean output as the target) needs the quantized model's inputs.
    'bias_correction_empirical_sequential': {'ptq.method': 'bias_correction', 'ptq.bias_correction.empirical': True,
                                             'ptq.sequential': True},
    'gptq_sequential+bias_correction_empirical': {'ptq.method': 'gptq,bias_correction',
                                                  'ptq.bias_correction.empirical': True, 'ptq.sequential': True},
    'adaround_sequential+bias_correction_empirical': {'ptq.method': 'adaround,bias_correction',
                                                      'ptq.bias_correction.empirical': True, 'ptq.sequential': True},
}


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False, model='cnn', seeds=1)
  if a['model'] not in MODELS:
    raise config_cli.ConfigError(f"config arg model={a['model']!r}: expected one of {', '.join(MODELS)}")
  c = config_cli.load_file(os.path.join(_HERE, MODELS[a['model']]) + (':runlocal' if a['runlocal'] else ''))
  c.quant.act.format = ''  # weight-only PTQ: the methods differ in how they round weights
  c.quant.weight.granularity = 'per_channel'
  c.quant_summaries = False
  if not a['runlocal']:
    c.num_train_steps = 6000 if a['model'] == 'cnn' else c.num_train_steps
    c.eval_every_steps = 2000
    c.checkpoint_every_steps = 1000
    c.quant.calibration_batches = 16
    c.ptq.max_sample = 2048  # calibration rows per layer kept for AWQ and AdaRound
  else:
    c.ptq.adaround.iters = 100
  return c


def get_sweep(arg=None):
  a = config_cli.config_args(arg, runlocal=False, model='cnn', seeds=1)
  ptq = {'mode': 'ptq', 'init_from': sweeps.trial_ref('mode=float')}
  act8 = {'rtn': {'ptq.method': 'rtn'}, 'smoothquant': {'ptq.method': 'smoothquant'},
          'smoothquant+gptq': {'ptq.method': 'smoothquant,gptq'}}
  if a['model'] == 'cnn':
    act8['rotation'] = {'ptq.method': 'rotation'}
  bits8 = {f'w{b}a8': {'quant.weight.format': f'int{b}', 'quant.act.format': 'int8'} for b in (8, 4)}
  if a['model'] == 'cnn':  # 4-bit per-tensor activations: where round-to-nearest activations lose accuracy
    bits8['w8a4'] = {'quant.weight.format': 'int8', 'quant.act.format': 'int4'}
  parts = [
      sweeps.axis('mode', {'float': {'mode': 'float'}}),
      sweeps.product(sweeps.axis('mode', {'ptq': ptq}), sweeps.axis('method', METHODS),
                     sweeps.axis('quant.weight.format', ['int4', 'int3', 'int2'], name='w')),
      sweeps.product(sweeps.axis('mode', {'ptq': ptq}), sweeps.axis('method', act8), sweeps.axis('bits', bits8)),
  ]
  w = lambda granularity, formats: sweeps.product(
      sweeps.axis('quant.weight.granularity', [granularity], name='wg'),
      sweeps.axis('quant.weight.format', formats, name='w'))
  rtn_gptq = sweeps.axis('method', {k: METHODS[k] for k in ('rtn', 'gptq')})
  fold, equalize = {'ptq.fold_batchnorm': True}, {'ptq.equalize': True}
  if a['model'] == 'resnet':  # BatchNorm folded into the convs before PTQ, with per-channel and per-tensor weights
    parts.append(sweeps.product(
        sweeps.axis('mode', {'ptq': ptq}), rtn_gptq,
        sweeps.chain(  # unfolded per-channel int4: the method x w trials above
            sweeps.product(sweeps.axis('fold', {'folded': fold}),
                           sweeps.chain(w('per_channel', ['int8', 'int4']), w('per_tensor', ['int8', 'int4']))),
            sweeps.product(sweeps.axis('fold', {'unfolded': {}}),
                           sweeps.chain(w('per_channel', ['int8']), w('per_tensor', ['int8', 'int4']))),
            # then cross-layer equalization of the conv pairs inside the blocks, for per-tensor weights
            sweeps.product(sweeps.axis('fold', {'folded+equalized': {**fold, **equalize}}),
                           w('per_tensor', ['int8', 'int4'])))))
  else:  # cross-layer equalization for per-tensor weights (LeNet-5 has no BatchNorm)
    parts.append(sweeps.product(
        sweeps.axis('mode', {'ptq': ptq}), rtn_gptq,
        sweeps.axis('equalize', {'equalized': equalize, 'not_equalized': {}}),
        w('per_tensor', ['int8', 'int4'])))
  sweep = sweeps.chain(*parts)
  if a['seeds'] > 1:  # each seed: its own float model (init and data order), its PTQ runs from it
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/accuracy', 'eval/loss']
