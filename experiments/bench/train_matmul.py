"""The train_matmul suite: forward + both backward matmuls (jax.vjp) with int8 in all three, the row-major drhs
form and the naive one (drhs_row_major=False), against the f32 forward + backward.

    python -m experiments.bench --config=configs/bench_train.py [--workdir=runs/bench/train]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax import lax

from experiments.bench import harness as bench
from experiments.bench.groups import DN, Group, GroupedSuite, Target, Variant, matmul_operands, maybe_inspect
from qjax.ops import config as qconfig
from qjax.ops import dot_general as qdot_general


def _fwd_bwd(dot):
  """jitted (x, w, g) -> (y, dx, dw): the forward and both backward matmuls of y = dot(x, w) (jax.vjp)."""

  def f(x, w, g):
    y, vjp = jax.vjp(dot, x, w)
    dx, dw = vjp(g)
    return y, dx, dw
  return jax.jit(f)


def _scopes_fast(insp: dict[str, Any]) -> dict[str, str]:
  """{'fwd': 'int8 fast', 'dlhs': 'int8 SLOW', 'drhs': 'f32'}: how each named matmul (qjax scopes) runs."""
  out = {}
  for op in insp.get('ops', []):
    if not op['scope']:
      continue
    if 's8' not in op['signature']:
      out[op['scope']] = op['signature'].split(' ')[0]
    elif op['fast'] and not op['widened']:
      out[op['scope']] = 'int8 fast'
    else:
      out[op['scope']] = 'int8 SLOW'
  return {k: out[k] for k in ('fwd', 'dlhs', 'drhs') if k in out}



@bench.register('train_matmul')
def train_matmul_suite(config) -> GroupedSuite:
  """Training-style matmul (forward + dlhs + drhs via jax.vjp) of (B x K) . (K x N) against f32:
    int8 x3            int8_dynamic(): int8 in all three matmuls, drhs as row-major lhs^T . g (fast kernel)
    int8 x3, naive drhs    the same with drhs_row_major=False (XLA up-casts the transposed int8 operand)
    int8 fwd, f32 bwd  int8_dynamic(bwd_bits=None): only the forward in int8"""


  b, k, n = (int(v) for v in config.train_shape)
  full = qconfig.int8_dynamic()
  cfgs = {
      'int8 x3': ('quantized', full),
      'int8 x3, naive drhs': ('contrast', dataclasses.replace(full, drhs_row_major=False)),
      'int8 fwd, f32 bwd': ('quantized', qconfig.int8_dynamic(bwd_bits=None)),
  }

  def groups():
    x, w = matmul_operands(b, k, n, config.get('seed', 0))
    g = jax.random.normal(jax.random.key(7), (b, n))
    f32 = _fwd_bwd(lambda x, w: lax.dot_general(x, w, DN))
    variants = {'f32': Variant(lambda: f32(x, w, g), 'baseline', {'inspect': maybe_inspect(config, f32, x, w, g)})}
    for name, (role, c) in cfgs.items():
      f = _fwd_bwd(lambda x, w, c=c: qdot_general(x, w, DN, config=c))
      insp = maybe_inspect(config, f, x, w, g)
      fast = _scopes_fast(insp)
      variants[name] = Variant(lambda f=f: f(x, w, g), role,
                               {'inspect': insp, 'matmuls_by_scope': fast, 'config': c.to_dict(),
                                'route': ', '.join(f'{s} {v}' for s, v in fast.items())})
    targets = (Target('int8 x3', 0.35, 'int8 fwd + both bwd matmuls <= 0.35x the f32 fwd+bwd time'),)
    yield Group(f'{b}x{k} . {k}x{n} fwd+bwd', variants, 'f32', {'shape': [b, k, n]}, targets)

  return GroupedSuite('train_matmul', groups, meta={'shape': [b, k, n]})
