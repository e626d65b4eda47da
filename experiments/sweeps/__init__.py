"""Sweeps: the language config files declare them in (language.py), running one trial (trials.py; its claim is
experiments.fileio.Claim), the executors that run trials (executors.py) and the launcher (launch.py,
`python -m experiments.sweep`).

Config files write `from experiments import sweeps` and use the language through this package:
`sweeps.axis`, `sweeps.product`, `sweeps.zipped`, `sweeps.chain`, `sweeps.trial_ref`.
"""

from experiments.sweeps.language import (  # noqa: F401
  Sweep,
  Trial,
  TrialRef,
  axis,
  chain,
  config_id,
  expand,
  get_sweep,
  hparam_domains,
  is_seed_key,
  label,
  product,
  short_key_names,
  short_names,
  trial_ref,
  zipped,
)
