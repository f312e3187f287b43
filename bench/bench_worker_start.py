"""Loader workers from a fork server (``datamodules.workers``, the default) against workers forked
from the training process, side by side.

Alternating fresh ``landmarks fit`` runs of the demo's configuration (``bench/fit_arms.py``):
``--epochs`` epochs of training (the train loader starts its workers anew every epoch) and one
evaluation, with ``--data.worker_start=fork`` (the control) and with the default. Reported per arm:
median wall time, user and system CPU time, minor page faults and peak resident memory of every
process of the run (the fork server and its workers included), and the ratio of medians. Both arms
compute the same numbers: the bench checks that their evaluations agree to the digit.

    landmarks synth --out data/synthetic   # or any `landmarks demo` run, which generates it
    python bench/bench_worker_start.py --pairs 3
"""

from __future__ import annotations

from fit_arms import main

if __name__ == "__main__":
    main(__doc__, {"forked workers (control)": ({}, ["--data.worker_start=fork"]),
          "fork server": ({}, ["--data.worker_start=forkserver"])}, epochs=3)
