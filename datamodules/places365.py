"""Places365-Standard as the non-landmark pool → this project's manifests.

Files, as published by CSAILVision (``places365standard_easyformat`` / the file-list archive):

* ``categories_places365.txt`` — ``/a/airfield 0``: category path and its index, one per line;
* ``places365_train_standard.txt`` — ``/a/airfield/00000001.jpg 0`` (1.8 M lines);
* ``places365_val.txt`` — ``Places365_val_00000001.jpg 165`` (36,500 lines, 100 per category);
* images under ``data_256/`` (the 256×256 training tar; torchvision and others name the folder
  ``data_256_standard`` or ``data_large_standard``/``data_large`` for full size) and ``val_256/``
  (or ``val_large/``), keeping the list's relative paths.

:func:`prepare_places365` (``landmarks prepare places365``) writes ``nonlandmarks.csv`` (the
training pool, from the train list) and ``places365_val.csv`` (the validation images, usable as
distractor queries), both ``path,kind`` with ``kind`` = the category (``church/outdoor``) and
paths relative to the output folder.

Why exclude categories. A non-landmark image is trained to lie far from every landmark (the
paper's non-landmark class). Some scene categories are mostly photos of landmarks or of the
kind of building landmarks are — ``tower`` is full of Eiffel Towers, ``pagoda``, ``palace`` and
``church/outdoor`` of famous ones — and calling those "non-landmark" teaches the model to push
real landmarks away, the confusion that hurts recall at a low false-positive rate. The default
:data:`LANDMARK_PRONE_CATEGORIES` drops the religious, palatial, monumental and iconic natural
scenes; generic streets, rooms, nature and food stay. A name without a ``/`` qualifier covers
its variants (``church`` = ``church/indoor`` + ``church/outdoor``). Pass ``exclude=()`` to keep
everything. A name the categories file does not know is an error when given explicitly, and
a warning for the default list (a custom, reduced categories file).

Malformed lines, an index the categories file does not define, a train path whose folder is not
its label's category, or a missing images folder are errors naming the file and line. Listed
images whose file is missing are dropped with a logged count when ``check_files`` is on.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from datamodules.manifest import Manifest, ManifestError, write_manifest

log = logging.getLogger(__name__)

__all__ = [
    "LANDMARK_PRONE_CATEGORIES",
    "prepare_places365",
    "read_places365",
    "read_places365_categories",
]

CATEGORIES_TXT = "categories_places365.txt"
TRAIN_TXT = "places365_train_standard.txt"
VAL_TXT = "places365_val.txt"
TRAIN_DIRS = ("data_256", "data_256_standard", "data_large_standard", "data_large")
VAL_DIRS = ("val_256", "val_large")

# Scene categories whose photos are often landmarks or landmark-like buildings (see module docstring).
LANDMARK_PRONE_CATEGORIES: tuple[str, ...] = (
    "amphitheater", "aqueduct", "arch", "castle", "church", "mausoleum", "mosque/outdoor", "palace",
    "pagoda", "synagogue/outdoor", "temple/asia", "tower", "ruin", "rock_arch", "lighthouse",
    "skyscraper", "bridge", "kasbah", "medina", "throne_room", "canyon", "volcano", "waterfall",
)

_CATEGORY_LINE = r"(/[a-z]/[a-z0-9_]+(?:/[a-z0-9_]+)?) (\d+)"
_TRAIN_LINE = r"(/[a-z]/[a-z0-9_]+(?:/[a-z0-9_]+)?)/([^/\s]+\.jpg) (\d+)"
_VAL_LINE = r"(Places365_val_\d{8}\.jpg) (\d+)"


def _read_lines(path: Path, pattern: str, what: str) -> pd.DataFrame:
    """Every line of ``path`` must match ``pattern``; returns the groups as text columns."""
    if not path.is_file():
        raise ManifestError(f"Places365 file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text (byte {err.start}); is it the Places365 list?") from None
    lines = pd.Series(text.splitlines(), dtype=object)
    lines = lines[lines.str.strip().ne("")]  # a trailing blank line is harmless
    parts = lines.str.extract(f"^{pattern}$")
    bad = np.flatnonzero(parts[0].isna().to_numpy())
    if len(bad):
        raise ManifestError(f"{path}: line {lines.index[bad[0]] + 1}: {lines.iloc[bad[0]]!r} is not a {what} line")
    parts.index = lines.index + 1  # file line numbers
    return parts


def read_places365_categories(root: str | os.PathLike) -> dict[int, str]:
    """Index → category without the letter prefix (``0 → 'airfield'``, ``… → 'church/outdoor'``)."""
    path = Path(root) / CATEGORIES_TXT
    parts = _read_lines(path, _CATEGORY_LINE, "'/x/category index'")
    categories: dict[int, str] = {}
    for line, (name, index) in zip(parts.index, parts.itertuples(index=False)):
        index = int(index)
        short = name[3:]
        if index in categories:
            raise ManifestError(f"{path}: line {line}: index {index} is defined twice")
        if name[1] != short[0]:
            raise ManifestError(f"{path}: line {line}: {name!r} is not filed under its first letter")
        categories[index] = short
    if len(set(categories.values())) != len(categories):
        raise ManifestError(f"{path}: a category name is listed twice")
    return categories


def _excluded(categories: dict[int, str], exclude: Sequence[str] | None, source: Path) -> set[str]:
    """The categories to drop; ``None`` = the default list."""
    explicit = exclude is not None
    names = LANDMARK_PRONE_CATEGORIES if exclude is None else tuple(exclude)
    known = set(categories.values())
    dropped: set[str] = set()
    unknown = []
    for raw in names:
        name = raw.strip().strip("/")
        name = name[2:] if re.match(r"^[a-z]/", name) else name  # '/c/church/outdoor' → 'church/outdoor'
        matches = {c for c in known if c == name or c.startswith(name + "/")}
        if not matches:
            unknown.append(raw)
        dropped |= matches
    if unknown:
        message = f"{source}: unknown Places365 categor{'y' if len(unknown) == 1 else 'ies'} {unknown}"
        if explicit:
            raise ManifestError(message + "; names look like 'tower', 'church/outdoor' or '/c/church/outdoor'")
        log.warning("%s in the default exclusion list (ignored)", message)
    return dropped


def _resolve_dir(root: Path, candidates: tuple[str, ...], given: str | os.PathLike | None, what: str) -> Path:
    if given is not None:
        path = Path(given) if os.path.isabs(given) else root / given
        if not path.is_dir():
            raise ManifestError(f"Places365 {what} folder not found: {path}")
        return path
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise ManifestError(f"{root}: no Places365 {what} image folder ({', '.join(candidates)}); extract the tar there or name it")


def read_places365(
    root: str | os.PathLike,
    split: Literal["train", "val"] = "train",
    exclude: Sequence[str] | None = None,
    image_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    progress: bool = True,
) -> tuple[Manifest, dict[str, int]]:
    """One Places365 split as a non-landmark manifest (absolute paths, ``kind`` = category).

    Args:
        root: folder with the three list files and the image folders.
        split: ``train`` (``places365_train_standard.txt``) or ``val`` (``places365_val.txt``).
        exclude: categories to leave out; ``None`` = :data:`LANDMARK_PRONE_CATEGORIES`, ``()`` = none.
        image_dir: the image folder, if not one of the usual names under ``root``.
        check_files: drop listed images whose file is missing (logged count).

    Returns the manifest and counts: ``excluded_categories`` (images dropped by category),
    ``missing_files``.
    """
    root = Path(root)
    categories = read_places365_categories(root)
    if split == "train":
        source = root / TRAIN_TXT
        parts = _read_lines(source, _TRAIN_LINE, "'/x/category/name.jpg index'")
        folder_category, names, labels = parts[0], parts[1], parts[2].astype(int)
        relative = folder_category + "/" + names
        images = _resolve_dir(root, TRAIN_DIRS, image_dir, "training")
    elif split == "val":
        source = root / VAL_TXT
        parts = _read_lines(source, _VAL_LINE, "'Places365_val_NNNNNNNN.jpg index'")
        relative, labels = "/" + parts[0], parts[1].astype(int)
        folder_category = None
        images = _resolve_dir(root, VAL_DIRS, image_dir, "validation")
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    lines = parts.index.to_numpy()
    # A repeated line would put one photo twice in the pool (and, for val, in a metric's count).
    repeated = np.flatnonzero(relative.duplicated().to_numpy())
    if len(repeated):
        first = int(np.flatnonzero((relative == relative.iloc[repeated[0]]).to_numpy())[0])
        raise ManifestError(f"{source}: line {lines[repeated[0]]}: image {relative.iloc[repeated[0]].lstrip('/')!r} "
                            f"is listed again (first on line {lines[first]})")
    undefined = np.flatnonzero(~labels.isin(list(categories)).to_numpy())
    if len(undefined):
        raise ManifestError(f"{source}: line {lines[undefined[0]]}: category index {labels.iloc[undefined[0]]} is not in {CATEGORIES_TXT}")
    kind = labels.map(categories)
    if folder_category is not None:
        mismatch = np.flatnonzero((folder_category.str[3:] != kind).to_numpy())
        if len(mismatch):
            i = mismatch[0]
            raise ManifestError(
                f"{source}: line {lines[i]}: image in folder {folder_category.iloc[i]!r} has label "
                f"{labels.iloc[i]} = {kind.iloc[i]!r}"
            )
    dropped = _excluded(categories, exclude, root / CATEGORIES_TXT)
    keep = ~kind.isin(dropped).to_numpy()
    counts = {"excluded_categories": int((~keep).sum()), "missing_files": 0}
    table = pd.DataFrame({"path": [str(images) + r for r in relative[keep]], "kind": kind[keep].to_numpy()})
    lines = lines[keep]
    if check_files and len(table):
        missing = np.fromiter(
            (not os.path.isfile(p) for p in tqdm(table["path"], desc=f"checking Places365 {split} files", unit="img",
                                                 disable=not progress, mininterval=2.0)),
            dtype=bool, count=len(table),
        )
        if missing.any():
            counts["missing_files"] = int(missing.sum())
            log.warning("%s: %d of %d listed images are missing and skipped, e.g. %s",
                        source, counts["missing_files"], len(missing), table["path"].iloc[int(np.flatnonzero(missing)[0])])
            table, lines = table[~missing].reset_index(drop=True), lines[~missing]
    if counts["excluded_categories"]:
        log.info("%s: left out %d images of %d landmark-prone categories", source, counts["excluded_categories"], len(dropped))
    manifest = Manifest(source=str(source), paths=table["path"].tolist(), landmark_ids=None, table=table, lines=lines)
    return manifest, counts


def prepare_places365(
    root: str | os.PathLike,
    out: str | os.PathLike,
    exclude: Sequence[str] | None = None,
    splits: Iterable[str] = ("train", "val"),
    check_files: bool = True,
    progress: bool = True,
) -> dict:
    """Write ``nonlandmarks.csv`` (train) and ``places365_val.csv`` (val) into ``out``; returns counts.

    Every split is read and checked before anything is written: a failed run leaves ``out`` as it was.
    """
    out = Path(out)
    targets = {"train": "nonlandmarks.csv", "val": "places365_val.csv"}
    splits = list(splits)
    unknown = [split for split in splits if split not in targets]
    if unknown or not splits:
        raise ManifestError(f"splits must be train, val or both, got {splits}")
    manifests, summary = {}, {}
    for split in splits:
        manifest, counts = read_places365(root, split, exclude, check_files=check_files, progress=progress)
        if len(manifest) == 0:
            raise ManifestError(f"{manifest.source}: no images left (all missing or excluded)")
        manifests[split] = manifest
        summary[split] = {"file": targets[split], "rows": len(manifest), "source": manifest.source, "skipped": counts}
    out.mkdir(parents=True, exist_ok=True)
    for split, manifest in manifests.items():
        table = manifest.table.copy()
        table["path"] = [os.path.relpath(p, out) for p in table["path"]]
        write_manifest(table, out / targets[split])
    return summary
