"""Beyond one device: the mesh, data-parallel batches, model-axis sharding, and multi-process runs.

    config.mesh.data = -1     devices on the 'data' axis (-1: all that the model axis leaves)
    config.mesh.model = 1     devices on the 'model' axis: kernels (and their per-channel scales) are split
                              along their last (output) dimension when it divides
Several processes (hosts) join one run with jax.distributed: --coordinator_address=host:port
--num_processes=N --process_id=i, or the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; Slurm and similar launchers are detected by JAX itself).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

_FAST_KERNEL_FLAG = 'xla_cpu_experimental_ynn_fusion_type'


FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def initialize(flags: dict[str, str]) -> None:
  """Joins a multi-process run when a coordinator is given (flags win over the environment)."""
  addr = flags.pop('coordinator_address', None) or os.environ.get('JAX_COORDINATOR_ADDRESS')
  nproc = flags.pop('num_processes', None) or os.environ.get('JAX_NUM_PROCESSES')
  pid = flags.pop('process_id', None) or os.environ.get('JAX_PROCESS_ID')
  if addr is None and 'SLURM_JOB_ID' not in os.environ:
    return
  # CPU devices of different processes talk through gloo (set before the backend starts; no effect on GPU/TPU).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=addr, num_processes=None if nproc is None else int(nproc),
                             process_id=None if pid is None else int(pid))
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # No persistent compilation cache for CPU processes that share collectives: with jaxlib 0.12.1 a two-process
    # run on loopback whose program came from the cache ($JAX_COMPILATION_CACHE_DIR, one dir or one per process)
    # hung in its first all-reduce (the evaluation), and finished without the cache. jaxlib 0.12.0.1 did not hang.
    cache_dir = jax.config.jax_compilation_cache_dir or os.environ.get('JAX_COMPILATION_CACHE_DIR')
    if cache_dir:
      print(f'note: the persistent compilation cache ({cache_dir}) is off in this {jax.process_count()}-process '
            'CPU run (a cached program can hang its collectives)', file=sys.stderr)
    jax.config.update('jax_enable_compilation_cache', False)


def make_mesh(mesh_config) -> jax.sharding.Mesh:
  n = jax.device_count()
  model = int(mesh_config.model)
  data = int(mesh_config.data)
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(f'config.mesh: data={mesh_config.data} x model={model} does not match the {n} devices')
  devices = np.asarray(jax.devices()).reshape(data, model)
  return jax.sharding.Mesh(devices, ('data', 'model'))


def shard_batch(mesh, x: np.ndarray) -> jax.Array:
  """The global batch as an array sharded along 'data'; each process supplies its own slice of the rows."""
  x = np.asarray(x)
  sharding = NamedSharding(mesh, P('data'))
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  per = x.shape[0] // jax.process_count()
  local = x[jax.process_index() * per:(jax.process_index() + 1) * per]
  return jax.make_array_from_process_local_data(sharding, local, x.shape)


def spec_for(shape: tuple[int, ...], model_size: int) -> P:
  """Model-axis spec of one leaf: the last dim of >= 2-D arrays on 'model' when it divides; else replicated.

  Per-channel scales (1, ..., N) follow their kernel (..., N): the reduced axes (size 1) stay unsharded.
  """
  if model_size > 1 and len(shape) >= 2 and shape[-1] % model_size == 0 and shape[-1] >= model_size:
    return P(*([None] * (len(shape) - 1)), 'model')
  return P()


def place_state(mesh, state, mesh_config):
  model_size = mesh.shape['model']

  def put(a):
    if not hasattr(a, 'shape'):
      return a
    return jax.device_put(a, NamedSharding(mesh, spec_for(tuple(a.shape), model_size)))
  return jax.tree.map(put, state)


def xla_flag_warning(flags: str) -> str | None:
  """A warning when XLA_FLAGS override the CPU fast-kernel setting (an empty value makes int8 ~8x slower)."""
  if _FAST_KERNEL_FLAG in flags:
    return (f'XLA_FLAGS sets --{_FAST_KERNEL_FLAG}: XLA:CPU fast kernels (YNNPACK) may be off; an empty value '
            'makes int8 matmuls about 8x slower than with the default, so speed results are not comparable')
  return None
