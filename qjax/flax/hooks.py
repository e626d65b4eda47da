"""Op hooks: a model's matmuls and convs reach qjax while a quantized model runs, on that thread only.

While any quantized model runs, `jax.lax.dot_general`, `jax.lax.dot`, `jax.lax.conv_general_dilated`,
`jax.lax.conv_transpose` (Flax's ConvTranspose; run as the conv it computes),
`jax.numpy.einsum`, `jax.numpy.matmul`, `jax.numpy.dot`, `jax.numpy.tensordot`, `jax.numpy.inner`,
`jax.numpy.vdot` (listed as not reachable: it flattens its operands) and the `@` operator
(`jax._src.numpy.tensor_contractions.matmul`, which `Array.__matmul__` looks up at call time) are replaced by
hooks. A thread-local stack holds the module being executed (pushed by the Linen interceptor or by the quantized
NNX module classes); a hook called from model code under a frame hands the op to the frame's session
(qjax.flax.session.Session.run_op), and runs the original op otherwise (other threads, qjax's own op code, JAX
internals). lax.dot, jnp.matmul, jnp.dot, jnp.tensordot, jnp.inner and `@` are caught at their entry, where
their operands still carry their provenance (inside those jitted library functions they would not), and run as
one dot_general.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from typing import Any

import jax
import jax.lax as lax_mod
import jax.numpy as jnp_mod

# jax.numpy.matmul as the `@` operator calls it: a private module, the one place `x @ w` can be reached.
from jax._src.numpy import tensor_contractions as tc

_tls = threading.local()
_LOCK = threading.Lock()
ORIG: dict[str, Any] = {}
_installed = 0


@dataclasses.dataclass
class Frame:
  """One running method of a module: its path as in the params tree ('' for the root), the method's name."""
  module: Any
  path: str
  session: Any
  method: str = '__call__'
  counters: dict[str, int] = dataclasses.field(default_factory=dict)
  param_index: Any = None  # the model's params by identity and path (built lazily by the backend)
  backend: Any = None      # where this module's state lives (qjax.flax.state); None: the session's
  nested: str = ''         # a module run by a nested Linen `apply` (module.apply(...) from inside the model):
                           # its path below the host module whose variables keep its quantizer state
  scope_root: Any = None   # the Linen root scope the module actually runs in (to recognise nested applies)

  @property
  def state(self):
    return self.backend or self.session.backend


def stack() -> list[Frame]:
  if not hasattr(_tls, 'stack'):
    _tls.stack, _tls.inside = [], 0
  return _tls.stack


def current() -> Frame | None:
  s = stack()
  return s[-1] if s and not _tls.inside else None


@contextlib.contextmanager
def frame(module, path: str, session, method: str = '__call__', backend=None):
  s = stack()
  fr = Frame(module, path, session, method, backend=backend)
  s.append(fr)
  try:
    yield fr
  finally:
    s.pop()


@contextlib.contextmanager
def inside_op():
  """qjax's own op code runs here: hooks pass through."""
  stack()
  _tls.inside += 1
  try:
    yield
  finally:
    _tls.inside -= 1


def _model_frame(depth: int = 2) -> Frame | None:
  """The frame a hooked call belongs to, or None when the caller is qjax's own op code or JAX itself (JAX's
  library code calls its own matmul; the `@` operator's wrappers in array_methods are looked through)."""
  fr = current()
  if fr is None:
    return None
  f = sys._getframe(depth)
  name = f.f_globals.get('__name__', '')
  while name.startswith('jax._src.numpy.array_methods') or name.startswith('jax._src.numpy.util'):
    f = f.f_back
    name = f.f_globals.get('__name__', '') if f is not None else ''
  if name.startswith('qjax.') and not name.startswith('qjax.flax'):
    return None
  if name.startswith('jax.') or name.startswith('jax._src'):
    return None
  return fr


def dot_general_hook(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  orig = lambda: ORIG['dot_general'](lhs, rhs, dimension_numbers, precision=precision,
                                     preferred_element_type=preferred_element_type, **kw)
  fr = _model_frame()
  if fr is None:
    return orig()
  return fr.session.dot_general(fr, lhs, rhs, dimension_numbers, precision, preferred_element_type, orig)


def conv_hook(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
              feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None, **kw):
  args = (window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
          batch_group_count, precision, preferred_element_type)
  orig = lambda: ORIG['conv_general_dilated'](lhs, rhs, *args, **kw)
  fr = _model_frame()
  if fr is None:
    return orig()
  return fr.session.conv(fr, lhs, rhs, args, orig)


def einsum_hook(subscripts, *operands, precision=None, preferred_element_type=None, _dot_general=None, **kw):
  if _dot_general is not None:  # Linen attention passes `_dot_general=jax.lax.dot_general` (or its own)
    kw['_dot_general'] = ORIG.get('dot_general') if _dot_general is dot_general_hook else _dot_general
  orig = lambda: ORIG['einsum'](subscripts, *operands, precision=precision,
                                preferred_element_type=preferred_element_type, **kw)
  fr = _model_frame()
  if fr is None or len(operands) != 2 or not isinstance(subscripts, str):
    return orig()
  return fr.session.einsum(fr, subscripts, operands[0], operands[1], preferred_element_type, orig)


def _matmul_dims(a_ndim: int, b_ndim: int, kind: str):
  """dot_general dimension numbers of jnp.matmul / jnp.dot of operands of these ranks, or None when it is not
  one dot_general (a matmul that broadcasts batch dims; then the original op runs, listed as not quantized).
  jnp.dot contracts a's last axis with b's second-to-last (its last when 1-D), the output being a's free axes
  then b's: exactly dot_general without batch dims. jnp.matmul is the same when either operand is at most 2-D
  except a 2-D `a` with a batched `b`; operands of equal rank with equal batch shapes are batch dims."""
  if a_ndim == 0 or b_ndim == 0:
    return None
  contract = ((a_ndim - 1,), (max(b_ndim - 2, 0),))
  if kind == 'dot' or b_ndim <= 2 or a_ndim == 1:
    return contract, ((), ())
  if a_ndim == b_ndim:
    batch = tuple(range(a_ndim - 2))
    return contract, (batch, batch)
  return None


def _entry_hook(kind: str):
  def hook(a, b, *, precision=None, preferred_element_type=None, **kw):
    orig = lambda: ORIG[kind](a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)
    fr = _model_frame()
    if fr is None or not (hasattr(a, 'ndim') and hasattr(b, 'ndim')):
      return orig()
    extra = sorted(k for k, v in kw.items() if v is not None)
    if extra:
      return fr.session.unreachable(fr, kind, a, b, orig, f'it is called with {", ".join(extra)}')
    dims = _matmul_dims(a.ndim, b.ndim, kind)
    if dims is None or (dims[1][0] and tuple(a.shape[:-2]) != tuple(b.shape[:-2])):
      return fr.session.unreachable(fr, kind, a, b, orig, 'its operands broadcast over batch dims')
    return fr.session.dot_general(fr, a, b, dims, precision, preferred_element_type, orig, via=kind)
  hook.__name__ = f'{kind}_hook'
  return hook


matmul_hook = _entry_hook('matmul')
dot_hook = _entry_hook('dot')


def lax_dot_hook(lhs, rhs, *, dimension_numbers=None, precision=None, preferred_element_type=None, **kw):
  """jax.lax.dot: dot_general with the given dimension numbers, or a's last axis against b's first."""
  orig = lambda: ORIG['lax_dot'](lhs, rhs, dimension_numbers=dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type, **kw)
  fr = _model_frame()
  if fr is None or not (hasattr(lhs, 'ndim') and hasattr(rhs, 'ndim')):
    return orig()
  dims = dimension_numbers
  if dims is None:
    if not (1 <= lhs.ndim <= 2 and 1 <= rhs.ndim <= 2):
      return orig()  # the original raises its own error
    dims = (((lhs.ndim - 1,), (0,)), ((), ()))
  return fr.session.dot_general(fr, lhs, rhs, dims, precision, preferred_element_type, orig, via='lax.dot')


def tensordot_hook(a, b, axes=2, *, precision=None, preferred_element_type=None, **kw):
  """jnp.tensordot: a's `axes` last axes (or the listed ones) against b's first (or listed): dot_general with
  those contracting dims and no batch dims (its output, a's free axes then b's, is tensordot's)."""
  orig = lambda: ORIG['tensordot'](a, b, axes, precision=precision, preferred_element_type=preferred_element_type,
                                   **kw)
  fr = _model_frame()
  if fr is None or not (hasattr(a, 'ndim') and hasattr(b, 'ndim')):
    return orig()
  extra = sorted(k for k, v in kw.items() if v is not None)
  if extra:
    return fr.session.unreachable(fr, 'tensordot', a, b, orig, f'it is called with {", ".join(extra)}')
  try:
    if isinstance(axes, int):
      ca, cb = tuple(range(a.ndim - axes, a.ndim)), tuple(range(axes))
    else:
      ax_a, ax_b = axes
      ca = (ax_a,) if isinstance(ax_a, int) else tuple(ax_a)
      cb = (ax_b,) if isinstance(ax_b, int) else tuple(ax_b)
      ca, cb = tuple(i % a.ndim for i in ca), tuple(i % b.ndim for i in cb)
  except (TypeError, ValueError, ZeroDivisionError):
    return orig()  # the original raises its own error
  if not ca or len(ca) != len(cb) or a.ndim == 0 or b.ndim == 0:
    return fr.session.unreachable(fr, 'tensordot', a, b, orig, 'it contracts no axis (an outer product)')
  return fr.session.dot_general(fr, a, b, ((ca, cb), ((), ())), precision, preferred_element_type, orig,
                                via='tensordot')


def inner_hook(a, b, *, precision=None, preferred_element_type=None, **kw):
  """jnp.inner: the last axes of a and b contracted, a's free axes then b's: one dot_general."""
  orig = lambda: ORIG['inner'](a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)
  fr = _model_frame()
  if fr is None or not (hasattr(a, 'ndim') and hasattr(b, 'ndim')):
    return orig()
  if a.ndim == 0 or b.ndim == 0:
    return fr.session.unreachable(fr, 'inner', a, b, orig, 'an operand is a scalar (a product, no matmul)')
  return fr.session.dot_general(fr, a, b, (((a.ndim - 1,), (b.ndim - 1,)), ((), ())), precision,
                                preferred_element_type, orig, via='inner')


def vdot_hook(a, b, *, precision=None, preferred_element_type=None, **kw):
  """jnp.vdot flattens both operands into one vector dot (conjugating a): listed as not reachable."""
  orig = lambda: ORIG['vdot'](a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)
  fr = _model_frame()
  if fr is None or not (hasattr(a, 'ndim') and hasattr(b, 'ndim')):
    return orig()
  return fr.session.unreachable(fr, 'vdot', a, b, orig, 'it flattens both operands into one vector dot')


def _conv_transpose_args(lhs, rhs, call):
  """The conv_general_dilated arguments (strides, padding, dilations, dimension numbers, groups, precision,
  preferred type) that `call(lhs, rhs)`, a jax.lax.conv_transpose, computes, read from its jaxpr (JAX's own
  padding arithmetic, whatever its version); None unless that jaxpr is exactly one conv of the two operands as
  they are (transpose_kernel=True flips and swaps the kernel first)."""
  with inside_op():
    closed = jax.make_jaxpr(call)(jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
                                  jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))
  eqns, jaxpr = closed.jaxpr.eqns, closed.jaxpr
  if len(eqns) != 1 or eqns[0].primitive.name != 'conv_general_dilated':
    return None
  e = eqns[0]
  if list(e.invars) != list(jaxpr.invars) or list(e.outvars) != list(jaxpr.outvars):
    return None
  p = e.params
  return (p['window_strides'], p['padding'], p['lhs_dilation'], p['rhs_dilation'], p['dimension_numbers'],
          p['feature_group_count'], p['batch_group_count'], p['precision'], p['preferred_element_type'])


def conv_transpose_hook(lhs, rhs, strides, padding, rhs_dilation=None, dimension_numbers=None,
                        transpose_kernel=False, precision=None, preferred_element_type=None, **kw):
  """jax.lax.conv_transpose (Flax's ConvTranspose): caught at its entry, since inside it JAX calls its own conv,
  and run as the conv it computes (the input dilated by the strides, unit window strides)."""
  call = lambda a, b: ORIG['conv_transpose'](a, b, strides, padding, rhs_dilation=rhs_dilation,
                                             dimension_numbers=dimension_numbers, transpose_kernel=transpose_kernel,
                                             precision=precision, preferred_element_type=preferred_element_type,
                                             **kw)
  orig = lambda: call(lhs, rhs)
  fr = _model_frame()
  if fr is None or not (hasattr(lhs, 'ndim') and hasattr(rhs, 'ndim')):
    return orig()
  args = _conv_transpose_args(lhs, rhs, call)
  if args is None:
    why = ('transpose_kernel=True flips the kernel (lax.rev), which qjax does not trace back to its param'
           if transpose_kernel else 'it is not one conv of its operands')
    return fr.session.unreachable(fr, 'conv_transpose', lhs, rhs, orig, why)
  return fr.session.conv(fr, lhs, rhs, args, orig, via='conv_transpose')


def _operator_matmul_hook(a, b, *, precision=None, preferred_element_type=None, **kw):
  return matmul_hook(a, b, precision=precision, preferred_element_type=preferred_element_type, **kw)


def _targets():
  return [(lax_mod, 'dot_general', 'dot_general', dot_general_hook),
          (lax_mod, 'conv_general_dilated', 'conv_general_dilated', conv_hook),
          (lax_mod, 'conv_transpose', 'conv_transpose', conv_transpose_hook),
          (lax_mod, 'dot', 'lax_dot', lax_dot_hook),
          (jnp_mod, 'einsum', 'einsum', einsum_hook),
          (jnp_mod, 'matmul', 'matmul', matmul_hook),
          (jnp_mod, 'dot', 'dot', dot_hook),
          (jnp_mod, 'tensordot', 'tensordot', tensordot_hook),
          (jnp_mod, 'inner', 'inner', inner_hook),
          (jnp_mod, 'vdot', 'vdot', vdot_hook),
          (tc, 'matmul', 'matmul', _operator_matmul_hook)]


def _install():
  for mod, attr, key, hook in _targets():
    ORIG.setdefault(key, getattr(mod, attr))
    setattr(mod, attr, hook)


def _uninstall():
  for mod, attr, key, _ in _targets():
    setattr(mod, attr, ORIG[key])


@contextlib.contextmanager
def patched():
  """Installs the hooks while any quantized model runs (they pass through for other threads and code)."""
  global _installed
  with _LOCK:
    if _installed == 0:
      _install()
    _installed += 1
  try:
    yield
  finally:
    with _LOCK:
      _installed -= 1
      if _installed == 0:
        _uninstall()


HOOKS = {'dot_general': dot_general_hook, 'conv_general_dilated': conv_hook, 'einsum_op': einsum_hook}
