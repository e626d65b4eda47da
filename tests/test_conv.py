"""qjax.ops.conv: real-integer conv vs fake quant (exact with power-of-two scales), gradients against float and
stop_gradient references, the kernel gradient (never AQT's exact zero), HLO of int8 convs, Flax hooks, bad input.

Exactness: with po2 scales every fake-quantized value is q * 2^e and every scale is constant along the contracted
dims, so each output of the f32 conv of fake quant is (product of scales) * (an integer sum below 2^24): exact, and
equal to the int32 conv rescaled. Operands carry a 2^e factor per index of every dim that owns a scale somewhere
(examples, input and output features), so a mixed-up scale layout cannot hide.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax import lax

from qjax import calibration, formats, ops, quantizers
from qjax.ops import DotConfig, MatmulConfig, fp8, int8_dynamic
from qjax.ops import conv as qc
from qjax.spec import QuantSpec

NHWC = ('NHWC', 'HWIO', 'NHWC')

# name: (lhs shape, rhs shape, conv kwargs). lhs N, C and rhs O, I get po2 factors (see operands()).
CASES = {
    'nhwc_same': ((2, 7, 6, 4), (3, 3, 4, 6), dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC)),
    'nchw_strided_dilated': ((2, 4, 6, 8), (6, 4, 3, 2), dict(window_strides=(2, 1), padding=((1, 0), (0, 2)),
                                                             lhs_dilation=(1, 2), rhs_dilation=(1, 2))),
    'nhwc_groups_valid': ((2, 7, 6, 6), (3, 2, 2, 9), dict(window_strides=(1, 2), padding='VALID',
                                                          feature_group_count=3, dimension_numbers=NHWC)),
    'nchw_batch_groups': ((4, 4, 6, 5), (6, 4, 2, 3), dict(window_strides=(1, 1), padding='SAME',
                                                          batch_group_count=2)),
    'nwc_depthwise_1d': ((2, 9, 4), (3, 1, 8), dict(window_strides=(2,), padding='SAME', feature_group_count=4,
                                                   dimension_numbers=('NWC', 'WIO', 'NWC'))),
}


def _po2(rng, n):
  return np.exp2(rng.integers(-2, 3, n))


def operands(name, seed=0):
  """lhs, rhs and a fixed cotangent for CASES[name], with po2 factors per N, C / O, I / out N, out C."""
  ls, rs, kw = CASES[name]
  rng = np.random.default_rng(seed)
  dn = lax.conv_dimension_numbers(ls, rs, kw.get('dimension_numbers'))
  def scaled(shape, dims):
    x = rng.uniform(-1, 1, shape)
    for d in dims:
      x = x * _po2(rng, shape[d]).reshape([-1 if i == d else 1 for i in range(len(shape))])
    return x
  x = scaled(ls, dn.lhs_spec[:2])
  w = scaled(rs, dn.rhs_spec[:2])
  os_ = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, **kw), x, w).shape
  ct = scaled(os_, dn.out_spec[:2])
  return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(ct, jnp.float32), kw


def grads(cfg, x, w, ct, kw, **extra):
  """out and the gradients of sum(out * ct) in lhs and rhs."""
  out, vjp = jax.vjp(lambda a, b: qc.conv_general_dilated(a, b, config=cfg, **kw, **extra), x, w)
  return out, *vjp(ct)


def float_grads(x, w, ct, kw):
  loss = lambda a, b: jnp.sum(lax.conv_general_dilated(a, b, **kw) * ct)
  return lax.conv_general_dilated(x, w, **kw), *jax.grad(loss, (0, 1))(x, w)


def spec(fmt, scheme='symmetric', granularity='per_channel', **kw):
  cal = 'minmax' if scheme == 'asymmetric' else 'absmax'
  return QuantSpec(format=fmt, scheme=scheme, calibration=cal, granularity=granularity, po2_scale=True, **kw)


def all_three(a, b, mode):
  m = MatmulConfig(a, b, mode)
  return DotConfig(fwd=m, dlhs=m, drhs=m)


# ------------------------------------------------------------------------------- exactness: real == fake


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_real_equals_fake_symmetric(case, bits):
  x, w, ct, kw = operands(case)
  s = spec(f'int{bits}')
  fake = grads(all_three(s, s, 'fake'), x, w, ct, kw)
  real = grads(all_three(s, s, 'real'), x, w, ct, kw)
  for name, a, b in zip(('out', 'dlhs', 'drhs'), fake, real, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  # Quantization did something, and the result still tracks the float conv.
  ref = float_grads(x, w, ct, kw)
  assert not np.array_equal(np.asarray(real[0]), np.asarray(ref[0]))
  if bits >= 4:
    for a, b in zip(real, ref, strict=True):
      assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < {4: 1.0, 8: 0.06}[bits]


@pytest.mark.parametrize('case', ['nchw_strided_dilated', 'nhwc_groups_valid', 'nchw_batch_groups'])
@pytest.mark.parametrize('bits', [2, 4, 8])
def test_real_equals_fake_asymmetric(case, bits):
  """Zero points run natively through the cross-term convs (padding and lhs dilation included)."""
  x, w, ct, kw = operands(case, seed=1)
  a = spec(f'int{bits}', 'asymmetric')
  fake = grads(all_three(a, a, 'fake'), x, w, ct, kw)
  real = grads(all_three(a, a, 'real'), x, w, ct, kw)
  for name, p, q in zip(('out', 'dlhs', 'drhs'), fake, real, strict=True):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q), err_msg=name)


@pytest.mark.parametrize('zero_point_side', ['lhs', 'rhs'])
def test_real_equals_fake_one_zero_point(zero_point_side):
  x, w, ct, kw = operands('nchw_strided_dilated', seed=1)
  a, s = spec('int8', 'asymmetric'), spec('int8')
  pair = (a, s) if zero_point_side == 'lhs' else (s, a)
  fake = grads(all_three(*pair, 'fake'), x, w, ct, kw)
  real = grads(all_three(*pair, 'real'), x, w, ct, kw)
  for name, p, q in zip(('out', 'dlhs', 'drhs'), fake, real, strict=True):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q), err_msg=name)


@pytest.mark.parametrize('case', ['nhwc_groups_valid', 'nhwc_same', 'nchw_strided_dilated'])
@pytest.mark.parametrize('granularity', ['per_tensor', 'per_channel'])
@pytest.mark.parametrize('mode', ['real', 'auto'])
def test_real_equals_fake_uint8(case, granularity, mode):
  """uint8 operands move into int8 containers with a zero point of -128. Ungrouped convs of few features take
  the patch route on CPU, whose int8 kernel gradient has no zero-point term: it once used the shifted uint8
  values as they were (a kernel gradient off by more than its own size)."""
  x, w, ct, kw = operands(case, seed=2)
  x = jnp.abs(x)
  u = spec('uint8', granularity=granularity)
  s = spec('int8', granularity=granularity)
  cfg = DotConfig(fwd=MatmulConfig(u, s, mode), dlhs=MatmulConfig(s, s, mode), drhs=MatmulConfig(u, s, mode))
  fake_cfg = DotConfig(fwd=MatmulConfig(u, s, 'fake'), dlhs=MatmulConfig(s, s, 'fake'),
                       drhs=MatmulConfig(u, s, 'fake'))
  for p, q in zip(grads(fake_cfg, x, w, ct, kw), grads(cfg, x, w, ct, kw), strict=True):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q))


def test_scales_follow_the_documented_convention():
  """per_channel: per example (lhs) and per output feature (kernel) in the forward."""
  x, w, _, kw = operands('nchw_strided_dilated')
  s = QuantSpec(format='int8', granularity='per_channel')
  out = qc.conv_general_dilated(x, w, config=DotConfig(fwd=MatmulConfig(s, s, 'fake')), **kw)
  xq = quantizers.fake_quant(x, s.replace(axis=0))  # NCHW: N is dim 0
  wq = quantizers.fake_quant(w, s.replace(axis=0))  # OIHW: O is dim 0
  np.testing.assert_allclose(out, lax.conv_general_dilated(xq, wq, **kw), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- gradients


def test_kernel_gradient_is_nonzero_and_close_to_float():
  """AQT's conv differentiates through round and gets an exactly-zero kernel gradient; ours is a conv."""
  x, w, ct, kw = operands('nhwc_same', seed=3)
  _, gx, gw = grads(int8_dynamic(8, mode='real'), x, w, ct, kw)
  _, fx, fw = float_grads(x, w, ct, kw)
  assert float(jnp.min(jnp.abs(gw))) > 0 or float(jnp.mean(gw != 0)) > 0.9
  assert float(jnp.linalg.norm(gw - fw) / jnp.linalg.norm(fw)) < 0.02
  assert float(jnp.linalg.norm(gx - fx) / jnp.linalg.norm(fx)) < 0.02
  # The AQT-style formulation (a float conv of round(w / s) * s, no custom VJP) has a zero kernel gradient.
  s = jnp.max(jnp.abs(w)) / 127

  def naive(b):
    return jnp.sum(lax.conv_general_dilated(x, jnp.round(lax.stop_gradient(1 / s) * b) * lax.stop_gradient(s), **kw)
                   * ct)
  assert float(jnp.max(jnp.abs(jax.grad(naive)(w)))) == 0.0


@pytest.mark.parametrize('case', ['nchw_strided_dilated', 'nchw_batch_groups', 'nhwc_groups_valid'])
def test_ste_matches_stop_gradient_reference(case):
  """Quantized (real int) forward, float backward == a float conv of x + stop_gradient(fq(x) - x)."""
  x, w, ct, kw = operands(case, seed=4)
  s = QuantSpec(format='int4', granularity='per_tensor')
  cfg = DotConfig(fwd=MatmulConfig(s, s, 'real'))
  sg = lax.stop_gradient

  def ref(a, b):
    a = a + sg(quantizers.fake_quant(a, s) - a)
    b = b + sg(quantizers.fake_quant(b, s) - b)
    return jnp.sum(lax.conv_general_dilated(a, b, **kw) * ct)
  _, gx, gw = grads(cfg, x, w, ct, kw)
  rx, rw = jax.grad(ref, (0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gw, rw, rtol=1e-6, atol=1e-6)


def test_clipped_ste_mask_reference():
  """clipped_ste with percentile calibration: the gradient is masked where |x / s| leaves the grid."""
  x, w, ct, kw = operands('nhwc_same', seed=5)
  s = QuantSpec(format='int4', granularity='per_tensor', calibration='percentile', percentile=90.0,
                estimator='clipped_ste')
  cfg = DotConfig(fwd=MatmulConfig(s, s, 'real'))
  sg = lax.stop_gradient
  lo, hi = formats.grid_range(s.fmt)

  def masked(a):
    scale, _ = calibration.calibrate(a, s)
    y = a / scale
    inside = (y >= lo) & (y <= hi)
    return sg(quantizers.fake_quant(a, s)) + (a - sg(a)) * inside, inside

  def ref(a, b):
    return jnp.sum(lax.conv_general_dilated(masked(a)[0], masked(b)[0], **kw) * ct)
  _, gx, gw = grads(cfg, x, w, ct, kw)
  rx, rw = jax.grad(ref, (0, 1))(x, w)
  assert 0 < float(jnp.mean(~masked(x)[1])) < 0.5  # Some, not all, of the input is clipped.
  assert float(jnp.mean(gx == 0)) > 0.05
  np.testing.assert_allclose(gx, rx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gw, rw, rtol=1e-6, atol=1e-6)


def test_learned_lsq_scale_gets_its_gradient():
  """Estimators with learned params run through the conv: LSQ's scale gradient equals a float reference."""
  x, w, ct, kw = operands('nhwc_same', seed=6)
  s = QuantSpec(format='int4', granularity='per_channel', estimator='lsq')
  ws = s.replace(axis=3)  # HWIO: O is dim 3, the conv's per_channel axis for the kernel.
  p = quantizers.init_params(w, ws)
  cfg = DotConfig(fwd=MatmulConfig(None, s, 'real'))

  def loss(p, b):
    return jnp.sum(qc.conv_general_dilated(x, b, config=cfg, rhs_params=p, **kw) * ct)

  def ref(p, b):
    return jnp.sum(lax.conv_general_dilated(x, quantizers.fake_quant(b, ws, {'scale': p['scale']}), **kw) * ct)
  gp, gw = jax.grad(loss, (0, 1))(p, w)
  rp, rw = jax.grad(ref, (0, 1))(p, w)
  assert gp['scale'].shape == (1, 1, 1, 6) and float(jnp.max(jnp.abs(gp['scale']))) > 0
  np.testing.assert_allclose(gp['scale'], rp['scale'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, rw, rtol=1e-6, atol=1e-6)


def test_float_config_is_lax_conv():
  x, w, ct, kw = operands('nhwc_groups_valid')
  for a, b in zip(grads(DotConfig(), x, w, ct, kw), float_grads(x, w, ct, kw), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_backward_convs_match_jax_transpose_rules():
  """With a float backward but quantized fwd operands the gradients are JAX's vjp at the quantized operands."""
  for case in CASES:
    x, w, ct, kw = operands(case, seed=7)
    s = QuantSpec(format='int8', granularity='per_tensor')
    cfg = DotConfig(fwd=MatmulConfig(s, s, 'fake'))
    _, gx, gw = grads(cfg, x, w, ct, kw)
    xq, wq = quantizers.fake_quant(x, s), quantizers.fake_quant(w, s)
    _, vjp = jax.vjp(lambda a, b, kw=kw: lax.conv_general_dilated(a, b, **kw), xq, wq)
    rx, rw = vjp(ct)
    np.testing.assert_allclose(gx, rx, rtol=1e-6, atol=1e-6, err_msg=case)
    np.testing.assert_allclose(gw, rw, rtol=1e-6, atol=1e-6, err_msg=case)


# ---------------------------------------------------------------------------------------------- HLO


def _lowered_convs(txt):
  """(lhs, rhs, out) element types of every stablehlo.convolution."""
  return re.findall(r'stablehlo\.convolution\(.*?:\s*\(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)\s*->\s*'
                    r'tensor<[^>]*x(\w+)>', txt)


def _compiled_convs(txt):
  """(lhs, rhs, out) types of every convolution of the compiled HLO, and whether it sits in a YNNPACK fusion."""
  defs = dict(re.findall(r'(%[\w.\-]+) = (\w+)\[', txt))
  ynn_comps = set(re.findall(r'calls=(%[\w.\-]+), [^\n]*__ynn_fusion', txt))
  out, comp = [], None
  for line in txt.splitlines():
    m = re.match(r'^(?:ENTRY )?(%[\w.\-]+) ', line)
    if m and line.rstrip().endswith('{'):
      comp = m.group(1)
    m = re.search(r'= (\w+)\[[^\]]*\]\S* convolution\((%[\w.\-]+), (%[\w.\-]+)\)', line)
    if m:
      out.append((defs[m.group(2)], defs[m.group(3)], m.group(1), comp in ynn_comps))
  return out


def _train_step_hlo(cfg, x, w, **kw):
  loss = lambda a, b: jnp.sum(qc.conv_general_dilated(a, b, config=cfg, **kw) ** 2)
  lowered = jax.jit(jax.grad(loss, (0, 1))).lower(x, w)
  return lowered.as_text(), lowered.compile().as_text()


@pytest.mark.parametrize('dn', [NHWC, None])
def test_compiled_hlo_int8_convs(dn):
  """Real int8: 3 i8 x i8 -> i32 convs in StableHLO. On XLA:CPU all three run as s8 x s8 -> s32 on YNNPACK: the op
  moves NCHW and the gradient convs' transposed layouts into NHWC/HWIO (without that, all are up-cast to s32)."""
  shape_x, shape_w = ((2, 8, 8, 32), (3, 3, 32, 32)) if dn else ((2, 32, 8, 8), (32, 32, 3, 3))
  x, w = jnp.ones(shape_x), jnp.ones(shape_w)
  for mode in ('real',) if dn else ('real', 'auto'):
    lowered, compiled = _train_step_hlo(int8_dynamic(8, mode=mode), x, w, window_strides=(1, 1), padding='SAME',
                                        dimension_numbers=dn)
    assert _lowered_convs(lowered) == [('i8', 'i8', 'i32')] * 3
    if jax.default_backend() == 'cpu':
      assert _compiled_convs(compiled) == [('s8', 's8', 's32', True)] * 3


def test_compiled_hlo_strided_auto_routes_lhs_dilated_conv():
  """The dlhs of a strided conv is lhs-dilated: XLA:CPU would up-cast it (s32 x s32 on Eigen). 'real' and 'auto'
  run it as patches + one int8 matmul (qjax.ops.conv_gemm) on the fast kernel."""
  x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
  kw = dict(window_strides=(2, 2), padding='SAME', dimension_numbers=NHWC)
  lowered, compiled = _train_step_hlo(int8_dynamic(8, mode='real'), x, w, **kw)
  if jax.default_backend() != 'cpu':
    return
  assert _lowered_convs(lowered) == [('i8', 'i8', 'i32')] * 2 and 'xi8>) -> tensor<' in lowered
  assert sorted(_compiled_convs(compiled)) == [('s8', 's8', 's32', True)] * 2
  step = lambda mode: jax.jit(jax.grad(lambda a, b: jnp.sum(qc.conv_general_dilated(
      a, b, config=int8_dynamic(8, mode=mode), **kw) ** 2), (0, 1)))
  for mode in ('real', 'auto'):
    rep = ops.inspect_matmuls(step(mode), x, w)
    assert rep.n_int8 == rep.n_int8_fast == 3 and rep.n_int8_slow == 0, rep.summary()


def test_compiled_hlo_few_features():
  """<= 16 input and output features: XLA:CPU would up-cast the s8 convs. 'real' and 'auto' run all three as
  int8 matmuls over patches (qjax.ops.conv_gemm), none widened."""
  x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
  kw = dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC)
  lowered, compiled = _train_step_hlo(int8_dynamic(8, mode='real'), x, w, **kw)
  if jax.default_backend() != 'cpu':
    return
  assert _lowered_convs(lowered) == [] and _compiled_convs(compiled) == []
  for mode in ('real', 'auto'):
    rep = ops.inspect_matmuls(jax.jit(jax.grad(lambda a, b, mode=mode: jnp.sum(qc.conv_general_dilated(
        a, b, config=int8_dynamic(8, mode=mode), **kw) ** 2), (0, 1))), x, w)
    assert rep.n_int8 == rep.n_int8_fast == 3, rep.summary()


def test_fake_mode_lowers_to_float_convs():
  x, w = jnp.ones((2, 8, 8, 16)), jnp.ones((3, 3, 16, 8))
  lowered, _ = _train_step_hlo(int8_dynamic(8, mode='fake'), x, w, window_strides=(1, 1), padding='SAME',
                               dimension_numbers=NHWC)
  assert _lowered_convs(lowered) == [('f32', 'f32', 'f32')] * 3


# ---------------------------------------------------------------------------------------------- Flax


def test_linen_conv_hook():
  cfg = int8_dynamic(8)
  model = nn.Conv(6, (3, 3), strides=2, conv_general_dilated=qc.make_conv_general_dilated(cfg))
  ref = nn.Conv(6, (3, 3), strides=2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  params = jax.jit(model.init)(jax.random.key(1), x)
  y, yr = jax.jit(model.apply)(params, x), ref.apply(params, x)
  assert y.shape == (2, 4, 4, 6) and not np.array_equal(np.asarray(y), np.asarray(yr))
  assert float(jnp.linalg.norm(y - yr) / jnp.linalg.norm(yr)) < 0.03
  g = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)))(params)
  assert float(jnp.max(jnp.abs(g['params']['kernel']))) > 0


def test_nnx_conv_hook():
  """nnx.Conv passes out_sharding (and preferred_element_type when set) to its conv function."""
  cfg = int8_dynamic(8)
  model = nnx.Conv(4, 6, (3, 3), feature_group_count=2, conv_general_dilated=qc.make_conv_general_dilated(cfg),
                   preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  y = nnx.jit(lambda m, x: m(x))(model, x)
  assert y.shape == (2, 8, 8, 6)
  grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  assert float(jnp.max(jnp.abs(grad.kernel[...]))) > 0


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize('field', ['fwd', 'dlhs', 'drhs'])
@pytest.mark.parametrize('side', ['lhs', 'rhs'])
def test_per_group_is_rejected_at_trace_time(field, side):
  g = QuantSpec(format='int8', granularity='per_group', group_size=4)
  m = MatmulConfig(**{side: g})
  cfg = dataclasses.replace(DotConfig(fwd=MatmulConfig(QuantSpec(), QuantSpec())), **{field: m})
  x, w = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((3, 3, 4, 8), jnp.float32)
  with pytest.raises(ValueError, match=rf'{field}\.{side}: granularity="per_group"'):
    jax.eval_shape(lambda a, b: qc.conv_general_dilated(a, b, (1, 1), 'SAME', dimension_numbers=NHWC, config=cfg),
                   x, w)


def test_non_float_operand_is_rejected():
  with pytest.raises(ValueError, match=r'conv_general_dilated rhs: .*float operands, got dtype int32'):
    qc.conv_general_dilated(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8), jnp.int32), (1, 1), 'SAME',
                            dimension_numbers=NHWC, config=int8_dynamic(8))


def test_real_mode_with_non_native_format_is_rejected():
  nf4 = QuantSpec(format='nf4')
  cfg = DotConfig(fwd=MatmulConfig(QuantSpec(), nf4, 'real'))
  with pytest.raises(ValueError, match=r'fwd: mode="real" needs .*rhs format=.nf4'):
    jax.eval_shape(lambda a, b: qc.conv_general_dilated(a, b, (1, 1), 'SAME', dimension_numbers=NHWC, config=cfg),
                   jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)))
  # 'auto' runs the same config as a float conv of the quantized values.
  auto = DotConfig(fwd=MatmulConfig(QuantSpec(), nf4, 'auto'))
  lowered = jax.jit(lambda a, b: qc.conv_general_dilated(a, b, (1, 1), 'SAME', dimension_numbers=NHWC, config=auto)
                    ).lower(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8))).as_text()
  assert _lowered_convs(lowered) == [('f32', 'f32', 'f32')]


def test_missing_learned_params_name_the_operand():
  s = QuantSpec(format='int4', estimator='lsq')
  with pytest.raises(ValueError, match=r'fwd\.rhs: estimator=.lsq. needs learned scale'):
    qc.conv_general_dilated(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 8)), (1, 1), 'SAME', dimension_numbers=NHWC,
                            config=DotConfig(fwd=MatmulConfig(None, s)))


def test_shape_mismatch_uses_lax_message():
  with pytest.raises((TypeError, ValueError), match='feature'):
    qc.conv_general_dilated(jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 5, 8)), (1, 1), 'SAME', dimension_numbers=NHWC,
                            config=int8_dynamic(8))


def test_pre_quantized_kernel():
  """A QArray kernel (serving weights) quantized per output feature equals quantizing the float kernel in the op."""
  x, w, _, kw = operands('nhwc_same', seed=8)
  s = QuantSpec(format='int8', granularity='per_channel')
  cfg = DotConfig(fwd=MatmulConfig(s, s, 'real'))
  qw = quantizers.quantize(w, s.replace(axis=3))  # HWIO: O is dim 3
  np.testing.assert_array_equal(np.asarray(qc.conv_general_dilated(x, qw, config=cfg, **kw)),
                                np.asarray(qc.conv_general_dilated(x, w, config=cfg, **kw)))


def test_fp8_real_conv():
  """fp8: e4m3 x e4m3 forward, e5m2 gradients against e4m3 operands (a mixed pair runs as exact bf16)."""
  x, w, ct, kw = operands('nhwc_same', seed=9)
  real = grads(fp8('real'), x, w, ct, kw)
  fake = grads(fp8('fake'), x, w, ct, kw)
  for a, b in zip(real, fake, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
  txt = jax.jit(lambda a, b: qc.conv_general_dilated(a, b, config=fp8('real'), **kw)).lower(x, w).as_text()
  assert _lowered_convs(txt) == [('f8E4M3FN', 'f8E4M3FN', 'f32')]


@pytest.mark.parametrize('mode', ['real', 'fake'])
@pytest.mark.parametrize('shapes', [((2, 7, 6, 4), (3, 3, 4, 6)), ((2, 8, 8, 16), (3, 3, 16, 16))])
def test_kernel_gradient_multiplies_the_forwards_input_on_its_forward_grid(mode, shapes):
  """The kernel gradient quantizes the input under its forward spec (per tensor): it takes the forward's grid
  (ops.dot_general.same_grid) and so multiplies x_hat exactly. A static scale of 2^-4 with integers up to 40 would
  be recalibrated to 40 * 2^-4 / 127 and rounded again. g sits on its per-tensor grid (absmax 127 * 2^-3)."""
  (ls, rs), kw = shapes, dict(window_strides=(1, 1), padding='SAME', dimension_numbers=NHWC)
  rng = np.random.default_rng(1)
  kx, kwt = rng.integers(-40, 41, ls), rng.integers(-40, 41, rs)
  kx.flat[0], kwt.flat[0] = 40, -40
  x, w = jnp.asarray(kx * 2.0 ** -4 + 0.01, jnp.float32), jnp.asarray(kwt * 2.0 ** -4, jnp.float32)
  kg = rng.integers(-127, 128, ls[:3] + rs[3:])
  kg.flat[5] = 127
  ct = jnp.asarray(kg * 2.0 ** -3, jnp.float32)
  t = QuantSpec('int8')
  params = {'scale': jnp.full((1, 1, 1, 1), 2.0 ** -4)}
  out, dx, dw = grads(all_three(t, t, mode), x, w, ct, kw, lhs_params=params, rhs_params=params)
  x_hat, w_hat = jnp.asarray(kx * 2.0 ** -4, jnp.float32), jnp.asarray(kwt * 2.0 ** -4, jnp.float32)
  f_out, _, f_dw = float_grads(x_hat, w_hat, ct, kw)
  np.testing.assert_array_equal(out, f_out)
  np.testing.assert_array_equal(dw, f_dw)


def test_kernel_gradient_takes_the_forwards_input_integers():
  """In int8 training the kernel gradient takes the input on its forward grid: the forward quantizes x_hat once for
  both (ops.dot_general.with_integers), so the backward converts no input-shaped array to int8 and holds the
  forward's integers (those of quantize(x)) in place of the f32 input."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 24)), jnp.float32)  # g: (2, 8, 8, 24)
  t = QuantSpec('int8')
  f = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                            config=all_three(t, t, 'real'))
  y, vjp = jax.vjp(f, x, w)
  bwd = str(jax.make_jaxpr(vjp)(jnp.ones_like(y)))
  assert not re.findall(r'i8\[2,8,8,16\] = convert_element_type', bwd)
  kept = [a for a in jax.tree.leaves(vjp) if hasattr(a, 'dtype') and a.dtype == jnp.int8]
  assert [a.shape for a in kept] == [x.shape]
  np.testing.assert_array_equal(kept[0], quantizers.quantize(x, t).qvalue)
  # Those integers are quantize(x) taken straight from x: the compiled step rounds x once (requantizing x_hat
  # rounded it twice in one pass).
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), (0, 1))).lower(x, w).compile().as_text()
  assert re.findall(r'= f32\[([\d,]*)\][^ ]* round-nearest-even\(', hlo).count('2,8,8,16') == 1
