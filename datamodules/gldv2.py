"""Google Landmarks Dataset v2 (GLDv2) → this project's manifests.

Files, as published in ``cvdfoundation/google-landmark`` (version 2.1):

* ``train.csv`` — ``id,url,landmark_id``; ``id`` a 16-character string, ``landmark_id`` an
  integer; 4.1 M rows (203 k landmarks).
* ``train_clean.csv`` — ``landmark_id,images``; ``images`` the space-separated ids of the cleaned
  subset (1.6 M images of 81 k landmarks), the paper-style training set.
* ``train_label_to_category.csv`` — ``landmark_id,category`` (a Wikimedia ``Category:`` URL),
  optional: gives the ``name`` column.
* ``test.csv`` — ``id``; ``recognition_solution_v2.1.csv`` — ``id,landmarks,Usage`` with
  ``landmarks`` the space-separated *train* landmark ids shown (empty for the majority of test
  images, which show no landmark) and ``Usage`` ``Public``, ``Private`` or ``Ignored`` (the
  official reader accepts exactly these three).
* Images: ``train/<a>/<b>/<c>/<id>.jpg`` with ``a, b, c`` the first three characters of the id,
  likewise under ``test/`` and ``index/``.

:func:`prepare_gldv2` (``landmarks prepare gldv2``) writes, in this project's format, with paths
relative to the output folder (so :class:`~datamodules.LandmarkDataModule` reads it unchanged):

* ``db.csv`` ``path,landmark_id,id[,url][,name]`` — the training DB and gallery (train_clean, or
  all of train.csv with ``clean=False``);
* ``queries.csv`` ``path,landmark_id,id`` — test images showing one landmark that is in the DB;
* ``distractors.csv`` ``path,id`` — test images showing no landmark (the non-landmark queries
  that GAP includes).

Skip policy (counted, logged and returned; never silent): images whose file is missing (GLDv2
downloads often lack a tar) are dropped when ``check_files`` is on (``on_missing="error"``
makes it an error); for the *training-time* query set only, test images with several landmarks
and images whose landmark is not in the DB are left out, because the data module's evaluation
needs one known label per query. The exact challenge GAP over every scored test image is
:func:`retrieval.gldv2.gldv2_gap` (``landmarks evaluate gldv2``), which keeps them.
Malformed rows (wrong header, bad id, non-integer landmark id, unknown Usage, an image listed
under two landmarks) are errors naming the file and line.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import pandas as pd
from tqdm import tqdm

from core.tables import read_text_csv
from datamodules.manifest import Manifest, ManifestError, write_manifest

log = logging.getLogger(__name__)

__all__ = [
    "GLDV2_USAGES",
    "RecognitionSolution",
    "gldv2_image_path",
    "prepare_gldv2",
    "read_gldv2_train",
    "read_recognition_predictions",
    "read_recognition_solution",
    "gldv2_test_manifests",
    "write_recognition_predictions",
]

TRAIN_CSV = "train.csv"
TRAIN_CLEAN_CSV = "train_clean.csv"
CATEGORY_CSV = "train_label_to_category.csv"
SOLUTION_CSV = "recognition_solution_v2.1.csv"
GLDV2_USAGES = ("Public", "Private", "Ignored")
_ID = r"[0-9a-zA-Z]{16}"
_INT = r"\d+"


def gldv2_image_path(split_dir: str | os.PathLike, image_id: str) -> str:
    """``<split_dir>/<a>/<b>/<c>/<id>.jpg``, the layout of the GLDv2 tar files."""
    return os.path.join(split_dir, image_id[0], image_id[1], image_id[2], f"{image_id}.jpg")


def _read_csv(path: Path, header: tuple[str, ...]) -> pd.DataFrame:
    table = read_text_csv(path, "GLDv2 file", ManifestError)
    if tuple(table.columns) != header:
        raise ManifestError(f"{path}: header is {list(table.columns)}, expected {list(header)} (GLDv2 v2.1 format)")
    return table


def _check_ids(ids: pd.Series, path: Path, lines: np.ndarray) -> None:
    bad = np.flatnonzero(~ids.str.fullmatch(_ID).to_numpy())
    if len(bad):
        raise ManifestError(f"{path}: line {lines[bad[0]]}: image id {ids.iloc[bad[0]]!r} is not a 16-character id")


def _check_landmark_ids(values: pd.Series, path: Path, lines: np.ndarray) -> None:
    bad = np.flatnonzero(~values.str.fullmatch(_INT).to_numpy())
    if len(bad):
        raise ManifestError(f"{path}: line {lines[bad[0]]}: landmark_id {values.iloc[bad[0]]!r} is not a non-negative integer")


def _category_names(path: Path) -> dict[str, str]:
    """landmark_id → readable name from the Wikimedia category URL (``.../Category:Eiffel_Tower``)."""
    table = _read_csv(path, ("landmark_id", "category"))
    names = table["category"].map(
        lambda url: urllib.parse.unquote(url.rsplit("Category:", 1)[-1]).replace("_", " ").strip()
    )
    return dict(zip(table["landmark_id"].str.strip(), names))


def _missing_files(paths: list[str], progress: bool) -> np.ndarray:
    return np.fromiter(
        (not os.path.isfile(p) for p in tqdm(paths, desc="checking image files", unit="img", disable=not progress,
                                             mininterval=2.0)),
        dtype=bool, count=len(paths),
    )


def _drop_missing(table: pd.DataFrame, lines: np.ndarray, source: Path, on_missing: str, progress: bool, what: str):
    missing = _missing_files(table["path"].tolist(), progress)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        if on_missing == "error":
            raise ManifestError(
                f"{source}: line {lines[first]}: image missing: {table['path'].iloc[first]} "
                f"({int(missing.sum())} of {len(missing)} {what} images are missing; on_missing='skip' drops them)"
            )
        log.warning("%s: %d of %d %s images are missing and skipped, e.g. %s",
                    source, int(missing.sum()), len(missing), what, table["path"].iloc[first])
    keep = ~missing
    return table[keep].reset_index(drop=True), lines[keep], int(missing.sum())


def read_gldv2_train(
    root: str | os.PathLike,
    clean: bool = True,
    metadata_dir: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    on_missing: Literal["skip", "error"] = "skip",
    progress: bool = True,
) -> tuple[Manifest, dict[str, int]]:
    """The GLDv2 training set as a landmark manifest (absolute paths) and skip counts.

    Args:
        root: the GLDv2 folder (holding ``train/`` and, by default, the CSV files).
        clean: ``train_clean.csv`` (default) or all of ``train.csv``.
        metadata_dir: where the CSV files are, if not in ``root``.
        image_dir: the extracted ``train`` images, default ``root/train``.
        check_files: drop (or, with ``on_missing="error"``, refuse) rows whose image is missing.

    With ``clean=True`` and ``train.csv`` present, every clean image must appear there under the
    same landmark (a mix of dataset versions is an error) and ``url`` is filled in from it.
    """
    root = Path(root)
    meta = Path(metadata_dir) if metadata_dir is not None else root
    images = Path(image_dir) if image_dir is not None else root / "train"
    train_csv = meta / TRAIN_CSV
    train = None
    if not clean or train_csv.is_file():
        train = _read_csv(train_csv, ("id", "url", "landmark_id"))
        train_lines = np.arange(2, len(train) + 2)
        _check_ids(train["id"], train_csv, train_lines)
        _check_landmark_ids(train["landmark_id"], train_csv, train_lines)
        duplicated = np.flatnonzero(train["id"].duplicated().to_numpy())
        if len(duplicated):
            raise ManifestError(f"{train_csv}: line {duplicated[0] + 2}: image id {train['id'].iloc[duplicated[0]]!r} listed twice")
    if clean:
        source = meta / TRAIN_CLEAN_CSV
        table = _read_csv(source, ("landmark_id", "images"))
        row_lines = np.arange(2, len(table) + 2)
        _check_landmark_ids(table["landmark_id"], source, row_lines)
        image_lists = table["images"].str.split()
        counts = image_lists.str.len().to_numpy()
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise ManifestError(f"{source}: line {row_lines[empty[0]]}: landmark {table['landmark_id'].iloc[empty[0]]} lists no images")
        lines = np.repeat(row_lines, counts)
        out = pd.DataFrame({
            "id": np.concatenate(image_lists.to_numpy()) if len(table) else np.zeros(0, dtype=object),
            "landmark_id": np.repeat(table["landmark_id"].to_numpy(), counts),
        })
        _check_ids(out["id"], source, lines)
        duplicated = np.flatnonzero(out["id"].duplicated().to_numpy())
        if len(duplicated):
            raise ManifestError(f"{source}: line {lines[duplicated[0]]}: image {out['id'].iloc[duplicated[0]]!r} is listed twice")
        if train is not None:
            joined = out.merge(train.rename(columns={"landmark_id": "train_landmark_id"}), on="id", how="left")
            absent = np.flatnonzero(joined["url"].isna().to_numpy())
            if len(absent):
                raise ManifestError(
                    f"{source}: line {lines[absent[0]]}: image {joined['id'].iloc[absent[0]]!r} is not in {train_csv} "
                    "(train_clean.csv and train.csv from different dataset versions?)"
                )
            moved = np.flatnonzero((joined["landmark_id"] != joined["train_landmark_id"]).to_numpy())
            if len(moved):
                i = moved[0]
                raise ManifestError(
                    f"{source}: line {lines[i]}: image {joined['id'].iloc[i]!r} is under landmark {joined['landmark_id'].iloc[i]} "
                    f"here but {joined['train_landmark_id'].iloc[i]} in {train_csv}"
                )
            out = joined[["id", "landmark_id", "url"]]
    else:
        source = train_csv
        out = train[["id", "landmark_id", "url"]]
        lines = np.arange(2, len(out) + 2)
    out = out.reset_index(drop=True)
    out.insert(0, "path", [gldv2_image_path(images, i) for i in out["id"]])
    categories = meta / CATEGORY_CSV
    if categories.is_file():
        names = _category_names(categories)
        out["name"] = out["landmark_id"].map(names).fillna("")
    skipped = {"missing_files": 0}
    if check_files:
        out, lines, skipped["missing_files"] = _drop_missing(out, lines, source, on_missing, progress, "training")
    if len(out) == 0:
        raise ManifestError(f"{source}: no usable training images (images expected under {images})")
    manifest = Manifest(source=str(source), paths=out["path"].tolist(), landmark_ids=out["landmark_id"].tolist(),
                        table=out, lines=lines)
    return manifest, skipped


@dataclass
class RecognitionSolution:
    """``recognition_solution_v2.1.csv``: per scored test image its landmark ids (empty = none)."""

    source: str
    landmarks: dict[str, list[int]]  # scored images (the requested usages)
    usage: dict[str, str]  # every image in the file → Public / Private / Ignored
    lines: dict[str, int] = field(repr=False, default_factory=dict)

    @property
    def ignored(self) -> list[str]:
        return [key for key, value in self.usage.items() if value == "Ignored"]


def read_recognition_solution(
    path: str | os.PathLike, usages: Iterable[str] = ("Public", "Private")
) -> RecognitionSolution:
    """Read the recognition ground truth; keep the images whose ``Usage`` is in ``usages``."""
    path = Path(path)
    usages = tuple(usages)
    bad_usage = [u for u in usages if u not in ("Public", "Private")]
    if bad_usage:
        raise ValueError(f"usages must be Public and/or Private (Ignored images are never scored), got {bad_usage}")
    table = _read_csv(path, ("id", "landmarks", "Usage"))
    lines = np.arange(2, len(table) + 2)
    _check_ids(table["id"], path, lines)
    unknown = np.flatnonzero(~table["Usage"].isin(GLDV2_USAGES).to_numpy())
    if len(unknown):
        raise ManifestError(f"{path}: line {lines[unknown[0]]}: Usage {table['Usage'].iloc[unknown[0]]!r} is not one of {list(GLDV2_USAGES)}")
    duplicated = np.flatnonzero(table["id"].duplicated().to_numpy())
    if len(duplicated):
        raise ManifestError(f"{path}: line {lines[duplicated[0]]}: test image {table['id'].iloc[duplicated[0]]!r} listed twice")
    landmarks: dict[str, list[int]] = {}
    line_of: dict[str, int] = {}
    for line, key, cell, usage in zip(lines, table["id"], table["landmarks"], table["Usage"]):
        line_of[key] = int(line)
        if usage not in usages:
            continue
        tokens = cell.split()
        if not all(re.fullmatch(_INT, t) for t in tokens):
            raise ManifestError(f"{path}: line {line}: landmarks {cell!r} is not a space-separated list of integer ids")
        landmarks[key] = [int(t) for t in tokens]
    return RecognitionSolution(source=str(path), landmarks=landmarks, usage=dict(zip(table["id"], table["Usage"])),
                               lines=line_of)


def read_recognition_predictions(path: str | os.PathLike, solution: RecognitionSolution) -> dict[str, tuple[int, float]]:
    """A Kaggle recognition submission, ``id,landmarks`` with ``landmarks`` = ``"<id> <score>"`` or empty.

    Rows of ignored images and rows without a prediction are left out (as the official scorer
    does); a repeated id, a malformed cell or an id missing from the solution file is an error.
    """
    path = Path(path)
    table = _read_csv(path, ("id", "landmarks"))
    out: dict[str, tuple[int, float]] = {}
    for line, key, cell in zip(range(2, len(table) + 2), table["id"], table["landmarks"]):
        if key in out:
            raise ManifestError(f"{path}: line {line}: test image {key!r} predicted twice")
        if key not in solution.usage:
            raise ManifestError(f"{path}: line {line}: test image {key!r} is not in {solution.source}")
        tokens = cell.split()
        if not tokens or solution.usage[key] == "Ignored" or key not in solution.landmarks:
            continue  # no prediction, ignored, or of a usage not being scored
        try:
            if len(tokens) != 2:
                raise ValueError(f"{len(tokens)} fields")
            landmark, score = int(tokens[0]), float(tokens[1])
            if landmark < 0:
                raise ValueError("a negative landmark id")
            if not np.isfinite(score):
                raise ValueError("a score that is not a finite number")
        except ValueError as err:
            raise ManifestError(f"{path}: line {line}: prediction {cell!r} is not '<landmark_id> <score>' ({err})") from None
        out[key] = (landmark, score)
    return out


def write_recognition_predictions(predictions: dict[str, tuple[int, float]], ids: Iterable[str], path: str | os.PathLike) -> None:
    """Write a Kaggle-format submission (``id,landmarks``; empty cell = no prediction), atomically."""
    rows = [(key, f"{predictions[key][0]} {predictions[key][1]:.6f}" if key in predictions else "") for key in ids]
    write_manifest(pd.DataFrame(rows, columns=["id", "landmarks"]), path)


def gldv2_test_manifests(
    solution: RecognitionSolution,
    test_dir: str | os.PathLike,
    db_landmark_ids: Iterable[str],
    check_files: bool = True,
    on_missing: Literal["skip", "error"] = "skip",
    progress: bool = True,
) -> tuple[Manifest, Manifest, dict[str, int]]:
    """Landmark queries and non-landmark test images for the data module's evaluation sets.

    Returns ``(queries, nonlandmarks, skipped)``; see the module docstring for what is skipped.
    """
    known = set(db_landmark_ids)
    rows, distractor_rows = [], []
    skipped = {"multi_landmark": 0, "landmark_not_in_db": 0, "missing_files": 0}
    for key in sorted(solution.landmarks):
        labels = solution.landmarks[key]
        path = gldv2_image_path(test_dir, key)
        line = solution.lines.get(key, -1)
        if not labels:
            distractor_rows.append((path, key, line))
        elif len(labels) > 1:
            skipped["multi_landmark"] += 1
        elif str(labels[0]) not in known:
            skipped["landmark_not_in_db"] += 1
        else:
            rows.append((path, str(labels[0]), key, line))
    queries = pd.DataFrame(rows, columns=["path", "landmark_id", "id", "line"])
    distractors = pd.DataFrame(distractor_rows, columns=["path", "id", "line"])
    source = Path(solution.source)
    manifests = []
    for table, what in ((queries, "landmark test"), (distractors, "non-landmark test")):
        lines = table.pop("line").to_numpy()
        if check_files and len(table):
            table, lines, missing = _drop_missing(table, lines, source, on_missing, progress, what)
            skipped["missing_files"] += missing
        ids = table["landmark_id"].tolist() if "landmark_id" in table else None
        manifests.append(Manifest(source=str(source), paths=table["path"].tolist(), landmark_ids=ids, table=table,
                                  lines=lines))
    for reason, count in skipped.items():
        if count:
            log.warning("%s: %d test images left out of the evaluation manifests (%s)", source, count, reason)
    return manifests[0], manifests[1], skipped


def _relative(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    table = table.copy()
    table["path"] = [os.path.relpath(p, out) for p in table["path"]]
    return table


def prepare_gldv2(
    root: str | os.PathLike,
    out: str | os.PathLike,
    clean: bool = True,
    usages: Iterable[str] = ("Public", "Private"),
    metadata_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    on_missing: Literal["skip", "error"] = "skip",
    progress: bool = True,
) -> dict:
    """Write ``db.csv``, ``queries.csv`` and ``distractors.csv`` (see module docstring) into ``out``.

    The test manifests are written only when the recognition solution is present. Returns a
    summary with row counts and skip counts.
    """
    root, out = Path(root), Path(out)
    meta = Path(metadata_dir) if metadata_dir is not None else root
    solution_csv = meta / SOLUTION_CSV
    test_names = ("queries.csv", "distractors.csv")
    if not solution_csv.is_file():
        # A db.csv written beside another run's queries would be evaluated against them.
        stale = [name for name in test_names if (out / name).exists()]
        if stale:
            raise ManifestError(f"{out} holds {' and '.join(stale)} from an earlier run, and this run writes none "
                                f"({solution_csv} not found): choose another --out or delete them")
    # Every input is read and checked before anything is written: a failed run leaves --out as it was.
    db, skipped_train = read_gldv2_train(root, clean, meta, check_files=check_files, on_missing=on_missing,
                                         progress=progress)
    summary = {
        "db": {"rows": len(db), "landmarks": len(set(db.landmark_ids)), "source": db.source, "skipped": skipped_train},
    }
    tables = {"db.csv": db.table}
    if solution_csv.is_file():
        solution = read_recognition_solution(solution_csv, usages)
        queries, distractors, skipped = gldv2_test_manifests(
            solution, root / "test", set(db.landmark_ids), check_files, on_missing, progress
        )
        if len(queries) == 0:
            # The data module cannot evaluate without queries: an empty queries.csv would only fail later.
            reasons = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in skipped.items() if count)
            raise ManifestError(f"{solution_csv}: no test image of usage {'/'.join(usages)} can be a query "
                                f"(one landmark, in the DB, file present under {root / 'test'})"
                                + (f"; left out: {reasons}" if reasons else ""))
        if len(distractors) == 0:
            log.warning("%s: no non-landmark test image of usage %s: distractors.csv is empty", solution_csv,
                        "/".join(usages))
        tables.update({"queries.csv": queries.table, "distractors.csv": distractors.table})
        summary["queries"] = {"rows": len(queries), "source": str(solution_csv), "usages": list(usages), "skipped": skipped}
        summary["distractors"] = {"rows": len(distractors)}
    else:
        log.warning("%s not found: no query/distractor manifests written", solution_csv)
    out.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_manifest(_relative(table, out), out / name)
    return summary
