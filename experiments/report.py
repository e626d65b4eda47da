"""`python -m experiments.report <root>`: the report of a sweep root (experiments/review/report.py)."""

import sys

from experiments.review.report import main, write_report

__all__ = ['main', 'write_report']

if __name__ == '__main__':
  sys.exit(main())
