"""Score cleaning decisions against known noise (the synthetic world records it in ``db.csv``).

* Noise removal: a row is truly noise when ``is_noise`` is 1; precision and recall of the rows
  marked ``remove``, also per removal reason and per kind of noise (``true_landmark_id`` empty:
  no landmark at all; otherwise a photo of another landmark).
* Duplicate landmarks: a landmark id whose correctly labelled rows (``is_noise`` 0) mostly show
  another id's structure (``true_landmark_id``) is a duplicate of that id. Scored as unordered
  pairs of ids found in one duplicate group vs the true pairs.

The scores are written to JSON: a ratio with an empty denominator is undefined (NaN by
:func:`core.tables.ratio`) and appears as ``null``, never as a made-up 0 or 1.
"""

from __future__ import annotations

import re
from itertools import combinations

import numpy as np
import pandas as pd

from cleaning.algorithm import CleaningResult
from core.errors import UserError
from core.tables import json_number, ratio
from datamodules.manifest import Manifest

__all__ = ["check_truth", "noise_flags", "score_against_truth", "true_duplicate_pairs"]

_FLOAT_FORM = re.compile(r"(-?\d+)\.0*")


def _ratio(num: int, den: int) -> float | None:
    return json_number(ratio(num, den), 4)


def _first_bad_flag(column: pd.Series) -> int | None:
    """Row of the first ``is_noise`` value that is not 0/1 (or true/false), else None."""
    bad = np.flatnonzero(~column.astype(str).str.strip().str.lower().isin(["0", "1", "true", "false"]).to_numpy())
    return int(bad[0]) if len(bad) else None


def noise_flags(column: pd.Series) -> np.ndarray:
    row = _first_bad_flag(column)
    if row is not None:
        raise ValueError(f"is_noise must be 0/1, got {column.iloc[row]!r} in row {row}")
    return column.astype(str).str.strip().str.lower().isin(["1", "true"]).to_numpy()


def check_truth(manifest: Manifest) -> np.ndarray | None:
    """The manifest's ``is_noise`` flags (None without the column), its ground truth checked
    where it is read, so a bad value is one error naming the file, line and column.

    A ``true_landmark_id`` that names no landmark_id while its integer form does ('1010.0' for
    '1010') is refused: the file went through a float column (pandas writes an integer column with
    empty cells back as floats), and ids are text, so every duplicate pair would be scored as
    wrong. It is not normalised silently: '1010.0' may be a real id elsewhere.
    """
    table = manifest.table
    if "is_noise" not in table.columns:
        return None
    row = _first_bad_flag(table["is_noise"])
    if row is not None:
        raise UserError(f"{manifest.source}: line {manifest.lines[row]}: column is_noise: "
                        f"{table['is_noise'].iloc[row]!r} is not 0/1 (or true/false)")
    if "true_landmark_id" in table.columns:
        known = {str(i).strip() for i in manifest.landmark_ids or []}
        for row, value in enumerate(table["true_landmark_id"].astype(str).str.strip()):
            whole = _FLOAT_FORM.fullmatch(value)
            if value and value not in known and whole and whole.group(1) in known:
                raise UserError(
                    f"{manifest.source}: line {manifest.lines[row]}: column true_landmark_id: {value!r} names no "
                    f"landmark_id but {whole.group(1)!r} does; the file looks re-saved through a float column "
                    "(e.g. by pandas): write the ids back as text")
    return noise_flags(table["is_noise"])


def noise_of_both_kinds(manifest: Manifest, purpose: str) -> np.ndarray:
    """:func:`check_truth`'s flags, refused (UserError naming the file) when there are none, or when
    every row is noisy or every row clean: precision and recall of removal need both kinds."""
    noise = check_truth(manifest)
    if noise is None:
        raise UserError(f"{manifest.source}: no is_noise column; {purpose} needs the ground truth")
    if len(noise) == 0:
        raise UserError(f"{manifest.source}: no rows; {purpose} needs noisy and clean rows")
    if noise.all() or not noise.any():
        raise UserError(f"{manifest.source}: every row has is_noise {int(noise[0])}: no "
                        f"{'clean' if noise.all() else 'noisy'} rows; {purpose} needs both")
    return noise

def true_duplicate_pairs(table: pd.DataFrame) -> set[frozenset[str]]:
    """Pairs {duplicate id, original id} from ``landmark_id``, ``is_noise``, ``true_landmark_id``."""
    clean = table.loc[~noise_flags(table["is_noise"]), ["landmark_id", "true_landmark_id"]].astype(str)
    clean["true_landmark_id"] = clean["true_landmark_id"].str.strip()
    counts = clean.groupby(["landmark_id", "true_landmark_id"]).size().reset_index(name="n")
    # Each id's most frequent truth (ties: the smaller truth id, so the answer is deterministic).
    majority = counts.sort_values(["landmark_id", "n", "true_landmark_id"], ascending=[True, False, True])
    majority = majority.drop_duplicates("landmark_id")
    return {frozenset((lid, truth)) for lid, truth in zip(majority["landmark_id"], majority["true_landmark_id"])
            if truth and truth != lid}


def score_against_truth(table: pd.DataFrame, result: CleaningResult) -> dict | None:
    """Precision/recall of removal (and of duplicate detection, when the truth allows); ``None``
    when ``table`` has no ``is_noise`` column."""
    if "is_noise" not in table.columns:
        return None
    noise = noise_flags(table["is_noise"])
    removed = ~result.keep
    tp, fp, fn = int((removed & noise).sum()), int((removed & ~noise).sum()), int((~removed & noise).sum())
    scores: dict = {
        "removal": {
            "noise_rows": int(noise.sum()), "removed": int(removed.sum()), "true_positives": tp,
            "false_positives": fp, "false_negatives": fn, "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, tp + fn),
        },
        "by_reason": {},
    }
    for code in sorted(set(result.reason_code[removed])):
        rows = removed & (result.reason_code == code)
        scores["by_reason"][str(code)] = {"removed": int(rows.sum()), "noise": int((rows & noise).sum()),
                                          "precision": _ratio(int((rows & noise).sum()), int(rows.sum()))}
    if "true_landmark_id" in table.columns:
        no_landmark = noise & table["true_landmark_id"].astype(str).str.strip().eq("").to_numpy()
        wrong_landmark = noise & ~no_landmark
        scores["recall_by_noise_kind"] = {
            "no_landmark": _ratio(int((removed & no_landmark).sum()), int(no_landmark.sum())),
            "other_landmark": _ratio(int((removed & wrong_landmark).sum()), int(wrong_landmark.sum())),
        }
        truth = true_duplicate_pairs(table)
        found = {frozenset(p) for g in result.duplicate_groups for p in combinations(g["members"], 2)}
        hits = len(truth & found)
        scores["duplicates"] = {
            "true_pairs": sorted(sorted(p) for p in truth), "found_pairs": sorted(sorted(p) for p in found),
            "precision": _ratio(hits, len(found)), "recall": _ratio(hits, len(truth)),
        }
    return scores
