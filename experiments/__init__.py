"""Experiments on qjax: data, models, training runs, sweeps, reviews and benchmarks (the tree: README.md).

The commands are thin modules here (train.py, sweep.py, report.py, board.py) or package entry points
(data/__main__.py, bench/__main__.py): `python -m experiments.<command> --help`.
"""
