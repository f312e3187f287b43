"""``landmarks clean``: a landmark manifest in, ``clean.csv`` + ``summary.json`` + ``report.html`` out.

Embeddings come from a model (a LandmarkModule checkpoint or a timm backbone with its offline
ImageNet weights), computed with :func:`retrieval.embed.embed_paths` (cached, resumable,
multi-GPU), or from a precomputed ``.npy``. The decisions are :mod:`cleaning.algorithm`'s.

``clean.csv`` holds every input row, in input order, with the input's columns (``path`` rewritten
relative to the output folder so the file works from there) plus:

* ``decision`` — ``keep`` or ``remove`` (``LandmarkDataModule`` drops ``remove`` rows);
* ``reason`` — empty for kept rows, else ``<code>: <details>`` (codes: repeated_row, unreadable,
  landmark_dropped, small_cluster, other_landmark, near_nonlandmark, neighbour_evidence);
* ``cluster`` — the row's kept cluster within its landmark (0 = largest), -1 if none;
* ``duplicate_of`` — for landmarks found to be duplicates, the id of their group (else empty);
* ``original_landmark_id`` — the input's ``landmark_id``. With ``--duplicates merge`` (default)
  ``landmark_id`` is rewritten to the group's id, so training sees one class per structure (and
  ``LandmarkDataModule`` relabels queries that name a merged-away id through this column); with
  ``--duplicates flag`` it is unchanged.

The input manifest is never modified; outputs are written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import numpy as np

from cleaning.algorithm import CleaningParams, CleaningResult, clean_embeddings
from cleaning.truth import check_truth, score_against_truth
from core.atomic import write_json_atomic
from datamodules.manifest import Manifest, ManifestError, read_manifest, repeated_rows, write_manifest

log = logging.getLogger(__name__)

__all__ = ["OUTPUT_COLUMNS", "PARAM_HELP", "clean_manifest"]

OUTPUT_COLUMNS = ("decision", "reason", "cluster", "duplicate_of", "original_landmark_id")
SUMMARY_FORMAT = "landmark-cleaning-summary/1"

PARAM_HELP = {
    "distance_threshold": "cosine distance at which each landmark's dendrogram is cut",
    "linkage": "agglomerative linkage: average, complete, single, weighted, ward, centroid, median",
    "min_cluster_size": "a kept cluster has at least this many images",
    "min_cluster_fraction": "... and at least this share of its landmark's readable images",
    "attach_distance": "keep an image outside the kept clusters if it is within this cosine distance of its "
                       "landmark's nearest kept cluster centre ('none': keep cluster members only)",
    "duplicate_distance": "cosine distance under which two landmarks' cluster centroids coincide",
    "duplicate_min_share": "share of each landmark's clustered images in coinciding clusters for a duplicate pair",
    "duplicates": "merge duplicate landmarks (rewrite landmark_id) or only flag them",
    "reassign_margin": "remove an image closer to another landmark's clusters than to its own by more than this "
                       "('none' disables)",
    "nonlandmark_distance": "with --nonlandmarks: remove images within this cosine distance of a non-landmark "
                            "image ('none' disables)",
    "nonlandmark_margin": "with --nonlandmarks: remove images more similar to a non-landmark image than to their "
                          "landmark's nearest kept cluster centre by more than this ('none' disables)",
    "image_rule": "clusters (the paper's: images outside the kept clusters, closer to another landmark or to "
                  "the non-landmarks are noise) or evidence (an image is noise when max(other_k, pool_1) - own_k "
                  ">= --evidence-threshold, over its nearest images; see CleaningParams)",
    "evidence_k": "with --image-rule evidence: nearest images averaged on each side",
    "evidence_threshold": "with --image-rule evidence: evidence at which an image is removed",
    "evidence_search": "with --image-rule evidence: image neighbours retrieved per image",
    "neighbours": "FAISS neighbours retrieved per query",
    "index": "FAISS index over cluster centroids / the non-landmark pool: auto, flat, ivf, hnsw",
    "exact_index_limit": "index=auto uses an exact index up to this many vectors, IVF beyond",
    "units": "relative (default): distances and margins are multiples of the embedding's scale, the median cosine "
             "distance between images of different landmarks, so one set of defaults serves an ImageNet start and "
             "a trained model; absolute: cosine units",
    "min_separability": "the least nearest-neighbour label agreement on the DB a model needs for its decisions to "
                        "be applied (below: nothing is removed unless --force)",
}


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def load_embedding_file(path: str | os.PathLike, what: str) -> np.ndarray:
    """A 2-D float ``.npy`` array (memory-mapped, no pickle), or a ValueError naming ``what`` and the file."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot be read ({err.strerror or err})") from err
    if magic != b"\x93NUMPY":
        # np.load takes anything else for a pickle and says so, which misleads about a CSV or text file.
        raise ValueError(f"{what} {path}: not a .npy array file (save one with numpy.save)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{what} {path}: not a readable .npy array without pickle ({err})") from err
    if array.ndim != 2 or array.shape[1] == 0 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} {path}: expected a 2-D float array [rows, dim], got {array.dtype} {array.shape}")
    return array


def _align_embeddings(manifest: Manifest, embeddings: np.ndarray, source: str, paths_csv: str | None) -> np.ndarray:
    """Rows of ``embeddings`` in manifest order: by ``paths_csv`` (one path per embedding row) or
    row for row. Manifest images without an embedding row are an error naming their lines."""
    if paths_csv is None:
        if len(embeddings) != len(manifest):
            raise ValueError(
                f"{source} has {len(embeddings)} rows but {manifest.source} has {len(manifest)}; without "
                "--embedding-paths the rows must match the manifest row for row"
            )
        return embeddings
    listed = read_manifest(paths_csv, kind="nonlandmark", extra_columns="ignore")
    if len(listed) != len(embeddings):
        raise ValueError(f"{paths_csv} lists {len(listed)} paths but {source} has {len(embeddings)} rows")
    row_of: dict[str, int] = {}
    for row, path in enumerate(listed.paths):
        key = os.path.abspath(path)
        if key in row_of:
            raise ValueError(f"{paths_csv}: line {row + 2}: {path} is listed twice (first on line {row_of[key] + 2})")
        row_of[key] = row
    wanted = [row_of.get(os.path.abspath(p), -1) for p in manifest.paths]
    unknown = [i for i, r in enumerate(wanted) if r < 0]
    if unknown:
        i = unknown[0]
        raise ValueError(
            f"{manifest.source}: line {manifest.lines[i]}: {manifest.table['path'].iloc[i]!r} has no embedding in "
            f"{paths_csv} ({len(unknown)} of {len(manifest)} manifest paths are unknown there)"
        )
    return embeddings[np.asarray(wanted)] if wanted != list(range(len(embeddings))) else embeddings


def _check_embedding_sources(checkpoint: str | None, backbone: str | None, embeddings: str | None,
                             embedding_paths: str | None, nonlandmarks: str | None,
                             nonlandmark_embeddings: str | None) -> None:
    sources = [x is not None for x in (checkpoint, backbone, embeddings)]
    if sum(sources) != 1:
        raise ValueError("give exactly one of checkpoint, backbone or embeddings")
    if embeddings is None and (embedding_paths is not None or nonlandmark_embeddings is not None):
        raise ValueError("embedding_paths / nonlandmark_embeddings only go with precomputed embeddings")
    if embeddings is not None and nonlandmarks is not None and nonlandmark_embeddings is None:
        raise ValueError("with precomputed embeddings, --nonlandmarks needs --nonlandmark-embeddings (rows in its order)")


def _read_input_manifest(manifest_path: Path, out_dir: Path, extra_columns: Literal["error", "ignore"]) -> Manifest:
    """The landmark manifest to clean; refuses a cleaned one and an output that would overwrite it."""
    data = read_manifest(manifest_path, kind="landmark", extra_columns=extra_columns)
    taken = [c for c in OUTPUT_COLUMNS if c in data.table.columns]
    if taken:
        raise ManifestError(
            f"{manifest_path}: already has the cleaning column(s) {taken}; clean the original manifest "
            "(cleaning a cleaned file would mix two runs' decisions)"
        )
    if (out_dir / "clean.csv").resolve() == manifest_path.resolve():
        raise ValueError(f"--out {out_dir} would overwrite the input {manifest_path}; choose another folder")
    return data


def _precomputed_embeddings(data: Manifest, pool: Manifest | None, embeddings: str, embedding_paths: str | None,
                            nonlandmark_embeddings: str | None) -> tuple[np.ndarray, None, np.ndarray | None, dict]:
    """``(embeddings, valid, pool embeddings, model info)`` from ``.npy`` files, in manifest order."""
    emb = _align_embeddings(data, load_embedding_file(embeddings, "--embeddings"), str(embeddings), embedding_paths)
    pool_emb = None
    if pool is not None:
        pool_emb = load_embedding_file(nonlandmark_embeddings, "--nonlandmark-embeddings")
        if len(pool_emb) != len(pool):
            raise ValueError(f"{nonlandmark_embeddings} has {len(pool_emb)} rows but {pool.source} has {len(pool)}")
    return emb, None, pool_emb, {"source": "embeddings", "path": str(embeddings), "sha256": _sha256(embeddings)}


def _model_embeddings(data: Manifest, pool: Manifest | None, out_dir: Path, *, checkpoint: str | None,
                      backbone: str | None, image_size: int | None, batch_size: int, num_workers: int,
                      accelerator: str, devices: int | str, strategy: str, cache_dir: str | os.PathLike | None,
                      progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict] | None:
    """``(embeddings, valid, pool embeddings, model info)`` computed with a model (DB and pool in one
    pass, cached); None on DDP ranks other than 0, which only embed their part."""
    from retrieval.embed import embed_paths
    from retrieval.embedding_model import load_embedding_model

    model = load_embedding_model(checkpoint=checkpoint, backbone=backbone, image_size=image_size)
    every_path = data.paths + (pool.paths if pool is not None else [])
    result = embed_paths(
        model, every_path, batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
        devices=devices, strategy=strategy, cache_dir=cache_dir or out_dir / "embedding-cache", progress=progress,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None  # rank 0 writes the outputs
    emb, valid = result.embeddings[: len(data)], result.valid[: len(data)]
    pool_emb = None
    if pool is not None:
        pool_emb = result.embeddings[len(data):]  # unreadable: all-zero rows, skipped by the algorithm
    return emb, valid, pool_emb, {"source": "model", "key": model.key, **model.identity}


def _run_algorithm(data: Manifest, emb: np.ndarray, valid: np.ndarray | None, pool_emb: np.ndarray | None,
                   params: CleaningParams, jobs: int | None, progress: bool, force: bool,
                   source: str | None = None) -> CleaningResult:
    """:func:`clean_embeddings`, its errors naming the manifest's line and file instead of a row
    (and ``source``, the ``--embeddings`` file, instead of "embeddings")."""
    if jobs is None:
        jobs = (os.cpu_count() or 1) if len(data) >= 20000 else 1
    repeated = repeated_rows(data)
    if repeated.any():
        log.warning("%s: %d row(s) repeat an earlier row's path and landmark_id (first at line %d); they are "
                    "removed (repeated_row) and left out of the measures and the clustering", data.source,
                    int(repeated.sum()), int(data.lines[repeated][0]))
    try:
        return clean_embeddings(emb, data.landmark_ids, params, valid=valid, nonlandmark_embeddings=pool_emb,
                                repeated=repeated, n_jobs=jobs, progress=progress, force=force)
    except ValueError as err:
        # The algorithm names rows; users need the manifest's lines and files.
        message = str(err)
        row = int(message.split()[2]) if message.startswith("embeddings: row ") else None
        if message.startswith("embeddings: ") and source is not None:
            message = f"--embeddings {source}: {message.removeprefix('embeddings: ')}"
        if row is not None:
            message = f"{data.source}: line {data.lines[row]} ({data.paths[row]}): {message}"
        raise ValueError(message) from err


def _write_clean_csv(data: Manifest, result: CleaningResult, manifest_path: Path, out_dir: Path) -> None:
    """``clean.csv``: the input's rows and columns, paths re-rooted at ``out_dir``, plus the decisions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = data.table.copy()
    # Relative paths are re-rooted at the output folder (one relpath for the whole file: a
    # per-row relpath costs seconds on a million rows); absolute paths stay as they are.
    prefix = os.path.relpath(manifest_path.resolve().parent, out_dir.resolve())
    table["path"] = [p if os.path.isabs(p) else os.path.normpath(os.path.join(prefix, p))
                     for p in data.table["path"].str.strip()]
    table["landmark_id"] = result.landmark_id.astype(str)
    table["decision"] = np.where(result.keep, "keep", "remove")
    table["reason"] = result.reason.astype(str)
    table["cluster"] = result.cluster
    table["duplicate_of"] = result.duplicate_of.astype(str)
    table["original_landmark_id"] = result.input_landmark_id.astype(str)
    write_manifest(table, out_dir / "clean.csv")


def _summary(manifest_path: Path, data: Manifest, input_sha: str, nonlandmarks: str | None, model_info: dict,
             params: CleaningParams, result: CleaningResult, report: bool, started: float) -> dict:
    """The content of ``summary.json`` (counts, scores against known noise when the manifest has them)."""
    return {
        "format": SUMMARY_FORMAT,
        "input": {"manifest": str(manifest_path.resolve()), "sha256": input_sha, "rows": len(data),
                  "nonlandmarks": str(Path(nonlandmarks).resolve()) if nonlandmarks else None},
        "embeddings": model_info,
        "params": params.to_dict(),
        "applied_params": result.params.to_dict(),
        "scale": None if math.isnan(result.scale) else round(result.scale, 6),
        "separability": result.separability,
        "applied": result.applied,
        "counts": result.counts(),
        "ground_truth": score_against_truth(data.table, result),
        **({} if result.proposed is None else {"proposed": {
            "counts": result.proposed.counts(), "ground_truth": score_against_truth(data.table, result.proposed),
            "duplicate_groups": result.proposed.duplicate_groups}}),
        "duplicate_groups": result.duplicate_groups,
        "duplicate_pairs": result.duplicate_pairs,
        "landmarks": result.landmarks,
        "outputs": {"manifest": "clean.csv", "report": "report.html" if report else None},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_report_page(out_dir: Path, manifest_path: Path, data: Manifest, pool: Manifest | None,
                       result: CleaningResult, summary: dict, report_landmarks: int, progress: bool) -> None:
    """``report.html``, headed by the summary's input, model, counts, parameters and scores."""
    from cleaning.report import write_report

    counts, truth = summary["counts"], summary["ground_truth"]
    rows = [
        ("input", f"{manifest_path} ({len(data)} rows, sha256 {summary['input']['sha256'][:12]}…)"),
        ("embeddings", ", ".join(f"{k}={v}" for k, v in summary["embeddings"].items()
                                 if k in ("source", "backbone", "path", "checkpoint_sha256", "key"))),
        ("kept / removed", f"{counts['kept']} / {counts['removed']} "
                           f"({', '.join(f'{k}: {v}' for k, v in counts['removed_by_reason'].items()) or 'none'})"),
        ("landmarks", f"{counts['landmarks']} in, {counts['landmarks_dropped']} dropped, "
                      f"{counts['duplicate_groups']} duplicate groups, {counts['distinct_landmarks_kept']} distinct landmarks kept"),
        ("parameters", ", ".join(f"{k}={v}" for k, v in summary["params"].items())),
    ]
    if truth is not None:
        r = truth["removal"]
        rows.append(("against the known noise", f"removal precision {r['precision']}, recall {r['recall']}"
                     + (f"; duplicates precision {truth['duplicates']['precision']}, recall "
                        f"{truth['duplicates']['recall']}" if "duplicates" in truth else "")))
    write_report(out_dir, [os.path.abspath(p) for p in data.paths], result, title=f"Cleaning of {manifest_path.name}",
                 summary_rows=rows, nonlandmark_paths=None if pool is None else pool.paths,
                 max_landmarks=report_landmarks, progress=progress)


def _remove_previous_report(out_dir: Path) -> None:
    """Without a report, an earlier run's ``report.html`` and thumbnails in ``out_dir`` would
    contradict this run's ``clean.csv`` and ``summary.json``: remove them, but only a page this
    command wrote (its generator mark) and only thumbnails named as it names them."""
    from cleaning.report import REPORT_MARK, THUMB_NAME

    page, thumbs = out_dir / "report.html", out_dir / "thumbs"
    try:
        ours = page.is_file() and REPORT_MARK.encode() in page.read_bytes()[:4096]
    except OSError:
        ours = False
    if not ours:
        return
    page.unlink()
    if thumbs.is_dir() and not thumbs.is_symlink():
        for old in thumbs.iterdir():
            if THUMB_NAME.fullmatch(old.name):
                old.unlink(missing_ok=True)
        if not any(thumbs.iterdir()):
            thumbs.rmdir()


def clean_manifest(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    backbone: str | None = None,
    embeddings: str | None = None,
    embedding_paths: str | None = None,
    nonlandmarks: str | None = None,
    nonlandmark_embeddings: str | None = None,
    params: CleaningParams | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    jobs: int | None = None,
    extra_columns: Literal["error", "ignore"] = "error",
    report: bool = True,
    report_landmarks: int = 300,
    progress: bool = True,
    force: bool = False,
) -> CleaningResult | None:
    """Clean ``manifest`` into ``out_dir`` (``clean.csv``, ``summary.json``, ``report.html``).

    Exactly one of ``checkpoint``, ``backbone`` or ``embeddings`` (a ``.npy`` ``[rows, dim]``; rows
    in manifest order, or in the order of ``embedding_paths``, a CSV with a ``path`` column).
    ``nonlandmarks`` (a CSV with ``path``) enables step 4; with precomputed embeddings it needs
    ``nonlandmark_embeddings`` (rows in its order). ``cache_dir`` defaults to
    ``out_dir/embedding-cache``; ``jobs`` (worker processes for the clustering) defaults to the
    CPU count for databases of 20,000 rows or more, else 1. Under DDP every rank embeds its part
    and rank 0 alone cleans and writes (other ranks return None). A model too weak to clean with
    (``CleaningParams.min_separability``) removes nothing unless ``force``; the summary's
    ``applied`` is then false and ``proposed`` holds what it would have done.
    """
    started = time.perf_counter()
    params = params or CleaningParams()
    _check_embedding_sources(checkpoint, backbone, embeddings, embedding_paths, nonlandmarks, nonlandmark_embeddings)
    manifest_path = Path(manifest)
    out_dir = Path(out_dir)
    data = _read_input_manifest(manifest_path, out_dir, extra_columns)
    check_truth(data)  # a bad ground truth is refused before any embedding, not after the cleaning
    pool = read_manifest(nonlandmarks, kind="nonlandmark", extra_columns="ignore") if nonlandmarks else None
    input_sha = _sha256(manifest_path)

    if embeddings is not None:
        emb, valid, pool_emb, model_info = _precomputed_embeddings(data, pool, embeddings, embedding_paths,
                                                                   nonlandmark_embeddings)
    else:
        embedded = _model_embeddings(
            data, pool, out_dir, checkpoint=checkpoint, backbone=backbone, image_size=image_size,
            batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, devices=devices,
            strategy=strategy, cache_dir=cache_dir, progress=progress,
        )
        if embedded is None:
            return None  # another DDP rank: rank 0 writes the outputs
        emb, valid, pool_emb, model_info = embedded

    result = _run_algorithm(data, emb, valid, pool_emb, params, jobs, progress, force,
                            None if embeddings is None else str(embeddings))
    _write_clean_csv(data, result, manifest_path, out_dir)
    if _sha256(manifest_path) != input_sha:
        raise RuntimeError(f"{manifest_path} changed while it was being cleaned")
    summary = _summary(manifest_path, data, input_sha, nonlandmarks, model_info, params, result, report, started)
    write_json_atomic(out_dir / "summary.json", summary, newline=False, allow_nan=False)
    if report:
        _write_report_page(out_dir, manifest_path, data, pool, result, summary, report_landmarks, progress)
    else:
        _remove_previous_report(out_dir)
    return result
