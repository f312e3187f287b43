"""``landmarks synth``: generate the synthetic landmark world (:mod:`datamodules.synth`)."""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import fields

from cli.argtypes import positive_int
from core.errors import UserError
from datamodules.synth import CONFIG_HELP, HARD_NEGATIVE_KIND, SynthConfig, generate_world


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out`` plus one flag per :class:`SynthConfig` field (``--num-landmarks`` ...)."""
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    defaults = SynthConfig()
    for field in fields(SynthConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=type(default), default=default,
                            help=f"{CONFIG_HELP[field.name]} (default {default})")
    parser.add_argument("--workers", type=positive_int, default=None, help="processes (default: number of CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_synth_command(args: argparse.Namespace) -> int:
    try:
        config = SynthConfig(**{field.name: getattr(args, field.name) for field in fields(SynthConfig)})
    except ValueError as err:  # a bad combination of options: SynthConfig names its fields, the user typed flags
        names = sorted((field.name for field in fields(SynthConfig)), key=len, reverse=True)
        message = re.sub(r"\b(" + "|".join(names) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"),
                         str(err).removeprefix("invalid SynthConfig: "))
        raise UserError(message) from err
    start = time.perf_counter()
    # A non-empty --out without --overwrite is a FileExistsError: cli.main reports it in one line.
    world = generate_world(args.out, config, workers=args.workers, overwrite=args.overwrite,
                           progress=getattr(args, "progress", True))
    counts, noise = world["counts"], world["noise"]
    hard = sum(world["kinds"][split].get(HARD_NEGATIVE_KIND, 0) for split in ("nonlandmarks", "distractors"))
    print(
        f"Synthetic landmark world written to {args.out} in {time.perf_counter() - start:.1f} s: "
        f"{counts['landmarks']} landmark ids ({counts['distinct_structures']} distinct structures, "
        f"{len(world['duplicates'])} duplicated under a second id), {counts['db']} DB images with "
        f"{noise['total']} wrong labels ({noise['wrong_landmark']} another landmark, "
        f"{noise['nonlandmark']} no landmark), "
        f"{counts['queries']} landmark queries, {counts['nonlandmarks']} non-landmark training images and "
        f"{counts['distractors']} distractors ({hard} of these non-landmarks are generic buildings), "
        f"{counts['calibration']} calibration non-landmarks, a collection of {counts['collection']} photos "
        f"({counts['collection_landmark_photos']} of landmarks, {counts['collection_with_gps']} with GPS); "
        f"{config.image_size} px, difficulty {config.difficulty}, seed {config.seed}. Manifests: db.csv, "
        f"queries.csv, nonlandmarks.csv, distractors.csv, calibration.csv, collection.csv, landmarks.csv; "
        "ground truth in world.json."
    )
    return 0
