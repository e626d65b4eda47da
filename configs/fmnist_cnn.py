r"""LeNet-5-style CNN on Fashion-MNIST: float, QAT, PTQ or quantized training, picked by config.mode.

Run:      python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/fmnist_cnn/float
QAT W4A4: python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/fmnist_cnn/w4a4 \
            --config.mode=qat --config.quant.weight.format=int4 --config.quant.act.format=int4
PTQ W8A8: python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/fmnist_cnn/ptq --config.mode=ptq
Smoke:    python -m experiments.train --config=configs/fmnist_cnn.py:runlocal --workdir=/tmp/cnn_smoke

Expected (see docs/results.md for measured figures): float >= 91% test accuracy after 6000 steps; about
8 minutes on 2 CPU cores. runlocal: ~10 s on the committed fixtures.
"""

import ml_collections

from experiments.quant_config import default_quant_config


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = 'fashion_mnist'
  c.data_source = 'auto'        # 'auto' (cache, then fetch) | 'fixtures' (committed tiny set)
  c.train_examples = 0          # 0: all
  c.model = ml_collections.ConfigDict({'name': 'lenet5'})
  c.mode = 'float'              # float | qat | ptq | quantized_training
  c.init_from = ''              # a finished float run's workdir (QAT fine-tuning, PTQ); '' = train one
  c.pretrain_steps = 0          # steps of that float run (0: num_train_steps)
  c.quant = default_quant_config()
  c.quant_summaries = True
  c.batch_size = 128
  c.eval_batch_size = 500
  c.eval_examples = 0           # 0: the whole test set
  c.num_train_steps = 6000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.checkpoint_keep = 2
  c.optimizer = ml_collections.ConfigDict(dict(name='adam', learning_rate=2e-3, schedule='cosine',
                                                warmup_steps=100, weight_decay=0.0, momentum=0.9, grad_clip=0.0))
  c.mesh = ml_collections.ConfigDict({'data': -1, 'model': 1})
  if arg == 'runlocal':
    c.data_source = 'fixtures'
    c.batch_size = 64
    c.eval_batch_size = 125
    c.num_train_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.quant.calibration_batches = 2
  return c


def metrics():
  return ['eval/accuracy', 'eval/loss']
