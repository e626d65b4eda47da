"""TensorBoard summary values built from the `tensorboard` package's own protos and plugin metadata
(`tensorboard.compat.proto`, `tensorboard.plugins.*.metadata`), without TensorFlow: scalars, histograms, PNG
images, markdown text and the hparams plugin's data (the formats: experiments/review/tensorboard.py)."""


from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2 as hparams_plugin_data_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata

DEFAULT_BINS = 30



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


def to_step(step: Any) -> int:
  arr = np.asarray(step)
  if arr.size != 1 or arr.dtype.kind not in 'iu':
    raise TypeError(f'step must be an integer scalar, got {step!r}')
  return int(arr.reshape(()))


def scalar_value(tag: str, value: Any) -> summary_pb2.Summary.Value:
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


def histogram_value(tag: str, values: Any, bins: int | Sequence[float]) -> summary_pb2.Summary.Value:
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


def image_value(tag: str, image: Any) -> summary_pb2.Summary.Value:
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


def text_value(tag: str, text: str) -> summary_pb2.Summary.Value:
  if not isinstance(text, str):
    raise TypeError(f'text must be a str, got {type(text).__name__}')
  tensor = tensor_pb2.TensorProto(
    dtype=types_pb2.DT_STRING, tensor_shape=_shape(), string_val=[text.encode()]
  )
  meta = _metadata(text_metadata.create_summary_metadata('', ''), summary_pb2.DATA_CLASS_TENSOR)
  return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)


def hparams_value(tag: str, data: hparams_plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary.Value:
  meta = _metadata(hparams_metadata.create_summary_metadata(data), summary_pb2.DATA_CLASS_TENSOR)
  return summary_pb2.Summary.Value(tag=tag, tensor=hparams_metadata.NULL_TENSOR, metadata=meta)
