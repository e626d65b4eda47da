"""Quantized dot_general on 8 simulated CPU devices, mesh (4, 2) ('data', 'model'), checked in the compiled HLO.

The checks run in a child process started with JAX_NUM_CPU_DEVICES=8 (the pytest workers keep their own device
count); the child prints its findings as JSON and the tests below assert on them.

  - weights sharded along the output dim, per-channel (and sub-channel) scales sharded the same way: the
    quantized forward compiles with no collective at all, like the float matmul;
  - contraction dim sharded: int8 partial sums are all-reduced in int32 before the scales are applied (exact),
    plus a scale-sized all-reduce of the operands' non-finite flags;
    with dynamic (calibrated) scales the only other collectives are scale-sized max-reductions of the
    calibration, never an f32 reduction of the matmul output;
  - sub-channel (per-group) scales with the contraction sharded: each group is rescaled before the cross-shard
    sum, so that reduction is f32;
  - a training step: every reduction the float step does in f32 runs in s32, plus scale-sized reductions;
  - Explicit sharding mode (jax.make_mesh's default): the output-sharded forward works; contraction-sharded
    matmuls (also the backward of any sharded-batch layer) need out_sharding, which the op drops (xfail);
  - per-tensor ranges (calibration) of an activation sharded on two axes: scalar all-reduces only in Auto mode,
    and they compile in Explicit mode.
"""

import json
import math
import os
import subprocess
import sys

import pytest

CHILD_FLAG = 'QJAX_SHARDING_CHILD'
COLLECTIVES = ('all-gather', 'all-reduce', 'collective-permute', 'all-to-all', 'reduce-scatter')


# ------------------------------------------------------------------------------------ child (8 devices)


def _child():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from qjax import QuantSpec, calibration, ops
  from qjax.ops import DotConfig, MatmulConfig

  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
  sh = lambda *p: NamedSharding(mesh, P(*p))
  dn = (((1,), (0,)), ((), ()))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((128, 32)), jnp.float32)
  s8 = QuantSpec(format='int8', granularity='per_channel', po2_scale=True)
  a8 = QuantSpec(format='int8', granularity='per_channel', scheme='asymmetric', calibration='minmax', po2_scale=True)
  g8 = QuantSpec(format='int8', granularity='per_group', group_size=32, po2_scale=True)
  out = {}

  def record(name, fn, in_sh, out_sh, *args, reference=None):
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh)
    rep = ops.inspect_matmuls(jitted, *args)
    got = jitted(*args)
    ref = (reference or fn)(*args)  # unsharded, eager
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True))
    out[name] = {
        'collectives': [[c.op, [[d, list(s)] for d, s in c.operands]] for c in rep.collectives],
        'matmuls': [[m.signature, list(m.lhs_shape), list(m.rhs_shape), list(m.out_shape), m.fast]
                    for m in rep.compiled],
        'lowered_int8': rep.lowered_int8,
        'max_abs_diff': diff,
        'out_specs': [list(a.sharding.spec) for a in jax.tree.leaves(got)],
    }

  def fwd(cfg, *param_names):  # param_names: which trailing arguments are lhs_params / rhs_params
    return lambda a, b, *p: ops.dot_general(a, b, dn, config=cfg, **dict(zip(param_names, p, strict=True)))

  def cfg_of(ls, rs):
    return DotConfig(fwd=MatmulConfig(ls, rs, 'real'), small_m=0)

  out_sh = ((sh('data', None), sh(None, 'model')), sh('data', 'model'))
  k_sh = ((sh('data', 'model'), sh('model', None)), sh('data', None))
  record('float_out', lambda a, b: lax.dot_general(a, b, dn), *out_sh, x, w)
  record('float_k', lambda a, b: lax.dot_general(a, b, dn), *k_sh, x, w)
  record('out_dynamic', fwd(ops.int8_dynamic(8)), *out_sh, x, w)
  record('out_dynamic_asym', fwd(cfg_of(a8, a8)), *out_sh, x, w)
  record('out_per_group', fwd(cfg_of(g8, g8)), *out_sh, x, w)
  w_scale = jnp.max(jnp.abs(w), axis=0, keepdims=True) / 127  # (1, N): one scale per output channel
  x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127  # (M, 1): one per row
  record('out_static', fwd(cfg_of(s8, s8), 'rhs_params'), (sh('data', None), sh(None, 'model'), sh(None, 'model')),
         sh('data', 'model'), x, w, {'scale': w_scale})
  record('k_dynamic', fwd(cfg_of(s8, s8)), *k_sh, x, w)
  record('k_static', fwd(cfg_of(s8, s8), 'lhs_params', 'rhs_params'),
         (sh('data', 'model'), sh('model', None), sh('data', None), sh(None, None)), sh('data', None),
         x, w, {'scale': x_scale}, {'scale': w_scale})
  record('k_per_group', fwd(cfg_of(g8, g8)), *k_sh, x, w)

  def step(dot):
    return jax.grad(lambda a, b: jnp.sum(jnp.square(dot(a, b))), argnums=(0, 1))

  grad_sh = ((sh('data', None), sh(None, 'model')), (sh('data', None), sh(None, 'model')))
  record('step_float', step(lambda a, b: lax.dot_general(a, b, dn)), *grad_sh, x, w)
  record('step_int8', step(fwd(ops.int8_dynamic(8))), *grad_sh, x, w)

  # Explicit mode: types carry shardings, and a sharded contraction needs an explicit out_sharding.
  emesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  cfg = ops.int8_dynamic(8)

  def attempt(name, fn, *args):
    try:
      with jax.set_mesh(emesh):
        args = [jax.device_put(a, s) for a, s in args]
        res = jax.jit(fn)(*args)
        out[name] = {'ok': True, 'types': [str(jax.typeof(r)) for r in jax.tree.leaves(res)],
                     'collectives': len(ops.inspect_matmuls(jax.jit(fn), *args).collectives)}
    except Exception as e:  # noqa: BLE001 -- recorded for the test to assert on
      out[name] = {'ok': False, 'error': f'{type(e).__name__}: {str(e)[:300]}'}

  attempt('explicit_out', fwd(cfg), (x, P('data', None)), (w, P(None, 'model')))
  attempt('explicit_k', lambda a, b: ops.dot_general(a, b, dn, config=cfg, out_sharding=P('data', None)),
          (x, P('data', 'model')), (w, P('model', None)))
  attempt('explicit_k_float', lambda a, b: lax.dot_general(a, b, dn, out_sharding=P('data', None)),
          (x, P('data', 'model')), (w, P('model', None)))
  attempt('explicit_step', step(fwd(cfg)), (x, P('data', None)), (w, P(None, 'model')))
  attempt('explicit_step_float', step(lambda a, b: lax.dot_general(a, b, dn)), (x, P('data', None)),
          (w, P(None, 'model')))
  # Per-tensor ranges of a (batch, seq, heads, head_dim) activation, whose first stage runs along the last axis
  # (calibration.first_stage_axis: no other axis holds whole blocks), and of one whose first stage runs along its
  # sharded seq axis (64 = 2 shards of one block each): in Auto mode only scale-sized all-reduces; in Explicit
  # mode they compile and run (a reshape merging the sharded axes into one, as commit 93e3265 did, all-gathers or
  # is a type error).
  act = jnp.asarray(rng.standard_normal((16, 8, 4, 32)), jnp.float32)
  ranges = lambda a: (calibration.absmax(a, (1, 1, 1, 1), True), *calibration.minmax(a, (1, 1, 1, 1)))
  record('ranges_auto', ranges, (sh('data', 'model'),), (sh(), sh(), sh()), act)
  record('ranges_auto_seq', ranges, (sh('data', 'model'),), (sh(), sh(), sh()),
         jnp.asarray(rng.standard_normal((16, 64, 4, 32)), jnp.float32))
  # An NHWC activation of 16 features whose batch, sharded 4 ways, holds 16 examples per shard: half a block.
  record('ranges_auto_batch', ranges, (sh('data'),), (sh(), sh(), sh()),
         jnp.asarray(rng.standard_normal((64, 14, 14, 16)), jnp.float32))
  attempt('ranges_explicit', ranges, (act, P('data', 'model')))
  attempt('ranges_explicit_inner', ranges, (act, P(None, 'data', 'model')))
  print('RESULT ' + json.dumps(out))


# ----------------------------------------------------------------------------------------- parent tests


@pytest.fixture(scope='module')
def res():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu', **{CHILD_FLAG: '1'})
  env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH', '')) if p)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, f'child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}'
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def _kinds(case):
  return [c[0] for c in case['collectives']]


def _operands(case, op):
  return [tuple((d, tuple(s)) for d, s in c[1]) for c in case['collectives'] if c[0] == op]


def test_mesh_really_shards(res):
  """The float matmul is split 4 x 2 (local 16 x 128 . 128 x 16) with no collective; K-sharded, it all-reduces."""
  f = res['float_out']
  assert f['collectives'] == [] and f['matmuls'] == [['f32 x f32 -> f32', [16, 128], [128, 16], [16, 16], True]]
  assert _kinds(res['float_k']) == ['all-reduce']


@pytest.mark.parametrize('case', ['out_dynamic', 'out_dynamic_asym', 'out_per_group', 'out_static'])
def test_output_sharded_weights_add_no_collective(res, case):
  r = res[case]
  assert r['collectives'] == [], r['collectives']
  assert r['lowered_int8'] == 1
  ((sig, _, _, local_out, fast),) = r['matmuls']
  assert sig == 's8 x s8 -> s32' and fast
  assert local_out[-2:] == [16, 16]  # M = 64 over 'data', N = 32 over 'model' (per-group: groups lead)
  assert r['max_abs_diff'] == 0.0  # same values as the unsharded op
  assert r['out_specs'] == [['data', 'model']]


def test_contraction_sharded_int8_reduces_in_int32(res):
  """Static scales: the matmul output is all-reduced as the local int32 sums (16 x 32, s32); the only other
  collective is the scale-sized all-reduce of each operand's non-finite flag ((16, 1) per row of x, (1, 32) per
  column of w, f32: the partial sums of x - x, NaN where a NaN or inf was), which keeps a NaN row / column NaN in
  real execution (qjax.ops.dot_general)."""
  r = res['k_static']
  # (which all-reduces XLA combines, and in which operand order, is its scheduler's choice)
  assert set(_kinds(r)) == {'all-reduce'}, r['collectives']
  assert sorted(o for c in r['collectives'] for o in c[1]) == [['f32', [1, 32]], ['f32', [16, 1]], ['s32', [16, 32]]], (
      r['collectives'])
  assert r['matmuls'] == [['s8 x s8 -> s32', [16, 64], [64, 32], [16, 32], True]]
  assert r['max_abs_diff'] == 0.0  # integer partial sums: exact


def test_contraction_sharded_dynamic_scales_only_add_scale_reductions(res):
  """Calibrating per-channel scales along a sharded contraction needs a max over shards: scale-sized
  all-reduces ((16, 1) per row of x, (1, 32) per column of w; of int32 keys of the float statistics, see
  qjax/calibration.py). The matmul output is still reduced in s32."""
  r = res['k_dynamic']
  reduces = _operands(r, 'all-reduce')
  assert set(_kinds(r)) == {'all-reduce'}, r['collectives']
  assert (('s32', (16, 32)),) in reduces
  for operands in reduces:
    for dtype, shape in operands:
      if shape != (16, 32):
        assert dtype in ('s32', 'f32') and 1 in shape, r['collectives']  # a scale, not the output
  assert r['max_abs_diff'] == 0.0


def test_contraction_sharded_sub_channel_scales_reduce_in_f32(res):
  """Per-group scales must be applied before the cross-shard sum: one f32 all-reduce of the output, no s32."""
  r = res['k_per_group']
  assert r['collectives'] == [['all-reduce', [['f32', [16, 32]]]]], r['collectives']
  assert r['lowered_int8'] == 1


def test_training_step_reduces_gradients_in_int32(res):
  """Every f32 all-reduce of the float step (the gradient matmuls' partial sums) becomes an s32 all-reduce of
  the same shape; the only other collectives are scale-sized calibration reductions (a 1 in the shape; int32
  keys of the float statistics)."""
  flt, q = res['step_float'], res['step_int8']
  # Compared up to transposition: qjax computes x^T . g as a row-major (K, N) product, autodiff as (N, K).
  float_reduces = sorted(tuple(sorted(s)) for ops_ in _operands(flt, 'all-reduce') for _, s in ops_)
  assert set(_kinds(flt)) == {'all-reduce'} and float_reduces
  s32 = sorted(tuple(sorted(s)) for ops_ in _operands(q, 'all-reduce') for d, s in ops_ if d == 's32' and 1 not in s)
  assert s32 == float_reduces, (flt['collectives'], q['collectives'])
  assert set(_kinds(q)) == {'all-reduce'}
  for ops_ in _operands(q, 'all-reduce'):
    for dtype, shape in ops_:
      assert dtype == 's32' or 1 in shape, q['collectives']
  assert len(q['matmuls']) == 3 and all(m[0] == 's8 x s8 -> s32' and m[4] for m in q['matmuls'])
  assert q['max_abs_diff'] == 0.0


def test_explicit_mode_output_sharded_forward(res):
  r = res['explicit_out']
  assert r['ok'], r.get('error')
  assert r['types'] == ['float32[64@data,32@model]'] and r['collectives'] == 0


@pytest.mark.parametrize('case', ['explicit_k', 'explicit_step'])
def test_explicit_mode_sharded_contraction(res, case):
  """Known limitation: dot_general drops out_sharding, so in Explicit mode a sharded contraction (a forward
  with K sharded, or the backward matmuls of a batch-sharded layer) raises ShardingTypeError where plain
  lax.dot_general works. Any other error is a new failure; once fixed, this passes."""
  assert res[case + '_float']['ok'], res[case + '_float']  # plain lax.dot_general handles it
  r = res[case]
  if not r['ok']:
    assert 'ShardingTypeError' in r['error'] and 'out_sharding' in r['error'], r['error']
    pytest.xfail('qjax dot_general ignores out_sharding (Explicit mode, sharded contraction)')


def test_per_tensor_ranges_of_sharded_activations(res):
  """Per-tensor ranges blocked along the last axis or along a sharded seq axis, and of an NHWC activation whose
  sharded batch splits blocks (one stage): exact, only scale-sized all-reduces (Auto), and in Explicit mode they run
  whichever axes are sharded (merging a sharded inner axis into a major one would be a type error)."""
  for case in ('ranges_auto', 'ranges_auto_seq', 'ranges_auto_batch'):
    r = res[case]
    assert r['max_abs_diff'] == 0
    assert set(_kinds(r)) == {'all-reduce'} and all(
        math.prod(s) <= 32 for ops in _operands(r, 'all-reduce') for _, s in ops), (case, r['collectives'])
  for case in ('ranges_explicit', 'ranges_explicit_inner'):
    assert res[case]['ok'], res[case].get('error')
    assert res[case]['types'] == ['float32[1,1,1,1]'] * 3, res[case]['types']


if __name__ == '__main__' and os.environ.get(CHILD_FLAG):
  _child()
