"""DoReFa-Net weights (Zhou et al., 2016): tanh normalisation onto [0, 1], then k-bit uniform levels.

With n = qmax - qmin steps of the spec's integer format (2^k - 1 for int{k} / uint{k}) and m = max |tanh w| per
scale group (per tensor in the paper):

    t = tanh(w) / (2 m) + 1/2  in [0, 1],    w_q = 2 round(n t) / n - 1    (levels -1, -1 + 2/n, ..., 1)

The backward is the STE through round with m held constant (stop_gradient):

    dw = g * 2 * dt/dw = g * (1 - tanh(w)^2) / m

The levels are odd multiples of 1/n (no zero), not (q - zero_point) * scale with an integer zero point: the ops
run DoReFa in fake mode (native=False) and `quantize` / serving conversion refuse it (integer_grid=False).
Learns nothing; the spec's calibration is not used (m is the normaliser). NaN and +-inf stay as they are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from qjax import calibration, estimators, methods
from qjax import granularity as gran


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dorefa(w, m, n):
  return _dorefa_fwd(w, m, n)[0]


def _dorefa_fwd(w, m, n):
  wf = w.astype(jnp.float32)
  th = jnp.tanh(wf)
  mm = gran.expand(m, w.shape)
  t = th / (2 * mm) + 0.5
  w_q = 2 * jnp.round(t * n) / n - 1
  return estimators.keep_nonfinite(wf, w_q, w.dtype).astype(w.dtype), (th, mm, m)


def _dorefa_bwd(n, res, g):
  th, mm, m = res
  dw = g.astype(jnp.float32) * (1 - th * th) / mm
  return dw.astype(g.dtype), jnp.zeros_like(m)


_dorefa.defvjp(_dorefa_fwd, _dorefa_bwd)


def dorefa_weights(w, m, *, n: int):
  """DoReFa's k-bit weights (see the module docstring); m: max |tanh w| per scale group (> 0)."""
  return _dorefa(w, m, n)


def normaliser(w, sshape):
  """m = max |tanh w| per scale group, non-finite values ignored; 1 for an all-zero group (then t = 1/2)."""
  m = jnp.tanh(calibration.absmax(w, sshape))
  return jax.lax.stop_gradient(jnp.where(m > 0, m, 1.0))


@dataclasses.dataclass(frozen=True)
class DoReFa(methods.Method):
  """DoReFa weights: tanh-normalised k-bit levels (see the module docstring)."""
  needs_int: bool = True
  schemes: tuple[str, ...] = ('symmetric',)
  native: bool = False
  integer_grid: bool = False

  def check(self, spec):
    super().check(spec)
    if spec.fmt.binary:
      raise ValueError('estimator="dorefa" needs 2..8-bit levels (n = qmax - qmin steps); int1 is sign '
                       'quantization (use estimator="ste" with format="int1")')

  def fake_quant(self, x, spec, params, key):
    del params, key  # Learns nothing, rounds to nearest.
    fmt = spec.fmt
    return dorefa_weights(x, normaliser(x, gran.scale_shape(x.shape, spec)), n=int(fmt.qmax - fmt.qmin))
