"""Albums: a folder of personal photos grouped by recognised landmark (and by city), as JSON + HTML.

:func:`group_albums` is pure (recognition results in, album structure out); :func:`write_albums`
adds thumbnails and a static, self-contained HTML page (relative links only, no scripts) that
opens from disk in any browser. Input photos are only read; every output file is written to a
temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import pathlib
from typing import Iterable

from PIL import Image

from core.atomic import atomic_path, write_text_atomic
from datamodules.images import UnreadableImage, load_rgb
from recognition.recognizer import Recognition

__all__ = ["group_albums", "write_albums"]

NO_CITY = "Other places"


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


def _thumbnail(photo: str, out_dir: pathlib.Path, size: int) -> str | None:
    """Write a JPEG thumbnail of ``photo`` under ``out_dir``; its path relative to the album root."""
    name = hashlib.sha1(os.path.abspath(photo).encode()).hexdigest()[:20] + ".jpg"
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
    esc = html.escape
    by_id = {a["landmark_id"]: a for a in albums["albums"]}
    c = albums["counts"]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
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
                href = pathlib.Path(os.path.abspath(photo["path"])).as_uri()
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


def write_albums(albums: dict, out: str | os.PathLike, thumb_size: int = 320, title: str = "Landmark albums") -> dict:
    """Write ``albums.json``, ``index.html`` and ``thumbs/`` into ``out``; returns the paths written.

    ``albums`` is the output of :func:`group_albums`; thumbnail paths are added to its photos.
    """
    out = pathlib.Path(out)
    thumbs = out / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    for album in albums["albums"]:
        for photo in album["photos"]:
            photo["thumbnail"] = _thumbnail(photo["path"], thumbs, thumb_size)
    write_text_atomic(out / "albums.json", json.dumps(albums, indent=2, allow_nan=False) + "\n")
    write_text_atomic(out / "index.html", _html_page(albums, title))
    return {"json": str(out / "albums.json"), "html": str(out / "index.html"), "thumbs": str(thumbs)}
