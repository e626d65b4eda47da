"""qjax.ptq's methods against small references written from their papers' equations in NumPy, and their
invariants: SmoothQuant and rotations leave the float output unchanged, AWQ's grid pick is the brute-force
argmin, AdaRound's regulariser and schedule, bias correction zeroes the mean output shift."""

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import QuantSpec, quantizers
from qjax.ptq import adaround, awq, bias_correction, layer, pipeline, registry, rotation, smoothquant

INT4 = QuantSpec('int4', granularity='per_channel')


def data(seed, n_in=64, n_out=24, n=256, outliers=True):
  """Inputs with a few outlier channels (as LLM activations have) and a Gaussian kernel (in, out)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, n_in)) @ (0.3 * rng.standard_normal((n_in, n_in)) + np.eye(n_in))
  if outliers:
    x[:, :3] *= 20.0
  return x.astype(np.float32), rng.standard_normal((n_in, n_out)).astype(np.float32)


def np_rtn(w, bits=4):
  """Symmetric per-output-column absmax round-to-nearest (half to even), full signed range."""
  qmax = 2 ** (bits - 1) - 1
  s = np.abs(w).max(0, keepdims=True) / qmax
  return np.clip(np.round(w / s), -qmax - 1, qmax) * s


# --------------------------------------------------------------------------------------------- SmoothQuant


def test_smoothquant_scales_follow_the_formula_and_keep_the_float_output():
  x, w = data(0)
  w2 = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
  res = smoothquant.smoothquant(np.abs(x).max(0), [w, w2], alpha=0.5)
  w_max = np.maximum(np.abs(w).max(1), np.abs(w2).max(1))
  np.testing.assert_allclose(res.scale, np.sqrt(np.abs(x).max(0)) / np.sqrt(w_max), rtol=1e-6)
  for k, ks in zip([w, w2], res.w, strict=True):
    np.testing.assert_allclose((x / res.scale) @ ks, x.astype(np.float64) @ k, rtol=1e-6, atol=1e-6)
  # alpha = 0.5 with one consumer: the smoothed input and weight ranges meet per channel.
  one = smoothquant.smoothquant(np.abs(x).max(0), [w], 0.5)
  np.testing.assert_allclose(np.abs(x / one.scale).max(0), np.abs(one.w[0]).max(1), rtol=1e-6)


def test_smoothquant_alpha_range_and_folding():
  with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\]'):
    smoothquant.smooth_scales(np.ones(4), np.ones((4, 2)), alpha=1.5)
  # Folding into a producer (x = h . w_prev + b_prev): the producer's output divided by s.
  rng = np.random.default_rng(2)
  h, wp, bp = rng.standard_normal((5, 6)), rng.standard_normal((6, 4)), rng.standard_normal(4)
  s = rng.uniform(0.5, 2.0, 4)
  wf, bf = smoothquant.fold_into_producer(wp, bp, s)
  np.testing.assert_allclose(h @ wf + bf, (h @ wp + bp) / s, rtol=1e-12)


def conv_data(seed, positions=9, channels=8, n_out=12, n=300):
  """im2col rows of a conv (positions x channels features, channel fastest) whose channel 0 carries outliers
  at every window position, and a Gaussian kernel (K, out)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, positions, channels))
  x[:, :, 0] *= 25.0
  return x.reshape(n, -1).astype(np.float32), rng.standard_normal((positions * channels, n_out)).astype(np.float32)


def test_tied_smoothquant_has_one_scale_per_input_channel_from_the_window_maxima():
  x, w = conv_data(5)
  res = smoothquant.smoothquant(np.abs(x).max(0), [w], alpha=0.5, tied=8)
  x_c = np.abs(x).reshape(-1, 9, 8).max((0, 1))                     # max |X_c| over rows and positions
  w_c = np.abs(w).reshape(9, 8, -1).max((0, 2))                     # max |W_c| over positions and outputs
  np.testing.assert_allclose(res.scale, np.tile(np.sqrt(x_c / w_c), 9), rtol=1e-6)
  np.testing.assert_allclose((x / res.scale) @ res.w[0], x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4)


def test_tied_awq_searches_per_channel_scales_and_never_loses_to_rtn():
  x, w = conv_data(6)
  res = awq.awq(w, x, INT4, n_grid=20, clip=False, tied=8)
  s_c = res.scale[:8]
  np.testing.assert_array_equal(res.scale, np.tile(s_c, 9))          # one scale per channel, every position
  xbar = np.abs(x.astype(np.float64)).reshape(-1, 9, 8).mean((0, 1))
  want = np.maximum(xbar ** res.alpha, 1e-4)
  np.testing.assert_allclose(s_c, want / np.sqrt(want.max() * want.min()), rtol=1e-6)
  assert res.errors[int(round(res.alpha * 20))] <= res.errors[0]     # alpha = 0 is round-to-nearest
  np.testing.assert_allclose((x / res.scale) @ res.w_scaled, x @ w, rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match='not whole positions'):
    awq.awq(w, x, INT4, clip=False, tied=7)


def test_a_rotation_refuses_a_convolutions_im2col_features():
  x, w = conv_data(7)
  lay = layer.Layer(w, INT4, layer.stats_of(x), tied=8)
  with pytest.raises(ValueError, match="not to a convolution's im2col features"):
    registry.get('rotation').run(lay, kind='hadamard', seed=0)


# ------------------------------------------------------------------------------------------------ rotation


def test_hadamard_is_sylvesters_and_orthonormal():
  h = rotation.hadamard(8)
  want = np.array([[1]])
  for _ in range(3):
    want = np.kron(np.array([[1, 1], [1, -1]]), want)
  np.testing.assert_array_equal(h * np.sqrt(8), want)
  np.testing.assert_allclose(h @ h.T, np.eye(8), atol=1e-12)
  with pytest.raises(ValueError, match='power-of-two size, got 12'):
    rotation.hadamard(12)


@pytest.mark.parametrize('kind,n', [('hadamard', 64), ('random_hadamard', 64), ('random', 48), ('auto', 48)])
def test_rotation_is_exact_in_float_and_spreads_outliers(kind, n):
  x, w = data(3, n_in=n)
  w[5] *= 30.0  # one outlier input row of the kernel
  res = rotation.rotate(w, kind, seed=1)
  np.testing.assert_allclose(res.rotation @ res.rotation.T, np.eye(n), atol=1e-10)
  np.testing.assert_allclose((x @ res.rotation) @ res.w, x.astype(np.float64) @ w, rtol=1e-6, atol=1e-4)
  assert np.abs(res.w).max() < 0.5 * np.abs(w).max()  # the outlier is spread over the rows


# ----------------------------------------------------------------------------------------------------- AWQ


def test_awq_picks_the_brute_force_argmin_and_never_loses_to_rtn():
  x, w = data(4)
  res = awq.awq(w, x, INT4, n_grid=20, clip=False)
  xbar = np.abs(x.astype(np.float64)).mean(0)
  errs = []
  for i in range(21):  # the paper's search, written out: s = xbar^a normalised, W <- Q(W s) / s
    s = np.maximum(xbar ** (i / 20), 1e-4)
    s = s / np.sqrt(s.max() * s.min())
    errs.append(layer.output_error(x, w, np_rtn(w * s[:, None]) / s[:, None]))
  np.testing.assert_allclose(res.errors, errs, rtol=1e-3)
  assert res.alpha == np.argmin(errs) / 20
  assert res.alpha > 0  # the outlier channels make scaling worth it here
  w_eff = np.asarray(quantizers.dequantize(res.q)) / res.scale[:, None]
  assert layer.output_error(x, w, w_eff) <= layer.output_error(x, w, np_rtn(w)) * 0.9
  np.testing.assert_allclose((x / res.scale) @ res.w_scaled, x @ w, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('spec', [INT4, QuantSpec('int3', granularity='per_group', group_size=16),
                                  QuantSpec('int4', granularity='per_group', group_size=16, scheme='asymmetric',
                                            calibration='minmax')])
def test_awq_clip_search_lowers_each_groups_error(spec):
  x, w = data(5)
  plain = awq.awq(w, x, spec, clip=False)
  clipped = awq.awq(w, x, spec, clip=True)
  assert clipped.alpha == plain.alpha
  eff = lambda r: np.asarray(quantizers.dequantize(r.q)) / r.scale[:, None]
  assert layer.output_error(x, w, eff(clipped)) <= layer.output_error(x, w, eff(plain)) + 1e-6
  allowed = np.array([1 - j / 20 for j in range(10)], np.float32)
  assert np.all(np.isclose(clipped.clip_ratio[..., None], allowed).any(-1))
  assert np.any(clipped.clip_ratio < 1)  # some groups were clipped
  q = np.asarray(clipped.q.qvalue)
  assert q.min() >= spec.fmt.qmin and q.max() <= spec.fmt.qmax


# ------------------------------------------------------------------------------------------------ AdaRound


def test_adaround_regulariser_and_schedule_follow_the_paper():
  h = jnp.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(adaround.regularizer(h, 2.0), np.sum(1 - np.abs(2 * np.array(h) - 1) ** 2), rtol=1e-6)
  assert float(adaround.regularizer(jnp.array([0.0, 1.0, 1.0]), 20.0)) == 0.0
  v = jnp.array([-10.0, 0.0, 10.0])
  np.testing.assert_allclose(adaround.rectified_sigmoid(v), np.clip(1 / (1 + np.exp(-np.array(v))) * 1.2 - 0.1, 0, 1),
                             rtol=1e-6)
  frac = jnp.array([0.05, 0.3, 0.5, 0.9])
  np.testing.assert_allclose(adaround.rectified_sigmoid(adaround.init_v(frac)), frac, atol=1e-6)
  # 20% warm-up without the regulariser, then beta from 20 down to 2, linearly.
  for step, beta, on in [(0, 20.0, False), (199, 20.0, False), (200, 20.0, True), (600, 11.0, True),
                         (1000, 2.0, True)]:
    b, o = adaround.beta_schedule(step, 1000)
    assert bool(o) == on and float(b) == pytest.approx(beta)


def test_adaround_rounds_each_weight_up_or_down_and_beats_rtn():
  x, w = data(6, n_in=32, n_out=16, outliers=False)
  spec = QuantSpec('int3', granularity='per_channel')
  # lambda is relative to the reconstruction loss's scale (outputs of size ~10 here): 1.0 drives h to 0 or 1.
  res = adaround.adaround(w, x, spec, iters=1500, batch_size=64, lr=1e-2, reg_weight=1.0)
  q = np.asarray(res.q.qvalue, np.float64)
  s = np.asarray(res.q.scale)
  lo = np.floor(w / s)
  assert np.all((q == np.clip(lo, -4, 3)) | (q == np.clip(lo + 1, -4, 3)))
  assert np.mean(np.abs(2 * np.asarray(res.h) - 1) > 0.9) > 0.9  # the regulariser drove h to 0 or 1
  assert layer.output_error(x, w, res.w_hat) < 0.9 * layer.output_error(x, w, np_rtn(w, bits=3))


# ----------------------------------------------------------------------------------------- bias correction


def test_bias_correction_zeroes_the_mean_output_shift():
  x, w = data(7)
  x = x + 1.0  # a non-zero mean input
  b = np.random.default_rng(8).standard_normal(24)
  w_hat = np_rtn(w, bits=3)
  # In float64, where the identity mean(x) w_hat + b2 = mean(x) w + b holds to rounding: in float32 the mean and
  # the BLAS's summation order (which differs between CPUs) moved one output mean by 2.6e-6 on an AMD Zen 3.
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  b2 = bias_correction.bias_correction(w, w_hat, x.mean(0), b)
  np.testing.assert_allclose((x @ w_hat + b2).mean(0), (x @ w + b).mean(0), rtol=1e-9, atol=1e-9)
  assert np.abs((x @ w_hat + b).mean(0) - (x @ w + b).mean(0)).max() > 1e-2  # there was a shift to remove


def test_bias_correction_gives_a_bias_free_layer_a_bias():
  """No bias (a conv before BatchNorm): the method returns b' = E[x] . (w - w_hat) and says it is new; the mean
  output of x . w_hat + b' is the float layer's mean output."""
  x, w = data(9)
  x = x + 0.5
  lay = registry.get('bias_correction').run(layer.Layer(w, INT4, layer.stats_of(x)))
  w_hat = np.asarray(quantizers.dequantize(lay.q), np.float64)
  np.testing.assert_allclose(lay.bias, x.mean(0) @ (w - w_hat), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose((x @ w_hat + lay.bias).mean(0), (x @ w).mean(0), rtol=1e-5, atol=1e-5)
  assert dict(lay.notes)['bias_correction'] == 'the op had no bias: the correction is a new one'


def test_empirical_bias_correction_matches_the_float_models_mean_output():
  """Empirical: the layer's inputs x_q are the quantized model's (shifted), the target is the float model's mean
  output E[x_f . w + b]: b' = b + E[x_f . w + b] - E[x_q . w_hat + b] makes E[x_q . w_hat + b'] that target. The
  analytic correction on x_q would only remove this layer's own error."""
  x, w = data(11)
  b = np.random.default_rng(12).standard_normal(24)
  x_q = x + 0.3 * np.random.default_rng(13).standard_normal(x.shape[1])  # earlier layers' error: a mean shift
  y_float = (x @ w + b).mean(0)
  base = layer.Layer(w, INT4, layer.stats_of(x_q), bias=b, float_out_mean=y_float)
  lay = registry.get('bias_correction').run(base, empirical=True)
  w_hat = np.asarray(quantizers.dequantize(lay.q), np.float64)
  np.testing.assert_allclose((x_q @ w_hat + lay.bias).mean(0), y_float, rtol=1e-5, atol=1e-5)
  analytic = registry.get('bias_correction').run(base)
  assert np.abs((x_q @ w_hat + analytic.bias).mean(0) - y_float).max() > 0.1  # it leaves the inherited shift
  # without the float model's outputs (not sequential) empirical is the analytic correction, and says so
  plain = registry.get('bias_correction').run(base.replace(float_out_mean=None), empirical=True)
  np.testing.assert_array_equal(plain.bias, analytic.bias)
  assert 'analytic' in dict(plain.notes)['bias_correction_empirical']


# ----------------------------------------------------------------------------------------- registry, order


def test_registry_names_and_parameter_errors():
  assert set(registry.names()) >= {'rtn', 'gptq', 'awq', 'smoothquant', 'rotation', 'adaround', 'bias_correction'}
  with pytest.raises(ValueError, match="did you mean 'gptq'"):
    registry.get('gtpq')
  with pytest.raises(ValueError, match="no parameter 'alpah'.*did you mean 'alpha'"):
    registry.params('smoothquant', {'alpah': 0.8})
  assert registry.params('gptq', {'damp': 0.1}) == {'block_size': 128, 'damp': 0.1, 'act_order': False,
                                                    'static_groups': False}


@pytest.mark.parametrize('methods', [['rtn'], ['gptq'], ['awq'], ['smoothquant', 'gptq'], ['rotation', 'gptq'],
                                     ['rotation', 'smoothquant', 'gptq', 'bias_correction'],
                                     [('adaround', {'iters': 2000, 'lr': 1e-2, 'reg_weight': 1.0})],
                                     ['gptq', 'bias_correction']])
def test_composed_methods_keep_the_float_layer_and_give_an_integer_kernel(methods):
  x, w = data(9)
  b = np.zeros(24, np.float32)
  lay = pipeline.run(layer.Layer(w, INT4, layer.stats_of(x), bias=b), methods)
  xt = lay.transform_input(x)
  np.testing.assert_allclose(xt @ lay.w, x.astype(np.float64) @ w, rtol=1e-4, atol=2e-3)  # float unchanged
  w_hat = np.asarray(quantizers.dequantize(lay.q))
  rtn_err = layer.output_error(x, w, np_rtn(w))
  err = float(np.sum((xt @ w_hat + lay.bias - x @ w) ** 2))
  assert err <= rtn_err * (1.0 + 1e-6 if methods == ['rtn'] else 0.95), (err, rtn_err)


def test_wrong_orders_are_clear_errors():
  x, w = data(10)
  lay = layer.Layer(w, INT4, layer.stats_of(x))
  with pytest.raises(ValueError, match='rotation must come first'):
    pipeline.run(lay, ['smoothquant', 'rotation'])
  with pytest.raises(ValueError, match='before a rounding method'):
    pipeline.run(lay, ['gptq', 'smoothquant'])
  # Bias correction computed for RTN's kernel and served with GPTQ's or AdaRound's: refused, not silently worse.
  for rounding in ('gptq', 'adaround'):
    with pytest.raises(ValueError, match=f'bias_correction must come after {rounding}'):
      pipeline.run(lay, ['bias_correction', rounding])
  with pytest.raises(ValueError, match=r'before a rounding method or bias correction \(here bias_correction\)'):
    pipeline.run(lay, ['bias_correction', 'awq'])
  # A second rounding method silently discarded the first's integers (GPTQ's, then AdaRound's from scratch).
  for first, second in (('gptq', 'adaround'), ('rtn', 'gptq'), ('adaround', 'gptq'), ('gptq', 'gptq')):
    with pytest.raises(ValueError, match=f'^{first} and {second} both choose the integer weights'):
      pipeline.run(lay, [first, second])
  pipeline.check_order(['rotation', 'awq', 'gptq', 'bias_correction'])  # AWQ's scaling stays under GPTQ's rounding


def test_statistics_merge_equals_one_pass():
  x, _ = data(11, n=300)
  a = layer.merge(layer.stats_of(x[:100]), layer.stats_of(x[100:]), max_sample=64)
  b = layer.stats_of(x)
  np.testing.assert_allclose(a.xtx, b.xtx, rtol=1e-10)
  np.testing.assert_allclose(a.x_absmax, b.x_absmax)
  assert a.n == 300 and len(a.sample) == 64


def test_gptq_falls_back_to_rtn_when_no_dampening_helps():
  x, w = data(12, n_in=8, n_out=4)
  st = layer.stats_of(x)
  bad = layer.Stats(st.n, -np.eye(8) * st.n, st.x_sum, st.x_abs_sum, st.x_absmax, st.sample)  # negative definite
  lay = pipeline.run(layer.Layer(w, INT4, bad), [('gptq', {})])
  np.testing.assert_array_equal(np.asarray(lay.q.qvalue), np.asarray(layer.rtn(w, INT4).qvalue))
  assert 'fell back to RTN' in dict(lay.notes)['gptq']
