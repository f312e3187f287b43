"""Freed memory kept in the process (``core.allocator``) against glibc's defaults, side by side.

Each run is a fresh ``landmarks fit`` process with the demo's own configuration (ArcFace + its
recipe + bf16 inference, 96 px, the seed-0 world's noisy DB): ``--epochs`` epochs of training and
one evaluation of the ~13,300 evaluation photos at 1.25 × the input size, as the demo's fit ends.
The runs alternate between ``LANDMARKS_KEEP_FREED_MEMORY=0`` (the control: glibc's defaults) and
the default (kept), so that the machine's drift falls on both. Reported per arm: median wall
time, user and system CPU time, minor page faults and peak resident memory of the process and its
loader workers (``wait4`` on the run's process; one run at a time), and the ratio of medians.
Both arms compute the same numbers: the bench checks that their evaluations agree to the digit.

    landmarks synth --out data/synthetic   # or any `landmarks demo` run, which generates it
    python bench/bench_allocator.py --pairs 3
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LANDMARKS = str(Path(sys.executable).with_name("landmarks"))
CONFIGS = ["demo.yaml", "arcface.yaml", "recipes/lr_warmup.yaml", "recipes/nonlandmark_push.yaml",
           "recipes/hard_nonlandmarks.yaml", "recipes/mild_augmentation.yaml", "bf16_inference.yaml"]


def run(keep: bool, epochs: int, world: str, out: Path, extra: list[str]) -> dict:
    args = [LANDMARKS, "fit", *(a for c in CONFIGS for a in ("--config", str(ROOT / "experiments" / c))),
            f"--trainer.max_epochs={epochs}", f"--trainer.check_val_every_n_epoch={epochs}",
            "--trainer.enable_progress_bar=false", f"--data.data_dir={world}", "--data.calibration_manifest=calibration.csv",
            "--data.evaluate_nonlandmark_pool=true", "--model.eval_scales=[1.25]", *extra]
    env = {**os.environ, "LANDMARKS_KEEP_FREED_MEMORY": "1" if keep else "0", "WANDB_MODE": "offline"}
    # In its own folder, so that its runs/ (CSV and offline wandb logs) stays out of the project's.
    out.mkdir(parents=True)
    start = time.perf_counter()
    # The run's own usage, its loader workers included: wait4 on its process (getrusage's
    # RUSAGE_CHILDREN would carry the largest peak of every earlier run).
    process = subprocess.Popen(args, cwd=out, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit status {code}")
    metrics = next(out.rglob("metrics.csv"))
    last = [row for row in csv.DictReader(metrics.open()) if row.get("val/p@1")][-1]
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt,
            "maxrss_gib": usage.ru_maxrss / 2**20,
            "recall@1e-3": last.get("val/recall@fpr=1e-03") or "n/a", "p@1": last["val/p@1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--world", default="data/synthetic")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `landmarks fit` arguments")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"glibc defaults (control)": [], "freed memory kept": []}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.pairs):
            for keep, name in ((False, "glibc defaults (control)"), (True, "freed memory kept")):
                result = run(keep, args.epochs, str((ROOT / args.world).resolve()), Path(tmp) / f"{pair}-{int(keep)}",
                             args.extra)
                rows[name].append(result)
                print(f"pair {pair} {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in result.items()), flush=True)
    figures = {(r["recall@1e-3"], r["p@1"]) for runs in rows.values() for r in runs}
    if len(figures) != 1:
        raise SystemExit(f"the arms' evaluations differ: {sorted(figures)}")
    recall, p_at_1 = next(iter(figures))
    print(f"\nevery run's evaluation: recall@FPR 1e-3 {recall}, P@1 {p_at_1}\n")
    keys = ["wall", "user", "sys", "minflt", "maxrss_gib"]
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in keys} for name, runs in rows.items()}
    print("| arm | " + " | ".join(f"median {k}" for k in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, m in medians.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:,.0f}" if k == "minflt" else f"{m[k]:.2f}" for k in keys) + " |")
    control, kept = medians.values()
    print("| ratio (kept / control) | " + " | ".join(f"{kept[k] / control[k]:.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
