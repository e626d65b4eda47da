"""qjax.flax.provenance: tracing an operand back to its param through shape ops, and moving QArrays along."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import quantizers
from qjax.flax import provenance
from qjax.spec import QuantSpec


def origin_of(fn, w):
  """The Origin of fn(w) found under jit, with w itself the only root."""
  out = {}

  def run(w):
    out['o'] = provenance.trace_back(fn(w), lambda v: ('w', w.shape) if v is w else None)
    return 0
  jax.jit(run)(w)
  return out['o']


def test_canary_jax_internals_used_by_the_walk():
  """The walk reads DynamicJaxprTracer.parent (a TracingEqn with .primitive, .params, .in_tracers) and unwraps
  JVP / linearize tracers through .primal: if JAX renames these, this fails first."""
  seen = {}

  def f(w):
    t = w.T
    eqn = t.parent
    seen['eqn'] = (eqn.primitive.name, dict(eqn.params), eqn.in_tracers[0] is w)
    return jnp.sum(t)
  jax.jit(f)(jnp.ones((2, 3)))
  assert seen['eqn'] == ('transpose', {'permutation': (1, 0)}, True)

  def g(w):
    seen['primal'] = provenance.has_trace(w.T) and provenance.unwrap(w) is not w
    return jnp.sum(w.T)
  jax.jit(jax.grad(g))(jnp.ones((2, 3)))
  assert seen['primal']


@pytest.mark.parametrize('fn, axes, kinds', [
    (lambda w: w, (0, 1), ()),
    (lambda w: w.T, (1, 0), ('transpose',)),
    (lambda w: jnp.asarray(w.transpose(), jnp.bfloat16), (1, 0), ('transpose', 'cast')),
    (lambda w: w.reshape(4, 2, 6), (0, None, None), ('reshape',)),
    (lambda w: w[None], (None, 0, 1), ('broadcast',)),
    (lambda w: w[:2], (0, 1), ('slice',)),
    (lambda w: jnp.swapaxes(w, 0, 1).astype(jnp.float32), (1, 0), ('transpose',)),
])
def test_shape_ops_map_axes(fn, axes, kinds):
  o = origin_of(fn, jnp.ones((4, 12)))
  assert o.param == 'w' and o.axes == axes
  assert tuple(s.kind for s in o.steps if s.kind != 'cast' or 'cast' in kinds) == kinds


@pytest.mark.parametrize('fn', [lambda w: w * 2.0, lambda w: w + 1, lambda w: jnp.tanh(w).T,
                                lambda w: w[jnp.array([0, 1])]])
def test_arithmetic_ends_the_walk(fn):
  assert origin_of(fn, jnp.ones((4, 12))) is None


def test_eager_values_have_no_provenance():
  w = jnp.ones((2, 3))
  assert provenance.trace_back(w.T, lambda v: ('w', w.shape) if v is w else None) is None
  assert not provenance.has_trace(w.T)


@pytest.mark.parametrize('fn', [lambda w: w.T, lambda w: w.reshape(2, 3, 8).transpose(1, 0, 2),
                                lambda w: jnp.transpose(w.reshape(6, 8), (1, 0))])
def test_backward_then_forward_round_trips_a_quantized_operand(fn):
  w = jax.random.normal(jax.random.key(0), (6, 8))
  o = origin_of(fn, w)
  x = fn(w)
  spec = QuantSpec('int8', 'per_channel', axis=x.ndim - 1)
  q = quantizers.quantize(x, spec)
  back = provenance.backward(o, q)
  assert back.qvalue.shape == w.shape
  again = provenance.forward(o, back)
  assert np.array_equal(again.qvalue, q.qvalue) and np.array_equal(again.scale, q.scale)


def test_forward_tracks_the_minor_dim_through_transposes():
  """QArray.minor_dim (the layout hint of a transposed view) follows transposes and is dropped by reshapes:
  a row-major (V, D) embedding used as emb.T has D, now dim 0, minor; a served weight stored transposed
  (minor_dim 0) used as w.T is row-major again."""
  w = jax.random.normal(jax.random.key(0), (6, 8))
  q = quantizers.quantize(w, QuantSpec('int8', 'per_channel', axis=0))
  o = origin_of(lambda w: w.T, w)
  assert provenance.forward(o, q).minor_dim == 0
  assert provenance.forward(o, dataclasses.replace(q, minor_dim=0)).minor_dim is None
  o2 = origin_of(lambda w: w.T.reshape(2, 4, 6), w)
  assert provenance.forward(o2, q).minor_dim is None


def test_reshape_groups():
  assert provenance.reshape_groups((4, 6), (4, 2, 3)) == [((0,), (0,)), ((1,), (1, 2))]
  assert provenance.reshape_groups((1, 6), (6,)) == [((0,), ()), ((1,), (0,))]
  assert provenance.reshape_groups((2, 3, 4), (6, 4)) == [((0, 1), (0,)), ((2,), (1,))]


def test_backward_refuses_a_reshape_that_splits_a_scaled_axis():
  w = jax.random.normal(jax.random.key(0), (6, 8))
  fn = lambda w: w.reshape(6, 2, 4)
  o = origin_of(fn, w)
  q = quantizers.quantize(fn(w), QuantSpec('int8', 'per_channel', axis=2))  # one scale per 4-block column
  with pytest.raises(ValueError, match='only partly scaled'):
    provenance.backward(o, q)
