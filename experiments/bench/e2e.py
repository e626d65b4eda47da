"""The e2e suite: the experiments' MLP (NNX), LeNet-5 (Linen) and char-LM quantized by qjax.flax rules built from
experiments/config/quant.py (as `python -m experiments.train` builds them): QAT steps with a real int8 or a
fake-quant forward, the int8 training step, and the PTQ int8 serving forward, each against the float model.

    python -m experiments.bench --config=configs/bench_e2e.py [--workdir=runs/bench/e2e]
"""

from __future__ import annotations

import gc

import jax
import ml_collections
import optax

from experiments import models
from experiments.bench import harness as bench
from experiments.bench import kernels
from experiments.bench.groups import Group, GroupedSuite, Target, Variant, maybe_inspect
from experiments.config import cli as config_cli
from experiments.config import quant as quant_config
from experiments.training import summaries, trainers

# Peer figures as quoted for Qwix and AQT (time ratio to the float step / forward). Separate measurements of the
# same peers gave the ranges in PEERS_NOTE (jax 0.10.2, AVX-512 VNNI EPYC); none of them is rerun by this suite.
PEERS = {
    'Qwix QAT step (w8a8)': 0.86,
    'Qwix PTQ int8 forward': 0.30,
    'AQT int8-forward config (config_v4)': 0.88,
    'AQT fully quantized (fwd + bwd int8)': 2.8,
    'Qwix fully quantized (QT w8a8g8)': '1.8-1.9',
}
PEERS_NOTE = ('as quoted for Qwix and AQT; separate measurements gave Qwix QAT 0.72-1.08x, '
              'Qwix PTQ forward 0.59-0.77x, Qwix QT 2.25-2.79x, AQT config_v4 0.77-0.93x, AQT fully_quantized '
              '3.1-3.8x (jax 0.10.2, AVX-512 VNNI EPYC, not this suite\'s machine)')


def quant_rules(kind: str, config=None):
  """Rules as `python -m experiments.train` builds them from experiments/config/quant.py's defaults (int8 weights
  per channel, int8 activations per tensor; activation grids signed as written, act_signedness='format'):
    'qat'          mode 'auto' (real int8 forward), float backward
    'qat_fake'     mode 'fake' (fake-quant forward, float matmul)
    'int8_train'   'qat' plus int8 gradients (mode quantized_training: grad int8, both backward matmuls int8)
    'ptq'          static per-tensor activation ranges (calibrated), for int8 serving
    'ptq_int4'     'ptq' with int4 weights (packed two per byte when served)
    'qat_<est>'    'qat' with weights and activations under the estimator <est> ('qat_lsq': learned steps, LSQ;
                   'qat_pact': learned clips, PACT), still a real int8 forward
  `config.quant_overrides` (dotted keys of config.quant, e.g. {'act.granularity': 'per_channel'}) apply first."""
  q = quant_config.default_quant_config()
  # Activation grids as the format is written: no probe run on data before the timed programs, and the same
  # grids as every figure in docs/benchmarks.md (train's default decides them from data, 'auto').
  q.act_signedness = 'format'
  for key, value in dict((config.get('quant_overrides') or {}) if config is not None else {}).items():
    config_cli.set_key(q, key.replace('__', '.'), value)
  if kind == 'qat_fake':
    q.mode = 'fake'
  elif kind == 'int8_train':
    q.grad.format = 'int8'
  elif kind == 'ptq_int4':
    q.weight.format = 'int4'
  elif kind.startswith('qat_'):
    q.weight.estimator = q.act.estimator = kind[len('qat_'):]
  elif kind not in ('qat', 'ptq'):
    raise ValueError(f'rules kind {kind!r} is not one of qat, qat_fake, qat_<estimator>, int8_train, ptq, '
                     'ptq_int4')
  return quant_config.build_rules(q, ptq=kind.startswith('ptq'))


# The char-LM of the e2e suite: the Shakespeare config's size (configs/shakespeare_charlm.py), 65 characters;
# config.charlm overrides any of these (bench_gpu's also sets dtype, batches and sizes).
CHARLM = {'d_model': 128, 'num_heads': 4, 'num_layers': 2, 'seq_len': 128, 'vocab_size': 65, 'dtype': 'float32',
          'train_batch': 32, 'serve_batches': (1, 8, 64, 256)}


def charlm_config(config) -> dict:
  return {**CHARLM, **dict((config.get('charlm') if config is not None else None) or {})}


def model_def(name: str, config):

  mc = ml_collections.ConfigDict({'name': name})
  if name == 'mlp':
    mc.hidden = tuple(config.mlp_hidden)
  if name == 'char_lm':
    c = charlm_config(config)
    mc.update({k: c[k] for k in ('d_model', 'num_heads', 'num_layers', 'dtype')})
    return models.build(mc, vocab_size=c['vocab_size'], seq_len=c['seq_len'])
  return models.build(mc, num_classes=10)


def random_batch(b: int, seed: int = 0, name: str = 'mlp', config=None):
  """A random batch for model `name`: 28x28 images and labels, or (char_lm) token windows and next tokens."""
  kx, ky = jax.random.split(jax.random.key(seed))
  if name == 'char_lm':
    c = charlm_config(config)
    tok = jax.random.randint(kx, (b, c['seq_len'] + 1), 0, c['vocab_size'])
    return tok[:, :-1], tok[:, 1:]  # (batch, seq) inputs, (batch, seq) targets
  return jax.random.uniform(kx, (b, 28, 28)), jax.random.randint(ky, (b,), 0, 10)


class Stepper:
  """A donated, jitted train step over a state kept here; each call advances the state (as a real run does)."""

  def __init__(self, trainer, state, x, y):
    self.step = jax.jit(trainer.train_step, donate_argnums=0)
    self.state, self.x, self.y = state, x, y

  def __call__(self):
    self.state, metrics = self.step(self.state, self.x, self.y)
    return self.state, metrics


def train_variant(md, rules, x, y, config, role):

  trainer = trainers.make(md, optax.adam(1e-3), rules)
  state = trainer.init(jax.random.key(config.get('seed', 0)), x)
  stepper = Stepper(trainer, state, x, y)
  info = {'inspect': maybe_inspect(config, stepper.step, state, x, y)}
  return Variant(stepper, role, info)


def serving_forward(md, rules, x, config):
  """(jitted forward, its variables) of the model: float when rules is None, else quantized by rules, calibrated
  on x (static activation ranges) and converted for int8 serving."""

  trainer = trainers.make(md, optax.adam(1e-3), rules)
  state = trainer.init(jax.random.key(config.get('seed', 0)), x)
  if rules is not None:
    cal = jax.jit(trainer.calibrate_step)
    for _ in range(int(config.get('calibration_batches', 2))):
      state = cal(state, x)
  fwd, args, _, _ = summaries.serving_forward(trainer, state, x, rules)
  return jax.jit(fwd), args[0]



def bare_group(config, of: str, fn, *args) -> Group | None:
  """The group that times the matmuls of the float program fn(*args) alone, as written (the baseline) and as int8
  GEMMs (experiments/bench/kernels.py); its meta names the group `of` of the float program and its quantized
  versions, which the bound applies to. None when config.bare_kernels is off."""
  if not config.get('bare_kernels', True):
    return None
  ops = kernels.matmul_ops(fn, *args)
  progs = kernels.bare_programs(ops, config.get('seed', 0))
  variants = {}
  for name, key in kernels.BARE.items():
    f, a = progs[key]
    variants[name] = Variant(lambda f=f, a=a: f(*a), 'baseline' if name == kernels.FLOAT else 'reference',
                             {'inspect': maybe_inspect(config, f, *a)})
  return Group(f'{of} bare', variants, kernels.FLOAT, {'bare': {'of': of, **kernels.summary(ops)}})


@bench.register('e2e')
def e2e_suite(config) -> GroupedSuite:
  """Per model in config.models: a training group at config.train_batch (float step baseline; QAT int8 forward,
  QAT fake-quant forward, int8 training) and a serving group per batch in config.serve_batches (the char-LM:
  config.charlm's train_batch and serve_batches, in sequences; see CHARLM) (float forward
  baseline; PTQ int8 serving forward). Steps are jitted with the state donated, as experiments.train runs them.
  After each group, a '<group> bare' group times the float program's matmuls alone, as written and as int8 GEMMs
  (config.bare_kernels): the runner derives the bare int8 kernel's ratio on the model's own shapes and the bound
  it puts on the group's quantized variants (experiments/bench/kernels.py)."""

  def groups():
    for name in config.models:
      md = model_def(name, config)
      train_batch = charlm_config(config)['train_batch'] if name == 'char_lm' else config.train_batch
      serve_batches = charlm_config(config)['serve_batches'] if name == 'char_lm' else config.serve_batches
      x, y = random_batch(train_batch, config.get('seed', 0), name, config)
      variants = {'float step': train_variant(md, None, x, y, config, 'baseline')}
      variants['QAT, int8 forward'] = train_variant(md, quant_rules('qat', config), x, y, config, 'quantized')
      variants['QAT, fake-quant forward'] = train_variant(md, quant_rules('qat_fake', config), x, y, config,
                                                           'quantized')
      variants['int8 training (fwd + bwd int8)'] = train_variant(md, quant_rules('int8_train', config), x, y,
                                                                  config, 'quantized')
      for est in config.get('qat_estimators', ()):  # learned quantizer parameters (LSQ steps, PACT clips)
        variants[f'QAT {est}, int8 forward'] = train_variant(md, quant_rules(f'qat_{est}', config), x, y, config,
                                                             'quantized')
      targets = (Target('QAT, int8 forward', 0.75, 'QAT step with real int8 forward <= 0.75x float step'),
                 Target('QAT, fake-quant forward', 1.1, 'QAT step with fake-quant forward <= 1.1x float step'),
                 Target('int8 training (fwd + bwd int8)', 0.53,
                        'int8 fwd + quantized bwd step >= 1.9x faster than float (<= 0.53x)'))
      group = f'{name} train b{train_batch}'
      yield Group(group, variants, 'float step', {'model': name, 'batch': train_batch,
                                                  'hidden': list(config.mlp_hidden) if name == 'mlp' else None},
                  targets)
      base = variants['float step']
      del variants
      gc.collect()
      bare = bare_group(config, group, base.fn.step, base.fn.state, x, y)
      if bare is not None:
        yield bare
      del base, bare
      gc.collect()
      for b in serve_batches:
        xs, _ = random_batch(b, config.get('seed', 0) + 1, name, config)
        ff, fv = serving_forward(md, None, xs, config)
        qf, qv = serving_forward(md, quant_rules('ptq', config), xs, config)
        variants = {
            'float forward': Variant(lambda f=ff, v=fv, xs=xs: f(v, xs), 'baseline',
                                     {'inspect': maybe_inspect(config, ff, fv, xs)}),
            'PTQ int8 serving': Variant(lambda f=qf, v=qv, xs=xs: f(v, xs), 'quantized',
                                        {'inspect': maybe_inspect(config, qf, qv, xs),
                                         'param_bytes': summaries.tree_bytes(qv),
                                         'float_param_bytes': summaries.tree_bytes(fv)}),
        }
        targets = ((Target('PTQ int8 serving', 0.27, 'PTQ int8 serving forward, batch >= 256: <= 0.27x float'),)
                   if b >= 256 else ())
        group = f'{name} serve b{b}'
        yield Group(group, variants, 'float forward', {'model': name, 'batch': b}, targets)
        bare = bare_group(config, group, ff, fv, xs)
        if bare is not None:
          yield bare
        del variants, bare
    jax.clear_caches()

  kinds = ('qat', 'qat_fake', 'int8_train', 'ptq', *(f'qat_{e}' for e in config.get('qat_estimators', ())))
  rules = {k: [r.to_dict() for r in quant_rules(k, config)] for k in kinds}  # (bad estimator names fail here)
  meta = {'peers_time_ratio': PEERS, 'peers_note': PEERS_NOTE, 'rules': rules}
  return GroupedSuite('e2e', groups, meta=meta)
