r"""qjax's PTQ methods against Qwix's (the `qwix` package) on the Fashion-MNIST LeNet-5 of
configs/results_ptq_fmnist.py: the same float model and calibration batches, weight-only, per-channel.

    pip install -e '.[peers]'
    python -m experiments.peer_ptq --config=configs/peer_ptq_fmnist.py --workdir=runs/peer_ptq_fmnist

Methods: rtn, gptq, awq and smoothquant (alpha 0.5 in both; weight-only, as Qwix serves it with float activations).
Only the three dense layers are quantized, by both tools (Qwix's GPTQ collects no statistics for convolutions and
would round them to nearest); the convolutions stay float. qjax runs twice per cell: on its default symmetric grid
(scale = absmax / qmax) and on Qwix's (scale = absmax / (qmax + 1/2), using the -(qmax + 1) level). Expected: GPTQ
ahead of RTN at 3 and 2 bits in both tools; Qwix's GPTQ much slower (its column loop is unrolled in Python) and
without a 3-bit path in qwix 0.1.8.
`:runlocal` shrinks it to a smoke test on the fixtures. `seeds=N` repeats the comparison over seeds 0..N-1 (each its
own float model and calibration batches; the table gives mean ± std):

    python -m experiments.peer_ptq --config=configs/peer_ptq_fmnist.py:seeds=3 --workdir=runs/peer_ptq_fmnist
"""

import os

import ml_collections

from experiments.config import cli as config_cli

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False, seeds=1)
  c = config_cli.load_file(os.path.join(_HERE, 'results_ptq_fmnist.py') + (':runlocal' if a['runlocal'] else ''))
  c.quant.float_layers = r'conv\d'  # the convolutions stay float for both tools
  c.peer = ml_collections.ConfigDict()
  c.peer.methods = ('rtn', 'gptq', 'awq', 'smoothquant')
  c.peer.bits = (4, 3, 2) if not a['runlocal'] else (4,)
  c.peer.qjax_grids = ('absmax', 'absmax_half_step')  # qjax's default weight grid, and the one Qwix uses
  c.peer.metric = 'eval/accuracy'
  c.peer.seeds = tuple(range(a['seeds']))  # seed 0 in <workdir>, seed s in <workdir>/seed<s>
  c.peer.qwix_layers = 'fc1|fc2|head'  # Qwix's rules: the layers qjax quantizes (all but float_layers)
  return c
