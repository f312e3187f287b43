"""A non-landmark penalty on the shipped decision: does lowering a photo's score by its similarity
to known non-landmark photos raise recall at low FPR? (issue 17, item 2, last bullet)

The demo chain's index (`runs/demo/chain-seed0/index`: centroids of the cleaned DB, the trained
checkpoint) is searched by the held-out queries and the unseen distractors. Each photo's decision
score becomes ``s - beta * m(q)`` (``LandmarkIndex.set_penalty``, what ``landmarks index
--nonlandmark-pool`` stores), where ``m(q)`` is the mean cosine of the photo to its ``k``
nearest photos of a non-landmark pool: the non-landmark photos the model trained on
(``nonlandmarks.csv``), which an index could store. The threshold is calibrated at FPR 1e-3 on
``calibration.csv`` (other non-landmarks, penalised the same way), as ``landmarks index`` does;
recall and the achieved FPR are measured on the queries and the distractors. recall@FPR (threshold
from the distractors themselves) is shown too. ``beta = 0`` is the control: it must reproduce the
demo's recognize stage.

    python bench/bench_nonlandmark_penalty.py --chain runs/demo/chain-seed0 --world data/synthetic
    # other seeds: `landmarks demo --seed N` first, then --chain runs/demo/chain-seedN --world data/synthetic-seedN
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_recognition as br  # noqa: E402

from datamodules.manifest import read_manifest  # noqa: E402
from recognition.artifact import LandmarkIndex  # noqa: E402
from recognition.calibration import calibrate_threshold  # noqa: E402
from recognition.recognizer import load_index_model  # noqa: E402
from retrieval.decision import accepts  # noqa: E402
from retrieval.metrics import NONLANDMARK, recognition_at_fpr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", type=Path, default=Path("runs/demo/chain-seed0"))
    parser.add_argument("--world", type=Path, default=Path("data/synthetic"))
    parser.add_argument("--target-fpr", type=float, default=1e-3)
    args = parser.parse_args()
    index = LandmarkIndex.load(args.chain / "index" / "index")
    model = load_index_model(index)
    sets = {name: read_manifest(args.world / f"{name}.csv", kind)
            for name, kind in (("queries", "landmark"), ("distractors", "nonlandmark"),
                               ("calibration", "nonlandmark"), ("nonlandmarks", "nonlandmark"))}
    emb = {name: br._embed(model, m.paths) for name, m in sets.items()}
    emb = {name: e / np.linalg.norm(e, axis=1, keepdims=True) for name, e in emb.items()}
    if index.penalty is not None:
        raise SystemExit(f"{args.chain / 'index'}: the index already has a penalty; this compares against none")
    row_of = {lid: i for i, lid in enumerate(index.landmark_ids)}
    truth = np.array([row_of.get(i, -2) for i in sets["queries"].landmark_ids])
    n_q = len(truth)
    print(f"\n{len(index)} vectors of {len(index.landmark_ids)} landmarks; {n_q} queries, "
          f"{len(emb['distractors'])} distractors, {len(emb['calibration'])} calibration photos, "
          f"pool of {len(emb['nonlandmarks'])} training non-landmarks\n")
    print("| score | threshold (calibration.csv, FPR 1e-3) | achieved FPR | recall | recall@FPR 1e-3 | recall@FPR 1e-2 |")
    print("|---|---|---|---|---|---|")
    for k in (1, 5):
        for beta in (0.0, 0.1, 0.25, 0.5, 1.0):
            if beta == 0.0 and k == 5:
                continue
            # The shipped penalty (LandmarkIndex.set_penalty); beta 0 is the index without one.
            index.penalty = None
            if beta > 0:
                index.set_penalty(emb["nonlandmarks"], beta, k)
            top = {name: index.top1(emb[name]) for name in ("queries", "distractors", "calibration")}
            score = {name: top[name][0] for name in top}
            threshold = calibrate_threshold(score["calibration"], args.target_fpr).threshold
            fpr = float(accepts(score["distractors"], threshold).mean())
            recall = float((accepts(score["queries"], threshold) & (top["queries"][1] == truth)).mean())
            pred = np.concatenate([top["queries"][1], top["distractors"][1]])
            value = np.concatenate([score["queries"], score["distractors"]]).astype(float)
            true = np.concatenate([truth, np.full(len(score["distractors"]), NONLANDMARK)])
            at = recognition_at_fpr(pred, value, true, alphas=(1e-3, 1e-2), user_prior=None)
            name = "global score (control)" if beta == 0 else f"score − {beta} × mean cos to {k} nearest pool photo(s)"
            print(f"| {name} | {threshold:.3f} | {fpr:.4f} | {recall:.3f} | {at[1e-3]['recall']:.3f} | "
                  f"{at[1e-2]['recall']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
