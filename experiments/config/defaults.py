"""The runner's defaults, shared by the files under configs/ (which then set only their own names and numbers)."""

import ml_collections

from experiments.config import ptq as ptq_config
from experiments.config.quant import default_quant_config


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = 'fashion_mnist'   # fashion_mnist | mnist | shakespeare
  c.data_source = 'auto'        # 'auto' (cache, then fetch) | 'fixtures' (the committed tiny sets)
  c.train_examples = 0          # 0: all
  c.model = ml_collections.ConfigDict({'name': 'lenet5'})
  c.mode = 'float'              # float | qat | ptq | quantized_training
  c.init_from = ''              # a finished float run's workdir (QAT fine-tuning, PTQ); '' = train one
  c.pretrain_steps = 0          # steps of that float run (0: num_train_steps)
  c.quant = default_quant_config()
  c.ptq = ptq_config.default_config()   # PTQ method(s) after calibration (mode='ptq'): ptq.method, ptq.<method>.<param>
  c.quant_summaries = True      # per-layer SQNR, clipping, histograms at each evaluation
  c.batch_size = 128
  c.eval_batch_size = 500
  c.eval_examples = 0           # 0: the whole test set
  c.num_train_steps = 1000
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.checkpoint_keep = 2
  c.optimizer = ml_collections.ConfigDict(dict(name='adam', learning_rate=2e-3, schedule='cosine',
                                                warmup_steps=100, weight_decay=0.0, momentum=0.9, grad_clip=0.0))
  # Quantizer params (LSQ steps, PACT clips, LSQ+ offsets): learning rate = learning_rate * this scale, and their
  # own weight decay (adamw / sgd), 0 by default: decay would shrink the steps and clip ever more of the range.
  c.optimizer.quant_lr_scale = 1.0
  c.optimizer.quant_weight_decay = 0.0
  c.mesh = ml_collections.ConfigDict({'data': -1, 'model': 1})
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long smoke run on the committed fixtures."""
  c.data_source = 'fixtures'
  c.batch_size = 64
  c.eval_batch_size = 125
  c.num_train_steps = 20
  c.log_every_steps = 5
  c.eval_every_steps = 10
  c.checkpoint_every_steps = 10
  c.quant.calibration_batches = 2
  return c
