"""The qmatmul suite: qjax.ops.dot_general forward (dynamic int8, serving with pre-quantized int8 weights) against
f32, and the small-M routing.

    python -m experiments.bench --config=configs/bench_qmatmul.py [--workdir=runs/bench/qmatmul]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

import qjax
from experiments.bench import harness as bench
from experiments.bench.groups import (
  DN,
  Group,
  GroupedSuite,
  Target,
  Variant,
  matmul_operands,
  matmul_shapes,
  maybe_inspect,
  parse_shape,
  shape_name,
)
from qjax.ops import config as qconfig
from qjax.ops import dot_general as qdot_general

NT = (((1,), (1,)), ((), ()))  # (M, K) . (N, K)^T


@bench.register('qmatmul')
def qmatmul_suite(config) -> GroupedSuite:
  """qjax.ops.dot_general forward at each shape against f32:
    dynamic int8       int8_dynamic(bwd_bits=None): per-row activation and per-column weight absmax scales computed
                       in the call, int8 x int8 -> int32, rescale (small-M rows routed to float by default)
    serving int8 W     the weight pre-quantized outside the jit (a QArray, int8 per output column); only the
                       activations are quantized in the call
    serving int8 W, stored (N, K)
                       the same weight stored transposed, as qjax.flax serves a Dense kernel (ServingWeight
                       .transposed): the op sees a transposed view (QArray.minor_dim) and multiplies it as stored
    int8 dot alone     (reference) the bare int8 x int8 -> int32 dot of pre-quantized operands, no rescale
  and for the small-M shapes (config.small_m rows) also both qjax variants on the other side of the routing
  decision ('contrast'): forced int8 (small_m=0) where rows <= small_m, else routed to float (small_m=rows);
  and two other decode formulations ('contrast'): the f32 dot of the int8 weight converted in the program
  (dequantize in the matmul) and the int8 product as an int32 multiply-and-reduce (a GEMV without the GEMM);
  and the two bare int8 products over the weight stored (N, K) ('reference'), w . x^T and x . w^T, between which
  qjax.ops.dot_general.weight_as_lhs chooses by rows and CPU."""


  cfg = qconfig.int8_dynamic(bwd_bits=None)
  if config.get('small_m_threshold', -1) >= 0:
    cfg = dataclasses.replace(cfg, small_m=int(config.small_m_threshold))
  wspec = qjax.QuantSpec(format='int8', granularity='per_channel', axis=1)
  dyn_target = {parse_shape(s) for s in config.get('dynamic_target_shapes', ())}
  small_rows = set(config.get('small_m', ()))

  def qfn(c):
    return jax.jit(lambda x, w: qdot_general(x, w, DN, config=c))

  def groups():
    for m, k, n in matmul_shapes(config):
      x, w = matmul_operands(m, k, n, config.get('seed', 0))
      wq = jax.jit(lambda w: qjax.quantize(w, wspec))(w)
      xq = jax.jit(lambda x: qjax.quantize(x, qjax.QuantSpec(format='int8', granularity='per_channel', axis=0)))(x)
      f32 = jax.jit(lambda a, b: lax.dot_general(a, b, DN))
      i8 = jax.jit(lambda a, b: lax.dot_general(a, b, DN, preferred_element_type=jnp.int32))
      routed = m <= cfg.small_m
      route = f'float (rows {m} <= small_m={cfg.small_m})' if routed else 'int8'
      variants = {
          'f32': Variant(lambda x=x, w=w, f=f32: f(x, w), 'baseline', {'inspect': maybe_inspect(config, f32, x, w)}),
      }
      fd, fs = qfn(cfg), qfn(cfg)
      variants['dynamic int8'] = Variant(lambda x=x, w=w, f=fd: f(x, w), 'quantized',
                                         {'inspect': maybe_inspect(config, fd, x, w), 'route': route,
                                          'routed_to_float': routed, 'small_m': cfg.small_m})
      variants['serving int8 W'] = Variant(lambda x=x, w=wq, f=fs: f(x, w), 'quantized',
                                           {'inspect': maybe_inspect(config, fs, x, wq), 'route': route,
                                            'routed_to_float': routed, 'small_m': cfg.small_m})
      wt = dataclasses.replace(wq, qvalue=jnp.asarray(jnp.transpose(wq.qvalue)))   # stored (N, K)
      ft = jax.jit(lambda x, q, c=cfg: qdot_general(
          x, dataclasses.replace(q, qvalue=jnp.transpose(q.qvalue), minor_dim=0), DN, config=c))
      variants['serving int8 W, stored (N, K)'] = Variant(lambda x=x, w=wt, f=ft: f(x, w), 'quantized',
                                                          {'inspect': maybe_inspect(config, ft, x, wt),
                                                           'route': route, 'routed_to_float': routed,
                                                           'small_m': cfg.small_m})
      # Small-M shapes also time the other side of the routing decision ('contrast'), so the benchmark shows
      # whether the threshold picks the faster path on this machine.
      if routed:
        alt, alt_name, alt_route = dataclasses.replace(cfg, small_m=0), 'small_m=0', 'int8 (forced)'
      elif m in small_rows:
        alt, alt_name, alt_route = dataclasses.replace(cfg, small_m=m), f'small_m={m}', f'float (rows {m}, forced)'
      else:
        alt = None
      if alt is not None:
        gd, gs = qfn(alt), qfn(alt)
        for name, f, wv in (('dynamic int8', gd, w), ('serving int8 W', gs, wq)):
          variants[f'{name}, {alt_name}'] = Variant(
              lambda x=x, w=wv, f=f: f(x, w), 'contrast',
              {'inspect': maybe_inspect(config, f, x, wv), 'route': alt_route, 'routed_to_float': not routed,
               'small_m': alt.small_m})
      if m in small_rows:  # other decode formulations, measured against the ones qjax uses
        scale = wq.scale.reshape(-1)
        deq = jax.jit(lambda x, q, s=scale: lax.dot_general(x, q.astype(jnp.float32), DN) * s)
        gemv = jax.jit(lambda x, q: jnp.sum(x[:, :, None].astype(jnp.int32) * q[None].astype(jnp.int32), axis=1))
        variants['dequantize-in-the-matmul (f32 dot of int8 W)'] = Variant(
            lambda x=x, q=wq.qvalue, f=deq: f(x, q), 'contrast', {'inspect': maybe_inspect(config, deq, x, wq.qvalue)})
        variants['int8 GEMV as an int32 reduction'] = Variant(
            lambda a=xq.qvalue, q=wq.qvalue, f=gemv: f(a, q), 'contrast')
        # The two int8 products over a weight stored (N, K), one row padded to two as qjax pads it: the weight
        # as the GEMM's lhs or as x . w^T (qjax.ops.dot_general.weight_as_lhs picks one per row count and CPU).
        xp = xq.qvalue if m > 1 else jnp.pad(xq.qvalue, ((0, 1), (0, 0)))
        for name, prod in (('w . x^T', lambda a, b: lax.dot_general(b, a, NT, preferred_element_type=jnp.int32)),
                           ('x . w^T', lambda a, b: lax.dot_general(a, b, NT, preferred_element_type=jnp.int32))):
          f = jax.jit(prod)
          variants[f'int8 dot, stored (N, K): {name}'] = Variant(
              lambda a=xp, b=wt.qvalue, f=f: f(a, b), 'reference', {'inspect': maybe_inspect(config, f, xp, wt.qvalue)})
      variants['int8 dot alone'] = Variant(lambda a=xq.qvalue, b=wq.qvalue, f=i8: f(a, b), 'reference',
                                           {'inspect': maybe_inspect(config, i8, xq.qvalue, wq.qvalue)})
      targets = []
      if (m, k, n) in dyn_target:
        targets.append(Target('dynamic int8', 0.4, 'forward-only dynamic int8 >= 2.5x faster than f32'))
      if m >= 256:
        targets.append(Target('serving int8 W', 1 / 3, 'serving with pre-quantized int8 weights, M >= 256: '
                                                        '>= 3.0x faster than f32'))
      yield Group(shape_name(m, k, n), variants, 'f32',
                  {'shape': [m, k, n], 'rows': m, 'small_m': cfg.small_m, 'routed_to_float': routed},
                  tuple(targets))

  meta = {'config': cfg.to_dict(), 'weight_spec': wspec.to_dict()}
  return GroupedSuite('qmatmul', groups, meta=meta)
