"""Batches for the runner, as pure functions of (seed, step) so a resumed run sees exactly the same data.

Images: uint8 (N, 28, 28) scaled to [0, 1] and standardised with the training set's mean and std; one
permutation per epoch drawn from (seed, epoch). Text: character ids of the training plays; each step draws
`batch_size` windows of `seq_len + 1` characters from (seed, step); evaluation uses fixed windows of the
held-out plays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments.data import datasets
from experiments.data.files import DATASETS, IMAGE_DATASETS

SOURCES = ('auto', 'fixtures')  # config.data_source: the cache/fetch chain, or the committed fixtures


@dataclasses.dataclass
class Dataset:
  task: str                       # 'classify' | 'lm'
  train_x: np.ndarray
  train_y: np.ndarray | None
  test_x: np.ndarray
  test_y: np.ndarray | None
  num_classes: int = 0
  vocab: tuple[str, ...] = ()
  seq_len: int = 0
  mean: float = 0.0
  std: float = 1.0

  @property
  def num_train(self) -> int:
    return len(self.train_x)


def load(config) -> Dataset:
  """Loads config.dataset from config.data_source ('auto': the cache/fetch chain; 'fixtures')."""
  fixtures = config.data_source == 'fixtures'
  if config.dataset in IMAGE_DATASETS:
    tx, ty = datasets.load_images(config.dataset, 'train', fixtures=fixtures)
    ex, ey = datasets.load_images(config.dataset, 'test', fixtures=fixtures)
    if config.get('train_examples', 0) > 0:
      tx, ty = tx[:config.train_examples], ty[:config.train_examples]
    f = tx.astype(np.float32) / 255.0
    return Dataset('classify', tx, ty.astype(np.int32), ex, ey.astype(np.int32), num_classes=10,
                   mean=float(f.mean()), std=float(f.std()))
  if config.dataset == 'shakespeare':
    texts = datasets.load_shakespeare(fixtures=fixtures)
    train_text, test_text, vocab = datasets.char_lm_splits(texts)
    index = {c: i for i, c in enumerate(vocab)}
    enc = lambda t: np.fromiter((index[c] for c in t), np.int32, len(t))
    return Dataset('lm', enc(train_text), None, enc(test_text), None, vocab=tuple(vocab),
                   seq_len=config.model.seq_len)
  raise ValueError(f'config.dataset={config.dataset!r} is not one of {", ".join(DATASETS)}')


def _images(ds: Dataset, x: np.ndarray) -> np.ndarray:
  return ((x.astype(np.float32) / 255.0) - ds.mean) / ds.std  # (batch, 28, 28)


def train_batch(ds: Dataset, seed: int, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batch of training step `step` (a pure function of seed and step)."""
  if ds.task == 'classify':
    per_epoch = max(1, ds.num_train // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(ds.num_train)
    idx = perm[i * batch_size:(i + 1) * batch_size]
    if len(idx) < batch_size:  # fewer examples than one batch: sample with replacement
      idx = np.random.default_rng([seed, epoch, i]).integers(0, ds.num_train, batch_size)
    return _images(ds, ds.train_x[idx]), ds.train_y[idx]
  starts = np.random.default_rng([seed, step]).integers(0, len(ds.train_x) - ds.seq_len - 1, batch_size)
  win = ds.train_x[starts[:, None] + np.arange(ds.seq_len + 1)]  # (batch, seq + 1)
  return win[:, :-1], win[:, 1:]


def eval_batches(ds: Dataset, batch_size: int, max_examples: int = 0):
  """Yields (x, y, weight) over the test split; the last batch is padded and weighted 0 on the padding."""
  if ds.task == 'classify':
    n = len(ds.test_x) if max_examples <= 0 else min(max_examples, len(ds.test_x))
    xs, ys = _images(ds, ds.test_x[:n]), ds.test_y[:n]
  else:
    n_win = (len(ds.test_x) - 1) // ds.seq_len
    if max_examples > 0:
      n_win = min(n_win, max_examples)
    starts = np.arange(n_win) * ds.seq_len
    win = ds.test_x[starts[:, None] + np.arange(ds.seq_len + 1)]
    xs, ys = win[:, :-1], win[:, 1:]
    n = n_win
  for s in range(0, n, batch_size):
    x, y = xs[s:s + batch_size], ys[s:s + batch_size]
    w = np.ones(len(x), np.float32)
    if len(x) < batch_size:
      pad = batch_size - len(x)
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
      w = np.concatenate([w, np.zeros(pad, np.float32)])
    yield x, y, w


def sample_input(ds: Dataset, batch_size: int) -> np.ndarray:
  return train_batch(ds, 0, 0, batch_size)[0]
