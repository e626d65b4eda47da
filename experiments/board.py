"""`python -m experiments.board <root>`: TensorBoard on a sweep root, on loopback (experiments/review/board.py)."""

import sys

from experiments.review.board import main, start

__all__ = ['main', 'start']

if __name__ == '__main__':
  sys.exit(main())
