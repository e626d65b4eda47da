"""Quantizer methods as registered objects: the registry, one fake_quant signature, and a
method registered from outside working through every consumer."""

import ast
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import methods, ops, registry
from qjax.ops.config import DotConfig, MatmulConfig
from qjax.quantizers import fake_quant, init_params, quantize
from qjax.spec import QuantSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ registry


def test_registry_holds_every_method_by_its_config_name():
  assert registry.names()[:6] == ('ste', 'clipped_ste', 'lsq', 'lsq_plus', 'pact', 'ewgs')
  for name in registry.names():
    assert registry.get(name).name == name
  assert QuantSpec(estimator='lsq').method is registry.get('lsq')
  assert QuantSpec(estimator='lsq').learned == ('scale',)
  assert QuantSpec('int4', scheme='asymmetric', calibration='minmax', estimator='lsq_plus').learned == (
      'scale', 'offset')
  with pytest.raises(ValueError, match=r"estimator='pactt' is not one of .*\(did you mean 'pact'\?\)"):
    registry.get('pactt')
  with pytest.raises(ValueError, match='already registered'):
    registry.register(_Halve('ste'))


def test_no_estimator_name_is_spelled_outside_the_methods():
  """Consumers dispatch through the registry: no registered name appears as a string constant in their code
  (docstrings aside; the one exception is QuantSpec's default, estimator='ste')."""
  names = set(registry.names())
  files = ['qjax/quantizers.py', 'qjax/metrics.py', 'qjax/spec.py', 'qjax/calibration.py', 'qjax/formats.py',
           *map(str, (ROOT / 'qjax' / 'ops').glob('*.py')), *map(str, (ROOT / 'qjax' / 'flax').glob('*.py'))]
  found = []
  for f in files:
    tree = ast.parse((ROOT / f).read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
      if isinstance(n, ast.Constant) and n.value in names and id(n) not in docs:
        found.append((f, n.value))
  assert found == [('qjax/spec.py', 'ste')], found


@dataclasses.dataclass(frozen=True)
class _Halve(methods.Method):
  """A toy method registered by a test: STE on the calibrated grid, gradient halved."""

  def fake_quant(self, x, spec, params, key):
    y = methods.STE.fake_quant(x, spec, params, key)
    return y * 0.5 + jax.lax.stop_gradient(y * 0.5)


def test_a_method_registered_from_outside_works_everywhere():
  registry.register(_Halve('halve'))
  try:
    spec = QuantSpec('int8', granularity='per_channel', estimator='halve')
    x = jax.random.normal(jax.random.key(0), (4, 16))
    np.testing.assert_array_equal(fake_quant(x, spec), fake_quant(x, spec.replace(estimator='ste')))
    np.testing.assert_array_equal(jax.grad(lambda x: fake_quant(x, spec).sum())(x), np.full((4, 16), 0.5))
    assert init_params(x, spec) == {}
    w = jax.random.normal(jax.random.key(1), (16, 8))
    cfg = DotConfig(fwd=MatmulConfig(spec, spec, 'real'), small_m=0)
    y = ops.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg)
    assert y.shape == (4, 8) and np.isfinite(np.asarray(y)).all()
  finally:
    registry._METHODS.pop('halve')


def test_one_signature_params_and_key():
  x = jnp.asarray([0.3, -1.2, 2.6, 0.0])
  lsq = QuantSpec('int4', estimator='lsq')
  np.testing.assert_array_equal(fake_quant(x, lsq, {'scale': 0.5}), [0.5, -1.0, 2.5, 0.0])
  with pytest.warns(DeprecationWarning, match=r"params=\{'scale': ...\}"):
    old = fake_quant(x, lsq, scale=0.5)
  np.testing.assert_array_equal(old, [0.5, -1.0, 2.5, 0.0])
  with pytest.raises(ValueError, match="estimator='lsq' takes params scale; got alpha"):
    fake_quant(x, lsq, {'scale': 0.5, 'alpha': 1.0})
  with pytest.raises(TypeError, match='unexpected keyword'):
    fake_quant(x, lsq, offsett=1.0)
  # Methods without learned params take an optional static range.
  np.testing.assert_array_equal(fake_quant(x, QuantSpec('int4'), {'scale': 0.5}), [0.5, -1.0, 2.5, 0.0])
  s = QuantSpec('int4', rounding='stochastic')
  a = fake_quant(x, s, {'scale': 0.5}, jax.random.key(3))
  np.testing.assert_array_equal(a, fake_quant(x, s, {'scale': 0.5}, key=jax.random.key(3)))


def test_quantize_with_method_params_uses_the_methods_grid():
  w = jnp.asarray([[0.3, -1.2, 2.6, -4.0]])
  q = quantize(w, QuantSpec('int4', estimator='pact'), {'alpha': 2.0})  # clip to [-2, 2], scale 2 / 7
  np.testing.assert_allclose(q.scale, [[2.0 / 7]])
  np.testing.assert_array_equal(q.qvalue, [[1, -4, 7, -7]])
  q = quantize(w, QuantSpec('int4', estimator='lsq'), {'scale': -1.0})  # a negative step: the floor
  assert q.scale[0, 0] == np.float32(1e-8)
