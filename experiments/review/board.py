"""Serve TensorBoard on a sweep root, bound to loopback by default.

  python -m experiments.board runs/mnist_qat/bits_x_scheme [--host 127.0.0.1] [--port 0]

prints `TensorBoard at http://127.0.0.1:PORT/ (logdir: ...)` and serves until Ctrl-C (or SIGTERM).
`--port 0` (the default) takes a free port. Reach a remote machine's board through an SSH tunnel
(`ssh -L 6006:127.0.0.1:PORT host`) rather than binding a public address.

`start(logdir)` runs the same command in a subprocess and returns `(url, Board)` once the server
answers HTTP, for tests and notebooks; `Board.stop()` ends that process (and only it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from experiments.config import cli as config_cli

__all__ = ['Board', 'main', 'serve', 'start']

_READY = re.compile(r'^TensorBoard at (http://\S+/) \(logdir: ')
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _launch(logdir: str, host: str, port: int, load_fast: str, reload_interval: float) -> str:
  """Starts TensorBoard's server in a daemon thread of this process; returns its URL."""
  from tensorboard import program  # import here: `start()` callers never need it in-process

  server = program.TensorBoard()
  server.configure(
    argv=[
      'tensorboard',
      '--logdir', logdir,
      '--host', host,
      '--port', str(port),
      '--load_fast', load_fast,
      '--reload_interval', str(reload_interval),
    ]
  )  # fmt: skip
  return server.launch()


def serve(
  logdir: str | os.PathLike,
  host: str = '127.0.0.1',
  port: int = 0,
  *,
  load_fast: str = 'false',
  reload_interval: float = 5.0,
) -> None:
  """Serves in this process, printing the ready line, until KeyboardInterrupt or SIGTERM."""
  logdir = os.path.abspath(os.fspath(logdir))
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f'no such logdir: {logdir}')

  def on_sigterm(signum, frame):
    raise KeyboardInterrupt

  signal.signal(signal.SIGTERM, on_sigterm)
  signal.signal(signal.SIGINT, signal.default_int_handler)  # even where a shell started us ignoring it
  url = _launch(logdir, host, port, load_fast, reload_interval)
  print(f'TensorBoard at {url} (logdir: {logdir})', flush=True)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    print('TensorBoard stopped', flush=True)


def main(argv: list[str] | None = None) -> int:
  """The command line; a mistake (no such logdir, a bad --port, a port in use) is one `error:` line."""
  return config_cli.main_guard(_main, argv=argv)


def _main(argv: list[str]) -> int:
  parser = config_cli.ArgParser(prog='python -m experiments.board', description=__doc__.split('\n')[0])
  parser.add_argument('logdir', help='sweep root or single run directory')
  parser.add_argument('--host', default='127.0.0.1', help='address to bind (default: 127.0.0.1, loopback only)')
  parser.add_argument('--port', type=int, default=0, help='port (default: 0, a free port)')
  parser.add_argument(
    '--load_fast', default='false', choices=('false', 'true', 'auto'), help="TensorBoard's Rust data server"
  )
  parser.add_argument('--reload_interval', type=float, default=5.0, help='seconds between logdir rescans')
  args = parser.parse_args(argv)
  if not 0 <= args.port <= 65535:  # TensorBoard would fail with an OverflowError traceback
    raise config_cli.ConfigError(f'--port={args.port}: expected 0..65535 (0 takes a free port)')
  if not os.path.isdir(args.logdir):
    raise config_cli.ConfigError(f'no such logdir: {os.path.abspath(args.logdir)} (a sweep root or a run directory)')
  try:
    serve(args.logdir, args.host, args.port, load_fast=args.load_fast, reload_interval=args.reload_interval)
  except Exception as e:
    if type(e).__name__ == 'TensorBoardPortInUseError':  # tensorboard.program's; its message names the port
      raise config_cli.ConfigError(f'{e}; --port=0 takes a free one') from None
    raise
  return 0


class Board:
  """A TensorBoard subprocess started by `start`. Callable: `board()` is `board.stop()`."""

  def __init__(self, url: str, process: subprocess.Popen, log_path: str, logdir: str):
    self.url = url
    self.process = process
    self.log_path = log_path
    self.logdir = logdir
    parsed = urllib.parse.urlparse(url)
    self.host = parsed.hostname
    self.port = parsed.port

  @property
  def pid(self) -> int:
    return self.process.pid

  def log(self) -> str:
    """The server's stdout and stderr so far."""
    try:
      return Path(self.log_path).read_text(errors='replace')
    except FileNotFoundError:
      return ''

  def stop(self, timeout: float = 10.0) -> None:
    """SIGINT, then SIGTERM, then SIGKILL, each after `timeout` s; idempotent."""
    _stop_process(self.process, timeout)
    try:
      os.remove(self.log_path)
    except FileNotFoundError:
      pass

  __call__ = stop

  def __enter__(self) -> Board:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()

  def __repr__(self) -> str:
    return f'Board(url={self.url!r}, pid={self.pid}, logdir={self.logdir!r})'


def _stop_process(process: subprocess.Popen, timeout: float) -> None:
  for send in (lambda: process.send_signal(signal.SIGINT), process.terminate, process.kill):
    if process.poll() is not None:
      return
    send()
    try:
      process.wait(timeout=timeout)
      return
    except subprocess.TimeoutExpired:
      continue


def _answers_http(url: str) -> bool:
  try:
    with urllib.request.urlopen(url + 'data/environment', timeout=2) as response:
      return response.status == 200
  except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
    return False


def start(
  logdir: str | os.PathLike,
  host: str = '127.0.0.1',
  port: int = 0,
  *,
  timeout: float = 60.0,
  load_fast: str = 'false',
  reload_interval: float = 5.0,
) -> tuple[str, Board]:
  """Starts `python -m experiments.board logdir` in a subprocess; returns `(url, board)` once the
  server answers HTTP. Raises RuntimeError (with the server's log) if it exits or is not ready
  within `timeout` seconds; the subprocess is stopped in that case. Stop it with `board.stop()`.
  """
  logdir = os.path.abspath(os.fspath(logdir))
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f'no such logdir: {logdir}')
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get('PYTHONPATH')) if p)
  env['PYTHONUNBUFFERED'] = '1'
  fd, log_path = tempfile.mkstemp(prefix='tensorboard-', suffix='.log')
  command = [
    sys.executable, '-m', 'experiments.board', logdir,
    '--host', host,
    '--port', str(port),
    '--load_fast', load_fast,
    '--reload_interval', str(reload_interval),
  ]  # fmt: skip
  with os.fdopen(fd, 'wb') as log_file:
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=_REPO_ROOT)

  def fail(reason: str) -> RuntimeError:
    _stop_process(process, 5.0)
    log = Path(log_path).read_text(errors='replace')
    os.remove(log_path)
    return RuntimeError(f'TensorBoard on {logdir} {reason}; command: {" ".join(command)}\n--- log ---\n{log}')

  deadline = time.monotonic() + timeout
  url = None
  while time.monotonic() < deadline:
    if url is None:
      for line in Path(log_path).read_text(errors='replace').splitlines():
        match = _READY.match(line)
        if match:
          url = match.group(1)
    if url is not None and _answers_http(url):
      return url, Board(url, process, log_path, logdir)
    if process.poll() is not None:
      raise fail(f'exited with code {process.returncode} before answering HTTP')
    time.sleep(0.1)
  raise fail(f'did not answer HTTP within {timeout:.0f}s' + ('' if url else ' (no ready line printed)'))
