"""qjax.ptq.gptq against a NumPy implementation written from the paper's algorithm (Frantar et al., 2022: one
row at a time, no lazy batching), and its invariants: on the spec's grid, never worse than round-to-nearest on
these layers, dead inputs quantized to zero, a clear error for a Hessian that cannot be factored."""

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QuantSpec, calibration, quantizers
from qjax.ptq import gptq, hessian, inverse_factor


def layer(seed, n_in=64, n_out=24, n=512):
  """Correlated inputs (as real activations are) and a Gaussian kernel (in, out)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, n_in)) @ rng.standard_normal((n_in, n_in)) * 0.3
  return jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal((n_in, n_out)), jnp.float32)


def reference_gptq(w, h, scale, zero_point, qmin, qmax, damp=0.01):
  """The paper's loop in float64: U = chol((H + damp mean diag I)^-1)^T; for each row i: q_i = Q(w_i),
  e = (w_i - q_i) / U_ii, w_j -= U_ij e for j > i. One grid (scale, zero point) per output column."""
  w = np.array(w, np.float64)
  h = np.array(h, np.float64)
  u = np.linalg.cholesky(np.linalg.inv(h + damp * np.mean(np.diag(h)) * np.eye(len(h)))).T
  z = np.zeros(w.shape[1]) if zero_point is None else np.asarray(zero_point, np.float64).reshape(-1)
  s = np.asarray(scale, np.float64).reshape(-1)
  q = np.zeros_like(w)
  for i in range(w.shape[0]):
    qi = np.clip(np.round(w[i] / s + z), qmin, qmax)
    q[i] = (qi - z) * s
    e = (w[i] - q[i]) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], e)
  return q


def out_err(x, w, w_hat):
  return float(jnp.sum((x @ (w - w_hat)) ** 2))


@pytest.mark.parametrize('granularity', ['per_channel', 'per_tensor'])
@pytest.mark.parametrize('scheme', ['symmetric', 'asymmetric'])
@pytest.mark.parametrize('block_size', [8, 64])
def test_gptq_equals_the_paper_loop(scheme, block_size, granularity):
  x, w = layer(0)
  spec = QuantSpec('int4', granularity=granularity, scheme=scheme,
                   calibration='minmax' if scheme == 'asymmetric' else 'absmax')
  h = hessian(x)
  res = gptq(w, h, spec, block_size=block_size)
  scale, zp = calibration.calibrate(w, spec.replace(axis=1) if granularity == 'per_channel' else spec)
  assert scale.shape == ((1, 24) if granularity == 'per_channel' else (1, 1))
  want = reference_gptq(w, h, scale, zp, spec.fmt.qmin, spec.fmt.qmax)
  got = np.asarray(res.w_hat, np.float64)
  step = np.broadcast_to(np.asarray(scale, np.float64).reshape(1, -1), (1, w.shape[1]))
  differ = np.abs(got - want) > 1e-4 * step
  # Blocked (f32) and sequential (f64) sums differ in the last bits, which can flip a rounding tie: at most a
  # few elements, each by exactly one grid step.
  assert differ.mean() < 0.01, differ.mean()
  np.testing.assert_allclose(np.abs(got - want)[differ] / np.broadcast_to(step, got.shape)[differ], 1.0, atol=1e-3)
  np.testing.assert_array_equal(np.asarray(res.q.scale), np.asarray(scale))


@pytest.mark.parametrize('kw', [dict(), dict(act_order=True), dict(spec=QuantSpec('int4')),
                                dict(spec=QuantSpec('int3', scheme='asymmetric', calibration='minmax'),
                                     act_order=True),
                                dict(spec=QuantSpec('int3', granularity='per_group', group_size=16)),
                                dict(spec=QuantSpec('int3', granularity='per_group', group_size=16), act_order=True),
                                dict(spec=QuantSpec('int2', granularity='per_group', group_size=32),
                                     static_groups=True)])
@pytest.mark.parametrize('seed', [1, 2])
def test_gptq_beats_round_to_nearest_and_stays_on_its_grid(kw, seed):
  kw = dict(kw)
  spec = kw.pop('spec', QuantSpec('int4', granularity='per_channel'))
  x, w = layer(seed)
  res = gptq(w, hessian(x), spec, block_size=16, **kw)
  kernel_spec = {'per_channel': spec.replace(axis=1), 'per_group': spec.replace(axis=0)}.get(spec.granularity, spec)
  rtn = quantizers.dequantize(quantizers.quantize(w, kernel_spec))
  assert out_err(x, w, res.w_hat) < out_err(x, w, rtn)
  q = np.asarray(res.q.qvalue)
  assert q.min() >= spec.fmt.qmin and q.max() <= spec.fmt.qmax
  np.testing.assert_array_equal(np.asarray(quantizers.dequantize(res.q)), np.asarray(res.w_hat))
  assert res.q.scale.shape == {'per_channel': (1, 24), 'per_tensor': (1, 1)}.get(spec.granularity,
                                                                                 (64 // max(spec.group_size, 1), 24))


def test_dead_inputs_quantize_to_zero():
  x, w = layer(3)
  x = x.at[:, 5].set(0.0)  # input feature 5 is always zero: H_55 = 0
  res = gptq(w, hessian(x), QuantSpec('int4', granularity='per_channel'), block_size=16)
  assert np.all(np.asarray(res.q.qvalue)[5] == 0) and np.all(np.asarray(res.w_hat)[5] == 0)


def test_hessian_that_cannot_be_factored_is_a_clear_error():
  with pytest.raises(ValueError, match='not positive definite'):
    inverse_factor(-np.eye(4), damp=0.01, retries=1)
  v = np.array([1.0, 2.0, 3.0])
  u, damp = inverse_factor(np.outer(v, v), damp=0.0, retries=3)  # rank 1: singular undamped, damped on retry
  assert damp == 0.01 and np.all(np.isfinite(u))


def test_rejects_specs_it_cannot_serve():
  x, w = layer(4)
  with pytest.raises(ValueError, match='integer format'):
    gptq(w, hessian(x), QuantSpec('fp8_e4m3'))


@pytest.mark.parametrize('bits', range(2, 9))
def test_every_width_from_2_to_8_bits(bits):
  x, w = layer(5)
  spec = QuantSpec(f'int{bits}', granularity='per_group', group_size=16)
  res = gptq(w, hessian(x), spec, block_size=16, act_order=True)
  q = np.asarray(res.q.qvalue)
  assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
  rtn = quantizers.dequantize(quantizers.quantize(w, spec.replace(axis=0)))
  assert out_err(x, w, res.w_hat) < out_err(x, w, rtn)


def test_one_bit_is_out_of_range():
  x, w = layer(5)
  with pytest.raises(ValueError, match=r'2\.\.8 bits'):
    gptq(w, hessian(x), QuantSpec('int1', granularity='per_channel'))
