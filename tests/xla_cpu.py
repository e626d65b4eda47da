"""What the installed XLA:CPU does with the int8 forms that qjax routes around, by jaxlib version. The tests that
document XLA's own behaviour (not qjax's) assert the installed version's answer; qjax's routes must be fast on both.

jaxlib 0.12.0.x up-casts an int8 dot that contracts dim 0 of both operands (x^T . g as written, the naive weight
gradient) to s32 x s32 off YNNPACK, and runs a one-row int8 dot off YNNPACK too; jaxlib 0.12.1 runs both on
YNNPACK. Its LLVM at -O0 also gives a Linen init the default level's bits, where 0.12.0.x's differed by an ulp, and
it no longer compiles x / s to the bits of x * (1 / s).
"""

import jaxlib

JAXLIB = tuple(int(p) for p in jaxlib.__version__.split('.')[:3])
TRANSPOSED_INT8_DOT_FAST = JAXLIB >= (0, 12, 1)
ONE_ROW_INT8_DOT_FAST = JAXLIB >= (0, 12, 1)
LLVM_O0_CHANGES_INIT_BITS = JAXLIB < (0, 12, 1)
DIVISION_AS_RECIPROCAL_BITS = JAXLIB < (0, 12, 1)
