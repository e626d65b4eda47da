"""`python -m experiments.peer_ptq --config=configs/peer_ptq_fmnist.py --workdir=...`: qjax's PTQ methods side by side
with Qwix's (experiments/training/peer_ptq.py)."""

import sys

from experiments.config import cli as config_cli
from experiments.data.files import DataError
from experiments.training.peer_ptq import main
from experiments.training.runner import RunError

__all__ = ['main']

if __name__ == '__main__':
  sys.exit(config_cli.main_guard(main, RunError, DataError))
