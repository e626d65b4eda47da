"""QAT -> PTQ serving: convert_linen / convert_nnx replace every quantized kernel with a ServingWeight (int8, or
int4 packed two per byte), the serving forward equals the QAT evaluation forward bit for bit (on the real int8
path, also for a single row, which runs int8 padded to two rows on CPU), and the orbax serving checkpoint
is a fraction of the float one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from experiments.fileio import dir_bytes
from experiments.models import MLP
from qjax.flax import ServingWeight, convert_linen, convert_nnx, quantize_linen, quantize_nnx
from qjax.flax.intercept import pack_int4, unpack_int4
from qjax.hlo import parse_lowered
from qjax.ops import inspect_matmuls
from qjax.ops.dot_general import weight_as_lhs

RULES = [
    {'module_path': 'conv', 'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
     'act': {'format': 'int8', 'calibration': 'percentile', 'percentile': 99.0, 'estimator': 'pact'},
     'mode': 'real'},
    {'module_path': 'dense4', 'weight': {'format': 'int4', 'granularity': 'per_channel'}, 'act_static': True,
     'act': {'format': 'int8', 'scheme': 'asymmetric', 'calibration': 'minmax'}},
    {'module_path': 'ein', 'weight': {'format': 'int8', 'granularity': 'per_channel', 'estimator': 'lsq'},
     'act': {'format': 'int8', 'granularity': 'per_channel'}},
    {'module_path': 'dg', 'weight': {'format': 'int4', 'granularity': 'per_group', 'group_size': 8,
                                     'estimator': 'lsq'}, 'act': {'format': 'int8'}},
    {'module_path': 'head', 'weight': {'format': 'int8', 'granularity': 'per_channel'},
     'act': {'format': 'int8', 'granularity': 'per_channel'}},
]
KERNELS = {'conv': ((3, 3, 3, 8), False), 'dense4': ((512, 32), True), 'ein': ((32, 2, 16), False),
           'dg': ((32, 16), True), 'head': ((16, 10), False)}  # shape, packed int4


def images(seed, batch):
  return jax.random.normal(jax.random.key(seed), (batch, 8, 8, 3))


def lowered_categories(fn, *args):
  return sorted(op.category for op in parse_lowered(jax.jit(fn).lower(*args).as_text(debug_info=True)))


def check_serving_weight(sw, shape, packed):
  """A served weight of `shape`; 2-D kernels with scales per output channel are stored transposed, (out, in)."""
  assert isinstance(sw, ServingWeight) and sw.shape == shape and sw.packed == packed
  assert sw.transposed == (len(shape) == 2 and sw.scale.shape[0] == 1)
  stored = shape[::-1] if sw.transposed else shape
  assert sw.to_qarray().qvalue.shape == shape
  if packed:
    a = sw.pack_axis
    assert sw.qvalue.dtype == jnp.uint8
    assert sw.qvalue.shape == stored[:a] + ((stored[a] + 1) // 2,) + stored[a + 1:]
    assert int(jnp.abs(sw.to_qarray().qvalue).max()) <= 8
  else:
    assert sw.qvalue.dtype == jnp.int8 and sw.qvalue.shape == stored


def check_no_float_kernel(leaves):
  floats = [a for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)]
  assert not {a.shape for a in floats} & {shape for shape, _ in KERNELS.values()}
  assert max(a.size for a in floats) <= 64  # biases, scales (per_group 4 x 16) and statistics only


def test_int4_packing_round_trips():
  rng = np.random.default_rng(0)
  for shape in ((6, 3), (7, 2, 5), (1, 4), (9,)):
    q = jnp.asarray(rng.integers(-8, 8, shape), jnp.int8)
    p = pack_int4(q)
    assert p.dtype == jnp.uint8 and p.shape == ((shape[0] + 1) // 2,) + shape[1:]
    assert jnp.array_equal(unpack_int4(p, shape), q)
  # Two's complement nibbles: low nibble first.
  assert int(pack_int4(jnp.array([-1, 3], jnp.int8))[0]) == 0x3F


# ------------------------------------------------------------------------------------------------- Linen


class LNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name='conv')(x))
    x = nn.relu(nn.Dense(32, name='dense4')(x.reshape(x.shape[0], -1)))
    x = nn.relu(nn.Einsum((32, 2, 16), 'bd,dhk->bhk', name='ein')(x)).reshape(x.shape[0], -1)
    x = nn.relu(nn.DenseGeneral(16, name='dg')(x))
    return nn.Dense(10, name='head')(x)


def test_convert_linen_serving_equals_qat_eval_bit_for_bit():
  qm = quantize_linen(LNet(), RULES)
  x = images(0, 40)
  v = jax.jit(qm.init)(jax.random.key(1), x)
  _, upd = jax.jit(lambda v, x: qm.apply(v, x, mutable=['qjax_stats']))(v, images(1, 40))  # a training step
  v = {**v, **upd}
  sv = convert_linen(qm, v, x)
  for name, (shape, packed) in KERNELS.items():
    check_serving_weight(sv['params'][name]['kernel'], shape, packed)
  # No float kernel, and the weights' learned steps are folded into their ServingWeights.
  assert 'conv0_rhs_scale' in v['params']['conv'] and 'einsum0_rhs_scale' in v['params']['ein']
  assert not {'conv0_rhs_scale', 'einsum0_rhs_scale', 'dot_general0_rhs_scale'} & {
      k for m in sv['params'].values() for k in m}
  assert 'conv0_lhs_alpha' in sv['params']['conv']  # activation quantizers keep theirs
  check_no_float_kernel(jax.tree.leaves(sv))
  assert jax.tree.structure(sv['qjax_stats']) == jax.tree.structure(v['qjax_stats'])

  qat, srv = jax.jit(qm.apply), jax.jit(qm.serving().apply)
  for batch in (40, 1):  # real int8 matmuls; 1 row: padded to two rows on CPU (small_m=0 routes nothing to float)
    xb = images(2 + batch, batch)
    y = srv(sv, xb)
    assert y.shape == (batch, 10) and jnp.array_equal(y, qat(v, xb))
  assert lowered_categories(qm.serving().apply, sv, images(0, 40)) == ['int8'] * 5
  assert lowered_categories(qm.serving().apply, sv, images(0, 1)) == ['int8'] * 5


def test_serving_weight_outside_a_quantizing_rule_runs_dequantized():
  qm = quantize_linen(nn.Dense(4), [{'module_path': '.*', 'weight': {'format': 'int8'}, 'act': {'format': 'int8'}}])
  x = jnp.ones((2, 3))
  sv = convert_linen(qm, qm.init(jax.random.key(0), x), x)
  floats = quantize_linen(nn.Dense(4), [{'module_path': '.*', 'keep_float': True}]).serving()
  # A served weight that reaches an op no rule quantizes is read as its dequantized float (a float op).
  w = sv['params']['kernel'].to_qarray().dequantize()
  assert jnp.array_equal(floats.apply(sv, x), x @ w + sv['params']['bias'])


# --------------------------------------------------------------------------------------------------- NNX


class NNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.dense4 = nnx.Linear(512, 32, rngs=rngs)
    self.ein = nnx.Einsum('bd,dhk->bhk', (32, 2, 16), (2, 16), rngs=rngs)
    self.dg = nnx.LinearGeneral(32, 16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    x = nnx.relu(self.dense4(x.reshape(x.shape[0], -1)))
    x = nnx.relu(self.ein(x)).reshape(x.shape[0], -1)
    return self.head(nnx.relu(self.dg(x)))


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(48, name='out')(nn.relu(nn.Dense(64, name='hidden')(x)))


@pytest.mark.parametrize('batch', [1, 5, 100])
def test_served_dense_multiplies_the_stored_transposed_weight(batch):
  """Per-channel Dense kernels are stored transposed, (out, in); the serving forward multiplies them as stored,
  with no transposed copy: few rows with the weight as the GEMM's lhs (decode; qjax.ops.dot_general
  .weight_as_lhs says how few on this CPU), more as x . w^T, on the fast kernel on CPU. It equals the QAT
  evaluation forward bit for bit at every batch."""
  rules = [{'module_path': '.*', 'weight': {'format': 'int8', 'granularity': 'per_channel'}, 'act_static': True,
            'act': {'format': 'int8'}}]
  qm = quantize_linen(TwoDense(), rules)
  x = jax.random.normal(jax.random.key(0), (batch, 96))
  v = jax.jit(qm.init)(jax.random.key(1), x)
  _, upd = jax.jit(lambda v, x: qm.apply(v, x, mutable=['qjax_stats']))(v, jax.random.normal(jax.random.key(2),
                                                                                             (8, 96)))
  v = {**v, **upd}
  sv = convert_linen(qm, v, x)
  kernels = {k: sv['params'][k]['kernel'] for k in sv['params'] if 'kernel' in sv['params'][k]}
  assert kernels and all(sw.transposed and sw.qvalue.shape == sw.shape[::-1] for sw in kernels.values())
  serve = qm.serving().apply
  assert jnp.array_equal(jax.jit(serve)(sv, x), jax.jit(qm.apply)(v, x))
  if jax.default_backend() != 'cpu':
    return
  rep = inspect_matmuls(serve, sv, x)
  stored = {tuple(sw.qvalue.shape) for sw in kernels.values()}
  assert len(rep.compiled) == len(kernels) and all(m.fast for m in rep.compiled), rep.summary()
  sides = {(m.lhs_shape if weight_as_lhs(batch) else m.rhs_shape) for m in rep.compiled}
  assert sides == stored, rep.summary()
  text = jax.jit(serve).lower(sv, x).compile().as_text()
  assert not any(f's8[{k},{n}]' in text for n, k in stored), 'a transposed copy of a served weight'


def test_convert_nnx_serving_equals_qat_eval_bit_for_bit():
  model = NNet(nnx.Rngs(0))
  x = images(0, 40)
  quantize_nnx(model, RULES, x)
  assert hasattr(model.ein, 'qjax_einsum0_rhs_scale') and hasattr(model.conv, 'qjax_conv0_rhs_scale')
  model(images(1, 40))  # a training step for the statistics
  model.eval()
  fwd = nnx.jit(lambda m, x: m(x))
  xs = {batch: images(2 + batch, batch) for batch in (40, 1)}
  want = {batch: fwd(model, xb) for batch, xb in xs.items()}
  assert len(convert_nnx(model, x).weights) == 5
  for name, (shape, packed) in KERNELS.items():
    check_serving_weight(getattr(model, name).kernel.get_value(), shape, packed)
  for name, learned in (('conv', 'qjax_conv0_rhs_scale'), ('ein', 'qjax_einsum0_rhs_scale'),
                        ('dg', 'qjax_dot_general0_rhs_scale')):
    assert not hasattr(getattr(model, name), learned)
  assert hasattr(model.conv, 'qjax_conv0_lhs_alpha')
  check_no_float_kernel(jax.tree.leaves(nnx.state(model)))
  for batch, xb in xs.items():
    y = fwd(model, xb)
    assert y.shape == (batch, 10) and jnp.array_equal(y, want[batch])
  graphdef, state = nnx.split(model)
  serve = lambda state, x: nnx.merge(graphdef, state)(x)
  assert lowered_categories(serve, state, images(0, 40)) == ['int8'] * 5
  assert lowered_categories(serve, state, images(0, 1)) == ['int8'] * 5


# ------------------------------------------------------------------------------------------ checkpoint size


def save(tree, path, compress=True):
  ckpt = ocp.StandardCheckpointer() if compress else ocp.PyTreeCheckpointer(use_compression=False)
  ckpt.save(path, tree)
  if compress:
    ckpt.wait_until_finished()
  return dir_bytes(path)


def restore(path, like):
  return ocp.StandardCheckpointer().restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))


def weight_rules(fmt):
  return [{'module_path': '.*', 'weight': {'format': fmt, 'granularity': 'per_channel'}, 'act': {'format': 'int8'}}]


def check_ratios(float_trees, serving, path, api):
  """Serving/float bytes on disk, with orbax's defaults (zstd level 1) and with compression off for both.

  zstd shrinks f32 kernels by ~7% (their exponent bytes) but not int8 ones, so with the defaults int8 serving
  lands just above 0.27x (0.275 for this MLP); with the same uncompressed settings it is 0.254x."""
  ratios = {}
  for compress in (True, False):
    fb = save(float_trees, path / f'float_{compress}', compress)
    assert fb > 2_000_000  # 784-512-512-10: 2.68 MB of f32
    for fmt, tree in serving.items():
      ratios[(fmt, 'zstd' if compress else 'raw')] = save(tree, path / f'{fmt}_{compress}', compress) / fb
  print(f'{api} serving/float checkpoint bytes:', {k: round(v, 4) for k, v in ratios.items()})
  assert ratios[('int8', 'raw')] <= 0.27 and ratios[('int4', 'raw')] <= 0.15, ratios
  assert ratios[('int8', 'zstd')] <= 0.28 and ratios[('int4', 'zstd')] <= 0.15, ratios


def test_nnx_serving_checkpoint_size(tmp_path):
  x = jax.random.normal(jax.random.key(0), (40, 784))
  serving = {}
  for fmt in ('int8', 'int4'):
    model = MLP((512, 512), 10, rngs=nnx.Rngs(0))
    quantize_nnx(model, weight_rules(fmt), x)
    assert len(convert_nnx(model, x).weights) == 3
    serving[fmt] = nnx.state(model)
    save(serving[fmt], tmp_path / fmt)
    # The serving checkpoint restores into a converted model and serves the same outputs.
    fresh = MLP((512, 512), 10, rngs=nnx.Rngs(1))
    quantize_nnx(fresh, weight_rules(fmt), x)
    convert_nnx(fresh, x)
    nnx.update(fresh, restore(tmp_path / fmt, nnx.state(fresh)))
    assert jnp.array_equal(fresh(x), model(x))
  check_ratios(nnx.state(MLP((512, 512), 10, rngs=nnx.Rngs(0))), serving, tmp_path, 'nnx')


class LMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, n in enumerate((512, 512)):
      x = nn.relu(nn.Dense(n, name=f'hidden_{i}')(x))
    return nn.Dense(10, name='head')(x)


def test_linen_serving_checkpoint_size(tmp_path):
  x = jax.random.normal(jax.random.key(0), (40, 784))
  v = jax.jit(LMLP().init)(jax.random.key(1), x)
  serving = {}
  for fmt in ('int8', 'int4'):
    qm = quantize_linen(LMLP(), weight_rules(fmt))
    serving[fmt] = convert_linen(qm, v, x)
    save(serving[fmt], tmp_path / fmt)
    back = restore(tmp_path / fmt, serving[fmt])
    assert jnp.array_equal(jax.jit(qm.serving().apply)(back, x), jax.jit(qm.apply)(v, x))
  check_ratios(v, serving, tmp_path, 'linen')


@pytest.mark.parametrize('fmt,bits', [('int2', 2), ('int3', 3), ('int4', 4)])
def test_a_conv_kernel_packs_along_a_channel_axis_at_its_width_and_serves_exactly(fmt, bits):
  """A 3x3 conv kernel packed along kh (3, padded to a whole group) would store 3-bit values at a byte each: it
  packs along its input channels instead, at bits/8 bytes per value."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(32, (3, 3), name='conv')(x)
  rules = [{'module_path': '.*', 'weight': {'format': fmt, 'granularity': 'per_channel'}, 'act': None}]
  qm = quantize_linen(Net(), rules)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  v = qm.init(jax.random.key(1), x)
  sv = convert_linen(qm, v, x)
  sw = sv['params']['conv']['kernel']
  assert sw.packed and sw.pack_axis == 2 and sw.qvalue.size == 3 * 3 * 16 * 32 * bits // 8
  np.testing.assert_array_equal(np.asarray(qm.serving().apply(sv, x)), np.asarray(qm.apply(v, x)))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the XLA:CPU kernel choice')
def test_a_packed_w4_3x3_conv_serves_on_the_fast_int8_kernel():
  """Unpacked inside the program, a 4-bit conv kernel took a layout that made XLA:CPU widen the 3x3 s8 conv to
  s32 (8x slower than float in a W4A4 ResNet); the unpacked kernel is now materialised row-major."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(32, (3, 3), name='conv')(x)
  rules = [{'module_path': '.*', 'weight': {'format': 'int4', 'granularity': 'per_channel'},
            'act': {'format': 'int8', 'granularity': 'per_tensor'}, 'mode': 'real'}]
  qm = quantize_linen(Net(), rules)
  x = jax.random.normal(jax.random.key(0), (4, 14, 14, 32))
  v = qm.init(jax.random.key(1), x)
  sv = convert_linen(qm, v, x)
  assert sv['params']['conv']['kernel'].packed
  serve = qm.serving().apply
  rep = inspect_matmuls(serve, sv, x)
  assert (rep.n_int8, rep.n_int8_fast, rep.n_int8_slow) == (1, 1, 0), rep.summary()
  np.testing.assert_array_equal(np.asarray(jax.jit(serve)(sv, x)), np.asarray(jax.jit(qm.apply)(v, x)))


@pytest.mark.parametrize('fmt,rows', [('int2', 128), ('int3', 192), ('int4', 256)])
def test_sub_byte_weights_pack_at_their_width_and_serve_exactly(fmt, rows):
  """A W2 model's serving bytes are below a W3 model's, below a W4 model's; the serving forward still equals
  the quantized evaluation forward."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name='head')(nn.relu(nn.Dense(32, name='fc')(x)))
  rules = [{'module_path': '.*', 'weight': {'format': fmt, 'granularity': 'per_group', 'group_size': 16},
            'act': None}]
  qm = quantize_linen(Net(), rules)
  x = jax.random.normal(jax.random.key(0), (8, 512))
  v = qm.init(jax.random.key(1), x)
  sv = convert_linen(qm, v, x)
  sw = sv['params']['fc']['kernel']
  assert sw.packed and sw.qvalue.dtype == jnp.uint8 and sw.qvalue.shape == (rows, 32)
  np.testing.assert_array_equal(np.asarray(qm.serving().apply(sv, x)), np.asarray(qm.apply(v, x)))


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize('fmt', ['int8', 'int4'])
def test_a_non_finite_weight_serves_nan_as_the_eval_forward_does(bad, fmt):
  """Grid rounding sends NaN to 0 and inf to the end of the grid: a diverged checkpoint served finite numbers
  (0.46 where evaluation gave NaN). The weight's scale group is served with scale NaN instead."""
  qm = quantize_linen(nn.Dense(4), [{'module_path': '.*', 'weight': {'format': fmt, 'granularity': 'per_channel'},
                                     'act': {'format': 'int8'}}])
  x = jnp.ones((2, 8))
  v = qm.init(jax.random.key(1), x)
  v['params']['kernel'] = v['params']['kernel'].at[3, 1].set(bad)
  evaluated = np.asarray(qm.apply(v, x))
  served = np.asarray(qm.serving().apply(convert_linen(qm, v, x), x))
  assert np.isnan(evaluated[:, 1]).all() and np.isnan(served[:, 1]).all()  # the channel holding it
  np.testing.assert_allclose(np.delete(served, 1, axis=1), np.delete(evaluated, 1, axis=1), rtol=1e-6)


def test_a_codebook_weight_serves_its_levels():
  """ServingWeight dropped the codebook: conversion succeeded and the first served forward raised."""
  levels = (-1.0, -0.25, 0.0, 0.5, 1.0)
  rule = {'module_path': '.*', 'weight': dict(format='codebook', codebook=levels), 'act': None}
  qm = quantize_linen(nn.Dense(4), [rule])
  x = jax.random.normal(jax.random.key(0), (3, 8))
  v = qm.init(jax.random.key(1), x)
  served_vars = convert_linen(qm, v, x)
  assert served_vars['params']['kernel'].codebook == levels
  np.testing.assert_allclose(qm.serving().apply(served_vars, x), qm.apply(v, x), rtol=1e-6, atol=1e-6)
