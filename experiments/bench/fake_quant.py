r"""The fake_quant suite: fake_quant against `x * 1.0` on one f32 array, and optionally its two halves and the
forward as it was before the speed-ups of docs/benchmarks.md.

    python -m experiments.bench --config=configs/bench_fake_quant.py [--workdir=runs/bench/fake_quant]
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

import qjax
from experiments.bench import harness as bench
from experiments.config import cli as config_cli
from qjax import formats
from qjax import granularity as gran


def entry_ops(compiled_text: str) -> list[str]:
  """The top-level operations of a compiled HLO module's ENTRY computation (fusions, custom calls, ...) with
  their output shapes, e.g. 'fusion:kLoop f32[4096,4096]': a rough count of the passes over memory."""
  entry = compiled_text.split('\nENTRY ', 1)[-1]
  ops = []
  for line in entry.splitlines()[1:]:
    line = line.strip()
    if not line or line == '}' or '=' not in line:
      continue
    rhs = line.split('=', 1)[1].strip()
    # 'f32[4096,4096]{1,0} fusion(%x), kind=kLoop, ...' -> 'fusion:kLoop'
    parts = rhs.split(' ', 1)
    op = parts[1].split('(', 1)[0] if len(parts) > 1 else rhs
    if op in ('parameter', 'constant', 'bitcast', 'tuple', 'get-tuple-element'):
      continue
    kind = ''
    if 'kind=' in rhs:
      kind = ':' + rhs.split('kind=', 1)[1].split(',', 1)[0].split('}', 1)[0]
    if '__ynn_fusion' in rhs:
      kind += ':ynn'
    shape = re.sub(r'\{[^}]*\}', '', parts[0]) if len(parts) > 1 else ''  # Layouts dropped.
    ops.append(f'{op}{kind} {shape}'.strip())
  return ops


@bench.register('fake_quant')
def fake_quant_suite(config) -> bench.Suite:
  """fake_quant(x, QuantSpec(**config.quant)) against `x * 1.0` (XLA folds it to a copy: one read, one write),
  both jitted, on an f32 array of config.shape. With config.extra_variants also the two halves of
  fake_quant: calibration alone and fake_quant at a given scale; with config.before the forward as it was
  before the speed-ups of docs/benchmarks.md."""

  shape = tuple(config.shape)
  x = jax.random.normal(jax.random.key(config.get('seed', 0)), shape, jnp.float32)
  spec = qjax.QuantSpec(**config_cli.to_dict(config.quant))
  jits = {
      'x * 1.0': jax.jit(lambda x: x * 1.0),
      'fake_quant': jax.jit(lambda x: qjax.fake_quant(x, spec)),
  }
  args = {'x * 1.0': (x,), 'fake_quant': (x,)}
  if config.get('extra_variants', False):
    scale, zero_point = jax.jit(lambda x: qjax.calibrate(x, spec))(x)
    jits['calibrate only'] = jax.jit(lambda x: qjax.calibrate(x, spec))
    jits['fake_quant, scale given'] = jax.jit(
        lambda x, s, z: qjax.fake_quant(x, spec, {'scale': s, **({} if z is None else {'zero_point': z})}))
    args['calibrate only'] = (x,)
    args['fake_quant, scale given'] = (x, scale, zero_point)
  if config.get('before', False):
    jits['fake_quant before (e1c5dff)'] = jax.jit(lambda x: _fake_quant_before(x, spec))
    args['fake_quant before (e1c5dff)'] = (x,)
  meta = {'shape': list(shape), 'dtype': 'float32', 'spec': spec.to_dict(), 'array_mib': x.nbytes / 2 ** 20,
          'entry_ops': {name: entry_ops(f.lower(*args[name]).compile().as_text()) for name, f in jits.items()}}
  fns = {name: (lambda f=f, a=args[name]: f(*a)) for name, f in jits.items()}
  return bench.Suite(fns, baseline='x * 1.0', meta=meta)


def _fake_quant_before(x, spec):
  """The forward of fake_quant as of commit e1c5dff (symmetric absmax, integer formats), for before/after
  timings: absmax over a masked copy of x, x / scale, and a round trip through the int8 container."""

  fmt = spec.fmt
  if not isinstance(fmt, formats.IntFormat) or spec.scheme != 'symmetric' or spec.calibration != 'absmax':
    raise ValueError('config.before needs a symmetric absmax integer spec')
  sshape = gran.scale_shape(x.shape, spec)
  amax = gran.reduce(jnp.abs(jnp.where(jnp.isfinite(x), x, 0.0)), sshape, jnp.max)
  scale = amax / fmt.qmax
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  s = gran.expand(scale, x.shape)
  y = x / s
  q = jnp.where(jnp.isnan(y), 0.0, jnp.clip(jnp.round(y), fmt.qmin, fmt.qmax)).astype(fmt.container)
  return jnp.where(jnp.isnan(x), x, q.astype(jnp.float32) * s)
