"""The experiments' data: the datasets on disk (files.py), fetching them (sources.py), loading them (datasets.py),
batches for the runner (pipeline.py); `python -m experiments.data fetch|info|make-fixtures` (__main__.py).

The loaders are re-exported here: `from experiments.data import load_images`.
"""

from experiments.data.datasets import char_lm_splits, load_images, load_shakespeare, split_titles
from experiments.data.files import DataError

__all__ = ['DataError', 'char_lm_splits', 'load_images', 'load_shakespeare', 'split_titles']
