"""Helpers of the tests that build an index from the tiny world with `landmarks index` and check
its calibration against the recogniser's own embeddings of the calibration photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_index_args(world: Path, out: Path) -> list[str]:
    """`landmarks index` of the tiny world's DB with an ImageNet MobileNetV2 at 64 px, calibrated at
    FPR 0.05 on its calibration photos, without an embedding cache."""
    return ["index", "--manifest", str(world / "db.csv"), "--out", str(out), "--backbone", "mobilenetv2_100",
            "--image-size", "64", "--nonlandmarks", str(world / "calibration.csv"), "--target-fpr", "0.05",
            "--num-workers", "0", "--cache-dir", ""]


def calibration_embeddings(recognizer, world: Path) -> np.ndarray:
    """The calibration photos embedded one by one by ``recognizer`` (a ``Recognizer``), as
    `landmarks recognize` would; the index embedded them in batches, so they agree up to float noise."""
    paths = [line.split(",")[0] for line in (world / "calibration.csv").read_text().splitlines()[1:]]
    return np.concatenate([recognizer.embed_tensors(recognizer._load(str(world / p))[0][None]) for p in paths])
