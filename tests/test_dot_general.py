"""qjax.ops.dot_general: real-integer execution vs fake quant, estimator gradients, backward dimension numbers,
XLA:CPU's fast kernel (via qjax.ops.inspect_matmuls), small-M routing, stochastic rounding and input checks.

Exactness: with power-of-two scales every fake-quantized value is q * 2^e, so as long as each output's partial
sums stay below 2^24 units (K * qrange^2 * scale ratio < 2^24) the f32 matmul of fake quant is exact and equals
the int32 matmul rescaled. Operand data is U[-1, 1] times 2^e per channel and per contraction block, so scales
differ across channels and groups (a mixed-up scale layout shows) while the ratio inside one output stays <= 4.
"""

import dataclasses
import functools
import importlib
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xla_cpu
from jax import lax

import qjax
from qjax import QuantSpec, ops
from qjax.hlo import parse_lowered
from qjax.ops import DotConfig, MatmulConfig

dg = importlib.import_module('qjax.ops.dot_general')  # the module (qjax.ops.dot_general is the function)


def dn(lc, rc, lb=(), rb=()):
  return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


# name: (lhs shape, rhs shape, dimension numbers). Every dim size differs, so a wrong permutation cannot hide.
LAYOUTS = {
    'mk_kn': ((16, 64), (64, 24), dn((1,), (0,))),
    'km_kn': ((64, 16), (64, 24), dn((0,), (0,))),
    'mk_nk': ((16, 64), (24, 64), dn((1,), (1,))),
    'bmk_bkn': ((3, 16, 64), (3, 64, 24), dn((2,), (1,), (0,), (0,))),
    'odd': ((3, 64, 5), (7, 3, 64), dn((1,), (2,), (0,), (1,))),  # contract 1 <-> 2, batch 0 <-> 1
    'two_batch': ((2, 3, 6, 32), (3, 2, 32, 5), dn((3,), (2,), (0, 1), (1, 0))),
    'two_contract': ((4, 6, 8), (8, 5, 4), dn((0, 2), (2, 0))),  # K = 4 * 8 = 32
}
SINGLE_K = [k for k, (_, _, d) in LAYOUTS.items() if len(d[0][0]) == 1]


def operand(seed, shape, contracting, block=16, dtype=jnp.float32, nonneg=False):
  """U[-1, 1] (U[0, 1] if nonneg) times 2^e, e in -2..2 per non-contracted index and 0..1 per contraction block."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0 if nonneg else -1, 1, shape)
  e_shape = tuple(1 if d in contracting else n for d, n in enumerate(shape))
  x = x * np.exp2(rng.integers(-2, 3, e_shape))
  for d in contracting:
    nb = max(shape[d] // block, 1)
    e = np.repeat(rng.integers(0, 2, nb), shape[d] // nb)
    x = x * np.exp2(e).reshape([-1 if i == d else 1 for i in range(len(shape))])
  return jnp.asarray(x, dtype)


def out_shape(ls, rs, dims):
  (lc, rc), (lb, rb) = dims
  lf = [n for d, n in enumerate(ls) if d not in lc and d not in lb]
  rf = [n for d, n in enumerate(rs) if d not in rc and d not in rb]
  return tuple(ls[d] for d in lb) + tuple(lf) + tuple(rf)


def data(layout, seed=0, dtype=jnp.float32, nonneg_lhs=False, block=16):
  ls, rs, dims = LAYOUTS[layout]
  (lc, rc), _ = dims
  lhs = operand(seed, ls, lc, block, dtype, nonneg_lhs)
  rhs = operand(seed + 1, rs, rc, block, dtype)
  os_ = out_shape(ls, rs, dims)
  ct = operand(seed + 2, os_, (len(os_) - 1,), block, dtype)
  return lhs, rhs, ct, dims


@functools.partial(jax.jit, static_argnames=('dims', 'cfg'))
def fwd_bwd(lhs, rhs, ct, lhs_params=None, rhs_params=None, *, dims, cfg):
  """(out, dlhs, drhs, dlhs_params, drhs_params) of the quantized op for cotangent ct."""
  f = lambda a, b, pa, pb: ops.dot_general(a, b, dims, config=cfg, lhs_params=pa, rhs_params=pb)
  out, vjp = jax.vjp(f, lhs, rhs, lhs_params, rhs_params)
  return (out, *vjp(ct))


def config(lspec, rspec, mode, bspec='same', **kw):
  """fwd (lspec, rspec) and both gradient matmuls with bspec (default: the lhs spec), all in `mode`."""
  b = lspec if bspec == 'same' else bspec
  return DotConfig(fwd=MatmulConfig(lspec, rspec, mode), dlhs=MatmulConfig(b, b, mode),
                   drhs=MatmulConfig(b, b, mode), small_m=0, **kw)


def spec(fmt='int8', gran='per_channel', scheme='symmetric', group=16, **kw):
  kw.setdefault('po2_scale', True)
  if scheme == 'asymmetric':
    kw.setdefault('calibration', 'minmax')
  if gran == 'per_group':
    kw['group_size'] = group
  return QuantSpec(format=fmt, granularity=gran, scheme=scheme, **kw)


def qrange(s: QuantSpec) -> int:
  fmt = s.fmt
  return fmt.qmax - fmt.qmin if s.scheme == "asymmetric" else fmt.qmax  # absmax maps onto +-qmax


def _ratio(s: QuantSpec) -> int:
  return 4 if s.granularity == 'per_group' else 1  # po2 scales of groups differ by <= 4x in this data


def _check_exact_range(lhs, rhs, dims, lspec, rspec, b):
  """Every partial sum of every matmul stays below 2^24 units of its smallest scale product."""
  (lc, rc), (lb, rb) = dims
  size = lambda x, ds: int(np.prod([x.shape[d] for d in ds]))
  k_fwd = size(lhs, lc)
  k_dlhs = size(rhs, [d for d in range(rhs.ndim) if d not in rc and d not in rb])
  k_drhs = size(lhs, [d for d in range(lhs.ndim) if d not in lc and d not in lb])
  for k, a, c in ((k_fwd, lspec, rspec), (k_dlhs, b, b), (k_drhs, b, b)):
    assert k * qrange(a) * qrange(c) * _ratio(a) * _ratio(c) < 2 ** 24, 'test data leaves the exact f32 range'


def assert_real_equals_fake(lhs, rhs, ct, dims, lspec, rspec, bspec='same', nontrivial=True, **kw):
  """Forward and both gradients of mode='real' equal mode='fake' bit for bit (and real lowers to int8 dots)."""
  b = lspec if bspec == 'same' else bspec
  _check_exact_range(lhs, rhs, dims, lspec, rspec, b)
  lowered = fwd_bwd.lower(lhs, rhs, ct, dims=dims, cfg=config(lspec, rspec, 'real', bspec, **kw))
  # The real config really lowers to integer matmuls (forward and both gradients).
  low = parse_lowered(lowered.as_text())
  assert [m.signature for m in low] == ['s8 x s8 -> s32'] * 3, [m.signature for m in low]
  real = lowered.compile()(lhs, rhs, ct)
  fake = fwd_bwd(lhs, rhs, ct, dims=dims, cfg=config(lspec, rspec, 'fake', bspec, **kw))
  for name, r, f in zip(('out', 'dlhs', 'drhs'), real[:3], fake[:3], strict=True):
    assert r.dtype == f.dtype, name
    assert r.shape == f.shape, name
    np.testing.assert_array_equal(np.asarray(r, np.float32), np.asarray(f, np.float32), err_msg=name)
  if nontrivial:  # The quantization is not the identity (the test would then prove nothing).
    exact = lax.dot_general(lhs, rhs, dims)
    assert not np.array_equal(np.asarray(real[0], np.float32), np.asarray(exact, np.float32))


# ------------------------------------------------------------------------------ real == fake, exactly


@pytest.mark.parametrize('bits', range(2, 9))
def test_real_equals_fake_bits_schemes(bits):
  """Every width with a symmetric and an asymmetric operand forward, and both operands asymmetric in dlhs and
  drhs (all three zero-point cross terms)."""
  lhs, rhs, ct, dims = data('mk_kn', seed=bits)
  assert_real_equals_fake(lhs, rhs, ct, dims, spec(f'int{bits}'), spec(f'int{bits}', scheme='asymmetric'),
                          spec(f'int{bits}', scheme='asymmetric'))


# (layout, granularity, scheme): every layout, every granularity x scheme at least once.
LAYOUT_CASES = [
    ('mk_kn', 'per_group', 'asymmetric'),
    ('km_kn', 'per_channel', 'asymmetric'),
    ('mk_nk', 'per_tensor', 'symmetric'),
    ('bmk_bkn', 'per_group', 'symmetric'),
    ('odd', 'per_group', 'asymmetric'),
    ('odd', 'per_channel', 'symmetric'),
    ('two_batch', 'per_tensor', 'asymmetric'),
    ('two_contract', 'per_channel', 'symmetric'),
    ('two_contract', 'per_tensor', 'asymmetric'),
]


@pytest.mark.parametrize('layout,gran,scheme', LAYOUT_CASES, ids=['-'.join(c) for c in LAYOUT_CASES])
def test_real_equals_fake_layouts(layout, gran, scheme):
  lhs, rhs, ct, dims = data(layout, seed=7)
  bits = 7 if scheme == 'asymmetric' and gran == 'per_group' else 8  # keeps K * qrange^2 * 16 < 2^24
  s = spec(f'int{bits}', gran, scheme, group=16)
  b = spec('int8', 'per_channel', scheme)  # gradient contractions (N, M) need not divide by 16
  assert_real_equals_fake(lhs, rhs, ct, dims, s, s, b)


def test_real_equals_fake_per_group_everywhere():
  """Sub-channel groups in all three matmuls: K = 64, N = 24, M = 16 all split into groups of 8."""
  lhs, rhs, ct, dims = data('mk_kn', seed=3, block=8)
  s = spec('int8', 'per_group', group=8)
  assert_real_equals_fake(lhs, rhs, ct, dims, s, s)


def test_real_equals_fake_mixed_granularity_and_schemes():
  lhs, rhs, ct, dims = data('odd', seed=4)
  assert_real_equals_fake(lhs, rhs, ct, dims, spec('int6', 'per_group', 'asymmetric'), spec('int8', 'per_channel'),
                          spec('int7', 'per_tensor', 'asymmetric'))


@pytest.mark.parametrize('scheme', ['symmetric', 'asymmetric'])
def test_real_equals_fake_uint8(scheme):
  """uint8 moves into int8 containers (a shift by 128 of qvalue and zero point)."""
  lhs, rhs, ct, dims = data('bmk_bkn', seed=5, nonneg_lhs=True)
  u = spec('uint8', 'per_channel', scheme)
  assert_real_equals_fake(lhs, rhs, ct, dims, u, spec('uint8', 'per_channel', 'asymmetric'),
                          spec('int8', 'per_channel', 'asymmetric'))


def test_real_equals_fake_uint4_narrow():
  lhs, rhs, ct, dims = data('two_batch', seed=6, nonneg_lhs=True)
  assert_real_equals_fake(lhs, rhs, ct, dims, spec('uint4', 'per_channel'), spec('int8n', 'per_channel'))


def test_real_equals_fake_int1():
  """Binary {-1, +1} with scale mean|x|: exact when mean|x| is a power of two (values +-2^e per channel)."""
  ls, rs, dims = LAYOUTS['mk_kn']
  rng = np.random.default_rng(8)
  lhs = jnp.asarray(rng.choice([-1.0, 1.0], ls) * np.exp2(rng.integers(-2, 3, (ls[0], 1))), jnp.float32)
  rhs = jnp.asarray(rng.choice([-1.0, 1.0], rs) * np.exp2(rng.integers(-2, 3, (1, rs[1]))), jnp.float32)
  ct = operand(9, out_shape(ls, rs, dims), ())
  b = spec('int8', 'per_channel')
  assert_real_equals_fake(lhs, rhs, ct, dims, spec('int1', 'per_channel'), spec('int1', 'per_channel'), b,
                          nontrivial=False)
  # And int1 values reproduce the operands exactly: the forward is the float product.
  out = fwd_bwd(lhs, rhs, ct, dims=dims, cfg=config(spec('int1'), spec('int1'), 'real', b))[0]
  np.testing.assert_array_equal(out, lhs @ rhs)


@pytest.mark.parametrize('layout', ['mk_kn', 'odd'])
def test_real_equals_fake_bf16(layout):
  lhs, rhs, ct, dims = data(layout, seed=10, dtype=jnp.bfloat16)
  s = spec('int8', 'per_channel')
  assert_real_equals_fake(lhs, rhs, ct, dims, s, s)
  out, dl, dr = fwd_bwd(lhs, rhs, ct, dims=dims, cfg=config(s, s, 'real'))[:3]
  assert out.dtype == dl.dtype == dr.dtype == jnp.bfloat16


def test_real_equals_fake_without_row_major_drhs():
  """drhs_row_major=False (every other test runs the default True) computes the same weight gradient."""
  lhs, rhs, ct, dims = data('bmk_bkn', seed=11)
  s = spec('int8', 'per_channel', 'asymmetric')
  assert_real_equals_fake(lhs, rhs, ct, dims, s, s, drhs_row_major=False)


# ------------------------------------------------------------------------ estimator gradients vs references


def _sg_round(y):
  return y + lax.stop_gradient(jnp.round(y) - y)


def _grad_scale(s, gs):
  return lax.stop_gradient(s - s * gs) + s * gs


def sg_reference(x, s: QuantSpec, p: dict):
  """Each estimator written the way its paper's code does, with stop_gradient (an independent formulation)."""
  fmt = s.fmt
  lo, hi = float(fmt.qmin), float(fmt.qmax)
  sshape = p['scale'].shape if 'scale' in p else p['alpha'].shape if 'alpha' in p else None
  expand = lambda a: qjax.granularity.expand(a, x.shape)
  if s.estimator in ('ste', 'clipped_ste'):
    scale, zp = qjax.calibrate(lax.stop_gradient(x), s)
    z = 0.0 if zp is None else expand(zp).astype(jnp.float32)
    y = x / expand(scale) + z
    xq = (jnp.clip(jnp.round(y), lo, hi) - z) * expand(scale)
    keep = 1.0 if s.estimator == 'ste' else lax.stop_gradient(((y >= lo) & (y <= hi)).astype(jnp.float32))
    return x * keep + lax.stop_gradient(xq - x * keep)
  n = x.size // int(np.prod(sshape))
  gs = 1.0 / np.sqrt(n * hi)
  if s.estimator == 'lsq':
    scale = expand(_grad_scale(p['scale'], gs))
    return _sg_round(jnp.clip(x / scale, lo, hi)) * scale
  if s.estimator == 'lsq_plus':
    scale, off = expand(_grad_scale(p['scale'], gs)), expand(_grad_scale(p['offset'], gs))
    return _sg_round(jnp.clip((x - off) / scale, lo, hi)) * scale + off
  assert s.estimator == 'pact'
  a = expand(p['alpha'])
  low = -a if fmt.qmin < 0 else jnp.zeros_like(a)
  xc = jnp.where(x >= a, a, jnp.where(x <= low, low, x))
  step = lax.stop_gradient(a / hi)
  return xc + lax.stop_gradient(jnp.round(xc / step) * step - xc)


ESTIMATORS = {
    # estimator: (lhs spec, rhs spec, lhs params, rhs params); lhs per-tensor, rhs per-channel (N = 24).
    'ste': (spec('int4', 'per_tensor', po2_scale=False), spec('int4', 'per_channel', axis=(1,), po2_scale=False)),
    'clipped_ste': (spec('int4', 'per_tensor', 'asymmetric', po2_scale=False, estimator='clipped_ste',
                         calibration='percentile', percentile=90.0),
                    spec('int4', 'per_channel', axis=(1,), po2_scale=False, estimator='clipped_ste',
                         calibration='percentile', percentile=80.0)),
    'lsq': (spec('int4', 'per_tensor', po2_scale=False, estimator='lsq'),
            spec('int4', 'per_channel', axis=(1,), po2_scale=False, estimator='lsq')),
    'lsq_plus': (spec('uint4', 'per_tensor', 'asymmetric', po2_scale=False, estimator='lsq_plus'),
                 spec('int4', 'per_channel', 'asymmetric', axis=(1,), po2_scale=False, estimator='lsq_plus')),
    'pact': (spec('uint4', 'per_tensor', po2_scale=False, estimator='pact'),
             spec('int4', 'per_channel', axis=(1,), po2_scale=False, estimator='pact')),
    'ewgs': (spec('int4', 'per_tensor', po2_scale=False, estimator='ewgs', ewgs_delta=0.2),
             spec('int4', 'per_channel', axis=(1,), po2_scale=False, estimator='ewgs', ewgs_delta=0.2)),
}


def _params(est, x, s, shrink):
  """Learned parameters with a range that clips part of x (so masks and clip gradients matter)."""
  p = qjax.init_params(x, s)
  if est in ('lsq', 'lsq_plus'):
    p['scale'] = p['scale'] * shrink
  if est == 'lsq_plus':
    p['offset'] = p['offset'] + 0.1
  if est == 'pact':
    p['alpha'] = p['alpha'] * shrink
  return p


@pytest.mark.parametrize('est', list(ESTIMATORS))
def test_estimator_gradients_match_references(est):
  lspec, rspec = ESTIMATORS[est]
  dims = LAYOUTS['mk_kn'][2]
  rng = np.random.default_rng(12)
  lhs = jnp.asarray(rng.standard_normal((16, 64)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((64, 24)) * np.exp2(rng.integers(-2, 3, (1, 24))), jnp.float32)
  ct = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)
  lp, rp = _params(est, lhs, lspec, 0.6), _params(est, rhs, rspec, 0.5)
  # The op: estimator specs forward (relative to the contraction), float gradient matmuls.
  op_l = lspec.replace(axis=-1)
  op_r = rspec.replace(axis=-1)
  cfg = DotConfig(fwd=MatmulConfig(op_l, op_r, 'auto'), small_m=0)

  def loss_op(a, b, pa, pb):
    return jnp.vdot(ct, ops.dot_general(a, b, dims, config=cfg, lhs_params=pa or None, rhs_params=pb or None))

  def fq_ref(x, s, p):
    return qjax.fake_quant(x, s, p)

  def loss_fq(a, b, pa, pb):
    return jnp.vdot(ct, lax.dot_general(fq_ref(a, lspec, pa), fq_ref(b, rspec, pb), dims))

  argnums = (0, 1, 2, 3)
  got = jax.jit(jax.grad(loss_op, argnums))(lhs, rhs, lp, rp)
  refs = {'fake_quant': jax.jit(jax.grad(loss_fq, argnums))(lhs, rhs, lp, rp)}
  if est != 'ewgs':  # EWGS scales by sign(g): no stop_gradient form without the cotangent.
    def loss_sg(a, b, pa, pb):
      return jnp.vdot(ct, lax.dot_general(sg_reference(a, lspec, pa), sg_reference(b, rspec, pb), dims))
    refs['stop_gradient'] = jax.jit(jax.grad(loss_sg, argnums))(lhs, rhs, lp, rp)
  for ref_name, ref in refs.items():
    for name, g, r in zip(('lhs', 'rhs', 'lhs_params', 'rhs_params'), got, ref, strict=True):
      for leaf_g, leaf_r in zip(jax.tree.leaves(g), jax.tree.leaves(r), strict=True):
        tol = 2e-5 * float(jnp.max(jnp.abs(leaf_r))) + 1e-6
        np.testing.assert_allclose(leaf_g, leaf_r, rtol=2e-5, atol=tol, err_msg=f'{est} {name} vs {ref_name}')
  # Masks and parameter gradients are exercised: some gradients are zero, learned params get a gradient.
  if est not in ('ste', 'ewgs'):  # those two never zero a gradient with a calibrated (absmax) range
    assert float(jnp.mean(got[0] == 0)) > 0.01 or float(jnp.mean(got[1] == 0)) > 0.01
  for p in jax.tree.leaves((got[2], got[3])):
    assert float(jnp.max(jnp.abs(p))) > 0


# ----------------------------------------------------------------------------- backward dimension numbers


BWD_CASES = [(layout, 'fake') for layout in LAYOUTS] + [('odd', 'real'), ('two_contract', 'real')]


@pytest.mark.parametrize('layout,mode', BWD_CASES, ids=['-'.join(c) for c in BWD_CASES])
def test_backward_dims_match_float_grad(layout, mode):
  """Quantized dlhs/drhs (8-bit po2) with a float forward: gradients within quantization error of jax.grad."""
  lhs, rhs, ct, dims = data(layout, seed=13)
  b = spec('int8', 'per_channel')
  cfg = DotConfig(dlhs=MatmulConfig(b, b, mode), drhs=MatmulConfig(b, b, mode), small_m=0)
  out, dl, dr = fwd_bwd(lhs, rhs, ct, dims=dims, cfg=cfg)[:3]
  ref_out, vjp = jax.vjp(lambda a, c: lax.dot_general(a, c, dims), lhs, rhs)
  rl, rr = vjp(ct)
  np.testing.assert_array_equal(out, ref_out)  # float forward
  for name, g, r in (('dlhs', dl, rl), ('drhs', dr, rr)):
    assert g.shape == r.shape, name
    err = float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r))
    assert 0 < err < 0.02, f'{layout} {name}: relative error {err}'


# -------------------------------------------------------------------------------- XLA:CPU fast kernel


def _dense_loss(cfg):
  def loss(x, w):
    y = ops.dot_general(x, w, dn((1,), (0,)), config=cfg)
    return jnp.mean(jnp.square(y))
  return jax.grad(loss, argnums=(0, 1))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the YNN fast kernel is XLA:CPU')
def test_int8_dynamic_dense_runs_all_three_matmuls_int8_on_ynn():
  x = operand(14, (256, 512), (1,))
  w = operand(15, (512, 256), (0,))
  rep = ops.inspect_matmuls(_dense_loss(ops.int8_dynamic(8)), x, w)
  assert rep.lowered_int8 == rep.n_lowered == 3, rep.summary()
  assert all(m.signature == 's8 x s8 -> s32' for m in rep.lowered), rep.summary()
  assert rep.n_compiled == rep.n_int8 == rep.n_int8_fast == 3, rep.summary()
  assert rep.n_widened == rep.n_int8_slow == 0, rep.summary()
  assert sorted(m.out_shape for m in rep.compiled) == [(256, 256), (256, 512), (512, 256)]
  # 'jit(loss)/jvp(fwd)/dot_general' -> 'jvp(fwd)': each matmul carries its fwd/dlhs/drhs scope name.
  origins = sorted(m.op_name.split('/')[1] for m in rep.compiled)
  assert origins == ['jvp(fwd)', 'transpose(jvp(dlhs))', 'transpose(jvp(drhs))'], rep.summary()


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the YNN fast kernel is XLA:CPU')
def test_naive_weight_gradient_form_on_this_jaxlib():
  """Documents why drhs_row_major exists: x^T . g as written (contract dim 0) is up-cast to s32 x s32 by XLA:CPU
  of jaxlib 0.12.0.x and leaves YNN; jaxlib 0.12.1 keeps it on YNN (tests/xla_cpu.py), where the row-major
  transpose is one copy more than needed."""
  x = operand(14, (256, 512), (1,))
  w = operand(15, (512, 256), (0,))
  cfg = dataclasses.replace(ops.int8_dynamic(8), drhs_row_major=False)
  rep = ops.inspect_matmuls(_dense_loss(cfg), x, w)
  assert rep.lowered_int8 == 3, rep.summary()
  drhs = [m for m in rep.compiled if m.out_shape == (512, 256)]
  assert len(drhs) == 1, rep.summary()
  if xla_cpu.TRANSPOSED_INT8_DOT_FAST:
    assert drhs[0].fast and not drhs[0].widened and drhs[0].signature == 's8 x s8 -> s32', rep.summary()
    assert rep.n_int8_fast == 3 and rep.n_int8_slow == 0, rep.summary()
  else:
    assert not drhs[0].fast and drhs[0].source_category == 'int8', rep.summary()
    assert drhs[0].widened and drhs[0].signature == 's32<-s8 x s32<-s8 -> s32', rep.summary()
    assert rep.n_int8_fast == 2 and rep.n_int8_slow == 1, rep.summary()


# ----------------------------------------------------------------------------------------- small-M routing


def test_small_m_routes_to_float_and_logs_once(monkeypatch, caplog):
  monkeypatch.setattr(dg, '_ROUTED', set())
  caplog.set_level(logging.INFO, logger='qjax')
  x = operand(16, (8, 64), (1,))
  w = operand(17, (64, 48), (0,))
  s = spec('int8', 'per_channel')
  fwd = lambda cfg: (lambda a, b: ops.dot_general(a, b, dn((1,), (0,)), config=cfg))
  routed = DotConfig(fwd=MatmulConfig(s, s), small_m=32)
  forced = DotConfig(fwd=MatmulConfig(s, s), small_m=0)
  rep = ops.inspect_matmuls(fwd(routed), x, w)
  assert rep.n_lowered == 1 and rep.lowered_int8 == 0 and rep.lowered_f32 == 1, rep.summary()
  assert rep.n_int8 == 0, rep.summary()
  rep0 = ops.inspect_matmuls(fwd(forced), x, w)
  assert rep0.lowered_int8 == 1 and rep0.n_int8 == 1, rep0.summary()
  y_routed = jax.jit(fwd(routed))(x, w)  # Traced again: the routing message is not repeated.
  y_int8 = jax.jit(fwd(forced))(x, w)
  np.testing.assert_array_equal(y_routed, y_int8)  # po2 scales: float of quantized values == int8, exactly
  msgs = [r.getMessage() for r in caplog.records if r.name == 'qjax' and 'small_m' in r.getMessage()]
  assert len(msgs) == 1, msgs
  assert 'fwd' in msgs[0] and '8 rows' in msgs[0]


def test_default_one_row_dot_runs_int8_on_the_fast_kernel():
  """Default small_m=0: nothing is routed to float. XLA:CPU's fast kernel of jaxlib 0.12.0.x refuses single-row
  dots, so there the int8 dot of one row is padded to two (a zero row) and sliced back; jaxlib 0.12.1's takes the
  row as it is. On the fast kernel either way, with the same values."""
  s = spec('int8', 'per_channel')
  cfg = DotConfig(fwd=MatmulConfig(s, s))
  assert cfg.small_m == 0
  w = operand(17, (64, 48), (0,))
  f = lambda a, b: ops.dot_general(a, b, dn((1,), (0,)), config=cfg)
  x1 = operand(16, (1, 64), (1,))
  rep = ops.inspect_matmuls(f, x1, w)
  assert rep.lowered_int8 == 1
  if jax.default_backend() == 'cpu':
    (m,) = rep.compiled
    if xla_cpu.ONE_ROW_INT8_DOT_FAST:  # the row as it is (XLA may lay it out as a (64, 1) column)
      assert m.lhs_shape in ((1, 64), (64, 1)) and m.fast, rep.summary()
    else:
      assert m.lhs_shape == (2, 64) and m.fast, rep.summary()
    assert dg.min_free() == (0 if xla_cpu.ONE_ROW_INT8_DOT_FAST else 2)
  fake = DotConfig(fwd=MatmulConfig(s, s, 'fake'))
  np.testing.assert_array_equal(jax.jit(f)(x1, w), ops.dot_general(x1, w, dn((1,), (0,)), config=fake))


@pytest.mark.parametrize('vnni', [True, False])
@pytest.mark.parametrize('rows', [(1,), (3,), (2, 2), (3, 5), (64,), (65,)])
def test_few_rows_against_a_minor_contracted_weight_swap_operands(rows, vnni, monkeypatch):
  """Up to SWAP_MAX_ROWS rows against a 2-D int8 weight contracted along its minor dim (stored transposed, seen
  through a transpose with QArray.minor_dim = 0; or row-major (N, K) contracted along K) run on CPU as
  w (N, K) . x (M, K)^T with the weight as the GEMM's lhs and no copy of it, except the first
  FEW_ROWS_WITHOUT_VNNI rows on a CPU without VNNI, which run as x . w^T over the weight as stored; exact
  integers either way. A row-major (K, N) weight contracted along K keeps x as the lhs. Both CPU classes are
  checked on any machine (qjax.ops.cpu.int8_dot_product patched)."""
  dg = importlib.import_module('qjax.ops.dot_general')
  monkeypatch.setattr(dg.cpu, 'int8_dot_product', lambda: vnni)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(-128, 128, (*rows, 64)), jnp.int8)
  w_nk = jnp.asarray(rng.integers(-128, 128, (48, 64)), jnp.int8)            # stored (N, K)
  want = np.einsum('...k,nk->...n', np.asarray(x, np.int64), np.asarray(w_nk, np.int64))
  d = lambda nd: dn((nd - 1,), (0,))
  stored_t = lambda x, w: dg.low_precision_dot(x, jnp.transpose(w), d(x.ndim), jnp.int32, rhs_minor=0)
  row_nk = lambda x, w: dg.low_precision_dot(x, w, dn((x.ndim - 1,), (1,)), jnp.int32)
  row_kn = lambda x, w: dg.low_precision_dot(x, w, d(x.ndim), jnp.int32)
  m = int(np.prod(rows))
  # By hand: the weight is the lhs up to 64 rows, but not for 1-4 rows without VNNI.
  swapped = jax.default_backend() == 'cpu' and m <= 64 and (vnni or m > 4)
  assert dg.weight_as_lhs(m) == (m <= 64 and (vnni or m > 4))
  for f, w in ((stored_t, w_nk), (row_nk, w_nk), (row_kn, jnp.asarray(np.asarray(w_nk).T.copy()))):
    np.testing.assert_array_equal(jax.jit(f)(x, w), want)
    if jax.default_backend() != 'cpu':
      continue
    rep = ops.inspect_matmuls(f, x, w)
    (op,) = rep.compiled
    assert op.fast, rep.summary()
    if swapped and f is not row_kn:
      assert op.lhs_shape == (48, 64) and op.rhs_shape == (max(m, 2), 64), rep.summary()
    elif m == 1 and dg.min_free() < 2:  # one row as the lhs, unpadded with jaxlib 0.12.1 (maybe laid out (64, 1))
      assert op.lhs_shape in ((1, 64), (64, 1)), rep.summary()
    else:
      assert op.lhs_shape == (max(m, 2), 64), rep.summary()
      if f is not row_kn:
        assert op.rhs_shape == (48, 64), rep.summary()
    text = jax.jit(f).lower(x, w).compile().as_text()
    if f is not row_kn:  # the weight reaches the dot as stored: no transposed copy
      assert 's8[64,48]' not in text, text


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the YNN fast kernel is XLA:CPU')
def test_one_row_probe_matches_the_installed_jaxlib():
  """qjax.ops.cpu finds by compiling whether XLA:CPU's fast kernel takes a single int8 row; the answer is the one
  the installed jaxlib is known to give (tests/xla_cpu.py), and it is asked inside a trace as the ops ask it."""
  cpu = importlib.import_module('qjax.ops.cpu')
  assert cpu.one_row_int8_dot_fast() is xla_cpu.ONE_ROW_INT8_DOT_FAST
  cpu.one_row_int8_dot_fast.cache_clear()
  rows = jax.jit(lambda x: x * dg.min_free())(jnp.ones(()))  # the probe compiles while this traces
  assert float(rows) == (0 if xla_cpu.ONE_ROW_INT8_DOT_FAST else 2)


def test_cpu_flags_decide_the_int8_dot_product_class(monkeypatch):
  """qjax.ops.cpu reads the x86 flags line: VNNI or AMX-INT8 -> True, AVX2 alone -> False, no flags line (ARM,
  another OS) -> None, which keeps the VNNI routing."""
  cpu = importlib.import_module('qjax.ops.cpu')
  for flags, want in (({'avx2', 'avx512_vnni'}, True), ({'avx2', 'avx_vnni'}, True), ({'amx_int8'}, True),
                      ({'avx2', 'fma'}, False), (None, None)):
    monkeypatch.setattr(cpu, 'flags', lambda f=flags: None if f is None else frozenset(f))
    assert cpu.int8_dot_product() is want
  dg = importlib.import_module('qjax.ops.dot_general')
  assert dg.weight_as_lhs(1) and dg.weight_as_lhs(64) and not dg.weight_as_lhs(65)  # None: as with VNNI
  monkeypatch.undo()
  real = cpu.flags()
  try:
    with open('/proc/cpuinfo') as f:
      line = next((ln for ln in f if ln.split(':')[0].strip() == 'flags'), None)
  except OSError:
    line = None
  assert real == (None if line is None else frozenset(line.split(':', 1)[1].split()))


# ----------------------------------------------------------------------------------- stochastic rounding


def _on_grid(seed, shape):
  """int8 grid values times 2^-7 with +-127 in every row and column: every absmax scale is exactly 2^-7."""
  rng = np.random.default_rng(seed)
  q = rng.integers(-127, 128, shape)
  q[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = 127
  q[rng.integers(0, shape[0], shape[1]), np.arange(shape[1])] = -127
  return jnp.asarray(q * 2.0 ** -7, jnp.float32)


def test_stochastic_gradients_need_a_key():
  cfg = ops.int8_dynamic(8, stochastic_grads=True)
  x, w = _on_grid(18, (16, 32)), _on_grid(19, (32, 24))
  loss = lambda a, b, key: jnp.sum(jnp.sin(ops.dot_general(a, b, dn((1,), (0,)), config=cfg, key=key)))
  with pytest.raises(ValueError, match='key'):
    jax.eval_shape(jax.grad(loss), x, w, None)
  grad = jax.jit(jax.grad(loss))
  g1, g2, g3 = (grad(x, w, jax.random.key(k)) for k in (0, 0, 1))
  np.testing.assert_array_equal(g1, g2)
  assert not np.array_equal(g1, g3)


def test_stochastic_gradients_are_unbiased():
  """Operands on the int8 grid (their quantization is exact), so E[dlhs] = g . rhs^T and E[drhs] = lhs^T . g
  exactly; the mean over T keys must be within 5 standard errors (per element) of those."""
  cfg = ops.int8_dynamic(8, stochastic_grads=True)
  dims = dn((1,), (0,))
  x, w = _on_grid(20, (16, 32)), _on_grid(21, (32, 24))
  g = jnp.asarray(np.random.default_rng(22).standard_normal((16, 24)), jnp.float32)

  def grads(key):
    _, vjp = jax.vjp(lambda a, b: ops.dot_general(a, b, dims, config=cfg, key=key), x, w)
    return vjp(g)

  t = 512
  dl, dr = jax.jit(jax.vmap(grads))(jax.random.split(jax.random.key(3), t))
  _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), x, w)
  el, er = vjp(g)
  # SR of g: per element variance <= step^2 / 4, step = per-row (dlhs) or per-column (drhs) absmax / 127.
  step_rows = jnp.max(jnp.abs(g), axis=1, keepdims=True) / 127
  step_cols = jnp.max(jnp.abs(g), axis=0, keepdims=True) / 127
  sd_l = jnp.sqrt(jnp.broadcast_to(step_rows ** 2 / 4, g.shape) @ jnp.square(w).T / t)
  sd_r = jnp.sqrt(jnp.square(x).T @ jnp.broadcast_to(step_cols ** 2 / 4, g.shape) / t)
  for name, samples, expect, sd in (('dlhs', dl, el, sd_l), ('drhs', dr, er, sd_r)):
    z = jnp.abs(jnp.mean(samples, 0) - expect) / sd
    assert float(jnp.max(z)) < 5.5, f'{name}: max |z| = {float(jnp.max(z))}'
    # Each single draw is noisy (SR is on), yet its error is bounded by one step per term.
    assert float(jnp.std(samples, 0).max()) > 0, name
  # Nearest rounding of the same gradients is biased in comparison: the SR mean is closer to the truth.
  near = ops.int8_dynamic(8)
  nl, _ = jax.jit(lambda: jax.vjp(lambda a, b: ops.dot_general(a, b, dims, config=near), x, w)[1](g))()
  assert float(jnp.abs(jnp.mean(dl, 0) - el).mean()) < float(jnp.abs(nl - el).mean())


# ----------------------------------------------------------------------------------------------- bad input


def _trace(cfg, lshape=(16, 64), rshape=(64, 24), dims=dn((1,), (0,)), grad=False, dtype=jnp.float32, **kw):
  x, w = jnp.ones(lshape, dtype), jnp.ones(rshape, dtype)
  f = lambda a, b: jnp.sum(ops.dot_general(a, b, dims, config=cfg, **kw))
  return jax.eval_shape(jax.grad(f, argnums=(0, 1)) if grad else f, x, w)


def test_bad_config_group_size_not_dividing():
  cfg = DotConfig(fwd=MatmulConfig(spec('int8', 'per_group', group=24), spec('int8')))
  with pytest.raises(ValueError, match=r'fwd\.lhs.*group_size=24'):
    _trace(cfg)


def test_bad_config_group_size_in_backward_names_drhs_rhs():
  g = spec('int8', 'per_group', group=5)  # drhs contracts M = 16 (g's rows): 5 does not divide it
  cfg = DotConfig(drhs=MatmulConfig(spec('int8'), g))
  _trace(cfg)  # forward alone is fine
  with pytest.raises(ValueError, match=r'drhs\.rhs.*group_size=5'):
    _trace(cfg, grad=True)


def test_bad_config_group_size_in_backward_names_drhs_lhs():
  """A drhs.lhs spec whose group size does not divide lhs's rows: the error names drhs.lhs (forward_grid, which
  offers the forward's grid to the backward, resolves that spec before the matmul does)."""
  s = spec('int8', 'per_group', group=16)  # forward: groups of 16 along K = 64; drhs contracts the 16 rows
  cfg = DotConfig(fwd=MatmulConfig(s, spec('int8')), drhs=MatmulConfig(spec('int8', 'per_group', group=48),
                                                                       spec('int8')))
  _trace(cfg)
  with pytest.raises(ValueError, match=r'drhs\.lhs.*group_size=48'):
    _trace(cfg, grad=True)


@pytest.mark.parametrize('scheme', ['symmetric', 'asymmetric'])
def test_real_equals_fake_per_group_on_two_contracting_dims(scheme):
  """Two contracting dims (K = 4 x 8): groups of 4 along the last pair (lhs dim 2, rhs dim 0), the other pair's
  indices holding their own groups; both gradients per channel. This was refused ('groups along one contracting
  dim')."""
  lhs, rhs, ct, dims = data('two_contract', seed=9, block=4)
  s = spec('int7' if scheme == 'asymmetric' else 'int8', 'per_group', scheme, group=4)  # K * qrange^2 * 16 < 2^24
  assert_real_equals_fake(lhs, rhs, ct, dims, s, s, spec('int8', 'per_channel', scheme))


@pytest.mark.parametrize('mode', ['fake', 'real'])
def test_per_group_over_heads_and_head_dim_is_the_flattened_contractions(mode):
  """A DenseGeneral output projection contracts (heads, head_dim): its groups are those of the flattened
  contraction (heads-major, groups of 16 within each head's 32), so it equals the 2-D op bit for bit."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(-1, 1, (6, 4, 32)), jnp.float32)             # (batch, heads, head_dim)
  w = jnp.asarray(rng.uniform(-1, 1, (4, 32, 10)) * np.exp2(rng.integers(-2, 3, (4, 2, 1)).repeat(16, 1)),
                  jnp.float32)                                                # (heads, head_dim, out)
  g = spec('int4', 'per_group', group=16)
  cfg = config(spec('int8', 'per_tensor'), g, mode, spec('int8', 'per_channel'))
  ct = jnp.asarray(rng.uniform(-1, 1, (6, 10)), jnp.float32)
  got = fwd_bwd(x, w, ct, dims=dn((1, 2), (0, 1)), cfg=cfg)
  flat = fwd_bwd(x.reshape(6, 128), w.reshape(128, 10), ct, dims=dn((1,), (0,)), cfg=cfg)
  np.testing.assert_array_equal(got[0], flat[0])
  np.testing.assert_array_equal(got[1], flat[1].reshape(6, 4, 32))
  np.testing.assert_array_equal(got[2], flat[2].reshape(4, 32, 10))
  assert not np.array_equal(got[0], lax.dot_general(x, w, dn((1, 2), (0, 1))))  # the int4 groups did quantize


def test_bad_config_per_group_without_a_contracting_dim():
  cfg = DotConfig(fwd=MatmulConfig(spec('int8'), spec('int8', 'per_group', group=4)))
  with pytest.raises(ValueError, match=r'fwd\.rhs: granularity="per_group" groups along a contracting dim, but '
                     r'this operand contracts none'):
    _trace(cfg, (3, 4), (8,), dn((), ()))


def test_bad_config_real_mode_with_nf4():
  cfg = DotConfig(fwd=MatmulConfig(QuantSpec(format='nf4'), spec('int8'), mode='real'))
  with pytest.raises(ValueError, match=r'fwd.*mode="real".*nf4'):
    _trace(cfg)
  cfg = DotConfig(dlhs=MatmulConfig(spec('int8'), QuantSpec(format='fp8_e4m3'), mode='real'))
  with pytest.raises(ValueError, match=r'dlhs.*mode="real".*fp8_e4m3'):
    _trace(cfg, grad=True)


def test_bad_config_real_mode_with_lsq_plus():
  s = spec('int8', 'per_tensor', 'asymmetric', estimator='lsq_plus', po2_scale=False)
  cfg = DotConfig(fwd=MatmulConfig(s, spec('int8'), mode='real'))
  params = {'scale': jnp.ones((1, 1)), 'offset': jnp.zeros((1, 1))}
  with pytest.raises(ValueError, match=r'fwd.*mode="real".*lsq_plus'):
    _trace(cfg, lhs_params=params)


@pytest.mark.parametrize('dtype', [jnp.int8, jnp.int32])
def test_bad_input_int_operand(dtype):
  cfg = ops.int8_dynamic(8)
  with pytest.raises(ValueError, match=r'lhs.*float operands.*int'):
    _trace(cfg, dtype=dtype)


def test_bad_config_learned_param_missing():
  cfg = DotConfig(fwd=MatmulConfig(spec('int8', 'per_tensor', estimator='lsq', po2_scale=False), spec('int8')))
  with pytest.raises(ValueError, match=r'fwd\.lhs.*lsq.*scale'):
    _trace(cfg)


def test_bad_config_unequal_groups_in_real_mode():
  cfg = DotConfig(fwd=MatmulConfig(spec('int8', 'per_group', group=16), spec('int8', 'per_group', group=32),
                                   mode='real'))
  with pytest.raises(ValueError, match=r'fwd.*group_size=16.*group_size=32'):
    _trace(cfg)


def test_int_dynamic_names_its_width():
  """int_dynamic(bits) is the general recipe; int8_dynamic is int8 only (int8_dynamic(4) used to return int4)."""
  from qjax import ops
  assert ops.int_dynamic(4).fwd.lhs.format == 'int4' and ops.int_dynamic(4, bwd_bits=None).dlhs.lhs is None
  assert ops.int8_dynamic(8) == ops.int_dynamic(8) and ops.int8_dynamic().fwd.rhs.format == 'int8'
  with pytest.raises(ValueError, match=r'int_dynamic\(4\)'):
    ops.int8_dynamic(4)


def test_real_forward_rounds_each_operand_once_and_keeps_no_int8_copy_for_the_backward():
  """Real mode takes the operand's integers straight from x (quantize), not by requantizing fake_quant's x_hat: the
  compiled forward rounds the (16, 64) activation once. The backward's residuals hold x_hat and the grid, not the
  int8 qvalue as well (an extra copy of every activation until the backward)."""
  x, w = operand(0, (16, 64), (1,)), operand(1, (64, 24), (0,))
  cfg = DotConfig(MatmulConfig(QuantSpec('int8'), QuantSpec('int8', granularity='per_channel', axis=1), 'real'),
                  small_m=0)
  f = lambda x, w: ops.dot_general(x, w, dn((1,), (0,)), config=cfg, lhs_params={'scale': jnp.full((1, 1), 0.01)})
  hlo = jax.jit(f).lower(x, w).compile().as_text()
  assert len(re.findall(r'f32\[16,64\]\{1,0\} round-nearest-even', hlo)) == 1
  y, vjp = jax.vjp(f, x, w)
  int8_leaves = [a for a in jax.tree.leaves(vjp) if hasattr(a, 'dtype') and a.dtype == jnp.int8]
  assert not [a.shape for a in int8_leaves if a.shape == x.shape]
  # Under differentiation the forward requantizes x_hat instead (ops.dot_general.for_training): the same integers,
  # so the same output bit for bit, also with a scale that is not a power of two.
  g = lambda x, w: ops.dot_general(x, w, dn((1,), (0,)), config=cfg, lhs_params={'scale': jnp.full((1, 1), 0.0137)})
  np.testing.assert_array_equal(jax.jit(g)(x, w), jax.jit(lambda x, w: jax.vjp(g, x, w)[0])(x, w))
  np.testing.assert_array_equal(jax.jit(f)(x, w), y)


@pytest.mark.parametrize('granularity', ['per_channel', 'per_tensor'])
def test_blocked_float_route_gives_the_same_output_with_and_without_differentiation(granularity):
  """A one-row fake-mode dot with a large rhs takes the blocked float route, which dequantizes a qvalue block by
  block where the rhs carries one. Without differentiation the rhs's qparams carry quantize(w) (the direct
  qvalues); under it they do not (ops.dot_general.for_training), and the route uses w_hat. Same output, bit for bit."""
  x, w = operand(2, (1, 2048), (1,)), operand(3, (2048, 1024), (0,))
  dims = dn((1,), (0,))
  assert dg._float_block_rows(x.shape, w.shape, dims)  # the blocked route
  cfg = DotConfig(MatmulConfig(QuantSpec('int8'), QuantSpec('int8', granularity=granularity, axis=1), 'fake'),
                  small_m=0)
  f = lambda x, w: ops.dot_general(x, w, dims, config=cfg)
  np.testing.assert_array_equal(jax.jit(f)(x, w), jax.jit(lambda x, w: jax.vjp(f, x, w)[0])(x, w))


def test_precision_reaches_the_float_and_fake_quant_matmuls():
  """lax precision (TF32 / bf16 passes on GPU and TPU) was dropped; it now reaches every matmul that runs in
  float or fake quant, forward and backward, and the unquantized op."""
  x, w = jnp.ones((4, 8)), jnp.ones((8, 3))
  dims = (((1,), (0,)), ((), ()))
  s = QuantSpec('int8')
  for cfg in (DotConfig(), DotConfig(fwd=MatmulConfig(s, s, 'fake'))):
    loss = lambda x, w, cfg=cfg: ops.dot_general(x, w, dims, lax.Precision.HIGHEST, config=cfg).sum()
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
    dots = re.findall(r'stablehlo\.dot_general.*', text)
    assert len(dots) == 3 and all('HIGHEST' in d for d in dots), dots  # forward, dlhs, drhs


@pytest.mark.parametrize('mode', ['real', 'fake'])
def test_backward_multiplies_the_forwards_operands_on_their_forward_grid(mode):
  """A backward matmul that quantizes an operand under its forward spec takes the forward's grid
  (ops.dot_general.forward_grid): x_hat and w_hat exactly, not requantized on a recalibrated grid. With static
  scales of 2^-4 and integers up to 40 (absmax would give the scale 40 * 2^-4 / 127 and round 127 k / 40 again),
  dw = x_hat^T . g and dx = g . w_hat^T hold exactly; g is on its own per-tensor grid (absmax 127 * 2^-3)."""
  rng = np.random.default_rng(0)
  kx, kw = rng.integers(-40, 41, (16, 64)), rng.integers(-40, 41, (64, 24))
  kx[0, 0], kw[0, 0] = 40, -40
  x, w = jnp.asarray(kx * 2.0 ** -4 + 0.01, jnp.float32), jnp.asarray(kw * 2.0 ** -4 - 0.01, jnp.float32)
  kg = rng.integers(-127, 128, (16, 24))
  kg[3, 5] = 127
  g = jnp.asarray(kg * 2.0 ** -3, jnp.float32)
  t = QuantSpec('int8')
  cfg = DotConfig(MatmulConfig(t, t, mode), MatmulConfig(t, t, mode), MatmulConfig(t, t, mode), small_m=0)
  params = {'scale': jnp.full((1, 1), 2.0 ** -4)}
  f = lambda x, w: ops.dot_general(x, w, dn((1,), (0,)), config=cfg, lhs_params=params, rhs_params=params)
  y, vjp = jax.vjp(jax.jit(f), x, w)
  dx, dw = vjp(g)
  x_hat, w_hat = kx * 2.0 ** -4, kw * 2.0 ** -4
  np.testing.assert_array_equal(y, x_hat @ w_hat)
  np.testing.assert_array_equal(dw, x_hat.T @ np.asarray(g))
  np.testing.assert_array_equal(dx, np.asarray(g) @ w_hat.T)


def _int8_conversions(jaxpr, shape) -> int:
  """How many convert_element_type eqns of a jaxpr's text produce int8 arrays of `shape`."""
  return len(re.findall(rf'i8\[{",".join(map(str, shape))}\] = convert_element_type', str(jaxpr)))


def test_backward_takes_the_forwards_integers_instead_of_requantizing():
  """In int8 training both backward matmuls take x and w on their forward grids. The forward quantizes x_hat and
  w_hat once for itself and the backward (ops.dot_general.with_integers): the backward converts only g to int8
  (once per gradient matmul) and holds the forward's integers, those of quantize(x), in place of x_hat's f32."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)  # (batch, seq, features): XLA reshapes it for the dot
  w = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)
  t = QuantSpec('int8')
  cfg = DotConfig(MatmulConfig(t, t, 'real'), MatmulConfig(t, t, 'real'), MatmulConfig(t, t, 'real'), small_m=0)
  y, vjp = jax.vjp(lambda x, w: ops.dot_general(x, w, dn((2,), (0,)), config=cfg), x, w)
  bwd = jax.make_jaxpr(vjp)(jnp.ones_like(y))
  assert (_int8_conversions(bwd, x.shape), _int8_conversions(bwd, w.shape), _int8_conversions(bwd, y.shape)) == (
      0, 0, 2)
  kept = {a.shape: a for a in jax.tree.leaves(vjp) if hasattr(a, 'dtype') and a.dtype == jnp.int8}
  assert set(kept) == {x.shape, w.shape}
  np.testing.assert_array_equal(kept[x.shape], qjax.quantizers.quantize(x, t).qvalue)
  np.testing.assert_array_equal(kept[w.shape], qjax.quantizers.quantize(w, t).qvalue)
  # Only the forward's grid is shared: a backward spec naming another grid still quantizes x_hat itself.
  other = dataclasses.replace(cfg, drhs=MatmulConfig(t.replace(format='int4'), t, 'real'))
  y, vjp = jax.vjp(lambda x, w: ops.dot_general(x, w, dn((2,), (0,)), config=other), x, w)
  assert _int8_conversions(jax.make_jaxpr(vjp)(jnp.ones_like(y)), x.shape) == 1


def _rounded_shapes(hlo: str) -> list[str]:
  """The shapes of a compiled program's f32 round-nearest-even instructions, sorted."""
  return sorted(re.findall(r'= f32\[([\d,]*)\][^ ]* round-nearest-even\(', hlo))


def test_shared_integers_are_the_direct_qvalues_rounded_once():
  """The integers the forward shares with the backward are quantize(x) taken straight from x: the compiled
  training step rounds x and w once each (requantizing x_hat fused fake_quant's rounding into the same pass and
  rounded every element twice), and g once."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 8, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 24)), jnp.float32)
  t = QuantSpec('int8')
  cfg = DotConfig(MatmulConfig(t, t, 'real'), MatmulConfig(t, t, 'real'), MatmulConfig(t, t, 'real'), small_m=0)
  f = lambda x, w: jnp.sum(ops.dot_general(x, w, dn((2,), (0,)), config=cfg) ** 2)
  hlo = jax.jit(jax.grad(f, (0, 1))).lower(x, w).compile().as_text()
  assert _rounded_shapes(hlo) == ['16,24', '2,8,64', '64,24']


def test_backward_recalibrates_where_its_spec_names_another_grid():
  """Per-channel operands resolve to other scale shapes in the backward (per column of x for dw, per row of w for
  dx): no forward grid fits, and the backward calibrates its own (forward_grid is None)."""
  t, c = QuantSpec('int8'), QuantSpec('int8', granularity='per_channel')
  shape, fwd_sides, dw_sides = (16, 64), ((1,), ()), ((0,), ())
  qp = dg.grid_of(jnp.ones((1, 1)), None, t)
  assert dg.forward_grid(qp, t, t, shape, fwd_sides, dw_sides, 'drhs.lhs') is qp
  assert dg.forward_grid(qp, t, t.replace(estimator='clipped_ste'), shape, fwd_sides, dw_sides, 'drhs.lhs') is qp
  assert dg.forward_grid(dg.grid_of(jnp.ones((16, 1)), None, c), c, c, shape, fwd_sides, dw_sides, 'drhs.lhs') is None
  assert dg.forward_grid(qp, t, t.replace(format='int4'), shape, fwd_sides, dw_sides, 'drhs.lhs') is None
  assert dg.forward_grid(None, t, t, shape, fwd_sides, dw_sides, 'drhs.lhs') is None


def _fusion_bodies(hlo: str, out_type: str) -> list[str]:
  """The fused computations of the entry's fusions whose output type starts with `out_type`."""
  entry = hlo[hlo.index('ENTRY'):]
  names = re.findall(rf'= {re.escape(out_type)}[^ ]* fusion\([^\n]*calls=(%[\w.-]+)', entry)
  bodies = []
  for name in names:
    start = hlo.index(f'\n{name} ') + 1
    bodies.append(hlo[start:hlo.index('\n}', start)])
  return bodies


@pytest.mark.parametrize('train', [False, True])
def test_a_dynamic_scale_is_computed_once_not_per_element(train):
  """The passes that quantize or fake-quantize an operand read its dynamic scale from a buffer: XLA had fused the
  scale's arithmetic (the absmax key's bitcast, the nextafter keeping absmax on the grid) into them, and for a
  per-output-channel weight scale, which varies along the minor dim, recomputed it for every element."""
  x, w = operand(0, (16, 64), (1,)), operand(1, (64, 48), (0,))
  cfg = DotConfig(MatmulConfig(QuantSpec('int8'), QuantSpec('int8', granularity='per_channel'), 'real'),
                  small_m=0)
  f = lambda x, w: jnp.sum(ops.dot_general(x, w, dn((1,), (0,)), config=cfg) ** 2)
  hlo = jax.jit(jax.grad(f, (0, 1)) if train else f).lower(x, w).compile().as_text()
  bodies = _fusion_bodies(hlo, 's8[64,48]') + _fusion_bodies(hlo, 'f32[64,48]')
  assert _fusion_bodies(hlo, 's8[64,48]'), 'no fusion quantizes w'
  for body in bodies:
    assert 'nextafter' not in body and 'bitcast-convert(' not in body, body


def _po2_grid(rng, shape):
  """k / 64 with |k| <= 64 and one |k| = 64: with absmax 1 a power-of-two int8 scale is 2^-6, so every value,
  and a cotangent of 1, lies on its grid exactly."""
  k = rng.integers(-64, 65, shape).astype(np.float32)
  k.flat[0] = 64.0
  return jnp.asarray(k / 64)


@pytest.mark.parametrize('mode', ['fake', 'real', 'auto'])
@pytest.mark.parametrize('ls, rs, dims, perm', [
    ((8,), (8,), dn((0,), (0,)), (0,)),              # 'i,i->'
    ((2, 5), (5, 2), dn((0, 1), (1, 0)), (1, 0)),    # 'ij,ji->': w^T is laid out as x
])
def test_full_contraction_gradients(mode, ls, rs, dims, perm):
  """A scalar output (a loss-like 'i,i->'): its cotangent is a scalar, and the gradient matmuls are outer
  products with it, which failed with 'rank >= 1 to quantize'. On the grid, d(x . w)/dx = w and /dw = x."""
  s = QuantSpec(format='int8', po2_scale=True)
  m = MatmulConfig(s, s, mode)
  cfg = DotConfig(fwd=m, dlhs=m, drhs=m)
  rng = np.random.default_rng(0)
  x, w = _po2_grid(rng, ls), _po2_grid(rng, rs)
  f = lambda x, w: ops.dot_general(x, w, dims, config=cfg)
  assert f(x, w) == lax.dot_general(x, w, dims)
  dx, dw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  np.testing.assert_array_equal(dx, jnp.transpose(w, perm))
  np.testing.assert_array_equal(dw, jnp.transpose(x, perm))


@pytest.mark.parametrize('mode', ['fake', 'real'])
def test_scalar_operand(mode):
  """lax.dot_general takes a scalar operand (no dims to contract): a * w, and its gradients sum(g * w), a * g."""
  s = QuantSpec(format='int8', po2_scale=True)
  m = MatmulConfig(s, s, mode)
  cfg = DotConfig(fwd=m, dlhs=m, drhs=m)
  a, w = jnp.float32(0.5), _po2_grid(np.random.default_rng(1), (3, 4))
  f = lambda a, w: ops.dot_general(a, w, dn((), ()), config=cfg)
  np.testing.assert_array_equal(f(a, w), 0.5 * w)
  np.testing.assert_array_equal(f(0.5, np.asarray(w)), 0.5 * w)  # a Python float and a NumPy array, as lax takes
  da, dw = jax.grad(lambda a, w: jnp.sum(f(a, w)), argnums=(0, 1))(a, w)
  assert da.shape == () and da == jnp.sum(w)
  np.testing.assert_array_equal(dw, jnp.full((3, 4), 0.5))
