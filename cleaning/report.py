"""The cleaning report: one offline HTML page, thumbnails as small JPEG files next to it.

Per landmark it shows the kept clusters (the images nearest each centroid first) and every
removed image with its reason; duplicate groups and the counts come first. The page is
well-formed XHTML-compatible markup (every tag closed, every text escaped), needs no network,
script or stylesheet beyond its own, and opens from the file system in any browser.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from cleaning.algorithm import CleaningResult
from core.atomic import atomic_path, write_text_atomic
from datamodules.images import UnreadableImage, load_rgb

__all__ = ["write_report"]

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { margin-top: 0; } h2 { margin: 1.6em 0 0.3em; border-bottom: 1px solid #ccc; }
h3 { margin: 0.6em 0 0.2em; font-size: 1em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.thumbs { display: flex; flex-wrap: wrap; gap: 4px; align-items: flex-start; }
figure { margin: 0; width: 112px; font-size: 0.72em; overflow-wrap: anywhere; }
figure img, .missing { width: 104px; height: 104px; object-fit: contain; background: #ddd; display: block; border: 3px solid #9c9; }
.removed figure img, .removed .missing { border-color: #d66; }
.missing { display: flex; align-items: center; justify-content: center; color: #666; }
.note { color: #666; font-size: 0.9em; } .dup { background: #fff4d6; padding: 0.3em 0.6em; }
"""


# Marks the page this module writes, so that `landmarks clean --no-report` removes an earlier
# report of its own but never a page of the user's (or of `landmarks albums`) in the same folder.
REPORT_MARK = '<meta name="generator" content="landmarks clean"/>'
# The names _thumb gives; only these are removed with an earlier report.
THUMB_NAME = re.compile(r"[0-9a-f]{20}\.jpg")


def _thumb(source: str, thumbs: Path, size: int) -> str | None:
    """Relative URL of a thumbnail of ``source`` (made once, keyed by path, size and mtime), or None."""
    try:
        st = os.stat(source)
    except OSError:
        return None
    name = hashlib.sha1(f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}|{size}".encode()).hexdigest()[:20]
    target = thumbs / f"{name}.jpg"
    if not target.exists():
        try:
            pixels = load_rgb(source, max_side=size)
        except UnreadableImage:
            return None
        with atomic_path(target) as tmp:
            Image.fromarray(pixels).save(tmp, "JPEG", quality=80)
    return f"{thumbs.name}/{target.name}"


class _Page:
    def __init__(self, out_dir: Path, thumb_size: int):
        self.parts: list[str] = []
        self.out_dir = out_dir
        self.thumbs = out_dir / "thumbs"
        self.thumbs.mkdir(parents=True, exist_ok=True)
        self.thumb_size = thumb_size
        self.images = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, path: str, caption: str, title: str = "") -> None:
        url = _thumb(path, self.thumbs, self.thumb_size)
        self.images += 1
        tip = html.escape(title or path, quote=True)
        picture = (f'<img src="{html.escape(url, quote=True)}" alt="{tip}" title="{tip}" loading="lazy"/>'
                   if url else f'<div class="missing" title="{tip}">unreadable</div>')
        self.add(f"<figure>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>")


def _landmark_order(result: CleaningResult, limit: int) -> tuple[list[str], int]:
    """Landmarks with something to look at first (most removed, duplicates, dropped), then by id."""
    def key(item):
        lid, info = item
        removed = info["images"] - info["kept"]
        return (-(info["dropped"] or bool(info["duplicate_of"])), -removed, lid)

    ordered = [lid for lid, _ in sorted(result.landmarks.items(), key=key)]
    return ordered[:limit], max(0, len(ordered) - limit)


def write_report(
    out_dir: str | os.PathLike,
    paths: Sequence[str],
    result: CleaningResult,
    *,
    title: str,
    summary_rows: Sequence[tuple[str, str]] = (),
    nonlandmark_paths: Sequence[str] | None = None,
    max_landmarks: int = 300,
    thumbs_per_cluster: int = 8,
    max_removed_per_landmark: int = 60,
    thumb_size: int = 96,
    progress: bool = True,
) -> Path:
    """Write ``out_dir/report.html`` (+ ``out_dir/thumbs/*.jpg``) and return the page's path.

    Args:
        paths: absolute image path of every row of ``result``.
        summary_rows: (label, value) pairs shown at the top (input, model, counts ...).
        nonlandmark_paths: the non-landmark pool, to show the neighbour of ``near_nonlandmark`` images.
        max_landmarks: landmarks shown (those with removals, drops or duplicates first).
        thumbs_per_cluster: images shown per kept cluster (nearest the centroid first).
        max_removed_per_landmark: removed images shown per landmark.
        thumb_size: longer side of the thumbnails in pixels.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    page = _Page(out_dir, thumb_size)
    rows_of = _rows_by_input_id(result)
    shown, omitted = _landmark_order(result, max_landmarks)
    shown_set = set(shown)

    _add_head(page, title, summary_rows)
    _add_duplicate_groups(page, result, rows_of, paths)
    page.add(f"<h2>Landmarks ({len(shown)} shown{f', {omitted} more not shown' if omitted else ''})</h2>")
    page.add("<p class=\"note\">Green frames: kept clusters, images nearest the cluster centre first (the number is the "
             "cosine similarity to the nearest kept centre). Red frames: removed images, with the reason. Hover a "
             "thumbnail for its file.</p>")
    for lid in tqdm(shown, desc="report", unit="landmark", disable=not progress):
        rows = rows_of[lid]
        _add_landmark_head(page, lid, result.landmarks[lid], rows, result)
        _add_kept_clusters(page, result.landmarks[lid], rows, result, paths, thumbs_per_cluster)
        _add_removed(page, rows, result, paths, nonlandmark_paths, shown_set, max_removed_per_landmark)
        page.add("</section>")
    page.add("</body></html>\n")

    target = out_dir / "report.html"
    write_text_atomic(target, "".join(page.parts))
    return target


def _rows_by_input_id(result: CleaningResult) -> dict[str, np.ndarray]:
    """Rows by the id they had in the input (merging rewrites landmark_id, not input_landmark_id)."""
    by_id: dict[str, list[int]] = {lid: [] for lid in result.landmarks}
    for i, lid in enumerate(result.input_landmark_id):
        by_id[lid].append(i)
    return {lid: np.asarray(rows, dtype=np.int64) for lid, rows in by_id.items()}


def _add_head(page: _Page, title: str, summary_rows: Sequence[tuple[str, str]]) -> None:
    page.add('<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en">'
             f'<head><meta charset="utf-8"/>{REPORT_MARK}<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>')
    page.add(f"<h1>{html.escape(title)}</h1><table>")
    for label, value in summary_rows:
        page.add(f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(value))}</td></tr>")
    page.add("</table>")


def _add_duplicate_groups(page: _Page, result: CleaningResult, rows_of: dict[str, np.ndarray],
                          paths: Sequence[str]) -> None:
    """Each group with its evidence and a few kept images of every member."""
    page.add(f"<h2>Duplicate landmarks ({len(result.duplicate_groups)} groups)</h2>")
    if not result.duplicate_groups:
        page.add('<p class="note">None found.</p>')
    for group in result.duplicate_groups:
        action = "merged into" if result.params.duplicates == "merge" else "flagged as duplicates of"
        evidence = "; ".join(f"{a} / {b}: centroid distance {e['distance']:.3f}, shares {e['shares'][0]:.2f} / {e['shares'][1]:.2f}"
                             for e in group["evidence"] for a, b in [e["landmarks"]])
        page.add(f'<div class="dup"><p>{html.escape(", ".join(group["members"]))} — {action} '
                 f'<a href="#lm-{html.escape(group["landmark_id"], quote=True)}">{html.escape(group["landmark_id"])}</a>'
                 f' ({html.escape(evidence)})</p><div class="thumbs">')
        for member in group["members"]:
            rows = rows_of[member]
            kept = rows[result.keep[rows]]
            for r in kept[np.argsort(-np.nan_to_num(result.own_similarity[kept], nan=-2))][:4]:
                page.figure(paths[r], f"{member}")
        page.add("</div></div>")


def _add_landmark_head(page: _Page, lid: str, info: dict, rows: np.ndarray, result: CleaningResult) -> None:
    removed = rows[~result.keep[rows]]
    head = (f"{info['images']} images, {info['valid_clusters']} cluster(s) kept {info['cluster_sizes']}, "
            f"{len(removed)} removed")
    if info["dropped"]:
        head += ", landmark dropped"
    if info["duplicate_of"] and info["duplicate_of"] != lid:
        head += f", duplicate of {info['duplicate_of']}"
    page.add(f'<section id="lm-{html.escape(lid, quote=True)}"><h2>Landmark {html.escape(lid)}</h2>'
             f'<p class="note">{html.escape(head)}</p>')


def _add_kept_clusters(page: _Page, info: dict, rows: np.ndarray, result: CleaningResult, paths: Sequence[str],
                       thumbs_per_cluster: int) -> None:
    """Each kept cluster of a landmark, the images nearest its centre first."""
    for c in range(info["valid_clusters"]):
        members = rows[(result.cluster[rows] == c) & result.keep[rows]]
        total = int((result.cluster[rows] == c).sum())
        members = members[np.argsort(-result.own_similarity[members], kind="stable")]
        page.add(f"<h3>cluster {c}: {total} images ({len(members)} kept)</h3><div class=\"thumbs\">")
        for r in members[:thumbs_per_cluster]:
            page.figure(paths[r], f"{result.own_similarity[r]:.2f}", paths[r])
        if len(members) > thumbs_per_cluster:
            page.add(f'<p class="note">+{len(members) - thumbs_per_cluster} more</p>')
        page.add("</div>")


def _add_removed(page: _Page, rows: np.ndarray, result: CleaningResult, paths: Sequence[str],
                 nonlandmark_paths: Sequence[str] | None, shown_set: set[str], max_removed_per_landmark: int) -> None:
    """A landmark's removed images with their reasons, and where the evidence against each came from."""
    removed = rows[~result.keep[rows]]
    if not len(removed):
        return
    page.add(f'<div class="removed"><h3>removed ({len(removed)})</h3><div class="thumbs">')
    for r in removed[:max_removed_per_landmark]:
        page.figure(paths[r], str(result.reason[r]), paths[r])
        other = str(result.other_landmark[r])
        code = result.reason_code[r]
        # Under the evidence rule, show whichever side the evidence came from.
        pool_side = code == "near_nonlandmark" or (
            code == "neighbour_evidence" and result.nonlandmark_neighbour[r] >= 0
            and result.nonlandmark_similarity[r] > result.other_similarity[r])
        if pool_side and nonlandmark_paths is not None:
            page.figure(nonlandmark_paths[int(result.nonlandmark_neighbour[r])], "← its nearest non-landmark photo")
        elif code in ("other_landmark", "neighbour_evidence") and other in shown_set:
            page.add(f'<p class="note"><a href="#lm-{html.escape(other, quote=True)}">→ {html.escape(other)}</a></p>')
    if len(removed) > max_removed_per_landmark:
        page.add(f'<p class="note">+{len(removed) - max_removed_per_landmark} more (see clean.csv)</p>')
    page.add("</div></div>")
