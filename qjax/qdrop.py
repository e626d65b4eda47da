"""QDrop (Wei et al., ICLR 2022): randomly drop quantization during training.

Each element is fake-quantized with probability 1 - p and passed through in float with probability p (the paper
drops activation quantization this way to flatten the loss landscape for low-bit PTQ / QAT). On the calibrated
(or static) grid, with drop ~ Bernoulli(p) per element:

    out = drop ? x : x_hat,        x_hat = (clip(round(x / s + z), qmin, qmax) - z) s
    dx  = g * (drop ? 1 : 1[qmin <= y <= qmax])          (clipped STE on the quantized elements)

The drop mask needs a PRNG key (`fake_quant(..., key=...)`, the ops' `key=`); without one nothing is dropped
and QDrop is the clipped STE, which is also its evaluation / serving behaviour (`quantize` uses the plain grid).
Differentiated without a key (a training step that forgot it) it warns (NO_KEY_WARNING) rather than train the
clipped STE unnoticed; the forward alone (evaluation, calibration) does not.
Flax rules hand it a key while training: Linen when `apply` gets `rngs={'quant': key}`, NNX in train mode after
`quantize_nnx(..., seed=...)` (which raises without the seed rather than train a clipped STE unnoticed).
p is a field of the method: the registered 'qdrop' uses the paper's 0.5; register `QDrop('qdrop_p25', p=0.25)`
for another. Learns nothing. The ops run it in fake mode while it drops (dropped elements are off the grid), and as
a real low-precision matmul without a key (evaluation, serving).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from qjax import estimators, formats, methods

NO_KEY_WARNING = ("qjax: QDrop is differentiated without a PRNG key, so it drops nothing and trains as the clipped "
                  "STE; pass a key (Linen: apply(..., rngs={'quant': key}); NNX: quantize_nnx(..., seed=...); the "
                  "ops and fake_quant: key=...)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _qdrop(x, scale, zero_point, noise, drop, fmt, keyed):
  return _forward(x, scale, zero_point, noise, drop, fmt)[0]


def _forward(x, scale, zero_point, noise, drop, fmt):
  x_hat, _, _, inside = estimators._fq(x, scale, zero_point, noise, fmt)
  out = jnp.where(drop > 0, x.astype(jnp.float32), x_hat)
  return out.astype(x.dtype), (inside, drop, scale, zero_point, noise)


def _qdrop_fwd(x, scale, zero_point, noise, drop, fmt, keyed):
  # Runs only under differentiation, i.e. in training: without a key nothing is dropped, which would quietly train
  # the clipped STE instead of QDrop.
  if not keyed:
    warnings.warn(NO_KEY_WARNING, stacklevel=2)
  return _forward(x, scale, zero_point, noise, drop, fmt)


def _qdrop_bwd(fmt, keyed, res, g):
  inside, drop, scale, zero_point, noise = res
  dx = jnp.where((drop > 0) | inside, g, jnp.zeros_like(g))
  z = lambda a: None if a is None else jnp.zeros_like(a)
  return dx, jnp.zeros_like(scale), z(zero_point), z(noise), jnp.zeros_like(drop)


_qdrop.defvjp(_qdrop_fwd, _qdrop_bwd)


def qdrop(x, scale, zero_point, noise, drop, *, fmt, keyed: bool = True):
  """QDrop fake quant: `drop` (f32 0/1 of x's shape) marks the elements left in float. keyed=False: the mask
  came from no PRNG key (nothing dropped); differentiating it then warns (NO_KEY_WARNING)."""
  return _qdrop(x, scale, zero_point, noise, drop, fmt, keyed)


@dataclasses.dataclass(frozen=True)
class QDrop(methods.Method):
  """QDrop on the calibrated grid (see the module docstring)."""
  p: float = 0.5
  native: bool = False

  def __post_init__(self):
    if not 0.0 <= self.p < 1.0:
      raise ValueError(f'QDrop: the drop probability p must be in [0, 1), got {self.p}')

  def random_in_training(self) -> bool:
    return self.p > 0

  def native_for(self, key) -> bool:
    return key is None or self.p == 0  # nothing dropped: the clipped STE's output, on the grid

  def keyless_spec(self, spec):
    # Without a mask QDrop is the clipped STE; named as such, it does not warn that it trains without a key.
    return spec.replace(estimator='clipped_ste')

  def fake_quant(self, x, spec, params, key):
    scale, zero_point = methods._calibrated_grid(self, x, spec, params)
    if key is None:
      noise, drop = None, jnp.zeros(x.shape, jnp.float32)
    else:
      kr, kd = jax.random.split(key)
      noise = formats.uniform_noise(kr, x.shape, spec.rounding)
      drop = jax.random.bernoulli(kd, self.p, x.shape).astype(jnp.float32)
    if spec.rounding == 'stochastic' and noise is None:
      formats.uniform_noise(None, x.shape, spec.rounding)  # raises: stochastic rounding needs a key
    return qdrop(x, scale, zero_point, noise, drop, fmt=spec.fmt, keyed=key is not None or self.p == 0)
