"""experiments/bench/kernels.py: the matmuls of a program, replayed alone as written and as int8 GEMMs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments.bench import kernels, markdown


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
  """Each program returns the sum of one element of every op's output (the chain that keeps them in order): the
  float one the first element of each replayed op, the int8 one of each exact integer GEMM."""
  ops = kernels.matmul_ops(jax.jit(_program), *ARGS)
  progs = kernels.bare_programs(ops, seed=3)
  f, (operands,) = progs['float']
  assert len(operands) == 5  # the scan's dot three times
  (x, k), dots = operands[0], operands[1:4]
  first_conv = lax.conv_general_dilated(x, k, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[0, 0, 0, 0]
  v, u = operands[4]
  first_bdot = lax.dot_general(v, u, (((2,), (2,)), ((0,), (0,))))[0, 0, 0]
  want = first_conv + sum((a @ w)[0, 0] for a, w in dots) + first_bdot
  np.testing.assert_allclose(float(f(operands)), float(want), rtol=1e-5)
  # The scan's three dots share their lhs (same shape) and each has its own rhs, so XLA cannot merge them.
  assert dots[0][0] is dots[1][0] is dots[2][0]
  assert not np.array_equal(np.asarray(dots[0][1]), np.asarray(dots[1][1]))
  g, (ints,) = progs['int8']
  shapes = [op.gemm() for op in ops for _ in range(op.count)]
  total = 0
  for (lhs, rhs), (b, m, k, n) in zip(ints, shapes, strict=True):
    assert lhs.dtype == rhs.dtype == jnp.int8
    assert lhs.shape == ((b, m, k) if b > 1 else (m, k)) and rhs.shape == ((b, k, n) if b > 1 else (k, n))
    total += int(np.matmul(np.asarray(lhs, np.int64), np.asarray(rhs, np.int64)).reshape(-1)[0])
  assert float(g(ints)) == total  # integer sums below 2**24: exact in f32
  drawn = np.concatenate([np.asarray(a, np.int32).ravel() for xs in ints for a in xs])
  assert (drawn.min(), drawn.max()) == (-127, 127)  # the symmetric int8 grid, both edges drawn
  # The weight stored (N, K): the same GEMMs as x . w^T -> (M, N) and as w . x^T -> (N, M), on one set of operands.
  nt, (nt_ints,) = progs['int8_nt']
  tn, (tn_ints,) = progs['int8_tn']
  assert tn_ints is nt_ints
  want = {'nt': 0, 'tn': 0}
  for (x, w), (b, m, k, n) in zip(nt_ints, shapes, strict=True):
    assert x.dtype == w.dtype == jnp.int8
    assert x.shape == ((b, m, k) if b > 1 else (m, k)) and w.shape == ((b, n, k) if b > 1 else (n, k))
    x64, w64 = np.asarray(x, np.int64), np.asarray(w, np.int64)
    want['nt'] += int(np.matmul(x64, np.swapaxes(w64, -1, -2)).reshape(-1)[0])
    want['tn'] += int(np.matmul(w64, np.swapaxes(x64, -1, -2)).reshape(-1)[0])
  assert (float(nt(nt_ints)), float(tn(tn_ints))) == (want['nt'], want['tn'])


def test_bare_program_keeps_every_op():
  """Each op of the chain is in the compiled program: none is dead code, none merged with another."""
  ops = kernels.matmul_ops(jax.jit(_program), *ARGS)
  for name in ('float', 'int8', 'int8_nt', 'int8_tn'):
    f, args = kernels.bare_programs(ops)[name]
    hlo = f.lower(*args).compile().as_text()
    assert hlo.count('convolution(') + hlo.count('dot(') == 5, name


def _group(name, medians, roles, baseline, meta=None):
  return {'name': name, 'baseline': baseline, 'meta': meta or {},
          'results': {n: {'median_s': t, 'ratio': t / medians[baseline], 'role': roles[n]} for n, t in medians.items()}}


BARE_ROLES = {kernels.FLOAT: 'baseline', kernels.INT8: 'reference'}


def test_annotate_bound_and_kept_by_hand():
  main = _group('g', {'float': 2.0, 'q': 1.2, 'c': 4.0, 'qat': 1.8, 'uninspected': 1.0},
                {'float': 'baseline', 'q': 'quantized', 'c': 'contrast', 'qat': 'quantized',
                 'uninspected': 'quantized'}, 'float')  # no inspection: not shown to be all int8, no bound
  main['results']['qat']['info'] = {'inspect': {'matmuls': 3, 'int8': 1}}  # a float backward: no bound for it
  main['results']['q']['info'] = {'inspect': {'matmuls': 3, 'int8': 3}}
  bare = _group('g bare', {kernels.FLOAT: 1.6, kernels.INT8: 0.4}, BARE_ROLES, kernels.FLOAT,
                {'bare': {'of': 'g', 'dots': 1, 'convs': 0}})
  kernels.annotate([main, bare])
  b = bare['meta']['bare']
  # share 1.6 / 2 = 0.8, kernel 0.4 / 1.6 = 0.25, bound 1 - 0.8 + 0.8 * 0.25 = 0.4; q (0.6) saves 0.4 of the 0.6
  # the bound allows.
  assert b['share'] == pytest.approx(0.8) and b['kernel'] == pytest.approx(0.25)
  assert b['bound'] == pytest.approx(0.4)
  assert b['quantized'] == {'q': pytest.approx(0.6)} and b['kept'] == {'q': pytest.approx(0.4 / 0.6)}
  assert main['meta'] == {}
  slower = _group('h bare', {kernels.FLOAT: 1.0, kernels.INT8: 1.2}, BARE_ROLES, kernels.FLOAT, {'bare': {'of': 'g'}})
  kernels.annotate([main, slower])  # int8 GEMMs slower than float: a bound of 1.1 leaves no saving to keep
  assert slower['meta']['bare']['bound'] == pytest.approx(1.1)
  assert np.isnan(slower['meta']['bare']['kept']['q'])
  slower['meta']['bare'].update(dots=1, convs=0)
  table = markdown.bare_markdown([main, slower])  # says why there is no share, not 'nan%'
  assert 'q 0.60x (bound >= 1x, no saving to keep)' in table and 'nan' not in table, table
  # The matmuls replayed alone took longer than the whole float program (share 2.4 / 2 = 120%): the bound
  # (1 - 1.2 + 1.2 * 0.25 = 0.1) and the share of its saving (0.4 / 0.9 = 44%) say nothing, and the table says so.
  over = _group('g bare', {kernels.FLOAT: 2.4, kernels.INT8: 0.6}, BARE_ROLES, kernels.FLOAT,
                {'bare': {'of': 'g', 'dots': 1, 'convs': 0}})
  kernels.annotate([main, over])
  assert over['meta']['bare']['bound'] == pytest.approx(0.1)
  assert over['meta']['bare']['kept']['q'] == pytest.approx(0.4 / 0.9)  # kept in the JSON as computed
  row = [line for line in markdown.bare_markdown([main, over]).splitlines() if line.startswith('| g |')]
  assert len(row) == 1 and '| 120% |' in row[0], row
  assert '0.10x (says nothing: share over 100%)' in row[0] and 'q 0.60x (matmul share over 100%: no bound)' in row[0]
  assert '44%' not in row[0]
  assert '(says nothing' not in markdown.bare_markdown([main, bare])  # a share of 80% is a bound
  # Rounding does not hide which side of 100% a share is on.
  assert [markdown.fmt_share(s) for s in (1.0038, 0.9975, 1.0, 1.2, 0.8)] == ['100.4%', '99.8%', '100%', '120%', '80%']
  orphan = _group('o bare', {kernels.FLOAT: 1.0, kernels.INT8: 0.2}, BARE_ROLES, kernels.FLOAT, {'bare': {'of': 'x'}})
  kernels.annotate([orphan])  # the group it measures is not in the run: nothing to relate it to
  assert 'bound' not in orphan['meta']['bare']


def test_a_single_row_gets_a_second_zero_row_in_the_int8_gemms():
  """A matrix-vector product runs on XLA:CPU's slow fallback (with jaxlib 0.12.1 only where the vector is the
  rhs); qjax pads it to two rows, and so does the bare kernel, on either side, so a decode program's bound is an
  int8 GEMM qjax can run (on other backends min_free() is 0)."""
  x, w = jnp.ones((1, 24)), jnp.ones((24, 1))
  ops = kernels.matmul_ops(lambda x, w: x @ w, x, w)
  progs = kernels.bare_programs(ops)
  least = max(kernels.min_free(), kernels.min_free('rhs'))
  assert progs['float'][1][0][0][0].shape == (1, 24)  # the float replay as the program states it
  assert [a.shape for a in progs['int8'][1][0][0]] == [(max(1, least), 24), (24, max(1, least))]
  assert [a.shape for a in progs['int8_nt'][1][0][0]] == [(max(1, least), 24), (max(1, least), 24)]
