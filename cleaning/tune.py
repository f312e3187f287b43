"""Tune the cleaning parameters against known noise, with held-out landmarks.

``landmarks clean-tune --manifest data/synthetic/db.csv --checkpoint CKPT --nonlandmarks ...``

The manifest must carry the ground truth (``is_noise``; the synthetic world's ``db.csv`` does).
Every parameter combination of the grid is run once on the whole database (the decisions use no
ground truth). The landmarks are split at random into ``--folds`` groups; the combination chosen
on the rows of all groups but one (by the objective below) is scored on the rows of the group
left out, so the reported numbers are not those of the very landmarks the parameters were
picked on. The objective is the worst shortfall from the goal,
``min(precision - target_precision, recall - target_recall)`` (higher is better), pooled over
the selection groups. Finally the combination chosen on *all* landmarks is run on the whole
database (also scoring duplicate detection, which needs both ids of a pair).

:func:`tune_cleaning` returns (and writes to ``out``, JSON) every combination's scores and the
held-out results as a Markdown table; ``landmarks clean-tune`` prints the table.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import fields, replace

import numpy as np

from cleaning.algorithm import CleaningParams, clean_embeddings
from cleaning.truth import noise_flags, noise_of_both_kinds, score_against_truth
from core.atomic import write_json_atomic
from core.errors import UserError
from core.tables import json_number, ratio
from datamodules.manifest import read_manifest, repeated_rows

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
    """Removal precision and recall; NaN where nothing was removed / there is no noise."""
    return ratio(tp, tp + fp), ratio(tp, tp + fn)


def _value_fits(value, default) -> bool:
    """Whether a grid value has the type of the parameter whose default is ``default``."""
    if isinstance(value, bool):
        return isinstance(default, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, int) and not isinstance(default, bool):
        return isinstance(value, int)
    return isinstance(value, (int, float))  # a float parameter (int accepted)


def _checked_grid(grid: dict[str, list] | None) -> dict[str, list]:
    """The grid to search (default :data:`DEFAULT_GRID`), every key a cleaning parameter and every
    value one it accepts (checked here: a bad one would otherwise fail mid-search, or at the end)."""
    if grid is not None and not grid:
        raise UserError("--grid: empty; give {param: [values]} (leave --grid out for the default grid)")
    grid = dict(grid) if grid is not None else dict(DEFAULT_GRID)
    known = {f.name for f in fields(CleaningParams)}
    unknown = [key for key in grid if key not in known]
    if unknown:
        raise UserError(f"--grid: unknown parameter(s) {unknown}; the parameters are {sorted(known)}")
    bad = [key for key, values in grid.items() if not isinstance(values, list) or not values]
    if bad:
        raise UserError(f"--grid: {bad[0]!r} needs a non-empty list of values")
    base = CleaningParams()
    optional = {f.name for f in fields(CleaningParams) if "None" in str(f.type)}
    for key, values in grid.items():
        for value in values:
            if not (value is None and key in optional) and not _value_fits(value, getattr(base, key)):
                raise UserError(f"--grid: {key}: {value!r} is not a {type(getattr(base, key)).__name__}"
                                + (" or null" if key in optional else ""))
            try:
                CleaningParams(**{key: value})
            except ValueError as err:
                raise UserError(f"--grid: {key}: {value!r}: {err}") from None
    return grid


def _tuning_embeddings(data, pool, checkpoint, backbone, embeddings, nonlandmark_embeddings, image_size,
                       cache_dir) -> tuple[np.ndarray, np.ndarray | None]:
    """(DB rows, pool rows or None): read from ``.npy`` files, or embedded with the model (cached)."""
    if embeddings is not None:
        from cleaning.command import load_embedding_file  # the one reader of an embeddings file

        try:
            emb = load_embedding_file(embeddings, "--embeddings")
            pool_emb = load_embedding_file(nonlandmark_embeddings, "--nonlandmark-embeddings") if pool is not None else None
        except ValueError as err:
            raise UserError(str(err)) from None
        if len(emb) != len(data):
            raise UserError(f"{embeddings} has {len(emb)} rows but {data.source} has {len(data)}")
        return emb, pool_emb
    from retrieval.embed import embed_paths
    from retrieval.embedding_model import load_embedding_model

    model = load_embedding_model(checkpoint=checkpoint, backbone=backbone, image_size=image_size)
    result = embed_paths(model, data.paths + (pool.paths if pool is not None else []), cache_dir=cache_dir)
    return result.embeddings[: len(data)], result.embeddings[len(data):] if pool is not None else None


def _fold_scores(data, emb, pool_emb, combos: list[dict], fold: np.ndarray, folds: int,
                 progress: bool) -> list[list[tuple[int, int, int]]]:
    """Per combination, per fold: removal (tp, fp, fn) against the ground truth."""
    ids = list(data.landmark_ids)
    repeated = repeated_rows(data)  # as `landmarks clean` cleans: repeats removed, out of every measure
    scores = []
    for n, combo in enumerate(combos):
        params = replace(CleaningParams(), **combo)
        # The decisions use no ground truth, so each combination runs once on the whole database
        # (each image keeps the cross-landmark evidence it has in real use); the ground truth is
        # split by landmark, so a combination is chosen on some landmarks' rows and scored on others'.
        result = clean_embeddings(emb, ids, params, nonlandmark_embeddings=pool_emb, repeated=repeated)
        scores.append([_fold_counts(data.table, result, fold == f) for f in range(folds)])
        if progress:
            print(f"\r{n + 1}/{len(combos)} combinations", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return scores


def tune_cleaning(
    manifest: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    backbone: str | None = None,
    embeddings: str | os.PathLike | None = None,
    nonlandmarks: str | os.PathLike | None = None,
    nonlandmark_embeddings: str | os.PathLike | None = None,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = "runs/cleaning/cache",
    grid: dict[str, list] | None = None,
    folds: int = 2,
    seed: int = 0,
    target_precision: float = 0.95,
    target_recall: float = 0.90,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Run every combination of ``grid`` (default :data:`DEFAULT_GRID`) and choose on held-out landmarks.

    Exactly one of ``checkpoint``, ``backbone`` or ``embeddings`` (a ``.npy``, rows in manifest
    order; ``nonlandmark_embeddings`` then holds the rows of ``nonlandmarks``). Returns what
    ``out`` (JSON) receives — grid, folds, seed, ``held_out`` (per fold: the combination chosen on
    the other folds and its precision/recall on this one), ``held_out_pooled``, ``chosen`` (on all
    landmarks), ``whole_database`` (its scores) and every combination's per-fold counts — plus
    ``table``, the held-out results as a Markdown table.
    """
    if sum(x is not None for x in (checkpoint, backbone, embeddings)) != 1:
        raise UserError("give exactly one of --checkpoint, --backbone or --embeddings")
    if embeddings is not None and nonlandmarks is not None and nonlandmark_embeddings is None:
        raise UserError("with --embeddings, --nonlandmarks needs --nonlandmark-embeddings (rows in its order)")
    if folds < 2:
        raise UserError(f"--folds must be >= 2, got {folds}")
    grid = _checked_grid(grid)
    if out is not None and os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; give the JSON file to write")
    data = read_manifest(manifest)
    noise_of_both_kinds(data, "tuning")
    pool = read_manifest(nonlandmarks, kind="nonlandmark", extra_columns="ignore") if nonlandmarks else None
    emb, pool_emb = _tuning_embeddings(data, pool, checkpoint, backbone, embeddings, nonlandmark_embeddings,
                                       image_size, cache_dir)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    ids = np.asarray(data.landmark_ids)
    landmarks = np.unique(ids)
    fold_of = dict(zip(landmarks, np.random.default_rng(seed).permutation(len(landmarks)) % folds))
    fold = np.asarray([fold_of[i] for i in ids])
    base = CleaningParams()
    scores = _fold_scores(data, emb, pool_emb, combos, fold, folds, progress)

    def objective(counts) -> float:
        # An undefined ratio sets no constraint (fmin skips NaN); with neither defined, nothing to go on.
        p, r = _pr(*np.sum(counts, axis=0))
        worst = float(np.fmin(p - target_precision, r - target_recall))
        return -np.inf if np.isnan(worst) else worst

    lines = ["| held-out fold | chosen on the other folds | precision | recall |", "|---|---|---|---|"]
    held_out = []
    for f in range(folds):
        best = max(range(len(combos)), key=lambda c: objective([scores[c][g] for g in range(folds) if g != f]))
        p, r = _pr(*scores[best][f])
        held_out.append({"fold": f, "params": combos[best], "precision": json_number(p, 4), "recall": json_number(r, 4)})
        lines.append(f"| {f} | {json.dumps(combos[best])} | {p:.3f} | {r:.3f} |")
    pooled = np.sum([scores[[combos.index(h["params"]) for h in held_out][f]][f] for f in range(folds)], axis=0)
    p, r = _pr(*pooled)
    lines.append(f"| all (pooled) | | **{p:.3f}** | **{r:.3f}** |")

    best = max(range(len(combos)), key=lambda c: objective(scores[c]))
    params = replace(base, **combos[best])
    full = clean_embeddings(emb, ids.tolist(), params, nonlandmark_embeddings=pool_emb, repeated=repeated_rows(data))
    truth = score_against_truth(data.table, full)
    results = {
        "grid": grid, "folds": folds, "seed": seed, "held_out": held_out,
        "held_out_pooled": {"precision": json_number(p, 4), "recall": json_number(r, 4)},
        "chosen": combos[best], "whole_database": truth,
        "combinations": [{"params": c, "per_fold_tp_fp_fn": [list(map(int, x)) for x in s]}
                         for c, s in zip(combos, scores)],
    }
    if out:
        write_json_atomic(out, results, indent=1, newline=False, allow_nan=False)
    return {**results, "table": "\n".join(lines)}
