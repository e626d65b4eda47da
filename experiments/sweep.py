"""`python -m experiments.sweep --config=configs/<name>.py --root=...`: run a sweep (experiments/sweeps/launch.py)."""

import sys

from experiments.config import cli as config_cli
from experiments.sweeps.launch import main, run_sweep

__all__ = ['main', 'run_sweep']

if __name__ == '__main__':
  sys.exit(config_cli.main_guard(main))
