"""Rotations (QuaRot / SpinQuant-style): an orthogonal Q spreads outliers across channels, exactly in float.

    x . w = (x . Q) . (Q^T . w)          for any orthogonal Q (Q Q^T = I)

The reader's kernel is rotated offline (w' = Q^T w, then quantized); the input is rotated online, as an
explicit float op (x' = x Q). Q is a Hadamard matrix H_n / sqrt(n) (Sylvester, n a power of two), optionally
randomised with a random sign per row (diag(+-1) H / sqrt(n)), or a random orthogonal matrix (QR of a Gaussian
matrix with the signs of R's diagonal fixed, so it is Haar-distributed) for any n.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qjax.ptq import layer as L
from qjax.ptq import registry

KINDS = ('auto', 'hadamard', 'random_hadamard', 'random')


def hadamard(n: int) -> np.ndarray:
  """The orthonormal Sylvester Hadamard matrix H_n / sqrt(n) (float64); n must be a power of two."""
  if n < 1 or n & (n - 1):
    raise ValueError(f'a Hadamard rotation needs a power-of-two size, got {n}; use kind="random" (or "auto")')
  h = np.ones((1, 1))
  while len(h) < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
  """A Haar-random orthogonal matrix: QR of a Gaussian matrix, columns' signs fixed by diag(R)."""
  q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  return q * np.sign(np.diag(r))[None, :]


def rotation_matrix(n: int, kind: str = 'auto', seed: int = 0) -> np.ndarray:
  """An orthogonal (n, n) matrix: 'hadamard', 'random_hadamard' (random row signs), 'random', or 'auto' (the
  randomised Hadamard where n is a power of two, else random)."""
  if kind == 'auto':
    kind = 'random_hadamard' if n >= 1 and not n & (n - 1) else 'random'
  if kind == 'hadamard':
    return hadamard(n)
  if kind == 'random_hadamard':
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], n)
    return signs[:, None] * hadamard(n)
  if kind == 'random':
    return random_orthogonal(n, seed)
  raise ValueError(f'rotation kind {kind!r} is not one of {", ".join(KINDS)}')


class RotationResult(NamedTuple):
  rotation: np.ndarray   # (in, in) Q: the online op is x @ Q
  w: np.ndarray          # (in, out) Q^T . w


def rotate(w, kind: str = 'auto', seed: int = 0) -> RotationResult:
  """Rotates the reader kernel w (in, out): (x Q) (Q^T w) = x w."""
  w = np.asarray(w, np.float64)
  q = rotation_matrix(w.shape[0], kind, seed)
  return RotationResult(q, q.T @ w)


def _run(layer: L.Layer, *, kind: str, seed: int) -> L.Layer:
  if layer.q is not None or layer.scale is not None:
    raise ValueError('rotation must come first: before smoothquant / awq (a scale) and any rounding method')
  if layer.tied is not None:  # a rotation of all kh kw C features has no form on the conv's input channels
    raise ValueError('rotation applies to matmul inputs, not to a convolution\'s im2col features')
  res = rotate(layer.w, kind, seed)
  r = res.rotation if layer.rotation is None else layer.rotation @ res.rotation
  return layer.replace(w=res.w.astype(np.float32), rotation=r,
                       stats=L.transform_stats(layer.stats, rotation=res.rotation))


def _check_params(p) -> None:
  if p['kind'] not in KINDS:
    raise ValueError(f'rotation.kind={p["kind"]!r} is not one of {", ".join(KINDS)}{registry.near(p["kind"], KINDS)}')


registry.register(registry.PTQMethod('rotation', _run, {'kind': 'auto', 'seed': 0}, changes_input=True,
                                     check=_check_params))
