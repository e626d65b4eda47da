"""Serving: the storage form of quantized weights, and reading them back while a converted model runs.

A converted model stores each quantized weight as a ServingWeight in the param's own layout: its qvalues
(int8, or int4 packed two per byte), scale and zero point, with x ~ (qvalue - zero_point) * scale. While the
model runs, reading such a param gives the dequantized float (so any code the model runs on it works: gathers,
`.T`, `jnp.asarray`), registered as a provenance root; a hooked op whose operand traces back to it replays the
operand's shape ops on the qvalues and scale (qjax.flax.provenance.forward) and runs the integer op. XLA drops
the dequantized float where nothing else reads it.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint

from qjax import formats, packing, quantizers
from qjax.flax import provenance

_tls = threading.local()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ServingWeight:
  """The storage form of a weight's QArray for serving: its int8 qvalues (or 2/3/4-bit values packed), scale,
  zero point and format, plus the weight's shape and sharding names. `from_qarray` packs, `to_qarray` unpacks:
  inside the ops a served weight is the QArray again (x ~ (qvalue - zero_point) * scale).

  Replaces a float kernel in a converted parameter tree, so that no float kernel is left.
  """
  qvalue: jax.Array                    # int8 (shape of the weight) or uint8 packed along pack_axis (qjax.packing)
  scale: jax.Array
  zero_point: jax.Array | None
  format: str = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  packed: bool = dataclasses.field(default=False, metadata=dict(static=True))
  names: tuple | None = dataclasses.field(default=None, metadata=dict(static=True))  # the weight's sharding
  pack_axis: int = dataclasses.field(default=0, metadata=dict(static=True))
  # A 2-D weight contracted along dim 0 (a Dense kernel (in, out)) is stored transposed, (out, in): XLA:CPU's int8
  # GEMM runs a few rows against it 2-3x faster as the GEMM's lhs (with VNNI; without it the fewest rows run as
  # x . w^T over it, 1.3-2.1x faster than as the lhs), and many rows no slower (qjax.ops.dot_general
  # .weight_as_lhs). qvalue (and pack_axis) are then in the stored order; shape, scale and zero_point
  # stay in the weight's own layout.
  transposed: bool = dataclasses.field(default=False, metadata=dict(static=True))
  codebook: tuple[float, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))  # its levels

  def partition_specs(self) -> ServingWeight:
    """A ServingWeight of PartitionSpecs (for jax.device_put / jit shardings) from the float weight's sharding
    names: qvalue keeps them, scale and zero_point have None on their reduced (size-1) axes."""
    P = jax.sharding.PartitionSpec
    if self.names is None:
      return dataclasses.replace(self, qvalue=P(), scale=P(), zero_point=None if self.zero_point is None else P())
    sn = P(*scale_names(self.names, self.shape, _shape(self.scale)))
    qn = P(*(self.names[::-1] if self.transposed else self.names))
    return dataclasses.replace(self, qvalue=qn, scale=sn, zero_point=None if self.zero_point is None else sn)

  def __getitem__(self, idx):  # nnx layers read kernels as `self.kernel[...]`
    x = read(self)
    return x if idx is Ellipsis else x[idx]

  def __jax_array__(self):
    return read(self)

  @property
  def T(self):  # noqa: N802 (numpy's name)
    return read(self).T

  def transpose(self, *axes):
    return read(self).transpose(*axes)

  def reshape(self, *shape):
    return read(self).reshape(*shape)

  def astype(self, dtype):
    return read(self).astype(dtype)

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def dtype(self):
    return jnp.float32

  @classmethod
  def from_qarray(cls, q: quantizers.QArray, pack: bool = False, names: tuple | None = None,
                  transpose: bool | None = None) -> ServingWeight:
    """Stores QArray q (packing 2-, 3- or 4-bit qvalues densely when `pack`, along the axis that pads least among
    the axes the weight's sharding leaves unnamed; qjax.packing). `transpose`: store a 2-D weight transposed
    (default `contracts_dim0(q)`)."""
    shape = tuple(q.qvalue.shape)
    transpose = contracts_dim0(q) if transpose is None else bool(transpose and len(shape) == 2)
    v = jnp.transpose(q.qvalue) if transpose else q.qvalue
    stored_names = None if names is None else (tuple(names)[::-1] if transpose else tuple(names))
    if not pack:
      return cls(v, q.scale, q.zero_point, q.format, shape, False, names, 0, transpose, q.codebook)
    bits = packing.width(q.fmt)
    axis = packing.best_axis(v.shape, bits, tuple(i for i in range(v.ndim)
                                                  if not stored_names or stored_names[i] is None))
    return cls(packing.pack(v, bits, axis), q.scale, q.zero_point, q.format, shape, True, names, axis, transpose,
               q.codebook)

  def to_qarray(self) -> quantizers.QArray:
    """The weight's QArray in its own layout (a transposed view of the stored values when `transposed`)."""
    stored = self.shape[::-1] if self.transposed else self.shape
    bits = packing.width(formats.parse_format(self.format, self.codebook)) if self.packed else None
    q = packing.unpack(self.qvalue, bits, stored, self.pack_axis) if self.packed else self.qvalue
    if self.packed and jax.default_backend() == 'cpu':
      # The unpacked int8 kernel is materialised once, row-major: left to layout assignment, the unpacking's
      # output took a layout that made XLA:CPU up-cast the 3x3 int8 convs of a W4 ResNet to s32 (its serving
      # forward ran 8x slower than float at batch 500); dots and 1x1 convs kept their int8 kernel either way.
      q = with_layout_constraint(lax.optimization_barrier(q), Layout(major_to_minor=tuple(range(q.ndim))))
    if self.transposed:
      return quantizers.QArray(jnp.transpose(q), self.scale, self.zero_point, self.format, self.codebook,
                               minor_dim=0)
    return quantizers.QArray(q, self.scale, self.zero_point, self.format, self.codebook)


def contracts_dim0(q: quantizers.QArray) -> bool:
  """Whether a weight is served transposed by default: 2-D int8-held values whose scale and zero point are
  constant along dim 0 (per output channel or per tensor: the layout of a Dense kernel contracted along dim 0).
  uint8-held (asymmetric) values are not: the op shifts them to int8 first, which would copy the view."""
  return (q.qvalue.ndim == 2 and q.qvalue.dtype == jnp.int8 and q.scale.shape[0] == 1
          and (q.zero_point is None or q.zero_point.shape[0] == 1))


class ConversionError(ValueError):
  """A quantized model has no serving form as the rules stand (a weight whose quantizer has no integer grid, e.g.
  DoReFa, or one that cannot be stored back in its param's layout, or a tied weight quantized two ways)."""

def _shape(a) -> tuple[int, ...]:
  return tuple(getattr(a, 'value', a).shape)  # a Linen Partitioned box holds its array as .value


def scale_names(names, weight_shape, scale_shape) -> tuple:
  """Sharding names of a weight's scale: the weight's names, None on the axes the scale reduces (size 1)."""
  return tuple(None if s == 1 and w != 1 else n for n, w, s in zip(names, weight_shape, scale_shape, strict=True))


def pack_int4(q: jax.Array) -> jax.Array:
  """Packs int8 values in [-8, 7] two per byte along axis 0 (odd sizes padded): (n, ...) -> (ceil(n/2), ...)."""
  return packing.pack(q, 4)


def unpack_int4(p: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Inverse of pack_int4: sign-extends each nibble back to int8."""
  return packing.unpack(p, 4, shape)


def is_serving(x) -> bool:
  return isinstance(x, ServingWeight)


def _roots() -> dict:
  if not hasattr(_tls, 'roots'):
    _tls.roots = {}
  return _tls.roots


def read(sw: ServingWeight, path: str | None = None) -> jax.Array:
  """The dequantized float of a served weight, remembered (by identity) as that weight (stored at `path` in
  the params tree, when the caller knows it) for the hooks."""
  x = sw.to_qarray().dequantize(jnp.float32)
  _roots()[id(x)] = (sw, x, path)  # x is kept alive, so its id stays unique while the model runs
  return x


def served(x) -> tuple[ServingWeight, str | None] | None:
  """(the ServingWeight whose `read` returned x, its path or None), if any."""
  hit = _roots().get(id(x))
  return (hit[0], hit[2]) if hit is not None and hit[1] is x else None


def clear() -> None:
  """Forgets the floats read (the outermost quantized call returned)."""
  _roots().clear()


# ------------------------------------------------------------------------------------------- conversion


def quantize_uses(records, problems: dict, stored_shape=None) -> list:
  """Inside the conversion's compiled run: per weight record, its operand quantized as the QAT forward did (same
  spec and quantizer state), brought back to the param's stored layout (provenance.backward). Returns one QArray
  or None per record that has a weight; for None, problems[i] (i counting weight records) says why: a use that
  cannot be stored (a broadcast or slice of the param), or ('stacked', shape) when `stored_shape(path)`, the
  param's shape in the model, differs from the shape the op saw (one layer of weights stacked for nnx.scan,
  seen inside the scan's own trace, which is left untouched)."""
  out = []
  for r in [r for r in records if r.weight_name is not None]:
    i = len(out)
    out.append(None)
    if stored_shape is not None and tuple(stored_shape(r.weight_name)) != tuple(r.origin.shape):
      problems[i] = ('stacked', tuple(r.origin.shape))
    elif not r.origin.invertible:
      problems[i] = f'it reaches the op through {r.origin.describe()}, which cannot be undone to store it'
    else:
      try:
        q = quantizers.quantize(r.x, r.spec, dict(r.state) or None, poison=True)  # NaN / inf serve NaN
        out[i] = provenance.backward(r.origin, q)
      except ValueError as e:
        problems[i] = str(e)
  return out


def merge_uses(records, qarrays, problems: dict) -> dict:
  """{param path: (QArray in the param's layout, [records of its uses])}. A param used by several quantized ops
  (a tied embedding) is stored once: its uses must quantize it identically (same format, scale shape and
  values), else ValueError naming the rules and use sites."""
  uses: dict = {}
  for i, (r, q) in enumerate(zip([r for r in records if r.weight_name is not None], qarrays, strict=True)):
    if i in problems:
      q = problems[i]
      raise ConversionError(f'convert: the weight {r.weight_name} used at {r.path or "<root>"} ({r.prefix}, rule '
                       f'{r.rule!r}) cannot be converted: {q}; keep that op in float with a keep_float=True rule')
    uses.setdefault(r.weight_name, []).append((r, q))
  out = {}
  for path, items in uses.items():
    (r0, q0), rest = items[0], items[1:]
    for r, q in rest:
      same = (r.spec.format == r0.spec.format and q.scale.shape == q0.scale.shape
              and (q.zero_point is None) == (q0.zero_point is None)
              and np.array_equal(np.asarray(q.qvalue), np.asarray(q0.qvalue))
              and np.array_equal(np.asarray(q.scale), np.asarray(q0.scale)))
      if not same:
        sites = '; '.join(f'{x.path or "<root>"} {x.prefix} (rule {x.rule!r}: {x.spec.format}/{x.spec.granularity}, '
                          f'scale shape {tuple(y.scale.shape)} in the param layout)' for x, y in items)
        raise ConversionError(f'convert: the weight {path} is shared by {len(items)} quantized ops that quantize it '
                         f'differently, and a served weight is stored once: {sites}. Give its uses one rule and '
                         'spec (the same channel axes), or keep all but one in float')
    out[path] = (q0, [r for r, _ in items])
  return out


# ---------------------------------------------------------------------------------------- the result


class Served(Mapping):
  """What `convert_linen` and `convert_nnx` return: a converted model ready to serve, in the same shape for Linen
  and NNX.

    served = convert_linen(qmodel, variables, x)     # or: served = convert_nnx(qmodel_or_model, x)
    y = served(x)                                    # the serving forward (jit-compiled, int8 matmuls)
    print(served.report())                           # every served weight: format, layout, bytes
    served.weights                                   # {param path: ServingWeight}
    served.variables                                 # what to checkpoint: the serving variables

  `model` is what runs: a QuantizedLinen in serve mode (`served.model.apply(served.variables, x)`) or the NNX
  model, converted in place. For Linen, a Served is also the serving variables mapping itself (`served['params']`,
  `qmodel.serving().apply(served, x)`, a pytree for jax.jit and checkpointers), as convert_linen returned before.
  """

  def __init__(self, framework: str, model, variables, paths: tuple[str, ...]):
    self.framework = framework
    self.model = model
    self.variables = variables
    self.paths = tuple(paths)
    self._jitted: dict = {}

  # Mapping over the serving variables
  def __getitem__(self, key):
    return self.variables[key]

  def __iter__(self):
    return iter(self.variables)

  def __len__(self) -> int:
    return len(self.variables)

  def __repr__(self) -> str:
    return f'Served({self.framework}, {len(self.paths)} served weights)'

  @property
  def weights(self) -> dict[str, ServingWeight]:
    """{param path: ServingWeight} of every served weight (a tied weight once)."""
    if self.framework == 'nnx':
      found = {'/'.join(map(str, p)): v.get_value() for p, v in nnx.iter_graph(self.model)
               if isinstance(v, nnx.Variable)}
      return {p: found[p] for p in self.paths}
    out = {}
    for p in self.paths:
      node = self.variables['params']
      for k in p.split('/'):
        node = node[k]
      out[p] = node
    return out

  def __call__(self, *args, **kwargs):
    """The serving forward on inputs, jit-compiled once per input structure (array leaves traced, other leaves
    static): Linen `model.apply(variables, *args, **kwargs)`, NNX `model(*args, **kwargs)`."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    idx = tuple(i for i, a in enumerate(leaves) if isinstance(a, (jax.Array, np.ndarray)))
    static = tuple(a for i, a in enumerate(leaves) if i not in idx)
    try:
      key = (treedef, idx, static)
      hash(key)
    except TypeError:
      key = None
    fn = self._jitted.get(key) if key is not None else None
    if fn is None:
      def call(state, arrays):
        full = list(leaves)
        for i, a in zip(idx, arrays, strict=True):
          full[i] = a
        a, k = jax.tree.unflatten(treedef, full)
        if self.framework == 'nnx':
          return nnx.merge(state[0], state[1])(*a, **k)
        return self.model.apply(state, *a, **k)
      fn = jax.jit(call)
      if key is not None:
        self._jitted[key] = fn
    if self.framework == 'nnx':
      state = nnx.split(self.model)
      return fn((state[0], state[1]), [leaves[i] for i in idx])
    return fn(self.variables, [leaves[i] for i in idx])

  def report(self) -> str:
    """One line per served weight: path, format, stored shape (packing), scale shape, bytes as served vs float32;
    then the totals."""
    lines, tot_q, tot_f = [], 0, 0
    for p, sw in self.weights.items():
      nq = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in (sw.qvalue, sw.scale, sw.zero_point)
               if a is not None)
      nf = 4 * int(np.prod(sw.shape))
      tot_q, tot_f = tot_q + nq, tot_f + nf
      lines.append(f'{p:40s} {sw.format:6s} shape {tuple(sw.shape)}{" packed" if sw.packed else ""}  scale '
                   f'{tuple(sw.scale.shape)}  {nq} bytes (float32 {nf})')
    lines.append(f'{len(self.paths)} served weights: {tot_q} bytes (float32 {tot_f})')
    return '\n'.join(lines)


jax.tree_util.register_pytree_with_keys(
    Served,
    lambda s: (((jax.tree_util.GetAttrKey('variables'), s.variables),), (s.framework, s.model, s.paths)),
    lambda aux, children: Served(aux[0], aux[1], children[0], aux[2]))
