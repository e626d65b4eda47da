"""LeNet-5-style CNN (Linen): conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84, 10."""

from __future__ import annotations

import flax.linen as nn


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
