"""MLP (NNX) for 28x28 images: 784-h-...-10."""

from __future__ import annotations

from flax import nnx


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
