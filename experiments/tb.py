"""TensorBoard event files without TensorFlow.

Summaries are built from the `tensorboard` package's own protos and plugin metadata
(`tensorboard.compat.proto`, `tensorboard.plugins.*.metadata`) and written with its
`EventFileWriter`; nothing here imports TensorFlow. Formats, one per dashboard:

  scalar     scalars plugin, DT_FLOAT rank-0 tensor (as `tf.summary.scalar` writes it).
  histogram  histograms plugin, DT_DOUBLE `[k, 3]` tensor of `[left, right, count]` rows;
             rows 0..k-2 are closed-open, row k-1 is closed (as `summary_v2.histogram_pb`).
  image      images plugin, DT_STRING `[2 + n]` tensor `[width, height, png_0, ..., png_{n-1}]`.
  text       text plugin, DT_STRING rank-0 tensor (markdown).
  hparams    hparams plugin: `Experiment` at the sweep root (`write_hparams_experiment`),
             `SessionStartInfo` / `SessionEndInfo` in each trial run (`SummaryWriter.hparams`/`close`).

Sweep layout: `tensorboard --logdir <root>` where `<root>` holds the experiment
summary and one sub-directory (run) per trial. Sessions are grouped by `SessionStartInfo.group_name`;
`SummaryWriter.hparams` records, and `group_name_for` hashes, the hparams *without* the seed, so seeds
show as repeats of one group and TensorBoard averages their metrics. Read back with `read_scalars` /
`read_tags` (tensorboard's own loader); serve with `python -m experiments.board <root>`.

Example:

  write_hparams_experiment(root, {'bits': [4, 8], 'scheme': ['symmetric']}, ['eval/loss'])
  with SummaryWriter(f'{root}/bits=4,seed=0') as w:
    w.hparams({'bits': 4, 'scheme': 'symmetric', 'seed': 0})
    w.scalar('eval/loss', 0.31, step=100)
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_plugin_data_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from experiments import configlib

__all__ = [
  'SummaryWriter',
  'encode_png',
  'group_name_for',
  'histogram_buckets',
  'read_scalars',
  'read_tags',
  'write_hparams_experiment',
]

DEFAULT_BINS = 30
# Suffix of the event file written by `write_hparams_experiment`; a rewrite deletes older ones.
_EXPERIMENT_FILE_SUFFIX = '.hparams_experiment'
_STATUS = {
  'success': api_pb2.STATUS_SUCCESS,
  'failure': api_pb2.STATUS_FAILURE,
  'unknown': api_pb2.STATUS_UNKNOWN,
}


# ---------------------------------------------------------------------------------------------------------
# Tensor and metadata construction.


def _shape(*dims: int) -> tensor_shape_pb2.TensorShapeProto:
  return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])


def _metadata(base: summary_pb2.SummaryMetadata, data_class: int) -> summary_pb2.SummaryMetadata:
  base.data_class = data_class
  return base


def _to_float(value: Any, what: str) -> float:
  """Python float from a Python, numpy or jax scalar (any array with exactly one element)."""
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f'{what}: expected a scalar, got shape {arr.shape}')
  if arr.dtype.kind not in 'biuf':
    # ml_dtypes (bfloat16, float8_*) report kind 'V'; they convert to float64 fine.
    try:
      arr = arr.astype(np.float64)
    except (TypeError, ValueError) as e:
      raise TypeError(f'{what}: cannot convert dtype {arr.dtype} to float') from e
  return float(arr.reshape(()))


def _to_step(step: Any) -> int:
  arr = np.asarray(step)
  if arr.size != 1 or arr.dtype.kind not in 'iu':
    raise TypeError(f'step must be an integer scalar, got {step!r}')
  return int(arr.reshape(()))


def _scalar_value(tag: str, value: Any) -> summary_pb2.Summary.Value:
  tensor = tensor_pb2.TensorProto(
    dtype=types_pb2.DT_FLOAT, tensor_shape=_shape(), float_val=[_to_float(value, tag)]
  )
  meta = _metadata(scalar_metadata.create_summary_metadata('', ''), summary_pb2.DATA_CLASS_SCALAR)
  return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)


def histogram_buckets(values: Any, bins: int | Sequence[float] = DEFAULT_BINS) -> np.ndarray:
  """The histograms plugin's `[k, 3]` float64 array of `[left_edge, right_edge, count]` rows.

  Non-finite values are dropped. With `bins` an int k: k equal-width buckets spanning [min, max];
  no (finite) data gives k all-zero rows; a constant array gives k rows with left == right == value
  and all the count in the last row (the conventions of `tensorboard.plugins.histogram.summary_v2`).
  With `bins` a sequence of k + 1 increasing edges: those buckets, values outside them not counted.
  """
  data = np.asarray(values).astype(np.float64).ravel()
  data = data[np.isfinite(data)]
  if isinstance(bins, (int, np.integer)):
    k = int(bins)
    if k < 1:
      raise ValueError(f'bins must be >= 1, got {bins}')
    if data.size == 0:
      return np.zeros((k, 3))
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
      counts = np.zeros(k)
      counts[-1] = data.size
      return np.stack([np.full(k, lo), np.full(k, lo), counts], axis=1)
    counts, edges = np.histogram(data, bins=k, range=(lo, hi))
  else:
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
      raise ValueError('bins as edges must be a 1-D strictly increasing sequence of >= 2 values')
    counts, edges = np.histogram(data, bins=edges)
  return np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)


def _histogram_value(tag: str, values: Any, bins: int | Sequence[float]) -> summary_pb2.Summary.Value:
  buckets = histogram_buckets(values, bins)
  tensor = tensor_pb2.TensorProto(
    dtype=types_pb2.DT_DOUBLE, tensor_shape=_shape(*buckets.shape), tensor_content=buckets.tobytes()
  )
  meta = _metadata(histogram_metadata.create_summary_metadata('', ''), summary_pb2.DATA_CLASS_TENSOR)
  return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)


def encode_png(image: Any) -> bytes:
  """PNG bytes (8-bit, no filtering) of an `(H, W)` or `(H, W, C)` image, C in {1, 2, 3, 4}.

  uint8 is written as is; bool maps to {0, 255}; floats are clipped to [0, 1] and scaled by 255.
  C = 1: grey, 2: grey + alpha, 3: RGB, 4: RGBA.
  """
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
    raise ValueError(f'expected an (H, W) or (H, W, C) image with C in 1..4, got shape {arr.shape}')
  if arr.dtype == np.bool_:
    arr = arr.astype(np.uint8) * 255
  elif arr.dtype.kind == 'f' or arr.dtype.kind == 'V':
    arr = np.round(np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
  elif arr.dtype != np.uint8:
    raise TypeError(f'image dtype must be uint8, bool or float in [0, 1], got {arr.dtype}')
  height, width, channels = arr.shape
  color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  raw = np.concatenate([np.zeros((height, 1), np.uint8), arr.reshape(height, width * channels)], axis=1)

  def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack('>I', len(payload)) + kind + payload + struct.pack('>I', zlib.crc32(kind + payload))

  header = struct.pack('>IIBBBBB', width, height, 8, color_type, 0, 0, 0)
  return (
    b'\x89PNG\r\n\x1a\n'
    + chunk(b'IHDR', header)
    + chunk(b'IDAT', zlib.compress(raw.tobytes(), 6))
    + chunk(b'IEND', b'')
  )


def _png_size(png: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's IHDR chunk."""
  if len(png) < 24 or png[:8] != b'\x89PNG\r\n\x1a\n' or png[12:16] != b'IHDR':
    raise ValueError('bytes given to image() are not a PNG file')
  return struct.unpack('>II', png[16:24])


def _image_value(tag: str, image: Any) -> summary_pb2.Summary.Value:
  if isinstance(image, (bytes, bytearray, memoryview)):
    pngs = [bytes(image)]
  else:
    arr = np.asarray(image)
    pngs = [encode_png(a) for a in arr] if arr.ndim == 4 else [encode_png(arr)]
  sizes = {_png_size(p) for p in pngs}
  if len(sizes) != 1:
    raise ValueError(f'all images of one summary must share a size, got {sorted(sizes)}')
  ((width, height),) = sizes
  tensor = tensor_pb2.TensorProto(
    dtype=types_pb2.DT_STRING,
    tensor_shape=_shape(2 + len(pngs)),
    string_val=[str(width).encode(), str(height).encode(), *pngs],
  )
  meta = _metadata(image_metadata.create_summary_metadata('', ''), summary_pb2.DATA_CLASS_BLOB_SEQUENCE)
  return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)


def _text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
  if not isinstance(text, str):
    raise TypeError(f'text must be a str, got {type(text).__name__}')
  tensor = tensor_pb2.TensorProto(
    dtype=types_pb2.DT_STRING, tensor_shape=_shape(), string_val=[text.encode()]
  )
  meta = _metadata(text_metadata.create_summary_metadata('', ''), summary_pb2.DATA_CLASS_TENSOR)
  return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)


def _hparams_value(tag: str, data: hparams_plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary.Value:
  meta = _metadata(hparams_metadata.create_summary_metadata(data), summary_pb2.DATA_CLASS_TENSOR)
  return summary_pb2.Summary.Value(tag=tag, tensor=hparams_metadata.NULL_TENSOR, metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# HParams values, groups, experiment.

HParamValue = bool | int | float | str


def _normalize_hparam(name: str, value: Any) -> HParamValue:
  """bool / float (ints kept as int) / str. numpy and jax scalars become Python scalars,
  None becomes '' (clu's convention), lists and tuples their `str`."""
  if value is None:
    return ''
  if isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return str(value)
  arr = np.asarray(value)
  if arr.shape == () and arr.dtype.kind in 'biuf':
    return arr.item()
  if arr.shape == () and arr.dtype.kind in 'US':
    return str(arr.item())
  raise TypeError(f'hparams[{name!r}] = {value!r}: unsupported type {type(value).__name__}')


def _flatten(hparams: Mapping[str, Any]) -> dict[str, HParamValue]:
  """Nested mappings flattened with '.'-joined keys (clu's convention, configlib.flatten), values normalized."""
  return {name: _normalize_hparam(name, value) for name, value in configlib.flatten(hparams).items()}


def _excluded(name: str, exclude: Iterable[str]) -> bool:
  last = name.replace('/', '.').rsplit('.', 1)[-1]
  return name in exclude or last in exclude


def group_name_for(hparams: Mapping[str, Any], exclude: Iterable[str] = ('seed',)) -> str:
  """Deterministic session-group name: sha256 hex of the hparams without the excluded keys.

  A key is excluded when it, or its last '.'/'/'-separated segment, is in `exclude` (so
  `config.seed` goes with `seed`). The digest is the one TensorBoard's own `hparams_pb` derives
  (`json.dumps(..., sort_keys=True, separators=(',', ':'))`), so with `exclude=()` it equals the
  default group TensorBoard would assign. Independent of dict order, Python vs numpy scalars.
  """
  exclude = tuple(exclude)
  kept = {k: v for k, v in _flatten(hparams).items() if not _excluded(k, exclude)}
  text = json.dumps(kept, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _set_value(target, value: HParamValue) -> None:
  """Sets a `google.protobuf.Value` (bool before int: bool is an int in Python)."""
  if isinstance(value, bool):
    target.bool_value = value
  elif isinstance(value, (int, float)):
    target.number_value = value
  else:
    target.string_value = value


def _data_type(name: str, values: Sequence[HParamValue]) -> int:
  kinds = {
    'bool' if isinstance(v, bool) else 'number' if isinstance(v, (int, float)) else 'str' for v in values
  }
  if len(kinds) != 1:
    raise TypeError(f'hparam {name!r}: values mix types {sorted(kinds)}: {list(values)!r}')
  return {
    'bool': api_pb2.DATA_TYPE_BOOL,
    'number': api_pb2.DATA_TYPE_FLOAT64,
    'str': api_pb2.DATA_TYPE_STRING,
  }[kinds.pop()]


def _metric_info(metric: str | tuple[str, str]) -> api_pb2.MetricInfo:
  group, tag = ('', metric) if isinstance(metric, str) else metric
  return api_pb2.MetricInfo(name=api_pb2.MetricName(group=group, tag=tag))


def _experiment(
  hparam_infos: list[api_pb2.HParamInfo],
  metrics: Sequence[str | tuple[str, str]],
  description: str,
  time_created_secs: float | None,
) -> hparams_plugin_data_pb2.HParamsPluginData:
  return hparams_plugin_data_pb2.HParamsPluginData(
    experiment=api_pb2.Experiment(
      description=description,
      time_created_secs=time.time() if time_created_secs is None else time_created_secs,
      hparam_infos=hparam_infos,
      metric_infos=[_metric_info(m) for m in metrics],
    )
  )


def _discrete_info(name: str, values: Sequence[Any]) -> api_pb2.HParamInfo:
  normalized = [_normalize_hparam(name, v) for v in values]
  if not normalized:
    raise ValueError(f'hparam {name!r}: empty domain')
  dtype = _data_type(name, normalized)
  if dtype == api_pb2.DATA_TYPE_FLOAT64:
    normalized = [float(v) for v in normalized]
  info = api_pb2.HParamInfo(name=name, type=dtype)
  info.domain_discrete.extend(sorted(set(normalized)))
  return info


def write_hparams_experiment(
  root_logdir: str | os.PathLike,
  hparam_domains: Mapping[str, Sequence[Any]],
  metrics: Sequence[str | tuple[str, str]],
  *,
  description: str = '',
  time_created_secs: float | None = None,
) -> str:
  """Writes the HParams `Experiment` summary at a sweep root; returns the event file's path.

  `tensorboard --logdir root_logdir` then lists every trial run below it (each written with
  `SummaryWriter.hparams`) in the HParams dashboard, with these columns.

  Args:
    root_logdir: the sweep root (the trials' logdirs are its sub-directories).
    hparam_domains: name -> discrete domain. Values of one name must all be str, all bool, or all
      numbers (int/float, shown as FLOAT64: TensorBoard has no int type). Leave `seed` out, so seeds
      are not a column and repeats of a configuration show as one session group.
    metrics: scalar tags written by the trials (e.g. 'eval/loss'); a `(group, tag)` tuple names a tag
      in the trial's sub-directory `group` (e.g. ('eval', 'loss') for `<trial>/eval`).
    description: markdown shown in the dashboard.
    time_created_secs: defaults to now.

  A rewrite replaces the earlier experiment file of this function (TensorBoard keeps the first
  summary of a tag per run, so two would not update it). A TensorBoard already running keeps what
  it loaded until restarted.
  """
  root = os.fspath(root_logdir)
  os.makedirs(root, exist_ok=True)
  infos = [_discrete_info(name, values) for name, values in hparam_domains.items()]
  data = _experiment(infos, metrics, description, time_created_secs)
  for old in glob.glob(os.path.join(glob.escape(root), f'events.out.tfevents.*{_EXPERIMENT_FILE_SUFFIX}')):
    os.remove(old)
  writer = EventFileWriter(root, filename_suffix=_EXPERIMENT_FILE_SUFFIX)
  summary = summary_pb2.Summary(value=[_hparams_value(hparams_metadata.EXPERIMENT_TAG, data)])
  writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
  writer.close()
  (path,) = glob.glob(os.path.join(glob.escape(root), f'events.out.tfevents.*{_EXPERIMENT_FILE_SUFFIX}'))
  return path


# ---------------------------------------------------------------------------------------------------------
# Writer.


class SummaryWriter:
  """Writes TensorBoard summaries for one run (one logdir) with no TensorFlow.

  Each call appends one event; `step` is an int (numpy / jax integer scalars accepted). Events are
  queued and flushed every `flush_secs`, on `flush()` and on `close()`. As a context manager, exit
  closes with status 'success', or 'failure' when an exception escapes.
  """

  def __init__(
    self,
    logdir: str | os.PathLike,
    *,
    flush_secs: float = 10.0,
    max_queue: int = 100,
    filename_suffix: str = '',
  ):
    self._logdir = os.fspath(logdir)
    self._writer = EventFileWriter(
      self._logdir, max_queue_size=max_queue, flush_secs=flush_secs, filename_suffix=filename_suffix
    )
    self._wrote_session_start = False
    self._closed = False

  @property
  def logdir(self) -> str:
    return self._logdir

  def _write(self, values: list[summary_pb2.Summary.Value], step: Any) -> None:
    if self._closed:
      raise RuntimeError(f'SummaryWriter({self._logdir!r}) is closed')
    summary = summary_pb2.Summary(value=values)
    event = event_pb2.Event(wall_time=time.time(), step=_to_step(step), summary=summary)
    self._writer.add_event(event)

  def scalar(self, tag: str, value: Any, step: Any) -> None:
    """A scalars-dashboard point (stored as float32, as TensorFlow does)."""
    self._write([_scalar_value(tag, value)], step)

  def scalars(self, values: Mapping[str, Any], step: Any) -> None:
    """Several scalars at one step, in one event."""
    self._write([_scalar_value(tag, v) for tag, v in values.items()], step)

  def histogram(self, tag: str, values: Any, step: Any, bins: int | Sequence[float] = DEFAULT_BINS) -> None:
    """Histogram of `values` (any shape; non-finite entries dropped). See `histogram_buckets`."""
    self._write([_histogram_value(tag, values, bins)], step)

  def image(self, tag: str, image: Any, step: Any) -> None:
    """PNG bytes, an `(H, W[, C])` image, or an `(N, H, W, C)` batch of N same-size images.

    Arrays: uint8, bool, or float in [0, 1]; see `encode_png`.
    """
    self._write([_image_value(tag, image)], step)

  def text(self, tag: str, text: str, step: Any) -> None:
    """Markdown text."""
    self._write([_text_value(tag, text)], step)

  def hparams(
    self,
    hparams: Mapping[str, Any],
    metrics: Sequence[str | tuple[str, str]] | None = None,
    group_name: str | None = None,
    *,
    exclude: Iterable[str] = ('seed',),
    start_time_secs: float | None = None,
  ) -> str:
    """Marks this run as an HParams session with these values; returns its group name.

    Nested mappings are flattened with '.'; values are bool, int, float, str (numpy / jax scalars,
    None -> '', lists/tuples -> str). Keys matched by `exclude` (default: `seed`, see
    `group_name_for`) are neither recorded nor hashed: TensorBoard shows one set of values per session
    group (copied from one of its sessions), so a recorded seed would be shown wrongly for the other
    repeats. The default `group_name` is `group_name_for(hparams, exclude)`: runs that differ only in
    the seed form one group and TensorBoard averages their metrics. `exclude=()` records everything and
    makes every distinct configuration, seed included, its own group.

    `metrics`: leave None inside a sweep that has `write_hparams_experiment` at its root. Given, it
    also writes an `Experiment` into this run (its own values as one-point domains, these metric tags)
    for a run viewed on its own; with several experiment summaries under one logdir TensorBoard uses
    an arbitrary one.
    """
    if self._wrote_session_start:
      # TensorBoard keeps the first summary of a tag per run; a second one would be ignored.
      raise RuntimeError('hparams() was already called for this run')
    exclude = tuple(exclude)
    values = {k: v for k, v in _flatten(hparams).items() if not _excluded(k, exclude)}
    name = group_name_for(hparams, exclude) if group_name is None else group_name
    start = hparams_plugin_data_pb2.SessionStartInfo(
      group_name=name, start_time_secs=time.time() if start_time_secs is None else start_time_secs
    )
    for key in sorted(values):
      _set_value(start.hparams[key], values[key])
    summary_values = [
      _hparams_value(
        hparams_metadata.SESSION_START_INFO_TAG,
        hparams_plugin_data_pb2.HParamsPluginData(session_start_info=start),
      )
    ]
    if metrics is not None:
      infos = [_discrete_info(key, [values[key]]) for key in sorted(values)]
      experiment = _experiment(infos, metrics, '', None)
      summary_values.append(_hparams_value(hparams_metadata.EXPERIMENT_TAG, experiment))
    self._write(summary_values, 0)
    self._wrote_session_start = True
    return name

  def flush(self) -> None:
    self._writer.flush()

  def close(self, status: str | None = 'success') -> None:
    """Flushes and closes. If `hparams()` was called, first ends the session with `status`
    ('success', 'failure', 'unknown'; None writes no end). Idempotent."""
    if self._closed:
      return
    if status is not None and status not in _STATUS:
      raise ValueError(f'status must be one of {sorted(_STATUS)} or None, got {status!r}')
    if self._wrote_session_start and status is not None:
      end = hparams_plugin_data_pb2.SessionEndInfo(status=_STATUS[status], end_time_secs=time.time())
      data = hparams_plugin_data_pb2.HParamsPluginData(session_end_info=end)
      self._write([_hparams_value(hparams_metadata.SESSION_END_INFO_TAG, data)], 0)
    self._closed = True
    self._writer.close()

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self.close('failure' if exc_type is not None else 'success')


# ---------------------------------------------------------------------------------------------------------
# Reading back (tensorboard's own loader, as the server uses it).


def _accumulator(logdir: str | os.PathLike) -> plugin_event_accumulator.EventAccumulator:
  path = os.fspath(logdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no such logdir: {path}')
  acc = plugin_event_accumulator.EventAccumulator(path, size_guidance={plugin_event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] in file order, for the event files directly in `logdir` (one run;
  sub-directories are other runs). Reads with the loader TensorBoard's server uses, so legacy
  `simple_value` scalars are included and, as in TensorBoard, points orphaned by a restart are purged.
  """
  acc = _accumulator(logdir)
  out: dict[str, list[tuple[int, float]]] = {}
  for tag in sorted(acc.PluginTagToContent(scalar_metadata.PLUGIN_NAME)):
    out[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto).item())) for e in acc.Tensors(tag)]
  return out


def read_tags(logdir: str | os.PathLike) -> dict[str, set[str]]:
  """plugin name ('scalars', 'histograms', 'images', 'text', 'hparams', ...) -> tags, for one run."""
  acc = _accumulator(logdir)
  return {plugin: set(acc.PluginTagToContent(plugin)) for plugin in sorted(acc.ActivePlugins())}
