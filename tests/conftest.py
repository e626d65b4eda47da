"""Shared pytest setup: run JAX on the CPU so results do not depend on an attached accelerator, compile with LLVM
at -O0 (the suite is compile-bound), and give the test processes and the subprocesses they start one persistent
compilation cache for the whole run."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent JAX compilation cache per test run, shared by the pytest workers and the subprocesses tests start
# (the CLIs, sweeps' trials, the README's commands; they inherit the environment, and a sweep's trials use it
# instead of their root's cache). They compile the same programs again and again: the fixture models' steps, and
# the eager ops of PTQ and conversion at the same shapes, in tests that build their own jitted functions (so JAX's
# in-memory cache, keyed by function, misses where this one, keyed by the program, hits). Ad hoc, on a 2-core AMD
# EPYC Zen 3 (2026-12-06): the char-LM's runlocal float and int8 training steps compiled in 1.1 s and 2.8 s, with
# or without writing the entry, and loaded from the cache in 0.1 s and 0.3 s (a ResNet PTQ run: 82 s cold, 22 s
# warm). Full runs there (-n 2): 19 min 36 s with the cache in the subprocesses only, 15 min 59 s with it in the
# workers too (4,500 hits of 19,800 compiles). The cache starts empty each run, so no run reads another's entries.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='qjax-tests-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

# LLVM at -O0 for the tests' programs (and their subprocesses'): the suite is compile-bound (hundreds of small
# programs, each run a few times). The flag sets the optimization level of XLA:CPU's LLVM code generation only: the
# optimized HLO that the inspection tests read (int8 dots and convs in YNNPACK fusions) is the same text with and
# without it. Measured on the 2-core Xeon, consecutive full runs (-n 2): 22 min 02 s -> 13 min 43 s.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=0').strip()

# Start XLA's CPU backend now, under the flags above. XLA reads XLA_FLAGS once per process, when the backend starts:
# a test that patches XLA_FLAGS to check a warning (tests/test_timing.py turns YNNPACK fusions off) set them for
# every later test of its pytest worker whenever it happened to start the backend there, and the int8 inspection
# tests of tests/test_bench.py then failed (found running test_timing.py and test_bench.py in one worker).
import jax  # noqa: E402

jax.devices()
