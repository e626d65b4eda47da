"""The memory suite (no timing): served parameter bytes (f32 / int8 / packed int4), compiled training-step memory,
and the live bytes of quantize_nnx relative to the model alone.

    python -m experiments.bench --config=configs/bench_memory.py [--workdir=runs/bench/memory]
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import jax
import optax
from flax import nnx

from experiments.bench import harness as bench
from experiments.bench.e2e import model_def, quant_rules, random_batch, serving_forward
from experiments.bench.groups import GroupedSuite
from experiments.training import summaries, trainers
from qjax import flax as qflax


def live_bytes() -> int:
  """Bytes of all live jax arrays of this process."""
  gc.collect()
  return int(sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()))


class LivePeak:
  """Samples the live jax array bytes every `interval` seconds on a thread (a context manager); `.peak` is the
  largest sample (a lower bound of the true peak: XLA temporaries inside a jitted call are not live arrays)."""

  def __init__(self, interval: float = 0.002):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  def _run(self):
    while not self._stop.is_set():
      try:
        self.peak = max(self.peak, sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted()))
      except Exception:  # noqa: BLE001,S110 -- an array deleted while summing; the next sample counts.
        pass
      self._stop.wait(self.interval)

  def __enter__(self):
    self.peak = live_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, live_bytes())


def compiled_memory(fn, *args) -> dict[str, Any]:
  m = fn.lower(*args).compile().memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                                         'temp_size_in_bytes') if hasattr(m, k)}
  peak = getattr(m, 'peak_memory_in_bytes', None)
  if peak:
    out['peak_memory_in_bytes'] = int(peak)
  return out


def memory_records(config) -> dict[str, Any]:


  md = model_def('mlp', config)
  x, y = random_batch(config.train_batch, config.get('seed', 0))
  out: dict[str, Any] = {'model': f"mlp 784-{'-'.join(str(h) for h in config.mlp_hidden)}-10"}

  # Parameters as served, in memory and as an orbax checkpoint (orbax's defaults: zstd, OCDBT).
  served, on_disk = {}, {}
  for label, kind in (('float32', None), ('int8', 'ptq'), ('int4 packed', 'ptq_int4')):
    _, variables = serving_forward(md, None if kind is None else quant_rules(kind, config), x, config)
    served[label] = summaries.tree_bytes(variables)
    on_disk[label] = summaries.checkpoint_bytes(variables)
  out['served_param_bytes'] = served
  out['served_param_ratio_to_float'] = {k: v / served['float32'] for k, v in served.items()}
  out['checkpoint_bytes'] = on_disk
  out['checkpoint_ratio_to_float'] = {k: v / on_disk['float32'] for k, v in on_disk.items()}

  # Compiled training-step memory (donated state).
  steps = {}
  for label, kind in (('float', None), ('QAT int8 forward', 'qat'), ('int8 training', 'int8_train')):
    trainer = trainers.make(md, optax.adam(1e-3), None if kind is None else quant_rules(kind, config))
    state = trainer.init(jax.random.key(0), x)
    steps[label] = compiled_memory(jax.jit(trainer.train_step, donate_argnums=0), state, x, y)
    steps[label]['state_bytes'] = summaries.tree_bytes(state)
    del trainer, state
  out['train_step_memory'] = steps
  stats = jax.local_devices()[0].memory_stats()
  out['device_memory_stats'] = stats if stats else 'not available on this backend (None)'

  # Live bytes of quantize_nnx on the MLP relative to the model alone.
  gc.collect()
  base = live_bytes()
  model = md.make(nnx.Rngs(0))
  model_bytes = live_bytes() - base
  with LivePeak() as lp:
    qflax.quantize_nnx(model, quant_rules('qat', config), x)
  after = live_bytes() - base
  out['quantize_nnx_live_bytes'] = {
      'model_alone': model_bytes, 'after_quantize': after, 'sampled_peak_during_quantize': lp.peak - base,
      'ratio_after': after / model_bytes, 'ratio_peak': (lp.peak - base) / model_bytes,
      'note': 'live jax arrays (jax.live_arrays) including the sample batch; the peak is sampled every 2 ms on a '
              'thread (XLA temporaries inside the jitted creation run are not counted)'}
  del model
  return out


def memory_targets(records: dict[str, Any]) -> list[dict[str, Any]]:
  out = []
  q = records.get('quantize_nnx_live_bytes') or {}
  if q:
    ratio = max(q['ratio_after'], q['ratio_peak'])
    out.append({'group': 'memory', 'variant': 'quantize_nnx', 'text': 'peak memory of quantizing by rules <= 1.3x '
                'the model alone', 'max_ratio': 1.3, 'ratio': ratio, 'met': bool(ratio <= 1.3)})
  ck = records.get('checkpoint_ratio_to_float') or {}
  for label, limit in (('int8', 0.27), ('int4 packed', 0.15)):
    if label in ck:
      out.append({'group': 'memory', 'variant': f'{label} checkpoint', 'text': f'orbax serving checkpoint, {label} '
                  f'weights: <= {limit}x the float one', 'max_ratio': limit, 'ratio': ck[label],
                  'met': bool(ck[label] <= limit)})
  return out



@bench.register('memory')
def memory_suite(config) -> GroupedSuite:
  """No timing: parameter bytes as served, compiled training-step memory, live bytes of quantize_nnx."""
  return GroupedSuite('memory', lambda: iter(()), records=lambda: memory_records(config),
                      record_targets=memory_targets)
