"""A console progress line: step, loss, throughput and ETA (redrawn in place on a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
  """The rate and ETA count from the first update on: the step before it includes the compilation, which would
  make the first ETA many times too long."""

  def __init__(self, total: int, start: int = 0, stream=None, min_interval: float = 0.5):
    self.total, self.start, self.stream = total, start, stream or sys.stderr
    self.t0 = None
    self.last = 0.0
    self.min_interval = min_interval
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()

  def rate(self, step: int) -> float:
    if self.t0 is None:
      return 0.0
    dt = time.time() - self.t0
    return (step - self.start) / dt if dt > 0 else 0.0

  def update(self, step: int, **metrics) -> None:
    now = time.time()
    if self.t0 is None:  # the steps so far paid for compiling: time from here
      self.t0, self.start = now, step
    if now - self.last < (self.min_interval if self.tty else 10.0) and step < self.total:
      return
    self.last = now
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    frac = step / max(self.total, 1)
    bar = '#' * int(20 * frac) + '-' * (20 - int(20 * frac))
    vals = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
    line = f'[{bar}] {step}/{self.total} {vals} {rate:.1f} steps/s eta {_fmt(eta)}'
    if self.tty:
      self.stream.write('\r' + line[:150].ljust(150))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self) -> None:
    if self.tty:
      self.stream.write('\n')
      self.stream.flush()


def _fmt(seconds: float) -> str:
  if seconds != seconds:
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
