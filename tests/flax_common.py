"""What the Flax tests share: int8 specs and rules, the plain matmul dimension numbers, data and error helpers."""

import jax
import jax.numpy as jnp

from qjax import ops
from qjax.spec import QuantSpec

S8 = QuantSpec('int8', 'per_channel')
CFG = ops.DotConfig(fwd=ops.MatmulConfig(S8, S8))
W8 = {'format': 'int8', 'granularity': 'per_channel'}   # a rule's weight spec
A8 = {'format': 'int8', 'granularity': 'per_tensor'}    # a rule's activation spec
MM = (((1,), (0,)), ((), ()))                            # x @ w as dot_general dimension numbers


def normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def rel_err(a, b):
  """||a - b|| / ||b||."""
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
