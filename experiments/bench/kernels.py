"""A program's matmuls alone: the bare-kernel reference of an end-to-end benchmark group.

Every `dot_general` and `conv_general_dilated` of a float program (its jaxpr, sub-jaxprs included; a scan's body
counted `length` times; every branch of a cond counted, though one runs) is replayed on random operands of the same
shapes in these programs:
  'float'   each op exactly as the float program states it (f32, its dimension numbers, strides, padding);
  'int8'    each op's arithmetic as one int8 x int8 -> int32 GEMM, (B, M, K) . (B, K, N), operands laid out
            row-major for the fast kernel. A conv's GEMM is its im2col product with
                M = out size / out features,   K = kernel size / out features,   N = out features
            (2 M K N = the conv's flops), without building any patches. A single row (or column) gets a
            second, zero one where qjax's int8 dots get one (qjax.ops.dot_general.min_free: on CPU with
            jaxlib 0.12.0.x, whose fast kernel refuses a single row).
  'int8_nt', 'int8_tn'   the same GEMMs with the weight stored (N, K), the way qjax serves a Dense kernel:
            x . w^T -> (M, N) and w . x^T -> (N, M). Which of the three layouts is fastest depends on the CPU and
            on M: with few rows an AVX2 CPU runs x . w^T fastest and a VNNI CPU w . x^T (qjax.ops.dot_general
            chooses by the same measurements), so the bare kernel is the fastest of the three.
Ops whose lhs has the same shape share one lhs array (in the model an op's input is usually the output of the one
before, so in cache when it is small) and each has its own rhs (XLA would merge two identical ops into one).
They are timed side by side in a group of their own, after the group of the float program and its quantized
versions: interleaved with those, they slowed the float program 1.8x; and a float training step timed again beside
them ran at 1.1 s where its own group measured 0.65 s (the ResNet's). With T = the float program's median time in
its group:
    matmul share       s = time('float') / T                the part of the float program int8 could speed up
    bare int8 kernel   r = min(time('int8*')) / time('float')   what the hardware's int8 GEMM gives on these shapes
    bound              1 - s + s * r                        the quantized program's time ratio if everything else
                                                            (norms, softmax, elementwise, quantization) cost
                                                            what it costs in float and the matmuls ran at r
The bound is Amdahl's law with the kernel measured on the model's own shapes: a target below it needs the rest of
the program to run faster than in float, which quantizing the matmuls does not give. At small batches the replay
can take longer than the float program itself (its operands are not in cache the way a model's activations are):
the share is then over 100% and the bound says nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

from qjax.ops.dot_general import min_free

MATMUL_PRIMITIVES = ('dot_general', 'conv_general_dilated')


@dataclasses.dataclass(frozen=True)
class MatmulOp:
  """One matmul or conv of a program: its primitive, params and operand types, and how often the program runs it."""
  primitive: Any
  params: dict[str, Any]
  in_avals: tuple[Any, ...]
  out_shape: tuple[int, ...]
  count: int = 1

  @property
  def name(self) -> str:
    return self.primitive.name

  def gemm(self) -> tuple[int, int, int, int]:
    """(B, M, K, N) of the op's arithmetic as a batched GEMM."""
    lhs, rhs = (tuple(a.shape) for a in self.in_avals)
    if self.name == 'dot_general':
      (lc, _), (lb, _) = self.params['dimension_numbers']
      b = math.prod(lhs[d] for d in lb)
      k = math.prod(lhs[d] for d in lc)
      return b, math.prod(lhs) // (b * k), k, math.prod(rhs) // (b * k)
    n = self.out_shape[self.params['dimension_numbers'].out_spec[1]]
    return 1, math.prod(self.out_shape) // n, math.prod(rhs) // n, n

  def flops(self) -> int:
    b, m, k, n = self.gemm()
    return 2 * b * m * k * n * self.count


def _walk(jaxpr, count: int, out: list[MatmulOp]) -> None:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in MATMUL_PRIMITIVES:
      out.append(MatmulOp(eqn.primitive, dict(eqn.params), tuple(v.aval for v in eqn.invars),
                          tuple(eqn.outvars[0].aval.shape), count))
    inner = count * int(eqn.params.get('length', 1)) if eqn.primitive.name == 'scan' else count
    for sub in jex.jaxprs_in_params(eqn.params):
      _walk(sub, inner, out)


def matmul_ops(fn, *args) -> list[MatmulOp]:
  """The dot_general and conv_general_dilated ops of fn(*args) in program order (one entry per op in the jaxpr;
  `count` > 1 inside scans). While loops count their body once (the trip count is not static)."""
  closed = jax.make_jaxpr(fn)(*args)
  out: list[MatmulOp] = []
  _walk(closed.jaxpr, 1, out)
  return out


def _operands(ops: list[MatmulOp], seed: int, make_lhs, make_rhs) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """(lhs, rhs) per op: one lhs per distinct (shape, dtype) of make_lhs's spec, a rhs of its own per op."""
  keys = iter(jax.random.split(jax.random.key(seed), 2 * max(1, len(ops))))
  shared: dict[Any, jax.Array] = {}
  out = []
  for op in ops:
    ls, rs = make_lhs(op), make_rhs(op)
    if ls not in shared:
      shared[ls] = _draw(next(keys), *ls)
    out.append((shared[ls], _draw(next(keys), *rs)))
  return tuple(out)


def _draw(key, shape, dtype) -> jax.Array:
  if jnp.issubdtype(dtype, jnp.integer):
    return jax.random.randint(key, shape, -127, 128, dtype)  # the full int8 grid
  return jax.random.normal(key, shape, dtype)


def _int8_gemm_dims(op: MatmulOp) -> tuple[int, int, int, int]:
  """(B, M, K, N) of the op's int8 GEMM: M and N at least qjax's min_free() of either side (2 on CPU, where XLA's
  fast kernel refuses a matrix-vector product whose vector is the rhs, and with jaxlib 0.12.0.x the lhs too; qjax's
  int8 dots pad a single row the same way, and the layouts below put M on either side), so a one-row program's
  bound uses the int8 GEMM qjax can run, not the slow fallback."""
  b, m, k, n = op.gemm()
  least = max(min_free(), min_free('rhs'))
  return b, max(m, least), k, max(n, least)


def _gemm_shapes(op: MatmulOp) -> tuple[tuple[int, ...], tuple[int, ...]]:
  b, m, k, n = _int8_gemm_dims(op)
  return ((b, m, k), (b, k, n)) if b > 1 else ((m, k), (k, n))


def _nt_shapes(op: MatmulOp) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(x, w) shapes with the weight stored (N, K): (B, M, K), (B, N, K) (no B when it is 1)."""
  b, m, k, n = _int8_gemm_dims(op)
  return ((b, m, k), (b, n, k)) if b > 1 else ((m, k), (n, k))


def _int8_gemm(lhs, rhs):
  """(B, M, K) . (B, K, N) -> (B, M, N) int32."""
  batch = ((0,), (0,)) if lhs.ndim == 3 else ((), ())
  return lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (lhs.ndim - 2,)), batch), preferred_element_type=jnp.int32)


def _int8_gemm_nt(x, w):
  """x . w^T: (B, M, K) . (B, N, K) -> (B, M, N) int32."""
  batch = ((0,), (0,)) if x.ndim == 3 else ((), ())
  return lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 1,)), batch), preferred_element_type=jnp.int32)


def _int8_gemm_tn(x, w):
  """w . x^T: (B, N, K) . (B, M, K) -> (B, N, M) int32."""
  return _int8_gemm_nt(w, x)


def _chain(ops_fn, operands):
  """ops_fn(i, lhs, rhs) for every operand pair in order, each op after the previous one: its operands pass an
  optimization barrier together with one element of the previous op's output. Without the chain XLA:CPU may run
  independent ops concurrently, which a model's chain of layers does not (on one core the replay then took longer
  than the whole model). Only that element leaves the program, so each output buffer is free once the next op
  has started, as in a model (returning every output kept them all alive)."""
  last = jnp.zeros((), jnp.float32)
  for i, (lhs, rhs) in enumerate(operands):
    lhs, rhs, last = lax.optimization_barrier((lhs, rhs, last))
    y = lax.optimization_barrier(ops_fn(i, lhs, rhs))
    last = last + y.reshape(-1)[0].astype(jnp.float32)
  return last


def bare_programs(ops: list[MatmulOp], seed: int = 0) -> dict[str, tuple[Any, tuple]]:
  """{'float' | 'int8' | 'int8_nt' | 'int8_tn': (jitted fn, args)} (module docstring): every op `count` times (a
  scan's op once per iteration, with a rhs of its own each time), one after the other (`_chain`)."""
  ops = [op for op in ops for _ in range(op.count)]
  aval = lambda a: (tuple(a.shape), a.dtype)
  float_args = _operands(ops, seed, lambda op: aval(op.in_avals[0]), lambda op: aval(op.in_avals[1]))
  int8_args = _operands(ops, seed, lambda op: (_gemm_shapes(op)[0], jnp.int8),
                        lambda op: (_gemm_shapes(op)[1], jnp.int8))
  nt_args = _operands(ops, seed, lambda op: (_nt_shapes(op)[0], jnp.int8), lambda op: (_nt_shapes(op)[1], jnp.int8))

  def float_fn(operands):
    return _chain(lambda i, a, b: ops[i].primitive.bind(a, b, **ops[i].params), operands)

  def int8_fn(gemm):
    return jax.jit(lambda operands: _chain(lambda i, a, b: gemm(a, b), operands))

  return {'float': (jax.jit(float_fn), (float_args,)), 'int8': (int8_fn(_int8_gemm), (int8_args,)),
          'int8_nt': (int8_fn(_int8_gemm_nt), (nt_args,)), 'int8_tn': (int8_fn(_int8_gemm_tn), (nt_args,))}


def summary(ops: list[MatmulOp]) -> dict[str, Any]:
  """What the bare programs hold: op counts by primitive and their GFLOP."""
  n = {p: sum(op.count for op in ops if op.name == p) for p in MATMUL_PRIMITIVES}
  return {'dots': n['dot_general'], 'convs': n['conv_general_dilated'],
          'gflop': round(sum(op.flops() for op in ops) / 1e9, 4)}


FLOAT = 'float matmuls alone'
INT8 = 'int8 GEMMs alone'
INT8_NT = 'int8 GEMMs alone, x . w^T'
INT8_TN = 'int8 GEMMs alone, w . x^T'
# The bare group's variants: name -> bare_programs key.
BARE = {FLOAT: 'float', INT8: 'int8', INT8_NT: 'int8_nt', INT8_TN: 'int8_tn'}
# The int8 variants and the GEMM layout each times, as the report names it.
LAYOUT = {INT8: 'x . w', INT8_NT: 'x . w^T', INT8_TN: 'w . x^T'}
INT8_FORMS = tuple(LAYOUT)


def all_int8(result: dict[str, Any]) -> bool:
  """Whether a timed variant runs every matmul in int8, by its inspection; False when it was not inspected
  (config.inspect off): the bound is claimed only for a variant shown to be bounded by it."""
  insp = (result.get('info') or {}).get('inspect') or {}
  return 'matmuls' in insp and insp['int8'] == insp['matmuls']


def annotate(groups: list[dict[str, Any]]) -> None:
  """For every timed group whose meta['bare'] (set by the suite: op counts and 'of', the name of the group of the
  float program and its quantized versions) has both bare variants: adds the matmul share, the bare kernel's ratio
  and the bound (module docstring), and per quantized variant of the 'of' group that runs every matmul in int8
  (`all_int8`; the bound is not one for a QAT step whose backward stays float) its ratio and `kept`, the share of
  the time saving the bound allows that the variant achieves, (1 - ratio) / (1 - bound) (nan when the bound is 1
  or more). The bare kernel is the fastest of the int8 layouts timed (INT8_FORMS), named in 'kernel_form'."""
  by_name = {g['name']: g for g in groups}
  for g in groups:
    bare, res = g['meta'].get('bare'), g['results']
    of = by_name.get((bare or {}).get('of'))
    forms = [f for f in INT8_FORMS if f in res]
    if not bare or of is None or FLOAT not in res or not forms:
      continue
    form = min(forms, key=lambda f: res[f]['median_s'])
    s = res[FLOAT]['median_s'] / of['results'][of['baseline']]['median_s']
    r = res[form]['median_s'] / res[FLOAT]['median_s']
    b = 1.0 - s + s * r
    bare.update(share=s, kernel=r, bound=b, kernel_form=form)
    bare['quantized'] = {n: r['ratio'] for n, r in of['results'].items() if r['role'] == 'quantized' and all_int8(r)}
    bare['kept'] = {n: (1.0 - r) / (1.0 - b) if b < 1.0 else float('nan') for n, r in bare['quantized'].items()}
