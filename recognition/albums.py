"""Albums: a folder of personal photos grouped by recognised landmark (and by city), as JSON + HTML.

:func:`group_albums` is pure (recognition results in, album structure out); :func:`write_albums`
adds thumbnails and a static, self-contained HTML page (relative links only, no scripts) that
opens from disk in any browser. Input photos are only read; every output file is written to a
temporary name and renamed. :func:`check_out_folder` refuses a folder whose ``index.html`` or
``albums.json`` another program wrote.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import pathlib
import re
import urllib.parse
from typing import Iterable

from PIL import Image

from core.atomic import atomic_path, write_text_atomic
from core.errors import UserError
from datamodules.images import UnreadableImage, load_rgb
from recognition.recognizer import Recognition

__all__ = ["check_out_folder", "group_albums", "write_albums"]

NO_CITY = "Other places"
# Marks the files this module writes, so that a rerun into the same folder replaces them but a
# folder holding someone else's index.html / albums.json is refused rather than overwritten.
GENERATOR = "landmarks albums"
_HTML_MARK = f'<meta name="generator" content="{GENERATOR}">'
# albums.json as written before it carried GENERATOR: still ours, so still replaced.
_LEGACY_KEYS = {"albums", "cities", "unrecognised", "errors", "counts"}
# Only files with this name are removed from thumbs/ as unused: anything else there is not ours.
_THUMB_NAME = re.compile(r"[0-9a-f]{20}\.jpg")


def group_albums(results: Iterable[Recognition]) -> dict:
    """``{"albums": [...], "cities": [...], "unrecognised": [...], "errors": [...], "counts": {...}}``.

    One album per landmark with at least one accepted photo (photos by decreasing score; albums
    by decreasing size, then name); cities list their albums (landmarks without a city go under
    "Other places"). Photos that were read but not accepted are ``unrecognised``.
    """
    albums: dict[str, dict] = {}
    unrecognised: list[str] = []
    errors: list[dict] = []
    n = 0
    for r in results:
        n += 1
        if r.error is not None:
            errors.append({"path": r.path, "error": r.error})
        elif r.accepted:
            album = albums.setdefault(r.landmark_id, {
                "landmark_id": r.landmark_id, "name": r.name, "city": r.city, "photos": [],
            })
            album["photos"].append({"path": r.path, "score": r.score})
        else:
            unrecognised.append(r.path)
    ordered = sorted(albums.values(), key=lambda a: (-len(a["photos"]), a["name"] or a["landmark_id"]))
    for album in ordered:
        album["photos"].sort(key=lambda p: -p["score"])
    cities: dict[str, dict] = {}
    for album in ordered:
        city = cities.setdefault(album["city"] or NO_CITY, {"city": album["city"] or NO_CITY, "landmarks": [],
                                                            "n_photos": 0})
        city["landmarks"].append(album["landmark_id"])
        city["n_photos"] += len(album["photos"])
    city_list = sorted(cities.values(), key=lambda c: (c["city"] == NO_CITY, -c["n_photos"], c["city"]))
    return {
        "albums": ordered,
        "cities": city_list,
        "unrecognised": unrecognised,
        "errors": errors,
        "counts": {"photos": n, "recognised": n - len(unrecognised) - len(errors),
                   "unrecognised": len(unrecognised), "unreadable": len(errors), "albums": len(ordered)},
    }


def _shown(text: str) -> str:
    """``text`` as it can be written in UTF-8: a file name's undecodable bytes (held as surrogates)
    become U+FFFD, since a page or JSON file cannot hold the raw bytes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


def _shown_json(obj):
    if isinstance(obj, str):
        return _shown(obj)
    if isinstance(obj, list):
        return [_shown_json(v) for v in obj]
    if isinstance(obj, dict):
        return {_shown(k): _shown_json(v) for k, v in obj.items()}
    return obj


def _thumbnail(photo: str, out_dir: pathlib.Path, size: int) -> str | None:
    """Write a JPEG thumbnail of ``photo`` under ``out_dir``; its path relative to the album root.

    The name hashes the path with the file's size and mtime and the thumbnail size, so a photo
    replaced at the same path, or a new ``size``, gets a new thumbnail instead of the old one.
    """
    try:
        st = os.stat(photo)
    except OSError:
        return None
    key = b"\0".join([os.fsencode(os.path.abspath(photo)), b"%d" % st.st_size, b"%d" % st.st_mtime_ns, b"%d" % size])
    name = hashlib.sha1(key).hexdigest()[:20] + ".jpg"
    target = out_dir / name
    if not target.exists():
        try:
            image = Image.fromarray(load_rgb(photo, max_side=size))
        except UnreadableImage:
            return None
        with atomic_path(target) as tmp:
            image.save(tmp, format="JPEG", quality=85)
    return f"{out_dir.name}/{name}"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; background: #fafafa; color: #222; }
h1 { margin-bottom: 0.2em; } .summary { color: #555; margin-bottom: 2em; }
h2 { border-bottom: 2px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin: 1.2em 0 0.5em; } h3 small { color: #777; font-weight: normal; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; background: #fff; padding: 6px; border: 1px solid #ddd; border-radius: 4px; width: 172px; }
figure img { width: 160px; height: 160px; object-fit: cover; display: block; margin: auto; }
figcaption { font-size: 12px; margin-top: 4px; word-break: break-all; }
.score { color: #666; } .errors li { font-family: monospace; font-size: 12px; }
"""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _html_page(albums: dict, title: str) -> str:
    def esc(text: str, quote: bool = True) -> str:
        # Every text shown (names, paths in errors, the title) may hold a non-UTF-8 file name's bytes.
        return html.escape(_shown(text), quote=quote)

    by_id = {a["landmark_id"]: a for a in albums["albums"]}
    c = albums["counts"]
    parts = [
        "<!DOCTYPE html>", f'<html lang="en"><head><meta charset="utf-8">{_HTML_MARK}',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="summary">{_count(c["photos"], "photo")}: {c["recognised"]} recognised in '
        f'{_count(c["albums"], "landmark album")}, '
        f'{c["unrecognised"]} without a recognised landmark, {c["unreadable"]} unreadable.</p>',
    ]
    for city in albums["cities"]:
        parts.append(f'<section class="city"><h2>{esc(city["city"])} <small>({_count(city["n_photos"], "photo")})'
                     '</small></h2>')
        for landmark_id in city["landmarks"]:
            album = by_id[landmark_id]
            label = album["name"] or landmark_id
            parts.append(f'<div class="album"><h3>{esc(label)} <small>{_count(len(album["photos"]), "photo")} · id '
                         f'{esc(landmark_id)}</small></h3><div class="grid">')
            for photo in album["photos"]:
                name = os.path.basename(photo["path"])
                thumb = photo.get("thumbnail")
                img = (f'<img src="{esc(thumb, quote=True)}" alt="{esc(name, quote=True)}" loading="lazy">'
                       if thumb else "<div>(no thumbnail)</div>")
                # The link percent-encodes the name's raw bytes, so it opens even a non-UTF-8 name.
                href = "file://" + urllib.parse.quote(os.fsencode(os.path.abspath(photo["path"])))
                parts.append(f'<figure><a href="{esc(href, quote=True)}">{img}</a><figcaption>{esc(name)}<br>'
                             f'<span class="score">score {photo["score"]:.3f}</span></figcaption></figure>')
            parts.append("</div></div>")
        parts.append("</section>")
    if albums["errors"]:
        parts.append('<section><h2>Unreadable photos</h2><ul class="errors">')
        parts.extend(f"<li>{esc(e['error'])}</li>" for e in albums["errors"])
        parts.append("</ul></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _ours(path: pathlib.Path) -> bool:
    """Whether ``path`` (an ``albums.json`` or ``index.html``) is one this module wrote."""
    try:
        if path.name == "albums.json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(data, dict) and (data.get("generator") == GENERATOR or set(data) == _LEGACY_KEYS)
        with open(path, "rb") as f:
            return _HTML_MARK.encode() in f.read(4096)
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not ours
        return False


def check_out_folder(out: str | os.PathLike) -> None:
    """Refuse (:class:`UserError`) an ``out`` whose ``albums.json`` or ``index.html`` this module
    did not write; a folder holding an earlier run's output is fine (it is rewritten)."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    ours_json = _ours(out / "albums.json")
    for name in ("albums.json", "index.html"):
        path = out / name
        # An index.html beside our albums.json is ours too: pages written before they were marked.
        if path.exists() and not (_ours(path) or (name == "index.html" and ours_json)):
            raise UserError(f"--out {out}: holds an {name} that `landmarks albums` did not write; "
                            "choose another folder (it is not overwritten)")


def write_albums(albums: dict, out: str | os.PathLike, thumb_size: int = 320, title: str = "Landmark albums") -> dict:
    """Write ``albums.json``, ``index.html`` and ``thumbs/`` into ``out``; returns the paths written.

    ``albums`` is the output of :func:`group_albums`; thumbnail paths are added to its photos.
    Thumbnails in ``thumbs/`` that the new page does not use are removed.
    """
    out = pathlib.Path(out)
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    for album in albums["albums"]:
        for photo in album["photos"]:
            photo["thumbnail"] = _thumbnail(photo["path"], thumbs, thumb_size)
    # Both texts are built before either is written, so a failure while building them leaves the
    # previous pair. Each file is replaced atomically, but not the two together: a crash between the
    # two writes leaves the new albums.json beside the previous index.html.
    doc = _shown_json({"generator": GENERATOR, **albums})
    json_text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    page = _html_page(albums, title)
    write_text_atomic(out / "albums.json", json_text)
    write_text_atomic(out / "index.html", page)
    used = {photo["thumbnail"].rpartition("/")[2] for album in albums["albums"] for photo in album["photos"]
            if photo["thumbnail"]}
    for old in thumbs.iterdir():
        # Thumbnails of earlier runs (other photos, replaced photos, another --thumb-size).
        if _THUMB_NAME.fullmatch(old.name) and old.name not in used:
            old.unlink(missing_ok=True)
    return {"json": str(out / "albums.json"), "html": str(out / "index.html"), "thumbs": str(thumbs)}
