"""Benchmark: the cost of RetrievalEvaluation(centroid_index=True) over the kNN-only evaluation.

What is timed: ``RetrievalEvaluation._compute`` (rank 0's work at the end of a validation: every
metric from the gathered embeddings; plots off, since they are the same either way) with
``centroid_index=False`` (kNN figures: flat index over the gallery, search of queries and
distractors, recall/precision at FPR, GAP, P@1, mAP@k) and ``centroid_index=True`` (the same plus
:func:`recognition.evaluation.evaluate_centroid_index`: shooting-angle clustering of every
landmark, a flat index over the centroids, calibration on the distractors, the decisions).
The embedding pass that precedes both (the network over every evaluation image) is not included.

Data: the demo's evaluation sizes (``experiments/demo.yaml`` on the synthetic world: gallery
2700 = 100 landmarks x 27 photos after oracle cleaning, 485 landmark queries, 5000 distractors,
512-d embeddings). Each landmark has 2-3 shooting angles: angle direction = unit(landmark +
unit random), photo = unit(angle + N(0, noise^2 I)); at noise 0.025 photos of one angle are
~0.24 apart in cosine distance and photos of different angles ~0.6, so the 0.3 cut finds the
angles. 30 % of the distractors are look-alikes (unit(a random landmark's angle + spread x unit random +
noise)),
the rest random (``--spread`` sets how far the look-alikes are).

The two settings alternate within each repeat (after one warm-up of each), so machine load falls
on both; reported are the medians, their ratio and the median of the per-repeat ratios.

Usage::

    python bench/bench_centroid_evaluation.py              # the BENCHMARKS.md setting
    python bench/bench_centroid_evaluation.py --repeats 3  # quicker
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from callbacks.retrieval_evaluation import RetrievalEvaluation  # noqa: E402
from core.labels import NONLANDMARK  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_metrics import lscpu_model  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_data(landmarks: int, per_landmark: int, queries: int, distractors: int, dim: int, noise: float,
              spread: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((landmarks, dim)))
    angles = [_unit(c + _unit(rng.standard_normal((rng.integers(2, 4), dim)))) for c in centres]

    def photos(lm: np.ndarray) -> np.ndarray:
        which = [angles[i][rng.integers(len(angles[i]))] for i in lm]
        return _unit(np.asarray(which) + noise * rng.standard_normal((len(lm), dim)))

    g_labels = np.repeat(np.arange(landmarks), per_landmark)
    q_labels = rng.integers(0, landmarks, queries)
    hard = int(0.3 * distractors)
    seen = np.array([angles[i][rng.integers(len(angles[i]))] for i in rng.integers(0, landmarks, hard)])
    look_alikes = _unit(seen + spread * _unit(rng.standard_normal((hard, dim)))
                        + noise * rng.standard_normal((hard, dim)))
    d = np.concatenate([look_alikes, _unit(rng.standard_normal((distractors - hard, dim)))])
    return {
        "gallery": (photos(g_labels), g_labels, 0),
        "queries": (photos(q_labels), q_labels, 0),
        "distractors": (d, np.full(len(d), NONLANDMARK), 0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--landmarks", type=int, default=100)
    p.add_argument("--per-landmark", type=int, default=27)
    p.add_argument("--queries", type=int, default=485)
    p.add_argument("--distractors", type=int, default=5000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=0.025)
    p.add_argument("--spread", type=float, default=0.4, help="look-alike distractor = landmark + spread x random")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    gathered = make_data(args.landmarks, args.per_landmark, args.queries, args.distractors, args.dim, args.noise,
                         args.spread, args.seed)
    callbacks = {False: RetrievalEvaluation(plots=False), True: RetrievalEvaluation(plots=False, centroid_index=True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    metrics = {}
    for rep in range(args.repeats + 1):  # rep 0 is the warm-up
        for option, callback in callbacks.items():
            t0 = time.perf_counter()
            metrics[option] = callback._compute(None, gathered, "val", Path("."), "val")
            seconds = time.perf_counter() - t0
            if rep:
                times[option].append(seconds)
            print(f"  rep {rep}{' (warm-up)' if not rep else ''} centroid_index={option}: {seconds:.3f} s",
                  file=sys.stderr)

    med = {option: statistics.median(ts) for option, ts in times.items()}
    m = metrics[True]
    print(f"\nMachine: {os.cpu_count()} CPU cores, {lscpu_model()}; 1-min load average {os.getloadavg()[0]:.2f}")
    print(f"Command: python bench/bench_centroid_evaluation.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"Data: gallery {len(gathered['gallery'][1])} ({args.landmarks} landmarks), queries "
          f"{len(gathered['queries'][1])}, distractors {len(gathered['distractors'][1])}, {args.dim}-d; "
          f"centroid index: {m['centroid/n_vectors']} vectors, {m['centroid/dropped_images']} images dropped")
    print()
    print(f"| evaluation | wall time, median of {args.repeats} (runs) | ratio |")
    print("|---|---|---|")
    labels = {False: "kNN only (`centroid_index=False`)", True: "kNN + centroid index (`centroid_index=True`)"}
    for option, label in labels.items():
        runs = ", ".join(f"{t:.3f}" for t in times[option])
        print(f"| {label} | {med[option]:.3f} s ({runs}) | {med[option] / med[False]:.2f}x |")
    pairs = statistics.median(b / a for a, b in zip(times[False], times[True]))
    print(f"\nMedian of the per-repeat ratios: {pairs:.2f}x; added time, median: "
          f"{statistics.median(b - a for a, b in zip(times[False], times[True])):.3f} s")
    print()
    for a in ("1e-02", "1e-03"):
        if f"recall@fpr={a}" in m:
            print(f"recall@fpr={a}: kNN {m[f'recall@fpr={a}']:.4f}, centroid {m[f'centroid/recall@fpr={a}']:.4f}")


if __name__ == "__main__":
    main()
