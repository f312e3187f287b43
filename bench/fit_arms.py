"""Alternating fresh ``landmarks fit`` runs of the demo's configuration, arm against arm (the shared
part of ``bench_allocator.py`` and ``bench_worker_start.py``; not a bench by itself).

Each run is a fresh ``landmarks fit`` process with the demo's own configuration (ArcFace + its
recipe + bf16 inference, 96 px, the seed-0 world's noisy DB): ``epochs`` epochs of training and one
evaluation of the ~13,300 evaluation photos at 1.25 × the input size, as the demo's fit ends. The
arms alternate run by run, so that the machine's drift falls on all of them. Per run: wall time,
and the user and system CPU time, minor page faults and largest peak resident memory of every
process the run started. This bench adopts the run's orphans (``PR_SET_CHILD_SUBREAPER``), so a
fork server's workers, which are not the run's children, are counted too. The arms must compute
the same numbers: the evaluations are checked to agree to the digit.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
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
KEYS = ["wall", "user", "sys", "minflt", "maxrss_gib"]
_PR_SET_CHILD_SUBREAPER = 36


def run(env: dict[str, str], extra: list[str], epochs: int, world: str, out: Path) -> dict:
    args = [LANDMARKS, "fit", *(a for c in CONFIGS for a in ("--config", str(ROOT / "experiments" / c))),
            f"--trainer.max_epochs={epochs}", f"--trainer.check_val_every_n_epoch={epochs}",
            "--trainer.enable_progress_bar=false", f"--data.data_dir={world}", "--data.calibration_manifest=calibration.csv",
            "--data.evaluate_nonlandmark_pool=true", "--model.eval_scales=[1.25]", *extra]
    # In its own folder, so that its runs/ (CSV and offline wandb logs) stays out of the project's.
    out.mkdir(parents=True)
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=out, env={**os.environ, "WANDB_MODE": "offline", **env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if (code := os.waitstatus_to_exitcode(status)) != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit status {code}")
    totals = {"user": usage.ru_utime, "sys": usage.ru_stime, "minflt": usage.ru_minflt, "maxrss": usage.ru_maxrss}
    # The run's own usage includes the children it waited for (forked loader workers). Its other
    # descendants (a fork server, which reaps its own workers, and multiprocessing's resource
    # tracker) outlive it by a moment and are reaped here: getrusage(RUSAGE_CHILDREN) would carry
    # the largest peak of every earlier run instead.
    while True:
        try:
            _, _, orphan = os.wait4(-1, 0)
        except ChildProcessError:
            break
        totals["user"] += orphan.ru_utime
        totals["sys"] += orphan.ru_stime
        totals["minflt"] += orphan.ru_minflt
        totals["maxrss"] = max(totals["maxrss"], orphan.ru_maxrss)
    metrics = next(out.rglob("metrics.csv"))
    last = [row for row in csv.DictReader(metrics.open()) if row.get("val/p@1")][-1]
    return {"wall": wall, "user": totals["user"], "sys": totals["sys"], "minflt": totals["minflt"],
            "maxrss_gib": totals["maxrss"] / 2**20,
            "recall@1e-3": last.get("val/recall@fpr=1e-03") or "n/a", "p@1": last["val/p@1"]}


def compare(arms: dict[str, tuple[dict[str, str], list[str]]], pairs: int, epochs: int, world: str,
            extra: list[str]) -> None:
    """Run every arm ``pairs`` times, alternating; print each run, then the table of medians. The
    first arm is the control the ratios divide by."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    rows: dict[str, list[dict]] = {name: [] for name in arms}
    world = str((ROOT / world).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(pairs):
            for i, (name, (env, arm_extra)) in enumerate(arms.items()):
                result = run(env, arm_extra + extra, epochs, world, Path(tmp) / f"{pair}-{i}")
                rows[name].append(result)
                print(f"pair {pair} {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in result.items()), flush=True)
    figures = {(r["recall@1e-3"], r["p@1"]) for runs in rows.values() for r in runs}
    if len(figures) != 1:
        raise SystemExit(f"the arms' evaluations differ: {sorted(figures)}")
    recall, p_at_1 = next(iter(figures))
    print(f"\nevery run's evaluation: recall@FPR 1e-3 {recall}, P@1 {p_at_1}\n")
    medians = {name: {k: statistics.median(r[k] for r in runs) for k in KEYS} for name, runs in rows.items()}
    print("| arm | " + " | ".join(f"median {k}" for k in KEYS) + " |")
    print("|---|" + "---:|" * len(KEYS))
    for name, m in medians.items():
        print(f"| {name} | " + " | ".join(f"{m[k]:,.0f}" if k == "minflt" else f"{m[k]:.2f}" for k in KEYS) + " |")
    control = medians[next(iter(arms))]
    for name, m in list(medians.items())[1:]:
        print(f"| ratio ({name} / control) | " + " | ".join(f"{m[k] / control[k]:.2f}" for k in KEYS) + " |")


def main(doc: str, arms: dict[str, tuple[dict[str, str], list[str]]], epochs: int) -> None:
    """A bench's command line: ``--pairs``, ``--epochs`` (default ``epochs``), ``--world``, ``--extra``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--world", default="data/synthetic")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `landmarks fit` arguments")
    args = parser.parse_args()
    compare(arms, args.pairs, args.epochs, args.world, args.extra)
