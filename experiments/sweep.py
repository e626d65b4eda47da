"""`python -m experiments.sweep --config=configs/<name>.py --root=...`: run a sweep (experiments/sweeps/launch.py),
its trials' configs checked by the runner first and its report written by experiments.review at the end."""

import functools
import sys

from experiments.config import cli as config_cli
from experiments.sweeps import launch

__all__ = ['main', 'run_sweep']


def _validate(config):
  # Imported when a sweep runs, not at the top: --help and --dry_run stay free of JAX (the runner's import).
  from experiments.training import runner  # noqa: PLC0415
  return runner.validate(config)


def _report(root: str) -> dict:
  # Imported once the trials are done: matplotlib and tensorboard are not needed before.
  from experiments.review import report  # noqa: PLC0415
  return report.write_report(root)


run_sweep = functools.partial(launch.run_sweep, validate=_validate, report=_report)
main = functools.partial(launch.main, validate=_validate, report=_report)

if __name__ == '__main__':
  sys.exit(config_cli.main_guard(main))
