"""Property-based tests (hypothesis) of the quantizer invariants, over random shapes, axes, formats,
granularities, schemes and methods, run with and without jit (chex.variants).

  qvalue in [qmin, qmax]; |dequantize(quantize(x)) - x| <= scale / 2 inside the range; fake_quant ==
  dequantize(quantize(x)); real == fake with power-of-two scales; NaN in -> NaN out in every mode; gradients
  finite for finite inputs.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qjax import formats, init_params, ops, registry
from qjax import granularity as gran
from qjax.ops.config import DotConfig, MatmulConfig
from qjax.quantizers import dequantize, fake_quant, quantize
from qjax.spec import QuantSpec

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)
INT_FORMATS = ('int2', 'int3', 'int4', 'int8', 'int4n', 'int8n', 'uint4', 'uint8', 'int1')
ALL_FORMATS = INT_FORMATS + ('fp8_e4m3', 'fp8_e5m2', 'fp4_e2m1', 'nf4')


@st.composite
def cases(draw, fmts=INT_FORMATS, estimators=None):
  """(x, spec, params): a random f32 array and a valid spec (+ its method's initial params)."""
  shape = tuple(draw(st.lists(st.sampled_from((1, 2, 3, 4, 6, 8)), min_size=1, max_size=3)))
  fmt = draw(st.sampled_from(fmts))
  granularity = draw(st.sampled_from(('per_tensor', 'per_channel', 'per_group')))
  kw = {}
  if granularity != 'per_tensor':
    kw['axis'] = draw(st.integers(-len(shape), len(shape) - 1))
  if granularity == 'per_group':
    n = shape[kw['axis']]
    kw['group_size'] = draw(st.sampled_from([g for g in (1, 2, 3, 4) if n % g == 0]))
  scheme = draw(st.sampled_from(('symmetric', 'asymmetric')))
  if scheme == 'asymmetric':
    kw['calibration'] = 'minmax'
  kw['po2_scale'] = draw(st.booleans())
  est = draw(st.sampled_from(estimators or registry.names()))
  try:
    spec = QuantSpec(format=fmt, granularity=granularity, scheme=scheme, estimator=est, **kw)
  except ValueError:
    assume(False)
  seed = draw(st.integers(0, 2 ** 16))
  scale = draw(st.sampled_from((1e-3, 1.0, 300.0)))
  x = jax.random.normal(jax.random.key(seed), shape) * scale
  return x, spec, init_params(x, spec)


class PropertiesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @SETTINGS
  @given(cases())
  def test_qvalue_in_range_and_error_at_most_half_a_step(self, case):
    x, spec, _ = case
    q = self.variant(lambda x: quantize(x, spec))(x)
    fmt = spec.fmt
    v = np.asarray(q.qvalue, np.int32)
    assert v.min() >= fmt.qmin and v.max() <= fmt.qmax
    if fmt.binary:
      return
    s = np.asarray(gran.expand(q.scale, x.shape), np.float64)
    z = 0.0 if q.zero_point is None else np.asarray(gran.expand(q.zero_point, x.shape), np.float64)
    xd = np.asarray(x, np.float64)
    inside = (xd >= (fmt.qmin - z) * s) & (xd <= (fmt.qmax - z) * s)
    err = np.abs(np.asarray(dequantize(q), np.float64) - xd)
    assert np.all(err[inside] <= s[inside] * (0.5 + 1e-5)), (err[inside] / s[inside]).max()

  @chex.variants(with_jit=True, without_jit=True)
  @SETTINGS
  @given(cases(fmts=ALL_FORMATS))
  def test_fake_quant_equals_dequantize_of_quantize(self, case):
    x, spec, params = case
    method = spec.method
    assume(method.native and method.integer_grid)
    fq = self.variant(lambda x, p: fake_quant(x, spec, p))(x, params)
    q = self.variant(lambda x, p: quantize(x, spec, p or None))(x, params)
    np.testing.assert_allclose(np.asarray(fq), np.asarray(dequantize(q)), rtol=1e-6, atol=0)

  @chex.variants(with_jit=True, without_jit=True)
  @SETTINGS
  @given(cases(fmts=ALL_FORMATS), st.data())
  def test_nan_in_nan_out_and_finite_gradients(self, case, data):
    x, spec, params = case
    f = self.variant(lambda x, p: fake_quant(x, spec, p, jax.random.key(0)))
    idx = tuple(data.draw(st.integers(0, n - 1)) for n in x.shape)
    y = np.asarray(f(x.at[idx].set(jnp.nan), params))
    assert np.isnan(y[idx])
    y, grads = jax.value_and_grad(lambda x, p: jnp.sum(jnp.sin(f(x, p))), argnums=(0, 1))(x, params)
    assert np.isfinite(np.asarray(y))
    for g in jax.tree.leaves(grads):
      assert np.isfinite(np.asarray(g)).all()

  @chex.variants(with_jit=True, without_jit=True)
  @SETTINGS
  @given(st.sampled_from(('int8', 'int4', 'int8n', 'uint8', 'int2')), st.sampled_from(('int8', 'int4')),
         st.sampled_from(('symmetric', 'asymmetric')), st.integers(1, 6), st.integers(1, 9), st.integers(1, 5),
         st.integers(0, 1000), st.booleans())
  def test_real_equals_fake_with_po2_scales_and_nan_rows_agree(self, lf, rf, scheme, m, k, n, seed, nan):
    kw = dict(calibration='minmax') if scheme == 'asymmetric' else {}
    try:
      ls = QuantSpec(lf, granularity='per_channel', scheme=scheme, po2_scale=True, **kw)
    except ValueError:
      assume(False)
    rs = QuantSpec(rf, granularity='per_channel', po2_scale=True)
    x = jax.random.normal(jax.random.key(seed), (m, k))
    if scheme == 'asymmetric' or lf.startswith('u'):
      x = x + 0.5
    w = jax.random.normal(jax.random.key(seed + 1), (k, n))
    if nan:
      x = x.at[0, k // 2].set(jnp.nan)
    dims = (((1,), (0,)), ((), ()))
    out = {mode: self.variant(lambda x, w, mode=mode: ops.dot_general(
        x, w, dims, config=DotConfig(fwd=MatmulConfig(ls, rs, mode), small_m=0)))(x, w) for mode in ('fake', 'real')}
    a, b = np.asarray(out['fake']), np.asarray(out['real'])
    np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
    if nan:
      assert not np.isfinite(b[0]).any()
    np.testing.assert_array_equal(a[np.isfinite(a)], b[np.isfinite(b)])


def test_formats_cover_the_strategies():
  for f in ALL_FORMATS:
    formats.parse_format(f)
