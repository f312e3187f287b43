"""Freed memory kept in the process (``core.allocator``) against glibc's defaults, side by side.

Alternating fresh ``landmarks fit`` runs of the demo's configuration (``bench/fit_arms.py``):
``--epochs`` epochs of training and one evaluation, with ``LANDMARKS_KEEP_FREED_MEMORY=0`` (the
control: glibc's defaults) and with the default (kept). Reported per arm: median wall time, user
and system CPU time, minor page faults and peak resident memory of every process of the run, and
the ratio of medians. Both arms compute the same numbers: the bench checks that their evaluations
agree to the digit.

    landmarks synth --out data/synthetic   # or any `landmarks demo` run, which generates it
    python bench/bench_allocator.py --pairs 3
"""

from __future__ import annotations

from fit_arms import main

if __name__ == "__main__":
    main(__doc__, {"glibc defaults (control)": ({"LANDMARKS_KEEP_FREED_MEMORY": "0"}, []),
          "freed memory kept": ({"LANDMARKS_KEEP_FREED_MEMORY": "1"}, [])}, epochs=1)
