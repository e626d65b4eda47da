"""LeNet-5-style CNN (Linen): conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84, 10; ReLU, or Swish / GELU for
studies of activations with a negative part (LSQ+'s asymmetric grids)."""

from __future__ import annotations

import flax.linen as nn

ACTIVATIONS = {'relu': nn.relu, 'swish': nn.swish, 'gelu': nn.gelu}


class LeNet5(nn.Module):
  num_classes: int = 10
  features: tuple[int, int] = (6, 16)   # conv channels (LeNet-5's own: 6, 16)
  hidden: tuple[int, int] = (120, 84)   # dense widths
  activation: str = 'relu'              # a key of ACTIVATIONS

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'LeNet5 activation={self.activation!r}: expected one of {", ".join(ACTIVATIONS)}')
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    c1, c2 = self.features
    act = ACTIVATIONS[self.activation]
    x = x[..., None]  # (batch, 28, 28, 1)
    x = act(nn.Conv(c1, (5, 5), padding='SAME', name='conv1')(x))  # (batch, 28, 28, c1)
    x = nn.max_pool(x, (2, 2), (2, 2))  # (batch, 14, 14, c1)
    x = act(nn.Conv(c2, (5, 5), padding='VALID', name='conv2')(x))  # (batch, 10, 10, c2)
    x = nn.max_pool(x, (2, 2), (2, 2))  # (batch, 5, 5, c2)
    x = x.reshape(x.shape[0], -1)  # (batch, 25 * c2)
    x = act(nn.Dense(self.hidden[0], name='fc1')(x))
    x = act(nn.Dense(self.hidden[1], name='fc2')(x))
    return nn.Dense(self.num_classes, name='head')(x)
