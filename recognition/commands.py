"""``landmarks index | recognize | albums | export``: the command-line face of :mod:`recognition`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys

import numpy as np
import pandas as pd

log = logging.getLogger("landmarks.recognition")

_DEFAULT_CACHE = "runs/embedding-cache"


# ---------------------------------------------------------------------------------------------
# shared pieces


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--checkpoint", help="a LandmarkModule checkpoint (landmarks fit)")
    group.add_argument("--backbone", help="a timm backbone with offline ImageNet weights, e.g. mobilenetv2_100")


def _parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _filter_rows(manifest, where: dict[str, str]):
    for column, value in where.items():
        if column not in manifest.table.columns:
            raise SystemExit(f"{manifest.source}: --where column {column!r} not in {list(manifest.table.columns)}")
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
        raise SystemExit(f"{source}: line {line}: {column}={text!r} is not a number") from None
    limit = 90 if column == "lat" else 180
    if not (math.isfinite(number) and -limit <= number <= limit):
        raise SystemExit(f"{source}: line {line}: {column}={number} is out of range [-{limit}, {limit}]")
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


def _landmark_metadata(manifest, landmarks_csv: str | None, known_ids: set[str]) -> dict[str, dict]:
    from recognition.artifact import landmark_metadata

    rows = []
    if landmarks_csv:
        path = pathlib.Path(landmarks_csv)
        if not path.is_file():
            raise SystemExit(f"--landmarks: file not found: {path}")
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "landmark_id" not in table.columns:
            raise SystemExit(f"{path}: needs a landmark_id column; found {list(table.columns)}")
        used = [c for c in ("name", "city", "lat", "lon") if c in table.columns]
        log.info("%s: landmark metadata columns %s", path, used)
        rows += _metadata_rows(table, str(path), range(2, len(table) + 2))
        unknown = {r["landmark_id"] for r in rows} - known_ids
        if unknown:
            log.info("%s: %d landmark(s) are not in the database; ignored", path, len(unknown))
    # Metadata file first: its values win over the per-photo columns of the manifest.
    rows += _metadata_rows(manifest.table.assign(landmark_id=manifest.landmark_ids), manifest.source, manifest.lines)
    return landmark_metadata(r for r in rows if r["landmark_id"] in known_ids)


def _embed(model, paths, args, what: str):
    from retrieval.embed import embed_paths

    log.info("embedding %d %s images", len(paths), what)
    result = embed_paths(
        model, paths, batch_size=args.batch_size, num_workers=args.num_workers, accelerator=args.accelerator,
        devices=args.devices, strategy=args.strategy, cache_dir=args.cache_dir or None, progress=True,
    )
    bad = np.flatnonzero(~result.valid)
    if len(bad):
        log.warning("%d of %d %s images are unreadable and left out, e.g. %s", len(bad), len(paths), what,
                    paths[bad[0]])
    return result.embeddings, result.valid


# ---------------------------------------------------------------------------------------------
# landmarks index


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    from recognition.centroids import CentroidParams

    parser.add_argument("--manifest", required=True, help="landmark DB: CSV (path,landmark_id) or ImageFolder; "
                        "rows with decision=remove are left out")
    parser.add_argument("--out", required=True, help="index directory to write (replaced atomically if it is an index)")
    _add_model_arguments(parser, required=True)
    parser.add_argument("--image-size", type=int, default=None, help="default: the checkpoint's (224 for a backbone)")
    cal = parser.add_argument_group("threshold")
    cal.add_argument("--nonlandmarks", help="non-landmark calibration photos: CSV (path) or folder")
    cal.add_argument("--target-fpr", type=float, default=1e-3, help="calibrated false-positive rate (default 1e-3)")
    cal.add_argument("--allow-unresolved-fpr", action="store_true",
                     help="calibrate even with fewer than 1/FPR non-landmark photos (loud warning)")
    cal.add_argument("--threshold", type=float, help="a fixed threshold instead of calibration")
    rep = parser.add_argument_group("representation")
    rep.add_argument("--representation", choices=("centroids", "mean", "all"), default="centroids",
                     help="per-landmark shooting-angle centroids (default), one mean, or every photo")
    defaults = CentroidParams()
    rep.add_argument("--distance-threshold", type=float, default=defaults.distance_threshold,
                     help="cosine distance at which a landmark's dendrogram is cut into angle clusters")
    rep.add_argument("--linkage", default=defaults.linkage, help="agglomerative linkage (average, complete, ward, ...)")
    rep.add_argument("--max-centroids", type=int, default=defaults.max_centroids, help="most centroids per landmark")
    rep.add_argument("--min-cluster-size", type=int, default=defaults.min_cluster_size,
                     help="smaller clusters are dropped as noise (a landmark keeps at least its largest)")
    idx = parser.add_argument_group("FAISS index")
    idx.add_argument("--index-kind", choices=("flat", "ivf", "ivfpq", "hnsw"), default="flat",
                     help="flat = exact (default); ivf / ivfpq / hnsw for millions of centroids")
    idx.add_argument("--nlist", type=int, help="IVF lists")
    idx.add_argument("--nprobe", type=int, default=16, help="IVF lists scanned per query")
    idx.add_argument("--pq-m", type=int, help="IVF-PQ sub-quantisers (must divide the embedding size)")
    idx.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree")
    idx.add_argument("--ef-search", type=int, default=128, help="HNSW search width")
    data = parser.add_argument_group("data")
    data.add_argument("--landmarks", help="per-landmark metadata CSV: landmark_id[,name,city,lat,lon]")
    data.add_argument("--column-map", action="append", metavar="OURS=THEIRS",
                      help="rename a CSV column, e.g. path=relpath (repeatable; applies to both manifests)")
    data.add_argument("--where", action="append", metavar="COLUMN=VALUE", help="keep only DB rows with this value")
    data.add_argument("--nonlandmarks-where", action="append", metavar="COLUMN=VALUE",
                      help="keep only calibration rows with this value")
    data.add_argument("--extra-columns", choices=("error", "ignore"), default="error", help="unknown CSV columns")
    run = parser.add_argument_group("embedding")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--num-workers", type=int, default=2)
    run.add_argument("--accelerator", default="auto")
    run.add_argument("--devices", default="1", help="e.g. 4 with --strategy ddp")
    run.add_argument("--strategy", default="auto")
    run.add_argument("--cache-dir", default=_DEFAULT_CACHE, help="embedding cache ('' for none)")


def _index_params(args) -> dict:
    if args.index_kind == "flat":
        return {}
    if args.index_kind == "hnsw":
        return {"hnsw_m": args.hnsw_m, "ef_search": args.ef_search}
    params = {"nprobe": args.nprobe}
    if args.nlist:
        params["nlist"] = args.nlist
    if args.index_kind == "ivfpq" and args.pq_m:
        params["pq_m"] = args.pq_m
    return params


def run_index_command(args) -> int:
    from pytorch_lightning.utilities import rank_zero_only

    from datamodules.manifest import load_manifest
    from recognition.artifact import LandmarkIndex
    from recognition.calibration import CalibrationError, calibrate_threshold
    from recognition.centroids import CentroidParams, build_representation
    from retrieval.embedding_model import load_embedding_model

    if args.threshold is not None and args.nonlandmarks:
        raise SystemExit("give --nonlandmarks (calibration) or --threshold, not both")
    if args.devices.isdigit():
        args.devices = int(args.devices)
    column_map = _parse_pairs(args.column_map, "--column-map") or None
    manifest = load_manifest(args.manifest, "landmark", extra_columns=args.extra_columns, column_map=column_map)
    manifest = _filter_rows(manifest, _parse_pairs(args.where, "--where"))
    if "decision" in manifest.table.columns:
        keep = manifest.table["decision"].str.strip().str.lower().ne("remove").to_numpy()
        log.info("%s: using %d of %d rows (decision != remove)", manifest.source, int(keep.sum()), len(keep))
        manifest = manifest.subset(keep)
    if len(manifest) == 0:
        raise SystemExit(f"{manifest.source}: no landmark rows to index")
    params = CentroidParams(args.distance_threshold, args.linkage, args.max_centroids, args.min_cluster_size)
    # Metadata is read (and validated) before the long embedding pass, so a typo fails fast.
    metadata = _landmark_metadata(manifest, args.landmarks, set(manifest.landmark_ids))
    calibration_set = None
    if args.nonlandmarks:
        calibration_set = load_manifest(args.nonlandmarks, "nonlandmark", extra_columns=args.extra_columns,
                                        column_map=column_map)
        calibration_set = _filter_rows(calibration_set, _parse_pairs(args.nonlandmarks_where, "--nonlandmarks-where"))
    elif args.threshold is None:
        log.warning("no --nonlandmarks: the index gets no calibrated threshold; `landmarks recognize` will then "
                    "need --threshold")

    model = load_embedding_model(checkpoint=args.checkpoint, backbone=args.backbone, image_size=args.image_size)
    emb, valid = _embed(model, manifest.paths, args, "database")
    nl_emb = None
    if calibration_set is not None:
        nl_emb, nl_valid = _embed(model, calibration_set.paths, args, "calibration")
        nl_emb = nl_emb[nl_valid]
    if rank_zero_only.rank != 0:
        return 0  # every DDP rank embedded its share; rank 0 alone builds and writes the index
    if not valid.any():
        raise SystemExit(f"{manifest.source}: none of the {len(valid)} database images could be read")
    ids = [i for i, ok in zip(manifest.landmark_ids, valid) if ok]
    reps = build_representation(emb[valid], ids, args.representation, params, progress=True)
    source = ({"checkpoint": str(pathlib.Path(args.checkpoint).resolve())} if args.checkpoint
              else {"backbone": args.backbone})
    build = {
        "representation": args.representation,
        "clustering": {"distance_threshold": params.distance_threshold, "linkage": params.linkage,
                       "max_centroids": params.max_centroids, "min_cluster_size": params.min_cluster_size},
        "manifest": str(pathlib.Path(manifest.source).resolve()),
        "n_images": int(valid.sum()), "n_unreadable": int((~valid).sum()),
    }
    index = LandmarkIndex.from_centroids(
        reps, {"identity": model.identity, "key": model.key, "source": source}, metadata,
        index_kind=args.index_kind, index_params=_index_params(args), build=build,
    )
    if nl_emb is not None:
        scores, _ = index.top1(nl_emb)
        try:
            index.calibration = calibrate_threshold(scores, args.target_fpr, allow_unresolved=args.allow_unresolved_fpr)
        except CalibrationError as err:
            raise SystemExit(f"{calibration_set.source}: {err} (--allow-unresolved-fpr)") from None
        index.build["calibration_set"] = str(pathlib.Path(calibration_set.source).resolve())
    elif args.threshold is not None:
        from recognition.calibration import Calibration

        index.calibration = Calibration.fixed(args.threshold)
    out = index.save(args.out)
    cal = index.calibration
    print(f"index:      {out}")
    print(f"landmarks:  {len(index.landmarks)}  vectors: {len(index)} ({args.representation}, {args.index_kind}); "
          f"images: {build['n_images']} (+{build['n_unreadable']} unreadable, "
          f"{index.build['dropped_images']} in dropped small clusters)")
    if cal is None:
        print("threshold:  none (pass --nonlandmarks to calibrate)")
    elif cal.n_calibration:
        print(f"threshold:  {cal.threshold:.6f} for FPR {cal.target_fpr:g}: {cal.n_false_positives}/{cal.n_calibration} "
              f"calibration images accepted (FPR {cal.achieved_fpr:.2e}){'' if cal.resolved else '  [UNRESOLVED]'}")
    else:
        print(f"threshold:  {cal.threshold:.6f} (fixed, not calibrated)")
    return 0


# ---------------------------------------------------------------------------------------------
# landmarks recognize


def _add_recognizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index directory from `landmarks index`")
    _add_model_arguments(parser, required=False)
    parser.add_argument("--threshold", type=float, help="override the index's calibrated threshold")
    parser.add_argument("--top-k", type=int, default=5, help="candidates per photo")
    parser.add_argument("--gps-radius-km", type=float, help="reject landmarks farther than this from the photo's GPS")
    parser.add_argument("--gps-csv", help="CSV with path,lat,lon for photos (else their EXIF GPS is used)")
    parser.add_argument("--no-exif-gps", action="store_true", help="do not read GPS from EXIF")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")


def _recognizer(args):
    from recognition.gps import read_gps_csv
    from recognition.recognizer import Recognizer

    return Recognizer(
        args.index, checkpoint=args.checkpoint, backbone=args.backbone, threshold=args.threshold, top_k=args.top_k,
        gps_radius_km=args.gps_radius_km, gps=read_gps_csv(args.gps_csv) if args.gps_csv else None,
        use_exif_gps=not args.no_exif_gps, batch_size=args.batch_size, workers=args.workers, device=args.device,
    )


def add_recognize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files, folders, or list files (.txt: one path per line)")
    _add_recognizer_arguments(parser)
    parser.add_argument("--json", action="store_true", help="JSON lines (one object per photo) instead of a table")


def _table_row(r) -> str:
    if r.error is not None:
        return f"{'ERROR':<8} {'':<14} {'':>7}  {r.path}  ({r.error})"
    label = r.landmark_id or "-"
    score = "" if r.score is None else f"{r.score:.4f}"
    name = f"  [{r.name}]" if r.name and r.accepted else ""
    return f"{'yes' if r.accepted else 'no':<8} {label:<14} {score:>7}  {r.path}{name}"


def run_recognize_command(args) -> int:
    from recognition.recognizer import expand_paths

    paths = expand_paths(args.paths)
    if not paths:
        raise SystemExit("no images found in " + " ".join(args.paths))
    recognizer = _recognizer(args)
    counts = {"photos": 0, "accepted": 0, "unreadable": 0}
    if not args.json:
        print(f"{'accepted':<8} {'landmark_id':<14} {'score':>7}  path")
    for r in recognizer.iter_recognize(paths, progress=True):
        counts["photos"] += 1
        counts["accepted"] += int(r.accepted)
        counts["unreadable"] += int(r.error is not None)
        print(json.dumps(r.to_json()) if args.json else _table_row(r), flush=True)
    print(f"{counts['photos']} photos: {counts['accepted']} accepted, {counts['unreadable']} unreadable "
          f"(threshold {recognizer.threshold:.4f})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# landmarks albums


def add_albums_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", help="folder(s) of photos (or files / list files)")
    parser.add_argument("--out", required=True, help="output folder: albums.json, index.html, thumbs/")
    parser.add_argument("--thumb-size", type=int, default=320)
    parser.add_argument("--title", default="Landmark albums")
    _add_recognizer_arguments(parser)


def run_albums_command(args) -> int:
    from recognition.albums import group_albums, write_albums
    from recognition.recognizer import expand_paths

    paths = expand_paths(args.photos)
    if not paths:
        raise SystemExit("no images found in " + " ".join(args.photos))
    recognizer = _recognizer(args)
    albums = group_albums(recognizer.iter_recognize(paths, progress=True))
    written = write_albums(albums, args.out, thumb_size=args.thumb_size, title=args.title)
    c = albums["counts"]
    print(f"{c['photos']} photos: {c['recognised']} in {c['albums']} albums, {c['unrecognised']} unrecognised, "
          f"{c['unreadable']} unreadable")
    for album in albums["albums"]:
        print(f"  {len(album['photos']):>4}  {album['name'] or album['landmark_id']}"
              f"{'  (' + album['city'] + ')' if album['city'] else ''}")
    print(f"albums: {written['json']}\npage:   {written['html']}")
    return 0


# ---------------------------------------------------------------------------------------------
# landmarks export


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="a LandmarkModule checkpoint")
    group.add_argument("--backbone", help="a timm backbone with offline ImageNet weights")
    group.add_argument("--index", help="export the model an index was built with")
    parser.add_argument("--out", required=True, help="output folder: model.pt, model.onnx, export.json")
    parser.add_argument("--format", nargs="+", choices=("torchscript", "onnx"), default=["torchscript", "onnx"])
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the eager model")


def run_export_command(args) -> int:
    from recognition.export import export_model
    from retrieval.embedding_model import load_embedding_model

    if args.index:
        from recognition.artifact import LandmarkIndex
        from recognition.recognizer import load_index_model

        model = load_index_model(LandmarkIndex.load(args.index))
    else:
        model = load_embedding_model(checkpoint=args.checkpoint, backbone=args.backbone, image_size=args.image_size)
    meta = export_model(model, args.out, formats=args.format, check=not args.no_check)
    for fmt, entry in meta["files"].items():
        check = f"max |export - eager| = {entry['max_abs_diff']:.2e}" if entry["checked"] else "not checked"
        print(f"{fmt:<12} {pathlib.Path(args.out) / entry['file']}  ({check})")
    return 0
