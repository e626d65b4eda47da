"""Which matmuls really run in low precision: dot_general and convolution ops of a jitted function, read from HLO.

A leaf module (it imports no other part of qjax): a reader of HLO text, not an op. `qjax.ops` re-exports
`inspect_matmuls`, `MatmulOp` and `MatmulReport`; `qjax.ops.inspect` is the older name of this module.

    report = inspect_matmuls(loss, x, w)         # jax.jit(loss).lower(x, w), then .compile()
    print(report.summary())
    assert report.n_int8_fast == report.n_compiled

Two views of the same function:

  lowered   the StableHLO that JAX emits (`jax.jit(fn).lower(...).as_text()`): what the program asks for, e.g.
            `i8 x i8 -> i32`. Counted by category (int8, fp8, bf16, f32, ...).
  compiled  the optimised HLO of the backend (`.compile().as_text()`): what really runs. A dot or convolution is
            'widened' when the compiler feeds it through its own `convert` to a wider type (an s8 dot run as
            s32 x s32, an fp8 dot run in f32); on XLA:CPU it is 'fast' when it sits inside a fusion of kind
            `__ynn_fusion` (YNNPACK), the only kernel where int8 beats f32. An s8 dot off YNN runs on XLA's
            generic loop at a fraction of f32 speed.

On GPU a matmul is 'fast' when it runs on a tensor-core library or generated GEMM kernel: a cuBLAS / cuBLASLt /
cuDNN custom call (`__cublas$gemm`, `__cublas$lt$matmul`, `__cublas$lt$matmul$f8`, ...) or a Triton GEMM fusion
(`__triton_gemm`, ...). A dot left as a plain HLO `dot` (XLA's elemental loop emitter) or one whose int8 / fp8
operands the compiler widened lost the low-precision speed; `MatmulOp.fallback` then says the likely reason
(cuBLAS wants int8 dims that are multiples of 4 and fp8 dims that are multiples of 16; qjax's real matmuls pad
to 16 on GPU, see qjax.ops.dot_general). On TPU (MXU) fast-kernel counts are None.

The report also lists the compiled program's cross-device collectives (all-reduce, all-gather, ...), so a
sharded quantized matmul can be checked for collectives the quantization added.

Where each matmul comes from is its op_name metadata: `jvp()/dot_general` is a forward matmul under autodiff,
`transpose(jvp())/dot_general` one of the backward matmuls (dlhs/drhs); `source` is the innermost frame outside
qjax and installed packages (the call site in the researcher's code) when the HLO carries locations.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any

import jax

STAGES = ('lowered', 'compiled')
# Fusion kinds (backend_config fusion_config.kind) on XLA:CPU whose dots run on a low-precision library kernel.
CPU_FAST_KINDS = ('__ynn_fusion',)
# XLA:GPU fusion kinds and custom-call targets of tensor-core GEMM kernels (Triton-generated, cuBLAS(Lt), cuDNN).
GPU_FAST_KINDS = ('__triton_gemm', '__triton_nested_gemm_fusion', '__triton_scaled_dot_fusion', '__cudnn$fusion',
                  '__triton')
_GPU_LIBRARY_TARGET = re.compile(r'cublas|cudnn', re.I)
# Platforms where MatmulOp.fast is defined (True/False); None elsewhere.
FAST_PLATFORMS = ('cpu', 'gpu', 'cuda', 'rocm')
# Alignment that cuBLAS(Lt) asks of low-precision GEMM dims: int8 leading dims multiples of 4, fp8 of 16.
GPU_ALIGN = {'int8': 4, 'fp8': 16}
# Custom-call targets that are matmuls or convolutions (GPU cuBLAS/cuDNN, CPU oneDNN).
_MATMUL_TARGET = re.compile(r'gemm|matmul', re.I)
_CONV_TARGET = re.compile(r'conv', re.I)
_MATMUL_PRIMITIVES = ('dot_general', 'conv_general_dilated', 'dot', 'convolution')
# Not 'bitcast-convert': it reinterprets bits (qjax.ops.conv_gemm moves int8 patches as uint32 words), so the
# operand runs in its result type whatever came before it.
_PASS_THROUGH = ('bitcast', 'copy', 'transpose', 'reshape', 'broadcast')


# ------------------------------------------------------------------------------------------------ dtypes


def _bits(dtype: str) -> int:
  """Bit width from an HLO element type name: s8 -> 8, f8e4m3fn -> 8, bf16 -> 16, pred -> 0."""
  m = re.search(r'(\d+)', dtype)
  return int(m.group(1)) if m else 0


def _is_int(dtype: str) -> bool:
  return bool(re.fullmatch(r'[su]\d+', dtype))


def category(lhs: str, rhs: str) -> str:
  """The precision class of a matmul from its operand element types (HLO names: s8, u8, f8e4m3fn, bf16, f32).

  'int8' (both integers of <= 8 bits), 'fp8', 'fp4', 'bf16', 'f16', 'f32', 'f64', 'int' (wider integers),
  'mixed' otherwise.
  """
  if _is_int(lhs) and _is_int(rhs):
    return 'int8' if max(_bits(lhs), _bits(rhs)) <= 8 else 'int'
  for prefix, name in (('f8', 'fp8'), ('f4', 'fp4')):
    if lhs.startswith(prefix) and rhs.startswith(prefix):
      return name
  if lhs == rhs and lhs in ('bf16', 'f16', 'f32', 'f64'):
    return lhs
  return 'mixed'


def _mlir_dtype(t: str) -> str:
  """MLIR element type -> HLO name: i8 -> s8, ui8 -> u8, i1 -> pred, f8E4M3FN -> f8e4m3fn."""
  if t == 'i1':
    return 'pred'
  if re.fullmatch(r'ui\d+', t):
    return 'u' + t[2:]
  if re.fullmatch(r'i\d+', t):
    return 's' + t[1:]
  return t.lower()


# ------------------------------------------------------------------------------------------------ report


@dataclasses.dataclass(frozen=True)
class MatmulOp:
  """One dot_general or convolution of the lowered or compiled program.

  Attributes:
    stage: 'lowered' (StableHLO from JAX) or 'compiled' (the backend's optimised HLO).
    op: 'dot' or 'conv'.
    op_name: the op_name metadata, e.g. 'jit(loss)/transpose(jvp())/dot_general' ('' when the compiler dropped it).
    source: 'file.py:line (function)' of the innermost frame in the caller's code, '' when unknown.
    lhs, rhs, out: element types as the op runs them, in HLO names (s8, s32, u8, f8e4m3fn, bf16, f32, ...).
    lhs_shape, rhs_shape, out_shape: the shapes.
    lhs_from, rhs_from: compiled only: the element type before compiler-inserted widening converts (== lhs/rhs
      when the compiler did not widen the operand).
    fusion: compiled only: the kernel around the op: the fusion kind ('__ynn_fusion', 'kLoop', '__triton_gemm',
      ...) or a custom call's target ('__cublas$gemm'); None for a plain op outside any fusion.
    fast: compiled only: CPU: inside a YNN fusion (XLA's low-precision kernel); GPU: on a tensor-core GEMM kernel
      (a cuBLAS/cuBLASLt/cuDNN custom call or a Triton GEMM fusion); None elsewhere.
    platform: compiled only: the backend platform ('cpu', 'gpu', ...).
  """
  stage: str
  op: str
  op_name: str
  source: str
  lhs: str
  rhs: str
  out: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  lhs_from: str | None = None
  rhs_from: str | None = None
  fusion: str | None = None
  fast: bool | None = None
  platform: str | None = None

  @property
  def category(self) -> str:
    """Precision class of the operands as run (see `category`)."""
    return category(self.lhs, self.rhs)

  @property
  def source_category(self) -> str:
    """Precision class before compiler widening (compiled) or as written (lowered)."""
    return category(self.lhs_from or self.lhs, self.rhs_from or self.rhs)

  @property
  def widened(self) -> bool:
    """The compiler converted an operand to a wider type to run this op."""
    return (self.lhs_from or self.lhs) != self.lhs or (self.rhs_from or self.rhs) != self.rhs

  @property
  def signature(self) -> str:
    """'s8 x s8 -> s32'; widened operands read 's32<-s8'."""
    side = lambda run, src: run if not src or src == run else f'{run}<-{src}'
    return f'{side(self.lhs, self.lhs_from)} x {side(self.rhs, self.rhs_from)} -> {self.out}'

  @property
  def fallback(self) -> str:
    """Why a low-precision (int8 / fp8) compiled matmul runs slower than it could, '' when it does not (or when
    the notion does not apply). On GPU the likely cause is named: dims off cuBLAS's alignment, widening."""
    src = self.source_category
    if self.stage != 'compiled' or src not in ('int8', 'fp8') or self.fast is None:
      return ''
    if not self.widened and self.fast:
      return ''
    if self.platform == 'cpu':
      return ('widened by the compiler (run in a wider type)' if self.widened else
              "off XLA:CPU's fast (YNN) kernel")
    align = GPU_ALIGN[src]
    dims = {'lhs': self.lhs_shape, 'rhs': self.rhs_shape}
    odd = [f'{side} {_dims(shape)}' for side, shape in dims.items() if any(n % align for n in shape[-2:])]
    what = 'widened by the compiler' if self.widened else f'not on a tensor-core GEMM kernel ({self.fusion or "plain"})'
    if odd:
      return f'{what}; {src} dims not multiples of {align}: {", ".join(odd)}'
    return what

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    for k in ('lhs_shape', 'rhs_shape', 'out_shape'):
      d[k] = list(d[k])
    d.update(category=self.category, widened=self.widened, signature=self.signature, fallback=self.fallback)
    return d


COLLECTIVES = ('all-gather', 'all-reduce', 'collective-permute', 'all-to-all', 'reduce-scatter',
               'collective-broadcast', 'ragged-all-to-all')


@dataclasses.dataclass(frozen=True)
class Collective:
  """One cross-device collective of the compiled program (async start/done pairs count once).

  Attributes:
    op: 'all-reduce', 'all-gather', 'collective-permute', 'all-to-all', 'reduce-scatter', ...
    operands: (element type, shape) of each operand, per device, e.g. (('s32', (16, 32)),).
    op_name: the op_name metadata of the collective ('' when none).
  """
  op: str
  operands: tuple[tuple[str, tuple[int, ...]], ...]
  op_name: str

  @property
  def dtypes(self) -> tuple[str, ...]:
    return tuple(d for d, _ in self.operands)

  def __str__(self) -> str:
    return f'{self.op}(' + ', '.join(f'{d}{_dims(s)}' for d, s in self.operands) + ')'

  def to_dict(self) -> dict[str, Any]:
    return {'op': self.op, 'operands': [[d, list(s)] for d, s in self.operands], 'op_name': self.op_name}


def _short_name(op_name: str) -> str:
  """Drops the outer 'jit(fn)/' of an op_name: 'jit(loss)/jvp()/dot_general' -> 'jvp()/dot_general'."""
  return re.sub(r'^(?:p?jit\([^/]*\)/)', '', op_name) or '?'


@dataclasses.dataclass(frozen=True)
class MatmulReport:
  """Matmuls (dot_general and convolution) of one jitted function, as lowered and as compiled.

  Counts of the compiled program: `n_int8` ops with 8-bit integer operands as run; on CPU and GPU `n_fast` of all
  ops and `n_int8_fast` of the int8 ones on the fast kernel (CPU: YNN fusions; GPU: cuBLAS/cuDNN/Triton GEMMs),
  `n_int8_off_fast` int8 ops off it (slow); `n_widened` ops the compiler up-cast (`n_int8_widened` of them from
  <= 8-bit integers, e.g. an s8 dot run as s32 x s32). `n_int8_slow` = int8 ops that lost their speed: widened
  from int8, or int8 off the fast kernel. `n_fp8`, `n_fp8_fast`: the same for fp8 operands.
  """
  platform: str
  lowered: tuple[MatmulOp, ...]
  compiled: tuple[MatmulOp, ...]
  collectives: tuple[Collective, ...] = ()
  notes: tuple[str, ...] = ()

  @property
  def on_cpu(self) -> bool:
    return self.platform == 'cpu'

  @property
  def has_fast(self) -> bool:
    """Whether fast-kernel counts are defined on this platform (CPU and GPU)."""
    return self.platform in FAST_PLATFORMS

  def counts(self, stage: str = 'lowered') -> dict[str, int]:
    """Matmuls per precision category ('int8', 'fp8', 'bf16', 'f32', ...) of a stage (operands as run)."""
    if stage not in STAGES:
      raise ValueError(f'stage={stage!r} is not one of {", ".join(STAGES)}')
    return dict(collections.Counter(m.category for m in getattr(self, stage)))

  def signatures(self, stage: str = 'lowered') -> dict[str, int]:
    """Matmuls per signature ('s8 x s8 -> s32': 3) of a stage."""
    if stage not in STAGES:
      raise ValueError(f'stage={stage!r} is not one of {", ".join(STAGES)}')
    return dict(collections.Counter(m.signature for m in getattr(self, stage)))

  # Lowered (what the program asks for).
  @property
  def n_lowered(self) -> int:
    return len(self.lowered)

  @property
  def lowered_int8(self) -> int:
    """Lowered matmuls of 8-bit integer operands accumulating in 32-bit integers (i8 x i8 -> i32)."""
    return sum(m.category == 'int8' and m.out == 's32' for m in self.lowered)

  @property
  def lowered_fp8(self) -> int:
    return sum(m.category == 'fp8' for m in self.lowered)

  @property
  def lowered_bf16(self) -> int:
    return sum(m.category == 'bf16' for m in self.lowered)

  @property
  def lowered_f32(self) -> int:
    return sum(m.category == 'f32' for m in self.lowered)

  # Compiled (what runs).
  @property
  def n_compiled(self) -> int:
    return len(self.compiled)

  @property
  def n_int8(self) -> int:
    """Compiled matmuls that run with 8-bit integer operands."""
    return sum(m.category == 'int8' for m in self.compiled)

  @property
  def n_fast(self) -> int | None:
    """Compiled matmuls on the fast kernel (any dtype; CPU: YNN, GPU: tensor-core GEMM). None on other platforms."""
    return sum(bool(m.fast) for m in self.compiled) if self.has_fast else None

  @property
  def n_int8_fast(self) -> int | None:
    """int8 matmuls on the fast kernel (CPU and GPU). None on other platforms."""
    return sum(m.category == 'int8' and bool(m.fast) for m in self.compiled) if self.has_fast else None

  @property
  def n_int8_off_fast(self) -> int | None:
    """int8 matmuls off the fast kernel (CPU: XLA's generic loop, slower than f32; GPU: the elemental emitter).
    None on other platforms."""
    return sum(m.category == 'int8' and not m.fast for m in self.compiled) if self.has_fast else None

  @property
  def n_fp8(self) -> int:
    """Compiled matmuls that run with fp8 operands."""
    return sum(m.category == 'fp8' for m in self.compiled)

  @property
  def n_fp8_fast(self) -> int | None:
    """fp8 matmuls on the fast kernel (GPU: cuBLASLt fp8 or Triton). None where fast is undefined."""
    return sum(m.category == 'fp8' and bool(m.fast) for m in self.compiled) if self.has_fast else None

  def fallbacks(self) -> list[str]:
    """One line per int8 / fp8 matmul that runs slower than it could, with the likely reason."""
    return [f'{_short_name(m.op_name)} {m.signature}: {m.fallback}' for m in self.compiled if m.fallback]

  @property
  def n_widened(self) -> int:
    """Compiled matmuls whose operands the compiler up-cast (s8 -> s32, f8 -> f32, bf16 -> f32, ...)."""
    return sum(m.widened for m in self.compiled)

  @property
  def n_int8_widened(self) -> int:
    """Compiled matmuls written with <= 8-bit integer operands that run in wider types (e.g. s32 x s32)."""
    return sum(m.widened and m.source_category == 'int8' for m in self.compiled)

  @property
  def n_int8_slow(self) -> int:
    """int8 matmuls that lost their speed: widened from int8, or (CPU) int8 outside the fast kernel."""
    return self.n_int8_widened + (self.n_int8_off_fast or 0)

  def collective_counts(self) -> dict[str, int]:
    """Collectives of the compiled program by kind ({'all-reduce': 1}); empty on one device."""
    return dict(collections.Counter(c.op for c in self.collectives))

  def summary(self) -> str:
    """A header line with the counts, then one line per matmul (stage, origin, dtypes, fast or not)."""
    cats = lambda stage: ', '.join(f'{n} {c}' for c, n in sorted(self.counts(stage).items())) or 'none'
    head = [f'MatmulReport ({self.platform}): lowered {self.n_lowered} matmul(s) [{cats("lowered")}]; '
            f'compiled {self.n_compiled} [{cats("compiled")}]']
    if self.on_cpu:
      head.append(f'  compiled int8: {self.n_int8}, on the YNN fast kernel: {self.n_int8_fast}, int8 off the fast '
                  f'kernel: {self.n_int8_off_fast}; widened by the compiler: {self.n_widened} '
                  f'({self.n_int8_widened} from int8)')
    elif self.has_fast:
      head.append(f'  compiled int8: {self.n_int8}, on a tensor-core GEMM kernel: {self.n_int8_fast}, int8 off it: '
                  f'{self.n_int8_off_fast}; fp8: {self.n_fp8} ({self.n_fp8_fast} on a GEMM kernel); widened by the '
                  f'compiler: {self.n_widened} ({self.n_int8_widened} from int8)')
    else:
      head.append(f'  compiled int8: {self.n_int8}; widened by the compiler: {self.n_widened} '
                  f'({self.n_int8_widened} from int8); fast-kernel counts: n/a on {self.platform}')
    rows = []
    for m in self.lowered + self.compiled:
      shapes = f'{_dims(m.lhs_shape)}x{_dims(m.rhs_shape)}->{_dims(m.out_shape)}'
      if m.stage == 'lowered':
        status = ''
      else:
        kernel = m.fusion or 'plain'
        if m.fast is None:
          status = kernel
        elif m.fast:
          status = f'fast ({kernel})'
        else:
          status = f'NOT fast ({kernel})'
        if m.widened:
          status += ', widened by the compiler'
        if m.fallback and m.platform != 'cpu':
          status += f' [{m.fallback}]'
      where = f'  @ {m.source}' if m.source else ''
      rows.append(f'  {m.stage:<8} {m.op:<4} {_short_name(m.op_name):<34} {m.signature:<26} {shapes:<30} '
                  f'{status}{where}'.rstrip())
    if self.collectives:
      rows.append(f'  collectives ({len(self.collectives)}): ' + ', '.join(str(c) for c in self.collectives))
    return '\n'.join(head + rows + [f'  note: {n}' for n in self.notes])

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict: platform, counts and every matmul."""
    return {
        'platform': self.platform,
        'lowered': {'n': self.n_lowered, 'counts': self.counts('lowered'), 'signatures': self.signatures('lowered'),
                    'int8': self.lowered_int8, 'fp8': self.lowered_fp8, 'bf16': self.lowered_bf16,
                    'f32': self.lowered_f32},
        'compiled': {'n': self.n_compiled, 'counts': self.counts('compiled'),
                     'signatures': self.signatures('compiled'), 'int8': self.n_int8, 'fast': self.n_fast,
                     'int8_fast': self.n_int8_fast, 'int8_off_fast': self.n_int8_off_fast,
                     'widened': self.n_widened, 'int8_widened': self.n_int8_widened, 'int8_slow': self.n_int8_slow,
                     'fp8': self.n_fp8, 'fp8_fast': self.n_fp8_fast, 'fallbacks': self.fallbacks()},
        'matmuls': [m.to_dict() for m in self.lowered + self.compiled],
        'collectives': [c.to_dict() for c in self.collectives],
        'notes': list(self.notes),
    }


def _dims(shape) -> str:
  return '[' + ','.join(str(n) for n in shape) + ']'


# ------------------------------------------------------------------------------------------------ sources


_QJAX_DIR = os.path.dirname(os.path.abspath(__file__))  # the qjax package


def _user_frame(frames: list[tuple[str, int, str]]) -> str:
  """The innermost frame outside qjax and installed packages (else the innermost one), as 'file:line (fn)'."""
  def outside(f):
    path = os.path.abspath(f[0])
    return not path.startswith(_QJAX_DIR + os.sep) and 'site-packages' not in path and 'dist-packages' not in path
  pick = next((f for f in frames if outside(f)), frames[0] if frames else None)
  if pick is None:
    return ''
  path, line, fn = pick
  return f'{_rel(path)}:{line}' + (f' ({fn})' if fn else '')


def _rel(path: str) -> str:
  try:
    rel = os.path.relpath(path)
  except ValueError:
    return path
  return path if rel.startswith('..') else rel


# ---------------------------------------------------------------------------------------- lowered StableHLO


_LOC_DEF = re.compile(r'^#(loc\d*) = loc\((.*)\)\s*$')
_TENSOR = r'tensor<([^<>]*(?:<[^<>]*>[^<>]*)*)>'
_SIG = re.compile(r':\s*\(\s*' + _TENSOR + r'\s*,\s*' + _TENSOR + r'\s*\)\s*->\s*' + _TENSOR)
_MLIR_OPS = (('stablehlo.dot_general', 'dot'), ('stablehlo.convolution', 'conv'), ('stablehlo.dot', 'dot'))


def _tensor_type(body: str) -> tuple[str, tuple[int, ...]]:
  body = body.split(',')[0].strip()
  parts = body.split('x')
  dims, i = [], 0
  while i < len(parts) - 1 and re.fullmatch(r'\d+|\?', parts[i]):
    dims.append(int(parts[i]) if parts[i] != '?' else -1)
    i += 1
  return _mlir_dtype('x'.join(parts[i:])), tuple(dims)


def _split_top(s: str, sep: str) -> list[str]:
  """Splits s on sep at bracket depth 0."""
  out, depth, start, i = [], 0, 0, 0
  while i < len(s):
    c = s[i]
    if c in '([{<':
      depth += 1
    elif c in ')]}>':
      depth -= 1
    elif c == '"':
      j = s.find('"', i + 1)
      i = j if j > 0 else len(s)
    elif depth == 0 and s.startswith(sep, i):
      out.append(s[start:i])
      start = i + len(sep)
      i = start
      continue
    i += 1
  out.append(s[start:])
  return out


class _Locs:
  """Resolves MLIR location aliases (#locN) to (op names, frames innermost first)."""

  def __init__(self, text: str):
    self.defs = {}
    for line in text.splitlines():
      m = _LOC_DEF.match(line)
      if m:
        self.defs[m.group(1)] = m.group(2)
    self.cache: dict[str, tuple[list[str], list[tuple[str, int, str]]]] = {}

  def resolve(self, body: str, depth: int = 0):
    body = body.strip()
    if depth > 200 or not body:
      return [], []
    if body.startswith('#loc'):
      name = body[1:]
      if name not in self.cache:
        self.cache[name] = ([], [])  # Guards cycles.
        self.cache[name] = self.resolve(self.defs.get(name, ''), depth + 1)
      return self.cache[name]
    if body.startswith('loc(') and body.endswith(')'):
      return self.resolve(body[4:-1], depth + 1)
    if body.startswith('callsite(') and body.endswith(')'):
      parts = _split_top(body[len('callsite('):-1], ' at ')
      names, frames = [], []
      for p in parts:
        n, f = self.resolve(p, depth + 1)
        names += n
        frames += f
      return names, frames
    if body.startswith('fused'):
      inner = body[body.find('[') + 1:body.rfind(']')]
      names, frames = [], []
      for p in _split_top(inner, ','):
        n, f = self.resolve(p, depth + 1)
        names += n
        frames += f
      return names, frames
    if body.startswith('"'):
      end = body.find('"', 1)
      s, rest = body[1:end], body[end + 1:].strip()
      if rest.startswith(':'):
        m = re.match(r':(\d+)', rest)
        return [], [(s, int(m.group(1)) if m else 0, '')]
      if rest.startswith('(') and rest.endswith(')'):
        n, f = self.resolve(rest[1:-1], depth + 1)
        return [s] + n, f
      return [s], []
    return [], []


def parse_lowered(text: str) -> list[MatmulOp]:
  """Matmuls of a StableHLO module text (best with `Lowered.as_text(debug_info=True)` for op names)."""
  locs = _Locs(text)
  out = []
  for line in text.splitlines():
    op = next((kind for name, kind in _MLIR_OPS if re.search(re.escape(name) + r'[\s"(]', line)), None)
    if op is None:
      continue
    m = _SIG.search(line)
    if not m:
      continue
    (lt, ls), (rt, rs), (ot, os_) = (_tensor_type(m.group(i)) for i in (1, 2, 3))
    lm = re.search(r'loc\((#loc\d*|".*)\)\s*$', line)
    names, frames = locs.resolve(lm.group(1)) if lm else ([], [])
    out.append(MatmulOp('lowered', op, names[0] if names else '', _user_frame(frames), lt, rt, ot, ls, rs, os_))
  return out


# -------------------------------------------------------------------------------------------- compiled HLO


@dataclasses.dataclass
class _Instr:
  name: str
  dtype: str
  shape: tuple[int, ...]
  opcode: str
  operands: list[str]
  attrs: str
  computation: str

  def attr(self, key: str) -> str | None:
    m = re.search(r'(?:^|[\s,{])' + re.escape(key) + r'=("(?:[^"\\]|\\.)*"|%?[\w.\-$]+)', self.attrs)
    if not m:
      return None
    v = m.group(1)
    return v[1:-1] if v.startswith('"') else v.lstrip('%')

  @property
  def op_name(self) -> str:
    m = re.search(r'metadata=\{[^}]*?op_name="((?:[^"\\]|\\.)*)"', self.attrs)
    return m.group(1) if m else ''

  @property
  def stack_frame_id(self) -> int | None:
    m = re.search(r'metadata=\{[^}]*?stack_frame_id=(\d+)', self.attrs)
    return int(m.group(1)) if m else None

  @property
  def source_line(self) -> str:
    """'file:line' from older metadata (source_file=, source_line=), '' when absent."""
    f = re.search(r'metadata=\{[^}]*?source_file="([^"]*)"', self.attrs)
    n = re.search(r'metadata=\{[^}]*?source_line=(\d+)', self.attrs)
    return f'{_rel(f.group(1))}:{n.group(1) if n else 0}' if f else ''

  @property
  def fusion_kind(self) -> str | None:
    m = re.search(r'backend_config=.*?"kind":"([^"]+)"', self.attrs)
    return m.group(1) if m else self.attr('kind')


_COMP_HEAD = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$')
_SHAPE = re.compile(r'([a-z][a-z0-9]*)\[([\d,]*)\]')


def _closing(s: str) -> int:
  """Index of the ')' closing an already opened parenthesis at the start of s."""
  depth = 1
  for i, c in enumerate(s):
    if c in '([{':
      depth += 1
    elif c in ')]}':
      depth -= 1
      if depth == 0:
        return i
  return len(s)


class _Module:
  """A parsed HLO module text: instructions by name, fusion callers, roots and stack frames."""

  def __init__(self, text: str):
    self.instrs: dict[str, _Instr] = {}
    self.order: list[_Instr] = []
    self.root: dict[str, str] = {}
    self.params: dict[str, dict[int, str]] = collections.defaultdict(dict)
    self.caller: dict[str, _Instr] = {}
    comp = None
    for line in text.splitlines():
      if comp is None:
        m = _COMP_HEAD.match(line)
        if m:
          comp = m.group(1)
        continue
      if line.startswith('}'):
        comp = None
        continue
      m = _INSTR.match(line)
      if not m:
        continue
      name, type_str, opcode, rest = m.groups()
      end = _closing(rest)
      operands = re.findall(r'%([\w.\-]+)', rest[:end])
      attrs = rest[end + 1:]
      sm = _SHAPE.search(type_str)
      dtype, shape = (sm.group(1), tuple(int(d) for d in sm.group(2).split(',') if d)) if sm else (type_str, ())
      ins = _Instr(name, dtype, shape, opcode, operands, attrs, comp)
      self.instrs[name] = ins
      self.order.append(ins)
      if line.lstrip().startswith('ROOT'):
        self.root[comp] = name
      if opcode == 'parameter':
        pm = re.match(r'\s*(\d+)', rest)
        if pm:
          self.params[comp][int(pm.group(1))] = name
    for ins in self.order:
      if ins.opcode == 'fusion':
        callee = ins.attr('calls')
        if callee:
          self.caller[callee] = ins
    self.frames = _stack_frames(text)

  def enclosing_fusions(self, ins: _Instr) -> list[_Instr]:
    out, comp, seen = [], ins.computation, set()
    while comp in self.caller and comp not in seen:
      seen.add(comp)
      f = self.caller[comp]
      out.append(f)
      comp = f.computation
    return out

  def source_type(self, name: str, depth: int = 0) -> str | None:
    """Element type of `name` before compiler-inserted widening converts (matmul-named or unnamed converts),
    following bitcasts, copies, transposes, fusion roots and fusion parameters."""
    ins = self.instrs.get(name)
    if ins is None or depth > 64:
      return None
    if ins.opcode == 'convert':
      src = self.instrs.get(ins.operands[0]) if ins.operands else None
      last = ins.op_name.rsplit('/', 1)[-1]
      if src is not None and (not ins.op_name or last in _MATMUL_PRIMITIVES) and _bits(src.dtype) < _bits(ins.dtype):
        return self.source_type(src.name, depth + 1) or src.dtype
      return ins.dtype
    if ins.opcode in _PASS_THROUGH and ins.operands:
      return self.source_type(ins.operands[0], depth + 1) or ins.dtype
    if ins.opcode == 'fusion':
      callee = ins.attr('calls')
      if callee in self.root and not _is_fast_kind(ins.fusion_kind):
        return self.source_type(self.root[callee], depth + 1) or ins.dtype
      return ins.dtype
    if ins.opcode == 'parameter' and ins.computation in self.caller:
      idx = next((i for i, n in self.params[ins.computation].items() if n == ins.name), None)
      fusion = self.caller[ins.computation]
      if idx is not None and idx < len(fusion.operands):
        return self.source_type(fusion.operands[idx], depth + 1) or ins.dtype
    return ins.dtype

  def neighbour(self, ins: _Instr) -> _Instr | None:
    """A nearby matmul-named producer (or the enclosing fusion), for dots whose metadata the compiler dropped."""
    todo, seen = list(ins.operands), set()
    while todo:
      name = todo.pop(0)
      if name in seen or len(seen) > 64:
        continue
      seen.add(name)
      p = self.instrs.get(name)
      if p is None:
        continue
      if p.op_name.rsplit('/', 1)[-1] in _MATMUL_PRIMITIVES:
        return p
      todo += p.operands
    return next((f for f in self.enclosing_fusions(ins) if f.op_name), None)


def _is_fast_kind(kind: str | None) -> bool:
  return kind in CPU_FAST_KINDS or kind in GPU_FAST_KINDS


def _stack_frames(text: str) -> dict[int, list[tuple[str, int, str]]]:
  """stack_frame_id -> frames (file, line, function), innermost first, from the module's frame tables."""
  tables: dict[str, dict[int, str]] = {}
  section = None
  for line in text.splitlines():
    s = line.strip()
    if s in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section = s
      tables[s] = {}
      continue
    if section is None:
      continue
    m = re.match(r'^(\d+)\s+(.*)$', s)
    if not m:
      section = None
      continue
    tables[section][int(m.group(1))] = m.group(2)
  if 'StackFrames' not in tables:
    return {}
  num = lambda body, key: int(re.search(key + r'=(\d+)', body).group(1)) if re.search(key + r'=(\d+)', body) else 0
  files = {k: v.strip('"') for k, v in tables.get('FileNames', {}).items()}
  funcs = {k: v.strip('"') for k, v in tables.get('FunctionNames', {}).items()}
  locs = {k: (files.get(num(v, 'file_name_id'), '?'), num(v, 'line'), funcs.get(num(v, 'function_name_id'), ''))
          for k, v in tables.get('FileLocations', {}).items()}
  frames = {k: (num(v, 'file_location_id'), num(v, 'parent_frame_id')) for k, v in tables['StackFrames'].items()}
  # XLA prints rows from 1 but parent ids as proto indices + 1 (0 = none): a row naming itself as parent means
  # "parent = row - 1". Without such rows, parent ids are row labels (0 = none).
  shifted = any(p == k for k, (_, p) in frames.items())
  out = {}
  for k in frames:
    chain, cur, seen = [], k, set()
    while cur in frames and cur not in seen:
      seen.add(cur)
      loc, parent = frames[cur]
      if loc in locs:
        chain.append(locs[loc])
      cur = parent - 1 if shifted else parent
    out[k] = chain
  return out


def parse_compiled(text: str, platform: str = 'cpu') -> list[MatmulOp]:
  """Matmuls of an optimised HLO module text (`Compiled.as_text()`) for `platform` ('cpu', 'gpu', 'tpu')."""
  mod = _Module(text)
  out = []
  for ins in mod.order:
    if ins.opcode in ('dot', 'convolution'):
      op = 'dot' if ins.opcode == 'dot' else 'conv'
      fusions = mod.enclosing_fusions(ins)
      kinds = [f.fusion_kind for f in fusions]
      fusion = kinds[0] if kinds else None
      if platform == 'cpu':
        fast = any(k in CPU_FAST_KINDS for k in kinds)
      elif platform in FAST_PLATFORMS:  # GPU: a dot inside a Triton / cuDNN GEMM fusion, else the loop emitter
        fast = any(k in GPU_FAST_KINDS for k in kinds)
      else:
        fast = None
    elif ins.opcode == 'custom-call':
      target = ins.attr('custom_call_target') or ''
      if _MATMUL_TARGET.search(target):
        op = 'dot'
      elif _CONV_TARGET.search(target):
        op = 'conv'
      else:
        continue
      if platform == 'cpu':
        fast = False  # oneDNN custom calls: not the int8 YNN kernel
      elif platform in FAST_PLATFORMS:
        fast = bool(_GPU_LIBRARY_TARGET.search(target))
      else:
        fast = None
      fusion = target
    else:
      continue
    if len(ins.operands) < 2:
      continue
    lhs, rhs = (mod.instrs.get(n) for n in ins.operands[:2])
    if lhs is None or rhs is None:
      continue
    meta = ins if ins.op_name else (mod.neighbour(ins) or ins)
    op_name, sid = meta.op_name, meta.stack_frame_id
    source = _user_frame(mod.frames.get(sid, [])) if sid is not None else meta.source_line
    out.append(MatmulOp('compiled', op, op_name, source, lhs.dtype, rhs.dtype, ins.dtype, lhs.shape, rhs.shape,
                        ins.shape, mod.source_type(lhs.name) or lhs.dtype, mod.source_type(rhs.name) or rhs.dtype,
                        fusion, fast, platform))
  return out


def parse_collectives(text: str) -> list[Collective]:
  """Cross-device collectives of an optimised HLO module text (`Compiled.as_text()`)."""
  mod = _Module(text)
  out = []
  for ins in mod.order:
    op = ins.opcode[:-len('-start')] if ins.opcode.endswith('-start') else ins.opcode
    if op not in COLLECTIVES:
      continue
    operands = tuple((o.dtype, o.shape) for o in (mod.instrs.get(n) for n in ins.operands) if o is not None)
    out.append(Collective(op, operands, ins.op_name))
  return out


# ----------------------------------------------------------------------------------------------- public API


def _platform(compiled) -> str:
  try:
    shardings = jax.tree.leaves(compiled.input_shardings)
    if shardings:
      return next(iter(shardings[0].device_set)).platform
  except Exception:  # noqa: BLE001 -- any failure falls back to the default backend.
    pass
  return jax.default_backend()


def inspect_matmuls(fn, *args, **kwargs) -> MatmulReport:
  """Lowers and compiles `fn(*args, **kwargs)` and reports its dot_general and convolution ops.

  Args:
    fn: a function of arrays (wrapped in `jax.jit`), an already jitted function (its `.lower` is used, so static
      arguments and shardings apply), or a `jax.stages.Lowered` (then no args).
    *args, **kwargs: example arguments (arrays or `jax.ShapeDtypeStruct`s).
  Returns:
    A MatmulReport of the lowered StableHLO (what the program asks for) and of the compiled HLO (what runs),
    with the compiled program's cross-device collectives.
  """
  if isinstance(fn, jax.stages.Lowered):
    if args or kwargs:
      raise ValueError('inspect_matmuls: pass no arguments with an already lowered function')
    lowered = fn
  elif hasattr(fn, 'lower'):
    lowered = fn.lower(*args, **kwargs)
  else:
    lowered = jax.jit(fn).lower(*args, **kwargs)
  compiled = lowered.compile()
  platform = _platform(compiled)
  low = parse_lowered(lowered.as_text(debug_info=True))
  text = compiled.as_text()
  comp = parse_compiled(text, platform)
  notes = []
  if platform == 'cpu':
    notes.append('fast = inside a __ynn_fusion (YNNPACK), the XLA:CPU kernel where int8 x int8 -> int32 beats f32')
  elif platform in FAST_PLATFORMS:
    notes.append('fast = a tensor-core GEMM kernel: cuBLAS/cuBLASLt/cuDNN custom call or Triton GEMM fusion')
  else:
    notes.append(f'on {platform} the fast-kernel notion differs (cuBLAS/Triton/MXU): compiled operand types and the '
                 'kernel (fusion kind or custom-call target) are reported, fast-kernel counts are None')
  if len(comp) < len(low):
    notes.append('fewer compiled than lowered matmuls: the compiler removed dead or merged matmuls')
  return MatmulReport(platform, tuple(low), tuple(comp), tuple(parse_collectives(text)), tuple(notes))
