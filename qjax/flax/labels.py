"""Which leaves of a quantized model's params are quantizer params (LSQ steps, PACT clips, LSQ+ offsets, DSQ
alphas), for optimizers that treat them apart (their own learning rate, no weight decay):

    tx = optax.multi_transform({'model': optax.adamw(lr, weight_decay=wd), 'quantizer': optax.adam(lr)},
                               qjax.flax.quantizer_param_labels)

Learned quantizer params are named '<op><index>_<side>_<name>' (Linen; a method other than __call__ and a nested
apply's host add a '<prefix>_') and 'qjax_' + that (NNX attributes), with <name> a registered method's learned
param name. A model's own params ('kernel', LayerNorm's 'scale', ...) never match.
"""

from __future__ import annotations

from typing import Any

import jax

from qjax import registry
from qjax.flax.session import is_quantizer_name

QUANTIZER, MODEL = 'quantizer', 'model'


def _learned_names() -> frozenset[str]:
  return frozenset(p.name for n in registry.names() for p in registry.get(n).learned)


def is_quantizer_param(name: str) -> bool:
  """True when a param named `name` is a learned quantizer param: a quantizer state name (the session's naming)
  whose last part is a registered method's learned param."""
  name = str(name)
  return is_quantizer_name(name) and name.rsplit('_', 1)[-1] in _learned_names()


def _leaf_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ''


def quantizer_param_labels(params: Any) -> Any:
  """The pytree of `params` (Linen params dict or NNX state) with each leaf replaced by 'quantizer' or 'model'."""
  learned = _learned_names()

  def label(path, _):
    name = _leaf_name(path)
    return QUANTIZER if is_quantizer_name(name) and name.rsplit('_', 1)[-1] in learned else MODEL
  return jax.tree_util.tree_map_with_path(label, params)
