"""experiments/review/tensorboard.py (TF-free TensorBoard writer) and the board, checked against tensorboard's own
event reader and a real TensorBoard server on 127.0.0.1."""

import io
import json
import os
import socket
import sys
import time
import urllib.parse
import urllib.request

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_summary_v2
from tensorboard.util import tensor_util

from experiments.review import board
from experiments.review import tensorboard as tb

ALL_STATUSES = ['STATUS_FAILURE', 'STATUS_RUNNING', 'STATUS_SUCCESS', 'STATUS_UNKNOWN']


def _accumulator(logdir):
  acc = plugin_event_accumulator.EventAccumulator(
    str(logdir), size_guidance={plugin_event_accumulator.TENSORS: 0}
  )
  acc.Reload()
  return acc


def _tensors(logdir, tag):
  return [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in _accumulator(logdir).Tensors(tag)]


def _content(logdir, tag):
  return _accumulator(logdir).SummaryMetadata(tag).plugin_data.content


# ---------------------------------------------------------------------------------------------------------
# Writing, read back with tensorboard's loader.


def test_scalars_roundtrip_numpy_and_jax_values(tmp_path):
  with tb.SummaryWriter(tmp_path) as w:
    w.scalar('train/loss', 2.5, step=0)
    w.scalar('train/loss', np.float32(1.25), step=np.int64(10))
    w.scalar('train/loss', jnp.asarray(0.5, jnp.bfloat16), step=jnp.int32(20))
    w.scalars({'eval/loss': jnp.float32(0.75), 'eval/accuracy': np.float64(0.875)}, step=20)
  assert tb.read_scalars(tmp_path) == {
    'train/loss': [(0, 2.5), (10, 1.25), (20, 0.5)],
    'eval/loss': [(20, 0.75)],
    'eval/accuracy': [(20, 0.875)],
  }
  assert tb.read_tags(tmp_path) == {'scalars': {'train/loss', 'eval/loss', 'eval/accuracy'}}
  assert 'tensorflow' not in sys.modules


def test_scalar_rejects_non_scalars_and_float_steps(tmp_path):
  with tb.SummaryWriter(tmp_path) as w:
    with pytest.raises(ValueError, match='expected a scalar'):
      w.scalar('x', np.zeros(3), step=0)
    with pytest.raises(TypeError, match='step'):
      w.scalar('x', 1.0, step=1.5)
  with pytest.raises(RuntimeError, match='closed'):
    w.scalar('x', 1.0, step=0)


def test_histogram_buckets_match_tensorboard_format(tmp_path):
  with tb.SummaryWriter(tmp_path) as w:
    w.histogram('weights', jnp.arange(10.0), step=3, bins=5)
    w.histogram('const', np.full(7, 2.0), step=3, bins=4)
    w.histogram('edges', [0.5, 1.5, 1.5, 9.0, np.nan], step=4, bins=[0.0, 1.0, 2.0])
  assert tb.read_tags(tmp_path) == {'histograms': {'weights', 'const', 'edges'}}
  ((step, buckets),) = _tensors(tmp_path, 'weights')
  assert step == 3 and buckets.dtype == np.float64
  np.testing.assert_allclose(buckets[:, 0], [0.0, 1.8, 3.6, 5.4, 7.2])
  np.testing.assert_allclose(buckets[:, 1], [1.8, 3.6, 5.4, 7.2, 9.0])
  np.testing.assert_array_equal(buckets[:, 2], [2, 2, 2, 2, 2])
  ((_, const),) = _tensors(tmp_path, 'const')
  np.testing.assert_array_equal(const, [[2, 2, 0], [2, 2, 0], [2, 2, 0], [2, 2, 7]])
  ((_, edges),) = _tensors(tmp_path, 'edges')  # 9.0 is outside the edges, nan is dropped
  np.testing.assert_array_equal(edges, [[0, 1, 1], [1, 2, 2]])
  np.testing.assert_array_equal(tb.histogram_buckets([], bins=3), np.zeros((3, 3)))


def test_image_png_roundtrip(tmp_path):
  PIL_Image = pytest.importorskip('PIL.Image')
  rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
  grey = np.linspace(0.0, 1.0, 12).reshape(3, 4)
  with tb.SummaryWriter(tmp_path) as w:
    w.image('rgb', rgb, step=1)
    w.image('grey_float', grey, step=2)
    w.image('png', tb.encode_png(rgb), step=3)
    w.image('batch', np.stack([rgb, 255 - rgb]), step=4)
  assert tb.read_tags(tmp_path) == {'images': {'rgb', 'grey_float', 'png', 'batch'}}

  def decode(png):
    return np.asarray(PIL_Image.open(io.BytesIO(png)))

  ((step, rgb_t),) = _tensors(tmp_path, 'rgb')
  assert step == 1 and list(rgb_t[:2]) == [b'3', b'2']  # width, height
  np.testing.assert_array_equal(decode(rgb_t[2]), rgb)
  ((_, grey_t),) = _tensors(tmp_path, 'grey_float')
  assert list(grey_t[:2]) == [b'4', b'3']
  np.testing.assert_array_equal(decode(grey_t[2]), np.round(grey * 255).astype(np.uint8))
  ((_, png_t),) = _tensors(tmp_path, 'png')
  assert png_t[2] == rgb_t[2]
  ((_, batch_t),) = _tensors(tmp_path, 'batch')
  assert len(batch_t) == 4
  np.testing.assert_array_equal(decode(batch_t[3]), 255 - rgb)
  with tb.SummaryWriter(tmp_path / 'bad') as w, pytest.raises(ValueError, match='not a PNG'):
    w.image('x', b'not a png at all, clearly not', step=0)
  with pytest.raises(ValueError, match='C in 1..4'):
    tb.encode_png(np.zeros((2, 2, 5), np.uint8))


def test_text_roundtrip(tmp_path):
  with tb.SummaryWriter(tmp_path) as w:
    w.text('notes/config', 'bits=4, **symmetric**', step=0)
  assert tb.read_tags(tmp_path) == {'text': {'notes/config'}}
  ((step, value),) = _tensors(tmp_path, 'notes/config')
  assert step == 0 and value.item() == b'bits=4, **symmetric**'


# ---------------------------------------------------------------------------------------------------------
# HParams.


def test_group_name_ignores_seed_and_matches_tensorboard_hash():
  base = {'bits': 4, 'scheme': 'symmetric', 'lr': 1e-3, 'qat': True}
  g0 = tb.group_name_for({**base, 'seed': 0})
  assert g0 == tb.group_name_for({'seed': 1, **dict(reversed(list(base.items())))})
  assert g0 == tb.group_name_for({**base, 'bits': np.int32(4), 'lr': np.float64(1e-3)})
  assert g0 != tb.group_name_for({**base, 'bits': 8, 'seed': 0})
  assert tb.group_name_for({**base, 'seed': 0}, exclude=()) != tb.group_name_for({**base, 'seed': 1}, exclude=())
  # Nested config: `train.seed` is a seed too; the rest is flattened with dots.
  nested = {'quant': {'bits': 4}, 'train': {'seed': 3}}
  assert tb.group_name_for(nested) == tb.group_name_for({'quant.bits': 4, 'train.seed': 5})
  # With nothing excluded the name is the one TensorBoard's own hparams_pb derives.
  pb = hparams_summary_v2.hparams_pb({**base, 'seed': 0})
  start = hparams_metadata.parse_session_start_info_plugin_data(pb.value[0].metadata.plugin_data.content)
  assert tb.group_name_for({**base, 'seed': 0}, exclude=()) == start.group_name


def test_hparams_session_start_and_end(tmp_path):
  hp = {'bits': np.int64(4), 'scheme': 'symmetric', 'qat': True, 'lr': 1e-3, 'seed': 7, 'note': None}
  with tb.SummaryWriter(tmp_path / 'ok') as w:
    group = w.hparams(hp)
    w.scalar('eval/loss', 0.5, step=1)
    with pytest.raises(RuntimeError, match='already'):
      w.hparams(hp)
  assert group == tb.group_name_for(hp)
  start = hparams_metadata.parse_session_start_info_plugin_data(
    _content(tmp_path / 'ok', hparams_metadata.SESSION_START_INFO_TAG)
  )
  assert start.group_name == group
  assert set(start.hparams) == {'bits', 'scheme', 'qat', 'lr', 'note'}  # seed excluded
  assert start.hparams['bits'].number_value == 4
  assert start.hparams['scheme'].string_value == 'symmetric'
  assert start.hparams['qat'].bool_value is True and start.hparams['qat'].WhichOneof('kind') == 'bool_value'
  assert start.hparams['note'].string_value == ''
  end = hparams_metadata.parse_session_end_info_plugin_data(
    _content(tmp_path / 'ok', hparams_metadata.SESSION_END_INFO_TAG)
  )
  assert end.status == hparams_summary_v2.api_pb2.STATUS_SUCCESS

  with pytest.raises(ZeroDivisionError):
    with tb.SummaryWriter(tmp_path / 'crash') as w:
      w.hparams(hp, group_name='custom')
      1 / 0  # noqa: B018
  end = hparams_metadata.parse_session_end_info_plugin_data(
    _content(tmp_path / 'crash', hparams_metadata.SESSION_END_INFO_TAG)
  )
  assert end.status == hparams_summary_v2.api_pb2.STATUS_FAILURE
  assert len(list((tmp_path / 'crash').glob('*' + tb.FAILED_END_SUFFIX))) == 1
  start = hparams_metadata.parse_session_start_info_plugin_data(
    _content(tmp_path / 'crash', hparams_metadata.SESSION_START_INFO_TAG)
  )
  assert start.group_name == 'custom'

  with tb.SummaryWriter(tmp_path / 'plain') as w:  # no hparams() -> no session end
    w.scalar('x', 1.0, step=0)
  assert tb.read_tags(tmp_path / 'plain') == {'scalars': {'x'}}


def test_hparams_experiment_domains_and_rewrite(tmp_path):
  tb.write_hparams_experiment(tmp_path, {'bits': [1]}, ['old'])
  path = tb.write_hparams_experiment(
    tmp_path,
    {'bits': [8, 4, np.int32(2), 4], 'scheme': ['symmetric', 'asymmetric'], 'qat': [True, False], 'lr': [0.1]},
    ['eval/loss', ('train', 'loss')],
    description='bits x scheme',
  )
  assert os.path.dirname(path) == str(tmp_path)
  assert len([f for f in os.listdir(tmp_path) if 'tfevents' in f]) == 1  # the rewrite replaced the first
  experiment = hparams_metadata.parse_experiment_plugin_data(_content(tmp_path, hparams_metadata.EXPERIMENT_TAG))
  api = hparams_summary_v2.api_pb2
  infos = {i.name: i for i in experiment.hparam_infos}
  assert list(infos) == ['bits', 'scheme', 'qat', 'lr']
  assert infos['bits'].type == api.DATA_TYPE_FLOAT64 and list(infos['bits'].domain_discrete) == [2, 4, 8]
  assert infos['scheme'].type == api.DATA_TYPE_STRING
  assert list(infos['scheme'].domain_discrete) == ['asymmetric', 'symmetric']
  assert infos['qat'].type == api.DATA_TYPE_BOOL and list(infos['qat'].domain_discrete) == [False, True]
  assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [('', 'eval/loss'), ('train', 'loss')]
  assert experiment.description == 'bits x scheme'
  with pytest.raises(TypeError, match='mix types'):
    tb.write_hparams_experiment(tmp_path, {'bits': [4, 'eight']}, ['eval/loss'])
  with pytest.raises(ValueError, match='empty'):
    tb.write_hparams_experiment(tmp_path, {'bits': []}, ['eval/loss'])


# ---------------------------------------------------------------------------------------------------------
# A real TensorBoard server on a sweep root: 2 configurations x 2 seeds.

TRIALS = [(bits, seed) for bits in (4, 8) for seed in (0, 1)]


def _final_loss(bits, seed):
  return 1.0 / bits + 0.25 * seed


@pytest.fixture(scope='module')
def sweep(tmp_path_factory):
  root = tmp_path_factory.mktemp('sweep')
  tb.write_hparams_experiment(root, {'bits': [4, 8], 'scheme': ['symmetric']}, ['eval/loss'])
  groups = {}
  for bits, seed in TRIALS:
    run = f'bits={bits},seed={seed}'
    if (bits, seed) == (8, 1):  # crashes after its first point, then a rerun resumes it and finishes
      with pytest.raises(KeyError), tb.SummaryWriter(root / run) as w:
        groups[run] = w.hparams({'bits': bits, 'scheme': 'symmetric', 'seed': seed})
        w.scalar('eval/loss', _final_loss(bits, seed) + 2, step=0)
        raise KeyError('crash')
      with tb.SummaryWriter(root / run) as w:
        w.continue_session()
        for step in (1, 2):
          w.scalar('eval/loss', _final_loss(bits, seed) + (2 - step), step=step * 10)
      continue
    with tb.SummaryWriter(root / run) as w:
      groups[run] = w.hparams({'bits': bits, 'scheme': 'symmetric', 'seed': seed})
      for step in range(3):
        w.scalar('eval/loss', _final_loss(bits, seed) + (2 - step), step=step * 10)
      if (bits, seed) == (4, 0):
        w.image('samples', np.full((2, 2, 3), 200, np.uint8), step=20)
        w.histogram('weights', np.arange(4.0), step=20, bins=2)
        w.text('notes', 'hello *board*', step=20)
  url, server = board.start(root, host='127.0.0.1', port=0, timeout=60, reload_interval=1)
  try:
    deadline = time.monotonic() + 20
    runs = []
    while time.monotonic() < deadline:
      runs = _get_json(url, 'data/runs')
      if len(runs) == 1 + len(TRIALS):
        break
      time.sleep(0.2)
    assert sorted(runs) == sorted(['.'] + list(groups)), server.log()
    yield url, server, groups
  finally:
    server.stop()
    assert server.process.poll() is not None


def _get_json(url, path):
  with urllib.request.urlopen(url + path, timeout=10) as response:
    return json.load(response)


def _post_json(url, path, body):
  request = urllib.request.Request(
    url + path,
    data=json.dumps(body).encode(),
    headers={'Content-Type': 'application/json', 'X-XSRF-Protected': '1'},
    method='POST',
  )
  with urllib.request.urlopen(request, timeout=10) as response:
    return json.load(response)


def _listening_ipv4(port, table):
  """Local addresses of LISTEN sockets on `port` in /proc/net/tcp{,6}."""
  with open(table) as f:
    rows = [line.split() for line in f.readlines()[1:]]
  out = []
  for row in rows:
    address, port_hex = row[1].rsplit(':', 1)
    if row[3] == '0A' and int(port_hex, 16) == port:
      raw = bytes.fromhex(address)
      out.append(socket.inet_ntoa(raw[::-1]) if len(raw) == 4 else raw.hex())
  return out


def test_server_binds_loopback_only(sweep):
  url, server, _ = sweep
  assert urllib.parse.urlparse(url).hostname == '127.0.0.1' == server.host
  assert server.process.poll() is None
  if not os.path.exists('/proc/net/tcp'):
    pytest.skip('no /proc/net/tcp to inspect listeners')
  assert _listening_ipv4(server.port, '/proc/net/tcp') == ['127.0.0.1']
  if os.path.exists('/proc/net/tcp6'):
    assert _listening_ipv4(server.port, '/proc/net/tcp6') == []


def test_server_hparams_experiment(sweep):
  url, _, _ = sweep
  experiment = _post_json(url, 'data/plugin/hparams/experiment', {'experimentName': ''})
  infos = {i['name']: i for i in experiment['hparamInfos']}
  assert set(infos) == {'bits', 'scheme'}
  assert infos['bits']['type'] == 'DATA_TYPE_FLOAT64' and infos['bits']['domainDiscrete'] == [4, 8]
  assert infos['scheme']['type'] == 'DATA_TYPE_STRING' and infos['scheme']['domainDiscrete'] == ['symmetric']
  assert [m['name']['tag'] for m in experiment['metricInfos']] == ['eval/loss']


def test_server_session_groups_merge_seeds(sweep):
  url, _, groups = sweep
  request = {  # as tensorboard/webapp/hparams/_redux/hparams_data_source.ts sends it
    'experimentName': '',
    'allowedStatuses': ALL_STATUSES,
    'colParams': [{'hparam': 'bits'}, {'hparam': 'scheme'}, {'metric': {'tag': 'eval/loss', 'group': ''}}],
    'startIndex': 0,
    'sliceSize': 1000000,
  }
  response = _post_json(url, 'data/plugin/hparams/session_groups', request)
  assert response['totalSize'] == 2
  by_bits = {int(g['hparams']['bits']): g for g in response['sessionGroups']}
  assert set(by_bits) == {4, 8}
  for bits, group in by_bits.items():
    assert group['hparams'] == {'bits': bits, 'scheme': 'symmetric'}  # no seed column
    names = sorted(s['name'] for s in group['sessions'])
    assert names == [f'bits={bits},seed=0', f'bits={bits},seed=1']
    assert group['name'] == groups[names[0]] == groups[names[1]]
    assert {s['status'] for s in group['sessions']} == {'STATUS_SUCCESS'}
    for session in group['sessions']:
      seed = int(session['name'][-1])
      ((metric,),) = [session['metricValues']]
      assert metric['trainingStep'] == 20
      assert metric['value'] == pytest.approx(_final_loss(bits, seed), rel=1e-6)
    ((mean,),) = [group['metricValues']]  # TensorBoard averages the seeds
    assert mean['value'] == pytest.approx((_final_loss(bits, 0) + _final_loss(bits, 1)) / 2, rel=1e-6)


def test_server_serves_scalars_images_histograms_text(sweep):
  url, _, _ = sweep
  run = urllib.parse.quote('bits=4,seed=0')
  points = _get_json(url, f'data/plugin/scalars/scalars?run={run}&tag=eval/loss')
  assert [p[1] for p in points] == [0, 10, 20]
  assert [p[2] for p in points] == pytest.approx([2.25, 1.25, 0.25])
  images = _get_json(url, f'data/plugin/images/images?run={run}&tag=samples&sample=0')
  assert [i['step'] for i in images] == [20]
  with urllib.request.urlopen(url + 'data/plugin/images/individualImage?' + images[0]['query']) as r:
    assert r.read() == tb.encode_png(np.full((2, 2, 3), 200, np.uint8))
  ((_, step, buckets),) = _get_json(url, f'data/plugin/histograms/histograms?run={run}&tag=weights')
  assert step == 20 and buckets == [[0.0, 1.5, 2.0], [1.5, 3.0, 2.0]]
  ((text,),) = [_get_json(url, f'data/plugin/text/text?run={run}&tag=notes')]
  assert text['step'] == 20 and text['text'] == '<p>hello <em>board</em></p>'


def test_board_start_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    board.start(tmp_path / 'missing')
  assert board.main([str(tmp_path / 'missing')]) == 2


@pytest.mark.parametrize('rerun', ['resumed', 'from_scratch'])
def test_a_rerun_that_succeeds_ends_the_session_as_success(tmp_path, rerun):
  """TensorBoard keeps the first session end it reads: a crashed run's 'failure' used to outlast the rerun that
  finished it. The failure now sits in a file of its own, which the rerun drops; the crashed segment's data stays."""
  hp = {'bits': 4, 'seed': 0}
  with pytest.raises(ValueError), tb.SummaryWriter(tmp_path) as w:
    w.hparams(hp)
    w.scalar('train/loss', 3.0, step=0)
    raise ValueError('crash')
  with tb.SummaryWriter(tmp_path) as w:
    if rerun == 'resumed':
      w.continue_session()
    else:
      w.hparams(hp)
    w.scalar('train/loss', 1.0, step=10)
  end = hparams_metadata.parse_session_end_info_plugin_data(
    _content(tmp_path, hparams_metadata.SESSION_END_INFO_TAG)
  )
  assert end.status == hparams_summary_v2.api_pb2.STATUS_SUCCESS
  assert tb.read_scalars(tmp_path)['train/loss'] == [(0, 3.0), (10, 1.0)]
  assert not list(tmp_path.glob('*' + tb.FAILED_END_SUFFIX))


def test_a_second_writer_of_the_same_second_sorts_after_the_first(tmp_path, monkeypatch):
  """Event file names start with the creation second, then host, pid and a per-process counter, which sorts as
  text: in one second, counter 10 sorted before 9, and a resumed run's points were read before the crashed
  segment's (a flaky test in CI). A writer now waits for a second of its own."""
  from tensorboard.summary.writer import event_file_writer  # noqa: PLC0415

  monkeypatch.setattr(event_file_writer, '_global_uid', event_file_writer.AtomicCounter(9))
  time.sleep(1 - time.time() % 1)  # both writers would open in one second
  with tb.SummaryWriter(tmp_path) as w:
    w.scalar('train/loss', 3.0, step=0)
  with tb.SummaryWriter(tmp_path) as w:
    w.scalar('train/loss', 1.0, step=10)
  assert tb.read_scalars(tmp_path)['train/loss'] == [(0, 3.0), (10, 1.0)]
  assert [n.split('.')[-1] for n in sorted(os.listdir(tmp_path))] == ['9', '10']


def test_an_event_file_from_the_future_is_not_waited_for(tmp_path):
  """A logdir copied from a machine whose clock runs an hour ahead: the writer opens at once."""
  (tmp_path / f'events.out.tfevents.{int(time.time()) + 3600:010d}.host.1.0').write_bytes(b'')
  t = time.monotonic()
  tb.SummaryWriter(tmp_path).close()
  assert time.monotonic() - t < 0.9
