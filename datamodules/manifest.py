"""CSV manifests and ImageFolder layouts → validated lists of image paths and landmark ids.

A landmark manifest is a CSV with at least ``path,landmark_id``; a non-landmark manifest needs
only ``path``. Relative paths are resolved against the CSV's folder, so a data folder can be moved
as a whole. Optional columns that this project knows (``lat``, ``lon``, the synthetic world's
ground truth, the cleaning decisions, ...) are kept in :attr:`Manifest.table`; any other column is
an error by default, because a typo in a column name (``landmarkid``) must not silently turn into
"column missing, use a default". Pass ``extra_columns="ignore"`` to accept foreign columns.

Landmark ids are kept as strings (GLDv2 uses integers, an ImageFolder uses folder names);
:class:`ClassMap` turns them into the contiguous class indices that models and losses use.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd

from core.atomic import atomic_path
from core.errors import UserError
from core.labels import NONLANDMARK
from core.tables import read_text_csv

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

LANDMARK_COLUMNS = ("path", "landmark_id")
NONLANDMARK_COLUMNS = ("path",)
# Columns written by this project's tools (synthetic world, cleaning) or common in public data.
OPTIONAL_COLUMNS = frozenset(
    {
        "lat",
        "lon",
        "name",
        "city",
        "kind",
        "view",
        "is_noise",
        "true_landmark_id",
        "decision",
        "reason",
        "cluster",
        "duplicate_of",
        "original_landmark_id",
        "id",
        "url",
    }
)

ManifestKind = Literal["landmark", "nonlandmark"]


class ManifestError(UserError):
    """A manifest cannot be used as given; the message names the file, row or column."""


@dataclass
class Manifest:
    """Validated manifest: absolute image paths, their landmark ids, and the original table."""

    source: str
    paths: list[str]
    landmark_ids: list[str] | None
    table: pd.DataFrame = field(repr=False)
    # Line of each row in the source file (header = line 1), kept through subset() so that
    # messages still point at the right line after rows were dropped.
    lines: np.ndarray | None = field(default=None, repr=False)
    # A shard set (``landmarks prepare shards``): the images are members of its tar files, found
    # by the table's ``shard``/``offset``/``size`` columns; ``paths`` then name the source files.
    shard_dir: str | None = None

    def __post_init__(self):
        if self.lines is None:
            self.lines = np.arange(2, len(self.paths) + 2)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> "Manifest":
        keep = np.asarray(keep, dtype=bool)
        ids = None if self.landmark_ids is None else [i for i, k in zip(self.landmark_ids, keep) if k]
        return Manifest(
            source=self.source,
            paths=[p for p, k in zip(self.paths, keep) if k],
            landmark_ids=ids,
            table=self.table[keep].reset_index(drop=True),
            lines=self.lines[keep],
            shard_dir=self.shard_dir,
        )


def repeated_rows(manifest: Manifest) -> np.ndarray:
    """True for each row that repeats an earlier row's path and landmark_id (see drop_repeated_rows)."""
    return pd.DataFrame({"path": manifest.paths, "landmark_id": manifest.landmark_ids}).duplicated().to_numpy()


def drop_repeated_rows(manifest: Manifest, counted: str) -> Manifest:
    """The manifest without rows that repeat an earlier row's photo and landmark, count logged.

    A repeated row would weigh its photo twice wherever photos are counted: in its landmark's
    centroids and the index's image count (``landmarks index``), or as two gallery entries in the
    evaluation (P@1, mAP@k). The same photo under two landmarks is kept: a photo may show both.
    ``counted`` ends the log line ("each photo is <counted> once").
    """
    keep = ~repeated_rows(manifest)
    if keep.all():
        return manifest
    log.warning("%s: %d row(s) repeat an earlier row's path and landmark_id (first at line %d); each photo is "
                "%s once", manifest.source, int((~keep).sum()), int(manifest.lines[~keep][0]), counted)
    return manifest.subset(keep)


def read_manifest(
    csv_path: str | os.PathLike,
    kind: ManifestKind = "landmark",
    extra_columns: Literal["error", "ignore"] = "error",
    column_map: dict[str, str] | None = None,
) -> Manifest:
    """Read and validate one CSV manifest.

    Args:
        csv_path: the CSV file. Relative image paths are resolved against its folder.
        kind: ``"landmark"`` (needs ``path,landmark_id``) or ``"nonlandmark"`` (needs ``path``).
        extra_columns: what to do with a column this project does not know.
        column_map: rename columns of a foreign CSV first, ``{"our_name": "their_name"}``,
            e.g. ``{"path": "relpath", "landmark_id": "label"}``.
    """
    csv_path = Path(csv_path)
    table = read_text_csv(csv_path, "manifest", ManifestError)
    return manifest_from_table(table, csv_path, kind, extra_columns, column_map)


def manifest_from_table(
    table: pd.DataFrame,
    csv_path: Path,
    kind: ManifestKind = "landmark",
    extra_columns: Literal["error", "ignore"] = "error",
    column_map: dict[str, str] | None = None,
) -> Manifest:
    """Validate a manifest table read from ``csv_path`` (see :func:`read_manifest`)."""
    if column_map:
        missing_src = [src for src in column_map.values() if src not in table.columns]
        if missing_src:
            raise ManifestError(f"{csv_path}: column_map names columns that are not in the file: {missing_src}")
        table = table.rename(columns={src: ours for ours, src in column_map.items()})

    required = LANDMARK_COLUMNS if kind == "landmark" else NONLANDMARK_COLUMNS
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{csv_path}: missing required column(s) {missing}; found {list(table.columns)}; "
            f"a {kind} manifest needs {list(required)}"
        )
    known = set(required) | OPTIONAL_COLUMNS | (set(LANDMARK_COLUMNS) if kind == "nonlandmark" else set())
    unknown = [c for c in table.columns if c not in known]
    if unknown:
        if extra_columns == "error":
            raise ManifestError(
                f"{csv_path}: unknown column(s) {unknown}; known columns are {sorted(known)}. "
                "Rename them (column_map) or pass extra_columns='ignore' to keep them unread."
            )
        log.warning("%s: ignoring unknown column(s) %s", csv_path, unknown)

    # Row numbers in messages are file line numbers (header is line 1) so users can jump there.
    empty_path = np.flatnonzero(table["path"].str.strip().eq("").to_numpy())
    if len(empty_path):
        raise ManifestError(f"{csv_path}: line {empty_path[0] + 2}: empty 'path'")
    landmark_ids = None
    if kind == "landmark":
        ids = table["landmark_id"].str.strip()
        empty_id = np.flatnonzero(ids.eq("").to_numpy())
        if len(empty_id):
            raise ManifestError(
                f"{csv_path}: line {empty_id[0] + 2}: empty 'landmark_id' for {table['path'].iloc[empty_id[0]]!r} "
                "(non-landmark images belong in the non-landmark manifest, not in the landmark DB)"
            )
        reserved = np.flatnonzero(ids.isin([str(NONLANDMARK), "nan", "NaN", "None"]).to_numpy())
        if len(reserved):
            raise ManifestError(
                f"{csv_path}: line {reserved[0] + 2}: landmark_id {ids.iloc[reserved[0]]!r} is not a landmark id "
                f"({str(NONLANDMARK)} is the non-landmark label); non-landmark images belong in the non-landmark manifest"
            )
        landmark_ids = ids.tolist()
    root = csv_path.parent
    paths = [p if os.path.isabs(p) else str(root / p) for p in table["path"].str.strip()]
    return Manifest(source=str(csv_path), paths=paths, landmark_ids=landmark_ids, table=table)


def read_image_folder(root: str | os.PathLike, kind: ManifestKind = "landmark") -> Manifest:
    """An ImageFolder layout as a manifest.

    Landmarks: ``root/<landmark_id>/<image>``; non-landmarks: every image below ``root``.
    Sorted, so the result does not depend on the file system's listing order.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"image folder not found: {root}")
    rows: list[tuple[str, str]] = []
    if kind == "landmark":
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for image in sorted(class_dir.rglob("*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    rows.append((str(image), class_dir.name))
    else:
        rows = [(str(p), "") for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not rows:
        raise ManifestError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    table = pd.DataFrame(rows, columns=["path", "landmark_id"])
    ids = table["landmark_id"].tolist() if kind == "landmark" else None
    if kind == "nonlandmark":
        table = table[["path"]]
    return Manifest(source=str(root), paths=table["path"].tolist(), landmark_ids=ids, table=table)


def load_manifest(
    location: str | os.PathLike,
    kind: ManifestKind = "landmark",
    extra_columns: Literal["error", "ignore"] = "error",
    column_map: dict[str, str] | None = None,
) -> Manifest:
    """A CSV file, a shard set (``landmarks prepare shards``) or an ImageFolder directory."""
    if Path(location).is_dir() and (Path(location) / "shardset.json").is_file():
        from datamodules.shards import read_shard_set  # shards builds on this module

        return read_shard_set(location, kind)
    if Path(location).is_dir():
        return read_image_folder(location, kind)
    return read_manifest(location, kind, extra_columns=extra_columns, column_map=column_map)


def merged_id_aliases(manifest: Manifest) -> dict[str, str]:
    """``{original id: id}`` for the ids a cleaned manifest (``landmarks clean --duplicates merge``) renamed.

    A cleaned DB names each duplicate group by one member's id and keeps the input's id in
    ``original_landmark_id``; query manifests written against the original DB still name the
    merged-away ids, and must be read through this map. Rows the cleaning removed count too: an id
    can be merged away and all its rows removed, while its queries still exist. Empty when the
    column is absent. An original id renamed to two different ids is an error (the file was edited
    by hand or is not a cleaning output), naming the first line of each.
    """
    if manifest.landmark_ids is None or "original_landmark_id" not in manifest.table.columns:
        return {}
    aliases: dict[str, str] = {}
    first_line: dict[str, int] = {}
    originals = manifest.table["original_landmark_id"].astype(str).str.strip()
    for original, lid, line in zip(originals, manifest.landmark_ids, manifest.lines):
        if not original or original == "nan":
            continue
        seen = aliases.setdefault(original, lid)
        first_line.setdefault(original, int(line))
        if seen != lid:
            raise ManifestError(
                f"{manifest.source}, line {int(line)}: original_landmark_id {original!r} is renamed to {lid!r}, "
                f"but to {seen!r} on line {first_line[original]}; a cleaned manifest renames each id one way"
            )
    return {o: i for o, i in aliases.items() if o != i}


def write_manifest(table: pd.DataFrame, csv_path: str | os.PathLike) -> None:
    """Write a manifest atomically (temporary file + rename), so a crash never leaves half a CSV."""
    csv_path = Path(csv_path)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)


_INTEGER = re.compile(r"-?\d+")


def _id_sort_key(landmark_id: str) -> tuple:
    # Numeric ids sort numerically (GLDv2), names alphabetically; numbers first if mixed. The id
    # itself breaks ties ("7" vs "07"), so the order never depends on set iteration (hash seed),
    # which would give DDP ranks different class indices.
    if _INTEGER.fullmatch(landmark_id):
        return (0, int(landmark_id), landmark_id)
    return (1, 0, landmark_id)


@dataclass(frozen=True)
class ClassMap:
    """Landmark id ↔ contiguous class index, in a deterministic order.

    Saved in checkpoints as a plain list of strings (loadable with ``weights_only=True``).
    """

    landmark_ids: tuple[str, ...]

    @classmethod
    def from_ids(cls, ids: Sequence[str]) -> "ClassMap":
        return cls(tuple(sorted(set(ids), key=_id_sort_key)))

    def __len__(self) -> int:
        return len(self.landmark_ids)

    @property
    def _index(self) -> dict[str, int]:
        # Built lazily and cached on the instance; frozen dataclass, so via object.__setattr__.
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {lid: i for i, lid in enumerate(self.landmark_ids)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def encode(self, ids: Sequence[str], source: str = "manifest", lines: Sequence[int] | None = None) -> np.ndarray:
        """Landmark ids → class indices; an id outside the map is an error naming it and its line."""
        index = self._index
        out = np.empty(len(ids), dtype=np.int64)
        for row, lid in enumerate(ids):
            try:
                out[row] = index[lid]
            except KeyError:
                line = lines[row] if lines is not None else row + 2
                raise ManifestError(
                    f"{source}: line {line}: landmark_id {lid!r} is not among the "
                    f"{len(self)} landmarks of the training database"
                ) from None
        return out

    def decode(self, indices: Sequence[int]) -> list[str]:
        return [self.landmark_ids[i] for i in indices]

    def to_list(self) -> list[str]:
        return list(self.landmark_ids)
