"""Build a landmark index from a model and a landmark DB: :func:`build_landmark_index`.

The workflow behind ``landmarks index`` as a plain function: read and filter the DB manifest
(rows with ``decision=remove`` — a ``landmarks clean`` output — are left out), read the optional
per-landmark metadata, embed the DB (and the non-landmark calibration photos), build the
per-landmark representation, calibrate the threshold and save the index atomically.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from typing import Literal

import numpy as np
import pandas as pd

from core.errors import UserError
from core.tables import read_text_csv
from lightning_modules.embedding_net import check_backbone
from lightning_modules.landmark_module import checkpoint_file

log = logging.getLogger("landmarks.recognition")

DEFAULT_CACHE = "runs/embedding-cache"


def _image_files(manifest):
    """Indexing embeds image files (cached by path); a shard set is read by the data module only."""
    if manifest.shard_dir is not None:
        raise UserError(f"{manifest.shard_dir}: `landmarks index` reads image files, not tar shards; give the "
                        "CSV manifest the shards were prepared from (shardset.json names it as 'source')")
    return manifest


def filter_rows(manifest, where: dict[str, str] | None):
    """Keep the rows whose ``column`` (stripped) equals ``value``, for every pair of ``where``."""
    for column, value in (where or {}).items():
        if column not in manifest.table.columns:
            raise UserError(f"{manifest.source}: --where column {column!r} not in {list(manifest.table.columns)}")
        keep = manifest.table[column].str.strip().eq(value).to_numpy()
        log.info("%s: %s=%s keeps %d of %d rows", manifest.source, column, value, int(keep.sum()), len(keep))
        manifest = manifest.subset(keep)
    return manifest


def _float_or_none(value, source: str, line: int, column: str) -> float | None:
    text = str(value).strip()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        raise UserError(f"{source}: line {line}: {column}={text!r} is not a number") from None
    limit = 90 if column == "lat" else 180
    if not (math.isfinite(number) and -limit <= number <= limit):
        raise UserError(f"{source}: line {line}: {column}={number} is out of range [-{limit}, {limit}]")
    return number


def _metadata_rows(table: pd.DataFrame, source: str, lines) -> list[dict]:
    present = [key for key in ("name", "city", "lat", "lon") if key in table.columns]
    if not present:
        return []
    columns = {key: table[key].astype(str).tolist() for key in ["landmark_id", *present]}
    rows = []
    for i, line in enumerate(lines):
        row = {"landmark_id": columns["landmark_id"][i].strip()}
        for key in present:
            value = columns[key][i]
            row[key] = (_float_or_none(value, source, int(line), key) if key in ("lat", "lon")
                        else value.strip() or None)
        rows.append(row)
    return rows


def landmark_metadata_of(manifest, landmarks_csv: str | os.PathLike | None, known_ids: set[str]) -> dict[str, dict]:
    """Per-landmark name/city/lat/lon from ``landmarks_csv`` (its values win) and the manifest's columns."""
    from recognition.artifact import landmark_metadata

    rows = []
    if landmarks_csv:
        path = pathlib.Path(landmarks_csv)
        if not path.is_file():
            raise UserError(f"--landmarks: file not found: {path}")
        table = read_text_csv(path, "landmark metadata file")
        if "landmark_id" not in table.columns:
            raise UserError(f"{path}: needs a landmark_id column; found {list(table.columns)}")
        used = [c for c in ("name", "city", "lat", "lon") if c in table.columns]
        log.info("%s: landmark metadata columns %s", path, used)
        rows += _metadata_rows(table, str(path), range(2, len(table) + 2))
        unknown = {r["landmark_id"] for r in rows} - known_ids
        if unknown:
            log.info("%s: %d landmark(s) are not in the database; ignored", path, len(unknown))
    # Metadata file first: its values win over the per-photo columns of the manifest.
    rows += _metadata_rows(manifest.table.assign(landmark_id=manifest.landmark_ids), manifest.source, manifest.lines)
    return landmark_metadata(r for r in rows if r["landmark_id"] in known_ids)


def embed_images(model, paths, what: str, *, batch_size: int = 64, num_workers: int = 2, accelerator: str = "auto",
                 devices: int | str = 1, strategy: str = "auto", cache_dir=DEFAULT_CACHE, progress: bool = True):
    """``(embeddings, valid)`` of ``paths``; unreadable images are logged and marked invalid."""
    from retrieval.embed import embed_paths

    log.info("embedding %d %s images", len(paths), what)
    result = embed_paths(
        model, paths, batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
        devices=devices, strategy=strategy, cache_dir=cache_dir or None, progress=progress,
    )
    bad = np.flatnonzero(~result.valid)
    if len(bad):
        log.warning("%d of %d %s images are unreadable and left out, e.g. %s", len(bad), len(paths), what,
                    paths[bad[0]])
    return result.embeddings, result.valid


#: The input size of an index built from a bare ImageNet backbone (``image_size=None``). The
#: backbones' own 224 px loses on real photos: at 320 px recall at FPR 1 % rises for both offline
#: backbones and every representation on 5 seeded splits, and for Lite0 on issue 17's fixed split,
#: for about 2.5x the forward time (EXPERIMENTS.md, "Real photos: the commands' defaults"). A
#: checkpoint keeps the size it was trained at.
BACKBONE_IMAGE_SIZE = 320
#: The scales an index embeds at by default (``scales=None``), for a bare backbone and a checkpoint
#: alike: the photo at the model's input size and resized to 1.414 × that size, the unit embeddings
#: summed. On the real photos this beat every single input size for Lite0 in each of 5 seeded
#: splits (recall at FPR 1 % 0.969 against 0.946 at 320 px, 0.961 at 384, 0.953 at 448), on both
#: halves of the landmarks and on issue 17's fixed split (0.992 against 0.983), for 3x the forward
#: time (EXPERIMENTS.md, "Real photos: multi-scale embedding"); on the demo chain's trained 96 px
#: checkpoint it raised recall at a fixed FPR 1e-3 from 0.530 to 0.593 and at 1e-2 from 0.733 to
#: 0.791 over 3 seeds of the world and the fit, higher in each (EXPERIMENTS.md, "the shipped
#: threshold"). ``--scales 1`` is the single-scale index.
INDEX_SCALES = (1.0, 1.414)


def _warn_if_saturated(scores, calibration, source: str) -> None:
    """The evaluation's collapse guard (:func:`retrieval.metrics.saturation_warning`) on the calibration.

    ``scores`` must be plain top-1 cosines, and ``calibration`` set on them: a verified score carries
    an inlier bonus and a penalised one a subtraction, so 0.99 would mean nothing there. An index
    with either is checked on its plain cosines and the threshold they would give.
    """
    from retrieval.metrics import format_alpha, saturated_share, saturation_warning

    figures = {"saturated_distractors": saturated_share(scores), "n_distractors": len(scores),
               f"threshold@fpr={format_alpha(calibration.target_fpr)}": calibration.threshold}
    warning = saturation_warning(figures, photos="calibration photos", matched="an index vector")
    if warning:
        log.warning("%s: %s", source, warning)


def _with_nearest_db_photos(hardest: list[dict], photo_paths, photo_embeddings: np.ndarray, db_paths,
                            db_embeddings: np.ndarray, db_rows: np.ndarray, db_ids, represented: np.ndarray,
                            whiten) -> list[dict]:
    """``hardest`` (:func:`recognition.calibration.hardest_calibration_photos`), each entry with
    ``nearest_db_photo``: the absolute path of the DB photo of the landmark it matched that lies
    nearest to it (``None`` where it matched none), by the cosine of their embeddings after
    ``whiten`` (the index's whitening; without DBA or query expansion). The matched vector may be a
    centroid; this is the photo a person compares it with (``landmarks index``'s sheet), among the
    photos the index represents: a photo in a cluster dropped as too small played no part in the
    score. The DB photo with id ``db_ids[i]`` is ``db_paths`` / ``db_embeddings`` row ``db_rows[i]``
    (the readable ones, whose ``represented[i]`` says whether a vector stands for it); only the
    listed photos and their landmarks' photos are whitened, as a DB may be large."""
    if not hardest:
        return hardest
    row_of = {os.path.realpath(p): i for i, p in enumerate(photo_paths)}
    wanted = {entry["landmark_id"] for entry in hardest} - {None}
    members: dict[str, list[int]] = {}
    for row, landmark_id, kept in zip(db_rows, db_ids, represented):
        if kept and str(landmark_id) in wanted:
            members.setdefault(str(landmark_id), []).append(row)
    # Each landmark's photos and every listed photo whitened once, however many entries share them.
    members = {landmark_id: np.asarray(rows) for landmark_id, rows in members.items()}
    vectors = {landmark_id: whiten(db_embeddings[rows]) for landmark_id, rows in members.items()}
    queries = whiten(photo_embeddings[[row_of[entry["photo"]] for entry in hardest]])
    for entry, query in zip(hardest, queries):
        entry["nearest_db_photo"] = None
        if entry["landmark_id"] is not None:
            rows = members[entry["landmark_id"]]
            nearest = rows[int(np.argmax(vectors[entry["landmark_id"]] @ query))]
            entry["nearest_db_photo"] = os.path.realpath(db_paths[nearest])
    return hardest


def _check_gps_inputs(positions: np.ndarray, metadata: dict[str, dict], source: str) -> None:
    """Refuse a GPS calibration that cannot mean anything: no landmark with coordinates (the
    filter would remove nothing), or no calibration photo with a position."""
    if not any(m.get("lat") is not None for m in metadata.values()):
        raise UserError("--gps-radius-km: no landmark of the index has coordinates (give --landmarks with lat,lon "
                        "or lat,lon columns in the DB), so the filter would remove nothing")
    if not np.isfinite(positions).all(axis=1).any():
        raise UserError(f"--gps-radius-km: none of the {len(positions)} calibration photos of {source} has "
                        "a position (lat,lon columns or EXIF GPS)")


def _gps_calibration(index, embeddings, positions, radius_km, target_fpr, candidates, rule, allow_unresolved,
                     source: str):
    """:func:`recognition.gps.calibrate_with_gps`, refused where it cannot mean anything."""
    from recognition.calibration import CalibrationError
    from recognition.gps import calibrate_with_gps

    placed = int(np.isfinite(positions).all(axis=1).sum())
    if not placed:  # (every photo with a position was unreadable; the rest was checked before embedding)
        raise UserError(f"--gps-radius-km: none of the {len(positions)} readable calibration photos of {source} "
                        "has a position (lat,lon columns or EXIF GPS)")
    try:
        gps = calibrate_with_gps(index, embeddings, positions, radius_km, target_fpr, candidates=candidates,
                                 rule=rule, allow_unresolved=allow_unresolved)
    except CalibrationError as err:
        raise CalibrationError(f"{source}: the {placed} photos with a position: {err} (--allow-unresolved-fpr)") from None
    log.info("GPS threshold %.6f for FPR %g within %g km, on %d calibration photos with a position (%d without)",
             gps.calibration.threshold, target_fpr, radius_km, placed, gps.n_without_position)
    return gps


def build_landmark_index(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    *,
    checkpoint: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    scales=None,
    inference_precision: str | None = None,
    nonlandmarks: str | os.PathLike | None = None,
    target_fpr: float = 1e-3,
    allow_unresolved_fpr: bool = False,
    calibration_rule: str = "empirical",
    threshold: float | None = None,
    representation: Literal["centroids", "mean", "all"] = "centroids",
    centroid_params=None,
    index_kind: str = "flat",
    index_params: dict | None = None,
    landmarks_csv: str | os.PathLike | None = None,
    column_map: dict[str, str] | None = None,
    where: dict[str, str] | None = None,
    nonlandmarks_where: dict[str, str] | None = None,
    extra_columns: Literal["error", "ignore"] = "error",
    batch_size: int = 64,
    num_workers: int = 2,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE,
    progress: bool = True,
    verification=None,
    nonlandmark_pool: str | os.PathLike | None = None,
    penalty=None,
    descriptors=None,
    gps_radius_km: float | None = None,
    gps_candidates: int | None = None,
    use_exif_gps: bool = True,
):
    """Build and save an index of ``manifest`` at ``out``; returns ``(index, saved path)``.

    Exactly one of ``checkpoint`` / ``backbone``; ``image_size`` defaults to the checkpoint's, or
    :data:`BACKBONE_IMAGE_SIZE` for a backbone; ``scales`` (multiples of it, e.g. ``(0.707, 1, 1.414)``;
    default :data:`INDEX_SCALES`) embeds every photo at
    each and sums (:class:`retrieval.embedding_model.MultiScaleNet`; recorded
    in the model identity, so queries are embedded the same way; so is ``inference_precision``, by
    default the checkpoint's). ``nonlandmarks`` (non-landmark photos, CSV or
    folder) calibrate the threshold at ``target_fpr`` (``calibration_rule``: ``empirical`` or ``conformal``,
    :mod:`recognition.calibration`); ``threshold`` fixes it instead; with neither
    the index has no threshold. ``verification`` (a
    :class:`recognition.verification.VerificationParams`) stores local features for spatial
    verification and calibrates on verified scores. ``nonlandmark_pool`` (non-landmark photos, CSV
    or folder, disjoint from ``nonlandmarks``) stores their embeddings and lowers every score by
    ``penalty.weight`` × the query's mean cosine to its ``penalty.k`` nearest of them, before
    calibration (``penalty``: a :class:`recognition.artifact.PenaltyParams`, its defaults when None).
    ``descriptors`` (a :class:`recognition.descriptors.DescriptorParams`, all off when None) whitens
    (fitted on the DB and the pool), augments the DB (DBA) and expands queries; the threshold is
    calibrated on the post-processed scores. ``gps_radius_km`` calibrates a second threshold, at
    the same target, on the calibration photos that have a position (their ``lat``/``lon`` columns,
    else their EXIF unless ``use_exif_gps`` is False) with the GPS filter of that radius over their
    first ``gps_candidates`` landmarks (:func:`recognition.gps.calibrate_with_gps`); the recogniser
    uses it for photos with a position when given the same radius. Under DDP every rank embeds its share and rank 0 alone builds and
    writes the index (other ranks return None).
    """
    from pytorch_lightning.utilities import rank_zero_only

    from datamodules.manifest import drop_repeated_rows, load_manifest
    from recognition.artifact import LandmarkIndex, PenaltyParams, check_index_target
    from recognition.calibration import Calibration, CalibrationError, calibrate_threshold, hardest_calibration_photos
    from recognition.centroids import CentroidParams
    from recognition.descriptors import DescriptorParams
    from recognition.gps import GPS_CANDIDATES, photo_positions
    from retrieval.embedding_model import load_embedding_model, scale_factors

    check_index_target(out)  # before the embedding, not after it
    if threshold is not None and nonlandmarks:
        raise UserError("give --nonlandmarks (calibration) or --threshold, not both")
    if gps_radius_km is not None:
        if threshold is not None:
            raise UserError("--gps-radius-km calibrates a second threshold on the --nonlandmarks photos that have a "
                            "position; it cannot go with a fixed --threshold")
        if not nonlandmarks:
            raise UserError("--gps-radius-km calibrates a threshold on the --nonlandmarks photos that have a "
                            "position; give --nonlandmarks")
        if not gps_radius_km > 0:
            raise UserError(f"--gps-radius-km must be > 0, got {gps_radius_km}")
        if verification is not None:
            raise UserError("--gps-radius-km with --verify is not supported: the GPS threshold is calibrated on "
                            "global scores")
    gps_candidates = GPS_CANDIDATES if gps_candidates is None else int(gps_candidates)
    if gps_candidates < 1:
        raise UserError(f"gps_candidates must be >= 1, got {gps_candidates}")
    if (checkpoint is None) == (backbone is None):
        raise UserError("give exactly one of --checkpoint or --backbone")
    # A misspelt model fails before anything is read or logged.
    if backbone is not None:
        check_backbone(backbone)
    else:
        checkpoint_file(checkpoint)
    try:
        scale_factors(scales)
    except ValueError as err:
        raise UserError(f"--scales: {err}") from None
    params = centroid_params or CentroidParams()
    descriptors = descriptors or DescriptorParams()
    data = _image_files(load_manifest(manifest, "landmark", extra_columns=extra_columns, column_map=column_map or None))
    data = filter_rows(data, where)
    if "decision" in data.table.columns:
        keep = data.table["decision"].str.strip().str.lower().ne("remove").to_numpy()
        log.info("%s: using %d of %d rows (decision != remove)", data.source, int(keep.sum()), len(keep))
        data = data.subset(keep)
    if len(data) == 0:
        raise UserError(f"{data.source}: no landmark rows to index")
    # Metadata is read (and validated) before the long embedding pass, so a typo fails fast; and
    # before repeated rows are dropped, so a value only a repeat carries is not lost.
    metadata = landmark_metadata_of(data, landmarks_csv, set(data.landmark_ids))
    data = drop_repeated_rows(data, "indexed")
    calibration_set = None
    if nonlandmarks:
        calibration_set = _image_files(load_manifest(nonlandmarks, "nonlandmark", extra_columns=extra_columns,
                                                     column_map=column_map or None))
        calibration_set = filter_rows(calibration_set, nonlandmarks_where)
        # Read before the embedding, so a bad cell (or nothing to calibrate on) fails fast.
        positions = None
        if gps_radius_km is not None:
            positions = photo_positions(calibration_set, use_exif_gps)
            _check_gps_inputs(positions, metadata, calibration_set.source)
    elif threshold is None:
        log.warning("no --nonlandmarks: the index gets no calibrated threshold; `landmarks recognize` will then "
                    "need --threshold")
    pool_set = None
    if nonlandmark_pool:
        pool_set = _image_files(load_manifest(nonlandmark_pool, "nonlandmark", extra_columns=extra_columns,
                                              column_map=column_map or None))
        if calibration_set is not None:
            shared = set(map(os.path.abspath, pool_set.paths)) & set(map(os.path.abspath, calibration_set.paths))
            if shared:
                raise UserError(f"{pool_set.source}: {len(shared)} photo(s) are also in the calibration set "
                                f"{calibration_set.source}, e.g. {sorted(shared)[0]}; the threshold must be "
                                "calibrated on photos the penalty has not seen")

    if backbone is not None and image_size is None:
        image_size = BACKBONE_IMAGE_SIZE
    if scales is None:
        scales = INDEX_SCALES
    model = load_embedding_model(checkpoint=checkpoint, backbone=backbone, image_size=image_size, scales=scales,
                                 inference_precision=inference_precision)
    embedding = dict(batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, devices=devices,
                     strategy=strategy, cache_dir=cache_dir, progress=progress)
    emb, valid = embed_images(model, data.paths, "database", **embedding)
    nl_emb = None
    if calibration_set is not None:
        nl_emb, nl_valid = embed_images(model, calibration_set.paths, "calibration", **embedding)
        nl_emb = nl_emb[nl_valid]
        nl_paths = [p for p, ok in zip(calibration_set.paths, nl_valid) if ok]
        if positions is not None:
            positions = positions[nl_valid]
    pool_emb = None
    if pool_set is not None:
        pool_emb, pool_valid = embed_images(model, pool_set.paths, "non-landmark pool", **embedding)
        pool_emb = pool_emb[pool_valid]
    if rank_zero_only.rank != 0:
        return None  # every DDP rank embedded its share; rank 0 alone builds and writes the index
    if not valid.any():
        raise UserError(f"{data.source}: none of the {len(valid)} database images could be read")
    if pool_emb is not None and not len(pool_emb):
        raise UserError(f"{pool_set.source}: none of the non-landmark pool photos could be read")
    ids = [i for i, ok in zip(data.landmark_ids, valid) if ok]
    source = {"checkpoint": str(pathlib.Path(checkpoint).resolve())} if checkpoint else {"backbone": backbone}
    build = {
        "representation": representation,
        "clustering": {"distance_threshold": params.distance_threshold, "linkage": params.linkage,
                       "max_centroids": params.max_centroids, "min_cluster_size": params.min_cluster_size,
                       "few_photos": params.few_photos, "few_photos_mean": params.few_photos_mean},
        "manifest": str(pathlib.Path(data.source).resolve()),
        "n_images": int(valid.sum()), "n_unreadable": int((~valid).sum()),
    }
    if descriptors.whiten:
        # Fitted without labels on the DB and the pool; never on the calibration photos, whose
        # scores must behave like those of photos the index has not seen.
        build["whitening_photos"] = int(valid.sum()) + (0 if pool_emb is None else len(pool_emb))
        if build["whitening_photos"] < model.embedding_size:
            log.warning("--whiten is fitted on %d photos for %d dimensions; on the real photos such a fit lowered "
                        "recall at FPR 1%% (EXPERIMENTS.md, 'whitening'): give a larger --nonlandmark-pool or leave "
                        "whitening off", build["whitening_photos"], model.embedding_size)
    # The same build as the evaluation's shipped-decision index (RetrievalEvaluation centroid_index).
    index = LandmarkIndex.from_embeddings(
        emb[valid], ids, {"identity": model.identity, "key": model.key, "source": source}, representation, params,
        metadata, index_kind=index_kind, index_params=index_params or {}, build=build, progress=progress,
        descriptor_params=descriptors, unlabelled=pool_emb,
    )
    if pool_emb is not None:
        try:
            penalty = penalty or PenaltyParams()
            index.set_penalty(pool_emb, penalty.weight, penalty.k, source=str(pathlib.Path(pool_set.source).resolve()))
        except ValueError as err:
            raise UserError(f"--nonlandmark-pool: {err}") from None
    if verification is not None:
        from recognition.verification import LocalFeatures

        paths = [p for p, ok in zip(data.paths, valid) if ok]
        # The photos are chosen by their similarity to the index vectors, in the index's space.
        index.local_features = LocalFeatures.for_index(index, index.whiten(emb[valid]), ids, paths, verification,
                                                       progress=progress, net=model.net)
    if nl_emb is not None:
        if index.local_features is not None:
            # The threshold must be set on the scores the recogniser will compare with it.
            candidates, rows = index.search(nl_emb, index.local_features.params.candidates)
            scores, matched = index.local_features.verified_top1(nl_paths, candidates, rows, progress=progress,
                                                                 net=model.net)
        else:
            scores, matched = index.top1(nl_emb)
        try:
            index.calibration = calibrate_threshold(scores, target_fpr, allow_unresolved=allow_unresolved_fpr,
                                                    rule=calibration_rule)
        except CalibrationError as err:
            raise CalibrationError(f"{calibration_set.source}: {err} (--allow-unresolved-fpr)") from None
        if index.local_features is None and index.penalty is None:  # plain cosines (see _warn_if_saturated)
            _warn_if_saturated(scores, index.calibration, calibration_set.source)
        elif index.calibration.resolved:  # (an unresolved one has warned already)
            # A collapse of the embedding shows in the plain cosines whatever is applied on top.
            plain, _ = index.top1(nl_emb, penalised=False)
            _warn_if_saturated(plain, calibrate_threshold(plain, target_fpr, rule=calibration_rule),
                               f"{calibration_set.source} (plain cosines, before verification and the non-landmark "
                               "penalty)")
        index.build["calibration_set"] = str(pathlib.Path(calibration_set.source).resolve())
        if gps_radius_km is not None:
            index.gps_calibration = _gps_calibration(index, nl_emb, positions, gps_radius_km, target_fpr,
                                                     gps_candidates, calibration_rule, allow_unresolved_fpr,
                                                     calibration_set.source)
        # The photos that set the threshold, on the scores it was set on: where to look before
        # tuning for the low-FPR end (`landmarks index` prints the first of them).
        hardest = hardest_calibration_photos(scores, matched, nl_paths, index.landmark_ids, index.calibration.threshold)
        index.build["hardest_calibration_photos"] = _with_nearest_db_photos(
            hardest, nl_paths, nl_emb, data.paths, emb, np.flatnonzero(valid), ids, index.represented, index.whiten)
    elif threshold is not None:
        index.calibration = Calibration.fixed(threshold)
    return index, index.save(out)
