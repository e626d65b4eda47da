"""What the host CPU offers XLA:CPU's int8 kernels: the int8 dot-product instructions, read once from the kernel.

XLA:CPU's int8 GEMM (YNNPACK) multiplies s8 x s8 with VNNI (`vpdpbusd`) or AMX where the CPU has them, and
widens to int16 (`vpmaddwd`) on AVX2 alone, where it runs at 1.2-1.55x f32 instead of 3.4-4.1x
(docs/benchmarks.md). Some operand layouts win on one and lose on the other (qjax.ops.dot_general's few-row
products), so the ops ask here which one they run on.
"""

from __future__ import annotations

import functools

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


def int8_dot_product() -> bool | None:
  """True on an x86 CPU with VNNI or AMX-INT8, False on one without them (AVX2 alone), None where unknown."""
  f = flags()
  return None if f is None else bool(f & INT8_DOT_FLAGS)
