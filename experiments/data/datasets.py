"""Loading the datasets: Fashion-MNIST, MNIST and the complete works of Shakespeare, from the cache (fetching on a
miss, experiments/data/sources.py) or from the small committed fixtures under ``tests/fixtures/``.

  images, labels = load_images('fashion_mnist', 'train')   # uint8 (N, 28, 28), int32 (N,)
  texts = load_shakespeare()                                # {title: text}
  train_text, test_text, vocab = char_lm_splits(texts)      # held-out data are whole plays

``QJAX_DATA_SOURCE=fixtures`` makes every loader read the fixtures instead (``QJAX_DATA_SOURCE=full`` forces the
full data); the loaders' ``fixtures=True`` / ``source='fixtures'`` arguments do the same per call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments import fileio
from experiments.config import cli as config_cli
from experiments.data.files import (
  DATASETS,
  FIXTURE_PLAYS,
  FIXTURE_SHA256,
  FIXTURE_TEST_PER_CLASS,
  FIXTURE_TRAIN_PER_CLASS,
  FIXTURES_DIR,
  HELDOUT_PLAYS,
  IDX_FILES,
  IMAGE_DATASETS,
  NUM_CLASSES,
  SHA256,
  SPLIT_PREFIX,
  SPLITS,
  ChecksumError,
  DataError,
  MissingFilesError,
  _write_dataset,
  cache_dir,
  parse_idx,
  read_verified,
  read_verified_dir,
  sha256_hex,
  write_idx,
)
from experiments.data.sources import (
  check_name,
  fetch,
)

# ----------------------------------------------------------------------------------------------
# Loaders


SOURCE_ENV = 'QJAX_DATA_SOURCE'


def env_source() -> str:
  """$QJAX_DATA_SOURCE ('full' or 'fixtures'), '' when unset. Another value is a DataError (one `error:` line from
  the commands), never a fallback to the full data."""
  env = os.environ.get(SOURCE_ENV, '').strip().lower()
  if env and env not in ('full', 'fixtures'):
    raise DataError(f"{SOURCE_ENV}={env!r} is not one of 'full', 'fixtures'"
                    f"{config_cli.did_you_mean(env, ('full', 'fixtures'))}")
  return env


def _resolve_source(fixtures: bool, source: str) -> str:
  if source not in ('full', 'fixtures'):
    raise ValueError(f"unknown source {source!r}; allowed: 'full', 'fixtures'")
  return env_source() or ('fixtures' if fixtures else source)


def _read_dataset_files(name: str, fnames: Sequence[str], source: str, *, verbose: bool) -> dict[str, bytes]:
  if source == 'fixtures':
    d, pins = FIXTURES_DIR / name, FIXTURE_SHA256[name]
    return {f: read_verified(d, f, pins[f]) for f in fnames}
  pins = SHA256[name]
  try:  # fast path: straight from the cache, each file verified as it is read
    return {f: read_verified(cache_dir() / name, f, pins[f]) for f in fnames}
  except DataError:
    pass
  directory = fetch(name, verbose=verbose)
  return {f: read_verified(directory, f, pins[f]) for f in fnames}


def load_images(name: str, split: str, *, fixtures: bool = False, source: str = 'full',
                verbose: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Images uint8 (N, 28, 28) and labels int32 (N,) of 'fashion_mnist' or 'mnist'.

  split: 'train' (60,000) or 'test' (the official 10,000). The full data are fetched into the
  cache on first use. fixtures=True or source='fixtures' (or QJAX_DATA_SOURCE=fixtures) reads the
  committed fixtures instead: 50 images per class for train, 25 per class for test.
  """
  check_name(name, IMAGE_DATASETS)
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; allowed: {", ".join(SPLITS)}')
  prefix = SPLIT_PREFIX[split]
  fimg, flab = f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte'
  files = _read_dataset_files(name, (fimg, flab), _resolve_source(fixtures, source), verbose=verbose)
  images, labels = parse_idx(files[fimg]), parse_idx(files[flab])
  if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
    raise DataError(f'{name}/{split}: unexpected shapes {images.shape} and {labels.shape}')
  if labels.size and labels.max() >= NUM_CLASSES:
    raise DataError(f'{name}/{split}: label {labels.max()} out of range')
  return images, labels.astype(np.int32)


def load_shakespeare(*, fixtures: bool = False, source: str = 'full', verbose: bool = True) -> dict[str, str]:
  """The complete works: {title: text}, sorted by title (37 plays, the Sonnets and 4 poems).

  Titles are file stems such as 'hamlet', 'henry_iv_part_1', 'sonnets'. The texts are pure ASCII
  with LF line ends. With fixtures: only FIXTURE_PLAYS.
  """
  src = _resolve_source(fixtures, source)
  fnames = sorted(FIXTURE_SHA256['shakespeare'] if src == 'fixtures' else SHA256['shakespeare'])
  files = _read_dataset_files('shakespeare', fnames, src, verbose=verbose)
  return {f.removesuffix('.txt'): files[f].decode('ascii') for f in fnames}


def split_titles(texts: Mapping[str, str], heldout: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
  """(training titles, held-out titles), both sorted. See char_lm_splits for `heldout`."""
  if not texts:
    raise ValueError('no texts given')
  if heldout is None:
    held = sorted(t for t in HELDOUT_PLAYS if t in texts)
    if not held:
      raise ValueError(f'none of the default held-out plays {HELDOUT_PLAYS} is among the texts; '
                       'pass heldout=[...] explicitly')
  else:
    held = sorted({heldout} if isinstance(heldout, str) else set(heldout))
    missing = [t for t in held if t not in texts]
    if missing:
      raise ValueError(f'held-out titles not among the texts: {missing}')
  train = sorted(t for t in texts if t not in held)
  if not train or not held:
    raise ValueError(f'need at least one training and one held-out title (held out: {held})')
  return train, held


def char_lm_splits(texts: Mapping[str, str], heldout: Iterable[str] | None = None, *,
                   separator: str = '\n') -> tuple[str, str, list[str]]:
  """Character-LM splits by whole works: (train_text, test_text, vocab).

  heldout: titles kept out of training. None means HELDOUT_PLAYS (those of them present in
  `texts`, so that the fixtures work too); explicit titles must all be present. Works are joined
  in title order with `separator`. vocab is the sorted list of the characters of the whole corpus
  (all texts and the separator), so train and test are encoded with the same ids.
  """
  train_titles, test_titles = split_titles(texts, heldout)
  train = separator.join(texts[t] for t in train_titles)
  test = separator.join(texts[t] for t in test_titles)
  vocab = sorted(set(separator.join(texts[t] for t in sorted(texts))))
  return train, test, vocab


# ----------------------------------------------------------------------------------------------
# Fixtures


def _balanced_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
  """The first `per_class` indices of every class, in their original order."""
  idx = []
  for c in range(NUM_CLASSES):
    where = np.flatnonzero(labels == c)[:per_class]
    if len(where) < per_class:
      raise DataError(f'class {c} has only {len(where)} examples')
    idx.append(where)
  return np.sort(np.concatenate(idx))


def make_fixtures(out: Path = FIXTURES_DIR, *, train_per_class: int = FIXTURE_TRAIN_PER_CLASS,
                  test_per_class: int = FIXTURE_TEST_PER_CLASS, plays: Sequence[str] = FIXTURE_PLAYS,
                  verbose: bool = True) -> dict[str, dict[str, str]]:
  """Writes the small fixtures from the full (verified) data; returns their content sha256."""
  hashes: dict[str, dict[str, str]] = {}
  for name in IMAGE_DATASETS:
    files = {}
    for split, per_class in (('train', train_per_class), ('test', test_per_class)):
      images, labels = load_images(name, split, source='full', verbose=verbose)
      keep = _balanced_indices(labels, per_class)
      prefix = SPLIT_PREFIX[split]
      files[f'{prefix}-images-idx3-ubyte'] = write_idx(images[keep])
      files[f'{prefix}-labels-idx1-ubyte'] = write_idx(labels[keep].astype(np.uint8))
    _write_dataset(out / name, files, compress=True, level=9)
    hashes[name] = {f: sha256_hex(files[f]) for f in IDX_FILES}
  texts = load_shakespeare(source='full', verbose=verbose)
  files = {f'{p}.txt': texts[p].encode('ascii') for p in plays}
  # Text fixtures are gzipped too (about 40% of the size); read_verified reads <file>.gz.
  _write_dataset(out / 'shakespeare', files, compress=True, level=9)
  hashes['shakespeare'] = {f: sha256_hex(b) for f, b in files.items()}
  return hashes


# ----------------------------------------------------------------------------------------------
# Command line


def _status(directory: Path, pins: Mapping[str, str]) -> str:
  try:
    read_verified_dir(directory, pins)
  except MissingFilesError:
    have = sum((directory / f).is_file() or (directory / f'{f}.gz').is_file() for f in pins)
    return f'missing ({have}/{len(pins)} files present)'
  except ChecksumError as e:
    return f'CORRUPT: {e}'
  return f'ok, {len(pins)} files, sha256 verified, {fileio.dir_bytes(directory) / 1e6:.1f} MB'


def info() -> str:
  root = cache_dir()
  lines = [f'cache: {root}' + ('' if os.environ.get('QJAX_DATA_DIR') else ' (set QJAX_DATA_DIR to change)')]
  for name in DATASETS:
    lines.append(f'  {name:14s} {_status(root / name, SHA256[name])}')
  lines.append(f'fixtures: {FIXTURES_DIR}')
  for name in DATASETS:
    lines.append(f'  {name:14s} {_status(FIXTURES_DIR / name, FIXTURE_SHA256[name])}')
  env = {k: os.environ[k] for k in ('QJAX_DATA_DIR', 'QJAX_DATA_SOURCE', 'QJAX_DATA_OFFLINE') if k in os.environ}
  lines.append('environment: ' + (', '.join(f'{k}={v}' for k, v in env.items()) or 'no QJAX_DATA_* set'))
  return '\n'.join(lines)
