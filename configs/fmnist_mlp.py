r"""NNX MLP 784-256-256-10 on Fashion-MNIST (float, QAT, PTQ, quantized training by config.mode).

Run:   python -m experiments.train --config=configs/fmnist_mlp.py --workdir=runs/fmnist_mlp/float
Int8 training (int8 forward and both backward matmuls):
       python -m experiments.train --config=configs/fmnist_mlp.py --workdir=runs/fmnist_mlp/int8 \
         --config.mode=quantized_training
Smoke: python -m experiments.train --config=configs/fmnist_mlp.py:runlocal --workdir=/tmp/mlp_smoke

Expected: float ~88-89% test accuracy (an MLP; the CNN is the accuracy model); a few minutes on 2 CPU cores.
"""

from experiments.config import cli as config_cli
from experiments.config.defaults import base_config, runlocal


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False)
  c = base_config()
  c.dataset = 'fashion_mnist'
  c.model.name = 'mlp'
  c.model.hidden = (256, 256)
  c.batch_size = 256
  c.num_train_steps = 3000
  c.eval_every_steps = 1000
  c.optimizer.learning_rate = 1e-3
  if a['runlocal']:
    runlocal(c)
  return c


def metrics():
  return ['eval/accuracy', 'eval/loss']
