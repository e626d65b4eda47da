"""Integer convolutions as one int8 matmul over patches (im2col), for the shapes XLA:CPU's int8 conv runs slowly.

XLA:CPU runs an s8 x s8 -> s32 convolution on its fast kernel (YNNPACK) only with more than 16 input or output
features; below that it up-casts to s32 and runs 4-27x slower than the f32 conv (qjax.ops.conv). Its int8 matmul
has no such limit, so a conv can be rewritten as

    patches[n, oh, ow, (i, j, c)] = x_pad[n, oh * s + i * d, ow * s + j * d, c]     (k_h * k_w shifted slices)
    y[n, oh, ow, o]              = sum_(i, j, c) patches[n, oh, ow, (i, j, c)] * w[i, j, c, o]

one s8 x s8 -> s32 matmul with K = k_h * k_w * C_in. `x_pad` is x with the conv's padding (negative padding
crops) and its lhs dilation as interior zeros, so the same code computes the forward conv and the input-gradient
conv of a strided one. The kernel gradient reuses the forward's patches: dw[(i, j, c), o] = patches^T . g, with
patches^T materialised row-major so that XLA:CPU keeps that matmul on its fast kernel too (as in
qjax.ops.dot_general's drhs). Integer sums are exact, so each path equals XLA's conv bit for bit.

`lax.conv_general_dilated_patches` is not used: on int8 it lowers to a conv with a one-hot kernel, which takes
XLA:CPU's slow int8 conv path itself (40-225x slower than f32, measured).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint


def _dilate(n: int, d: int) -> int:
  return 0 if n == 0 else 1 + d * (n - 1)


def supported(cp, lhs_shape) -> bool:
  """Whether the patch formulation covers this conv: two spatial dims, no feature or batch groups."""
  return len(lhs_shape) == 4 and cp.feature_group_count == 1 and cp.batch_group_count == 1


def to_nhwc(x, spec):
  """An operand from its dim order `spec` (batch/out-feature first, feature second, spatial after) to
  (spec[0], spatial..., spec[1]): NHWC for inputs and outputs, HWIO-like (O, H, W, I) order for kernels."""
  return jnp.transpose(x, (spec[0], *spec[2:], spec[1]))


def patches(x, cp, k_sp) -> jax.Array:
  """(N, OH, OW, k_h * k_w * C) patches of an NHWC array for a conv with params cp and kernel spatial size k_sp,
  in (i, j, c) order along the last dim."""
  # The barrier materialises x once: without it XLA fuses x's producer (the quantization of a float activation)
  # into each of the k*k slices and recomputes it k*k times.
  x = lax.optimization_barrier(x)
  zero = jnp.zeros((), x.dtype)
  spatial = [(lo, hi, ld - 1) for (lo, hi), ld in zip(cp.padding, cp.lhs_dilation, strict=True)]
  pads = [(0, 0, 0), *spatial, (0, 0, 0)]
  xp = lax.pad(x, zero, pads)  # (N, H', W', C)
  out_sp = [(p - _dilate(k, rd)) // s + 1 for p, k, rd, s in
            zip(xp.shape[1:3], k_sp, cp.rhs_dilation, cp.window_strides, strict=True)]
  cols = []
  for i in range(k_sp[0]):
    for j in range(k_sp[1]):
      start = (0, i * cp.rhs_dilation[0], j * cp.rhs_dilation[1], 0)
      limit = (xp.shape[0], start[1] + (out_sp[0] - 1) * cp.window_strides[0] + 1,
               start[2] + (out_sp[1] - 1) * cp.window_strides[1] + 1, xp.shape[3])
      cols.append(lax.slice(xp, start, limit, (1, *cp.window_strides, 1)))
  return jnp.concatenate(cols, axis=-1)


def conv(a, b, cp, acc_t=jnp.int32) -> jax.Array:
  """cp.conv(a, b, acc_t) (a conv of integer operands in cp's layout) as patches . kernel, one int8 matmul."""
  lhs_spec, rhs_spec, out_spec = cp.dnums
  x = to_nhwc(a, lhs_spec)                                     # (N, H, W, C)
  w = jnp.transpose(b, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))  # (KH, KW, C, O)
  k_sp = w.shape[:2]
  p = patches(x, cp, k_sp)                                     # (N, OH, OW, KH*KW*C)
  wm = w.reshape(-1, w.shape[-1])                              # (KH*KW*C, O)
  y = lax.dot_general(p, wm, (((3,), (0,)), ((), ())), preferred_element_type=acc_t)  # (N, OH, OW, O)
  inv = [0] * 4
  for pos, d in enumerate((out_spec[0], *out_spec[2:], out_spec[1])):
    inv[d] = pos
  return jnp.transpose(y, inv)


def kernel_grad(a, g, cp, k_sp, acc_t=jnp.int32) -> jax.Array:
  """The kernel gradient of the conv cp(a, w) for the output gradient g, as patches(a)^T . g, returned in the
  (KH, KW, C, O) order (the caller moves it to the kernel's layout)."""
  lhs_spec, _, out_spec = cp.dnums
  x = to_nhwc(a, lhs_spec)
  gm = to_nhwc(g, out_spec)                                     # (N, OH, OW, O)
  p = patches(x, cp, k_sp)                                      # (N, OH, OW, KH*KW*C)
  p2 = p.reshape(-1, p.shape[-1])                               # (M, K)
  g2 = gm.reshape(-1, gm.shape[-1])                             # (M, O)
  # (K, M) materialised row-major: XLA:CPU otherwise folds the transpose into the dot as a column-major operand
  # and up-casts it to s32 off the fast kernel.
  pt = with_layout_constraint(jnp.transpose(lax.optimization_barrier(p2)), Layout(major_to_minor=(0, 1)))
  dw = lax.dot_general(pt, g2, (((1,), (0,)), ((), ())), preferred_element_type=acc_t)  # (K, O)
  return dw.reshape(*k_sp, x.shape[-1], g2.shape[-1])
