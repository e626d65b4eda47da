"""qjax.flax.capture: per-op calibration statistics in the weight's param layout, summed over batches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax.flax import capture, quantize_linen, quantize_nnx

RULES = [{'module_path': '.*', 'weight': {'format': 'int8', 'granularity': 'per_channel'}, 'act': {'format': 'int8'}}]


class TwoLayer(nn.Module):
  """A kernel stored (out, in) used as `.T` (HF Conv1D style), then an nn.Dense."""

  @nn.compact
  def __call__(self, x):
    w = self.param('w_out_in', nn.initializers.normal(), (12, x.shape[-1]))
    h = jax.lax.dot_general(x, w.T, (((x.ndim - 1,), (0,)), ((), ())))
    return nn.Dense(5, name='head')(jnp.tanh(h))


def batches(n, seed=0):
  return [jax.random.normal(jax.random.key(seed + i), (3, 4, 8)) for i in range(n)]


def test_linen_capture_matches_brute_force_sums():
  qm = quantize_linen(TwoLayer(), RULES)
  xs = batches(3)
  v = qm.init(jax.random.key(0), xs[0])
  out = capture.capture_linen(qm, v, xs)
  assert set(out) == {'<root>/dot_general0', 'head/dot_general0'}
  site, st = out['<root>/dot_general0']
  assert (site.weight, site.weight_side, site.weight_shape, site.contracting, site.features) == (
      'w_out_in', 'rhs', (12, 8), (1,), 8)
  x2 = np.concatenate([np.asarray(x).reshape(-1, 8) for x in xs]).astype(np.float64)
  assert float(st.count) == x2.shape[0] == 36
  np.testing.assert_allclose(st.xtx, x2.T @ x2, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.absmax, np.abs(x2).max(0), rtol=1e-6)
  np.testing.assert_allclose(st.mean_abs, np.abs(x2).mean(0), rtol=1e-5)
  np.testing.assert_allclose(st.mean_sq, (x2 ** 2).mean(0), rtol=1e-5)
  h = np.tanh(x2 @ np.asarray(v['params']['w_out_in'], np.float64).T)  # the head's input, in float
  hsite, hst = out['head/dot_general0']
  assert (hsite.weight, hsite.contracting, hsite.features) == ('head/kernel', (0,), 12)
  np.testing.assert_allclose(hst.xtx, h.T @ h, rtol=1e-4, atol=1e-4)
  y = h @ np.asarray(v['params']['head']['kernel'], np.float64) + np.asarray(v['params']['head']['bias'])
  np.testing.assert_allclose(hst.out_mean_sq, ((y - np.asarray(v['params']['head']['bias'])) ** 2).mean(0),
                             rtol=1e-4, atol=1e-5)


def test_capture_memory_is_bounded_by_features_not_batches():
  qm = quantize_linen(TwoLayer(), RULES)
  v = qm.init(jax.random.key(0), batches(1)[0])
  one = capture.capture_linen(qm, v, batches(1), stats=('xtx',))
  many = capture.capture_linen(qm, v, batches(6), stats=('xtx',))
  shapes = lambda d: {k: jax.tree.map(jnp.shape, s) for k, (_, s) in d.items()}
  assert shapes(one) == shapes(many)
  assert one['<root>/dot_general0'][1].absmax is None  # only what was asked for
  with pytest.raises(ValueError, match="unknown statistic 'hessian'"):
    capture.capture_linen(qm, v, batches(1), stats=('hessian',))


def test_nnx_capture_and_model_unchanged():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Linear(8, 6, rngs=rngs)
      self.emb = nnx.Embed(10, 6, rngs=rngs)

    def __call__(self, x):
      return self.emb.attend(self.a(x))  # tied head: jnp.dot(x, embedding.T)
  model = Net(nnx.Rngs(0))
  xs = batches(2)
  quantize_nnx(model, RULES, xs[0])
  before = jax.tree.map(lambda a: a, nnx.state(model))
  out = capture.capture_nnx(model, xs)
  assert {k: (s.weight, s.contracting) for k, (s, _) in out.items()} == {
      'a/dot_general0': ('a/kernel', (0,)), 'emb/attend_dot_general0': ('emb/embedding', (1,))}
  x2 = np.concatenate([np.asarray(x).reshape(-1, 8) for x in xs])
  np.testing.assert_allclose(out['a/dot_general0'][1].xtx, x2.T @ x2, rtol=1e-4, atol=1e-4)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), before, nnx.state(model)))


# ------------------------------------------------------------------------------- NNX transactions (here: small)


class Mlp(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(8, 6, rngs=rngs)
    self.b = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.b(nnx.relu(self.a(x)))


def _snapshot(model):
  return [(p, type(m), {k: v for k, v in vars(m).items()}) for p, m in nnx.iter_modules(model)]


@pytest.mark.parametrize('fail', ['sample_run', 'mid_modules'])
def test_quantize_nnx_is_transactional(fail, monkeypatch):
  from qjax.flax import nnx as qnnx  # noqa: PLC0415
  model = Mlp(nnx.Rngs(0))
  before = _snapshot(model)
  x = jnp.ones((2, 8))
  y0 = model(x)
  if fail == 'mid_modules':  # the second module's class swap fails, after the first was changed
    calls = []
    orig = qnnx._quantized_class

    def flaky(cls):
      calls.append(cls)
      if len(calls) == 2:
        raise RuntimeError('injected failure')
      return orig(cls)
    monkeypatch.setattr(qnnx, '_quantized_class', flaky)
    with pytest.raises(RuntimeError, match='injected failure'):
      quantize_nnx(model, RULES, x)
  else:  # a wrong sample input fails inside the state-creating run, after every module was changed
    with pytest.raises(TypeError):
      quantize_nnx(model, RULES, jnp.ones((2, 5)))
  after = _snapshot(model)
  assert [(p, c) for p, c, _ in after] == [(p, c) for p, c, _ in before]
  for (_, _, a), (_, _, b) in zip(before, after, strict=True):
    assert a.keys() == b.keys() and all(a[k] is b[k] for k in a)
  assert jnp.array_equal(model(x), y0)
  assert quantize_nnx(model, RULES, x).quantized()  # and it can still be quantized afterwards
