"""The experiment models, written as plain Flax: qjax quantizes them only through its rules and ops.

  mlp        NNX   MLP for 28x28 images (784-h-...-10)
  lenet5     Linen LeNet-5-style CNN (conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84, 10)
  resnet     Linen small ResNet for 28x28 inputs (3 stages of basic blocks, BatchNorm)
  char_lm    NNX   character-level causal Transformer LM (pre-LN blocks, nnx.MultiHeadAttention)

`build(config)` returns a `ModelDef`: the API ('linen' or 'nnx'), a constructor, and the task. Linen models
take `train` as a call argument; NNX models follow `model.train()` / `model.eval()`. One file per model; a new
model is a file here and a branch of `build`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from experiments.models.char_lm import Block, CharLM
from experiments.models.lenet5 import LeNet5
from experiments.models.mlp import MLP
from experiments.models.resnet import BasicBlock, ResNet

__all__ = ['MLP', 'BasicBlock', 'Block', 'CharLM', 'LeNet5', 'MODELS', 'ModelDef', 'ResNet', 'build']


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """How the runner builds a model: `api` 'linen' (module) or 'nnx' (make(rngs) -> nnx.Module)."""
  name: str
  api: str
  task: str  # 'classify' | 'lm'
  module: nn.Module | None = None
  make: Callable[[nnx.Rngs], nnx.Module] | None = None


MODELS = ('mlp', 'lenet5', 'resnet', 'char_lm')


def build(model_config: Any, *, num_classes: int = 10, vocab_size: int = 0, seq_len: int = 0) -> ModelDef:
  """The model named `model_config.name` with the sizes in model_config."""
  name = model_config.name
  if name == 'mlp':
    hidden = tuple(model_config.get('hidden', (256, 256)))
    return ModelDef(name, 'nnx', 'classify', make=lambda rngs: MLP(hidden, num_classes, rngs=rngs))
  if name == 'lenet5':
    return ModelDef(name, 'linen', 'classify', module=LeNet5(
        num_classes, tuple(model_config.get('features', (6, 16))), tuple(model_config.get('hidden', (120, 84))),
        model_config.get('activation', 'relu')))
  if name == 'resnet':
    return ModelDef(name, 'linen', 'classify', module=ResNet(tuple(model_config.get('stage_sizes', (1, 1, 1))),
                                                              model_config.get('width', 16), num_classes))
  if name == 'char_lm':
    kw = dict(d_model=model_config.get('d_model', 128), num_heads=model_config.get('num_heads', 4),
              num_layers=model_config.get('num_layers', 2), dtype=jnp.dtype(model_config.get('dtype', 'float32')))
    return ModelDef(name, 'nnx', 'lm', make=lambda rngs: CharLM(vocab_size, seq_len, rngs=rngs, **kw))
  raise ValueError(f'model.name={name!r} is not one of {", ".join(MODELS)}')
