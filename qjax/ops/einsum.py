"""Quantized two-operand `einsum`, reduced to one quantized `qjax.ops.dot_general`.

    y = einsum('bld,dhk->blhk', x, w, config=cfg)
    nnx.Einsum(..., einsum_op=make_einsum(cfg))

The subscripts are parsed (explicit '->' or implicit output, '...' expanded from the operand ranks), then:
  1. an index repeated within one operand takes the diagonal, a size-1 index broadcast against a larger one is
     squeezed, and an index that appears in one operand only and not in the output is summed out, all in float
     and before quantizing;
  2. indices in both operands become batch dims (in the output) or contracting dims (not in the output), the rest
     are the free dims of their operand, and one `dot_general` with these dimension numbers runs under `config`;
  3. its output (batch..., lhs free..., rhs free...) is transposed into the requested output order.
Granularity follows dot_general: 'per_channel' means one scale per non-contracted index of each operand (per
batch and free index), 'per_group' groups along the last contracting index ('bhd,hdf->bf': d, within each h).
lhs_params / rhs_params are shaped for the operands as they enter dot_general (the operands themselves unless
step 1 changed them).

Flax hooks (flax 0.12): `nnx.Einsum(einsum_op=...)` calls `einsum_op(einsum_str, inputs, kernel,
precision=..., out_sharding=..., [preferred_element_type=...])`, which `make_einsum` fits. `linen.Einsum` has no
hook: it calls `jnp.einsum` directly (jnp.einsum's private `_dot_general=` argument is not exposed by linen).
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from qjax import quantizers
from qjax.ops.config import DotConfig
from qjax.ops.dot_general import dot_general


def _split_terms(subscripts: str):
  s = subscripts.replace(' ', '')
  if s.count('->') > 1:
    raise ValueError(f'einsum: malformed subscripts {subscripts!r}: more than one "->"')
  ins, arrow, out = s.partition('->')
  if '-' in ins or '>' in ins or '-' in out or '>' in out:
    raise ValueError(f'einsum: malformed subscripts {subscripts!r}: stray "-" or ">"')
  terms = ins.split(',')
  if len(terms) != 2:
    raise ValueError(f'einsum: quantized einsum takes exactly two operands, got {len(terms)} in {subscripts!r}')
  return terms, (out if arrow else None)


def _letters(term: str, where: str, subscripts: str) -> tuple[list[str], bool]:
  """The index letters of one term, with '.' standing for the ellipsis; whether it has one."""
  if term.count('...') > 1 or term.replace('...', '').count('.'):
    raise ValueError(f'einsum: malformed subscripts {subscripts!r}: {where} {term!r} has a malformed ellipsis')
  head, dots, tail = term.partition('...')
  for c in head + tail:
    if c not in string.ascii_letters:
      raise ValueError(f'einsum: malformed subscripts {subscripts!r}: {where} {term!r} has index {c!r} '
                       '(indices are letters a-z, A-Z)')
  return list(head) + (['.'] if dots else []) + list(tail), bool(dots)


def parse(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """Parses two-operand einsum subscripts into explicit index strings (ellipsis expanded into fresh letters)."""
  terms, out = _split_terms(subscripts)
  (lt, le), (rt, re_) = (_letters(t, n, subscripts) for t, n in zip(terms, ('lhs', 'rhs'), strict=True))
  used = set(''.join(terms) + (out or ''))
  fresh = [c for c in string.ascii_letters if c not in used]
  n_ell = []
  for letters, has, ndim, name in ((lt, le, lhs_ndim, 'lhs'), (rt, re_, rhs_ndim, 'rhs')):
    named = len(letters) - has
    if (not has and named != ndim) or named > ndim:
      raise ValueError(f'einsum: subscripts {subscripts!r} give {name} {named} indices, but {name} has rank {ndim}')
    n_ell.append(ndim - named if has else 0)
  n = max(n_ell)
  ell = fresh[:n]
  expand = lambda letters, k: ''.join(c if c != '.' else ''.join(ell[n - k:]) for c in letters)
  lhs_s, rhs_s = expand(lt, n_ell[0]), expand(rt, n_ell[1])
  if out is None:  # Implicit output: the ellipsis, then the indices that appear once, sorted.
    counts = {c: (lhs_s + rhs_s).count(c) for c in lhs_s + rhs_s}
    out_s = ''.join(ell) + ''.join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
  else:
    ot, _ = _letters(out, 'output', subscripts)  # Without '...' in the output, the ellipsis dims are summed.
    out_s = ''.join(c if c != '.' else ''.join(ell) for c in ot)
  for c in out_s:
    if out_s.count(c) > 1:
      raise ValueError(f'einsum: malformed subscripts {subscripts!r}: output index {c!r} repeats')
    if c not in lhs_s and c not in rhs_s:
      raise ValueError(f'einsum: malformed subscripts {subscripts!r}: output index {c!r} is in no operand')
  return lhs_s, rhs_s, out_s


def _no_qarray(x, what: str, c: str):
  if isinstance(x, quantizers.QArray):
    raise ValueError(f'einsum: index {c!r} of a pre-quantized (QArray) operand needs {what} before the '
                     'contraction, which quantized values do not allow; pass the float array instead')


def _diagonals(x, s: str):
  """Takes the diagonal of every index repeated within one operand."""
  while len(set(s)) < len(s):
    c = next(c for c in s if s.count(c) > 1)
    _no_qarray(x, 'a diagonal', c)
    i = s.index(c)
    j = s.index(c, i + 1)
    if x.shape[i] != x.shape[j]:
      raise ValueError(f'einsum: index {c!r} repeats with sizes {x.shape[i]} and {x.shape[j]}')
    x = jnp.diagonal(x, axis1=i, axis2=j)  # The diagonal goes last.
    s = s[:i] + s[i + 1:j] + s[j + 1:] + c
  return x, s


def _sum_out(x, s: str, drop: set):
  axes = tuple(i for i, c in enumerate(s) if c in drop)
  if not axes:
    return x, s
  _no_qarray(x, 'a sum or a broadcast', s[axes[0]])
  return jnp.sum(x, axis=axes), ''.join(c for c in s if c not in drop)


def einsum(subscripts: str, lhs, rhs, *, config: DotConfig, lhs_params=None, rhs_params=None,
           key: jax.Array | None = None, preferred_element_type=None):
  """Quantized two-operand `jnp.einsum` through one `qjax.ops.dot_general` (see the module docstring).

  Args:
    subscripts: e.g. 'bld,dhk->blhk', '...d,df->...f', 'bhqd,bhkd->bhqk'; implicit output allowed.
    lhs, rhs: float arrays, or QArrays (pre-quantized serving weights, see `qjax.ops.dot_general`) when no
      diagonal, broadcast or sum is needed on them before the contraction.
    config: the DotConfig of the forward and both gradient matmuls.
    lhs_params, rhs_params, key: as `qjax.ops.dot_general`.
    preferred_element_type: the output dtype (default: the operands' result type).
  """
  is_q = lambda x: isinstance(x, quantizers.QArray)
  lhs, rhs = (x if is_q(x) else jnp.asarray(x) for x in (lhs, rhs))
  for name, x in (('lhs', lhs), ('rhs', rhs)):
    if not is_q(x) and not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'einsum {name}: quantized ops take float operands, got dtype {x.dtype}')
  ls, rs, os_ = parse(subscripts, len(lhs.shape), len(rhs.shape))
  lhs, ls = _diagonals(lhs, ls)
  rhs, rs = _diagonals(rhs, rs)
  sizes = {}
  for x, s, name in ((lhs, ls, 'lhs'), (rhs, rs, 'rhs')):
    for c, n in zip(s, x.shape, strict=True):
      sizes.setdefault(c, []).append((n, name))
  squeeze = {'lhs': set(), 'rhs': set()}
  for c, seen in sizes.items():
    if len(seen) == 2 and seen[0][0] != seen[1][0]:
      (n0, a), (n1, b) = seen
      if 1 not in (n0, n1):
        raise ValueError(f'einsum: index {c!r} has size {n0} in {a} and {n1} in {b} in {subscripts!r}')
      squeeze[a if n0 == 1 else b].add(c)  # Broadcasting: the size-1 side drops the index.
  lhs, ls = _sum_out(lhs, ls, squeeze['lhs'])
  rhs, rs = _sum_out(rhs, rs, squeeze['rhs'])
  lhs, ls = _sum_out(lhs, ls, {c for c in ls if c not in rs and c not in os_})
  rhs, rs = _sum_out(rhs, rs, {c for c in rs if c not in ls and c not in os_})
  if not ls or not rs:  # A scalar operand: contract a dummy size-1 index (quantizers need rank >= 1).
    c = next(c for c in string.ascii_letters if c not in ls + rs + os_)
    lhs, rhs, ls, rs = lhs[..., None], rhs[..., None], ls + c, rs + c
  batch = [c for c in ls if c in rs and c in os_]
  contract = [c for c in ls if c in rs and c not in os_]
  dims = ((tuple(ls.index(c) for c in contract), tuple(rs.index(c) for c in contract)),
          (tuple(ls.index(c) for c in batch), tuple(rs.index(c) for c in batch)))
  out = dot_general(lhs, rhs, dims, preferred_element_type=preferred_element_type, config=config,
                    lhs_params=lhs_params, rhs_params=rhs_params, key=key)
  got = ''.join(batch) + ''.join(c for c in ls if c not in rs) + ''.join(c for c in rs if c not in ls)
  out = jnp.transpose(out, tuple(got.index(c) for c in os_)) if got != os_ else out
  return out


def make_einsum(config: DotConfig, **kwargs):
  """A function with `jnp.einsum`'s calling convention for two operands running the quantized op, for
  `nnx.Einsum(einsum_op=...)`. kwargs: lhs_params, rhs_params, key."""
  def fn(subscripts, *operands, precision=None, preferred_element_type=None, **unused):
    del precision
    if len(operands) != 2:
      raise ValueError(f'einsum: quantized einsum takes exactly two operands, got {len(operands)}')
    return einsum(subscripts, *operands, config=config, preferred_element_type=preferred_element_type, **kwargs)
  return fn
