"""Ablation sweeps: wandb sweep files run locally and offline, and their comparison.

* :mod:`sweeps.spec` — reads a wandb sweep file (``method: grid|random``, ``parameters``,
  ``program`` / ``command``) and expands it into runs and their command lines;
* :mod:`sweeps.runner` — ``landmarks sweep``: one process per run, resumable, optionally parallel;
* :mod:`sweeps.compare` — ``landmarks compare``: mean ± 95 % CI over seeds from the runs' CSV logs.
"""

from sweeps.spec import RunSpec, SweepError, SweepSpec, load_sweep

__all__ = ["RunSpec", "SweepError", "SweepSpec", "load_sweep"]
