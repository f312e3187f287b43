"""Miniature GLDv2 and Places365 folders in their published formats, for the reader tests.

File names, CSV headers, line formats and folder layouts follow the public releases
(``cvdfoundation/google-landmark`` v2.1, ``CSAILVision/places365``); only the sizes are tiny.
Places365 category indices are the real ones (``categories_places365.txt`` is alphabetical:
``/a/airfield 0`` … ``/b/bus_station/indoor 71`` … ``/c/church/outdoor 91``), for a subset.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_jpeg(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def gldv2_id(n: int) -> str:
    return hashlib.md5(f"gldv2-{n}".encode()).hexdigest()[:16]


def gldv2_path(root: Path, split: str, image_id: str) -> Path:
    return root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


# landmark_id → (image numbers in train.csv, of which in train_clean.csv)
GLDV2_TRAIN = {1: ([0, 1, 2], [0, 1, 2]), 17: ([3, 4, 5, 6], [3, 4, 6]), 256: ([7, 8, 9], [7, 9]), 9000: ([10, 11], [])}
GLDV2_CATEGORIES = {
    1: "http://commons.wikimedia.org/wiki/Category:Eiffel_Tower",
    17: "http://commons.wikimedia.org/wiki/Category:Caf%C3%A9_de_Flore",
    256: "http://commons.wikimedia.org/wiki/Category:Brandenburger_Tor",
    9000: "http://commons.wikimedia.org/wiki/Category:Ha_Long_Bay",
}
# test image number → (landmarks cell, Usage)
GLDV2_TEST = {
    100: ("17", "Public"),          # one landmark of the clean DB
    101: ("1", "Private"),
    102: ("256 17", "Public"),      # two landmarks: no single query label
    103: ("9000", "Private"),       # a landmark outside train_clean
    104: ("", "Public"),            # no landmark (most of the real test set)
    105: ("", "Private"),
    106: ("", "Ignored"),
    107: ("1", "Ignored"),
}


def make_gldv2(root: Path, duplicate_of: dict[int, int] | None = None) -> Path:
    """``root`` with train.csv, train_clean.csv, train_label_to_category.csv, test.csv,
    recognition_solution_v2.1.csv and JPEGs under train/a/b/c/ and test/a/b/c/.

    ``duplicate_of`` maps a test image number to a train image number whose file it copies.
    """
    duplicate_of = duplicate_of or {}
    root.mkdir(parents=True, exist_ok=True)
    lines = ["id,url,landmark_id"]
    for landmark, (images, _) in GLDV2_TRAIN.items():
        for n in images:
            image_id = gldv2_id(n)
            lines.append(f"{image_id},https://upload.wikimedia.org/wikipedia/commons/{n}/photo_{n}.jpg,{landmark}")
            write_jpeg(gldv2_path(root, "train", image_id), seed=n)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    clean = ["landmark_id,images"] + [
        f"{landmark},{' '.join(gldv2_id(n) for n in kept)}" for landmark, (_, kept) in GLDV2_TRAIN.items() if kept
    ]
    (root / "train_clean.csv").write_text("\n".join(clean) + "\n")
    (root / "train_label_to_category.csv").write_text(
        "landmark_id,category\n" + "".join(f"{k},{v}\n" for k, v in GLDV2_CATEGORIES.items())
    )
    (root / "test.csv").write_text("id\n" + "".join(f"{gldv2_id(n)}\n" for n in GLDV2_TEST))
    solution = ["id,landmarks,Usage"] + [f"{gldv2_id(n)},{cell},{usage}" for n, (cell, usage) in GLDV2_TEST.items()]
    (root / "recognition_solution_v2.1.csv").write_text("\n".join(solution) + "\n")
    for n in GLDV2_TEST:
        target = gldv2_path(root, "test", gldv2_id(n))
        if n in duplicate_of:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(gldv2_path(root, "train", gldv2_id(duplicate_of[n])).read_bytes())
        else:
            write_jpeg(target, seed=n)
    return root


PLACES_CATEGORIES = {
    "/a/airfield": 0, "/a/alley": 4, "/a/amphitheater": 5, "/a/art_school": 20, "/b/bedroom": 52,
    "/b/bus_station/indoor": 71, "/c/church/indoor": 90, "/c/church/outdoor": 91,
}


def make_places365(root: Path, train_dir: str = "data_256", per_category: int = 2, val_per_category: int = 1) -> Path:
    """``root`` with categories_places365.txt, places365_train_standard.txt, places365_val.txt,
    ``<train_dir>/<letter>/<category>/<8 digits>.jpg`` and ``val_256/Places365_val_<8 digits>.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for c, i in PLACES_CATEGORIES.items()))
    train, val = [], []
    seed, val_number = 1000, 0
    for category, index in PLACES_CATEGORIES.items():
        for k in range(per_category):
            relative = f"{category}/{k + 1:08d}.jpg"
            train.append(f"{relative} {index}")
            write_jpeg(root / train_dir / relative.lstrip("/"), seed=seed)
            seed += 1
        for _ in range(val_per_category):
            val_number += 1
            name = f"Places365_val_{val_number:08d}.jpg"
            val.append(f"{name} {index}")
            write_jpeg(root / "val_256" / name, seed=seed)
            seed += 1
    (root / "places365_train_standard.txt").write_text("\n".join(train) + "\n")
    (root / "places365_val.txt").write_text("\n".join(val) + "\n")
    return root
