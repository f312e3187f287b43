"""Tune the cleaning parameters against known noise, with held-out landmarks.

``python -m cleaning.tune --manifest data/synthetic/db.csv --checkpoint CKPT --nonlandmarks ...``

The manifest must carry the ground truth (``is_noise``; the synthetic world's ``db.csv`` does).
Every parameter combination of the grid is run once on the whole database (the decisions use no
ground truth). The landmarks are split at random into ``--folds`` groups; the combination chosen
on the rows of all groups but one (by the objective below) is scored on the rows of the group
left out, so the reported numbers are not those of the very landmarks the parameters were
picked on. The objective is the worst shortfall from the goal,
``min(precision - target_precision, recall - target_recall)`` (higher is better), pooled over
the selection groups. Finally the combination chosen on *all* landmarks is run on the whole
database (also scoring duplicate detection, which needs both ids of a pair).

Prints a Markdown table and writes ``--out`` (JSON) with every combination's scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from cleaning.algorithm import CleaningParams, clean_embeddings
from cleaning.truth import noise_flags, score_against_truth
from datamodules.manifest import read_manifest

DEFAULT_GRID = {
    "distance_threshold": [0.4, 0.5, 0.6, 0.7],
    "attach_distance": [None, 0.6, 0.7],
    "reassign_margin": [0.1, 0.2, 0.3, None],
    "nonlandmark_distance": [0.1, 0.15],
    "nonlandmark_margin": [None, 0.1, 0.2],
}


def _fold_counts(table, result, rows: np.ndarray) -> tuple[int, int, int]:
    noise = noise_flags(table["is_noise"])[rows]
    removed = ~result.keep[rows]
    return int((removed & noise).sum()), int((removed & ~noise).sum()), int((~removed & noise).sum())


def _pr(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / (tp + fn) if tp + fn else 1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--manifest", required=True)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint")
    which.add_argument("--backbone")
    which.add_argument("--embeddings", help=".npy rows in manifest order")
    parser.add_argument("--nonlandmarks", help="non-landmark pool CSV")
    parser.add_argument("--nonlandmark-embeddings", help=".npy rows in --nonlandmarks order")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--cache-dir", default="runs/cleaning/cache")
    parser.add_argument("--grid", default=None, help="JSON {param: [values]} (default: DEFAULT_GRID)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-precision", type=float, default=0.95)
    parser.add_argument("--target-recall", type=float, default=0.90)
    parser.add_argument("--out", default=None, help="JSON file for every combination's scores")
    args = parser.parse_args(argv)

    data = read_manifest(args.manifest)
    pool = read_manifest(args.nonlandmarks, kind="nonlandmark", extra_columns="ignore") if args.nonlandmarks else None
    if args.embeddings:
        emb = np.load(args.embeddings, allow_pickle=False)
        pool_emb = np.load(args.nonlandmark_embeddings, allow_pickle=False) if pool is not None else None
    else:
        from retrieval.embed import embed_paths
        from retrieval.embedding_model import load_embedding_model

        model = load_embedding_model(checkpoint=args.checkpoint, backbone=args.backbone, image_size=args.image_size)
        result = embed_paths(model, data.paths + (pool.paths if pool is not None else []), cache_dir=args.cache_dir)
        emb = result.embeddings[: len(data)]
        pool_emb = result.embeddings[len(data):] if pool is not None else None

    grid = json.loads(args.grid) if args.grid else DEFAULT_GRID
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    ids = np.asarray(data.landmark_ids)
    landmarks = np.unique(ids)
    fold_of = dict(zip(landmarks, np.random.default_rng(args.seed).permutation(len(landmarks)) % args.folds))
    fold = np.asarray([fold_of[i] for i in ids])
    base = CleaningParams()

    scores = []  # per combo: per fold (tp, fp, fn)
    for n, combo in enumerate(combos):
        params = replace(base, **combo)
        # The decisions use no ground truth, so each combination runs once on the whole database
        # (each image keeps the cross-landmark evidence it has in real use); the ground truth is
        # split by landmark, so a combination is chosen on some landmarks' rows and scored on others'.
        result = clean_embeddings(emb, ids.tolist(), params, nonlandmark_embeddings=pool_emb)
        per_fold = [_fold_counts(data.table, result, fold == f) for f in range(args.folds)]
        scores.append(per_fold)
        print(f"\r{n + 1}/{len(combos)} combinations", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    def objective(counts) -> float:
        p, r = _pr(*np.sum(counts, axis=0))
        return min(p - args.target_precision, r - args.target_recall)

    lines = ["| held-out fold | chosen on the other folds | precision | recall |", "|---|---|---|---|"]
    held_out = []
    for f in range(args.folds):
        best = max(range(len(combos)), key=lambda c: objective([scores[c][g] for g in range(args.folds) if g != f]))
        p, r = _pr(*scores[best][f])
        held_out.append({"fold": f, "params": combos[best], "precision": round(p, 4), "recall": round(r, 4)})
        lines.append(f"| {f} | {json.dumps(combos[best])} | {p:.3f} | {r:.3f} |")
    pooled = np.sum([scores[[combos.index(h["params"]) for h in held_out][f]][f] for f in range(args.folds)], axis=0)
    p, r = _pr(*pooled)
    lines.append(f"| all (pooled) | | **{p:.3f}** | **{r:.3f}** |")

    best = max(range(len(combos)), key=lambda c: objective(scores[c]))
    params = replace(base, **combos[best])
    full = clean_embeddings(emb, ids.tolist(), params, nonlandmark_embeddings=pool_emb)
    truth = score_against_truth(data.table, full)
    print("\n".join(lines))
    print(f"\nchosen on all landmarks: {json.dumps(combos[best])}")
    print(f"whole database: removal precision {truth['removal']['precision']}, recall {truth['removal']['recall']} "
          f"({truth['removal']['removed']} removed, {truth['removal']['noise_rows']} noise); recall by kind "
          f"{truth['recall_by_noise_kind']}; duplicates precision {truth['duplicates']['precision']}, "
          f"recall {truth['duplicates']['recall']}; by reason {json.dumps(truth['by_reason'])}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "grid": grid, "folds": args.folds, "seed": args.seed, "held_out": held_out,
            "held_out_pooled": {"precision": round(p, 4), "recall": round(r, 4)},
            "chosen": combos[best], "whole_database": truth,
            "combinations": [{"params": c, "per_fold_tp_fp_fn": [list(map(int, x)) for x in s]} for c, s in zip(combos, scores)],
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
