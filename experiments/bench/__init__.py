"""Benchmarks: every figure a time ratio to a float baseline timed in the same run.

  harness.py     the command line, the suite registry, single-group suites (`Suite`)
  groups.py      grouped suites (`GroupedSuite`: groups of variants, targets, flags) and their outputs
  markdown.py    the grouped report's markdown
  timing.py      interleaved timing, ratios, machine info
  <suite>.py     one file per suite, registered on import: fake_quant, raw_dot, qmatmul, train_matmul, e2e,
                 memory, conv, gpu (`config.suite` names it; `python -m experiments.bench --config=...`)
"""

from experiments.bench.harness import SUITES, Suite, get_suite, register, run  # noqa: F401  (the suite authors' API)
