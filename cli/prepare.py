"""``landmarks prepare gldv2|places365|revisited|shards``: public datasets → this project's manifests,
and any manifest → tar shards for cluster-scale training (:mod:`datamodules.shards`).

Data flows manifest → data module: the converters read each dataset's published files (see
:mod:`datamodules.gldv2`, :mod:`datamodules.places365`, :mod:`datamodules.revisited`), validate
them and write CSV manifests (or, for Revisited, a JSON ground truth) atomically into ``--out``.
Inputs are never modified. GLDv2 and Places365 may share one output folder, which then has the
standard layout that ``LandmarkDataModule`` reads with its defaults::

    landmarks prepare gldv2 --root /data/gldv2 --out data/gldv2
    landmarks prepare places365 --root /data/places365 --out data/gldv2
    → data/gldv2/{db,queries,distractors,nonlandmarks,places365_val}.csv
"""

from __future__ import annotations

import argparse
import json
import logging

from cli.argtypes import jpeg_quality, positive_int
from core.errors import UserError

log = logging.getLogger(__name__)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    gldv2 = sub.add_parser("gldv2", help="GLDv2: train_clean.csv (or train.csv) + recognition solution → "
                                         "db.csv, queries.csv, distractors.csv")
    gldv2.add_argument("--root", required=True, help="GLDv2 folder with train/ and test/ (and the CSV files)")
    gldv2.add_argument("--out", required=True, help="output folder for the manifests")
    gldv2.add_argument("--metadata-dir", default=None, help="folder of the CSV files, if not --root")
    gldv2.add_argument("--all-train", action="store_true",
                       help="use all of train.csv (4.1 M images) instead of train_clean.csv (1.6 M)")
    gldv2.add_argument("--usage", choices=("public", "private", "all"), default="all",
                       help="which scored test images become queries/distractors (Ignored ones never do)")

    places = sub.add_parser("places365", help="Places365-Standard → nonlandmarks.csv (train) and "
                                              "places365_val.csv (val)")
    places.add_argument("--root", required=True, help="folder with the *.txt lists and data_256/, val_256/")
    places.add_argument("--out", required=True, help="output folder for the manifests")
    places.add_argument("--exclude", default=None,
                        help="comma-separated categories to leave out (default: the landmark-prone list in "
                             "datamodules/places365.py; 'none' keeps all), e.g. tower,church,palace")
    places.add_argument("--splits", default="train,val", help="train, val or both (default)")

    revisited = sub.add_parser("revisited", help="ROxford5k / RParis6k: check gnd_<name>.pkl and the images, "
                                                 "write gnd_<name>.json (no pickle afterwards)")
    revisited.add_argument("--root", required=True, help="folder with gnd_<name>.pkl and jpg/ (or its parent)")
    revisited.add_argument("--out", required=True)
    revisited.add_argument("--dataset", choices=("roxford5k", "rparis6k"), default=None)

    shards = sub.add_parser("shards", help="a manifest (CSV or ImageFolder) → WebDataset tar shards of pre-resized "
                                           "JPEGs that every manifest option of the data module accepts")
    shards.add_argument("--manifest", required=True, help="landmark or non-landmark manifest (CSV) or ImageFolder")
    shards.add_argument("--out", required=True, help="output folder (run again to resume an interrupted run)")
    shards.add_argument("--kind", choices=("auto", "landmark", "nonlandmark"), default="auto",
                        help="manifest kind (default: landmark when it has a landmark_id column)")
    shards.add_argument("--max-side", type=positive_int, default=256,
                        help="longer side of the stored images in pixels (default 256: training at up to 128 px "
                             "decodes at 2x; use 512 for 224-256 px training)")
    shards.add_argument("--quality", type=jpeg_quality, default=90, help="JPEG quality of re-encoded images (default 90)")
    shards.add_argument("--samples-per-shard", type=positive_int, default=1000,
                        help="images per tar file (default 1000: ~10-100 MB shards at 256-512 px)")
    shards.add_argument("--workers", type=positive_int, default=1, help="processes writing shards in parallel")
    shards.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                        help="unreadable source images: skip with a logged count (default) or fail naming the row")
    shards.add_argument("--extra-columns", choices=("error", "ignore"), default="error",
                        help="manifest columns this project does not know: error (default) or keep unread")

    for p in (gldv2, places):
        p.add_argument("--no-check-files", action="store_true",
                       help="do not stat every image (missing ones then become placeholders at load time)")
    gldv2.add_argument("--on-missing", choices=("skip", "error"), default="skip",
                       help="listed images whose file is missing: skip with a logged count (default) or fail")


def run_prepare_command(args: argparse.Namespace) -> int:
    if args.dataset == "gldv2":
        from datamodules.gldv2 import prepare_gldv2

        usages = {"public": ("Public",), "private": ("Private",), "all": ("Public", "Private")}[args.usage]
        summary = prepare_gldv2(args.root, args.out, clean=not args.all_train, usages=usages,
                                metadata_dir=args.metadata_dir, check_files=not args.no_check_files,
                                on_missing=args.on_missing)
    elif args.dataset == "places365":
        from datamodules.places365 import prepare_places365

        exclude = None
        if args.exclude is not None:
            exclude = () if args.exclude.strip().lower() == "none" else [s for s in args.exclude.split(",") if s.strip()]
            if exclude == []:  # an empty list would silently keep every landmark-prone category
                raise UserError("--exclude names no category; give names, or 'none' to keep every category")
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        summary = prepare_places365(args.root, args.out, exclude=exclude, splits=splits,
                                    check_files=not args.no_check_files)
    elif args.dataset == "shards":
        from datamodules.shards import prepare_shards

        header = prepare_shards(args.manifest, args.out, kind=args.kind, max_side=args.max_side,
                                quality=args.quality, samples_per_shard=args.samples_per_shard,
                                workers=args.workers, on_bad_image=args.on_bad_image,
                                extra_columns=args.extra_columns)
        summary = {"out": args.out, **{k: header[k] for k in ("kind", "num_samples", "skipped")},
                   "shards": len(header["shards"]), "megabytes": round(sum(s["filesize"] for s in header["shards"]) / 2**20, 1)}
    else:
        from datamodules.revisited import prepare_revisited

        summary = {"ground_truth": str(prepare_revisited(args.root, args.out, args.dataset))}
    print(json.dumps(summary, indent=2))
    return 0
