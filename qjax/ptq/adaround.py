"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up, on a layer's calibration inputs.

    w_tilde = s . (clip(floor(w / s) + h(V) + z, qmin, qmax) - z)
    h(V)    = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)          rectified sigmoid, zeta = 1.1, gamma = -0.1
    loss    = mean((x . w - x . w_tilde)^2)  +  lambda . sum(1 - |2 h(V) - 1|^beta)       lambda = 0.01

lambda weighs the regulariser against the mean squared output error, so its useful size depends on the
layer's output scale: where h has not settled at 0 or 1 by the end, raise it.
V starts where h(V) = frac(w / s) (w_tilde = w inside the grid's range). The regulariser is off for the first
`warmup` (20%) of the iterations; then beta falls linearly from 20 to 2, pushing h to 0 or 1. Adam, lr 1e-3,
batches of 32 rows, 10k iterations (AIMET's default). The result rounds hard (h = [V >= 0]): every weight lands
on floor(w / s) or floor(w / s) + 1 on the round-to-nearest grid (s, z) of w.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from qjax import calibration, quantizers
from qjax import granularity as gran
from qjax.ptq import layer as L
from qjax.ptq import registry
from qjax.spec import QuantSpec

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v):
  """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac):
  """V with h(V) = frac (frac in [0, 1)): the inverse of the rectified sigmoid."""
  p = (jnp.asarray(frac) - GAMMA) / (ZETA - GAMMA)
  return jnp.log(p) - jnp.log1p(-p)


def regularizer(h, beta):
  """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.power(jnp.abs(2.0 * h - 1.0), beta))


def beta_schedule(step, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
  """(beta, regulariser on): off during the warm-up; then beta = end + (start - end) (1 - rel), with rel the
  fraction of the decay done."""
  step = jnp.asarray(step, jnp.float32)
  t0 = warmup * iters
  rel = (step - t0) / max(iters - t0, 1.0)
  beta = end + (start - end) * jnp.clip(1.0 - rel, 0.0, 1.0)
  return beta, step >= t0


class AdaRoundResult(NamedTuple):
  q: quantizers.QArray     # on the RTN grid of w
  w_hat: jax.Array
  h: jax.Array             # the final soft rounding h(V), before hard rounding


def _soft(w, v, s, z, qmin, qmax, hard: bool):
  h = (v >= 0).astype(jnp.float32) if hard else rectified_sigmoid(v)
  q = jnp.clip(jnp.floor(w / s) + h + z, qmin, qmax)
  return q, (q - z) * s


@functools.partial(jax.jit, static_argnames=('iters', 'batch_size', 'lr', 'reg_weight', 'warmup', 'beta_range',
                                             'qmin', 'qmax'))
def _optimise(w, x, y, s, z, key, *, iters, batch_size, lr, reg_weight, warmup, beta_range, qmin, qmax):
  v = init_v(w / s - jnp.floor(w / s))
  opt = optax.adam(lr)

  def loss(v, xb, yb, beta, on):
    _, w_t = _soft(w, v, s, z, qmin, qmax, False)
    rec = jnp.mean(jnp.square(yb - xb @ w_t))  # the mean over all outputs (AIMET's mse_loss)
    return rec + jnp.where(on, reg_weight, 0.0) * regularizer(rectified_sigmoid(v), beta)

  def step(carry, i):
    v, st = carry
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, x.shape[0])
    beta, on = beta_schedule(i, iters, warmup, *beta_range)
    g = jax.grad(loss)(v, x[idx], y[idx], beta, on)
    upd, st = opt.update(g, st, v)
    return (optax.apply_updates(v, upd), st), None

  (v, _), _ = jax.lax.scan(step, (v, opt.init(v)), jnp.arange(iters))
  return v


def adaround(w, x, spec: QuantSpec, *, y=None, iters: int = 10000, batch_size: int = 32, lr: float = 1e-3,
             reg_weight: float = 0.01, warmup: float = 0.2, beta_range: tuple[float, float] = (20.0, 2.0),
             seed: int = 0) -> AdaRoundResult:
  """AdaRound of a kernel w (in, out) on calibration rows x (n, in); targets y = x . w unless given (AdaRound
  feeds the quantized network's inputs x and the float network's outputs y)."""
  spec = L.kernel_spec(spec, 'AdaRound')
  if spec.rounding != 'nearest':
    raise ValueError('AdaRound learns the rounding; the weight spec must have rounding="nearest"')
  w, x = L.as_array(w), L.as_array(x)
  y = x @ w if y is None else L.as_array(y)
  scale, zp = calibration.calibrate(w, spec)
  s = gran.expand(scale, w.shape)
  z = jnp.zeros_like(w) if zp is None else gran.expand(zp, w.shape).astype(jnp.float32)
  fmt = spec.fmt
  v = _optimise(w, x, y, s, z, jax.random.key(seed), iters=int(iters), batch_size=int(batch_size), lr=float(lr),
                reg_weight=float(reg_weight), warmup=float(warmup), beta_range=tuple(map(float, beta_range)),
                qmin=fmt.qmin, qmax=fmt.qmax)
  qv, w_hat = _soft(w, v, s, z, fmt.qmin, fmt.qmax, True)
  q = quantizers.QArray(qv.astype(fmt.container), scale, zp, spec.format)
  return AdaRoundResult(q, w_hat, rectified_sigmoid(v))


def _run(layer: L.Layer, **kw) -> L.Layer:
  kw['beta_range'] = tuple(kw['beta_range'])
  res = adaround(layer.w, layer.stats.sample, layer.spec, **kw)
  return layer.replace(q=res.q)


def _check_params(p) -> None:
  registry.at_least('adaround', 'iters', p['iters'], 1)
  registry.at_least('adaround', 'batch_size', p['batch_size'], 1)
  registry.at_least('adaround', 'reg_weight', p['reg_weight'], 0.0)
  registry.within('adaround', 'warmup', p['warmup'], 0.0, 1.0)
  if not p['lr'] > 0:
    raise ValueError(f'adaround.lr must be > 0, got {p["lr"]!r}')
  b = tuple(p['beta_range'])
  if len(b) != 2 or not b[0] >= b[1] > 0:
    raise ValueError(f'adaround.beta_range must be (start, end) with start >= end > 0 (annealed down), got {b!r}')


registry.register(registry.PTQMethod('adaround', _run, {
    'iters': 10000, 'batch_size': 32, 'lr': 1e-3, 'reg_weight': 0.01, 'warmup': 0.2, 'beta_range': (20.0, 2.0),
    'seed': 0}, rounds=True, check=_check_params))
