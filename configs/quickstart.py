r"""Quickstart sweep: LeNet-5 on Fashion-MNIST, float vs W8A8 / W4A4 / W2A2, by QAT and by PTQ.

    python -m experiments.sweep --config=configs/quickstart.py --root=runs/quickstart
    python -m experiments.board runs/quickstart          # TensorBoard on 127.0.0.1 (HParams, Pareto images)
    cat runs/quickstart/report.md                        # the table, the Pareto fronts (PNG beside it)

Seven trials: `mode=float` once; `mode=qat` (trained from scratch with fake quantization) and `mode=ptq`
(calibrated from the float trial's model and converted, no training) for each of w8a8, w4a4 and w2a2. Below 8
bits the trials follow the low-bit literature's recipe (LSQ, Esser et al. 2020): the first and last layers at 8
bits and, in QAT, learned step sizes (the LSQ estimator) for weights and activations. As in every experiments
config, activation grids are unsigned where the first batch's activations are non-negative (after ReLU;
`quant.act_signedness='auto'`). Fashion-MNIST is fetched into the dataset cache on first use
(experiments.data); rerunning the command skips finished trials.

Args (`configs/quickstart.py:ARGS`, comma-separated): `seeds=N` repeats every configuration over N seeds;
`runlocal` shrinks everything to the committed fixtures (a smoke test).

What it reaches (1000 steps of batch 128, about 2 epochs; test accuracy on all 10k test images), measured on
2026-12-07 with `seeds=3` (mean ± std over 3 seeds; the report marks differences within the seed spread n.s.;
AMD EPYC Zen 3, jax 0.12.1; float and QAT at commit f2e7eed, PTQ at 82f693b, whose activation ranges are the
mean over the calibration batches):

  float 88.0 ± 0.3% | W8A8 QAT 88.0 ± 0.3%, PTQ 87.9 ± 0.3% | W4A4 QAT 88.0 ± 0.5%, PTQ 87.4 ± 0.4% |
  W2A2 QAT 86.9 ± 0.1%, PTQ 51.9 ± 14.2%

(2026-12-04, on an Intel Xeon before the absmax scale was rounded up to keep the largest element on the grid:
float 88.0 ± 0.3%, W4A4 QAT 87.9 ± 0.6%, W2A2 QAT 87.0 ± 0.2%, PTQ 54.9 ± 11.5%.)

(Before the recipe, signed activation grids and every layer at the nominal bits, one seed: W4A4 QAT 85.5%,
PTQ 85.8%; W2A2 QAT 82.7%, PTQ 10.5%, against float 88.3%.)

How long: on a 2-core Intel Xeon (AVX-512 VNNI, AMX), from a fresh clone with warm dataset and pip caches and
`.ci/run` running on the same cores, README command 1 took 4 min 53 s in all (2026-12-04). That run, one seed:
float 88.3%, W2A2 QAT 87.1%, PTQ 41.7% (seed 0 of the 2026-12-04 runs; seed 0 of the 2026-12-07 runs: float
88.3%, W2A2 QAT 86.9%, PTQ 35.5%); W2A2 serves in 18,018 bytes (2-bit weights packed) against W4A4's 33,138
(2026-12-07).
"""

import os

import ml_collections

from experiments import sweeps
from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def _args(arg):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  if a['seeds'] < 1:
    raise config_cli.ConfigError(f'config arg seeds={a["seeds"]}: expected a positive number of seeds')
  return a


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = _args(arg)
  c = config_cli.load_file(os.path.join(_HERE, 'fmnist_cnn.py') + (':runlocal' if a['runlocal'] else ''))
  if not a['runlocal']:
    c.num_train_steps = 1000
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 250
    c.log_every_steps = 50
    c.optimizer.warmup_steps = 50
    c.eval_examples = 0           # the whole test set (10k)
    c.quant.calibration_batches = 8
  return c


def get_sweep(arg=None) -> sweeps.Sweep:
  a = _args(arg)
  formats = {'w8a8': 'int8', 'w4a4': 'int4', 'w2a2': 'int2'}
  bits = {k: {'quant.weight.format': f, 'quant.act.format': f} for k, f in formats.items()}
  # Below 8 bits, the low-bit literature's recipe (LSQ, Esser et al. 2020): the first and last layers at 8 bits,
  # and QAT learns its step sizes; PTQ trains nothing, so its estimator is moot.
  low = {k: dict(v, **({'quant.first_last_8bit': True} if k != 'w8a8' else {})) for k, v in bits.items()}
  qat_bits = {k: dict(v, **({'quant.weight.estimator': 'lsq', 'quant.act.estimator': 'lsq'} if k != 'w8a8' else {}))
              for k, v in low.items()}
  sweep = sweeps.chain(
      sweeps.axis('mode', {'float': {'mode': 'float', 'quant.weight.format': '', 'quant.act.format': ''}}),
      sweeps.product(sweeps.axis('mode', {'qat': {'mode': 'qat'}}), sweeps.axis('bits', qat_bits)),
      sweeps.product(sweeps.axis('mode', {'ptq': {'mode': 'ptq', 'init_from': sweeps.trial_ref('mode=float')}}),
                     sweeps.axis('bits', low)),
  )
  if a['seeds'] > 1:
    sweep = sweeps.product(sweep, sweeps.axis('seed', list(range(a['seeds']))))
  return sweep


def metrics():
  return ['eval/accuracy', 'eval/loss']
