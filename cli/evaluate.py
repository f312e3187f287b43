"""``landmarks evaluate revisited|gldv2``: standard benchmarks for a checkpoint or an ImageNet backbone.

* ``revisited`` — ROxford5k / RParis6k, the Revisited protocol (mAP Easy/Medium/Hard, mP@1,5,10;
  :mod:`retrieval.revisited`), queries cropped to their boxes, full database ranking.
* ``gldv2`` — GLDv2 recognition GAP with the non-landmark test images in the ranking
  (:mod:`retrieval.gldv2`), for Public, Private and both. Either score a Kaggle-format
  predictions file, or predict: embed a gallery manifest (e.g. ``db.csv`` from ``landmarks
  prepare gldv2``) and every scored test image, and predict the top-1 neighbour's landmark with
  its cosine similarity as the score.

Results are printed (percentages, as the benchmarks' papers do) and written as JSON (fractions)
with ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from cli.argtypes import nonnegative_int, positive_int, torch_device
from core.atomic import write_json_atomic
from core.errors import UserError

log = logging.getLogger(__name__)

SETUP_LABELS = {"easy": "E", "medium": "M", "hard": "H"}


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a LandmarkModule checkpoint (loaded with weights_only=True)")
    model.add_argument("--backbone", help="a timm backbone with offline ImageNet weights, e.g. mobilenetv2_100")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="network input side (default: the checkpoint's training size; 224 for a backbone)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--workers", type=nonnegative_int, default=2, help="data loader worker processes")
    parser.add_argument("--out", default=None, help="write the metrics as JSON here")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    revisited = sub.add_parser("revisited", help="ROxford5k / RParis6k: mAP (E/M/H) and mP@k")
    revisited.add_argument("--root", required=True,
                           help="folder with <dataset>/gnd_<dataset>.pkl + jpg/ (or the JSON of `landmarks prepare revisited`)")
    revisited.add_argument("--dataset", action="append", choices=("roxford5k", "rparis6k"), default=None,
                           help="repeat for both (default: each one found under --root)")
    revisited.add_argument("--device", type=torch_device, default="auto",
                           help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    _model_arguments(revisited)

    gldv2 = sub.add_parser("gldv2", help="GLDv2 recognition GAP (non-landmark test images included)")
    gldv2.add_argument("--solution", required=True, help="recognition_solution_v2.1.csv")
    gldv2.add_argument("--predictions", default=None, help="a Kaggle-format submission (id,landmarks) to score")
    gldv2.add_argument("--gallery", default=None, help="landmark manifest to predict from (path,landmark_id)")
    gldv2.add_argument("--test-dir", default=None, help="GLDv2 test/ folder (default: next to --solution)")
    gldv2.add_argument("--write-predictions", default=None, help="save the predictions as a Kaggle submission")
    gldv2.add_argument("--cache-dir", default=None, help="embedding cache (retrieval.embed), reused across runs")
    gldv2.add_argument("--checkpoint", default=None, help="with --gallery: a LandmarkModule checkpoint")
    gldv2.add_argument("--backbone", default=None, help="with --gallery: a backbone with offline ImageNet weights")
    gldv2.add_argument("--image-size", type=positive_int, default=None, help="network input side (default: the model's)")
    gldv2.add_argument("--batch-size", type=positive_int, default=64)
    gldv2.add_argument("--workers", type=nonnegative_int, default=2, help="data loader worker processes")
    gldv2.add_argument("--out", default=None, help="write the metrics as JSON here")


def _load_model(args):
    from retrieval.embedding_model import load_embedding_model

    if args.checkpoint:
        return load_embedding_model(checkpoint=args.checkpoint, image_size=args.image_size)
    return load_embedding_model(backbone=args.backbone, image_size=args.image_size)


def _write_json(payload: dict, path: str | None) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(target, payload, newline=False, allow_nan=True)


def format_revisited(name: str, metrics: dict, kappas=(1, 5, 10)) -> str:
    def pct(key: str) -> str:
        return f"{100 * metrics[key]:.2f}"

    maps = ", ".join(f"{label}: {pct('map_' + s)}" for s, label in SETUP_LABELS.items())
    mps = ", ".join(
        f"{label}: [{' '.join(pct(f'mp@{k}_{s}') for k in kappas)}]" for s, label in SETUP_LABELS.items()
    )
    return f">> {name}: mAP {maps}\n>> {name}: mP@k{list(kappas)} {mps}"


def run_revisited(args) -> dict:
    import torch

    from callbacks.revisited_evaluation import embed_revisited, score_revisited
    from core.tables import json_number
    from datamodules.manifest import ManifestError
    from datamodules.revisited import REVISITED_DATASETS, find_ground_truth, load_revisited

    model = _load_model(args)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    net = model.net.to(device).eval()
    names = args.dataset
    if not names and Path(args.root).is_file():
        names = [None]  # one ground-truth file: its own name (or JSON 'dataset' field) says which dataset
    elif not names:
        names = []
        for name in REVISITED_DATASETS:
            try:
                find_ground_truth(args.root, name)  # present? (a broken file then fails loudly below)
            except ManifestError:
                continue
            names.append(name)
        if not names:
            raise ManifestError(f"{args.root}: neither roxford5k nor rparis6k found")
    results = {"model": model.identity, "image_size": model.image_size}
    for name in names:
        data = load_revisited(args.root, name)
        queries, database = embed_revisited(net, data, model.image_size, device, args.batch_size, args.workers,
                                            progress=True)
        metrics = score_revisited(queries, database, data)
        empty = [setup.capitalize() for setup in SETUP_LABELS if not metrics[f"n_evaluated_{setup}"]]
        if empty:
            log.warning("%s: no query has positives in the %s setup(s): their mAP and mP@k are undefined "
                        "(nan here, null in --out)", data.name, ", ".join(empty))
        # JSON has no NaN: an undefined mean is written as null.
        results[data.name] = {k: json_number(v) if isinstance(v, float) else v for k, v in metrics.items()}
        print(format_revisited(data.name, metrics))
    return results


def _predict_gldv2(args, solution) -> dict[str, tuple[int, float]]:
    from datamodules.gldv2 import gldv2_image_path
    from datamodules.manifest import read_manifest
    from retrieval.embed import embed_paths
    from retrieval.index import build_index, search

    if not (args.checkpoint or args.backbone) or (args.checkpoint and args.backbone):
        raise UserError("give --predictions, or --gallery with one of --checkpoint / --backbone")
    model = _load_model(args)
    gallery = read_manifest(args.gallery, "landmark", extra_columns="ignore")
    if "decision" in gallery.table.columns:  # a cleaned DB: index what the data module trains on
        gallery = gallery.subset(gallery.table["decision"].str.strip().str.lower().ne("remove").to_numpy())
    non_integer = [row for row, lid in enumerate(gallery.landmark_ids) if not lid.isdigit()]
    if non_integer:
        row = non_integer[0]
        raise UserError(f"{args.gallery}: line {gallery.lines[row]}: landmark_id {gallery.landmark_ids[row]!r} is not "
                        "a GLDv2 (integer) landmark id")
    if len(gallery) == 0:
        raise UserError(f"{args.gallery}: no gallery rows to predict from")
    test_dir = Path(args.test_dir) if args.test_dir else Path(args.solution).parent / "test"
    ids = sorted(solution.landmarks)
    test_paths = [gldv2_image_path(test_dir, key) for key in ids]
    common = dict(batch_size=args.batch_size, num_workers=args.workers, cache_dir=args.cache_dir)
    g = embed_paths(model, gallery.paths, **common)
    # A few unreadable images are a documented skip; none readable is a wrong folder, whose GAP of
    # 0.00 would read as a result.
    if not g.valid.any():
        raise UserError(f"{args.gallery}: none of its {len(g.valid)} images could be read (first: {gallery.paths[0]})")
    q = embed_paths(model, test_paths, **common)
    if not q.valid.any():
        raise UserError(f"{test_dir}: none of the {len(q.valid)} scored test images could be read (first: "
                        f"{test_paths[0]}); check --test-dir")
    if (~g.valid).any():
        log.warning("gallery: %d of %d images unreadable and left out of the index", int((~g.valid).sum()), len(g.valid))
    if (~q.valid).any():
        log.warning("test: %d of %d images unreadable: no prediction (a miss where they show a landmark)",
                    int((~q.valid).sum()), len(q.valid))
    labels = np.asarray(gallery.landmark_ids, dtype=object)[g.valid]
    index = build_index(g.embeddings[g.valid])
    scores, neighbours = search(index, q.embeddings[q.valid], 1)
    predictions = {}
    for key, score, neighbour in zip(np.asarray(ids)[q.valid], scores[:, 0], neighbours[:, 0]):
        if neighbour >= 0:
            predictions[str(key)] = (int(labels[neighbour]), float(score))
    return predictions


def run_gldv2(args) -> dict:
    from datamodules.gldv2 import read_recognition_predictions, read_recognition_solution, write_recognition_predictions
    from retrieval.gldv2 import gldv2_gap, top1_accuracy

    if bool(args.predictions) == bool(args.gallery):
        raise UserError("give exactly one of --predictions or --gallery")
    if args.predictions:
        # They would be ignored: a predictions file is scored as it is.
        unused = [flag for flag, value in (("--write-predictions", args.write_predictions),
                                           ("--checkpoint", args.checkpoint), ("--backbone", args.backbone),
                                           ("--test-dir", args.test_dir), ("--cache-dir", args.cache_dir))
                  if value]
        if unused:
            raise UserError(f"{', '.join(unused)} only apply with --gallery (predicting); --predictions is scored "
                            "as it is")
    solution = read_recognition_solution(args.solution, ("Public", "Private"))
    if not solution.landmarks:
        raise UserError(f"{args.solution}: no Public or Private row: nothing to score")
    if args.predictions:
        predictions = read_recognition_predictions(args.predictions, solution)
    else:
        predictions = _predict_gldv2(args, solution)
        if args.write_predictions:
            write_recognition_predictions(predictions, sorted(solution.usage), args.write_predictions)
    results = {"solution": solution.source, "n_ignored": len(solution.ignored)}
    for subset, usages in (("public", ("Public",)), ("private", ("Private",)), ("all", ("Public", "Private"))):
        scored = {k: v for k, v in solution.landmarks.items() if solution.usage[k] in usages}
        subset_predictions = {k: v for k, v in predictions.items() if k in scored}
        if not scored:  # a solution of one usage only: no figure rather than a NaN
            results[subset] = {"n_images": 0}
            print(f">> GLDv2 {subset:<7}: no test images of this usage")
            continue
        results[subset] = {
            "gap": gldv2_gap(subset_predictions, scored),
            "gap_without_nonlandmarks": gldv2_gap(subset_predictions, scored, ignore_nonlandmark_queries=True),
            "top1_accuracy": top1_accuracy(subset_predictions, scored),
            "n_images": len(scored),
            "n_landmark_images": sum(1 for v in scored.values() if v),
            "n_predicted": len(subset_predictions),
        }
        r = results[subset]
        print(f">> GLDv2 {subset:<7}: GAP {100 * r['gap']:.2f}  (landmark queries only {100 * r['gap_without_nonlandmarks']:.2f}), "
              f"top-1 accuracy {100 * r['top1_accuracy']:.2f}; {r['n_images']} images, {r['n_landmark_images']} with a landmark")
    return results


def run_evaluate_command(args: argparse.Namespace) -> int:
    results = run_revisited(args) if args.benchmark == "revisited" else run_gldv2(args)
    _write_json(results, args.out)
    return 0
