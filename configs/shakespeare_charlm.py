r"""Character-level causal Transformer LM on the complete works of Shakespeare (whole plays held out).

Run:      python -m experiments.train --config=configs/shakespeare_charlm.py --workdir=runs/charlm/float
QAT W8A8: ... --config.mode=qat        W4A8: ... --config.mode=qat --config.quant.weight.format=int4
Smoke:    python -m experiments.train --config=configs/shakespeare_charlm.py:runlocal --workdir=/tmp/lm_smoke

Metric: eval/loss (nats per character) and eval/bits_per_char on the held-out plays.
"""

from experiments.config import cli as config_cli
from experiments.config.defaults import base_config, runlocal


def get_config(arg=None):
  a = config_cli.config_args(arg, runlocal=False)
  c = base_config()
  c.dataset = 'shakespeare'
  c.model.name = 'char_lm'
  c.model.seq_len = 128
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_layers = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.eval_examples = 512          # held-out windows of seq_len characters
  c.num_train_steps = 3000
  c.eval_every_steps = 500
  c.optimizer.learning_rate = 1e-3
  c.quant.weight.granularity = 'per_channel'
  c.quant.act.granularity = 'per_channel'  # per token
  if a['runlocal']:
    runlocal(c)
    c.model.seq_len = 32
    c.batch_size = 8
    c.eval_batch_size = 16
    c.eval_examples = 32
  return c


def metrics():
  return ['eval/loss', 'eval/bits_per_char']
