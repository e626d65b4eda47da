"""Checkpoints (orbax) and run files: resumable runs that never overwrite a finished result.

    <workdir>/config.json     the resolved config, written at the start
    <workdir>/checkpoints/    orbax checkpoints every N steps (the last few kept)
    <workdir>/result.json     written atomically (temp file + rename) when the run finishes
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
  """An orbax CheckpointManager over a pytree of arrays, keyed by step."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    with signals_deferred():  # never a half-written checkpoint: Ctrl-C (or SIGTERM) acts once this one is complete
      self.manager.save(step, args=ocp.args.StandardSave(tree))
      self.manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    abstract = _abstract(like)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.close()


@contextlib.contextmanager
def signals_deferred():
  """Holds SIGINT, and SIGTERM where a Python handler takes it (experiments.train, sweep workers: it raises
  KeyboardInterrupt there), until the block ends, then hands each to the handler that was in place
  (KeyboardInterrupt by default; nothing where it was ignored). Only the main thread can install signal
  handlers."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []
  held = [signal.SIGINT] + ([signal.SIGTERM] if callable(signal.getsignal(signal.SIGTERM)) else [])
  previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for s in dict.fromkeys(caught):
    if callable(previous[s]):
      previous[s](s, None)


def _abstract(tree):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=getattr(a, 'sharding', None))
                      if hasattr(a, 'dtype') else a, tree)
