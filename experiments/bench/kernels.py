"""A program's matmuls alone: the bare-kernel reference of an end-to-end benchmark group.

Every `dot_general` and `conv_general_dilated` of a float program (its jaxpr, sub-jaxprs included; a scan's body
counted `length` times) is replayed on random operands of the same shapes in two programs:
  'float'   each op exactly as the float program states it (f32, its dimension numbers, strides, padding);
  'int8'    each op's arithmetic as one int8 x int8 -> int32 GEMM, (B, M, K) . (B, K, N), operands laid out
            row-major for the fast kernel. A conv's GEMM is its im2col product with
                M = out size / out features,   K = kernel size / out features,   N = out features
            (2 M K N = the conv's flops), without building any patches.
Timed beside the float program and its quantized version, the two give, with t_ratio(v) = time(v) / time(float
program):
    matmul share       s = t_ratio('float')                 the part of the float program int8 could speed up
    bare int8 kernel   r = t_ratio('int8') / s              what the hardware's int8 GEMM gives on these shapes
    bound              1 - s + t_ratio('int8')              the quantized program's time ratio if everything else
                                                            (norms, softmax, elementwise, quantization) cost
                                                            what it costs in float and the matmuls ran at r
The bound is Amdahl's law with the kernel measured on the model's own shapes: a target below it needs the rest of
the program to run faster than in float, which quantizing the matmuls does not give.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax import lax

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


def _float_operands(op: MatmulOp, key) -> list[jax.Array]:
  keys = jax.random.split(key, len(op.in_avals))
  return [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, op.in_avals, strict=True)]


def _int8_operands(op: MatmulOp, key) -> list[jax.Array]:
  b, m, k, n = op.gemm()
  kl, kr = jax.random.split(key)
  shapes = ((b, m, k), (b, k, n)) if b > 1 else ((m, k), (k, n))
  return [jax.random.randint(kk, s, -127, 128, jnp.int8) for kk, s in zip((kl, kr), shapes, strict=True)]


def _replay(op: MatmulOp, lhs, rhs):
  return op.primitive.bind(lhs, rhs, **op.params)


def _int8_gemm(lhs, rhs):
  batch = ((0,), (0,)) if lhs.ndim == 3 else ((), ())
  return lax.dot_general(lhs, rhs, (((lhs.ndim - 1,), (lhs.ndim - 2,)), batch), preferred_element_type=jnp.int32)


def bare_programs(ops: list[MatmulOp], seed: int = 0) -> dict[str, tuple[Any, tuple]]:
  """{'float': (jitted fn, args), 'int8': (jitted fn, args)}: every op `count` times, each time on its own operands
  (so XLA cannot merge two ops of the same shape), all outputs returned (so none is dead code)."""
  ops = [op for op in ops for _ in range(op.count)]  # a scan's op once per iteration, each with its own operands
  keys = jax.random.split(jax.random.key(seed), max(1, len(ops)))
  float_args = tuple(_float_operands(op, k) for op, k in zip(ops, keys, strict=False))
  int8_args = tuple(_int8_operands(op, k) for op, k in zip(ops, keys, strict=False))

  def float_fn(operands):
    return [_replay(op, *xs) for op, xs in zip(ops, operands, strict=True)]

  def int8_fn(operands):
    return [_int8_gemm(*xs) for xs in operands]

  return {'float': (jax.jit(float_fn), (float_args,)), 'int8': (jax.jit(int8_fn), (int8_args,))}


def summary(ops: list[MatmulOp]) -> dict[str, Any]:
  """What the bare programs hold: op counts by primitive and their GFLOP."""
  n = {p: sum(op.count for op in ops if op.name == p) for p in MATMUL_PRIMITIVES}
  return {'dots': n['dot_general'], 'convs': n['conv_general_dilated'],
          'gflop': round(sum(op.flops() for op in ops) / 1e9, 4)}


FLOAT = 'float matmuls alone'
INT8 = 'int8 GEMMs alone'


def annotate(group: dict[str, Any]) -> None:
  """Adds the matmul share, bare kernel ratio and bound (module docstring) to a timed group's meta['bare'] (set by
  the suite with the op counts) when both bare variants ran, and per quantized variant `kept`: the share of the
  time saving the bound allows that the variant achieves, (1 - ratio) / (1 - bound)."""
  bare, res = group['meta'].get('bare'), group['results']
  if not bare or FLOAT not in res or INT8 not in res:
    return
  s, i = res[FLOAT]['ratio'], res[INT8]['ratio']
  b = 1.0 - s + i
  bare.update(share=s, kernel=i / s if s > 0 else float('nan'), bound=b)
  bare['kept'] = {n: (1.0 - r['ratio']) / (1.0 - b) if b < 1.0 else float('nan')
                  for n, r in res.items() if r['role'] == 'quantized'}
