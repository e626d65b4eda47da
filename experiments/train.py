"""`python -m experiments.train --config=configs/<name>.py --workdir=...`: one run (experiments/training/runner.py)."""

import sys

from experiments.config import cli as config_cli
from experiments.data.files import DataError
from experiments.training.runner import RunError, main, train_and_evaluate
from qjax.flax import RuleError

__all__ = ['main', 'train_and_evaluate']

if __name__ == '__main__':
  sys.exit(config_cli.main_guard(main, RunError, DataError, RuleError))
