r"""LeNet-5-style CNN on MNIST: the sanity check of the Fashion-MNIST results (same modes and overrides).

Run:   python -m experiments.train --config=configs/mnist_cnn.py --workdir=runs/mnist_cnn/float
Smoke: python -m experiments.train --config=configs/mnist_cnn.py:runlocal --workdir=/tmp/mnist_smoke

Expected: float >= 98.5% test accuracy; W8A8 QAT/PTQ within a few tenths of a point.
"""

from experiments.config import cli as config_cli
from experiments.config.defaults import base_config, runlocal


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False)
  c = base_config()
  c.dataset = 'mnist'
  c.model.name = 'lenet5'
  c.model.features = (6, 16)
  c.model.hidden = (120, 84)
  c.num_train_steps = 3000
  if a['runlocal']:
    runlocal(c)
  return c


def metrics():
  return ['eval/accuracy', 'eval/loss']
