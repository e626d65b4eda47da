"""Reading runs after the fact: a sweep root's results, report and Pareto plots (results.py, report.py, plots.py;
`python -m experiments.report`), TensorBoard event files without TensorFlow (tensorboard.py, tb_values.py,
tb_hparams.py), the board that serves them (board.py, `python -m experiments.board`) and the PTQ-methods table of
docs/results.md (ptq_table.py)."""
