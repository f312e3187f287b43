"""``landmarks clean | clean-tune | clean-separability``: the command line of :mod:`cleaning`.

* ``clean`` — :func:`cleaning.command.clean_manifest`: a landmark manifest in, ``clean.csv`` +
  ``summary.json`` + ``report.html`` out;
* ``clean-tune`` — :func:`cleaning.tune.tune_cleaning`: the cleaning parameters chosen against
  a DB's known noise, scored on held-out landmarks;
* ``clean-separability`` — :func:`cleaning.separability.separability_analysis`: how well any
  threshold on per-image evidence could separate the noise, per model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from cli.argtypes import fraction, nonnegative_int, positive_int
from cli.logs import quieter
from core.errors import UserError


def _float_or_none(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off", "") else float(text)


def _devices(value: str) -> int | str:
    return int(value) if str(value).isdigit() else value


def _user_error(err: ValueError, units: str = "--units {}") -> UserError:
    """A ValueError of the cleaning code as the user's one-line error. Those messages name the
    units as the Python API spells them (``units='absolute'``); here the user typed a command,
    whose way to give them is ``units`` (a format of the value)."""
    if isinstance(err, UserError):
        return err
    message = str(err)
    return UserError(message.replace("units='absolute'", units.format("absolute")))


# ---- landmarks clean ----------------------------------------------------------------------------


def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    from cleaning.algorithm import CleaningParams
    from cleaning.command import PARAM_HELP

    source = parser.add_argument_group("input")
    source.add_argument("--manifest", required=True, help="landmark manifest CSV (path,landmark_id,...)")
    source.add_argument("--out", required=True, help="output folder: clean.csv, summary.json, report.html, thumbs/")
    which = source.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a LandmarkModule checkpoint to embed with")
    which.add_argument("--backbone", help="a timm backbone with offline ImageNet weights (mobilenetv2_100, tf_efficientnet_lite0)")
    which.add_argument("--embeddings", help="precomputed embeddings .npy [rows, dim] (rows in manifest order, "
                                            "or in --embedding-paths order); all-zero rows = unreadable images")
    source.add_argument("--embedding-paths", help="CSV with a 'path' column naming each --embeddings row")
    source.add_argument("--nonlandmarks", help="non-landmark pool CSV (path): removes DB images very close to it")
    source.add_argument("--nonlandmark-embeddings", help="precomputed embeddings of --nonlandmarks, rows in its order")
    source.add_argument("--extra-columns", choices=("error", "ignore"), default="error",
                        help="unknown manifest columns: error (default) or keep them unread")

    embed = parser.add_argument_group("embedding (with --checkpoint / --backbone)")
    embed.add_argument("--image-size", type=positive_int, default=None, help="default: the checkpoint's (224 for a backbone)")
    embed.add_argument("--batch-size", type=positive_int, default=64)
    embed.add_argument("--num-workers", type=nonnegative_int, default=0, help="data loader workers")
    embed.add_argument("--accelerator", default="auto")
    embed.add_argument("--devices", default="1", help="e.g. 4 (with --strategy ddp) or auto")
    embed.add_argument("--strategy", default="auto")
    embed.add_argument("--cache-dir", default=None, help="embedding cache (default OUT/embedding-cache)")

    algo = parser.add_argument_group("algorithm (defaults in cleaning.algorithm.CleaningParams)")
    defaults = CleaningParams()
    for f in fields(CleaningParams):
        default = getattr(defaults, f.name)
        optional = f.name in ("nonlandmark_distance", "nonlandmark_margin", "attach_distance", "reassign_margin")
        kind = _float_or_none if optional else type(default)
        algo.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                          help=f"{PARAM_HELP.get(f.name, f.name.replace('_', ' '))} (default {default})")
    algo.add_argument("--force", action="store_true",
                      help="apply the decisions even when the model is too weak to clean with (--min-separability)")
    algo.add_argument("--jobs", type=nonnegative_int, default=None,
                      help="processes for the per-landmark clustering (default: CPUs for >= 20k rows, else 1; "
                           "0 or 1: in this process)")

    out = parser.add_argument_group("report")
    out.add_argument("--no-report", dest="report", action="store_false", help="skip report.html")
    out.add_argument("--report-landmarks", type=nonnegative_int, default=300, help="landmarks shown in the report (default 300)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run_clean_command(args: argparse.Namespace) -> int:
    from cleaning.algorithm import CleaningParams
    from cleaning.command import clean_manifest

    try:
        params = CleaningParams(**{f.name: getattr(args, f.name) for f in fields(CleaningParams)})
        result = clean_manifest(
            args.manifest, args.out, checkpoint=args.checkpoint, backbone=args.backbone, embeddings=args.embeddings,
            embedding_paths=args.embedding_paths, nonlandmarks=args.nonlandmarks,
            nonlandmark_embeddings=args.nonlandmark_embeddings, params=params, image_size=args.image_size,
            batch_size=args.batch_size, num_workers=args.num_workers, accelerator=args.accelerator,
            devices=_devices(args.devices), strategy=args.strategy, cache_dir=args.cache_dir, jobs=args.jobs,
            extra_columns=args.extra_columns, report=args.report, report_landmarks=args.report_landmarks,
            progress=args.progress, force=args.force,
        )
    except ValueError as err:
        # clean_manifest and CleaningParams report bad inputs (files, rows, parameter values) as
        # ValueErrors that name them: for this command they are the user's.
        raise _user_error(err) from err
    if result is None:
        return 0
    counts = result.counts()
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    agreement = result.separability.get("label_agreement")
    if not result.applied:
        would = result.proposed.counts()
        why = (f"only {agreement:.2f} of the images have a nearest neighbour with their own label (floor "
               f"{params.min_separability})" if agreement is not None else
               "its label agreement cannot be measured: no landmark has two readable photos to compare, so nothing "
               "shows that it tells the landmarks apart")
        print(f"landmarks clean: warning: the model is too weak to clean with: {why}; nothing was "
              f"removed (it would have removed {would['removed']} rows and merged {would['duplicate_groups']} "
              "duplicate group(s)). Clean with a trained model, or pass --force.")
    line = (f"landmarks clean: {counts['kept']} of {counts['rows']} rows kept, {counts['removed']} removed "
            f"({', '.join(f'{k} {v}' for k, v in counts['removed_by_reason'].items()) or 'none'}); "
            f"{counts['landmarks_dropped']} of {counts['landmarks']} landmarks dropped; "
            f"{counts['duplicate_groups']} duplicate group(s) ({params.duplicates}); embedding scale "
            f"{result.scale:.3f}, label agreement {agreement}.")
    truth = summary.get("ground_truth")
    if truth:
        line += f" Against the known noise: precision {truth['removal']['precision']}, recall {truth['removal']['recall']}"
        if "duplicates" in truth:
            line += f"; duplicates precision {truth['duplicates']['precision']}, recall {truth['duplicates']['recall']}"
        line += "."
    print(line)
    print(f"Written: {Path(args.out) / 'clean.csv'}, summary.json, report.html" if args.report
          else f"Written: {Path(args.out) / 'clean.csv'}, summary.json")
    return 0


# ---- landmarks clean-tune -------------------------------------------------------------------------


def add_clean_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="landmark DB with the ground truth (is_noise)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a LandmarkModule checkpoint to embed with")
    which.add_argument("--backbone", help="a timm backbone with offline ImageNet weights")
    which.add_argument("--embeddings", help=".npy rows in manifest order")
    parser.add_argument("--nonlandmarks", help="non-landmark pool CSV")
    parser.add_argument("--nonlandmark-embeddings", help=".npy rows in --nonlandmarks order")
    parser.add_argument("--image-size", type=positive_int, default=None)
    parser.add_argument("--cache-dir", default="runs/cleaning/cache")
    parser.add_argument("--grid", default=None, help="JSON {param: [values]} (default: cleaning.tune.DEFAULT_GRID)")
    parser.add_argument("--folds", type=positive_int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-precision", type=fraction, default=0.95)
    parser.add_argument("--target-recall", type=fraction, default=0.90)
    parser.add_argument("--out", default=None, help="JSON file for every combination's scores")


def _grid(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--grid: not JSON ({err}): {text!r}") from None
    if not isinstance(grid, dict):
        raise UserError(f"--grid: expected a JSON object {{param: [values]}}, got {text!r}")
    return grid


def run_clean_tune_command(args: argparse.Namespace) -> int:
    from cleaning.tune import tune_cleaning

    # The algorithm runs once per combination: its INFO lines would bury the counter and the table.
    with quieter("cleaning.algorithm", "retrieval.embed", verbose=getattr(args, "verbose", 0)):
        try:
            result = tune_cleaning(
                args.manifest, checkpoint=args.checkpoint, backbone=args.backbone, embeddings=args.embeddings,
                nonlandmarks=args.nonlandmarks, nonlandmark_embeddings=args.nonlandmark_embeddings,
                image_size=args.image_size, cache_dir=args.cache_dir, grid=_grid(args.grid), folds=args.folds,
                seed=args.seed, target_precision=args.target_precision, target_recall=args.target_recall,
                out=args.out,
            )
        except ValueError as err:
            # As for clean: the cleaning code's ValueErrors name a bad input of this command.
            raise _user_error(err, units='--grid \'{{"units": ["{}"], ...}}\'') from err
    truth = result["whole_database"]
    print(result["table"])
    print(f"\nchosen on all landmarks: {json.dumps(result['chosen'])}")
    print(f"whole database: removal precision {truth['removal']['precision']}, recall {truth['removal']['recall']} "
          f"({truth['removal']['removed']} removed, {truth['removal']['noise_rows']} noise); recall by kind "
          f"{truth['recall_by_noise_kind']}; duplicates precision {truth['duplicates']['precision']}, "
          f"recall {truth['duplicates']['recall']}; by reason {json.dumps(truth['by_reason'])}")
    return 0


# ---- landmarks clean-separability ---------------------------------------------------------------


def add_clean_separability_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True, help="landmark DB with the ground truth (is_noise)")
    parser.add_argument("--nonlandmarks", required=True, help="non-landmark pool CSV")
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT (repeat; NAME without '=')")
    parser.add_argument("--decisions", action="append", default=[],
                        help="NAME=clean.csv of a `landmarks clean` run on --manifest: its operating point is plotted")
    parser.add_argument("--recall", type=fraction, default=0.90, help="required recall for the reported precision")
    parser.add_argument("--cache-dir", default="runs/cleaning/cache")
    parser.add_argument("--out", required=True, help="folder for separability.json and separability.png")


def _named(items: list[str], option: str, what: str) -> dict[str, str]:
    named = {}
    for item in items:
        name, _, location = item.partition("=")
        if not name or not location:
            raise UserError(f"{option} wants NAME={what}, got {item!r}")
        named[name] = location
    return named


def run_clean_separability_command(args: argparse.Namespace) -> int:
    from cleaning.separability import separability_analysis

    with quieter("retrieval.embed", verbose=getattr(args, "verbose", 0)):
        result = separability_analysis(
            args.manifest, args.nonlandmarks, _named(args.model, "--model", "CHECKPOINT"), args.out,
            decisions=_named(args.decisions, "--decisions", "clean.csv"), recall=args.recall,
            cache_dir=args.cache_dir,
        )
    for name, scores in result["models"].items():
        print(f"{name}: precision {scores[f'precision_at_recall_{args.recall:g}']} at recall >= {args.recall:g}, "
              f"best F1 {scores['best_f1']}")
    out = Path(args.out)
    print(f"Written: {out / 'separability.json'}, {out / 'separability.png'}")
    return 0
