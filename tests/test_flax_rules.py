"""qjax.flax rules: plain-data rule lists (dicts, ml_collections ConfigDicts), first-match order, float
exclusions, reports (what was quantized with which spec, rules that matched nothing), the warning after a
model's first run, and clear errors naming the rule for bad regexes, bad fields and specs that cannot apply.
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from flax_common import A8, W8

from qjax import QuantSpec, quantizers
from qjax.flax import (
  QuantRule,
  RuleError,
  RuleSet,
  ServingWeight,
  convert_linen,
  convert_nnx,
  quantize_linen,
  quantize_nnx,
)


class TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name='body')(x))
    return nn.Dense(3, name='head')(x)


class NTwo(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(6, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.body(x)))


X = jax.random.normal(jax.random.key(0), (4, 6))


def _messages(record):
  return [str(w.message) for w in record if 'qjax' in str(w.message)]


# ------------------------------------------------------------------------------------------- plain data


def test_rules_as_dicts_and_configdicts_equal_quantrules():
  want = [QuantRule(module_path='enc/.*', op_names=('dot_general',), weight=QuantSpec('int4', 'per_channel'),
                    act=QuantSpec('int8'), grad=QuantSpec('int8', rounding='stochastic'), name='enc'),
          QuantRule(module_path='head', keep_float=True)]
  as_dicts = [{'module_path': 'enc/.*', 'op_names': ['dot_general'], 'name': 'enc',
               'weight': {'format': 'int4', 'granularity': 'per_channel'}, 'act': {'format': 'int8'},
               'grad': {'format': 'int8', 'rounding': 'stochastic'}},
              {'module_path': 'head', 'keep_float': True}]
  cfg = ml_collections.ConfigDict({'rules': as_dicts})  # a ConfigDict holds a rule list as a list of dicts
  per_rule = [ml_collections.ConfigDict(d) for d in as_dicts]  # ... or one ConfigDict per rule (nested specs)
  for rules in (as_dicts, cfg.rules, per_rule, [r.to_dict() for r in want]):
    assert RuleSet(rules).rules == tuple(want)
  # to_dict is JSON-friendly plain data and round-trips.
  assert [QuantRule(**r.to_dict()) for r in want] == want
  assert want[0].to_dict()['weight'] == QuantSpec('int4', 'per_channel').to_dict()
  # keep_float's old name still reads in dict rules (configs written before the rename), never with the new one.
  assert RuleSet([{'module_path': 'head', 'float': True}]).rules == (want[1],)
  with pytest.raises(ValueError, match='keep_float or its old name float, not both'):
    RuleSet([{'module_path': 'head', 'float': True, 'keep_float': False}])


def test_first_matching_rule_decides_and_float_rules_exclude():
  rules = [{'module_path': 'head', 'keep_float': True, 'name': 'keep-head-float'},
           {'module_path': '.*', 'weight': W8, 'act': A8, 'name': 'all'},
           {'module_path': 'body', 'weight': {'format': 'int2'}, 'name': 'shadowed'}]
  qm = quantize_linen(TwoDense(), rules)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    v = qm.init(jax.random.key(1), X)
  by_path = {m.path: m for m in qm.rules.matches.values()}
  assert by_path['body'].rule == 'all' and by_path['body'].rhs == 'kernel' and by_path['body'].lhs == 'act'
  assert by_path['body'].dot_config.fwd.rhs.format == 'int8'
  assert by_path['head'].rule == 'keep-head-float' and by_path['head'].config == 'float'
  assert [m.path for m in qm.rules.quantized()] == ['body']
  assert _messages(rec) == ["qjax: rules that matched no op: 'shadowed'; check their module_path regex and "
                            'op_names against the paths in RuleSet.report()']
  assert not jnp.array_equal(qm.apply(v, X), TwoDense().apply(v, X))
  # Float rules alone leave the model's output exactly as it is.
  with warnings.catch_warnings(record=True):
    warnings.simplefilter('always')
    all_float = quantize_linen(TwoDense(), [{'module_path': '.*', 'keep_float': True}])
    assert jnp.array_equal(all_float.apply(v, X), TwoDense().apply(v, X))


def test_report_lists_specs_operands_and_unused_rules():
  rules = [{'module_path': 'body', 'weight': {'format': 'int4', 'granularity': 'per_channel', 'estimator': 'lsq'},
            'act': {'format': 'int8'}, 'grad': {'format': 'int8'}, 'name': 'body4'},
           {'module_path': 'head', 'weight': W8, 'act': A8},
           {'module_path': 'decoder/.*', 'weight': W8, 'name': 'decoder'},
           {'module_path': '.*', 'op_names': ['conv'], 'weight': W8, 'name': 'convs'}]
  model = NTwo(nnx.Rngs(0))
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    rs = quantize_nnx(model, rules, X)
  report = rs.report().splitlines()
  assert len(report) == 3
  assert re.match(r"body\s+dot_general\s+rule='body4'\s+lhs=act rhs=kernel\s+"
                  r'fwd\[int8/tensor/ste x int4/channel/lsq, auto\] bwd\[g=int8/tensor/ste, auto\]'
                  r'  \[rhs=param body/kernel \(channel axes \(1,\)\)\]$', report[0])
  assert re.match(r"head\s+dot_general\s+rule='head'\s+lhs=act rhs=kernel\s+"
                  r'fwd\[int8/tensor/ste x int8/channel/ste, auto\]'
                  r'  \[rhs=param head/kernel \(channel axes \(1,\)\)\]$',
                  report[1])
  assert report[2] == "rules that matched nothing: 'decoder', 'convs'"
  assert [r.label for r in rs.unused_rules()] == ['decoder', 'convs']
  assert _messages(rec) == ["qjax: rules that matched no op: 'decoder', 'convs'; check their module_path regex "
                            'and op_names against the paths in RuleSet.report()']
  body = rs.quantized()[0]
  assert body.weight_operands == ('kernel',)
  assert body.dot_config.fwd.rhs == QuantSpec('int4', 'per_channel', estimator='lsq')  # op-relative (unresolved)


# ---------------------------------------------------------------------------------- rules that do nothing


def test_rules_that_quantize_nothing_warn_once_after_the_first_run():
  rules = [{'module_path': 'encoder/.*', 'weight': W8, 'name': 'enc'},
           {'module_path': '.*', 'op_names': 'conv', 'weight': W8, 'name': 'convs'}]
  want = ("qjax: the rules quantized no op of the model (rules that matched no op: 'enc', 'convs'; the ops the "
          'model ran: body (dot_general), head (dot_general))')
  qm = quantize_linen(TwoDense(), rules)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    v = qm.init(jax.random.key(1), X)
    assert _messages(rec) == [want]
    qm.apply(v, X)
    assert len(_messages(rec)) == 1  # once, after the first run
  model = NTwo(nnx.Rngs(0))
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    quantize_nnx(model, rules)  # no sample inputs: the warning comes after the model's first call
    assert not _messages(rec)
    model(X)
    model(X)
  assert _messages(rec) == [want]
  # Only float rules that match: nothing is quantized either.
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    quantize_nnx(NTwo(nnx.Rngs(0)), [{'module_path': '.*', 'keep_float': True, 'name': 'all-float'}], X)
  assert _messages(rec) == ['qjax: the rules quantized no op of the model (rules that matched no op: none; the ops '
                            'the model ran: body (dot_general), head (dot_general))']


def test_empty_rule_list_is_an_error():
  for empty in ([], ()):
    with pytest.raises(ValueError, match='the rule list is empty: nothing would be quantized'):
      RuleSet(empty)
  with pytest.raises(ValueError, match='rule list is empty'):
    quantize_linen(TwoDense(), [])
  with pytest.raises(ValueError, match='rule list is empty'):
    quantize_nnx(NTwo(nnx.Rngs(0)), [])


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('rule, message', [
    ({'module_path': 'enc/(layers', 'weight': W8, 'name': 'encoder'},
     re.escape("rule 'encoder': module_path='enc/(layers' is not a valid regex: missing ), unterminated")),
    ({'module_path': 'enc/[', 'weight': W8}, "rule 'enc/\\[': module_path='enc/\\[' is not a valid regex"),
    ({'module_path': 'x', 'wieght': W8}, "rule 0 \\('x'\\): QuantRule field='wieght' is not one of .*did you "
                                         "mean 'weight'"),
    ({'module_path': 'x', 'weight': {'format': 'int8', 'granularty': 'per_channel'}},
     "rule 'x': weight: QuantSpec field='granularty' .*did you mean 'granularity'"),
    ({'module_path': 'x', 'act': {'format': 'int9'}}, "rule 'x': act: .*bits must be in 1..8, got 9"),
    ({'module_path': 'x', 'op_names': ['dot', 'conv'], 'weight': W8}, "rule 'x': op_names='dot' is not one of"),
    ({'module_path': 'x', 'weight': W8, 'mode': 'fast'}, "rule 'x': mode='fast' is not one of fake, real, auto"),
    ({'module_path': 'x', 'name': 'nothing'}, "rule 'nothing': quantizes nothing .*set keep_float=True"),
    ({'module_path': 'x', 'grad': {'format': 'int8', 'estimator': 'lsq'}}, "rule 'x': grad uses estimator='lsq'"),
    ({'module_path': 'x', 'weight': W8, 'small_m': -1}, "rule 'x': small_m must be >= 0, got -1"),
    ({'module_path': 'x', 'act': {'format': 'int8', 'estimator': 'lsq'}, 'act_static': True},
     "rule 'x': act_static keeps range statistics; it cannot be combined with the learned estimator 'lsq'"),
    ({'module_path': 'x', 'act': {'format': 'int8', 'granularity': 'per_channel'}, 'act_static': True},
     "rule 'x': act_static keeps one range per tensor; act granularity must be \"per_tensor\", got 'per_channel'"),
    ('body', "rule 0: a rule is a QuantRule or a dict of its fields, got str 'body'"),
])
def test_bad_rules_raise_naming_the_rule(rule, message):
  with pytest.raises(ValueError, match=message):
    RuleSet([rule])


def test_rule_small_m_reaches_the_op_config():
  """A rule's small_m overrides the small-M routing of the ops it matches (default 0: nothing to float)."""
  r = QuantRule('.*', weight=W8, act=W8, grad=W8)
  assert r.dot_config(False, True).small_m == 0
  assert QuantRule('.*', weight=W8, act=W8, small_m=1).dot_config(False, True).small_m == 1
  assert QuantRule('.*', weight=W8, act=W8, grad=W8, small_m=8).dot_config(False, True).small_m == 8


def test_spec_that_cannot_apply_to_its_op_names_the_rule():
  # per_group with a group size that does not divide the contraction (Dense: K = 6).
  rules = [{'module_path': 'body', 'weight': {'format': 'int4', 'granularity': 'per_group', 'group_size': 4},
            'name': 'grouped'}, {'module_path': '.*', 'weight': W8}]
  with pytest.raises(RuleError, match="rule 'grouped' at body \\(dot_general\\): fwd.rhs: .*group_size=4.* 6"):
    quantize_linen(TwoDense(), rules).init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="rule 'grouped' at body \\(dot_general\\): fwd.rhs: .*group_size=4.* 6"):
    quantize_nnx(NTwo(nnx.Rngs(0)), rules, X)

  # per_group on a convolution.
  class Conv(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(4, (3, 3), name='conv')(x)
  x = jnp.ones((2, 8, 8, 16))
  bad = [{'module_path': 'conv', 'weight': {'format': 'int8', 'granularity': 'per_group', 'group_size': 8},
          'name': 'conv-groups'}]
  with pytest.raises(ValueError, match="rule 'conv-groups' at conv \\(conv\\): .*per_group.* not supported by "
                                       'quantized convolutions'):
    quantize_linen(Conv(), bad).init(jax.random.key(0), x)
  # mode='real' for formats that cannot run natively.
  bad = [{'module_path': '.*', 'weight': {'format': 'nf4'}, 'act': A8, 'mode': 'real', 'name': 'nf4-real'}]
  with pytest.raises(ValueError, match="rule 'nf4-real' at body \\(dot_general\\): .*mode=\"real\" needs both"):
    quantize_linen(TwoDense(), bad).init(jax.random.key(0), jnp.ones((40, 6)))


# ------------------------------------------------------------------------- first and last ops at 8 bits


class ThreeDense(nn.Module):
  """Module names sort in the opposite order to execution ('z_in' runs first, 'a_out' last)."""
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name='z_in')(x))
    x = nn.relu(nn.Dense(8, name='mid')(x))
    return nn.Dense(3, name='a_out')(x)


class NThree(nnx.Module):
  def __init__(self, rngs):
    self.z_in = nnx.Linear(6, 8, rngs=rngs)
    self.mid = nnx.Linear(8, 8, rngs=rngs)
    self.a_out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.a_out(nnx.relu(self.mid(nnx.relu(self.z_in(x)))))


LOW = {'weight': {'format': 'int2', 'granularity': 'per_channel', 'estimator': 'lsq'},
       'act': {'format': 'int2', 'estimator': 'lsq'}}


def _formats(rs):
  return {m.path: (m.dot_config.fwd.lhs.format, m.dot_config.fwd.rhs.format, m.kept_8bit) for m in rs.quantized()}


@pytest.mark.parametrize('backend', ['linen', 'nnx'])
def test_first_last_8bit_keeps_the_first_and_last_ops_in_execution_order_at_8_bits(backend):
  rules = [{'module_path': '.*', **LOW, 'first_last_8bit': True}]
  if backend == 'linen':
    qm = quantize_linen(ThreeDense(), rules)
    v = qm.init(jax.random.key(1), X)
    rs, params = qm.rules, v['params']
    step = lambda layer, side: params[layer][f'dot_general0_{side}_scale']
    kernel = lambda layer: params[layer]['kernel']
  else:
    model = NThree(nnx.Rngs(0))
    rs = quantize_nnx(model, rules, X)
    step = lambda layer, side: getattr(model, layer).__dict__[f'qjax_dot_general0_{side}_scale'].get_value()
    kernel = lambda layer: getattr(model, layer).kernel.get_value()
  # The first (z_in) and last (a_out) ops run with int8 weights and activations, with the same granularity and
  # estimator; the middle op stays at 2 bits.
  assert _formats(rs) == {'z_in': ('int8', 'int8', True), 'mid': ('int2', 'int2', False),
                          'a_out': ('int8', 'int8', True)}
  first = rs.quantized()[0].dot_config.fwd
  assert first.rhs == QuantSpec('int8', 'per_channel', estimator='lsq')
  # The learned steps were initialised for the grid the op runs with, from the first real run on.
  for layer, fmt in (('z_in', 'int8'), ('mid', 'int2'), ('a_out', 'int8')):
    want = quantizers.init_params(kernel(layer), QuantSpec(fmt, 'per_channel', estimator='lsq'))['scale']
    assert jnp.allclose(step(layer, 'rhs'), want)
  report = rs.report().splitlines()
  assert [('kept at 8 bits' in line) for line in report] == [True, False, True]
  assert report[0].startswith('z_in') and report[2].startswith('a_out')


def test_first_last_8bit_only_applies_where_the_deciding_rule_asks_and_skips_float_ops():
  # z_in is float: the first quantized op is mid. a_out's rule does not ask: it stays at 2 bits.
  rules = [{'module_path': 'z_in', 'keep_float': True},
           {'module_path': 'a_out', **LOW, 'name': 'head'},
           {'module_path': '.*', **LOW, 'first_last_8bit': True}]
  qm = quantize_linen(ThreeDense(), rules)
  qm.init(jax.random.key(1), X)
  assert _formats(qm.rules) == {'mid': ('int8', 'int8', True), 'a_out': ('int2', 'int2', False)}


def test_first_last_8bit_nnx_needs_sample_inputs():
  with pytest.raises(ValueError, match='first_last_8bit=True or act_signedness="auto": quantize_nnx needs sample'):
    quantize_nnx(NThree(nnx.Rngs(0)), [{'module_path': '.*', **LOW, 'first_last_8bit': True}])
  # Without the option no sample inputs are needed.
  quantize_nnx(NThree(nnx.Rngs(0)), [{'module_path': '.*', **LOW}])


@pytest.mark.parametrize('fmt, want', [('int4', 'int8'), ('int3n', 'int8n'), ('uint2', 'uint8'), ('fp4_e2m1', 'int8'),
                                       ('mxfp4', 'mxint8'), ('int8', 'int8'), ('fp8_e4m3', 'fp8_e4m3')])
def test_eight_bit_keeps_the_grid_kind(fmt, want):
  from qjax.flax.rules import eight_bit  # noqa: PLC0415
  spec = QuantSpec(fmt)
  assert eight_bit(spec).format == want
  assert eight_bit(None) is None


# ------------------------------------------------------------------------- activation signedness


A4 = {'weight': {'format': 'int4', 'granularity': 'per_channel'}, 'act': {'format': 'int4'}}


def _act_formats(rs):
  return {m.path: m.dot_config.fwd.lhs.format for m in rs.quantized()}


@pytest.mark.parametrize('backend', ['linen', 'nnx'])
def test_auto_signedness_gives_non_negative_activations_an_unsigned_grid(backend):
  rules = [{'module_path': '.*', **A4, 'act_signedness': 'auto'}]
  if backend == 'linen':
    qm = quantize_linen(TwoDense(), rules)
    v = qm.init(jax.random.key(1), X)
    rs = qm.rules
    apply = lambda x: qm.apply(v, x)
  else:
    model = NTwo(nnx.Rngs(0))
    rs = quantize_nnx(model, rules, X)
    apply = model
  # body's input X has both signs: signed grid; head's input is a ReLU output (>= 0): unsigned, same bits.
  assert bool(jnp.min(X) < 0)
  assert _act_formats(rs) == {'body': 'int4', 'head': 'uint4'}
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # an unsigned grid that clipped negatives would warn
    apply(X)
  report = rs.report().splitlines()
  assert 'fwd[uint4/tensor/ste x int4/channel/ste' in report[1] and '(act grid: auto)' in report[1]
  # A non-negative model input gets the unsigned grid too.
  rs2 = quantize_nnx(NTwo(nnx.Rngs(0)), rules, jnp.abs(X))
  assert _act_formats(rs2) == {'body': 'uint4', 'head': 'uint4'}


def test_auto_signedness_is_per_operand_for_ops_of_two_activations():
  class Scores(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.einsum('bi,bj->bij', jax.nn.softmax(x), x)  # non-negative x mixed-sign
  qm = quantize_linen(Scores(), [{'module_path': '.*', 'act': {'format': 'int8'}, 'act_signedness': 'auto'}])
  qm.init(jax.random.key(0), X)
  (m,) = qm.rules.quantized()
  assert (m.dot_config.fwd.lhs.format, m.dot_config.fwd.rhs.format) == ('uint8', 'int8')


@pytest.mark.parametrize('mode, act, want', [('format', 'int4', ('int4', 'int4')),
                                             ('format', 'uint4', ('uint4', 'uint4')),
                                             ('signed', 'uint4', ('int4', 'int4')),
                                             ('unsigned', 'int4', ('uint4', 'uint4'))])
def test_the_config_can_keep_or_force_the_act_grid(mode, act, want):
  rules = [{'module_path': '.*', 'weight': W8, 'act': {'format': act}, 'act_signedness': mode}]
  qm = quantize_linen(TwoDense(), rules)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # an unsigned grid on body's mixed-sign input warns: that is the point
    qm.init(jax.random.key(1), X)
  assert tuple(_act_formats(qm.rules).values()) == want
  assert qm.rules.order_known and (('(act grid:' in qm.rules.report()) == (mode != 'format'))


def test_act_signedness_errors_name_the_valid_choices():
  with pytest.raises(ValueError, match=r"act_signedness='unsinged' is not one of format, auto, signed, unsigned "
                                       r"\(did you mean 'unsigned'\?\)"):
    QuantRule(act=QuantSpec('int4'), act_signedness='unsinged')
  with pytest.raises(ValueError, match="act_signedness='unsigned' needs an integer act format; 'fp8_e4m3'"):
    QuantRule(act=QuantSpec('fp8_e4m3'), act_signedness='unsigned')
  with pytest.raises(ValueError, match='the unsigned act grid is not a valid spec: calibration="absmax_half_step"'):
    QuantRule(act=QuantSpec('int4', calibration='absmax_half_step'), act_signedness='auto')


def test_auto_signedness_inside_jit_asks_for_a_concrete_prepare_first():
  rules = [{'module_path': '.*', **A4, 'act_signedness': 'auto'}]
  qm = quantize_linen(TwoDense(), rules)
  with pytest.raises(ValueError, match='call QuantizedLinen.prepare \\(or init\\) on concrete inputs outside'):
    jax.jit(lambda k, x: qm.init(k, x))(jax.random.key(1), X)
  qm.prepare('init', jax.random.key(1), X)  # measured here, so the jitted init needs no data
  jax.jit(lambda k, x: qm.init(k, x))(jax.random.key(1), X)
  assert _act_formats(qm.rules) == {'body': 'int4', 'head': 'uint4'}
  with pytest.raises(ValueError, match="method='run' is not one of init, apply"):
    qm.prepare('run', jax.random.key(1), X)


# ------------------------------------------------------------------------------ ConvTranspose (lax.conv_transpose)


class LUp(nn.Module):
  padding: object = 'SAME'
  transpose_kernel: bool = False

  @nn.compact
  def __call__(self, x):
    return nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding=self.padding, transpose_kernel=self.transpose_kernel,
                            use_bias=False, name='up')(x)


class NUp(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.ConvTranspose(3, 5, (3, 3), strides=(2, 2), padding='SAME', use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.up(x)


CT_RULES = [{'module_path': '.*', 'weight': {'format': 'int8', 'granularity': 'per_channel'},
             'act': {'format': 'int8'}}]
IMG = jax.random.normal(jax.random.key(3), (2, 6, 5, 3))


def _ct_reference(x, w, padding):
  """The float conv_transpose of the fake-quantized operands (activation per tensor, kernel per output feature)."""
  return jax.lax.conv_transpose(quantizers.fake_quant(x, QuantSpec('int8')),
                                quantizers.fake_quant(w, QuantSpec('int8', 'per_channel', axis=-1)), (2, 2), padding,
                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((1, 2), (0, 1))])
def test_linen_conv_transpose_is_quantized_as_the_conv_it_computes(padding):
  """Flax's ConvTranspose calls lax.conv_transpose, inside which JAX calls its own conv: the rules once never
  saw it (the layer stayed float, unreported). It now runs as that conv, quantized, and the report says so."""
  qm = quantize_linen(LUp(padding), CT_RULES)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter('always')
    v = qm.init(jax.random.key(1), IMG)
    y = jax.jit(qm.apply)(v, IMG)
  assert not _messages(rec)
  want = _ct_reference(IMG, v['params']['up']['kernel'], padding)
  assert y.shape == want.shape
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(y - LUp(padding).apply({'params': v['params']}, IMG)))) > 1e-3  # not float
  line, = [ln for ln in qm.report().splitlines() if ln.startswith('up ')]
  assert 'conv' in line and 'int8/channel' in line and '(via conv_transpose)' in line


def test_linen_conv_transpose_gradients_flow_to_the_kernel():
  qm = quantize_linen(LUp(), CT_RULES)
  v = qm.init(jax.random.key(1), IMG)
  g = jax.grad(lambda p: jnp.sum(qm.apply({**v, 'params': p}, IMG) ** 2))(v['params'])['up']['kernel']
  w = v['params']['up']['kernel']
  ref = jax.grad(lambda k: jnp.sum(_ct_reference(IMG, k, 'SAME') ** 2))(w)  # STE: d fake_quant(w) / dw = 1
  np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4)


def test_conv_transpose_with_a_flipped_kernel_is_listed_as_not_reachable():
  qm = quantize_linen(LUp(transpose_kernel=True), CT_RULES)
  with warnings.catch_warnings(record=True):
    warnings.simplefilter('always')
    v = qm.init(jax.random.key(1), IMG)
    y = qm.apply(v, IMG)
  assert jnp.array_equal(y, LUp(transpose_kernel=True).apply({'params': v['params']}, IMG))
  assert re.search(r'^up\s+conv_transpose\s+not quantized, not reachable: .*transpose_kernel=True',
                   qm.report(), re.M)


def test_nnx_conv_transpose_is_quantized():
  model = NUp(nnx.Rngs(0))
  w = model.up.kernel.get_value()
  want = _ct_reference(IMG, w, 'SAME')
  quantize_nnx(model, CT_RULES, IMG)
  y = model(IMG)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_conv_transpose_serves_int8_weights_equal_to_qat_bit_for_bit():
  qm = quantize_linen(LUp(), CT_RULES)
  v = qm.init(jax.random.key(1), IMG)
  sv = convert_linen(qm, v, IMG)
  assert isinstance(sv['params']['up']['kernel'], ServingWeight)
  assert jnp.array_equal(jax.jit(qm.serving().apply)(sv, IMG), jax.jit(qm.apply)(v, IMG))
  model = NUp(nnx.Rngs(0))
  quantize_nnx(model, CT_RULES, IMG)
  want = model(IMG)
  convert_nnx(model, IMG)
  assert isinstance(model.up.kernel.get_value(), ServingWeight)
  assert jnp.array_equal(model(IMG), want)


def test_report_lists_a_weights_batch_axes_among_its_channel_axes():
  """A per-channel weight scale keeps every axis the op does not contract, batch axes included (one scale per
  head below); the report once left the batch axes out."""
  class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param('w', nn.initializers.normal(1.0), (2, 3, 4))  # (heads, d, k)
      return jnp.einsum('bhd,hdk->bhk', x, w)

  qm = quantize_linen(Heads(), CT_RULES)
  x = jax.random.normal(jax.random.key(0), (5, 2, 3))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    v = qm.init(jax.random.key(1), x)
  assert 'rhs=param w (channel axes (0, 2))' in qm.report()
  served = convert_linen(qm, v, x)
  assert served['params']['w'].to_qarray().scale.shape == (2, 1, 4)  # the axes the report names
