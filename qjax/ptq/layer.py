"""What every PTQ method works on: one quantized op's kernel and its calibration statistics.

Kernels are in Flax's Dense layout, w (in, out) with y = x . w + b, and a method sees one op at a time:

    Stats     sums over the calibration inputs x (n, in) of the op: n, x^T x, sum x, sum |x|, max |x|, and a
              bounded sample of rows (AWQ and AdaRound need raw inputs; the sample keeps memory fixed however
              large the calibration set).
    Layer     the kernel as the op now sees it, its weight spec, bias, the statistics, and what earlier methods
              decided: `q` (a QArray on the spec's grid, once a rounding method ran) and the online input
              transform x -> (x @ rotation) / scale (rotations, SmoothQuant, AWQ) that the float op must apply.

A convolution's kernel is its im2col form, w (kh kw in, out), whose K = kh kw C features are (position, channel)
pairs, channel fastest. An online scale can only act on the conv's input channels, so a Layer with `tied = C`
asks for per-feature scales that repeat every C features: s_f = tile(s_c, kh kw) (`per_channel`, `per_feature`).

Invariant of every method: with the input transform applied, x . w (the float kernel it hands on) equals the
original layer's float output up to float rounding; only `q` carries quantization error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax import formats, quantizers
from qjax.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class Stats:
  """Calibration statistics of one op's input x (rows of `in` features). See `stats_of` and `merge`."""
  n: int                 # rows seen
  xtx: np.ndarray        # (in, in)  sum x^T x
  x_sum: np.ndarray      # (in,)     sum x
  x_abs_sum: np.ndarray  # (in,)     sum |x|
  x_absmax: np.ndarray   # (in,)     max |x|
  sample: np.ndarray     # (m, in)   at most `max_sample` rows, spread over the calibration set

  @property
  def hessian(self) -> np.ndarray:
    """H = 2/n x^T x (GPTQ)."""
    return 2.0 / max(self.n, 1) * self.xtx

  @property
  def mean(self) -> np.ndarray:
    return self.x_sum / max(self.n, 1)

  @property
  def abs_mean(self) -> np.ndarray:
    return self.x_abs_sum / max(self.n, 1)


def stats_of(x, max_sample: int = 512) -> Stats:
  """Statistics of one batch of inputs x (..., in); the sample takes evenly spaced rows."""
  x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
  idx = np.linspace(0, len(x) - 1, min(max_sample, len(x))).astype(int) if len(x) else np.zeros(0, int)
  return Stats(len(x), x.T @ x, x.sum(0), np.abs(x).sum(0), np.abs(x).max(0, initial=0.0),
               x[idx].astype(np.float32))


def merge(a: Stats | None, b: Stats, max_sample: int = 512) -> Stats:
  """Statistics of the union of two sets of rows; the sample keeps an even share of each batch's rows."""
  if a is None:
    return b
  sample = np.concatenate([a.sample, b.sample])
  if len(sample) > max_sample:
    sample = sample[np.linspace(0, len(sample) - 1, max_sample).astype(int)]
  return Stats(a.n + b.n, a.xtx + b.xtx, a.x_sum + b.x_sum, a.x_abs_sum + b.x_abs_sum,
               np.maximum(a.x_absmax, b.x_absmax), sample)


def transform_stats(s: Stats, rotation=None, scale=None) -> Stats:
  """The statistics of x' = (x @ rotation) / scale. Exact for n, x^T x, sum x and the sample; the absolute
  sums and maxima of a rotated input are not functions of these sums, so they are taken from the sample."""
  r = np.eye(len(s.x_sum)) if rotation is None else np.asarray(rotation, np.float64)
  d = np.ones(len(s.x_sum)) if scale is None else 1.0 / np.asarray(scale, np.float64)
  m = r * d[None, :]                                   # x' = x @ m
  sample = (s.sample.astype(np.float64) @ m).astype(np.float32)
  if rotation is None:
    abs_sum, absmax = s.x_abs_sum * np.abs(d), s.x_absmax * np.abs(d)
  else:
    abs_sum = np.abs(sample).mean(0) * s.n if len(sample) else np.zeros_like(s.x_sum)
    absmax = np.abs(sample).max(0, initial=0.0)
  return Stats(s.n, m.T @ s.xtx @ m, s.x_sum @ m, abs_sum, absmax, sample)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One op under PTQ: its float kernel w (in, out), weight spec, bias (out,) or None (a method may give a
  layer without one a bias: bias correction), input statistics, and what earlier methods decided: q (QArray,
  None until a rounding method ran), the online input transform (rotation (in, in) and/or scale (in,): the op
  computes ((x @ rotation) / scale) . w), and per-method notes."""
  w: np.ndarray
  spec: QuantSpec
  stats: Stats
  bias: np.ndarray | None = None
  q: quantizers.QArray | None = None
  rotation: np.ndarray | None = None
  scale: np.ndarray | None = None
  notes: tuple = ()
  tied: int | None = None  # C: the features are (position, channel) pairs and an input scale is per channel
  float_out_mean: np.ndarray | None = None  # (out,) E[x_f . w + b] on the float model's inputs x_f, when `stats`
                                            # are of other inputs (sequential calibration: the quantized model's)

  def replace(self, **kw) -> Layer:
    return dataclasses.replace(self, **kw)

  def transform_input(self, x):
    """The online op on this layer's (original) input: (x @ rotation) / scale."""
    x = np.asarray(x, np.float64)
    if self.rotation is not None:
      x = x @ self.rotation
    return x if self.scale is None else x / self.scale


def per_channel(v, tied: int | None, reduce=np.max) -> np.ndarray:
  """A per-feature statistic (K,) reduced over positions to (C,) when features are tied, else as it is."""
  v = np.asarray(v, np.float64)
  if tied is not None and len(v) % tied:
    raise ValueError(f'{len(v)} features are not whole positions of {tied} channels')
  return v if tied is None else reduce(v.reshape(-1, tied), axis=0)


def per_feature(s, k: int) -> np.ndarray:
  """A per-channel scale (C,) repeated over the positions of K features (channel fastest): (K,)."""
  s = np.asarray(s, np.float64)
  if k % len(s):
    raise ValueError(f'{k} features are not whole positions of {len(s)} channels')
  return np.tile(s, k // len(s))


def kernel_spec(spec: QuantSpec, what: str = 'PTQ') -> QuantSpec:
  """The spec of a kernel (in, out): one grid per output column (per_channel, axis 1) or per group of rows
  along the input (per_group, axis 0); per_tensor as it is. Integer formats only."""
  if not isinstance(spec.fmt, formats.IntFormat) or spec.fmt.binary:
    raise ValueError(f'{what} needs an integer weight format of 2..8 bits, got {spec.format!r}')
  if spec.granularity == 'per_channel':
    return spec.replace(axis=1)
  if spec.granularity == 'per_group':
    return spec.replace(axis=0)
  return spec


def rtn(w, spec: QuantSpec) -> quantizers.QArray:
  """Round-to-nearest on the spec's calibrated grid: the baseline every method is compared with."""
  return quantizers.quantize(jnp.asarray(w, jnp.float32), kernel_spec(spec))


def output_error(x, w, w_hat) -> float:
  """||x . (w - w_hat)||^2 summed over rows: a layer's reconstruction error."""
  d = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) - np.asarray(w_hat, np.float64))
  return float(np.sum(d * d))


def as_array(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)
