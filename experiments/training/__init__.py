"""One run: the runner (runner.py, `python -m experiments.train`), the trainers that give Linen and NNX models one
interface (trainers.py), what a run reports about itself (summaries.py: per-layer SQNR, serving size and latency),
checkpoints (checkpoints.py), PTQ methods in the runner (ptq.py), devices and processes (distributed.py) and the
console progress line (progress.py)."""
