"""TensorBoard event files without TensorFlow: the writer of a run's summaries and the readers.

Value builders: experiments/review/tb_values.py; the hparams experiment: experiments/review/tb_hparams.py.

Summaries are built from the `tensorboard` package's own protos and plugin metadata
(`tensorboard.compat.proto`, `tensorboard.plugins.*.metadata`) and written with its
`EventFileWriter`; nothing here imports TensorFlow. Formats, one per dashboard:

  scalar     scalars plugin, DT_FLOAT rank-0 tensor (as `tf.summary.scalar` writes it).
  histogram  histograms plugin, DT_DOUBLE `[k, 3]` tensor of `[left, right, count]` rows;
             rows 0..k-2 are closed-open, row k-1 is closed (as `summary_v2.histogram_pb`).
  image      images plugin, DT_STRING `[2 + n]` tensor `[width, height, png_0, ..., png_{n-1}]`.
  text       text plugin, DT_STRING rank-0 tensor (markdown).
  hparams    hparams plugin: `Experiment` at the sweep root (`write_hparams_experiment`),
             `SessionStartInfo` / `SessionEndInfo` in each trial run (`SummaryWriter.hparams`/`close`; a
             failed end goes in a file of its own, which a rerun drops: `drop_failed_session_end`).

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
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_plugin_data_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from experiments.review.tb_hparams import (
  STATUS,
  discrete_info,
  excluded,
  experiment_proto,
  flatten_hparams,
  group_name_for,
  set_hparam_value,
  write_hparams_experiment,
)
from experiments.review.tb_values import (
  DEFAULT_BINS,
  encode_png,
  histogram_buckets,
  histogram_value,
  hparams_value,
  image_value,
  scalar_value,
  text_value,
  to_step,
)

__all__ = [
  'FAILED_END_SUFFIX',
  'SummaryWriter',
  'drop_failed_session_end',
  'encode_png',
  'group_name_for',
  'histogram_buckets',
  'read_scalars',
  'read_tags',
  'write_hparams_experiment',
]


# The suffix of the event file that holds only a failed run's HParams session end (`SummaryWriter.close`).
FAILED_END_SUFFIX = '.failed_session_end'


def drop_failed_session_end(logdir: str | os.PathLike) -> list[str]:
  """Removes the failed session ends a crashed run left in `logdir` (its data stays); returns their paths. A
  rerun calls this before it writes, so that its own end is the one TensorBoard reads (a TensorBoard already
  running keeps what it loaded until it is restarted)."""
  gone = sorted(glob.glob(os.path.join(glob.escape(os.fspath(logdir)), f'events.out.tfevents.*{FAILED_END_SUFFIX}')))
  for path in gone:
    os.remove(path)
  return gone


def wait_for_a_later_second(logdir: str | os.PathLike) -> None:
  """Sleeps until the clock's second is past the creation second of every event file in `logdir`. TensorBoard
  reads a run's files in name order, and a name is the creation second, host, pid and a per-process counter: two
  files of one second sort by pid or by the counter as text ('10' before '9'), so a resumed run's points could be
  read before those of the segment it resumes. At most a second, and only where a file of this second exists: a
  file stamped later (copied from a machine whose clock runs ahead) is not waited for."""
  if not os.path.isdir(logdir):
    return
  stamps = [int(m.group(1)) for name in os.listdir(logdir) if (m := re.match(r'events\.out\.tfevents\.(\d+)\.', name))]
  now = int(time.time())
  if now in stamps:
    time.sleep(max(0.0, now + 1 - time.time()))


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
    wait_for_a_later_second(self._logdir)
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
    event = event_pb2.Event(wall_time=time.time(), step=to_step(step), summary=summary)
    self._writer.add_event(event)

  def scalar(self, tag: str, value: Any, step: Any) -> None:
    """A scalars-dashboard point (stored as float32, as TensorFlow does)."""
    self._write([scalar_value(tag, value)], step)

  def scalars(self, values: Mapping[str, Any], step: Any) -> None:
    """Several scalars at one step, in one event."""
    self._write([scalar_value(tag, v) for tag, v in values.items()], step)

  def histogram(self, tag: str, values: Any, step: Any, bins: int | Sequence[float] = DEFAULT_BINS) -> None:
    """Histogram of `values` (any shape; non-finite entries dropped). See `histogram_buckets`."""
    self._write([histogram_value(tag, values, bins)], step)

  def image(self, tag: str, image: Any, step: Any) -> None:
    """PNG bytes, an `(H, W[, C])` image, or an `(N, H, W, C)` batch of N same-size images.

    Arrays: uint8, bool, or float in [0, 1]; see `encode_png`.
    """
    self._write([image_value(tag, image)], step)

  def text(self, tag: str, text: str, step: Any) -> None:
    """Markdown text."""
    self._write([text_value(tag, text)], step)

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
    drop_failed_session_end(self._logdir)  # a rerun from scratch of a run that failed
    exclude = tuple(exclude)
    values = {k: v for k, v in flatten_hparams(hparams).items() if not excluded(k, exclude)}
    name = group_name_for(hparams, exclude) if group_name is None else group_name
    start = hparams_plugin_data_pb2.SessionStartInfo(
      group_name=name, start_time_secs=time.time() if start_time_secs is None else start_time_secs
    )
    for key in sorted(values):
      set_hparam_value(start.hparams[key], values[key])
    summary_values = [
      hparams_value(
        hparams_metadata.SESSION_START_INFO_TAG,
        hparams_plugin_data_pb2.HParamsPluginData(session_start_info=start),
      )
    ]
    if metrics is not None:
      infos = [discrete_info(key, [values[key]]) for key in sorted(values)]
      experiment = experiment_proto(infos, metrics, '', None)
      summary_values.append(hparams_value(hparams_metadata.EXPERIMENT_TAG, experiment))
    self._write(summary_values, 0)
    self._wrote_session_start = True
    return name

  def continue_session(self) -> None:
    """This run's HParams session was started by an earlier writer in the same logdir (a resumed run whose
    first segment called `hparams()`): `close()` ends it. Writing the start again would be ignored (TensorBoard
    keeps the first summary of a tag), and without an end the finished run would show as running. A failed
    segment's end is dropped (`drop_failed_session_end`)."""
    drop_failed_session_end(self._logdir)
    self._wrote_session_start = True

  def flush(self) -> None:
    self._writer.flush()

  def close(self, status: str | None = 'success') -> None:
    """Flushes and closes. If `hparams()` was called, first ends the session with `status`
    ('success', 'failure', 'unknown'; None writes no end). Idempotent."""
    if self._closed:
      return
    if status is not None and status not in STATUS:
      raise ValueError(f'status must be one of {sorted(STATUS)} or None, got {status!r}')
    if self._wrote_session_start and status is not None:
      end = hparams_plugin_data_pb2.SessionEndInfo(status=STATUS[status], end_time_secs=time.time())
      data = hparams_plugin_data_pb2.HParamsPluginData(session_end_info=end)
      value = hparams_value(hparams_metadata.SESSION_END_INFO_TAG, data)
      if status == 'failure':
        # In a file of its own, which a rerun drops (`drop_failed_session_end`): TensorBoard keeps the first
        # session end it reads, so a failure left beside the run's data would outlast a rerun that succeeds.
        failed = EventFileWriter(self._logdir, filename_suffix=FAILED_END_SUFFIX)
        failed.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary_pb2.Summary(value=[value])))
        failed.close()
      else:
        self._write([value], 0)
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
