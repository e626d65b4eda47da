"""experiments/bench/kernels.py: the matmuls of a program, replayed alone as written and as int8 GEMMs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments.bench import kernels


def _program(x, w, k, v):
  """A strided NHWC conv, a dot in a scan of 3 steps, and a batched dot (attention-like)."""
  y = lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # (2, 4, 4, 5)

  def body(c, _):
    return jnp.tanh(c @ w), None
  h, _ = lax.scan(body, y.reshape(-1, 5), None, length=3)                                       # (32, 5)
  return jnp.einsum('bqd,bkd->bqk', v, v).sum() + h.sum()


ARGS = (jnp.ones((2, 8, 8, 3)), jnp.ones((5, 5)), jnp.ones((3, 3, 3, 5)), jnp.ones((4, 6, 7)))


def test_matmul_ops_shapes_counts_and_gemm_dims():
  ops = kernels.matmul_ops(jax.jit(_program), *ARGS)
  assert [(op.name, op.count) for op in ops] == [('conv_general_dilated', 1), ('dot_general', 3),
                                                 ('dot_general', 1)]
  conv, dot, bdot = ops
  # The conv's im2col GEMM: M = 2 * 4 * 4 output positions, K = 3 * 3 * 3 taps x features, N = 5.
  assert conv.out_shape == (2, 4, 4, 5) and conv.gemm() == (1, 32, 27, 5)
  assert dot.gemm() == (1, 32, 5, 5)
  assert bdot.gemm() == (4, 6, 7, 6)
  assert conv.flops() == 2 * 32 * 27 * 5 and dot.flops() == 3 * 2 * 32 * 5 * 5
  assert kernels.summary(ops) == {'dots': 4, 'convs': 1,
                                  'gflop': round((conv.flops() + dot.flops() + bdot.flops()) / 1e9, 4)}


def test_matmul_ops_of_a_gradient_hold_both_backward_convs():
  """The kernel gradient and the input gradient of a conv are convs of the same flops as the forward."""
  f = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()
  ops = kernels.matmul_ops(jax.grad(f, argnums=(0, 1)), ARGS[0], ARGS[2])
  assert [op.name for op in ops] == ['conv_general_dilated'] * 3
  assert len({op.flops() for op in ops}) == 1


def test_bare_programs_replay_each_op_and_compute_exact_int8_gemms():
  ops = kernels.matmul_ops(jax.jit(_program), *ARGS)
  progs = kernels.bare_programs(ops, seed=3)
  f, (operands,) = progs['float']
  outs = f(operands)
  assert len(outs) == 5 and len(operands) == 5  # the scan's dot three times, each on its own operands
  (x, k), (a, w) = operands[0], operands[1]
  want = lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(outs[1]), np.asarray(a @ w))
  assert not np.array_equal(np.asarray(operands[1][0]), np.asarray(operands[2][0]))
  g, (ints,) = progs['int8']
  res = g(ints)
  shapes = [op.gemm() for op in ops for _ in range(op.count)]
  for (lhs, rhs), y, (b, m, k, n) in zip(ints, res, shapes, strict=True):
    assert lhs.dtype == rhs.dtype == jnp.int8 and y.dtype == jnp.int32
    assert y.shape == ((b, m, n) if b > 1 else (m, n)) and lhs.shape[-1] == k
    ref = np.matmul(np.asarray(lhs, np.int64), np.asarray(rhs, np.int64))
    np.testing.assert_array_equal(np.asarray(y, np.int64), ref)
    assert int(np.abs(np.asarray(lhs, np.int32)).max()) == 127  # the full int8 range is drawn


def _group(ratios, roles):
  return {'name': 'g', 'baseline': 'float', 'meta': {'bare': {'dots': 1, 'convs': 0}},
          'results': {n: {'ratio': r, 'role': roles[n]} for n, r in ratios.items()}}


def test_annotate_bound_and_kept_by_hand():
  roles = {'float': 'baseline', 'q': 'quantized', 'c': 'contrast', kernels.FLOAT: 'reference',
           kernels.INT8: 'reference'}
  g = _group({'float': 1.0, 'q': 0.6, 'c': 2.0, kernels.FLOAT: 0.8, kernels.INT8: 0.2}, roles)
  kernels.annotate(g)
  bare = g['meta']['bare']
  # share 0.8, kernel 0.2 / 0.8 = 0.25, bound 1 - 0.8 + 0.2 = 0.4; q saves 0.4 of the 0.6 the bound allows.
  assert bare['share'] == pytest.approx(0.8) and bare['kernel'] == pytest.approx(0.25)
  assert bare['bound'] == pytest.approx(0.4)
  assert bare['kept'] == {'q': pytest.approx(0.4 / 0.6)}
  no_bare = _group({'float': 1.0, 'q': 0.6}, {'float': 'baseline', 'q': 'quantized'})
  kernels.annotate(no_bare)
  assert 'bound' not in no_bare['meta']['bare']
