"""A small ResNet (Linen) for 28x28 inputs: 3 stages of basic blocks, BatchNorm."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


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
