r"""PTQ methods on the Shakespeare char-LM (configs/results_charlm.py's model: 2 layers, d_model 128, 1200 steps).

    python -m experiments.sweep --config=configs/results_ptq_charlm.py:seeds=3 --root=runs/results_ptq_charlm
    python -m experiments.review.ptq_table runs/results_ptq_charlm --metric=eval/loss

Trials: the float model, then PTQ from it, calibrated on 16 batches of 32 windows:
  weight-only  int4 / int3 / int2 weights in groups of 128 or 64 along the input (the attention output projection, which
               contracts heads x head_dim, per output channel), activations float; methods rtn, gptq, gptq with
               act-order, awq, adaround (10k iterations per layer), rotation then gptq, gptq then bias_correction.
  W8A8 / W4A8  per-channel weights, int8 per-tensor activations; methods rtn, smoothquant, rotation, and
               smoothquant then gptq.
`:runlocal` shrinks it to a smoke test on the fixtures. `seeds=N` repeats every trial over N seeds (each seed trains
its own float model); the table gives mean +- std.
"""

import os

import ml_collections

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  c = config_cli.load_file(os.path.join(_HERE, 'results_charlm.py') + (':runlocal' if a['runlocal'] else ''))
  c.quant.act.granularity = 'per_tensor'  # PTQ keeps static activation ranges: one per tensor
  c.quant_summaries = False
  # The attention output contracts (heads, head_dim). It stays per channel, as in docs/results.md's figures,
  # which were measured when per-group weights over two contracting axes were refused.
  c.quant.groups.attn_out = ml_collections.ConfigDict({
      'module_path': r'.*attn/out', 'weight': ml_collections.ConfigDict({'granularity': 'per_channel',
                                                                          'group_size': 0})})
  if not a['runlocal']:
    c.quant.calibration_batches = 16
    c.ptq.max_sample = 2048
  else:
    c.ptq.adaround.iters = 100
  return c


def get_sweep(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  ptq = {'mode': 'ptq', 'init_from': sweeps.trial_ref('mode=float')}
  weight_only = {
      'rtn': {'ptq.method': 'rtn'}, 'gptq': {'ptq.method': 'gptq'},
      'gptq_act_order': {'ptq.method': 'gptq', 'ptq.gptq.act_order': True},
      'awq': {'ptq.method': 'awq'}, 'adaround': {'ptq.method': 'adaround'},
      'rotation+gptq': {'ptq.method': 'rotation,gptq'},
      'gptq+bias_correction': {'ptq.method': 'gptq,bias_correction'}}
  bits = {f'w{b}g{g}': {'quant.weight.format': f'int{b}', 'quant.weight.granularity': 'per_group',
                        'quant.weight.group_size': g, 'quant.act.format': ''} for b in (4, 3, 2) for g in (128, 64)}
  act8 = {'rtn': {'ptq.method': 'rtn'}, 'smoothquant': {'ptq.method': 'smoothquant'},
          'rotation': {'ptq.method': 'rotation'}, 'smoothquant+gptq': {'ptq.method': 'smoothquant,gptq'}}
  bits8 = {f'w{b}a8': {'quant.weight.format': f'int{b}', 'quant.act.format': 'int8'} for b in (8, 4)}
  sweep = sweeps.chain(
      sweeps.axis('mode', {'float': {'mode': 'float'}}),
      sweeps.product(sweeps.axis('mode', {'ptq': ptq}), sweeps.axis('method', weight_only),
                     sweeps.axis('bits', bits)),
      sweeps.product(sweeps.axis('mode', {'ptq': ptq}), sweeps.axis('method', act8), sweeps.axis('bits', bits8)),
  )
  if a['seeds'] > 1:  # each seed: its own float model (init and data order), its PTQ runs from it
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/loss', 'eval/bits_per_char']
