"""What the host CPU and the installed XLA:CPU offer int8 matmuls: the CPU's int8 dot-product instructions (read
once from the kernel), and whether XLA's fast int8 kernel takes a single row (found once by compiling one).

XLA:CPU's int8 GEMM (YNNPACK) multiplies s8 x s8 with VNNI (`vpdpbusd`) or AMX where the CPU has them, and
widens to int16 (`vpmaddwd`) on AVX2 alone, where it runs at 1.2-1.55x f32 instead of 3.4-4.1x
(docs/benchmarks.md). Some operand layouts win on one and lose on the other (qjax.ops.dot_general's few-row
products), so the ops ask here which one they run on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# x86 flags (as /proc/cpuinfo spells them) of the int8 dot-product instructions XLA:CPU's fast int8 GEMM uses.
INT8_DOT_FLAGS = frozenset({'avx512_vnni', 'avx_vnni', 'amx_int8'})


@functools.cache
def flags() -> frozenset[str] | None:
  """The first processor's x86 feature flags from /proc/cpuinfo; None where there is no such line (another OS,
  or an ARM CPU, whose line is 'Features')."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'flags':
          return frozenset(value.split())
  except OSError:
    pass
  return None


@functools.cache
def one_row_int8_dot_fast() -> bool:
  """Whether XLA:CPU runs an s8 x s8 -> s32 dot of a single row on its fast kernel (YNNPACK), with the weight
  (K, N) or stored (N, K). jaxlib 0.12.0.x does not: it runs it as a generic loop several times slower than f32,
  so qjax pads the row to two (qjax.ops.dot_general.min_free). jaxlib 0.12.1 does. Found by compiling both
  products at (1, 64) x 64 for the default backend (call it on CPU) and looking for the kernel in the compiled
  HLO, once per process."""
  x, w = jax.ShapeDtypeStruct((1, 64), jnp.int8), jax.ShapeDtypeStruct((64, 64), jnp.int8)
  for contract in ((1,), (0,)), ((1,), (1,)):   # x . w, x . w^T
    dot = lambda a, b, c=contract: lax.dot_general(a, b, (c, ((), ())), preferred_element_type=jnp.int32)
    text = jax.jit(dot).lower(x, w).compile().as_text()
    if '__ynn_fusion' not in text:
      return False
  return True


def int8_dot_product() -> bool | None:
  """True on an x86 CPU with VNNI or AMX-INT8, False on one without them (AVX2 alone), None where unknown."""
  f = flags()
  return None if f is None else bool(f & INT8_DOT_FLAGS)
