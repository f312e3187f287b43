"""How separable is the noise in an embedding at all? A ceiling for any per-image cleaning rule.

``landmarks clean-separability --manifest data/synthetic/db.csv --nonlandmarks data/synthetic/nonlandmarks.csv
--model NAME=CKPT [--model NAME=CKPT ...] --out DIR``

The cleaning algorithm's decisions rest on comparing an image's similarity to its own landmark
with its similarity to other landmarks and to non-landmark photos. This tool scores every DB image
by the plainest form of that evidence,

    evidence = max(other3, pool1) - own3

(``own3``/``other3``: mean cosine similarity to the 3 nearest images with the same/another label;
``pool1``: to the nearest non-landmark photo; an image alone in its class has ``own3 = -1``), and
reports, against the manifest's ground truth (``is_noise``), the precision of the best threshold
on it at a required recall, plus the whole precision-recall curve. If no threshold reaches the
goal, the embedding — not the clustering — is the limit. The curves of several models go into
one PNG (``DIR/separability.png``) and ``DIR/separability.json``.

Exact and O(n^2) in time (n×chunk blocks in memory): an analysis tool for the synthetic world and
DBs up to ~1e5 images, not part of ``landmarks clean``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cleaning.algorithm import _mean_top
from core.atomic import atomic_path, write_json_atomic
from core.errors import UserError
from core.tables import json_number

__all__ = ["evidence_scores", "precision_at_recall", "precision_recall_curve", "separability_analysis"]

_CHUNK = 2048


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(norms == 0):
        raise ValueError("embeddings must be finite and non-zero")
    return x / norms


def evidence_scores(embeddings: np.ndarray, labels, pool: np.ndarray | None = None, k: int = 3) -> dict[str, np.ndarray]:
    """``own``, ``other``, ``pool`` similarities and ``evidence`` (higher = more likely noise) per row."""
    emb = _unit(embeddings)
    labels = np.asarray(labels)
    if len(labels) != len(emb):
        raise ValueError(f"{len(emb)} embeddings but {len(labels)} labels")
    n = len(emb)
    own = np.empty(n, dtype=np.float32)
    other = np.empty(n, dtype=np.float32)
    for s in range(0, n, _CHUNK):
        rows = np.arange(s, min(n, s + _CHUNK))
        sims = emb[rows] @ emb.T
        sims[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
        same = labels[rows, None] == labels[None, :]
        own[rows] = _mean_top(np.where(same, sims, -np.inf), k)
        other[rows] = _mean_top(np.where(same, -np.inf, sims), k)
    nearest_pool = np.full(n, -1.0, dtype=np.float32)
    if pool is not None and len(pool):
        pool = _unit(pool)
        for s in range(0, n, _CHUNK):
            nearest_pool[s:s + _CHUNK] = (emb[s:s + _CHUNK] @ pool.T).max(1)
    return {"own": own, "other": other, "pool": nearest_pool, "evidence": np.maximum(other, nearest_pool) - own}


def precision_recall_curve(scores: np.ndarray, is_noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of "remove every row scoring >= t", for each distinct score t (descending).

    Tied scores are one threshold: removing one of them removes all.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_noise = np.asarray(is_noise, dtype=bool)
    if is_noise.sum() == 0:
        raise ValueError("no noisy rows: precision/recall of removal are undefined")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(is_noise[order])
    removed = np.arange(1, len(order) + 1)
    last_of_tie = np.r_[scores[order][1:] != scores[order][:-1], True]
    tp, removed = tp[last_of_tie], removed[last_of_tie]
    return tp / removed, tp / is_noise.sum()


def precision_at_recall(scores: np.ndarray, is_noise: np.ndarray, recall: float) -> float:
    """The highest precision of any threshold whose recall is at least ``recall``."""
    precision, achieved = precision_recall_curve(scores, is_noise)
    return float(precision[achieved >= recall - 1e-12].max())


def _embed(manifest, pool, name: str, checkpoint: str, cache_dir):
    from retrieval.embed import embed_paths
    from retrieval.embedding_model import load_embedding_model

    model = load_embedding_model(checkpoint=checkpoint)
    result = embed_paths(model, manifest.paths + pool.paths, cache_dir=cache_dir, progress=False)
    if not result.valid.all():
        raise UserError(f"{name}: {int((~result.valid).sum())} unreadable image(s); this analysis needs every row")
    return result.embeddings[: len(manifest)], result.embeddings[len(manifest):]


def separability_analysis(
    manifest: str | os.PathLike,
    nonlandmarks: str | os.PathLike,
    models: dict[str, str],
    out: str | os.PathLike,
    *,
    decisions: dict[str, str] | None = None,
    recall: float = 0.90,
    cache_dir: str | os.PathLike | None = "runs/cleaning/cache",
) -> dict:
    """Score every DB image of ``manifest`` by the evidence of each model (``{name: checkpoint}``).

    ``decisions`` (``{name: clean.csv}`` of ``landmarks clean`` runs on ``manifest``) are plotted as
    operating points. Writes ``out/separability.json`` and ``out/separability.png``; returns the
    JSON's content.
    """
    from cleaning.truth import noise_of_both_kinds
    from datamodules.manifest import read_manifest

    if not models:
        raise UserError("give at least one model (NAME=CHECKPOINT)")
    data = read_manifest(manifest)
    # Precision and recall of removal need noisy rows, and a ceiling on separating them clean ones:
    # refused here, before any model is loaded.
    is_noise = noise_of_both_kinds(data, "this analysis")
    pool = read_manifest(nonlandmarks, kind="nonlandmark", extra_columns="ignore")
    results, curves = {}, {}
    for name, checkpoint in models.items():
        emb, pool_emb = _embed(data, pool, name, checkpoint, cache_dir)
        scores = evidence_scores(emb, data.landmark_ids, pool_emb)
        precision, achieved = precision_recall_curve(scores["evidence"], is_noise)
        f1 = 2 * precision * achieved / np.maximum(precision + achieved, 1e-12)
        results[name] = {
            "model": checkpoint,
            f"precision_at_recall_{recall:g}": round(precision_at_recall(scores["evidence"], is_noise, recall), 4),
            "best_f1": round(float(f1.max()), 4),
            "median_own_similarity": {"clean": json_number(float(np.median(scores["own"][~is_noise])), 4),
                                      "noise": json_number(float(np.median(scores["own"][is_noise])), 4)},
        }
        curves[name] = (achieved, precision)
    points, decided_scores = {}, {}
    for name, location in (decisions or {}).items():
        decided = read_manifest(location, extra_columns="ignore")
        if len(decided) != len(data) or "decision" not in decided.table.columns:
            raise UserError(f"{location}: not a `landmarks clean` output of {manifest} "
                            f"({len(decided)} rows vs {len(data)}, or no decision column)")
        removed = decided.table["decision"].str.strip().eq("remove").to_numpy()
        tp = int((removed & is_noise).sum())
        points[name] = (tp / max(int(removed.sum()), 1), tp / int(is_noise.sum()))
        decided_scores[name] = {"precision": round(points[name][0], 4), "recall": round(points[name][1], 4)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"manifest": str(manifest), "noise_rows": int(is_noise.sum()), "rows": len(is_noise),
               "score": "max(other3, pool1) - own3", "models": results, "decisions": decided_scores}
    write_json_atomic(out / "separability.json", payload, indent=1, newline=False, allow_nan=False)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (achieved, precision) in curves.items():
        ax.plot(achieved, precision, label=name)
    for (name, (precision, achieved)), marker in zip(points.items(), "o^sDv"):
        ax.plot([achieved], [precision], marker=marker, color="black", ls="none", label=f"{name} (landmarks clean)")
    ax.axhline(0.95, color="grey", ls=":", lw=1)
    ax.axvline(0.90, color="grey", ls=":", lw=1)
    ax.set(xlabel="removal recall", ylabel="removal precision", xlim=(0.5, 1.0), ylim=(0.5, 1.01),
           title="noise removal by thresholding max(other3, pool1) - own3")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_path(out / "separability.png") as tmp_png:
        fig.savefig(tmp_png, dpi=120)
    plt.close(fig)
    return payload
