"""`python -m experiments.bench --config=configs/bench_<suite>.py`: the benchmark harness's command line."""

import sys

from experiments.bench import harness
from experiments.config import cli as config_cli

if __name__ == '__main__':
  sys.exit(config_cli.main_guard(harness.main))
