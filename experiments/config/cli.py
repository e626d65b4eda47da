"""Config files and command-line overrides.

    --config=configs/fmnist_cnn.py[:arg]     a file whose get_config(arg) returns an ml_collections.ConfigDict;
                                             arg ('runlocal', 'seeds=2,runlocal') is parsed by config_args,
                                             which rejects an arg the file does not know
    --config.quant.weight.format=int4        override a leaf; the value is parsed to the leaf's type

An unknown key is rejected with the nearest valid key in the message (a bit-width key such as 'quant.wbits' with
the format key that sets it, 'quant.weight.format=int4'); a value that does not parse to the leaf's type names the
key and the expected type. Everything else on the command line is returned to the runner as its own flags
(--workdir=..., --root=...).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config file or override that cannot be applied; the message says why and what would work."""


def did_you_mean(name: Any, choices, *, fmt: str = '{!r}') -> str:
  """'; did you mean 'x'?' naming the choice nearest `name`, or '' when none is near: the suggestion every
  user-error message of the experiments layer gives."""
  near = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
  return f'; did you mean {fmt.format(near[0])}?' if near else ''


def load_module(spec: str):
  """Imports the config file of 'path.py[:arg]'; returns (module, arg or None)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'--config={spec}: no such file {path!r}')
  name = 'qjax_config_' + os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(name, path)
  if mod_spec is None:  # not a .py file: importlib finds no loader for it
    raise ConfigError(f'--config={spec}: {path} is not a Python config file (like configs/<name>.py)')
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(arg)')
  return module, (arg or None)


def load_file(spec: str) -> ml_collections.ConfigDict:
  """Loads 'path.py' or 'path.py:arg' and returns get_config(arg)."""
  module, arg = load_module(spec)
  try:
    return module.get_config(arg)
  except ConfigError as e:
    raise ConfigError(f'--config={spec}: {e}') from None


def config_args(arg: str | None, **known: Any) -> dict[str, Any]:
  """Parses a config file's argument ('runlocal', 'seeds=2,runlocal') against the args it knows.

  `known` maps each arg to its default: a bool default makes a bare name ('runlocal'), any other default takes
  name=value parsed to the default's type. An unknown name or a bad value is a ConfigError naming the known args,
  so a typo (':runlcoal') never silently runs the full config. The one parser every file under configs/ uses.
  """
  out = dict(known)
  usage = ', '.join(k if isinstance(v, bool) else f'{k}={type(v).__name__.upper()}' for k, v in known.items())
  for part in filter(None, (p.strip() for p in (arg or '').split(','))):
    name, eq, value = part.partition('=')
    if name not in known:
      raise ConfigError(f'unknown config arg {part!r}{did_you_mean(name, known)} (known: {usage or "none"})')
    if isinstance(known[name], bool):
      if eq:
        raise ConfigError(f'config arg {name!r} takes no value (known: {usage})')
      out[name] = True
      continue
    try:
      out[name] = type(known[name])(value) if eq else None
    except ValueError:
      out[name] = None
    if out[name] is None:
      raise ConfigError(f'config arg {part!r}: expected {name}=<{type(known[name]).__name__}>, like '
                        f'{name}={known[name]!r}')
  return out


def _keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  out = []
  for k, v in config.items():
    full = f'{prefix}{k}'
    out.append(full)
    if isinstance(v, ml_collections.ConfigDict):
      out += _keys(v, full + '.')
  return out


def valid_keys(config) -> list[str]:
  return _keys(config)


def _parse(value: Any, current: Any, key: str):
  if not isinstance(value, str):
    return value
  if isinstance(current, bool):
    low = value.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ConfigError(f'--config.{key}={value}: expected a bool (true/false)')
  if isinstance(current, str) or current is None:
    return value
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise ConfigError(f'--config.{key}={value}: expected {type(current).__name__}, like {current!r}') from None
  if isinstance(current, float) and isinstance(parsed, int):
    parsed = float(parsed)
  if isinstance(current, tuple) and isinstance(parsed, list):
    parsed = tuple(parsed)
  if isinstance(current, (int, float, tuple)) and type(parsed) is not type(current):
    raise ConfigError(f'--config.{key}={value}: expected {type(current).__name__}, like {current!r}')
  return parsed


# 'bits', 'wbits', 'act_bits', 'bit_width', ...: what a researcher types for a bit-width, which qjax sets by format.
_BITS_KEY = re.compile(r'(w|a|g|weights?|acts?|activations?|grads?|gradients?)?_?n?bits?(_?width)?|bit_?width', re.I)


def _bits_hint(key: str, config, value: Any = None) -> str:
  """'; a bit-width is part of the format ...' naming the format key(s) meant, where `key` asks for a bit-width
  (its own group's format, else the groups its prefix names: 'wbits' -> weight), else ''."""
  leaf = key.split('.')[-1]
  m = _BITS_KEY.fullmatch(leaf)
  if not m:
    return ''
  fmts = [k for k in valid_keys(config) if k.endswith('.format')]
  parent = key.rpartition('.')[0]
  if f'{parent}.format' in fmts:
    fmts = [f'{parent}.format']
  elif m.group(1):
    fmts = [k for k in fmts if k.split('.')[-2].startswith(m.group(1)[0].lower())] or fmts
  if not fmts:
    return ''
  fmt = f'int{value}' if str(value) in tuple('12345678') else 'int4'
  more = ' (or another *.format key)' if len(fmts) > 3 else ''
  return ('; a bit-width is part of the format (int8, int4, int2, fp8_e4m3, nf4, ...): set '
          + ' or '.join(f'--config.{k}={fmt}' for k in fmts[:3]) + more)


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key that must exist; the error names the nearest valid key."""
  parts = key.split('.')
  node = config
  for i, p in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      hint = _bits_hint(key, config, value) or did_you_mean(key, valid_keys(config))
      raise ConfigError(f'unknown config key {key!r}{hint}')
    if i < len(parts) - 1:
      node = node[p]
  current = node[parts[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f'config key {key!r} is a group; set one of its fields ({", ".join(current.keys())})')
  node[parts[-1]] = _parse(value, current, key)


def check_flags(flags, known: tuple[str, ...]) -> None:
  """Rejects a runner flag not in `known`, naming the nearest known one."""
  for name in flags:
    if name not in known:
      names = [k for k in known if k != 'config']
      raise ConfigError(f'unknown flag --{name}{did_you_mean(name, known, fmt="--{}")} (known: --config, '
                        '--config.<key>'
                        + ''.join(f', --{k}' for k in names) + ')')


def override_keys(argv: list[str]) -> list[str]:
  """The dotted keys a command line sets with --config.<key>=value."""
  return [a[len('--config.'):].partition('=')[0] for a in argv if a.startswith('--config.')]


def unused_in_float(config, keys) -> str | None:
  """A warning when `keys` set quant options that a float run (config.mode='float') ignores, else None.

  A format set to '' (no quantization) agrees with a float run and is left out. The warning names the modes that
  would use the options, so a forgotten --config.mode=qat does not pass for a quantized result.
  """
  if config.get('mode') != 'float':
    return None
  unused = [k for k in dict.fromkeys(keys) if k.startswith('quant.') and _get_key(config, k) != '']
  if not unused:
    return None
  shown = ', '.join(f'config.{k}={_get_key(config, k)!r}' for k in unused[:3]) + (' ...' if len(unused) > 3 else '')
  return (f'{shown} has no effect: config.mode=\'float\' trains the float model; --config.mode=qat (or ptq, '
          'quantized_training) would use it')


def _get_key(config, key: str):
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def parse_argv(argv: list[str]) -> tuple[ml_collections.ConfigDict, dict[str, str]]:
  """Returns (config with overrides applied, the other --flag=value pairs)."""
  config_spec, overrides, flags = None, [], {}
  for a in argv:
    if not a.startswith('--'):
      raise ConfigError(f'unexpected argument {a!r}; flags look like --name=value')
    name, eq, value = a[2:].partition('=')
    if not eq:
      value = 'true'
    if name == 'config':
      config_spec = value
    elif name.startswith('config.'):
      overrides.append((name[len('config.'):], value))
    else:
      flags[name] = value
  if config_spec is None:
    raise ConfigError('missing --config=configs/<name>.py')
  config = load_file(config_spec)
  for k, v in overrides:
    set_key(config, k, v)
  return config, flags


COMMON_FLAGS = {
    'config': 'configs/<name>.py[:arg], the config file (and its arg, e.g. runlocal)',
    'config.<key>': '=value: override one config key (--list_config lists them all)',
    'list_config': 'print every key of --config with its value and comment, then exit',
    'debug': 'show the traceback of an error (or set QJAX_DEBUG=1)',
    'help': 'this text',
}
_COMMENTED = re.compile(r'^\s*(c|config|q)\.([A-Za-z_][\w.]*)\s*=[^#]*#\s*(.+)$')
_PREFIX = {'c': '', 'config': '', 'q': 'quant.'}


def wants_help(argv: list[str]) -> bool:
  return any(a in ('--help', '-h', '--list_config') for a in argv)


def help_text(doc: str, flags: dict[str, str], argv: list[str]) -> str:
  """A command's --help: its doc and flags, and with --config=<file> every key of that config (list_config).

  `--list_config` alone prints just the keys, so a researcher finds `quant.act.format` without reading source.
  """
  lines = [] if '--list_config' in argv else [doc.strip(), '', 'flags:'] + [
      f'  --{name:<22s} {what}' for name, what in {**flags, **COMMON_FLAGS}.items()]
  spec = next((a.partition('=')[2] for a in argv if a.startswith('--config=')), None)
  if spec is None:
    if not lines:  # --list_config alone: a mistake, so exit 2 like any other
      raise ConfigError('--list_config needs --config=<file>; --config=<file> --list_config lists every key of that '
                        'config with its value')
    lines += ['', '--config=<file> --help (or --list_config) lists every key of that config with its value.']
    return '\n'.join(lines)
  config, _ = parse_argv([a for a in argv if a.startswith('--config')])
  module, _ = load_module(spec)
  if lines:
    lines += ['', f'config keys of {spec} (override any with --config.<key>=value):']
  return '\n'.join(lines + list_config(config, comments(module.__file__)))


def comments(*paths: str) -> dict[str, str]:
  """Config key -> the '# comment' after its assignment in the config file, experiments/config/defaults.py (the
  runner's defaults) and experiments/config/quant.py (config.quant), the files that set the keys."""
  here = os.path.dirname(os.path.abspath(__file__))
  out = {}
  for path in (os.path.join(here, 'quant.py'), os.path.join(here, 'defaults.py'), *paths):
    with open(path) as f:
      for line in f:
        m = _COMMENTED.match(line)
        if m:
          out[_PREFIX[m.group(1)] + m.group(2)] = m.group(3).strip()
  return out


def list_config(config, notes: dict[str, str] | None = None) -> list[str]:
  """'key = value  # comment' for every leaf of a config, in its order."""
  flat = flatten(to_dict(config))
  width = max((len(k) for k in flat), default=0)
  notes = notes or {}
  return [f'  {k:<{width}s} = {v!r}' + (f'   # {notes[k]}' if k in notes else '') for k, v in flat.items()]


def flatten(d: Mapping[str, Any] | None, prefix: str = '', *, keep: tuple[type, ...] | None = None) -> dict[str, Any]:
  """A nested mapping as {dotted key: leaf}, the form config keys take on the command line (and TensorBoard's
  hparams keys). The one flattening the config layer, the sweep, the report and the TensorBoard writer share.

  keep: when given, only leaves of these types are kept (the others dropped), e.g. the scalars an hparams table
  can show; None keeps every leaf. An empty nested mapping contributes no key.
  """
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.', keep=keep))
    elif keep is None or isinstance(v, keep):
      out[f'{prefix}{k}'] = v
  return out


def changed_keys(old: dict, new: dict) -> list[str]:
  """The dotted keys whose values differ between two nested config dicts (a key in only one of them included)."""
  a, b = flatten(old), flatten(new)
  missing = object()
  return sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing))


def to_dict(config) -> dict:
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return {k: (to_dict(v) if isinstance(v, (dict, ml_collections.ConfigDict)) else v) for k, v in d.items()}


DEBUG_ENV = 'QJAX_DEBUG'


def debug_requested(argv: list[str] = ()) -> bool:
  """--debug on the command line or QJAX_DEBUG=1 in the environment: show tracebacks of user errors."""
  return '--debug' in argv or os.environ.get(DEBUG_ENV, '').lower() in ('1', 'true', 'yes')


def os_error_text(e: OSError) -> str:
  """One line for an OSError: what failed and on which path ('No space left on device: /runs/x/result.json')."""
  what = e.strerror or str(e) or type(e).__name__
  paths = [p for p in (e.filename, getattr(e, 'filename2', None)) if p]
  return what + (f': {" -> ".join(map(str, paths))}' if paths else '')


def main_guard(fn, *user_errors: type[BaseException], argv: list[str] | None = None) -> int:
  """Runs a command line's fn(argv) so that a person's mistake ends in one `error: ...` line and a non-zero exit.

  ConfigError exits 2; the command's own `user_errors` (its data, run and executor errors, qjax's RuleError) and
  OSErrors (a full disk, a path that is a file or read-only) exit 1; Ctrl-C exits 130 with the KeyboardInterrupt's
  message (what was saved, how to resume) when fn gave one. None of them prints a traceback unless --debug (taken
  out of argv here) or QJAX_DEBUG=1 asks for it. Any other exception is a bug and keeps its traceback.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = debug_requested(argv)
  if debug:  # what fn calls asks debug_requested() too
    os.environ[DEBUG_ENV] = '1'
  argv = [a for a in argv if a != '--debug']
  hint = '' if debug else f' (--debug or {DEBUG_ENV}=1 shows the traceback)'
  try:
    return fn(argv)
  except ConfigError as e:
    if debug:
      raise
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    if debug:
      raise
    print(f'interrupted: {e}' if str(e) else 'interrupted', file=sys.stderr)
    return 130
  except (OSError, *user_errors) as e:
    if debug:
      raise
    text = os_error_text(e) if isinstance(e, OSError) else str(e)
    # An OSError's or a library's ValueError (qjax.flax.RuleError wraps whatever an op raised) may come from deeper
    # than the user's input: say how to see where.
    print(f'error: {text}{hint if isinstance(e, OSError | ValueError) else ""}', file=sys.stderr)
    return 1


class ArgParser(argparse.ArgumentParser):
  """argparse for the commands that take positional arguments: a usage error is a ConfigError (one line, exit 2
  through main_guard), and --debug is accepted everywhere."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.add_argument('--debug', action='store_true', help=f'show tracebacks of errors (or set {DEBUG_ENV}=1)')

  def error(self, message: str):
    raise ConfigError(f'{message} (see {self.prog} --help)')


def writable_dir(path: str, flag: str) -> str:
  """Creates directory `path` when needed and checks a file can be written in it; a ConfigError names the flag.

  Run before any work, so a workdir that is a file, read-only or on a full disk fails in a second, not at the
  first checkpoint.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'--{flag}={path} is a file, not a directory; give a directory')
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write-check-'):
      pass
  except OSError as e:
    raise ConfigError(f'--{flag}={path}: cannot write there ({os_error_text(e)})') from None
  return path
