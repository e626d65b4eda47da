"""Train/eval steps for Linen and NNX models behind one interface, with or without qjax rules.

A trainer owns the model and the optimizer and exposes pure, jitted functions over a state pytree:

    state = trainer.init(rng, sample_x)
    state, metrics = trainer.train_step(state, x, y)          # metrics: loss (and accuracy)
    sums = trainer.eval_step(state, x, y, w)                   # weighted sums: loss, correct, count
    trainer.calibrate_step(state, x) -> state                  # PTQ: update range statistics only

State is a pytree of arrays: Linen {'params', 'opt', 'vars'}; NNX an `NnxState`, the nnx.State of the model and
its optimizer with their graph (and the quantization it carries) as static data, so that `init` leaves the trainer
as it was. `to_pure(state)` is the plain dict orbax checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.data import pipeline as input_pipeline
from experiments.models import ModelDef
from qjax import flax as qflax
from qjax.flax import QuantizedLinen, capture, convert_linen, convert_nnx
from qjax.flax.intercept import STATS, ServingWeight
from qjax.ptq import batchnorm, equalization, online


def loss_fn(logits, y, task: str):
  """Mean cross-entropy over examples (and positions for LMs); also per-example losses and hits."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)  # (batch[, seq])
  hits = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
  if task == 'lm':
    ce, hits = ce.mean(-1), hits.mean(-1)
  return ce.mean(), ce, hits


def evaluate(data, config, batch_sums: Callable[[Any, Any, Any], Mapping[str, Any]],
             task: str = 'classify') -> dict[str, float]:
  """Mean eval loss and accuracy over the eval split (and for task 'lm' bits per character, loss / ln 2: the LM
  reports' headline metric, for the trained and the served model alike): `batch_sums(x, y, w)` gives one batch's
  weighted sums {'loss', 'correct', 'count'} (an `eval_step`, or a serving forward's), added up in float over
  `input_pipeline.eval_batches(data, config.eval_batch_size, config.eval_examples)`. The one eval loop the
  training run and the serving summary share, so both read the same examples and divide the same way.
  """
  sums = {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  for x, y, w in input_pipeline.eval_batches(data, config.eval_batch_size, config.eval_examples):
    out = batch_sums(x, y, w)
    for k in sums:
      sums[k] += float(out[k])
  n = max(sums['count'], 1.0)
  out = {'eval/loss': sums['loss'] / n, 'eval/accuracy': sums['correct'] / n}
  if task == 'lm':
    out['eval/bits_per_char'] = out['eval/loss'] / math.log(2)
  return out


def jit_once(fn):
  """jax.jit for a program that runs once per run, a Linen model's init: on XLA:CPU its LLVM code generation at
  -O1 instead of the default, unless XLA_FLAGS sets a level (the tests' -O0).

  Why: at the default level LLVM fully unrolls the loops over a conv kernel's small spatial dims, inside the
  random-number generator (threefry) of each kernel's initializer, and compiling the program dominates a short
  run. Measured ad hoc on a 2-core AMD EPYC Zen 3 (jax 0.12.0.1): the init of configs/fmnist_resnet.py's ResNet
  compiled and ran in 7.5 s at the default level and 1.7 s at -O1, LeNet-5's in 2.5 s and 0.9 s; at -O1 the
  initial values are bit for bit the same (tests/test_trainers.py checks it; -O0 changes them by an ulp)."""
  if jax.default_backend() != 'cpu' or 'xla_backend_optimization_level' in os.environ.get('XLA_FLAGS', ''):
    return jax.jit(fn)
  return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 1})


def _needs_rng(rules) -> bool:
  """The rules round stochastically or use a method that is random in training (QDrop)."""
  return bool(rules) and (qflax.RuleSet(rules) if not isinstance(rules, qflax.RuleSet) else rules).needs_rng


class LinenTrainer:
  """Linen models; the state is {'params', 'opt', 'vars'} (+ 'rng' when the rules need random numbers in
  training: a key split once per step into the 'quant' stream, so a resumed run draws what it would have)."""

  def __init__(self, md: ModelDef, tx: optax.GradientTransformation, rules=None):
    self.md, self.tx = md, tx
    self.q = qflax.quantize_linen(md.module, rules) if rules else None
    self.needs_rng = _needs_rng(rules)
    self.ptq_weights = {}  # a PTQ method's integer kernels for serving (experiments/training/ptq.py)

  @property
  def quantized(self) -> bool:
    return self.q is not None

  def _apply(self, variables, x, train, mutable=False, rngs=None):
    fn = self.q.apply if self.q is not None else self.md.module.apply
    return fn(variables, x, train=train, mutable=mutable, rngs=rngs)

  def init(self, rng, x, float_pure=None) -> dict[str, Any]:
    """Fresh state; with `float_pure` (a float run's state) its params and collections are loaded first,
    so learned quantizer parameters initialise from the pretrained weights."""
    fn = self.q.init if self.q is not None else self.md.module.init
    if float_pure is not None:
      float_vars = {'params': float_pure['params'],
                    **{k: v for k, v in float_pure['vars'].items() if k != STATS}}
    if self.q is not None:  # on concrete data, outside jit (act_signedness='auto' measures activations)
      if float_pure is None:
        self.q.prepare('init', rng, x, train=False)
      else:
        self.q.prepare('apply', float_vars, x, train=False)
    if float_pure is None:
      variables = dict(jit_once(lambda rng, x: fn(rng, x, train=False))(rng, x))
    elif self.q is not None:  # creates the missing quantizer params/stats from the loaded weights
      create = lambda v, x, rng: self.q.apply(v, x, train=False, mutable=True, rngs={'params': rng})
      variables = dict(jit_once(create)(float_vars, x, rng)[1])
    else:
      variables = float_vars
    if self.q is not None and self.q.rules.learns:  # else the params are the model's own, in either mode
      variables['params'] = self._params_as_in_training(rng, x, float_vars if float_pure is not None else None)
    params = variables.pop('params')
    state = {'params': params, 'opt': self.tx.init(params), 'vars': dict(variables)}
    if self.needs_rng:
      key = jax.random.fold_in(rng, 0x71)  # stored raw (uint32): checkpoints hold no typed keys
      state['rng'] = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return state

  def _params_as_in_training(self, rng, x, float_vars):
    """The params with the learned quantizer params (LSQ steps, PACT clips, ...) initialised in training mode, on
    the activations the first training step sees: BatchNorm normalises by the batch's statistics there, by its
    running averages in evaluation mode. The two differ most where the weight quantizer rescales a kernel (DoReFa
    maps weights onto [-1, 1]: the running averages of a float model are then off by that factor, and a clip
    initialised from them sits several times above the activations training sees). Only params are taken from
    this run (nothing else it changed, batch statistics or quantizer statistics, is kept); NNX's quantize_nnx
    creates its quantizer state in the model's own mode, training by default, as here."""
    if float_vars is None:
      return jit_once(lambda rng, x: self.q.init(rng, x, train=True))(rng, x)['params']
    create = lambda v, x, rng: self.q.apply(v, x, train=True, mutable=True, rngs={'params': rng})
    return jit_once(create)(float_vars, x, rng)[1]['params']

  def to_pure(self, state) -> dict:
    return state

  def from_pure(self, template, pure):
    return pure

  def train_step(self, state, x, y):
    mutable = list(state['vars'].keys())
    rngs, out = None, {}
    if 'rng' in state:
      out['rng'], key = jax.random.split(state['rng'])
      rngs = {'quant': key}

    def loss(params):
      logits, upd = self._apply({'params': params, **state['vars']}, x, True, mutable, rngs=rngs)
      mean, _, hits = loss_fn(logits, y, self.md.task)
      return mean, (upd, hits.mean())
    (value, (upd, acc)), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
    updates, opt = self.tx.update(grads, state['opt'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    out.update({'params': params, 'opt': opt, 'vars': {**state['vars'], **upd}})
    return out, {'loss': value, 'accuracy': acc}

  def eval_step(self, state, x, y, w):
    logits = self._apply({'params': state['params'], **state['vars']}, x, False)
    _, ce, hits = loss_fn(logits, y, self.md.task)
    return {'loss': jnp.sum(ce * w), 'correct': jnp.sum(hits * w), 'count': jnp.sum(w)}

  def calibrate_step(self, state, x):
    _, upd = self._apply({'params': state['params'], **state['vars']}, x, False, [STATS])
    return {**state, 'vars': {**state['vars'], **upd}}

  def variables(self, state):
    return {'params': state['params'], **state['vars']}

  def float_variables(self, state):
    return {'params': state['params'], **{k: v for k, v in state['vars'].items() if k != STATS}}

  # ------------------------------------------------------------------ what reviews and PTQ ask of any trainer

  def ruleset(self, state):
    """The rules as applied (qjax.flax's RuleSet), None for a float trainer."""
    return None if self.q is None else self.q.rules

  def float_params(self, state):
    """The model's params as held in float (the quantizer variables not included)."""
    return state['params']

  def eval_forward(self, state):
    """(forward(*args, x), args): the unquantized model in evaluation mode."""
    return (lambda v, x: self.md.module.apply(v, x, train=False)), (self.variables(state),)

  def records(self, state, x) -> list:
    """qjax's records of one forward in evaluation mode: per quantized operand its spec, state and values."""
    return self.q.records(self.variables(state), x, train=False, compiled=True)

  def convert(self, state, x):
    """The model converted for serving (int8 / packed ServingWeights), run once on x: the serving variables."""
    return convert_linen(self.q, self.variables(state), x, train=False)

  def serving_forward(self, served):
    """(forward(*args, x), args, served params, serving tree) of a converted model (`convert`)."""
    srv = self.q.serving()
    return (lambda v, x: srv.apply(v, x, train=False)), (served,), served['params'], served

  def kernels(self, state) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """{module path: (kernel, bias)} of every module holding a 'kernel' param (float, any rank)."""
    out = {}

    def walk(node, path):
      if 'kernel' in node and not isinstance(node['kernel'], dict):
        out['/'.join(path)] = (np.asarray(node['kernel']), None if 'bias' not in node else np.asarray(node['bias']))
      for k, v in node.items():
        if isinstance(v, dict) or hasattr(v, 'items'):
          walk(v, path + [k])
    walk(state['params'], [])
    return out

  # ------------------------------------------------- what PTQ methods ask of any trainer (experiments/training/ptq.py)

  def capture(self, state, batches, **capture_kwargs):
    """qjax.flax.capture's calibration statistics per quantized op ({key: (OpSite, OpStats)}) of the model in
    evaluation mode (run in float) on `batches` (model inputs); capture_kwargs: stats, max_sample,
    conv_features."""
    return capture.capture_linen(self.q, self.variables(state), batches, train=False, **capture_kwargs)

  def ptq_update(self, state, layers, transforms, probe_x=None):
    """The state with each module's kernel and bias replaced ({path: (kernel, bias or None)}, any shape that
    reshapes to the stored one), and the online ops ({path: qjax.ptq.online.Online}) in the model. With
    `probe_x` (model inputs) the rules' probe runs again on the new model: an online rotation makes a
    non-negative input signed, which act_signedness='auto' must see."""
    params = jax.tree.map(lambda a: a, _plain(state['params']))
    for path, (w, b) in layers.items():
      node = _node(params, path)
      node['kernel'] = jnp.asarray(w, node['kernel'].dtype).reshape(node['kernel'].shape)
      if b is not None:
        node['bias'] = jnp.asarray(b, node['bias'].dtype).reshape(node['bias'].shape)
    model = self.q.model.model if isinstance(self.q.model, online.OnlineOps) else self.q.model
    self.q = QuantizedLinen(online.OnlineOps(model, transforms), self.q.rules)
    if probe_x is not None:
      self.q.reprobe('apply', {'params': params, **state['vars']}, jnp.asarray(probe_x), train=False)
    return {**state, 'params': params}

  def ptq_prepare(self, pure, x, fold: bool = False, equalize: bool = False):
    """(a float run's state (`to_pure`) with its BatchNorms folded into their layers (qjax.ptq.batchnorm) and then
    consecutive layers equalized (qjax.ptq.equalization), {'batchnorm_folding': Folding, 'equalization':
    Equalization} of the steps asked), each checked on the model inputs x in evaluation mode."""
    variables, info = {'params': pure['params'], **pure['vars']}, {}
    if fold:
      variables, info['batchnorm_folding'] = batchnorm.fold_linen(self.md.module, variables, jnp.asarray(x),
                                                                  train=False)
    if equalize:
      variables, info['equalization'] = equalization.equalize_linen(self.md.module, variables, jnp.asarray(x),
                                                                    train=False)
    return {**pure, 'params': variables.pop('params'), 'vars': {**pure['vars'], **variables}}, info

  def ptq_serve(self, served, qs) -> None:
    """Puts the methods' integer kernels ({path: QArray in the kernel's shape}) into the serving variables
    (`convert`), in place: the format and packing the conversion chose."""
    for path, q in qs.items():
      node = _node(served['params'], path)
      old = node['kernel']
      node['kernel'] = ServingWeight.from_qarray(q, old.packed, transpose=old.transposed)


@jax.tree_util.register_pytree_node_class
class NnxState:
  """An NNX trainer's state: `state` (the nnx.State of (model, optimizer)) as the pytree's children, `graphdef` and
  `quantized` (what quantize_nnx returned, None for a float model) as its static data."""

  def __init__(self, graphdef, state, quantized=None):
    self.graphdef, self.state, self.quantized = graphdef, state, quantized

  def tree_flatten(self):
    return (self.state,), (self.graphdef, self.quantized)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(aux[0], children[0], aux[1])

  def merge(self):
    """(model, optimizer), rebuilt from the graph and the state."""
    return nnx.merge(self.graphdef, self.state)

  def replace(self, model_and_opt) -> NnxState:
    graphdef, state = nnx.split(model_and_opt)
    return NnxState(graphdef, state, self.quantized)


class NnxTrainer:
  """NNX models as (graphdef, state): steps merge, run, and split again; the state is an `NnxState` pytree."""

  def __init__(self, md: ModelDef, tx: optax.GradientTransformation, rules=None):
    self.md, self.tx, self.rules = md, tx, rules
    self.ptq_weights = {}  # a PTQ method's integer kernels for serving (experiments/training/ptq.py)

  @property
  def quantized(self) -> bool:
    return bool(self.rules)

  def init(self, rng, x, float_pure=None) -> NnxState:
    """Fresh state; with `float_pure` (a float run's pure state) the weights are loaded before quantizing,
    so learned quantizer parameters initialise from the pretrained weights."""
    seed = int(jax.random.randint(rng, (), 0, 2 ** 31 - 1))
    model = self.md.make(nnx.Rngs(seed))
    if float_pure is not None:
      graphdef, st = nnx.split(model)
      pure = _overlay(nnx.to_pure_dict(st), float_pure[0])
      nnx.replace_by_pure_dict(st, pure)
      model = nnx.merge(graphdef, st)
    quantized = qflax.quantize_nnx(model, self.rules, jnp.asarray(x),
                                   seed=seed if _needs_rng(self.rules) else None) if self.rules else None
    graphdef, state = nnx.split((model, nnx.Optimizer(model, self.tx, wrt=nnx.Param)))
    return NnxState(graphdef, state, quantized)

  def to_pure(self, state: NnxState) -> dict:
    return nnx.to_pure_dict(state.state)

  def from_pure(self, template: NnxState, pure) -> NnxState:
    s = jax.tree.map(lambda a: a, template)
    nnx.replace_by_pure_dict(s.state, pure)
    return s

  def train_step(self, state: NnxState, x, y):
    model, opt = state.merge()
    model.train()

    def loss(m):
      mean, _, hits = loss_fn(m(x), y, self.md.task)
      return mean, hits.mean()
    (value, acc), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    opt.update(model, grads)
    return state.replace((model, opt)), {'loss': value, 'accuracy': acc}

  def eval_step(self, state: NnxState, x, y, w):
    model, _ = state.merge()
    model.eval()
    _, ce, hits = loss_fn(model(x), y, self.md.task)
    return {'loss': jnp.sum(ce * w), 'correct': jnp.sum(hits * w), 'count': jnp.sum(w)}

  def calibrate_step(self, state: NnxState, x):
    model, opt = state.merge()
    model.train()  # range statistics update in training mode; no optimizer step, so nothing else changes
    model(x)
    return state.replace((model, opt))

  def module(self, state: NnxState):
    return state.merge()[0]

  def ruleset(self, state: NnxState):
    """The rules as applied (qjax.flax's RuleSet), None for a float trainer."""
    return None if state.quantized is None else state.quantized.rules

  # ------------------------------------------------------------------ what reviews and PTQ ask of any trainer

  def float_params(self, state):
    """The model's params as held in float (the quantizer variables not included)."""
    return nnx.state(self.module(state), nnx.Param)

  def eval_forward(self, state):
    """(forward(*args, x), args): the model in evaluation mode."""
    model = self.module(state)
    model.eval()
    graphdef, mstate = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), (mstate,)

  def records(self, state, x) -> list:
    """qjax's records of one forward in evaluation mode: per quantized operand its spec, state and values."""
    model = self.module(state)
    model.eval()
    return qflax.nnx_records(model, x, compiled=True)

  def convert(self, state, x):
    """The model converted for serving (int8 / packed ServingWeights; convert_nnx runs it once on x and leaves it
    in evaluation mode): the converted model."""
    model = self.module(state)
    convert_nnx(model, x)
    return model

  def serving_forward(self, served):
    """(forward(*args, x), args, served params, serving tree) of a converted model (`convert`)."""
    graphdef, mstate = nnx.split(served)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), (mstate,), nnx.state(served, nnx.Param), mstate

  def kernels(self, state) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """{module path: (kernel, bias)} of every module holding a 'kernel' param (float, any rank)."""
    out = {}
    for path, m in _modules(self.module(state)).items():
      k = vars(m).get('kernel')
      if isinstance(k, nnx.Param):
        b = vars(m).get('bias')
        out[path] = (np.asarray(k.get_value()),
                                      None if not isinstance(b, nnx.Param) else np.asarray(b.get_value()))
    return out

  # ------------------------------------------------- what PTQ methods ask of any trainer (experiments/training/ptq.py)

  def capture(self, state, batches, **capture_kwargs):
    """qjax.flax.capture's calibration statistics per quantized op ({key: (OpSite, OpStats)}) of the model in
    evaluation mode (run in float; the model is not changed) on `batches` (model inputs); capture_kwargs:
    stats, max_sample, conv_features."""
    return capture.capture_nnx(self.module(state), batches, **capture_kwargs)

  def ptq_update(self, state, layers, transforms, probe_x=None):
    """The state with each module's kernel and bias replaced ({path: (kernel, bias or None)}, any shape that
    reshapes to the stored one), and the online ops ({path: qjax.ptq.online.Online}) installed; with `probe_x`
    the rules' probe runs again on the new model (see the Linen trainer's)."""
    model, opt = state.merge()
    mods = _modules(model)
    for path, (w, b) in layers.items():
      for name, v in (('kernel', w), ('bias', b)):
        if v is not None:
          var = getattr(mods[path], name)
          var.set_value(jnp.asarray(v, var.get_value().dtype).reshape(var.get_value().shape))
    online.install_nnx(model, transforms)
    if probe_x is not None and state.quantized is not None:  # as quantize_nnx probed it at init
      qflax.reprobe_nnx(model, jnp.asarray(probe_x))
    return state.replace((model, opt))

  def ptq_prepare(self, pure, x, fold: bool = False, equalize: bool = False):
    """(a float run's pure state with its BatchNorms folded into their layers and then consecutive layers
    equalized, {step: what it did}): as the Linen trainer's."""
    graphdef, st = nnx.split(self.md.make(nnx.Rngs(0)))
    nnx.replace_by_pure_dict(st, _overlay(nnx.to_pure_dict(st), pure[0]))
    model = nnx.merge(graphdef, st)
    model.eval()
    info = {}
    if fold:
      info['batchnorm_folding'] = batchnorm.fold_nnx(model, jnp.asarray(x))
    if equalize:
      info['equalization'] = equalization.equalize_nnx(model, jnp.asarray(x))
    return {**pure, 0: _overlay(pure[0], nnx.to_pure_dict(nnx.state(model)))}, info

  def ptq_serve(self, served, qs) -> None:
    """Puts the methods' integer kernels ({path: QArray in the kernel's shape}) into the converted model
    (`convert`), in place: the format and packing the conversion chose."""
    mods = _modules(served)
    for path, q in qs.items():
      old = mods[path].kernel.get_value()
      mods[path].kernel = nnx.Param(ServingWeight.from_qarray(q, old.packed, transpose=old.transposed))


def _plain(tree):
  """A params tree (FrozenDict or dict) as nested plain dicts."""
  return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, 'items') else tree


def _node(tree, path: str):
  """The subtree at a module path ('block_0/mlp/fc1')."""
  for p in path.split('/'):
    tree = tree[p]
  return tree


def _modules(model) -> dict:
  """{module path: module} of an NNX model."""
  return {'/'.join(map(str, p)): m for p, m in nnx.iter_modules(model)}


def _overlay(dst, src):
  """dst with every leaf that src also has (same path) replaced by src's."""
  if isinstance(dst, dict):
    return {k: (_overlay(v, src[k]) if isinstance(src, dict) and k in src else v) for k, v in dst.items()}
  return src


def make(md: ModelDef, tx, rules=None):
  return LinenTrainer(md, tx, rules) if md.api == 'linen' else NnxTrainer(md, tx, rules)


