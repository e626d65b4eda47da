"""qjax.ops.einsum: subscript parsing, agreement with jnp.einsum, exact real == fake with po2 scales, gradients
against stop_gradient references, the nnx.Einsum hook and bad input.

Exactness as in test_dot_general: po2 scales constant along the contraction make every output of the f32 einsum
of fake quant (product of scales) * (an integer sum below 2^24), equal to the int32 contraction rescaled.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from qjax import calibration, formats, quantizers
from qjax.ops import DotConfig, MatmulConfig, dot_general, int8_dynamic
from qjax.spec import QuantSpec

qe = importlib.import_module('qjax.ops.einsum')  # the module (qjax.ops.einsum is the function)


def arr(seed, shape, po2_dims=()):
  """U[-1, 1] with a 2^e factor (e in -2..2) per index of each dim in po2_dims."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape)
  for d in po2_dims:
    x = x * np.exp2(rng.integers(-2, 3, shape[d])).reshape([-1 if i == d else 1 for i in range(len(shape))])
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------- float: = jnp


FLOAT_CASES = [
    ('bld,dhk->blhk', (2, 3, 8), (8, 4, 5)),
    ('...d,df->...f', (2, 3, 8), (8, 6)),
    ('...d,df->...f', (8,), (8, 6)),
    ('bhqd,bhkd->bhqk', (2, 3, 4, 8), (2, 3, 5, 8)),
    ('bqhd,bkhd->bhqk', (2, 4, 3, 8), (2, 5, 3, 8)),
    ('abc,cd->da', (2, 3, 4), (4, 5)),          # output transposed against the dot_general layout
    ('xd,yd->yx', (3, 4), (5, 4)),
    ('ij,jk', (3, 4), (4, 5)),                   # implicit output
    ('ba,ca', (3, 4), (5, 4)),
    ('...i,ij->j', (2, 3, 4), (4, 5)),           # ellipsis summed away
    ('b...d,b...d->b...', (2, 1, 3, 4), (2, 5, 3, 4)),  # ellipsis broadcasting (1 vs 5)
    ('...,...->...', (3,), (3,)),                # all batch, no contraction
    ('i,j->ij', (3,), (4,)),                     # outer product
    ('i,i->', (5,), (5,)),                       # full contraction to a scalar
    ('abc,cd->ad', (2, 3, 4), (4, 5)),           # b only in lhs: summed out first
    ('ii,ij->j', (4, 4), (4, 3)),                # diagonal
    ('ab,c->abc', (2, 3), (4,)),
    ('ij,j->i', (3, 4), (4,)),
    ('i,->i', (3,), ()),                         # a scalar operand
]


@pytest.mark.parametrize('subscripts,ls,rs', FLOAT_CASES)
def test_float_config_matches_jnp_einsum(subscripts, ls, rs):
  x, y = arr(0, ls), arr(1, rs)
  ref = jnp.einsum(subscripts, x, y)
  out = qe.einsum(subscripts, x, y, config=DotConfig())
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  gx, gy = jax.grad(lambda a, b: jnp.sum(jnp.sin(qe.einsum(subscripts, a, b, config=DotConfig()))), (0, 1))(x, y)
  rx, ry = jax.grad(lambda a, b: jnp.sum(jnp.sin(jnp.einsum(subscripts, a, b))), (0, 1))(x, y)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gy, ry, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('subscripts,ls,rs', [FLOAT_CASES[i] for i in (0, 5, 10, 14, 15)])
def test_int8_config_tracks_jnp_einsum(subscripts, ls, rs):
  x, y = arr(2, ls), arr(3, rs)
  ref = jnp.einsum(subscripts, x, y)
  out = qe.einsum(subscripts, x, y, config=int8_dynamic(8))
  assert out.shape == ref.shape
  assert float(jnp.max(jnp.abs(out - ref))) <= 0.02 * max(float(jnp.max(jnp.abs(ref))), 1.0)


def test_parse_expands_ellipsis_and_implicit_output():
  assert qe.parse('...d,df->...f', 3, 2) == ('abd', 'df', 'abf')
  assert qe.parse('bhqd,bhkd->bhqk', 4, 4) == ('bhqd', 'bhkd', 'bhqk')
  assert qe.parse('ij,jk', 2, 2) == ('ij', 'jk', 'ik')
  assert qe.parse('...i,...i', 3, 2) == ('abi', 'bi', 'ab')  # ellipsis first in the implicit output
  assert qe.parse(' b i , i j -> b j ', 2, 2) == ('bi', 'ij', 'bj')


def test_single_operand_index_is_summed_before_quantizing():
  """'abc,cd->ad': b is summed out of lhs in float, then lhs is quantized: the same as dot_general on the sum."""
  x, y = arr(4, (2, 3, 8)), arr(5, (8, 5))
  cfg = int8_dynamic(8)
  out = qe.einsum('abc,cd->ad', x, y, config=cfg)
  ref = dot_general(jnp.sum(x, axis=1), y, (((1,), (0,)), ((), ())), config=cfg)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_output_order_is_a_transpose_of_dot_general():
  x, y = arr(6, (2, 3, 8)), arr(7, (8, 5))
  cfg = int8_dynamic(8)
  a = qe.einsum('bld,df->fbl', x, y, config=cfg)
  b = qe.einsum('bld,df->blf', x, y, config=cfg)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(jnp.transpose(b, (2, 0, 1))))


# ------------------------------------------------------------------------------- exactness: real == fake


EXACT_CASES = [
    # subscripts, lhs shape, rhs shape, po2 dims of lhs, po2 dims of rhs (the non-contracted ones)
    ('bld,dhk->blhk', (2, 3, 32), (32, 4, 5), (0, 1), (1, 2)),
    ('...d,df->...f', (2, 3, 32), (32, 6), (0, 1), (1,)),
    ('bhqd,bhkd->bhqk', (2, 3, 4, 32), (2, 3, 5, 32), (0, 1, 2), (0, 1, 2)),
]


def _grads(subscripts, cfg, x, y, ct):
  out, vjp = jax.vjp(lambda a, b: qe.einsum(subscripts, a, b, config=cfg), x, y)
  return out, *vjp(ct)


@pytest.mark.parametrize('subscripts,ls,rs,lp,rp', EXACT_CASES)
@pytest.mark.parametrize('bits', [2, 4, 8])
@pytest.mark.parametrize('scheme', ['symmetric', 'asymmetric'])
def test_real_equals_fake(subscripts, ls, rs, lp, rp, bits, scheme):
  cal = 'minmax' if scheme == 'asymmetric' else 'absmax'
  s = QuantSpec(format=f'int{bits}', granularity='per_channel', scheme=scheme, calibration=cal, po2_scale=True)
  x, y = arr(8, ls, lp), arr(9, rs, rp)
  ct = arr(10, jnp.einsum(subscripts, x, y).shape, range(len(jnp.einsum(subscripts, x, y).shape)))
  fake = _grads(subscripts, DotConfig(*(MatmulConfig(s, s, 'fake'),) * 3, small_m=0), x, y, ct)
  real = _grads(subscripts, DotConfig(*(MatmulConfig(s, s, 'real'),) * 3, small_m=0), x, y, ct)
  for name, a, b in zip(('out', 'dlhs', 'drhs'), fake, real, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  assert not np.array_equal(np.asarray(real[0]), np.asarray(jnp.einsum(subscripts, x, y)))


def test_real_mode_lowers_to_int8_dot():
  x, y = arr(11, (2, 3, 4, 32)), arr(12, (2, 3, 5, 32))
  f = lambda a, b: qe.einsum('bhqd,bhkd->bhqk', a, b, config=int8_dynamic(8, mode='real'))
  txt = jax.jit(f).lower(x, y).as_text()
  assert 'stablehlo.dot_general' in txt
  assert 'tensor<2x3x4x32xi8>, tensor<2x3x5x32xi8>) -> tensor<2x3x4x5xi32>' in txt


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize('mode', ['fake', 'real'])
def test_ste_matches_stop_gradient_reference(mode):
  """Quantized forward, float backward == jnp.einsum of x + stop_gradient(fq(x) - x)."""
  x, y = arr(13, (2, 3, 32)), arr(14, (32, 4, 5))
  ct = arr(15, (2, 3, 4, 5))
  s = QuantSpec(format='int4', granularity='per_tensor')
  cfg = DotConfig(fwd=MatmulConfig(s, s, mode), small_m=0)
  sg = lax.stop_gradient

  def ref(a, b):
    a = a + sg(quantizers.fake_quant(a, s) - a)
    b = b + sg(quantizers.fake_quant(b, s) - b)
    return jnp.sum(jnp.einsum('bld,dhk->blhk', a, b) * ct)
  _, gx, gy = _grads('bld,dhk->blhk', cfg, x, y, ct)
  rx, ry = jax.grad(ref, (0, 1))(x, y)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gy, ry, rtol=1e-5, atol=1e-6)


def test_clipped_ste_mask_reference():
  x, y = arr(16, (2, 4, 32)), arr(17, (2, 5, 32))
  ct = arr(18, (2, 4, 5))
  s = QuantSpec(format='int4', granularity='per_tensor', calibration='percentile', percentile=90.0,
                estimator='clipped_ste')
  cfg = DotConfig(fwd=MatmulConfig(s, s, 'real'), small_m=0)
  sg = lax.stop_gradient
  lo, hi = formats.grid_range(s.fmt)

  def masked(a):
    scale, _ = calibration.calibrate(a, s)
    inside = (a / scale >= lo) & (a / scale <= hi)
    return sg(quantizers.fake_quant(a, s)) + (a - sg(a)) * inside

  def ref(a, b):
    return jnp.sum(jnp.einsum('bqd,bkd->bqk', masked(a), masked(b)) * ct)
  _, gx, gy = _grads('bqd,bkd->bqk', cfg, x, y, ct)
  rx, ry = jax.grad(ref, (0, 1))(x, y)
  assert float(jnp.mean(gx == 0)) > 0.05
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gy, ry, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- Flax hook


def test_nnx_einsum_hook():
  """nnx.Einsum calls einsum_op(einsum_str, inputs, kernel, precision=..., out_sharding=...)."""
  cfg = int8_dynamic(8)
  layer = nnx.Einsum('bld,dhk->blhk', (8, 2, 4), (2, 4), einsum_op=qe.make_einsum(cfg), rngs=nnx.Rngs(0))
  ref = nnx.Einsum('bld,dhk->blhk', (8, 2, 4), (2, 4), rngs=nnx.Rngs(0))
  x = arr(19, (2, 3, 8))
  y, yr = layer(x), ref(x)
  assert y.shape == (2, 3, 2, 4) and not np.array_equal(np.asarray(y), np.asarray(yr))
  np.testing.assert_allclose(y, yr, atol=0.05)
  grad = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert float(jnp.max(jnp.abs(grad.kernel[...]))) > 0


def test_make_einsum_rejects_other_operand_counts():
  fn = qe.make_einsum(int8_dynamic(8))
  with pytest.raises(ValueError, match='exactly two operands, got 3'):
    fn('ab,bc,cd->ad', jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.ones((4, 5)))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('subscripts,shapes,match', [
    ('ab,bc,cd->ad', None, 'exactly two operands, got 3'),
    ('ab->ab', None, 'exactly two operands, got 1'),
    ('ab,bc->ad', None, "output index 'd' is in no operand"),
    ('ab,bc->aa', None, "output index 'a' repeats"),
    ('ab,bc->a->c', None, 'more than one "->"'),
    ('a..b,bc->ac', None, 'malformed ellipsis'),
    ('a1,1c->ac', None, "index '1'"),
    ('abc,cd->ad', ((2, 3), (3, 4)), 'give lhs 3 indices, but lhs has rank 2'),
    ('ab,bc->ac', ((2, 3), (4, 5)), "index 'b' has size 3 in lhs and 4 in rhs"),
])
def test_malformed_subscripts(subscripts, shapes, match):
  ls, rs = shapes or ((2, 3), (3, 4))
  with pytest.raises(ValueError, match=match):
    qe.einsum(subscripts, jnp.ones(ls), jnp.ones(rs), config=int8_dynamic(8))


def test_non_float_operand_is_rejected():
  with pytest.raises(ValueError, match='einsum lhs: .*float operands, got dtype int32'):
    qe.einsum('ab,bc->ac', jnp.ones((2, 3), jnp.int32), jnp.ones((3, 4)), config=int8_dynamic(8))


def test_group_size_that_does_not_divide_names_operand_and_field():
  g = QuantSpec(format='int4', granularity='per_group', group_size=5)
  cfg = DotConfig(fwd=MatmulConfig(None, g))
  with pytest.raises(ValueError, match=r'fwd\.rhs: group_size=5 does not divide axis 0 of size 32'):
    jax.eval_shape(lambda a, b: qe.einsum('bd,df->bf', a, b, config=cfg), jnp.ones((4, 32)), jnp.ones((32, 8)))


def test_per_group_on_two_contracting_dims_groups_the_flattened_contraction():
  """'bhd,hdf->bf' groups d (the last contracting index) within each h: the groups of 'bk,kf->bf' over k = (h, d)."""
  g = QuantSpec(format='int4', granularity='per_group', group_size=4)
  cfg = DotConfig(fwd=MatmulConfig(g, g, 'real'))
  x, w = arr(30, (2, 4, 8)), arr(31, (4, 8, 3))
  got = qe.einsum('bhd,hdf->bf', x, w, config=cfg)
  np.testing.assert_array_equal(got, qe.einsum('bk,kf->bf', x.reshape(2, 32), w.reshape(32, 3), config=cfg))
  assert not np.array_equal(got, jnp.einsum('bhd,hdf->bf', x, w))


def test_pre_quantized_operand():
  """A QArray (serving weights) quantized like the op would quantize the float array gives the same result."""
  s = QuantSpec(format='int8', granularity='per_channel')
  cfg = DotConfig(fwd=MatmulConfig(s, s, 'real'), small_m=0)
  x, w = arr(20, (2, 3, 8)), arr(21, (8, 4, 5), (1, 2))
  qw = quantizers.quantize(w, s.replace(axis=(1, 2)))  # 'dhk': per_channel keeps the non-contracted h, k
  np.testing.assert_array_equal(np.asarray(qe.einsum('bld,dhk->blhk', x, qw, config=cfg)),
                                np.asarray(qe.einsum('bld,dhk->blhk', x, w, config=cfg)))
  with pytest.raises(ValueError, match="index 'h' of a pre-quantized .QArray. operand needs a sum"):
    qe.einsum('bld,dhk->bl', x, qw, config=cfg)
