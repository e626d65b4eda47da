"""Compatibility names and helpers shared by the Linen and NNX front ends.

The interception machinery lives in one file per job:
  qjax.flax.hooks       the op hooks, their installation, and the thread-local stack of running modules;
  qjax.flax.provenance  which param an operand is, through which shape ops;
  qjax.flax.session     the policy: rules, operand classification, quantizer state per op;
  qjax.flax.state       where params and quantizer state live (Linen variables, NNX attributes);
  qjax.flax.serving     ServingWeight (int8 / packed 2-, 3- and 4-bit storage) and reading it back;
  qjax.flax.capture     calibration statistics per quantized op.
"""

from __future__ import annotations

import jax
import numpy as np

from qjax.flax.hooks import HOOKS, ORIG, Frame, current, frame, patched  # noqa: F401
from qjax.flax.serving import ServingWeight, pack_int4, unpack_int4  # noqa: F401
from qjax.flax.session import Record, Session  # noqa: F401
from qjax.flax.state import STATS, QuantStat, scale_names  # noqa: F401


def jit_call(fn, state, args, kwargs, abstract: bool = False):
  """jax.jit of fn(state, *args, **kwargs) with the array leaves of the sample inputs traced, not closed over
  (XLA would constant-fold the model over constant inputs, slowly) and their other leaves static.
  `abstract=True` only traces it (jax.eval_shape): nothing runs and only output shapes come back."""
  leaves, treedef = jax.tree.flatten((args, kwargs))
  idx = [i for i, a in enumerate(leaves) if isinstance(a, (jax.Array, np.ndarray))]

  def call(state, arrays):
    full = list(leaves)
    for i, a in zip(idx, arrays, strict=True):
      full[i] = a
    a, k = jax.tree.unflatten(treedef, full)
    return fn(state, *a, **k)
  arrays = [leaves[i] for i in idx]
  return jax.eval_shape(call, state, arrays) if abstract else jax.jit(call)(state, arrays)
