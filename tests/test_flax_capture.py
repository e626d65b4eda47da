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
  # the running module's class: a Flax Dense for the head, the custom root module for the transposed kernel
  assert hsite.module_type == 'flax.linen.linear.Dense' and site.module_type.endswith('.TwoLayer')
  np.testing.assert_allclose(hst.xtx, h.T @ h, rtol=1e-4, atol=1e-4)
  y = h @ np.asarray(v['params']['head']['kernel'], np.float64) + np.asarray(v['params']['head']['bias'])
  np.testing.assert_allclose(hst.out_mean_sq, ((y - np.asarray(v['params']['head']['bias'])) ** 2).mean(0),
                             rtol=1e-4, atol=1e-5)


class EinsumPermuted(nn.Module):
  """A kernel (j, i, k) contracted with an activation (b, i, j): the contracting letters in different orders."""
  subscripts: str = 'bij,jik->bk'

  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.normal(1.0), (3, 2, 4))
    return jnp.einsum(self.subscripts, x, w)


@pytest.mark.parametrize('subscripts', ['bij,jik->bk', '...ij,jik->...k'])
def test_einsum_capture_features_follow_the_weights_contracting_axes(subscripts):
  """Feature f of the captured rows is the f-th entry of the weight's contracting axes (in site.contracting
  order) flattened row-major: rows . flat kernel is the einsum. The rhs axes were once listed in the weight's own
  order (j, i) against the activation's (i, j)."""
  net = EinsumPermuted(subscripts)
  qm = quantize_linen(net, RULES)
  xs = [jax.random.normal(jax.random.key(i), (5, 2, 3)) for i in range(2)]
  v = qm.init(jax.random.key(1), xs[0])
  (site, st), = capture.capture_linen(qm, v, xs, stats=('sample',), max_sample=10_000).values()
  assert (site.weight_side, site.contracting, site.features) == ('rhs', (1, 0), 6)
  w = np.asarray(v['params']['w'], np.float64)
  flat = np.transpose(w, site.contracting + (2,)).reshape(site.features, -1)
  y = np.concatenate([np.asarray(net.apply({'params': v['params']}, x), np.float64) for x in xs])
  np.testing.assert_allclose(np.asarray(st.sample, np.float64) @ flat, y, rtol=1e-5, atol=1e-5)


class ZThenA(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='a_second')(nn.Dense(6, name='z_first')(x))


def test_capture_returns_ops_in_call_order():
  """Call order, not the sorted order of a jitted dict's keys (the PTQ runner's sequential mode relies on it)."""
  qm = quantize_linen(ZThenA(), RULES)
  xs = batches(1)
  out = capture.capture_linen(qm, qm.init(jax.random.key(0), xs[0]), xs)
  assert list(out) == ['z_first/dot_general0', 'a_second/dot_general0']


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
  # the user's classes, through qjax's quantized subclasses
  assert out['a/dot_general0'][0].module_type == 'flax.nnx.nn.linear.Linear'
  assert out['emb/attend_dot_general0'][0].module_type == 'flax.nnx.nn.linear.Embed'
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


# ---------------------------------------------------------------------- sum, sample, conv patches (im2col)


def _thin(rows, m):  # the reference sample rule: evenly spaced rows, first and last included
  return rows if len(rows) <= m else rows[np.linspace(0, len(rows) - 1, m).astype(int)]


def test_sum_and_sample_over_batches_match_numpy():
  qm = quantize_linen(TwoLayer(), RULES)
  xs = batches(4)
  v = qm.init(jax.random.key(0), xs[0])
  out = capture.capture_linen(qm, v, xs, stats=('sum', 'sample', 'xtx'), max_sample=7)
  site, st = out['<root>/dot_general0']
  per_batch = [np.asarray(x, np.float64).reshape(-1, 8) for x in xs]  # (12, 8) each
  x2 = np.concatenate(per_batch)
  np.testing.assert_allclose(st.sum_x, x2.sum(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(st.mean, x2.mean(0), rtol=1e-5, atol=1e-6)
  want = None
  for rows in per_batch:
    rows = _thin(rows, 7)
    want = rows if want is None else _thin(np.concatenate([want, rows]), 7)
  assert st.sample.shape == (7, 8) and st.sample.dtype == jnp.float32
  np.testing.assert_allclose(st.sample, want, rtol=1e-6)
  assert st.absmax is None and site.conv_features == ''


def test_sample_is_bounded_and_kept_whole_when_small():
  qm = quantize_linen(TwoLayer(), RULES)
  v = qm.init(jax.random.key(0), batches(1)[0])
  small = capture.capture_linen(qm, v, batches(2), stats=('sample',), max_sample=100)
  x2 = np.concatenate([np.asarray(x).reshape(-1, 8) for x in batches(2)])
  np.testing.assert_array_equal(small['<root>/dot_general0'][1].sample, x2)  # 24 rows: all of them, in order
  for n in (1, 5):
    out = capture.capture_linen(qm, v, batches(n), stats=('sample',), max_sample=5)
    assert {k: s.sample.shape for k, (_, s) in out.items()} == {'<root>/dot_general0': (5, 8),
                                                                 'head/dot_general0': (5, 12)}
  with pytest.raises(ValueError, match='max_sample'):
    capture.capture_linen(qm, v, batches(1), max_sample=0)


def _im2col(x, kh, kw, strides, pads, dil):
  """NumPy reference: rows (batch, out_h, out_w) of the window's values ordered (kh, kw, in)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (x.shape[1] - dil[0] * (kh - 1) - 1) // strides[0] + 1
  ow = (x.shape[2] - dil[1] * (kw - 1) - 1) // strides[1] + 1
  rows = [x[b, i * strides[0] + np.arange(kh)[:, None] * dil[0], j * strides[1] + np.arange(kw)[None, :] * dil[1]]
          .reshape(-1) for b in range(x.shape[0]) for i in range(oh) for j in range(ow)]
  return np.stack(rows)


class ConvNet(nn.Module):
  padding: object = 'SAME'
  strides: tuple = (1, 1)
  dilation: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    return nn.Conv(5, (3, 2), strides=self.strides, padding=self.padding, kernel_dilation=self.dilation,
                   use_bias=False, name='conv')(x)


@pytest.mark.parametrize('padding,strides,dilation', [
    ('SAME', (1, 1), (1, 1)), ('VALID', (2, 2), (1, 1)), (((1, 2), (0, 1)), (2, 1), (1, 1)),
    (((1, 1), (1, 1)), (1, 1), (2, 1))])
def test_conv_patches_are_im2col_in_kernel_order(padding, strides, dilation):
  net = ConvNet(padding, strides, dilation)
  qm = quantize_linen(net, RULES)
  xs = [jax.random.normal(jax.random.key(i), (2, 9, 8, 4)) for i in range(2)]
  v = qm.init(jax.random.key(1), xs[0])
  out = capture.capture_linen(qm, v, xs, stats=('xtx', 'sum', 'sample'), max_sample=10_000,
                              conv_features='patches')
  site, st = out['conv/conv0']
  assert (site.weight, site.weight_shape, site.contracting, site.features, site.conv_features) == (
      'conv/kernel', (3, 2, 4, 5), (0, 1, 2), 24, 'patches')
  k = np.asarray(v['params']['conv']['kernel'], np.float64)
  pads = padding if not isinstance(padding, str) else jax.lax.padtype_to_pads(
      (9, 8), ((3 - 1) * dilation[0] + 1, (2 - 1) * dilation[1] + 1), strides, padding)
  x2 = np.concatenate([_im2col(x, 3, 2, strides, pads, dilation) for x in xs])
  assert float(st.count) == len(x2)
  np.testing.assert_allclose(st.xtx, x2.T @ x2, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(st.sum_x, x2.sum(0), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(st.sample, x2, rtol=1e-6, atol=1e-6)  # all rows kept: the rows themselves
  y = np.concatenate([np.asarray(net.apply({'params': v['params']}, x), np.float64).reshape(-1, 5) for x in xs])
  np.testing.assert_allclose(x2 @ k.reshape(-1, 5), y, rtol=1e-4, atol=1e-4)  # rows x flat kernel = the conv
  chan = capture.capture_linen(qm, v, xs, stats=('xtx',))['conv/conv0'][0]
  assert (chan.contracting, chan.features, chan.conv_features) == ((2,), 4, 'channels')


def test_grouped_conv_patches_fall_back_to_channels_with_a_note():
  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), feature_group_count=2, name='conv')(x)
  qm = quantize_linen(Grouped(), RULES)
  x = jnp.ones((1, 6, 6, 4))
  v = qm.init(jax.random.key(0), x)
  site, st = capture.capture_linen(qm, v, [x], stats=('xtx',), conv_features='patches')['conv/conv0']
  assert site.conv_features == 'channels' and 'grouped conv' in site.note
  assert site.features == 4 and st.xtx.shape == (4, 4)  # the input's channels: groups x the kernel's in (2)
  with pytest.raises(ValueError, match='conv_features'):
    capture.capture_linen(qm, v, [x], conv_features='im2col')


def test_nnx_conv_patches_times_the_flat_kernel_is_the_conv():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (2, 3), strides=(1, 2), padding='SAME', use_bias=False, rngs=rngs)

    def __call__(self, x):
      return self.conv(x)
  model = Net(nnx.Rngs(0))
  xs = [jax.random.normal(jax.random.key(i), (2, 7, 6, 3)) for i in range(2)]
  quantize_nnx(model, RULES, xs[0])
  site, st = capture.capture_nnx(model, xs, stats=('sample',), max_sample=10_000,
                                 conv_features='patches')['conv/conv0']
  assert (site.weight, site.contracting, site.features, site.conv_features) == ('conv/kernel', (0, 1, 2), 18,
                                                                                 'patches')
  k = np.asarray(model.conv.kernel.get_value(), np.float64).reshape(18, 4)
  y = jax.jit(lambda x: jax.lax.conv_general_dilated(x, model.conv.kernel.get_value(), (1, 2), 'SAME',
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  want = np.concatenate([np.asarray(y(x), np.float64).reshape(-1, 4) for x in xs])
  np.testing.assert_allclose(np.asarray(st.sample, np.float64) @ k, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- records, compiled


def _same_records(eager, compiled):
  key = lambda r: (r.path, r.weight_name, r.spec, r.prefix, r.kept_8bit, r.rule, type(r.module))
  assert [key(r) for r in compiled] == [key(r) for r in eager] and eager
  for a, b in zip(eager, compiled, strict=True):
    assert isinstance(b.x, jax.Array) and not isinstance(b.x, jax.core.Tracer)  # values, not the trace's
    np.testing.assert_allclose(b.x, a.x, rtol=1e-6, atol=1e-7)  # a tanh fused in the program: within an ulp
    assert jax.tree.structure(b.state) == jax.tree.structure(a.state)
    for u, w in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
      np.testing.assert_array_equal(w, u)


def test_linen_records_compiled_equal_the_eager_records():
  qm = quantize_linen(TwoLayer(), RULES)
  x = batches(1)[0]
  v = qm.init(jax.random.key(0), x)
  eager = qm.records(v, x)
  _same_records(eager, qm.records(v, x, compiled=True))
  assert [(r.path, r.weight_name) for r in eager] == [('', None), ('', 'w_out_in'), ('head', None),
                                                      ('head', 'head/kernel')]


def test_nnx_records_compiled_equal_the_eager_records_and_leave_the_model_alone():
  from qjax.flax import nnx_records  # noqa: PLC0415
  m = nnx.Sequential(nnx.Linear(8, 6, rngs=nnx.Rngs(0)), jnp.tanh, nnx.Linear(6, 5, rngs=nnx.Rngs(1)))
  x = batches(1)[0]
  quantize_nnx(m, RULES, x)
  m.eval()
  before = jax.tree.map(np.asarray, nnx.state(m))
  _same_records(nnx_records(m, x), nnx_records(m, x, compiled=True))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(m)), before)
