"""Two more index-side score normalisations for the demo chain's shipped decision (not adopted):
a non-landmark penalty on the landmark side too, and a test against the second-best landmark.

The shipped index lowers a photo's score by 0.25 × its cosine to the nearest training
non-landmark (the query side). Its top false positives are generic buildings, and some landmarks
collect several of them (the 25 highest-scored distractors of the seed-0 chain fall on 18
landmarks, 4 on one), so two known fixes for such "hubs" were probed on finished chains (their
index, checkpoint and embedding cache; nothing is embedded again):

* **centroid side** (the other half of CSLS, Conneau et al. 2018): every centroid's scores are
  lowered by ``wc`` × its mean cosine to its ``kc`` nearest pool non-landmarks, so a centroid that
  looks like non-landmarks needs a closer photo;
* **second-best test** (Lowe's ratio test on whole landmarks): the score becomes
  ``s1 − β · s2``, the best landmark's score minus β × the next landmark's.

``wc = 0`` and ``β = 0`` are the shipped index (the control) and must give
``bench_shipped_threshold.py``'s figures. Reported: recall at the threshold that admits exactly
1e-3 (and 2e-3) of all 7,000 unseen non-landmarks (calibration + distractors), per seed.

    python bench/bench_score_normalisation.py --runs runs/bench/demo-chain --prefix shipped --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.manifest import merged_id_aliases, read_manifest  # noqa: E402
from recognition.artifact import LandmarkIndex  # noqa: E402
from retrieval.decision import accepts, threshold_at_fpr  # noqa: E402
from retrieval.embed import embed_paths  # noqa: E402
from retrieval.embedding_model import load_embedding_model  # noqa: E402

ALPHAS = (1e-3, 2e-3)


def chain_embeddings(chain: Path, world: Path):
    """The chain's index, the true landmark row of each query, and the embeddings of its queries
    and of all unseen non-landmarks (calibration + distractors), from the chain's cache."""
    summary = json.loads((chain / "summary.json").read_text())
    index = LandmarkIndex.load(summary["index"]["path"])
    if index.penalty is None or index.whitening is not None or index.descriptor_params.query_expansion:
        raise SystemExit(f"{chain}: this probe needs the shipped index (penalty, no whitening or expansion)")
    model = load_embedding_model(checkpoint=summary["checkpoint"], scales=index.model.get("identity", {}).get("scales"))
    aliases = merged_id_aliases(read_manifest(summary["cleaning"]["manifest"], "landmark", extra_columns="ignore"))
    emb, query_ids = {}, []
    for name, kind in (("queries", "landmark"), ("calibration", "nonlandmark"), ("distractors", "nonlandmark")):
        manifest = read_manifest(world / f"{name}.csv", kind, extra_columns="ignore")
        result = embed_paths(model, manifest.paths, batch_size=128, accelerator="cpu", cache_dir=chain / "cache",
                             progress=False)
        emb[name] = result.embeddings[result.valid]
        if name == "queries":
            query_ids = [i for i, ok in zip(manifest.landmark_ids, result.valid) if ok]
    row_of = {lid: i for i, lid in enumerate(index.landmark_ids)}
    truth = np.array([row_of.get(aliases.get(i, i), -2) for i in query_ids])
    return index, truth, emb["queries"], np.concatenate([emb["calibration"], emb["distractors"]])


def per_landmark_scores(index: LandmarkIndex, x: np.ndarray, centroid_offset: np.ndarray) -> np.ndarray:
    """``[n, landmarks]``: each landmark's best centroid cosine minus that centroid's offset."""
    sims = x @ index.vectors.T - centroid_offset[None, :]
    out = np.full((len(x), len(index.landmark_ids)), -np.inf, dtype=np.float32)
    for row in range(len(index.landmark_ids)):
        out[:, row] = sims[:, index.vector_landmark == row].max(axis=1)
    return out


def recalls(q_scores, q_rows, truth, nl_scores) -> list[float]:
    correct = q_rows == truth
    return [float((accepts(q_scores, threshold_at_fpr(nl_scores, a)) & correct).mean()) for a in ALPHAS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/bench/demo-chain"))
    parser.add_argument("--prefix", default="shipped")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--centroid-k", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--centroid-weights", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5, 1.0])
    args = parser.parse_args()

    table: dict[str, list[list[float]]] = {}
    for seed in args.seeds:
        world = args.data / ("synthetic" if seed == 0 else f"synthetic-seed{seed}")
        index, truth, queries, nonlandmarks = chain_embeddings(args.runs / f"{args.prefix}-seed{seed}", world)
        pool = index.penalty["pool"]
        # The shipped query-side penalty, the same for every variant.
        q_pen, nl_pen = index.nonlandmark_penalty(queries), index.nonlandmark_penalty(nonlandmarks)
        # The control through the index's own code: the probe's arithmetic must reproduce it.
        shipped = recalls(*index.top1(queries), truth, index.top1(nonlandmarks)[0])
        table.setdefault("shipped index (`LandmarkIndex.top1`)", []).append(shipped)
        to_pool = index.vectors @ pool.T
        for kc in args.centroid_k:
            nearest = np.sort(to_pool, axis=1)[:, -kc:].mean(axis=1)
            for wc in args.centroid_weights:
                if wc == 0 and kc != args.centroid_k[0]:
                    continue
                P_q, P_n = (per_landmark_scores(index, x, wc * nearest) for x in (queries, nonlandmarks))
                name = "centroid side: none (control)" if wc == 0 else f"centroid side: wc {wc:g}, kc {kc}"
                table.setdefault(name, []).append(
                    recalls(P_q.max(1) - q_pen, P_q.argmax(1), truth, P_n.max(1) - nl_pen))
        P_q, P_n = (per_landmark_scores(index, x, np.zeros(len(index.vectors))) for x in (queries, nonlandmarks))
        top_q, top_n = np.sort(P_q, axis=1)[:, -2:], np.sort(P_n, axis=1)[:, -2:]
        for beta in args.betas:
            name = "second best: none (control)" if beta == 0 else f"second best: β {beta:g}"
            table.setdefault(name, []).append(recalls(
                top_q[:, 1] - beta * top_q[:, 0] - q_pen, P_q.argmax(1), truth, top_n[:, 1] - beta * top_n[:, 0] - nl_pen))
        print(f"seed {seed}: shipped recall at FPR 1e-3 of all {len(nonlandmarks)} unseen non-landmarks "
              f"{shipped[0]:.3f}", flush=True)

    print(f"\n| variant | recall at FPR 1e-3 (seeds {' / '.join(map(str, args.seeds))}) | mean | at 2e-3, mean |")
    print("|---|---|---|---|")
    for name, rows in table.items():
        at = [r[0] for r in rows]
        print(f"| {name} | {' / '.join(f'{x:.3f}' for x in at)} | {np.mean(at):.3f} | {np.mean([r[1] for r in rows]):.3f} |")


if __name__ == "__main__":
    main()
