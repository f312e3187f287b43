"""The real-photo set (``../shared/realphotos``): its reader and its evaluation protocol.

The folder lives outside the project and is never copied into it. ``MANIFEST.csv`` lists every
photo as ``relpath,label,kind,source_repo,source_path,license_note``: ``kind`` is ``landmark``
(``label`` = the landmark) or ``nonlandmark`` (``label`` = ``nonlandmark``).

* :func:`read_realphotos` — the one reader: the validated table (``path`` absolute, ``label``,
  ``kind``, ``source_repo``), shared by ``landmarks realphotos`` and ``bench/bench_recognition.py``;
* :func:`split_realphotos` — the protocol: per landmark, in sorted label order, a seeded random
  half of its photos (rounded up) is the gallery and the rest are queries; every non-landmark
  photo is a distractor;
* :func:`alternate_split` — issue 17's fixed protocol: per landmark, its photos in sorted path
  order, even positions to the gallery and odd positions to the queries (no seed), with the
  landmarks themselves split into two halves by sorted name for choose-on-one, confirm-on-the-other;
* :func:`class_disjoint_split` — landmarks for training and landmarks for evaluation share no
  class (``landmarks realphotos``'s fine-tuning question); the evaluation half uses the same
  per-landmark halving.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import UserError
from core.tables import read_text_csv
from datamodules.manifest import ManifestError

__all__ = ["DEFAULT_ROOT", "alternate_split", "class_disjoint_split", "read_realphotos", "split_realphotos"]

#: ``../shared/realphotos``, next to the project folder.
DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "realphotos"
COLUMNS = ("path", "label", "kind", "source_repo")


def read_realphotos(root: str | os.PathLike = DEFAULT_ROOT) -> pd.DataFrame:
    """``root/MANIFEST.csv`` → ``path`` (``root/relpath``), ``label``, ``kind``, ``source_repo``, validated.

    A missing folder or file, a missing column, an empty ``relpath`` or ``label``, a ``kind``
    other than ``landmark``/``nonlandmark`` or one that disagrees with the label is a
    ``ManifestError`` naming the file (and the line).
    """
    source = Path(root) / "MANIFEST.csv"
    table = read_text_csv(source, "real-photo manifest", ManifestError)
    missing = [c for c in ("relpath", "label", "kind", "source_repo") if c not in table.columns]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {missing}; found {list(table.columns)}")
    table = table.rename(columns={"relpath": "path"})
    for column in COLUMNS:
        table[column] = table[column].str.strip()
    # Line numbers in messages are file lines (the header is line 1).
    for column, rule in (("path", "empty relpath"), ("label", "empty label")):
        empty = np.flatnonzero(table[column].eq("").to_numpy())
        if len(empty):
            raise ManifestError(f"{source}: line {empty[0] + 2}: {rule}")
    bad_kind = np.flatnonzero(~table["kind"].isin(["landmark", "nonlandmark"]).to_numpy())
    if len(bad_kind):
        raise ManifestError(f"{source}: line {bad_kind[0] + 2}: kind must be landmark or nonlandmark")
    mislabeled = np.flatnonzero(((table["kind"] == "nonlandmark") != (table["label"] == "nonlandmark")).to_numpy())
    if len(mislabeled):
        raise ManifestError(f"{source}: line {mislabeled[0] + 2}: kind and label disagree")
    table["path"] = [p if os.path.isabs(p) else str(Path(root) / p) for p in table["path"]]
    return table[list(COLUMNS)].reset_index(drop=True)


def _halves(landmarks: pd.DataFrame, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per landmark (sorted labels), a random half (rounded up) to the gallery and the rest to the queries."""
    gallery, queries = [], []
    for _, group in landmarks.groupby("label", sort=True):
        order = rng.permutation(len(group))
        cut = math.ceil(len(group) / 2)
        gallery.append(group.iloc[order[:cut]])
        queries.append(group.iloc[order[cut:]])
    if not gallery:
        empty = landmarks.iloc[:0].reset_index(drop=True)
        return empty, empty.copy()
    return pd.concat(gallery, ignore_index=True), pd.concat(queries, ignore_index=True)


def split_realphotos(table: pd.DataFrame, seed: int = 0) -> dict[str, pd.DataFrame]:
    """The protocol: ``gallery`` / ``queries`` (per landmark, a seeded half each) and ``distractors``
    (every non-landmark photo)."""
    rng = np.random.default_rng(seed)
    gallery, queries = _halves(table[table["kind"] == "landmark"], rng)
    return {"gallery": gallery, "queries": queries,
            "distractors": table[table["kind"] == "nonlandmark"].reset_index(drop=True)}


def alternate_split(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Issue 17's protocol, without a seed: per landmark, its photos sorted by path, even positions
    (0, 2, ...) → ``gallery``, odd → ``queries``; every non-landmark photo → ``distractors``.
    Each landmark row also gets ``half`` ("A" for even positions of the sorted landmark names,
    "B" for odd), so a default can be chosen on one half of the landmarks and confirmed on the other."""
    landmarks = table[table["kind"] == "landmark"].sort_values("path", kind="stable")
    names = sorted(landmarks["label"].unique())
    half = {name: "AB"[i % 2] for i, name in enumerate(names)}
    position = landmarks.groupby("label", sort=False).cumcount().to_numpy()
    landmarks = landmarks.assign(half=landmarks["label"].map(half))
    return {"gallery": landmarks[position % 2 == 0].reset_index(drop=True),
            "queries": landmarks[position % 2 == 1].reset_index(drop=True),
            "distractors": table[table["kind"] == "nonlandmark"].reset_index(drop=True)}


def class_disjoint_split(
    table: pd.DataFrame, seed: int, train_landmarks: int = 8, train_nonlandmarks: int = 60
) -> dict[str, pd.DataFrame]:
    """Training landmarks and evaluation landmarks share no class; non-landmarks are split too.

    Returns ``train_db`` (all photos of ``train_landmarks`` randomly chosen landmarks),
    ``train_nonlandmarks`` (``train_nonlandmarks`` non-landmark photos, stratified by
    ``source_repo`` so both parts have the same mix of photo sources), and for the remaining
    landmarks ``gallery`` / ``queries`` (half of each one's photos each) and ``distractors`` (the
    other non-landmark photos).
    """
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    landmarks = table[table["kind"] == "landmark"]
    labels = np.array(sorted(landmarks["label"].unique()))
    if not 1 <= train_landmarks < len(labels):
        raise UserError(f"train_landmarks must be in [1, {len(labels) - 1}], got {train_landmarks}")
    chosen = set(rng.permutation(labels)[:train_landmarks].tolist())
    train_db = landmarks[landmarks["label"].isin(chosen)].reset_index(drop=True)
    gallery, queries = _halves(landmarks[~landmarks["label"].isin(chosen)], rng)
    others = table[table["kind"] == "nonlandmark"].reset_index(drop=True)
    if not 0 < train_nonlandmarks < len(others):
        raise UserError(f"train_nonlandmarks must be in [1, {len(others) - 1}], got {train_nonlandmarks}")
    counts = others["source_repo"].value_counts()
    stratify = others["source_repo"].where(others["source_repo"].map(counts) >= 2, "other")
    train_nl, distractors = train_test_split(others, train_size=train_nonlandmarks, random_state=seed, stratify=stratify)
    return {
        "train_db": train_db,
        "train_nonlandmarks": train_nl.reset_index(drop=True),
        "gallery": gallery,
        "queries": queries,
        "distractors": distractors.reset_index(drop=True),
    }
