"""TensorBoard's hparams plugin without TensorFlow: the `Experiment` summary at a sweep root
(`write_hparams_experiment`: swept keys as columns, metrics) and the hparams of one trial's session, grouped over
seeds (`group_name_for`)."""


from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_plugin_data_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from experiments.config import cli as config_cli
from experiments.review.tb_values import (
  hparams_value,
)

# Suffix of the event file written by `write_hparams_experiment`; a rewrite deletes older ones.
EXPERIMENT_FILE_SUFFIX = '.hparams_experiment'
STATUS = {
  'success': api_pb2.STATUS_SUCCESS,
  'failure': api_pb2.STATUS_FAILURE,
  'unknown': api_pb2.STATUS_UNKNOWN,
}



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


def flatten_hparams(hparams: Mapping[str, Any]) -> dict[str, HParamValue]:
  """Nested mappings flattened with '.'-joined keys (clu's convention, config_cli.flatten), values normalized."""
  return {name: _normalize_hparam(name, value) for name, value in config_cli.flatten(hparams).items()}


def excluded(name: str, exclude: Iterable[str]) -> bool:
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
  kept = {k: v for k, v in flatten_hparams(hparams).items() if not excluded(k, exclude)}
  text = json.dumps(kept, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def set_hparam_value(target, value: HParamValue) -> None:
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


def experiment_proto(
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


def discrete_info(name: str, values: Sequence[Any]) -> api_pb2.HParamInfo:
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
  infos = [discrete_info(name, values) for name, values in hparam_domains.items()]
  data = experiment_proto(infos, metrics, description, time_created_secs)
  for old in glob.glob(os.path.join(glob.escape(root), f'events.out.tfevents.*{EXPERIMENT_FILE_SUFFIX}')):
    os.remove(old)
  writer = EventFileWriter(root, filename_suffix=EXPERIMENT_FILE_SUFFIX)
  summary = summary_pb2.Summary(value=[hparams_value(hparams_metadata.EXPERIMENT_TAG, data)])
  writer.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=summary))
  writer.close()
  (path,) = glob.glob(os.path.join(glob.escape(root), f'events.out.tfevents.*{EXPERIMENT_FILE_SUFFIX}'))
  return path
