"""A restricted unpickler for third-party pickles that hold plain numpy arrays.

``pickle.load`` runs whatever callables a pickle names, so a pickle from outside this project
must never go through it. ``restricted_loads`` accepts only the few numpy globals needed to
rebuild numeric ``ndarray`` objects (inside tuples, lists and dicts of plain Python values) and
raises ``pickle.UnpicklingError`` on anything else, before that thing is called.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

# The callable numpy itself names when it pickles an array: numpy.core.multiarray._reconstruct in
# numpy 1.x pickles, numpy._core.multiarray._reconstruct in numpy 2.x ones. Taking it from
# ndarray.__reduce__ gets the right function without importing the deprecated numpy.core alias.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def _numeric_dtype(*args: object) -> np.dtype:
  """np.dtype, except that dtypes able to hold Python objects are refused."""
  dt = np.dtype(*args)
  if dt.hasobject:
    raise pickle.UnpicklingError(f'refusing dtype {dt!r}: it can hold arbitrary Python objects')
  return dt


def _latin1_encode(text: str, encoding: str = 'utf-8') -> bytes:
  """_codecs.encode as Python 3 protocol-2 pickles use it for bytes: str -> bytes via latin-1 only."""
  if not isinstance(text, str) or encoding.lower().replace('_', '-') not in ('latin1', 'latin-1'):
    raise pickle.UnpicklingError(f'refusing _codecs.encode with encoding {encoding!r}')
  return text.encode('latin-1')


ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
  ('numpy.core.multiarray', '_reconstruct'): _RECONSTRUCT,
  ('numpy._core.multiarray', '_reconstruct'): _RECONSTRUCT,
  ('numpy', 'ndarray'): np.ndarray,
  ('numpy', 'dtype'): _numeric_dtype,
  ('_codecs', 'encode'): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler whose find_class only resolves the globals in ALLOWED_GLOBALS."""

  def find_class(self, module: str, name: str) -> object:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      allowed = ', '.join(f'{m}.{n}' for m, n in ALLOWED_GLOBALS)
      raise pickle.UnpicklingError(
        f'refusing to load global {module}.{name} from an untrusted pickle (allowed: {allowed})'
      ) from None

  def persistent_load(self, pid: object) -> object:
    raise pickle.UnpicklingError('refusing persistent ids in an untrusted pickle')


def _check_tree(obj: object, depth: int = 0) -> None:
  """Checks that the result is made of numeric arrays and plain containers/scalars only."""
  if depth > 32:
    raise pickle.UnpicklingError('unpickled structure is nested too deeply')
  if isinstance(obj, np.ndarray):
    if obj.dtype.hasobject:
      raise pickle.UnpicklingError(f'unpickled array has object dtype {obj.dtype!r}')
  elif isinstance(obj, tuple | list):
    for x in obj:
      _check_tree(x, depth + 1)
  elif isinstance(obj, dict):
    for k, v in obj.items():
      _check_tree(k, depth + 1)
      _check_tree(v, depth + 1)
  elif obj is not None and not isinstance(obj, bool | int | float | complex | str | bytes):
    raise pickle.UnpicklingError(f'unexpected {type(obj).__name__} in an untrusted pickle')


def restricted_loads(data: bytes, *, encoding: str = 'ASCII') -> object:
  """Unpickles ``data`` allowing only numeric numpy arrays and plain Python containers.

  ``encoding='latin1'`` is what Python 2 pickles of numpy arrays need.
  """
  obj = RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
  _check_tree(obj)
  return obj
