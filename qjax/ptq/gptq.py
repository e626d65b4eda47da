"""GPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's rounding error back
into the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

For a dense kernel w of shape (in, out) (y = x . w) and calibration inputs x of shape (n, in), the loss of a
quantized kernel q is ||x . (w - q)||^2, whose Hessian over one output column is H = 2/n x^T x (in, in). GPTQ
processes the `in` rows of w (one input feature at a time; the paper's "columns" of its (out, in) layout):

    U = chol(H^-1)^T                          the upper Cholesky factor, H^-1 = U^T U (H damped first)
    for i in order:
        q_i  = Q(w_i)                         on the row's grid (per output channel, or its group's)
        e_i  = (w_i - q_i) / U_ii
        w_j -= U_ij e_i   for every j after i

in blocks of `block_size` rows: inside a block the updates are applied row by row, the block's errors reach the
later rows in one matmul at its end (the paper's lazy batch updates; the same arithmetic, reordered).
Options from the reference implementation: dampening (`damp` x mean diag H on the diagonal), activation order
(rows by decreasing H_ii), group-wise scales along `in` (a QuantSpec with granularity='per_group'), static groups
(group grids fitted on the original w; always so with act-order, so that each row keeps its group's grid).
A row whose input is always zero (H_ii = 0) is quantized to 0 (its value never reaches the output).

Invariant: the result is a QArray on the spec's grid, w_hat = dequantize(q), and ||x (w - w_hat)||^2 is what
GPTQ minimises greedily (never above round-to-nearest's in practice: tested, not guaranteed).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax import calibration, formats, quantizers
from qjax import granularity as gran
from qjax.ptq import layer as L
from qjax.ptq import registry
from qjax.spec import QuantSpec


class GPTQResult(NamedTuple):
  """q: the quantized kernel (QArray, w ~ (qvalue - zero_point) * scale); w_hat: dequantize(q);
  damp: the dampening factor that made H positive definite (a retry multiplies it by 10)."""
  q: quantizers.QArray
  w_hat: jax.Array
  damp: float


def hessian(x: jax.Array) -> jax.Array:
  """H = 2/n x^T x of calibration inputs x (..., in): the Hessian of ||x . dw||^2 / n per output column."""
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return 2.0 / x2.shape[0] * (x2.T @ x2)


def inverse_factor(h, damp: float = 0.01, retries: int = 3) -> tuple[np.ndarray, float]:
  """(U, damp): the upper Cholesky factor of (H + damp mean(diag H) I)^-1, in float64 on the host. A matrix
  that is not positive definite is retried with damp x 10 (0.01 after 0; `retries` times), then a ValueError
  says so."""
  h = np.asarray(h, np.float64)
  for _ in range(retries + 1):
    hd = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    try:
      return np.linalg.cholesky(np.linalg.inv(hd)).T, damp
    except np.linalg.LinAlgError:
      damp = damp * 10 if damp > 0 else 0.01
  raise ValueError(f'GPTQ: the Hessian is not positive definite even with damp={damp / 10:g}; use more or more '
                   'varied calibration data')


def _check(w, spec: QuantSpec, block_size: int):
  if w.ndim != 2:
    raise ValueError(f'GPTQ quantizes a 2-D kernel (in, out); got shape {w.shape}')
  if not isinstance(spec.fmt, formats.IntFormat):
    raise ValueError(f'GPTQ needs an integer format, got {spec.format!r}')
  if not 2 <= spec.fmt.bits <= 8:
    raise ValueError(f'GPTQ quantizes to 2..8 bits, got {spec.format!r} ({spec.fmt.bits} bits)')
  if spec.granularity == 'per_group' and (block_size % spec.group_size and spec.group_size % block_size):
    raise ValueError(f'GPTQ: block_size={block_size} and group_size={spec.group_size} must divide one another')


def _grid(w, spec: QuantSpec):
  """(scale, zero_point) of w (rows, out) under the kernel spec (per output column, or groups along rows)."""
  return calibration.calibrate(w, spec)


def gptq(w: jax.Array, h: jax.Array, spec: QuantSpec, *, block_size: int = 128, damp: float = 0.01,
         act_order: bool = False, static_groups: bool = False) -> GPTQResult:
  """GPTQ of a kernel w (in, out) given the Hessian h (in, in) of its inputs (see `hessian`).

  Args:
    w: the float kernel, contraction over axis 0 (flax's Dense layout).
    h: 2/n x^T x of calibration inputs.
    spec: an integer QuantSpec: granularity 'per_channel' (one scale per output column), 'per_group' (groups of
      group_size along the input axis) or 'per_tensor' (one grid, fitted on the whole kernel before the loop);
      symmetric or asymmetric; its calibration fits each grid.
    block_size: rows per lazy batch update (128 in the paper).
    damp: dampening, as a fraction of mean(diag h).
    act_order: process rows by decreasing h_ii (implies static groups).
    static_groups: fit group grids on the original w before the loop (else on the updated w at each block).
  """
  _check(w, spec, block_size)
  n_in, n_out = w.shape
  spec = {'per_channel': lambda: spec.replace(axis=1), 'per_group': lambda: spec.replace(axis=0)}.get(
      spec.granularity, lambda: spec)()
  g = spec.group_size if spec.granularity == 'per_group' else 0
  h = np.array(h, np.float64)
  w = np.array(w, np.float32)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  perm = np.argsort(-np.diag(h), kind='stable') if act_order else np.arange(n_in)
  u, damp = inverse_factor(h[np.ix_(perm, perm)], damp)
  static = bool(g) and (static_groups or act_order)
  bsz = min(block_size, n_in) if not g else max(min(block_size, n_in), g)
  pad = -n_in % bsz
  wp = np.pad(w[perm], ((0, pad), (0, 0)))
  up = np.pad(u, ((0, pad), (0, pad)))
  up[n_in:, n_in:] = np.eye(pad)
  if g and not static and n_in % g:
    raise ValueError(f'GPTQ: group_size={g} must divide the input size {n_in}')
  # Row grids (scale and zero point per row of the permuted kernel), for grids fixed before the loop.
  if not g or static:
    s, z = _grid(jnp.asarray(w), spec)
    rows = perm // g if g else np.zeros(n_in, int)
    by_row = lambda a: np.broadcast_to(np.asarray(a)[rows], (n_in, n_out))  # a per-tensor grid: every column
    row_s = np.pad(by_row(s), ((0, pad), (0, 0)), constant_values=1.0)
    row_z = None if z is None else np.pad(by_row(z), ((0, pad), (0, 0)))
  else:
    row_s = row_z = None
  q_rows, _, rs, rz = _gptq_loop(jnp.asarray(wp), jnp.asarray(up, jnp.float32), spec, bsz, g,
                                 None if row_s is None else jnp.asarray(row_s),
                                 None if row_z is None else jnp.asarray(row_z))
  inv = np.argsort(perm)
  qvalue = q_rows[:n_in][inv]
  if g and not static:  # dynamic groups: natural row order; one grid per group of g rows
    s, z = rs[:n_in:g], None if rz is None else rz[:n_in:g]
  sshape = gran.scale_shape((n_in, n_out), spec)
  scale = jnp.asarray(s, jnp.float32).reshape(sshape)
  zp = None if z is None else jnp.asarray(z, jnp.int32).reshape(sshape)
  q = quantizers.QArray(qvalue.astype(spec.fmt.container), scale, zp, spec.format, spec.codebook)
  return GPTQResult(q, quantizers.dequantize(q), float(damp))


@jax.jit(static_argnums=(2, 3, 4))
def _gptq_loop(w, u, spec: QuantSpec, bsz: int, g: int, row_s, row_z):
  """The blocked GPTQ loop over the rows of w (permuted, padded to a multiple of bsz). Returns (qvalues, w_hat,
  row scales, row zero points) per row; with dynamic groups (row_s None) each block fits its groups' grids on
  its rows as they are when the block starts."""
  n, n_out = w.shape
  row_spec = spec.replace(granularity='per_channel', axis=1, group_size=0)

  def quant_row(x, s, z):
    qa = quantizers.quantize(x[None], row_spec, scale=s[None], zero_point=None if z is None else z[None])
    return qa.qvalue[0].astype(jnp.int32), quantizers.dequantize(qa)[0]

  def block(b, carry):
    w, qv, wq, rs, rz = carry
    start = b * bsz
    wb = lax.dynamic_slice(w, (start, 0), (bsz, n_out))
    ub = lax.dynamic_slice(u, (start, start), (bsz, bsz))
    if row_s is None:  # dynamic groups: fitted on the block's rows as they are now
      sb, zb = calibration.calibrate(wb, spec)
      sb = gran.expand(sb, wb.shape)
      zb = None if zb is None else gran.expand(zb, wb.shape)
    else:
      sb = lax.dynamic_slice(row_s, (start, 0), (bsz, n_out))
      zb = None if row_z is None else lax.dynamic_slice(row_z, (start, 0), (bsz, n_out))

    def col(j, c):
      wb, qb, wqb, err = c
      qj, wj = quant_row(wb[j], sb[j], None if zb is None else zb[j])
      e = (wb[j] - wj) / ub[j, j]
      later = (jnp.arange(bsz) > j)[:, None]
      wb = wb - jnp.where(later, ub[j][:, None] * e[None, :], 0.0)
      return wb, qb.at[j].set(qj), wqb.at[j].set(wj), err.at[j].set(e)

    zeros = jnp.zeros((bsz, n_out), jnp.float32)
    _, qb, wqb, err = lax.fori_loop(0, bsz, col, (wb, zeros.astype(jnp.int32), zeros, zeros))
    # The block's errors reach every later row at once: w[r] -= sum_j U[j, r] e_j for rows r after the block.
    ub_rows = lax.dynamic_slice(u, (start, 0), (bsz, n))                          # (bsz, n)
    after = (jnp.arange(n) >= start + bsz)[:, None]
    w = w - jnp.where(after, ub_rows.T @ err, 0.0)
    qv = lax.dynamic_update_slice(qv, qb, (start, 0))
    wq = lax.dynamic_update_slice(wq, wqb, (start, 0))
    rs = lax.dynamic_update_slice(rs, sb, (start, 0))
    if rz is not None:
      rz = lax.dynamic_update_slice(rz, zb.astype(rz.dtype), (start, 0))
    return w, qv, wq, rs, rz

  asym = spec.scheme != 'symmetric'
  zeros = jnp.zeros((n, n_out), jnp.float32)
  init = (w, zeros.astype(jnp.int32), zeros, zeros, zeros.astype(jnp.int32) if asym else None)
  _, qv, wq, rs, rz = lax.fori_loop(0, n // bsz, block, init)
  return qv, wq, rs, rz


def _run(layer, *, block_size: int, damp: float, act_order: bool, static_groups: bool):
  try:
    res = gptq(L.as_array(layer.w), layer.stats.hessian, layer.spec, block_size=block_size, damp=damp,
               act_order=act_order, static_groups=static_groups)
  except ValueError as e:  # a Hessian no dampening makes positive definite: round to nearest (as llm-compressor)
    if 'not positive definite' not in str(e):
      raise
    return layer.replace(q=L.rtn(layer.w, layer.spec), notes=layer.notes + (('gptq', f'fell back to RTN: {e}'),))
  return layer.replace(q=res.q, notes=layer.notes + (('gptq_damp', res.damp),))


def _check_params(p) -> None:
  registry.at_least('gptq', 'block_size', p['block_size'], 1)
  registry.at_least('gptq', 'damp', p['damp'], 0.0)


registry.register(registry.PTQMethod('gptq', _run, {'block_size': 128, 'damp': 0.01, 'act_order': False,
                                                    'static_groups': False}, rounds=True, check=_check_params))
