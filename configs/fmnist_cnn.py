r"""LeNet-5-style CNN on Fashion-MNIST: float, QAT, PTQ or quantized training, picked by config.mode.

Run:      python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/fmnist_cnn/float
QAT W4A4: python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/fmnist_cnn/w4a4 \
            --config.mode=qat --config.quant.weight.format=int4 --config.quant.act.format=int4
PTQ W8A8: python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/fmnist_cnn/ptq --config.mode=ptq
Smoke:    python -m experiments.train --config=configs/fmnist_cnn.py:runlocal --workdir=/tmp/cnn_smoke

Expected: float >= 91% test accuracy (docs/results.md has the measured figures and times on 2 CPU cores).
runlocal: 20 steps on the committed fixtures, well under a minute.
"""

from experiments.config import cli as config_cli
from experiments.config.defaults import base_config, runlocal


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False)
  c = base_config()
  c.dataset = 'fashion_mnist'
  c.model.name = 'lenet5'
  c.model.features = (6, 16)      # conv channels (LeNet-5's own)
  c.model.hidden = (120, 84)      # dense widths
  c.batch_size = 128
  c.num_train_steps = 6000
  c.eval_every_steps = 1000
  c.optimizer.learning_rate = 2e-3
  if a['runlocal']:
    runlocal(c)
  return c


def metrics():
  return ['eval/accuracy', 'eval/loss']
