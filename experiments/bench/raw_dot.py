"""The raw_dot suite: lax.dot_general in f32, bf16 -> f32, int8 -> int32 and fp8 -> f32 over square, MLP-like and
small-M shapes: what XLA's kernels give before any quantization work.

    python -m experiments.bench --config=configs/bench_raw_dot.py [--workdir=runs/bench/raw_dot]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from experiments.bench import harness as bench
from experiments.bench.groups import (
  DN,
  Group,
  GroupedSuite,
  Variant,
  matmul_operands,
  matmul_shapes,
  maybe_inspect,
  shape_name,
)


@bench.register('raw_dot')
def raw_dot_suite(config) -> GroupedSuite:
  """lax.dot_general at each shape in f32 (baseline), bf16 x bf16 -> f32, int8 x int8 -> int32 and
  fp8 (e4m3) x fp8 -> f32: the kernels XLA gives before qjax adds quantization."""

  dtypes = tuple(config.get('dtypes', ('bf16', 'int8', 'fp8')))

  def groups():
    for m, k, n in matmul_shapes(config):
      x, w = matmul_operands(m, k, n, config.get('seed', 0))
      cast = {
          'f32': (jnp.float32, jnp.float32),
          'bf16': (jnp.bfloat16, jnp.float32),
          'int8': (jnp.int8, jnp.int32),
          'fp8': (jnp.float8_e4m3fn, jnp.float32),
      }
      names = {'f32': 'f32', 'bf16': 'bf16 -> f32', 'int8': 'int8 -> int32', 'fp8': 'fp8 e4m3 -> f32'}
      variants = {}
      for d in ('f32',) + dtypes:
        in_t, out_t = cast[d]
        if d == 'int8':
          a = jnp.clip(jnp.round(x * 40), -127, 127).astype(jnp.int8)
          b = jnp.clip(jnp.round(w * 40 * k ** 0.5), -127, 127).astype(jnp.int8)
        else:
          a, b = x.astype(in_t), w.astype(in_t)
        f = jax.jit(lambda a, b, out_t=out_t: lax.dot_general(a, b, DN, preferred_element_type=out_t))
        info = {'inspect': maybe_inspect(config, f, a, b)}
        variants[names[d]] = Variant(lambda f=f, a=a, b=b: f(a, b), 'baseline' if d == 'f32' else 'reference', info)
      yield Group(shape_name(m, k, n), variants, 'f32',
                  {'shape': [m, k, n], 'gflop': 2 * m * k * n / 1e9})

  return GroupedSuite('raw_dot', groups, meta={'dimension_numbers': 'contract lhs dim 1 with rhs dim 0'})
