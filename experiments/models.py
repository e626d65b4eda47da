"""The experiment models, written as plain Flax: qjax quantizes them only through its rules and ops.

  mlp        NNX   MLP for 28x28 images (784-h-...-10)
  lenet5     Linen LeNet-5-style CNN (conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84, 10)
  resnet     Linen small ResNet for 28x28 inputs (3 stages of basic blocks, BatchNorm)
  char_lm    NNX   character-level causal Transformer LM (pre-LN blocks, nnx.MultiHeadAttention)

`build(config)` returns a `ModelDef`: the API ('linen' or 'nnx'), a constructor, and the task. Linen models
take `train` as a call argument; NNX models follow `model.train()` / `model.eval()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

# ----------------------------------------------------------------------------------------------- MLP (NNX)


class MLP(nnx.Module):
  def __init__(self, hidden: tuple[int, ...], num_classes: int, *, rngs: nnx.Rngs, in_features: int = 784):
    sizes = (in_features, *hidden)
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])
    self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, x):  # x: (batch, 28, 28) uint8-derived floats
    x = x.reshape(x.shape[0], -1)  # (batch, 784)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)  # (batch, classes)


# ------------------------------------------------------------------------------------------- LeNet-5 (Linen)


class LeNet5(nn.Module):
  num_classes: int = 10
  features: tuple[int, int] = (6, 16)   # conv channels (LeNet-5's own: 6, 16)
  hidden: tuple[int, int] = (120, 84)   # dense widths

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    c1, c2 = self.features
    x = x[..., None]  # (batch, 28, 28, 1)
    x = nn.relu(nn.Conv(c1, (5, 5), padding='SAME', name='conv1')(x))  # (batch, 28, 28, c1)
    x = nn.max_pool(x, (2, 2), (2, 2))  # (batch, 14, 14, c1)
    x = nn.relu(nn.Conv(c2, (5, 5), padding='VALID', name='conv2')(x))  # (batch, 10, 10, c2)
    x = nn.max_pool(x, (2, 2), (2, 2))  # (batch, 5, 5, c2)
    x = x.reshape(x.shape[0], -1)  # (batch, 25 * c2)
    x = nn.relu(nn.Dense(self.hidden[0], name='fc1')(x))
    x = nn.relu(nn.Dense(self.hidden[1], name='fc2')(x))
    return nn.Dense(self.num_classes, name='head')(x)


# -------------------------------------------------------------------------------------------- ResNet (Linen)


class BasicBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), padding='SAME', use_bias=False, name='conv1')(x)
    y = nn.relu(norm('bn1')(y))
    y = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False, name='conv2')(y)
    y = norm('bn2')(y)
    if x.shape != y.shape:  # projection shortcut when the shape changes
      x = nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False, name='proj')(x)
      x = norm('bn_proj')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  stage_sizes: tuple[int, ...] = (1, 1, 1)
  width: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x[..., None]  # (batch, 28, 28, 1)
    x = nn.Conv(self.width, (3, 3), padding='SAME', use_bias=False, name='stem')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn_stem')(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2 ** i, stride, name=f'stage{i}_block{j}')(x, train)
    x = jnp.mean(x, axis=(1, 2))  # global average pool: (batch, channels)
    return nn.Dense(self.num_classes, name='head')(x)


# ------------------------------------------------------------------------------------- char Transformer (NNX)


class Block(nnx.Module):
  def __init__(self, d_model: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.ln1 = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads, d_model, decode=False, dtype=dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(d_model, 4 * d_model, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(4 * d_model, d_model, dtype=dtype, rngs=rngs)

  def __call__(self, x, mask):  # x: (batch, seq, d_model)
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class CharLM(nnx.Module):
  """Parameters are f32; `dtype` is the compute dtype (bfloat16 for mixed-precision training on accelerators)."""

  def __init__(self, vocab_size: int, seq_len: int, d_model: int, num_heads: int, num_layers: int, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.tok = nnx.Embed(vocab_size, d_model, dtype=dtype, rngs=rngs)
    self.pos = nnx.Embed(seq_len, d_model, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, num_heads, rngs=rngs, dtype=dtype) for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, dtype=dtype, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, dtype=dtype, rngs=rngs)

  def __call__(self, tokens):  # tokens: (batch, seq) int32
    seq = tokens.shape[1]
    x = self.tok(tokens) + self.pos(jnp.arange(seq))[None]  # (batch, seq, d_model)
    mask = nnx.make_causal_mask(tokens)  # (batch, 1, seq, seq)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln_f(x))  # (batch, seq, vocab)


# ---------------------------------------------------------------------------------------------- registry


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
        num_classes, tuple(model_config.get('features', (6, 16))), tuple(model_config.get('hidden', (120, 84)))))
  if name == 'resnet':
    return ModelDef(name, 'linen', 'classify', module=ResNet(tuple(model_config.get('stage_sizes', (1, 1, 1))),
                                                              model_config.get('width', 16), num_classes))
  if name == 'char_lm':
    kw = dict(d_model=model_config.get('d_model', 128), num_heads=model_config.get('num_heads', 4),
              num_layers=model_config.get('num_layers', 2), dtype=jnp.dtype(model_config.get('dtype', 'float32')))
    return ModelDef(name, 'nnx', 'lm', make=lambda rngs: CharLM(vocab_size, seq_len, rngs=rngs, **kw))
  raise ValueError(f'model.name={name!r} is not one of {", ".join(MODELS)}')
