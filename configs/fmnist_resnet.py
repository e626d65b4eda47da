r"""Small ResNet (3 stages of basic blocks, BatchNorm) on Fashion-MNIST.

Run:   python -m experiments.train --config=configs/fmnist_resnet.py --workdir=runs/fmnist_resnet/float
Smoke: python -m experiments.train --config=configs/fmnist_resnet.py:runlocal --workdir=/tmp/resnet_smoke

Expected: float ~92-93% test accuracy; slower than the CNN on CPU (tens of minutes on 2 cores).
"""

from experiments.config import cli as config_cli
from experiments.config.defaults import base_config, runlocal


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False)
  c = base_config()
  c.dataset = 'fashion_mnist'
  c.model.name = 'resnet'
  c.model.stage_sizes = (1, 1, 1)
  c.model.width = 16
  c.num_train_steps = 4000
  c.quant.float_layers = 'stem|head'   # first and last layers in float, as is customary
  if a['runlocal']:
    runlocal(c)
  return c


def metrics():
  return ['eval/accuracy', 'eval/loss']
