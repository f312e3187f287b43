"""The GPS filter against no filter, and a threshold calibrated with the filter, on the demo's world.

`landmarks recognize --gps-radius-km R` skips candidate landmarks farther than R km from where a
photo was taken. At the index's plain threshold that can only remove acceptances: the
false-positive rate falls below the target, and recall stays where it was. `landmarks index
--gps-radius-km R` also calibrates a threshold for photos that have a position, on the calibration
photos that have one, with the filter applied, at the same target FPR; the recogniser uses it for
such photos. This bench decides the same photos with the same index in three arms:

* **no filter** (the control: `landmarks recognize` without GPS);
* **filter, plain threshold** (`--gps-radius-km` with the index's plain threshold given by hand:
  the filter alone, a check that it only removes acceptances);
* **filter, GPS threshold** (`--gps-radius-km` on an index built with it).

Every photo has a position: the queries stand at their landmark (``queries.csv``), the
distractors and calibration photos in one of the world's cities (their ``lat,lon``, drawn by the
generator as for a user's everyday photos). For each arm it reports recall at the index's
threshold with the FPR that threshold achieves on the distractors; recall at the threshold that
admits exactly 1e-3 of the distractors' scores (free of the calibration draw); and, since one
fixed split of non-landmark photos into calibration photos and distractors is one draw, the same
over ``--splits`` random re-splits of the 8,500 unseen non-landmarks (calibration + distractors)
into 3,500 calibration photos and 5,000 distractors: the mean recall at the calibrated threshold,
and the mean FPR it achieves with how often it exceeds twice the target (both thresholds make the
same promise; this checks that each keeps it).

Each checkpoint gets the index the demo ships (the oracle-clean DB, every photo at 1.25 × the
input size, the non-landmark penalty over ``nonlandmarks.csv``, calibrated at FPR 1e-3 on
``calibration.csv``), built here with ``--gps-radius-km``; embeddings are cached. Usage::

    python bench/bench_gps_threshold.py --checkpoints runs/a/last.ckpt runs/b/last.ckpt --radius-km 50
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recognition.calibration import calibrate_threshold  # noqa: E402
from recognition.gps import read_gps_csv  # noqa: E402
from recognition.indexing import build_landmark_index  # noqa: E402
from recognition.recognizer import Recognizer  # noqa: E402
from retrieval.decision import accepts, threshold_at_fpr  # noqa: E402

ARMS = ("no filter (control)", "filter, plain threshold", "filter, GPS threshold")


def decision_scores(recognitions) -> np.ndarray:
    """Each photo's decision score (its best allowed landmark's); -inf where it has none."""
    return np.array([-np.inf if r.score is None else r.score for r in recognitions])


def figures(recognitions, truth: list[str | None], calibration_scores: np.ndarray, threshold: float,
            orders: list[np.ndarray], target: float) -> dict:
    landmark = np.array([t is not None for t in truth])
    accepted = np.array([r.accepted for r in recognitions])
    right = np.array([r.landmark_id == t for r, t in zip(recognitions, truth)])[landmark]
    scores = decision_scores(recognitions)
    queries, distractors = scores[landmark], scores[~landmark]
    at = threshold_at_fpr(distractors, target)
    out = {"threshold": threshold, "recall": float((accepted[landmark] & right).mean()),
           "fpr": float(accepted[~landmark].mean()), "p@1": float(right.mean()),
           "recall@distractor_fpr": float((right & accepts(queries, at)).mean())}
    # Re-splits of all unseen non-landmarks: calibrate on n_cal of them, count on the rest.
    pool, n_cal = np.concatenate([calibration_scores, distractors]), len(calibration_scores)
    recalls, fprs = [], []
    for order in orders:  # the same re-splits for every arm: paired
        t = calibrate_threshold(pool[order[:n_cal]], target).threshold
        recalls.append(float((right & accepts(queries, t)).mean()))
        fprs.append(float(accepts(pool[order[n_cal:]], t).mean()))
    out.update({"resplit_recall": float(np.mean(recalls)), "resplit_recall_sd": float(np.std(recalls)),
                "resplit_fpr": float(np.mean(fprs)), "resplit_above_2x": float(np.mean(np.array(fprs) > 2 * target))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--world", default="data/synthetic")
    parser.add_argument("--radius-km", type=float, default=50.0)
    parser.add_argument("--target-fpr", type=float, default=1e-3)
    parser.add_argument("--splits", type=int, default=2000, help="random re-splits of the unseen non-landmarks")
    parser.add_argument("--work", default="runs/bench_gps")
    parser.add_argument("--cache-dir", default="runs/embedding-cache")
    args = parser.parse_args()

    world, work = Path(args.world).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    queries = pd.read_csv(world / "queries.csv", dtype=str, keep_default_na=False)
    distractors = pd.read_csv(world / "distractors.csv", dtype=str, keep_default_na=False)
    calibration = [str(world / p) for p in pd.read_csv(world / "calibration.csv", dtype=str)["path"]]
    if "lat" not in distractors.columns:
        raise SystemExit(f"{world}: distractors.csv has no positions (a world of format 3 has them: regenerate it)")
    photos = [str(world / p) for p in list(queries["path"]) + list(distractors["path"])]
    truth = list(queries["landmark_id"]) + [None] * len(distractors)
    where = {**read_gps_csv(world / "queries.csv"), **read_gps_csv(world / "distractors.csv"),
             **read_gps_csv(world / "calibration.csv")}
    rng = np.random.default_rng(0)
    orders = [rng.permutation(len(calibration) + len(distractors)) for _ in range(args.splits)]
    results = []
    for i, checkpoint in enumerate(args.checkpoints):
        index, _ = build_landmark_index(
            world / "db.csv", work / f"index{i}", checkpoint=checkpoint, scales=(1.25,), where={"is_noise": "0"},
            nonlandmarks=world / "calibration.csv", nonlandmark_pool=world / "nonlandmarks.csv",
            target_fpr=args.target_fpr, gps_radius_km=args.radius_km, use_exif_gps=False, cache_dir=args.cache_dir,
            progress=False, num_workers=0, landmarks_csv=world / "landmarks.csv")
        common = dict(cache_dir=args.cache_dir, use_exif_gps=False)
        arms = {
            ARMS[0]: Recognizer(index, **common),
            ARMS[1]: Recognizer(index, threshold=index.threshold, gps_radius_km=args.radius_km, gps=where, **common),
            ARMS[2]: Recognizer(index, gps_radius_km=args.radius_km, gps=where, **common),
        }
        gps_threshold = index.gps_calibration.calibration.threshold
        row = {"checkpoint": checkpoint}
        for name, recognizer in arms.items():
            threshold = gps_threshold if name == ARMS[2] else index.threshold
            calibration_scores = decision_scores(recognizer.recognize(calibration))
            if name != ARMS[1]:
                # The machinery check: the recogniser's scores of the calibration photos give the
                # index's threshold back (the plain one without the filter, the GPS one with it).
                again = calibrate_threshold(calibration_scores, args.target_fpr).threshold
                assert np.isclose(again, threshold, rtol=0, atol=1e-6), (name, again, threshold)
            row[name] = figures(recognizer.recognize(photos), truth, calibration_scores, threshold, orders,
                                args.target_fpr)
        results.append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))

    def column(name, key):
        return [r[name][key] for r in results]

    print(f"\n{len(results)} checkpoint(s); radius {args.radius_km:g} km; target FPR {args.target_fpr:g}")
    for key, label in (("recall", "recall at the index's threshold"), ("fpr", "  FPR it achieves on the distractors"),
                       ("recall@distractor_fpr", "recall at FPR 1e-3 of the distractors"),
                       ("resplit_recall", f"recall at the calibrated threshold, {args.splits} re-splits"),
                       ("resplit_fpr", "  mean FPR on the rest"), ("resplit_above_2x", "  share of re-splits above 2x"),
                       ("p@1", "P@1")):
        print(label)
        for name in ARMS:
            values = column(name, key)
            digits = 4 if "fpr" in key else 3
            print(f"    {name:26s} " + " / ".join(f"{v:.{digits}f}" for v in values) + f"   mean {np.mean(values):.{digits}f}")


if __name__ == "__main__":
    main()
