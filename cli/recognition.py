"""``landmarks index | recognize | albums | export``: the command line of :mod:`recognition`.

Parsing and printing only: the work is :func:`recognition.indexing.build_landmark_index`,
:class:`recognition.recognizer.Recognizer`, :func:`recognition.albums.group_albums` and
:func:`recognition.export.export_model`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import sys

from cli.argtypes import (
    finite_float,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    rate,
    torch_device,
)
from core.errors import UserError

_DEFAULT_CACHE = "runs/embedding-cache"
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# shared pieces


def _add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--checkpoint", help="a LandmarkModule checkpoint (landmarks fit)")
    group.add_argument("--backbone", help="a timm backbone with offline ImageNet weights, e.g. mobilenetv2_100")


def _add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inference-precision", choices=("32", "bf16"), default=None,
                        help="embed in float32 or under bf16 autocast (default: what the checkpoint's fit "
                             "configured, model.inference_precision; float32 for a backbone)")


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` → ``{KEY: VALUE}`` (an option given repeatedly)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _devices(value: str) -> int | str:
    return int(value) if str(value).isdigit() else value


# ---------------------------------------------------------------------------------------------
# landmarks index


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    from recognition.artifact import PenaltyParams
    from recognition.calibration import CALIBRATION_RULES
    from recognition.centroids import CentroidParams
    from recognition.verification import LOCAL_KINDS, VerificationParams

    parser.add_argument("--manifest", required=True, help="landmark DB: CSV (path,landmark_id) or ImageFolder; "
                        "rows with decision=remove are left out")
    parser.add_argument("--out", required=True, help="index directory to write (replaced atomically if it is an index)")
    _add_model_arguments(parser, required=True)
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the checkpoint's (320 for a backbone: measured on real photos)")
    _add_precision_argument(parser)
    parser.add_argument("--scales", type=positive_float, nargs="+", default=None, metavar="S",
                        help="multi-scale embedding: each photo (and every query) is embedded at these multiples "
                             "of --image-size and the unit embeddings summed (default: 1 1.414, measured on real photos "
                             "and on the demo's checkpoints, at 3x the forward time; `--scales 1`: one scale)")
    cal = parser.add_argument_group("threshold")
    cal.add_argument("--nonlandmarks", help="non-landmark calibration photos: CSV (path) or folder")
    cal.add_argument("--target-fpr", type=rate, default=1e-3, help="calibrated false-positive rate (default 1e-3)")
    cal.add_argument("--calibration-rule", choices=CALIBRATION_RULES, default="empirical",
                     help="empirical (default): at most --target-fpr of these photos pass; conformal: at most "
                          "--target-fpr of new photos, in expectation (one photo fewer passes at 2,000 and 1e-3, "
                          "for less recall; docs/inference.md)")
    cal.add_argument("--allow-unresolved-fpr", action="store_true",
                     help="calibrate even with fewer than 1/FPR non-landmark photos (loud warning)")
    cal.add_argument("--threshold", type=finite_float, help="a fixed threshold instead of calibration")
    cal.add_argument("--gps-radius-km", type=positive_float,
                     help="also calibrate a threshold for photos with a position: on the --nonlandmarks photos "
                          "that have one (lat,lon columns, else EXIF GPS), with the GPS filter of this radius; "
                          "`landmarks recognize --gps-radius-km` with the same radius uses it")
    cal.add_argument("--no-exif-gps", action="store_true",
                     help="with --gps-radius-km: take positions from the lat,lon columns only, not from EXIF")
    rep = parser.add_argument_group("representation")
    rep.add_argument("--representation", choices=("centroids", "mean", "all"), default="centroids",
                     help="per-landmark shooting-angle centroids (default), one mean, or every photo")
    defaults = CentroidParams()
    rep.add_argument("--distance-threshold", type=nonnegative_float, default=defaults.distance_threshold,
                     help=f"cosine distance at which a landmark's dendrogram is cut into angle clusters "
                          f"(default {defaults.distance_threshold:g}, measured on the trained demo models)")
    rep.add_argument("--linkage", default=defaults.linkage, help="agglomerative linkage (average, complete, ward, ...)")
    rep.add_argument("--max-centroids", type=positive_int, default=defaults.max_centroids, help="most centroids per landmark")
    rep.add_argument("--min-cluster-size", type=positive_int, default=defaults.min_cluster_size,
                     help=f"smaller clusters are dropped as noise (default {defaults.min_cluster_size}; "
                          f"a landmark keeps at least its largest)")
    rep.add_argument("--few-photos", type=nonnegative_int, default=defaults.few_photos,
                     help=f"a landmark with fewer photos keeps every photo instead of clusters "
                          f"(default {defaults.few_photos}; 0 clusters every landmark)")
    rep.add_argument("--few-photos-mean", action="store_true",
                     help="such a landmark also keeps the mean of its photos (measured worse at 320 px)")
    idx = parser.add_argument_group("FAISS index")
    idx.add_argument("--index-kind", choices=("flat", "ivf", "ivfpq", "hnsw"), default="flat",
                     help="flat = exact (default); ivf / ivfpq / hnsw for millions of centroids")
    idx.add_argument("--nlist", type=positive_int, help="IVF lists")
    idx.add_argument("--nprobe", type=positive_int, default=16, help="IVF lists scanned per query")
    idx.add_argument("--pq-m", type=positive_int, help="IVF-PQ sub-quantisers (must divide the embedding size)")
    idx.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW graph degree")
    idx.add_argument("--ef-search", type=positive_int, default=128, help="HNSW search width")
    pen = parser.add_argument_group("non-landmark penalty (off unless --nonlandmark-pool)")
    pen.add_argument("--nonlandmark-pool", help="known non-landmark photos (CSV with path, or folder; not the "
                     "--nonlandmarks calibration photos): every score is lowered by --penalty-weight × the photo's "
                     "mean cosine to its --penalty-k nearest of them")
    pdefaults = PenaltyParams()
    pen.add_argument("--penalty-weight", type=nonnegative_float, default=pdefaults.weight,
                     help=f"default {pdefaults.weight} (measured best of 0.1-1)")
    pen.add_argument("--penalty-k", type=positive_int, default=pdefaults.k,
                     help=f"nearest pool photos averaged (default {pdefaults.k}; 5 measured lower)")
    des = parser.add_argument_group(
        "global descriptor post-processing (off by default: none beat the index without it on real photos; "
        "EXPERIMENTS.md, 'whitening, query expansion and database-side augmentation')")
    des.add_argument("--whiten", type=nonnegative_float, default=0.0, metavar="POWER",
                     help="PCA-whitening fitted on the DB photos (and the --nonlandmark-pool), components scaled by "
                          "(variance + shrink x mean variance)^-POWER: 0.5 full, 0.25 partial (0: off)")
    des.add_argument("--whiten-shrink", type=nonnegative_float, default=1.0, help="whitening shrinkage (default 1)")
    des.add_argument("--dba", type=nonnegative_int, default=0, metavar="N",
                     help="database-side augmentation: each DB photo plus its N nearest DB photos (0: off)")
    des.add_argument("--query-expansion", type=nonnegative_int, default=0, metavar="N",
                     help="alpha-query expansion: each query plus its N nearest index vectors (0: off)")
    des.add_argument("--expansion-alpha", type=nonnegative_float, default=3.0,
                     help="DBA and query expansion weigh a neighbour by max(cosine, 0)^ALPHA (default 3)")
    ver = parser.add_argument_group("spatial verification (off by default: EXPERIMENTS.md, 'spatial verification')")
    ver.add_argument("--verify", action="store_true",
                     help="store local features of a few photos per landmark and re-score each query's best candidates "
                          "by homography inliers (the threshold is calibrated on the verified scores)")
    sift, cnn = VerificationParams.for_local("sift"), VerificationParams.for_local("cnn")
    ver.add_argument("--verify-local", choices=LOCAL_KINDS, default="sift",
                     help="local features: OpenCV SIFT, or DELF-style cells of the model's own stride-16 feature map "
                          "(cnn); the options below default to each kind's measured values")
    ver.add_argument("--verify-candidates", type=positive_int, help=f"landmarks verified per query ({sift.candidates})")
    ver.add_argument("--verify-photos", type=positive_int,
                     help=f"gallery photos stored and matched per landmark ({sift.images_per_landmark})")
    ver.add_argument("--verify-weight", type=nonnegative_float,
                     help=f"score added per inlier (SIFT {sift.weight:g}, cnn {cnn.weight:g})")
    ver.add_argument("--verify-min-inliers", type=positive_int,
                     help=f"fewer homography inliers add nothing (SIFT {sift.min_inliers}, cnn {cnn.min_inliers})")
    ver.add_argument("--verify-max-side", type=positive_int, help=f"photo size for local features in pixels ({sift.max_side})")
    ver.add_argument("--verify-features", type=positive_int,
                     help=f"SIFT keypoints / CNN cells kept per photo ({sift.n_features})")
    data = parser.add_argument_group("data")
    data.add_argument("--landmarks", help="per-landmark metadata CSV: landmark_id[,name,city,lat,lon]")
    data.add_argument("--column-map", action="append", metavar="OURS=THEIRS",
                      help="rename a CSV column, e.g. path=relpath (repeatable; applies to both manifests)")
    data.add_argument("--where", action="append", metavar="COLUMN=VALUE", help="keep only DB rows with this value")
    data.add_argument("--nonlandmarks-where", action="append", metavar="COLUMN=VALUE",
                      help="keep only calibration rows with this value")
    data.add_argument("--extra-columns", choices=("error", "ignore"), default="error", help="unknown CSV columns")
    run = parser.add_argument_group("embedding")
    run.add_argument("--batch-size", type=positive_int, default=64)
    run.add_argument("--num-workers", type=nonnegative_int, default=2)
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


def _shown(path) -> str:
    """``path`` relative to the working folder when it lies inside it, else absolute."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


#: The sheet of the calibration photos that set an index's threshold, written into the index folder.
HARDEST_SHEET = "hardest_calibration_photos.jpg"


def write_hardest_sheet(index, out: pathlib.Path) -> pathlib.Path:
    """Draw the index's 8 hardest calibration photos above their landmark's nearest DB photo into
    ``out / HARDEST_SHEET`` (JPEG, the fit's sheet of hardest distractors in the index's terms)."""
    from core.atomic import atomic_path
    from datamodules.images import UnreadableImage, load_rgb
    from recognition.calibration import HARDEST_CALIBRATION_PHOTOS
    from retrieval.plots import plot_hardest_distractors

    def thumbnail(path):
        try:
            return None if path is None else load_rgb(path, max_side=192)
        except UnreadableImage:
            return None

    cal = index.calibration
    # The 8 highest (ranks 1-8), however many pass: a column each, and thousands would not fit a JPEG.
    pairs = [(thumbnail(h["photo"]), thumbnail(h["nearest_db_photo"]), h["score"], h["landmark_id"] or "none")
             for h in index.build["hardest_calibration_photos"][:HARDEST_CALIBRATION_PHOTOS]]
    figure = plot_hardest_distractors(
        pairs, {f"{cal.target_fpr:g}": cal.threshold}, rows=("calibration\nphoto", "nearest DB photo\nof its landmark"),
        title=f"Calibration photos with the highest scores (they set the threshold {cal.threshold:.4f})",
        score_name="score")
    target = out / HARDEST_SHEET
    with atomic_path(target) as tmp:
        figure.savefig(tmp, dpi=100, pil_kwargs={"quality": 85})
    return target


def run_index_command(args: argparse.Namespace) -> int:
    from recognition.artifact import PenaltyParams
    from recognition.calibration import HARDEST_CALIBRATION_PHOTOS
    from recognition.centroids import CentroidParams
    from recognition.descriptors import DescriptorParams
    from recognition.indexing import build_landmark_index
    from recognition.verification import VerificationParams

    if args.no_exif_gps and args.gps_radius_km is None:
        raise UserError("--no-exif-gps says where the calibration photos' positions come from; it needs --gps-radius-km")
    try:
        descriptors = DescriptorParams(args.whiten, args.whiten_shrink, args.dba, args.query_expansion,
                                       args.expansion_alpha)
    except ValueError as err:
        raise UserError(f"--whiten / --dba / --query-expansion: {err}") from None
    built = build_landmark_index(
        args.manifest, args.out, checkpoint=args.checkpoint, backbone=args.backbone, image_size=args.image_size,
        scales=args.scales, inference_precision=args.inference_precision, nonlandmarks=args.nonlandmarks,
        target_fpr=args.target_fpr, allow_unresolved_fpr=args.allow_unresolved_fpr,
        calibration_rule=args.calibration_rule, threshold=args.threshold, representation=args.representation,
        centroid_params=CentroidParams(args.distance_threshold, args.linkage, args.max_centroids,
                                       args.min_cluster_size, args.few_photos, args.few_photos_mean),
        index_kind=args.index_kind, index_params=_index_params(args), landmarks_csv=args.landmarks,
        column_map=parse_pairs(args.column_map, "--column-map"), where=parse_pairs(args.where, "--where"),
        nonlandmarks_where=parse_pairs(args.nonlandmarks_where, "--nonlandmarks-where"),
        extra_columns=args.extra_columns, batch_size=args.batch_size, num_workers=args.num_workers,
        accelerator=args.accelerator, devices=_devices(args.devices), strategy=args.strategy,
        cache_dir=args.cache_dir,
        nonlandmark_pool=args.nonlandmark_pool, penalty=PenaltyParams(weight=args.penalty_weight, k=args.penalty_k),
        verification=VerificationParams.for_local(
            args.verify_local, max_side=args.verify_max_side, n_features=args.verify_features,
            candidates=args.verify_candidates, images_per_landmark=args.verify_photos, weight=args.verify_weight,
            min_inliers=args.verify_min_inliers,
        ) if args.verify else None,
        descriptors=descriptors, gps_radius_km=args.gps_radius_km, use_exif_gps=not args.no_exif_gps,
    )
    if built is None:
        return 0  # a DDP rank other than 0
    index, out = built
    build, cal = index.build, index.calibration
    print(f"index:      {out}")
    print(f"landmarks:  {len(index.landmarks)}  vectors: {len(index)} ({args.representation}, {args.index_kind}); "
          f"images: {build['n_images']} (+{build['n_unreadable']} unreadable, "
          f"{build['dropped_images']} in dropped small clusters)")
    if cal is None:
        print("threshold:  none (pass --nonlandmarks to calibrate)")
    elif cal.n_calibration:
        print(f"threshold:  {cal.threshold:.6f} for FPR {cal.target_fpr:g}: {cal.n_false_positives}/{cal.n_calibration} "
              f"calibration images accepted (FPR {cal.achieved_fpr:.2e}; {cal.rule} rule)"
              f"{'' if cal.resolved else '  [UNRESOLVED]'}")
        for line in cal.new_photo_lines():
            print(f"            {line}")
        hardest = build.get("hardest_calibration_photos") or []
        # The accepted photos and the first one rejected: the threshold lies between the last two.
        # Many accepted (a high target FPR): the first 5, then the last accepted and the first rejected.
        accepted = sum(h["accepted"] for h in hardest)
        shown = hardest[:max(3, accepted + 1)]
        if len(shown) > 8:
            shown = shown[:5] + [None] + shown[accepted - 1:accepted + 1]
        if shown:
            print(f"hardest:    the highest-scoring calibration photos, {accepted} accepted "
                  f"(index.json lists {len(hardest)}: build.hardest_calibration_photos)")
            names = {lm["landmark_id"]: lm.get("name") for lm in index.landmarks}
            for h in shown:
                if h is None:
                    print(f"            ... {accepted - 6} more accepted")
                    continue
                name = names.get(h["landmark_id"])
                matched = "no landmark" if h["landmark_id"] is None else h["landmark_id"] + (f" ({name})" if name else "")
                print(f"            {h['score']:.4f}  {'accepted' if h['accepted'] else 'rejected'}  "
                      f"{_shown(h['photo'])}  -> {matched}")
            print(f"            the first {min(len(hardest), HARDEST_CALIBRATION_PHOTOS)}, each above its landmark's "
                  f"nearest DB photo: {_shown(write_hardest_sheet(index, out))}")
    else:
        print(f"threshold:  {cal.threshold:.6f} (fixed, not calibrated)")
    if index.gps_calibration is not None:
        gps = index.gps_calibration
        g = gps.calibration
        print(f"with GPS:   {g.threshold:.6f} for photos with a position (filter {gps.radius_km:g} km over the first "
              f"{gps.candidates} landmarks): {g.n_false_positives}/{g.n_calibration} calibration images accepted "
              f"(FPR {g.achieved_fpr:.2e}; {gps.n_without_position} without a position left out)"
              f"{'' if g.resolved else '  [UNRESOLVED]'}")
    if index.penalty is not None:
        pen = index.penalty
        print(f"penalty:    score − {pen['weight']:g} × mean cosine to the {pen['k']} nearest of "
              f"{len(pen['pool'])} non-landmark pool photos")
    scales = index.model.get("identity", {}).get("scales")
    if scales:
        print(f"scales:     every photo embedded at {' / '.join(f'{s:g}' for s in scales)} × "
              f"{index.model['identity']['image_size']} px, summed")
    if index.descriptor_params.active:
        des = index.descriptor_params
        steps = ([f"whitened (power {des.whiten:g}, shrink {des.whiten_shrink:g}, fitted on "
                  f"{index.build['whitening_photos']} photos)"] if des.whiten else [])
        steps += [f"DBA over {des.dba} neighbours"] if des.dba else []
        steps += [f"queries expanded by {des.query_expansion} index vectors"] if des.query_expansion else []
        print(f"descriptor: {'; '.join(steps)}")
    if index.local_features is not None:
        lf = index.local_features
        print(f"verified:   {len(lf.landmark)} photos stored ({len(lf.keypoints)} "
              f"{'SIFT keypoints' if lf.params.local == 'sift' else 'CNN feature cells'}); "
              f"the best {lf.params.candidates} candidates of each query are verified")
    return 0


# ---------------------------------------------------------------------------------------------
# landmarks recognize


def _add_recognizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="index directory from `landmarks index`")
    _add_model_arguments(parser, required=False)
    parser.add_argument("--threshold", type=finite_float, help="override the index's calibrated threshold")
    parser.add_argument("--top-k", type=positive_int, default=5, help="candidates per photo")
    parser.add_argument("--gps-radius-km", type=positive_float,
                        help="reject landmarks farther than this from the photo's GPS; with an index built with "
                             "the same --gps-radius-km, a photo with a position is decided by its GPS threshold")
    parser.add_argument("--gps-csv", help="CSV with path,lat,lon for photos (else their EXIF GPS is used)")
    parser.add_argument("--no-exif-gps", action="store_true", help="do not read GPS from EXIF")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--workers", type=nonnegative_int, default=2, help="image decoding threads (0 counts as 1)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--cache-dir", default=None,
                        help="embedding cache (e.g. the index's, runs/embedding-cache): photos embedded there "
                             "before are not embedded again (default: none)")


def _recognizer(args):
    from recognition.gps import read_gps_csv
    from recognition.recognizer import Recognizer

    return Recognizer(
        args.index, checkpoint=args.checkpoint, backbone=args.backbone, threshold=args.threshold, top_k=args.top_k,
        gps_radius_km=args.gps_radius_km, gps=read_gps_csv(args.gps_csv) if args.gps_csv else None,
        use_exif_gps=not args.no_exif_gps, batch_size=args.batch_size, workers=args.workers, device=args.device,
        cache_dir=args.cache_dir or None,
    )


def _photos(items: list[str]) -> list[str]:
    from recognition.recognizer import expand_paths

    # A path typed on the command line that does not exist is a typo, refused before any work; a
    # missing path inside a list file stays an error entry (lists are often generated).
    missing = [item for item in items if not os.path.lexists(item)]
    if missing:
        raise UserError(f"{missing[0]}: no such file or folder" + (f" ({len(missing)} such paths)" if len(missing) > 1 else ""))
    paths = expand_paths(items)
    if not paths:
        raise UserError("no images found in " + " ".join(items))
    return paths


def _table_cell(path: str) -> str:
    """A path as one table cell: control characters (a newline in a file name) escaped, and bytes
    that are not UTF-8 (kept by Python as lone surrogates, which stdout cannot encode) as \\xNN."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def add_recognize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", help="image files, folders, or list files (.txt: one path per line)")
    _add_recognizer_arguments(parser)
    parser.add_argument("--json", action="store_true", help="JSON lines (one object per photo) instead of a table")


def _table_row(r) -> str:
    if r.error is not None:
        return f"{'ERROR':<8} {'':<14} {'':>7}  {_table_cell(r.path)}  ({_table_cell(r.error)})"
    label = r.landmark_id or "-"
    score = "" if r.score is None else f"{r.score:.4f}"
    name = f"  [{r.name}]" if r.name and r.accepted else ""
    return f"{'yes' if r.accepted else 'no':<8} {label:<14} {score:>7}  {_table_cell(r.path)}{name}"


def run_recognize_command(args: argparse.Namespace) -> int:
    paths = _photos(args.paths)
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
          f"(threshold {recognizer.threshold:.4f}"
          + ("" if recognizer.gps_calibration is None else
             f"; {recognizer.gps_calibration.calibration.threshold:.4f} for photos with a position")
          + ")", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# landmarks albums


def add_albums_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("photos", nargs="+", help="folder(s) of photos (or files / list files)")
    parser.add_argument("--out", required=True, help="output folder: albums.json, index.html, thumbs/")
    parser.add_argument("--thumb-size", type=positive_int, default=320)
    parser.add_argument("--title", default="Landmark albums")
    _add_recognizer_arguments(parser)


def _album_photos(items: list[str], out: str) -> list[str]:
    """The photos of ``items`` less the thumbnails the command writes in ``out/thumbs`` (a rerun
    would take them for photos; the user's photos elsewhere under ``out`` stay) and less repeats
    of one file (it would be counted twice), both by resolved path."""
    out_real = os.path.realpath(os.path.join(out, "thumbs"))
    kept, seen, repeated = [], set(), 0
    for path in _photos(items):
        real = os.path.realpath(path)
        if os.path.commonpath([real, out_real]) == out_real:
            continue
        if real in seen:
            repeated += 1
            continue
        seen.add(real)
        kept.append(path)
    if repeated:
        log.warning("%d repeated photo(s) left out: each photo is recognised once", repeated)
    if not kept:
        raise UserError(f"no images found in {' '.join(items)} outside {os.path.join(out, 'thumbs')}")
    return kept


def run_albums_command(args: argparse.Namespace) -> int:
    from recognition.albums import check_out_folder, group_albums, write_albums

    check_out_folder(args.out)  # before the photos are recognised
    paths = _album_photos(args.photos, args.out)
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
    parser.add_argument("--image-size", type=positive_int, default=None)
    _add_precision_argument(parser)
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the eager model")


def run_export_command(args: argparse.Namespace) -> int:
    from cli.logs import quieter
    from recognition.export import export_model
    from retrieval.embedding_model import load_embedding_model

    if os.path.exists(args.out) and not os.path.isdir(args.out):  # before the model is loaded
        raise UserError(f"--out {args.out}: exists and is not a folder")
    if args.index:
        from recognition.artifact import LandmarkIndex
        from recognition.recognizer import load_index_model

        if args.inference_precision is not None:
            raise UserError("--inference-precision: an index's model keeps the precision it was built with")
        if args.image_size is not None:
            raise UserError("--image-size: an index's model keeps the image size it was built with")
        index = LandmarkIndex.load(args.index)
        source = index.model.get("source", {})
        # load_index_model's advice (pass the checkpoint) is for recognize; export takes no
        # --checkpoint beside --index.
        if "checkpoint" in source and not pathlib.Path(source["checkpoint"]).is_file():
            raise UserError(f"the index was built with checkpoint {source['checkpoint']}, which is gone; export "
                            "the checkpoint with --checkpoint PATH instead of --index, or rebuild the index")
        model = load_index_model(index)
    else:
        model = load_embedding_model(checkpoint=args.checkpoint, backbone=args.backbone, image_size=args.image_size,
                                     inference_precision=args.inference_precision)
    # Its "exported ..." lines repeat the table printed below.
    with quieter("recognition.export", verbose=getattr(args, "verbose", 0)):
        meta = export_model(model, args.out, formats=args.format, check=not args.no_check)
    for fmt, entry in meta["files"].items():
        check = f"max |export - eager| = {entry['max_abs_diff']:.2e}" if entry["checked"] else "not checked"
        print(f"{fmt:<12} {pathlib.Path(args.out) / entry['file']}  ({check})")
    return 0
