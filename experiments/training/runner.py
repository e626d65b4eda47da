"""The experiment runner: float training, QAT, PTQ and quantized training from one config.

    python -m experiments.train --config=configs/fmnist_cnn.py --workdir=runs/cnn [--config.key=value ...]

config.mode:
  float                train the float model
  qat                  quantization-aware training by config.quant's rules (from scratch, or fine-tuned from
                       a float run given by config.init_from)
  ptq                  calibrate a float run's model on config.quant.calibration_batches batches, convert
                       (int8 / packed sub-byte weights), evaluate the serving model; the float run is
                       config.init_from, or trained (once, shared) under <workdir>/../_pretrained/.
                       config.ptq.method picks the method(s) ('rtn' default, 'gptq', 'awq', 'smoothquant',
                       'rotation', 'adaround', 'bias_correction', or 'a,b' in order; experiments/training/ptq.py)
  quantized_training   QAT with int8 gradients in the backward matmuls too (config.quant.grad, default int8)

Rerunning the same command resumes from the last checkpoint; a finished run is never overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from experiments import fileio, models, version
from experiments.config import cli as config_cli
from experiments.config import ptq as ptq_config
from experiments.config import quant as quant_config
from experiments.data import datasets
from experiments.data import pipeline as input_pipeline
from experiments.data.files import DATASETS, DataError
from experiments.fileio import write_json_atomic
from experiments.review.tensorboard import SummaryWriter, read_scalars
from experiments.training import checkpoints as ckpt_lib
from experiments.training import distributed, summaries, trainers
from experiments.training import ptq as ptq_runner
from experiments.training.progress import Progress
from qjax.flax import labels as qflax_labels
from qjax.flax.session import restart_ranges

MODES = ('float', 'qat', 'ptq', 'quantized_training')
# Each divides a step count (0 would be a ZeroDivisionError mid-run), or, num_train_steps, is the run: 0 steps
# wrote a finished result.json for an untrained model (a float baseline at chance accuracy).
POSITIVE_KEYS = ('num_train_steps', 'batch_size', 'eval_batch_size', 'log_every_steps', 'eval_every_steps',
                 'checkpoint_every_steps')


class RunError(RuntimeError):
  """A run that cannot proceed; the message says why and what is kept."""


class NonFiniteLoss(RunError):
  pass


# ------------------------------------------------------------------------------------------- optimizer


def make_optimizer(config) -> tuple[optax.GradientTransformation, Any]:
  """The optimizer of config.optimizer and its learning-rate schedule. Quantizer params (qjax.flax.labels) get
  learning_rate * quant_lr_scale and weight decay quant_weight_decay; the model's params weight_decay (adamw, sgd)."""
  o, steps = config.optimizer, config.num_train_steps
  lr = o.learning_rate
  if o.schedule == 'constant':
    sched = optax.constant_schedule(lr)
  elif o.schedule == 'cosine':
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(o.warmup_steps, steps - 1), max(steps, 1))
  else:
    raise config_cli.ConfigError(f'config.optimizer.schedule={o.schedule!r} is not one of constant, cosine')
  if o.name not in ('adam', 'adamw', 'sgd'):
    raise config_cli.ConfigError(f'config.optimizer.name={o.name!r} is not one of adam, adamw, sgd')
  if o.quant_lr_scale < 0 or o.quant_weight_decay < 0:
    raise config_cli.ConfigError('config.optimizer.quant_lr_scale and quant_weight_decay must be >= 0, got '
                                 f'{o.quant_lr_scale}, {o.quant_weight_decay}')

  def make(schedule, weight_decay):
    if o.name == 'adam':
      return optax.adam(schedule) if not weight_decay else optax.adamw(schedule, weight_decay=weight_decay)
    if o.name == 'adamw':
      return optax.adamw(schedule, weight_decay=weight_decay)
    tx = optax.sgd(schedule, momentum=o.momentum)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx

  model_wd = o.weight_decay if o.name != 'adam' else 0.0
  quant_sched = sched if o.quant_lr_scale == 1.0 else (lambda step: sched(step) * o.quant_lr_scale)
  tx = optax.multi_transform({qflax_labels.MODEL: make(sched, model_wd),
                              qflax_labels.QUANTIZER: make(quant_sched, o.quant_weight_decay)},
                             qflax_labels.quantizer_param_labels)
  if o.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
  return tx, sched


# ------------------------------------------------------------------------------------------ run files


def _check_workdir(config_dict: dict, workdir: str) -> dict | None:
  """Returns the finished result when this exact run is done; refuses to reuse a workdir for another config."""
  result = fileio.read_result(workdir)
  if result is not None:
    if result.get('config') == config_dict:
      return result
    raise RunError(f'{workdir} holds a finished run with a different config; it is kept as is. '
                   'Use another --workdir (or delete that directory) to run this config.')
  prior = fileio.read_json(os.path.join(workdir, 'config.json'))
  if prior is not None and prior != config_dict and fileio.checkpoint_steps(workdir):
    changed = config_cli.changed_keys(prior, config_dict)
    raise RunError(f'{workdir} holds checkpoints of a run with a different config (changed: {", ".join(changed)}); '
                   'resuming would mix the two. Use another --workdir.')
  return None


def environment() -> dict[str, Any]:
  flags = os.environ.get('XLA_FLAGS', '')
  env = {'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
         'flax': flax.__version__, 'device_kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
         'devices': jax.device_count(), 'processes': jax.process_count(), 'xla_flags': flags,
         'code': version.CODE}
  warning = distributed.xla_flag_warning(flags)
  if warning:
    env['xla_flags_warning'] = warning
  return env


# ------------------------------------------------------------------------------------------- pretrain


def float_config(config):
  """The float run a PTQ or fine-tuning run starts from (same data, model, seed, schedule)."""
  f = config.copy_and_resolve_references()
  with f.unlocked():
    f.mode = 'float'
    f.init_from = ''
    f.quant = quant_config.default_quant_config()
    f.ptq = ptq_config.default_config()
    f.num_train_steps = config.pretrain_steps if config.pretrain_steps > 0 else config.num_train_steps
  return f


def _pretrained_dir(config, workdir: str) -> str:
  fc = config_cli.to_dict(float_config(config))
  key = hashlib.sha256(json.dumps(fc, sort_keys=True, default=str).encode()).hexdigest()[:12]
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), '_pretrained', f'{config.model.name}-{key}')


def load_float_state(config, workdir: str, trainer_float, sample_x, log) -> Any:
  """The final state of the float run this run starts from (training it first when needed)."""
  src = config.init_from
  if not src:  # one process trains it; the others wait on its claim, as sweep trials wait for a trial_ref
    src = _pretrained_dir(config, workdir)
    claim = fileio.Claim.acquire(src, wait=True)
    try:
      log(f'float model for this run: {src}')
      if fileio.read_result(src) is None:
        train_and_evaluate(float_config(config), src, log=log, write_hparams=False)
    finally:
      claim.release()
  result = fileio.read_result(src)
  if result is None:
    raise RunError(f'config.init_from={src!r} is not a finished run (no valid result.json)')
  mode = (result.get('config') or {}).get('mode', 'float')
  if mode != 'float':
    # Its checkpoint holds quantizer state and a differently shaped tree, which orbax would reject with a
    # tree-structure dump instead of saying why.
    raise RunError(f'config.init_from={src!r} is a mode={mode!r} run; init_from takes the weights of a float run '
                   "(mode='float'), e.g. a sweep's mode=float trial")
  template = trainer_float.init(jax.random.key(0), sample_x)
  mgr = ckpt_lib.Checkpoints(os.path.join(src, 'checkpoints'))
  step = mgr.latest_step()
  if step is None:
    raise RunError(f'config.init_from={src!r} has no checkpoint')
  restored = mgr.restore(step, trainer_float.to_pure(template))
  mgr.close()
  return restored


# ---------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
  config: Any
  workdir: str
  data: input_pipeline.Dataset
  md: models.ModelDef
  trainer: Any
  mesh: Any
  writer: Any
  log: Any
  write_hparams: bool = True
  group_name: str | None = None   # the HParams session group (a sweep's labels); None: a hash of the hparams

  def batch(self, step: int):
    x, y = input_pipeline.train_batch(self.data, self.config.seed, step, self.config.batch_size)
    return distributed.shard_batch(self.mesh, x), distributed.shard_batch(self.mesh, y)

  def evaluate(self, state, eval_step) -> dict[str, float]:
    metrics = trainers.evaluate(
        self.data, self.config,
        lambda x, y, w: eval_step(state, *(distributed.shard_batch(self.mesh, a) for a in (x, y, w))),
        self.md.task)
    return metrics


def validate(config):
  """Checks what can be checked before any data loads or file is written: the mode, the optimizer and the quant
  rules (QuantSpec fields); returns (rules or None, optimizer, schedule). A mistake is a ConfigError naming the key.
  """
  if config.mode not in MODES:
    raise config_cli.ConfigError(f'config.mode={config.mode!r} is not one of {", ".join(MODES)}'
                                 f'{config_cli.did_you_mean(config.mode, MODES)}')
  tx, sched = make_optimizer(config)
  try:
    models.build(config.model)  # the name and the model's own fields (LeNet5's activation); no params made
  except ValueError as e:
    raise config_cli.ConfigError(f'config.model: {e}') from None
  _check_data(config)
  for key in POSITIVE_KEYS:
    if not config[key] >= 1:
      raise config_cli.ConfigError(f'config.{key}={config[key]!r} must be >= 1')
  if not config.pretrain_steps >= 0:  # 0 means num_train_steps; a negative count meant it silently too
    raise config_cli.ConfigError(f'config.pretrain_steps={config.pretrain_steps!r} must be >= 0 (0: '
                                 'num_train_steps)')
  if config.mode == 'float':
    return None, tx, sched
  quant = config.quant
  if config.mode == 'quantized_training' and not quant.grad.format:
    quant = quant.copy_and_resolve_references()
    quant.grad.format = 'int8'
  try:
    if config.mode == 'ptq' and 'ptq' in config:
      ptq_config.methods(config.ptq)  # the method list and its options, checked before anything runs
    return quant_config.build_rules(quant, ptq=config.mode == 'ptq'), tx, sched
  except ValueError as e:
    raise config_cli.ConfigError(str(e)) from None


def _check_data(config) -> None:
  """The dataset, its source and $QJAX_DATA_SOURCE, checked before any trial starts: 'fmnist' would fail only once
  the data load, and data_source='fixture' would silently load the full dataset."""
  if config.dataset not in DATASETS:
    raise config_cli.ConfigError(f'config.dataset={config.dataset!r} is not one of {", ".join(DATASETS)}'
                                 f'{config_cli.did_you_mean(config.dataset, DATASETS)}')
  if config.data_source not in input_pipeline.SOURCES:
    raise config_cli.ConfigError(f'config.data_source={config.data_source!r} is not one of '
                                 f'{", ".join(input_pipeline.SOURCES)}'
                                 f'{config_cli.did_you_mean(config.data_source, input_pipeline.SOURCES)}')
  try:
    datasets.env_source()
  except DataError as e:
    raise config_cli.ConfigError(str(e)) from None


def _setup(config, workdir, log):
  mesh = distributed.make_mesh(config.mesh)
  if config.batch_size % mesh.shape['data'] or config.eval_batch_size % mesh.shape['data']:
    raise config_cli.ConfigError(f'config.batch_size={config.batch_size} and eval_batch_size='
                                f'{config.eval_batch_size} must divide over {mesh.shape["data"]} data-parallel devices')
  data = input_pipeline.load(config)
  md = models.build(config.model, num_classes=data.num_classes, vocab_size=len(data.vocab), seq_len=data.seq_len)
  return mesh, data, md


def train_and_evaluate(config, workdir: str, *, log=print, write_hparams: bool = True,
                       group_name: str | None = None) -> dict[str, Any]:
  """Runs (or resumes, or returns the finished result of) the run that `config` describes in `workdir`.

  write_hparams=False keeps the run out of TensorBoard's HParams dashboard (a helper float run of a PTQ trial);
  group_name names its HParams session group (a sweep passes the trial's labels without the seed).
  """
  workdir = os.path.abspath(workdir)
  config_dict = json.loads(json.dumps(config_cli.to_dict(config)))  # as result.json will hold it (tuples -> lists)
  done = _check_workdir(config_dict, workdir)
  if done is not None:
    log(f'{workdir}: finished already (result.json kept); {summaries.one_line(done)}')
    return done
  rules, tx, sched = validate(config)
  lead = jax.process_index() == 0
  if lead:
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, 'config.json'), config_dict)
  t_start = time.time()
  warnings = []
  mesh, data, md = _setup(config, workdir, log)
  mode = config.mode
  sample_x = input_pipeline.sample_input(data, config.batch_size)
  float_pure = None
  if mode == 'ptq' or config.init_from:
    float_pure = load_float_state(config, workdir, trainers.make(md, tx), sample_x, log)
  prepared = {}
  if mode == 'ptq' and ptq_config.prepares(config):  # before quantizing: every later step sees the new weights
    float_pure, prepared = trainers.make(md, tx).ptq_prepare(
        float_pure, sample_x, config.ptq.get('fold_batchnorm', False), config.ptq.get('equalize', False))
    for step, what in prepared.items():
      fold = step == 'batchnorm_folding'
      done = what.folded if fold else what.equalized
      if not done and not what.skipped:
        log(f'{step.replace("_", " ")}: ' + ('the model has no BatchNorm' if fold else
                                            'the model has no two consecutive Flax Dense / Conv layers'))
        continue
      log(f'{step.replace("_", " ")}: {len(done)} of {len(done) + len(what.skipped)}'
          + ''.join(f'\n  not {"folded" if fold else "equalized"}: {n} ({why})' for n, why in what.skipped.items()))
  trainer = trainers.make(md, tx, rules)
  state = trainer.init(jax.random.key(config.seed), jnp.asarray(sample_x), float_pure)
  state = distributed.place_state(mesh, state, config.mesh)
  writer = SummaryWriter(workdir) if lead else summaries.NullWriter()
  run = Run(config, workdir, data, md, trainer, mesh, writer, log, write_hparams, group_name)
  try:
    if mode == 'ptq':
      train_info = {'steps': 0, 'steps_per_sec': 0.0}
      train_info.update({step: what._asdict() for step, what in prepared.items()})
      if 'ptq' in config and ptq_config.active(config):
        state, train_info['ptq'] = ptq_runner.apply(run, state)
      state = _calibrate(run, state)
      if 'ptq' in train_info:
        ptq_runner.act_error_layers(run, state, train_info['ptq'])
    else:
      state, train_info = _train(run, state, sched)
    warnings += train_info.pop('warnings', [])
    result = _finish(run, state, train_info, rules, t_start)
    if 'serving_error' in result:
      warnings.append(f'not served: {result["serving_error"]}')
    result['warnings'] = warnings
  except KeyboardInterrupt:
    # Interrupted (Ctrl-C, or the sweep's SIGTERM): no session end, since the rerun resumes the run and ends
    # the session then; TensorBoard keeps the first end it finds, and 'failure' would stay when the run finished.
    writer.close(status=None)
    raise
  except BaseException:
    writer.close(status='failure')
    raise
  writer.close(status='success')
  if lead:
    write_json_atomic(os.path.join(workdir, 'result.json'), {**result, 'config': config_dict})
  log(summaries.one_line(result))
  return {**result, 'config': config_dict}


def _train(run: Run, state, sched):
  c = run.config
  total = c.num_train_steps
  mgr = ckpt_lib.Checkpoints(os.path.join(run.workdir, 'checkpoints'), max_to_keep=c.checkpoint_keep)
  start = mgr.latest_step() or 0
  if start:
    pure = mgr.restore(start, run.trainer.to_pure(state))
    state = distributed.place_state(run.mesh, run.trainer.from_pure(state, pure), c.mesh)
    run.log(f'resuming {run.workdir} from step {start}')
    if jax.process_index() == 0 and run.write_hparams:
      run.writer.continue_session()  # its first segment started it
  elif jax.process_index() == 0 and run.write_hparams:
    run.writer.hparams(summaries.hparams_of(c), group_name=run.group_name)
  train_step = jax.jit(run.trainer.train_step, donate_argnums=0)
  eval_step = jax.jit(run.trainer.eval_step)
  progress = Progress(total, start)
  t0, step_times = time.time(), []
  loss = float('nan')
  watch = LossWatch(run.log)
  done = start  # the steps `state` holds
  with contextlib.closing(mgr), _checkpoint_on_interrupt(run, mgr, lambda: (state, done)):
    for step in range(start, total):
      x, y = run.batch(step)
      last = step + 1 == total
      save = (step + 1) % c.checkpoint_every_steps == 0 or last
      sync = (step + 1) % c.log_every_steps == 0 or last or save or step == start  # the first: where it starts
      if sync:  # time this one step alone: wait for the steps dispatched before it
        jax.block_until_ready(state)
      ts = time.time()
      with ckpt_lib.signals_deferred():  # an interrupt waits for the step: its donated input is gone until it returns
        state, m = train_step(state, x, y)
        done = step + 1
      if sync:
        loss = float(m['loss'])  # waits for the step
        if not math.isfinite(loss):
          raise _non_finite(f'non-finite loss ({loss})', step + 1, mgr)
        watch.update(step + 1, loss)
        step_times.append(time.time() - ts)
        rate = (step + 1 - start) / (time.time() - t0)
        run.writer.scalars({'train/loss': loss, 'train/accuracy': float(m['accuracy']),
                            'train/learning_rate': float(sched(step)), 'time/steps_per_sec': rate}, step + 1)
        progress.update(step + 1, loss=loss)
      if (step + 1) % c.eval_every_steps == 0 or last:
        metrics = run.evaluate(state, eval_step)
        run.writer.scalars(metrics, step + 1)
        summaries.quant_summaries(run, state, step + 1)
      if save:
        pure = run.trainer.to_pure(state)
        bad = non_finite_leaves(pure)
        if bad:  # the loss was computed before the update; the state saved is the one after it
          raise _non_finite(f'{len(bad)} non-finite parameter or state arrays ({", ".join(bad[:3])})', step + 1, mgr)
        mgr.save(step + 1, pure)
  progress.close()
  elapsed = time.time() - t0
  steady = step_times[1:] or step_times  # the first timed step may include compilation
  if start >= total and jax.process_index() == 0:
    # Resumed from the final checkpoint (stopped after it, before result.json): this segment ran no step. The
    # loss is the last one the run logged, and its speed unknown (None), rather than NaN and 0 steps/s.
    run.writer.flush()
    logged = read_scalars(run.workdir).get('train/loss') or [(0, float('nan'))]
    loss = logged[-1][1]
  # steps: the run's total (a resumed run included); steps_per_sec: of this process's segment, which it timed.
  return state, {'steps': total, 'resumed_from': start,
                 'steps_per_sec': (total - start) / elapsed if elapsed > 0 and total > start else None,
                 'final_train_loss': loss, 'step_time_ms': 1e3 * float(np.median(steady)) if steady else None,
                 'warnings': watch.finish(loss)}


@contextlib.contextmanager
def _checkpoint_on_interrupt(run: Run, mgr, current):
  """On Ctrl-C or SIGTERM (a sweep stopping its workers, a scheduler's preemption) mid-training: saves the state
  of the last finished step, `current()` -> (state, steps), when it is newer than the last checkpoint, so the
  rerun resumes there rather than at the last periodic checkpoint. One-process runs only (a multi-process save
  needs every process)."""
  try:
    yield
  except KeyboardInterrupt:
    state, step = current()
    if jax.process_count() == 1 and step > (mgr.latest_step() or 0):
      try:
        pure = run.trainer.to_pure(state)
        if not non_finite_leaves(pure):
          mgr.save(step, pure)
          run.log(f'interrupted: saved a checkpoint at step {step}')
      except (RuntimeError, ValueError) as e:  # the state's buffers were donated to a step that never returned
        run.log(f'interrupted: no checkpoint at step {step} ({type(e).__name__}: {str(e)[:80]})')
    raise


def non_finite_leaves(tree) -> list[str]:
  """The paths of the floating-point arrays in `tree` holding a NaN or an infinity."""
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, 'dtype') and jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all()):
      bad.append(jax.tree_util.keystr(path, simple=True, separator='/'))
  return bad


def _non_finite(what: str, step: int, mgr) -> NonFiniteLoss:
  """The error of a run that diverged at `step`: what is kept and how to go on."""
  kept = mgr.latest_step()
  where = (f'The last good checkpoint (step {kept}) is kept in {mgr.directory}; rerunning resumes from it, so '
           if kept is not None else f'No checkpoint was saved before it (nothing in {mgr.directory}); ')
  return NonFiniteLoss(f'{what} at step {step}: the run stops here. {where}change the config (e.g. a lower '
                       'optimizer.learning_rate) in a new --workdir.')


class LossWatch:
  """Warns (once each) when the training loss grows by orders of magnitude, or ends far above where it began.

  A finite but exploding loss otherwise ends as a finished run at chance accuracy without a word.
  """

  GROWTH = 1e3   # a logged loss this many times the first one: diverging
  WORSE = 2.0    # a final loss this many times the first one: the run ended far worse than it started

  def __init__(self, log):
    self.log, self.first, self.warnings = log, None, []

  def update(self, step: int, loss: float) -> None:
    if self.first is None:
      self.first = (step, loss)
    elif not self.warnings and self.first[1] > 0 and loss > self.GROWTH * self.first[1]:
      self._warn(f'the training loss grew from {self.first[1]:.4g} (step {self.first[0]}) to {loss:.4g} (step '
                 f'{step}), by {math.log10(loss / self.first[1]):.0f} orders of magnitude: the run is diverging; '
                 'a lower optimizer.learning_rate (or optimizer.grad_clip) may help')

  def finish(self, loss: float) -> list[str]:
    if self.first is not None and self.first[0] > 0 and self.first[1] > 0 and loss > self.WORSE * self.first[1]:
      self._warn(f'the run ends far worse than it started: final training loss {loss:.4g}, first logged '
                 f'{self.first[1]:.4g} (step {self.first[0]}); its results are likely at chance')
    return self.warnings

  def _warn(self, text: str) -> None:
    self.warnings.append(text)
    self.log(f'warning: {text}')


def _calibrate(run: Run, state):
  """PTQ: range statistics from calibration batches (no parameter changes): the mean over the batches of the
  model as served, so ranges measured before (the init batch, or the model before SmoothQuant, AWQ or a rotation
  changed its layers' inputs) start over."""
  c = run.config
  state = restart_ranges(state)
  step_fn = jax.jit(run.trainer.calibrate_step)
  for i in range(c.quant.calibration_batches):
    x, _ = run.batch(i)
    state = step_fn(state, x)
  if run.write_hparams:
    run.writer.hparams(summaries.hparams_of(c), group_name=run.group_name)
  return state


def _finish(run: Run, state, train_info, rules, t_start) -> dict[str, Any]:
  c = run.config
  step = c.num_train_steps if c.mode != 'ptq' else 0
  if 'ptq' in train_info:  # a PTQ method's integer kernels exist only in the serving model: evaluate that
    serving = summaries.serving_summary(run, state, rules)
    metrics = dict(serving['serving_metrics'])
  else:
    metrics = run.evaluate(state, jax.jit(run.trainer.eval_step))
    serving = summaries.serving_summary(run, state, rules)
  run.writer.scalars(metrics, step)
  layers = summaries.quant_summaries(run, state, step)
  if serving_scalars(serving):
    run.writer.scalars(serving_scalars(serving), step)
  return {
      'mode': c.mode, 'model': c.model.name, 'dataset': c.dataset,
      'metrics': metrics, **serving, 'layers': layers,
      'train': train_info, 'wall_time_sec': time.time() - t_start,
      'environment': environment(), 'rules': [r.to_dict() for r in rules] if rules else [],
  }


FLAGS = {
    'workdir': '=<dir>: the run directory (created; rerunning the command resumes the run there)',
    'coordinator_address': '=host:port, --num_processes=N, --process_id=i: join a multi-process run',
}


def serving_scalars(serving: dict[str, Any]) -> dict[str, float]:
  """The served model's figures as scalars (HParams metrics beside eval/*): its metrics, bytes, latency as a ratio
  to the float model timed side by side, and the number of int8 matmuls."""
  out = {f'serving/{k.split("/")[-1]}': v for k, v in (serving.get('serving_metrics') or {}).items()}
  if serving.get('serving_bytes') is not None:
    out['serving/bytes'] = serving['serving_bytes']
  ratio = (serving.get('latency') or {}).get('ratio_to_float')
  if ratio is not None:
    out['serving/latency_vs_float'] = ratio
  if 'int8' in (serving.get('matmuls') or {}):
    out['serving/int8_matmuls'] = serving['matmuls']['int8']
  return out


def main(argv: list[str]) -> int:
  if config_cli.wants_help(argv):
    print(config_cli.help_text(__doc__, FLAGS, argv))
    return 0
  config, flags = config_cli.parse_argv(argv)
  config_cli.check_flags(flags, ('workdir',) + distributed.FLAGS)
  for unused in (config_cli.unused_in_float(config, config_cli.override_keys(argv)),
                 ptq_config.unused(config, config_cli.override_keys(argv))):
    if unused:
      print(f'warning: {unused}', file=sys.stderr)
  workdir = flags.pop('workdir', None)
  if not workdir:
    raise config_cli.ConfigError('missing --workdir=<dir>')
  validate(config)
  workdir = config_cli.writable_dir(workdir, 'workdir')
  distributed.initialize(flags)
  # One run per workdir, as sweep trials claim theirs: a second `experiments.train` on the same workdir would
  # write the same checkpoints and result. Only the first process of a multi-process run claims it (the others
  # share its workdir).
  claim = fileio.Claim.acquire(workdir) if jax.process_index() == 0 else None
  if claim is None and jax.process_index() == 0:
    print(f'error: --workdir={workdir} is being run by {fileio.Claim.holder(workdir)}; wait for that run to end '
          '(rerunning then resumes or keeps its result), or give another --workdir', file=sys.stderr)
    return 3
  signal.signal(signal.SIGTERM, _raise_interrupt)  # a scheduler's stop: checkpoint, then exit, as for Ctrl-C
  try:
    train_and_evaluate(config, workdir)
  except RunError as e:
    print(f'error: {e}', file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    raise KeyboardInterrupt(f'{saved(workdir)}; rerun the same command to resume') from None
  except OSError as e:
    if config_cli.debug_requested():
      raise
    print(f'error: {config_cli.os_error_text(e)}; {saved(workdir)}; rerun the same command to resume once that is '
          'fixed', file=sys.stderr)
    return 1
  finally:
    if claim is not None:
      claim.release()
  return 0


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt(f'signal {signum}')


def saved(workdir: str) -> str:
  """What a stopped run left in `workdir`, in words: its finished result, or its last checkpoint."""
  if fileio.read_result(workdir) is not None:
    return f'the finished result is kept in {workdir}/result.json'
  steps = fileio.checkpoint_steps(workdir)
  if steps:
    return f'checkpoints up to step {steps[-1]} are kept in {os.path.join(workdir, "checkpoints")}'
  return f'no checkpoint was saved yet in {workdir}'
