"""A deterministic synthetic "landmark world": the project's embedded default dataset.

The world is meant as a fair stand-in for large-scale landmark recognition, so it reproduces
what makes the real problem hard rather than just supplying labelled pictures:

* every landmark is a procedural structure assembled from parts (towers, domes, arches,
  facades, spires, colonnades, pyramids) with its own palette and textures, photographed from
  2-3 *shooting angles* (front, side, interior, close-up detail, distant skyline) that look
  substantially different, so one centroid per landmark is not enough;
* every photo gets its own nuisances: sky and ground, placement, perspective warp and crop,
  time-of-day colour cast, lighting gradient, people/trees/cars in front, blur, sensor noise and
  JPEG artefacts at a random quality;
* non-landmark photos (rooms, food, nature, streets, people close-ups) include *hard negatives*:
  buildings made from the same part vocabulary but with a fresh structure per image, so they
  look landmark-like yet never repeat;
* the landmark database is noisy in known ways: a fraction of rows carry a wrong label (really
  another landmark, or really no landmark at all) and a few landmarks are duplicated under a
  second id. The ground truth is written next to the labels.

Layout written by :func:`generate_world` (paths in CSVs are relative to ``<out>``)::

    <out>/images/db/<landmark_id>/<i>.jpg        labelled landmark database (noisy)
    <out>/images/queries/<landmark_id>/<i>.jpg   held-out landmark queries (clean)
    <out>/images/nonlandmarks/<i>.jpg            non-landmark training pool
    <out>/images/distractors/<i>.jpg             non-landmark distractor queries
    <out>/db.csv           path,landmark_id,lat,lon,view,is_noise,true_landmark_id
    <out>/queries.csv      path,landmark_id,lat,lon,view
    <out>/nonlandmarks.csv path,kind
    <out>/distractors.csv  path,kind
    <out>/landmarks.csv    landmark_id,name,lat,lon,num_views,duplicate_of,city
    <out>/world.json       format, config, seed, counts, noise counts, duplicate pairs, cities

``db.csv``: ``landmark_id`` is the (possibly wrong) label; ``true_landmark_id`` is the landmark
whose structure is shown (the *original* id for a duplicate landmark's images, which are not
noise) and is empty when the image shows no landmark; ``view`` is the shooting angle drawn
(empty for non-landmark noise); lat/lon belong to the labelled landmark. Duplicate ids get no
queries: a query of a duplicate would have two correct answers, which the evaluation cannot
express. Landmark ids are sparse shuffled integers ≥ 1000, never class indices.

Every image's randomness comes from ``(seed, split, index)`` and every landmark's blueprint from
``(seed, landmark index)``, so the same config and seed give byte-identical files whatever the
number of worker processes.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm
from core.atomic import replace_dir

FORMAT = "synthetic-landmark-world/1"

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class SynthConfig:
    """Size, difficulty and noise of a synthetic landmark world (the defaults are the demo world)."""

    num_landmarks: int = 100
    images_per_landmark: int = 30
    queries_per_landmark: int = 5
    nonlandmark_pool: int = 1500
    distractors: int = 5000
    image_size: int = 96
    min_views: int = 2
    max_views: int = 3
    noise_fraction: float = 0.1  # share of DB rows with a wrong label
    noise_nonlandmark_share: float = 0.5  # of the noisy rows, share that are really non-landmarks
    duplicate_landmarks: int = 3
    hard_negative_share: float = 0.3  # share of non-landmark images that are generic buildings
    difficulty: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_landmarks", "images_per_landmark", "min_views"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        for name in ("queries_per_landmark", "nonlandmark_pool", "distractors", "duplicate_landmarks", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if self.image_size < 32:
            problems.append("image_size must be >= 32")
        if not self.min_views <= self.max_views <= len(FRAMINGS):
            problems.append(f"need min_views <= max_views <= {len(FRAMINGS)} (the shooting angles available)")
        if not 0.0 <= self.noise_fraction < 1.0:
            problems.append("noise_fraction must be in [0, 1)")
        for name in ("noise_nonlandmark_share", "hard_negative_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1]")
        if self.num_landmarks - 2 * self.duplicate_landmarks < 0:
            problems.append("duplicate_landmarks needs two landmarks each (a duplicate and its original)")
        if self.num_landmarks - self.duplicate_landmarks < 2:
            problems.append("need at least 2 distinct structures (num_landmarks - duplicate_landmarks >= 2)")
        if self.difficulty < 0:
            problems.append("difficulty must be >= 0")
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))

    @classmethod
    def tiny(cls, seed: int = 0) -> "SynthConfig":
        """A world small enough for unit tests elsewhere (generates in well under 2 s)."""
        return cls(
            num_landmarks=8, images_per_landmark=6, queries_per_landmark=2, nonlandmark_pool=40,
            distractors=60, image_size=64, duplicate_landmarks=1, seed=seed,
        )


CONFIG_HELP = {
    "num_landmarks": "landmark ids, duplicates included",
    "images_per_landmark": "DB images per landmark id",
    "queries_per_landmark": "held-out queries per landmark (duplicate ids get none)",
    "nonlandmark_pool": "non-landmark training images",
    "distractors": "non-landmark distractor queries",
    "image_size": "side of the square JPEGs in pixels",
    "min_views": "fewest shooting angles per landmark",
    "max_views": "most shooting angles per landmark (front, side, interior, detail, distant: at most 5)",
    "noise_fraction": "share of DB rows with a wrong label",
    "noise_nonlandmark_share": "of the noisy rows, share that show no landmark (rest: another landmark)",
    "duplicate_landmarks": "landmarks that appear under a second id",
    "hard_negative_share": "share of non-landmark images that are generic (non-landmark) buildings",
    "difficulty": "scales warp, crop, occlusion, colour cast, blur, noise and JPEG loss (0 = clean)",
    "seed": "world seed; same seed and config give byte-identical files",
}


# ---------------------------------------------------------------------------------------------
# Randomness. Independent streams per purpose, so adding draws to one never shifts another.

_STREAM_DB, _STREAM_QUERIES, _STREAM_NONLANDMARKS, _STREAM_DISTRACTORS = 1, 2, 3, 4
_STREAM_BLUEPRINT, _STREAM_PLAN, _STREAM_VIEW_MIX = 10, 11, 12


def _rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *index]))


# ---------------------------------------------------------------------------------------------
# Colours

def _hsv(hue: float, sat: float, val: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0))
    return (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5))


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(min(255, max(0, int(c * factor + 0.5))) for c in colour)  # type: ignore[return-value]


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(x + (y - x) * t + 0.5) for x, y in zip(a, b))  # type: ignore[return-value]


def _luma(colour: RGB) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def _jitter(rng: np.random.Generator, colour: RGB, spread: float) -> RGB:
    return tuple(int(min(255, max(0, c + rng.normal(0, spread)))) for c in colour)  # type: ignore[return-value]


def _random_colour(rng: np.random.Generator, sat: tuple[float, float] = (0.3, 0.9),
                   val: tuple[float, float] = (0.3, 0.95)) -> RGB:
    return _hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))


# ---------------------------------------------------------------------------------------------
# Landmark blueprints: parts with colours and textures, and the shooting angles ("views").

PART_KINDS = ("tower", "dome", "arch", "facade", "spire", "colonnade", "pyramid")
TEXTURES = ("plain", "hstripes", "vstripes", "bricks", "windows", "checker", "arcade")
TOPS = ("flat", "crenels", "roof", "dome", "spire")
FRAMINGS = ("front", "side", "interior", "detail", "distant")
# Width and height ranges of each part, as fractions of the canvas side.
_PART_SIZES = {
    "tower": ((0.12, 0.22), (0.45, 0.75)),
    "dome": ((0.30, 0.50), (0.35, 0.55)),
    "arch": ((0.35, 0.55), (0.35, 0.55)),
    "facade": ((0.45, 0.75), (0.25, 0.45)),
    "spire": ((0.08, 0.16), (0.50, 0.80)),
    "colonnade": ((0.40, 0.65), (0.25, 0.40)),
    "pyramid": ((0.45, 0.70), (0.30, 0.50)),
}
_NAME_SUFFIXES = {
    "tower": ("Tower", "Belfry", "Campanile"),
    "dome": ("Basilica", "Dome", "Rotunda"),
    "arch": ("Gate", "Arch"),
    "facade": ("Palace", "Hall", "Library"),
    "spire": ("Cathedral", "Spire", "Chapel"),
    "colonnade": ("Temple", "Forum", "Pavilion"),
    "pyramid": ("Pyramid", "Ziggurat"),
}
# Where a structure layer's ground line lies (fraction of the canvas); photos put it on the horizon.
_BASE_LINE = 0.86


@dataclass(frozen=True)
class _Part:
    kind: str
    width: float  # fraction of the canvas side
    height: float
    colour: RGB
    accent: RGB
    texture: str
    side_texture: str  # what the part's other walls look like (side and interior views)
    period: float  # texture period, fraction of the canvas side
    top: str
    ornament: bool


@dataclass(frozen=True)
class _View:
    framing: str
    layout_seed: int  # the composition of this view is fixed, only the photo nuisances vary


@dataclass(frozen=True)
class _Blueprint:
    palette: tuple[RGB, ...]
    parts: tuple[_Part, ...]
    views: tuple[_View, ...]


def _make_palette(rng: np.random.Generator) -> tuple[RGB, ...]:
    base_hue = rng.random()
    palette = []
    for _ in range(5):
        hue = base_hue + rng.normal(0, 0.06) + (0.5 if rng.random() < 0.25 else 0.0)
        if rng.random() < 0.55:  # stone, plaster, brick: muted
            palette.append(_hsv(hue, rng.uniform(0.05, 0.35), rng.uniform(0.45, 0.95)))
        else:
            palette.append(_hsv(hue, rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.9)))
    return tuple(palette)


def _make_part(rng: np.random.Generator, kind: str, palette: tuple[RGB, ...]) -> _Part:
    (w0, w1), (h0, h1) = _PART_SIZES[kind]
    colour_index, accent_index = rng.choice(len(palette), 2, replace=False)
    colour, accent = palette[colour_index], palette[accent_index]
    if abs(_luma(colour) - _luma(accent)) < 40:  # textures must stay visible after blur and JPEG
        accent = _shade(accent, 0.55) if _luma(accent) > 110 else _shade(accent, 1.8)
    texture, side_texture = rng.choice(TEXTURES, 2, replace=False)
    return _Part(
        kind=kind, width=float(rng.uniform(w0, w1)), height=float(rng.uniform(h0, h1)),
        colour=colour, accent=accent, texture=str(texture), side_texture=str(side_texture),
        period=float(rng.uniform(0.035, 0.08)), top=str(rng.choice(TOPS)), ornament=bool(rng.random() < 0.6),
    )


def _make_blueprint(rng: np.random.Generator, framings: tuple[str, ...]) -> _Blueprint:
    palette = _make_palette(rng)
    kinds = [str(k) for k in rng.choice(PART_KINDS, int(rng.integers(4, 7)))]
    parts = tuple(_make_part(rng, kind, palette) for kind in kinds)
    views = tuple(_View(framing, int(rng.integers(2**32))) for framing in framings)
    return _Blueprint(palette, parts, views)


def _landmark_blueprint(config: SynthConfig, landmark_index: int) -> _Blueprint:
    rng = _rng(config.seed, _STREAM_BLUEPRINT, landmark_index)
    num_views = int(rng.integers(config.min_views, config.max_views + 1))
    # Every landmark has a front view; the others are distinct angles drawn from the rest.
    framings = ("front",) + tuple(str(f) for f in rng.choice(FRAMINGS[1:], num_views - 1, replace=False))
    return _make_blueprint(rng, framings)


# ---------------------------------------------------------------------------------------------
# Drawing primitives

def _rect(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    x0, x1 = sorted((int(round(x0)), int(round(x1))))
    y0, y1 = sorted((int(round(y0)), int(round(y1))))
    draw.rectangle((x0, y0, x1, y1), fill=fill)


def _ellipse(draw: ImageDraw.ImageDraw, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    x0, x1 = sorted((int(round(x0)), int(round(x1))))
    y0, y1 = sorted((int(round(y0)), int(round(y1))))
    draw.ellipse((x0, y0, x1, y1), fill=fill)


def _textured_rect(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float], colour: RGB,
                   accent: RGB, texture: str, period: float) -> None:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=colour)
    p = max(3, int(round(period)))
    half = max(1, p // 2)
    if texture == "hstripes":
        for y in range(y0, y1, p):
            draw.rectangle((x0, y, x1 - 1, min(y + half, y1) - 1), fill=accent)
    elif texture == "vstripes":
        for x in range(x0, x1, p):
            draw.rectangle((x, y0, min(x + half, x1) - 1, y1 - 1), fill=accent)
    elif texture == "bricks":
        for row, y in enumerate(range(y0, y1, half + 1)):
            draw.line((x0, y, x1 - 1, y), fill=accent)
            for x in range(x0 + (row % 2) * half, x1, p):
                draw.line((x, y, x, min(y + half, y1 - 1)), fill=accent)
    elif texture == "windows":
        for y in range(y0 + p // 3, y1 - half, p + half // 2):
            for x in range(x0 + p // 3, x1 - half + 1, p):
                draw.rectangle((x, y, x + half - 1, min(y + p * 2 // 3, y1 - 1)), fill=accent)
    elif texture == "checker":
        for row, y in enumerate(range(y0, y1, half + 1)):
            for col, x in enumerate(range(x0, x1, half + 1)):
                if (row + col) % 2:
                    draw.rectangle((x, y, min(x + half, x1 - 1), min(y + half, y1 - 1)), fill=accent)
    elif texture == "arcade":
        for y in range(y0 + p // 3, y1 - p, 2 * p):
            for x in range(x0 + p // 4, x1 - half, p):
                draw.rectangle((x, y + half // 2, x + half, y + p + half // 2), fill=accent)
                draw.ellipse((x, y, x + half, y + half), fill=accent)


_TRANSPARENT = (0, 0, 0, 0)


def _draw_part(draw: ImageDraw.ImageDraw, part: _Part, cx: float, base: float, scale: float, size: int,
               shade: float = 1.0, side: bool = False) -> None:
    """One part standing on ``base`` (pixels), centred on ``cx``, ``scale`` times its nominal size."""
    w, h = part.width * size * scale, part.height * size * scale
    colour, accent = _shade(part.colour, shade), _shade(part.accent, shade)
    texture = part.side_texture if side else part.texture
    period = part.period * size * scale
    x0, x1, top = cx - w / 2, cx + w / 2, base - h
    dark = _shade(part.colour, 0.35 * shade)

    if part.kind == "tower":
        body_top = base - 0.78 * h
        _textured_rect(draw, (x0, body_top, x1, base), colour, accent, texture, period)
        if part.top == "flat":
            _rect(draw, x0 - 0.1 * w, body_top - 0.03 * h, x1 + 0.1 * w, body_top + 0.02 * h, accent)
        elif part.top == "crenels":
            merlon = w / 7
            for k in range(0, 7, 2):
                _rect(draw, x0 + k * merlon, body_top - 0.06 * h, x0 + (k + 1) * merlon, body_top, colour)
        elif part.top == "roof":
            draw.polygon([(x0 - 0.06 * w, body_top), (cx, top), (x1 + 0.06 * w, body_top)], fill=accent)
        elif part.top == "dome":
            _ellipse(draw, x0, body_top - 0.5 * w, x1, body_top + 0.5 * w, accent)
        else:
            draw.polygon([(cx - 0.3 * w, body_top), (cx, top - 0.1 * h), (cx + 0.3 * w, body_top)], fill=accent)
        if part.ornament:  # clock face
            _ellipse(draw, cx - 0.28 * w, body_top + 0.12 * w, cx + 0.28 * w, body_top + 0.68 * w, accent)
    elif part.kind == "dome":
        drum_h, dome_h = 0.35 * h, 0.55 * h
        _textured_rect(draw, (cx - 0.4 * w, base - drum_h, cx + 0.4 * w, base), colour, accent, texture, period)
        spring = base - drum_h
        draw.pieslice((int(x0), int(spring - dome_h), int(x1), int(spring + dome_h)), 180, 360, fill=accent)
        if texture in ("vstripes", "hstripes", "arcade"):  # ribs
            for k in (-0.3, -0.15, 0.0, 0.15, 0.3):
                draw.line((cx + k * w, spring, cx + 0.3 * k * w, spring - 0.95 * dome_h), fill=colour, width=1)
        if part.ornament:  # lantern
            _rect(draw, cx - 0.05 * w, spring - dome_h - 0.08 * h, cx + 0.05 * w, spring - dome_h + 2, colour)
            draw.polygon([(cx - 0.06 * w, spring - dome_h - 0.08 * h), (cx, top - 0.02 * h),
                          (cx + 0.06 * w, spring - dome_h - 0.08 * h)], fill=accent)
    elif part.kind == "arch":
        attic = top + 0.14 * h
        _textured_rect(draw, (x0, attic, x1, base), colour, accent, texture, period)
        _rect(draw, x0 - 0.03 * w, top, x1 + 0.03 * w, attic, accent)
        # The opening is cut out of the layer, so the sky and ground of each photo show through.
        ow, oh = 0.45 * w, 0.62 * h
        _rect(draw, cx - ow / 2, base - oh + ow / 2, cx + ow / 2, base, _TRANSPARENT)
        _ellipse(draw, cx - ow / 2, base - oh, cx + ow / 2, base - oh + ow, _TRANSPARENT)
        if part.ornament:  # side passages
            for sx in (-0.36, 0.36):
                _rect(draw, cx + sx * w - 0.06 * w, base - 0.3 * h, cx + sx * w + 0.06 * w, base, _TRANSPARENT)
    elif part.kind == "facade":
        cornice = top + 0.2 * h
        _textured_rect(draw, (x0, cornice, x1, base), colour, accent, texture, period)
        if part.top in ("roof", "spire"):
            draw.polygon([(x0 - 0.02 * w, cornice), (cx, top), (x1 + 0.02 * w, cornice)], fill=accent)
        elif part.top == "crenels":
            step = w / 5
            for k in range(5):
                _rect(draw, x0 + k * step, cornice - (0.1 + 0.05 * (k % 2)) * h, x0 + (k + 0.8) * step, cornice, accent)
        else:
            _rect(draw, x0 - 0.03 * w, cornice - 0.04 * h, x1 + 0.03 * w, cornice + 0.02 * h, accent)
        _rect(draw, cx - 0.07 * w, base - 0.32 * h, cx + 0.07 * w, base, dark)
        if part.ornament:  # rose window
            r = 0.09 * w
            _ellipse(draw, cx - r, cornice + 0.05 * h, cx + r, cornice + 0.05 * h + 2 * r, accent)
    elif part.kind == "spire":
        shoulder = base - 0.3 * h
        _textured_rect(draw, (x0, shoulder, x1, base), colour, accent, texture, period)
        draw.polygon([(x0, shoulder), (cx, top), (x1, shoulder)], fill=accent)
        if part.ornament:
            _ellipse(draw, cx - 0.15 * w, top - 0.15 * w, cx + 0.15 * w, top + 0.15 * w, colour)
    elif part.kind == "colonnade":
        roof_h, beam_h, step_h = 0.18 * h, 0.12 * h, 0.06 * h
        beam = top + roof_h
        _rect(draw, x0, beam + beam_h, x1, base - step_h, dark)
        if part.top in ("roof", "spire", "dome"):
            draw.polygon([(x0, beam), (cx, top), (x1, beam)], fill=accent)
        _textured_rect(draw, (x0, beam, x1, beam + beam_h), accent, colour, texture, period)
        n = min(9, max(4, round(part.width / 0.08)))
        for k in range(n):
            xc = x0 + (k + 0.5) * w / n
            _rect(draw, xc - w / (4 * n), beam + beam_h, xc + w / (4 * n), base - step_h, colour)
        _rect(draw, x0 - 0.03 * w, base - step_h, x1 + 0.03 * w, base, accent)
    else:  # pyramid
        draw.polygon([(x0, base), (cx, top), (x1, base)], fill=colour)
        if texture != "plain":
            for y in np.arange(top + period, base, max(2.0, period)):
                half_width = 0.5 * w * (y - top) / h
                draw.line((cx - half_width, y, cx + half_width, y), fill=accent)
        if part.ornament:
            draw.polygon([(cx - 0.06 * w, base), (cx, base - 0.14 * h), (cx + 0.06 * w, base)], fill=dark)


class _Placed(NamedTuple):
    part: _Part
    cx: float  # fraction of the canvas
    scale: float
    shade: float = 1.0
    side: bool = False


def _fit(placed: list[_Placed], max_height: float, max_width: float) -> list[_Placed]:
    """Scale and recentre a composition so it fits above the base line."""
    left = min(p.cx - p.part.width * p.scale / 2 for p in placed)
    right = max(p.cx + p.part.width * p.scale / 2 for p in placed)
    tallest = max(p.part.height * p.scale for p in placed)
    g = min(1.0, max_height / tallest, max_width / (right - left))
    mid = (left + right) / 2
    return [p._replace(cx=0.5 + (p.cx - mid) * g, scale=p.scale * g) for p in placed]


def _draw_composition(draw: ImageDraw.ImageDraw, placed: list[_Placed], size: int, base: float) -> None:
    for p in placed:
        _draw_part(draw, p.part, p.cx * size, base, p.scale, size, p.shade, p.side)


def _front_layout(blueprint: _Blueprint, rng: np.random.Generator) -> list[_Placed]:
    main, others = blueprint.parts[0], blueprint.parts[1:]
    placed = []
    tall = [p for p in others if p.kind in ("dome", "spire", "tower", "pyramid")]
    if tall and rng.random() < 0.7:  # something rising behind the main part
        behind = tall[int(rng.integers(len(tall)))]
        placed.append(_Placed(behind, 0.5, min(1.6, max(1.0, 1.25 * main.height / behind.height))))
    flank = others[int(rng.integers(len(others)))]
    flank_scale = float(rng.uniform(0.5, 0.8))
    offset = main.width / 2 + flank.width * flank_scale * 0.35
    placed += [_Placed(flank, 0.5 - offset, flank_scale), _Placed(flank, 0.5 + offset, flank_scale)]
    placed.append(_Placed(main, 0.5, 1.0))
    return _fit(placed, 0.8, 0.96)


def _compose_front(draw, blueprint: _Blueprint, rng: np.random.Generator, size: int) -> None:
    _draw_composition(draw, _front_layout(blueprint, rng), size, _BASE_LINE * size)


def _compose_side(draw, blueprint: _Blueprint, rng: np.random.Generator, size: int) -> None:
    parts = blueprint.parts
    count = int(rng.integers(3, min(5, len(parts)) + 1))
    order = [int(i) for i in rng.permutation(len(parts))[:count]]
    placed, x, scale = [], 0.0, 1.0
    for index in order:
        part = parts[index]
        placed.append(_Placed(part, x + part.width * scale / 2, scale, shade=0.8, side=True))
        x += part.width * scale * 0.8
        scale *= 0.82
    main = parts[0]
    wall = _Part("facade", x, 0.2, main.accent, main.colour, main.side_texture, "hstripes",
                 main.period, "flat", False)
    placed.insert(0, _Placed(wall, x / 2, 1.0, shade=0.9, side=False))
    _draw_composition(draw, _fit(placed, 0.8, 0.98), size, _BASE_LINE * size)


def _compose_detail(draw, blueprint: _Blueprint, rng: np.random.Generator, size: int) -> None:
    """A close-up: the front composition zoomed in on the body of one of its parts."""
    front_seed = next((v.layout_seed for v in blueprint.views if v.framing == "front"), None)
    layout = _front_layout(blueprint, rng if front_seed is None else np.random.default_rng(front_seed))
    textured = [p for p in layout if p.part.texture != "plain"] or layout
    focus = textured[int(rng.integers(len(textured)))]
    zoom = float(rng.uniform(2.2, 3.2))
    focus_x = focus.cx + float(rng.uniform(-0.25, 0.25)) * focus.part.width * focus.scale
    focus_y = _BASE_LINE - float(rng.uniform(0.3, 0.6)) * focus.part.height * focus.scale
    zoomed = [p._replace(cx=0.5 + (p.cx - focus_x) * zoom, scale=p.scale * zoom) for p in layout]
    _draw_composition(draw, zoomed, size, (0.5 + (_BASE_LINE - focus_y) * zoom) * size)


def _compose_distant(draw, blueprint: _Blueprint, rng: np.random.Generator, size: int) -> None:
    base = _BASE_LINE * size
    haze = _hsv(rng.random(), rng.uniform(0.02, 0.15), rng.uniform(0.45, 0.75))
    x = -0.05
    while x < 1.05:  # the surrounding city skyline
        w, h = rng.uniform(0.06, 0.16), rng.uniform(0.06, 0.28)
        block = _jitter(rng, haze, 18)
        _textured_rect(draw, (x * size, base - h * size, (x + w) * size, base), block, _shade(block, 0.75),
                       "windows" if rng.random() < 0.6 else "plain", 0.035 * size)
        x += w + rng.uniform(-0.02, 0.03)
    count = min(len(blueprint.parts), int(rng.integers(2, 4)))
    others = rng.choice(np.arange(1, len(blueprint.parts)), count - 1, replace=False)
    group = [blueprint.parts[0]] + [blueprint.parts[int(i)] for i in others]
    placed, x = [], 0.0
    for part in group:
        placed.append(_Placed(part, x + part.width / 2, 1.0))
        x += part.width * 0.85
    placed = _fit(placed, float(rng.uniform(0.38, 0.5)), 0.5)
    shift = float(rng.uniform(-0.18, 0.18))
    _draw_composition(draw, [p._replace(cx=p.cx + shift) for p in placed], size, base)


def _compose_interior(draw, blueprint: _Blueprint, rng: np.random.Generator, size: int) -> None:
    palette, parts = blueprint.palette, blueprint.parts
    s = size
    wall, floor_a, floor_b, ceiling = (palette[int(i)] for i in rng.permutation(len(palette))[:4])
    ceiling = _shade(ceiling, 0.55)
    vx, vy = rng.uniform(0.4, 0.6) * s, rng.uniform(0.4, 0.52) * s
    bx0, by0, bx1, by1 = vx - 0.24 * s, vy - 0.26 * s, vx + 0.24 * s, vy + 0.2 * s
    draw.polygon([(0, 0), (s, 0), (bx1, by0), (bx0, by0)], fill=ceiling)
    draw.polygon([(0, 0), (bx0, by0), (bx0, by1), (0, s)], fill=_shade(wall, 0.8))
    draw.polygon([(s, 0), (bx1, by0), (bx1, by1), (s, s)], fill=_shade(wall, 0.68))
    draw.polygon([(0, s), (s, s), (bx1, by1), (bx0, by1)], fill=floor_a)
    for k in range(1, 7):  # floor tiles in perspective
        t = (k / 7) ** 2
        y = by1 + (s - by1) * t
        draw.line((bx0 + (0 - bx0) * t, y, bx1 + (s - bx1) * t, y), fill=floor_b, width=1)
    for k in range(-4, 5):
        draw.line((vx + k * 0.06 * s, by1, vx + k * 0.3 * s, s), fill=floor_b, width=1)
    source = parts[int(rng.integers(len(parts)))]
    _textured_rect(draw, (bx0, by0, bx1, by1), wall, source.accent, source.side_texture, source.period * s * 0.7)
    feature = rng.choice(("window", "altar", "rose"))
    if feature == "window":  # tall stained-glass window on the back wall
        ww = 0.16 * s
        stripes = max(3, int(rng.integers(3, 7)))
        for k in range(stripes):
            colour = palette[int(rng.integers(len(palette)))]
            left = vx - ww / 2 + k * ww / stripes
            _rect(draw, left, by0 + 0.1 * s, left + ww / stripes, by1 - 0.06 * s, colour)
        draw.pieslice((int(vx - ww / 2), int(by0 + 0.02 * s), int(vx + ww / 2), int(by0 + 0.18 * s)), 180, 360,
                      fill=palette[int(rng.integers(len(palette)))])
    elif feature == "altar":
        _rect(draw, vx - 0.12 * s, by1 - 0.12 * s, vx + 0.12 * s, by1, source.accent)
        gold = _mix(source.colour, (230, 190, 60), 0.6)
        _rect(draw, vx - 0.05 * s, by0 + 0.04 * s, vx + 0.05 * s, by1 - 0.12 * s, gold)
    else:
        r = 0.12 * s
        _ellipse(draw, vx - r, vy - r, vx + r, vy + r, source.accent)
        for k in range(8):
            a = k * math.pi / 4
            draw.line((vx, vy, vx + r * math.cos(a), vy + r * math.sin(a)), fill=source.colour, width=1)
    column = next((p for p in parts if p.kind in ("colonnade", "tower")), parts[0])
    pairs = int(rng.integers(2, 5))
    for k in reversed(range(pairs)):  # far columns first
        t = (k + 0.5) / pairs * 0.85
        width = (0.12 + (0.03 - 0.12) * t) * s
        top_y, bottom_y = by0 * t, s + (by1 - s) * t
        for x_edge, x_back in ((0.03 * s, bx0), (0.97 * s, bx1)):
            x = x_edge + (x_back - x_edge) * t
            _textured_rect(draw, (x - width / 2, top_y, x + width / 2, bottom_y), column.colour, column.accent,
                           "vstripes" if column.texture == "plain" else column.texture, width / 3)
    for _ in range(int(rng.integers(0, 4))):  # lamps
        lx, ly = rng.uniform(0.2, 0.8) * s, rng.uniform(0.08, 0.3) * s
        draw.line((lx, 0, lx, ly), fill=(40, 40, 40))
        _ellipse(draw, lx - 0.025 * s, ly, lx + 0.025 * s, ly + 0.04 * s, (255, 230, 150))


_COMPOSERS = {
    "front": _compose_front, "side": _compose_side, "interior": _compose_interior,
    "detail": _compose_detail, "distant": _compose_distant,
}


def _perspective_coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> tuple[float, ...]:
    """PIL PERSPECTIVE data mapping each output point in ``dst`` to the input point in ``src``."""
    rows, values = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values += [u, v]
    solution = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(values, dtype=np.float64))
    return tuple(float(c) for c in solution)


def _render_view(blueprint: _Blueprint, view: _View, size: int) -> Image.Image:
    """The structure of one view as a premultiplied RGBA layer (transparent where sky shows)."""
    rng = np.random.default_rng(view.layout_seed)
    opaque = view.framing == "interior"
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 255) if opaque else _TRANSPARENT)
    _COMPOSERS[view.framing](ImageDraw.Draw(layer), blueprint, rng, size)
    # Premultiplied, so that resampling does not bleed the black of transparent pixels into edges.
    layer = layer.convert("RGBa")
    if view.framing == "side":
        # The row of parts recedes: the far end shrinks towards the base line.
        base = _BASE_LINE * size
        far = float(rng.uniform(0.55, 0.75))
        near_left = rng.random() < 0.5
        left, right = (1.0, far) if near_left else (far, 1.0)
        dst = [(0, base - base * left), (size, base - base * right), (size, base), (0, base)]
        src = [(0, 0), (size, 0), (size, base), (0, base)]
        layer = layer.transform((size, size), Image.Transform.PERSPECTIVE, _perspective_coeffs(dst, src),
                                resample=Image.Resampling.BILINEAR)
    return layer


# ---------------------------------------------------------------------------------------------
# Backgrounds, occluders and everyday scenes

TIMES_OF_DAY = ("day", "sunset", "night", "overcast")
# How often each non-day light occurs at difficulty 1; a clean world (difficulty 0) is all daylight.
_OTHER_LIGHT_P = {"sunset": 0.17, "night": 0.13, "overcast": 0.2}
_SKY = {
    "day": ((60, 120, 205), (170, 205, 240)),
    "sunset": ((55, 55, 120), (250, 160, 90)),
    "night": ((8, 10, 30), (40, 45, 85)),
    "overcast": ((140, 145, 155), (200, 202, 206)),
}
# Per-channel gain of the light at each time of day (applied with strength ~ difficulty).
_CAST = {
    "day": (1.0, 1.0, 1.0),
    "sunset": (1.15, 0.88, 0.7),
    "night": (0.45, 0.5, 0.8),
    "overcast": (0.92, 0.95, 1.0),
}
GROUNDS = ("grass", "pavement", "sand", "water", "snow", "plaza")
_GROUND_COLOURS = {
    "grass": (80, 130, 60), "pavement": (125, 125, 130), "sand": (205, 185, 140),
    "water": (60, 100, 150), "snow": (230, 235, 245), "plaza": (170, 120, 95),
}
_SKIN = ((255, 220, 190), (235, 190, 150), (200, 150, 110), (160, 110, 75), (110, 75, 50), (80, 55, 40))


def _time_of_day(rng: np.random.Generator, difficulty: float) -> str:
    other = {light: p * min(difficulty, 1.0) for light, p in _OTHER_LIGHT_P.items()}
    p = [1.0 - sum(other.values())] + [other[light] for light in TIMES_OF_DAY[1:]]
    return str(rng.choice(TIMES_OF_DAY, p=p))


def _sky(rng: np.random.Generator, size: int, time_of_day: str) -> Image.Image:
    top, bottom = (_jitter(rng, c, 12) for c in _SKY[time_of_day])
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    column = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    canvas = Image.fromarray(np.ascontiguousarray(np.broadcast_to(column, (size, size, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if time_of_day == "night":
        for _ in range(int(rng.integers(0, 12))):
            x, y = rng.uniform(0, size), rng.uniform(0, 0.6 * size)
            draw.point((x, y), fill=(230, 230, 200))
    else:
        cloud = _mix(bottom, (255, 255, 255), 0.6 if time_of_day != "overcast" else 0.3)
        for _ in range(int(rng.integers(0, 5))):
            x, y, w = rng.uniform(-0.1, 1.0) * size, rng.uniform(0.02, 0.45) * size, rng.uniform(0.1, 0.35) * size
            _ellipse(draw, x, y, x + w, y + 0.3 * w, cloud)
    return canvas


def _ground(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, horizon: float, kind: str) -> None:
    colour = _jitter(rng, _GROUND_COLOURS[kind], 10)
    _rect(draw, 0, horizon, size, size, colour)
    line = _shade(colour, 0.8 if kind != "water" else 1.35)
    if kind in ("pavement", "plaza"):
        vx = rng.uniform(0.2, 0.8) * size
        for k in range(1, 6):
            y = horizon + (size - horizon) * (k / 6) ** 1.7
            draw.line((0, y, size, y), fill=line)
        for k in range(-6, 7):
            draw.line((vx + k * 0.05 * size, horizon, vx + k * 0.35 * size, size), fill=line)
    elif kind in ("grass", "sand"):
        for _ in range(int(rng.integers(10, 30))):
            x, y = rng.uniform(0, size), rng.uniform(horizon, size)
            draw.line((x, y, x + rng.uniform(-1, 1), y - rng.uniform(1, 3)), fill=line)
    elif kind == "water":
        for _ in range(int(rng.integers(6, 16))):
            x, y, w = rng.uniform(0, size), rng.uniform(horizon, size), rng.uniform(3, 0.2 * size)
            draw.line((x, y, x + w, y), fill=line)


def _far_skyline(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, horizon: float,
                 sky_colour: RGB) -> None:
    haze = _mix(sky_colour, (110, 110, 120), 0.5)
    x = rng.uniform(-0.1, 0.0) * size
    while x < size:
        w, h = rng.uniform(0.04, 0.12) * size, rng.uniform(0.03, 0.14) * size
        _rect(draw, x, horizon - h, x + w, horizon, _jitter(rng, haze, 6))
        x += w


def _exterior_background(rng: np.random.Generator, size: int, time_of_day: str) -> tuple[Image.Image, float]:
    canvas = _sky(rng, size, time_of_day)
    draw = ImageDraw.Draw(canvas)
    horizon = float(rng.uniform(0.7, 0.88)) * size
    if rng.random() < 0.4:
        _far_skyline(draw, rng, size, horizon, canvas.getpixel((0, int(horizon) - 1)))
    _ground(draw, rng, size, horizon, str(rng.choice(GROUNDS)))
    return canvas, horizon


def _person(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    skin = _SKIN[int(rng.integers(len(_SKIN)))]
    shirt, trousers = _random_colour(rng), _random_colour(rng, (0.1, 0.7), (0.15, 0.6))
    head = 0.11 * height
    shoulders = 0.14 * height
    _rect(draw, x - 0.09 * height, base - 0.45 * height, x - 0.01 * height, base, trousers)
    _rect(draw, x + 0.01 * height, base - 0.45 * height, x + 0.09 * height, base, trousers)
    torso = (int(x - shoulders), int(base - 0.8 * height), int(x + shoulders), int(base - 0.42 * height))
    draw.rounded_rectangle(torso, radius=max(1, int(0.05 * height)), fill=shirt)
    _ellipse(draw, x - head * 0.8, base - height, x + head * 0.8, base - height + 2 * head, skin)
    if rng.random() < 0.7:  # hair
        hair = _hsv(0.08, rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.5))
        draw.pieslice((int(x - head * 0.85), int(base - height - 0.1 * head), int(x + head * 0.85),
                       int(base - height + 1.4 * head)), 180, 360, fill=hair)


def _tree(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    _rect(draw, x - 0.04 * height, base - 0.45 * height, x + 0.04 * height, base, (90, 65, 40))
    green = _hsv(rng.uniform(0.2, 0.38), rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.6))
    if rng.random() < 0.5:  # conifer
        for k in range(3):
            y = base - (0.3 + 0.22 * k) * height
            half = (0.3 - 0.07 * k) * height
            draw.polygon([(x - half, y + 0.1 * height), (x, y - 0.3 * height), (x + half, y + 0.1 * height)],
                         fill=_shade(green, 1 + 0.1 * k))
    else:
        for _ in range(3):
            cx, cy = x + rng.uniform(-0.15, 0.15) * height, base - rng.uniform(0.6, 0.8) * height
            r = rng.uniform(0.18, 0.3) * height
            _ellipse(draw, cx - r, cy - r, cx + r, cy + r, _jitter(rng, green, 12))


def _car(draw: ImageDraw.ImageDraw, rng: np.random.Generator, x: float, base: float, height: float) -> None:
    body = _random_colour(rng, (0.0, 0.8), (0.2, 0.95))
    length = 2.6 * height
    hull = (int(x - length / 2), int(base - 0.7 * height), int(x + length / 2), int(base - 0.15 * height))
    draw.rounded_rectangle(hull, radius=max(1, int(0.15 * height)), fill=body)
    draw.polygon([(x - 0.3 * length, base - 0.7 * height), (x - 0.18 * length, base - height),
                  (x + 0.2 * length, base - height), (x + 0.32 * length, base - 0.7 * height)], fill=body)
    _rect(draw, x - 0.16 * length, base - 0.93 * height, x + 0.18 * length, base - 0.72 * height, (150, 185, 210))
    for wx in (-0.3, 0.3):
        r = 0.2 * height
        _ellipse(draw, x + wx * length - r, base - 2 * r, x + wx * length + r, base, (25, 25, 25))


_OCCLUDERS = {"person": _person, "tree": _tree, "car": _car}
# Height range of each occluder at the bottom of the frame, as a fraction of the canvas.
_OCCLUDER_HEIGHTS = {"person": (0.3, 0.75), "tree": (0.4, 0.9), "car": (0.12, 0.22)}


def _occluders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, horizon: float,
               kinds: tuple[str, ...], count: int) -> None:
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        base = float(rng.uniform(max(horizon, 0.6 * size), 1.08 * size))
        # Nearer things (lower in the frame) are bigger.
        nearness = (base - 0.5 * size) / (0.58 * size)
        height = size * nearness * rng.uniform(*_OCCLUDER_HEIGHTS[kind])
        _OCCLUDERS[kind](draw, rng, float(rng.uniform(-0.05, 1.05)) * size, base, float(height))


def _occluder_count(rng: np.random.Generator, difficulty: float) -> int:
    return min(6, int(rng.poisson(1.3 * difficulty)))


# A scene function returns its canvas, the line occluders stand behind, and the occluders that fit it.
_Scene = tuple[Image.Image, float, tuple[str, ...]]


def _scene_indoor_room(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(canvas)
    wall = _hsv(rng.random(), rng.uniform(0.03, 0.4), rng.uniform(0.5, 0.95))
    floor_y = float(rng.uniform(0.6, 0.8)) * s
    _textured_rect(draw, (0, 0, s, floor_y), wall, _shade(wall, rng.uniform(0.8, 0.93)),
                   str(rng.choice(("plain", "vstripes", "checker", "hstripes"))), rng.uniform(0.04, 0.12) * s)
    floor = _hsv(rng.uniform(0.05, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.25, 0.7))
    _textured_rect(draw, (0, floor_y, s, s), floor, _shade(floor, 0.8),
                   str(rng.choice(("hstripes", "plain", "checker"))), rng.uniform(0.03, 0.08) * s)
    if rng.random() < 0.6:  # window
        x, y = rng.uniform(0.05, 0.6) * s, rng.uniform(0.08, 0.2) * s
        w, h = rng.uniform(0.2, 0.35) * s, rng.uniform(0.2, 0.35) * s
        _rect(draw, x - 2, y - 2, x + w + 2, y + h + 2, (235, 235, 230))
        _rect(draw, x, y, x + w, y + h, _SKY[time_of_day][1])
        _rect(draw, x + w / 2 - 1, y, x + w / 2 + 1, y + h, (235, 235, 230))
    if rng.random() < 0.5:  # picture
        x, y, w = rng.uniform(0.1, 0.7) * s, rng.uniform(0.1, 0.3) * s, rng.uniform(0.12, 0.25) * s
        _rect(draw, x, y, x + w, y + 0.75 * w, (90, 60, 30))
        for _ in range(3):
            px, py = x + rng.uniform(0.1, 0.6) * w, y + rng.uniform(0.1, 0.4) * w
            _rect(draw, px, py, px + 0.3 * w, py + 0.25 * w, _random_colour(rng))
    if rng.random() < 0.5:  # shelf with books
        x, y, w = rng.uniform(0.0, 0.6) * s, rng.uniform(0.25, 0.45) * s, rng.uniform(0.25, 0.4) * s
        _rect(draw, x, y, x + w, y + 0.04 * s, (110, 80, 50))
        bx = x
        while bx < x + w - 2:
            bw = rng.uniform(0.015, 0.035) * s
            _rect(draw, bx, y - rng.uniform(0.06, 0.1) * s, bx + bw, y, _random_colour(rng))
            bx += bw + 1
    if rng.random() < 0.6:  # sofa
        x, w = rng.uniform(-0.1, 0.6) * s, rng.uniform(0.35, 0.6) * s
        colour = _random_colour(rng, (0.2, 0.7), (0.25, 0.8))
        back = (int(x), int(floor_y - 0.22 * s), int(x + w), int(floor_y + 0.08 * s))
        seat = (int(x + 0.05 * w), int(floor_y - 0.1 * s), int(x + 0.95 * w), int(floor_y + 0.04 * s))
        draw.rounded_rectangle(back, radius=4, fill=colour)
        draw.rounded_rectangle(seat, radius=3, fill=_shade(colour, 1.15))
    if rng.random() < 0.5:  # table
        x, w = rng.uniform(0.1, 0.7) * s, rng.uniform(0.2, 0.35) * s
        wood = _hsv(0.08, rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6))
        _rect(draw, x, floor_y - 0.05 * s, x + w, floor_y - 0.02 * s, wood)
        for lx in (x + 2, x + w - 4):
            _rect(draw, lx, floor_y - 0.02 * s, lx + 2, floor_y + 0.12 * s, wood)
    if rng.random() < 0.4:  # floor lamp
        x = rng.uniform(0.1, 0.9) * s
        _rect(draw, x - 1, floor_y - 0.35 * s, x + 1, floor_y + 0.05 * s, (50, 50, 50))
        draw.polygon([(x - 0.07 * s, floor_y - 0.3 * s), (x - 0.04 * s, floor_y - 0.42 * s),
                      (x + 0.04 * s, floor_y - 0.42 * s), (x + 0.07 * s, floor_y - 0.3 * s)], fill=(245, 225, 170))
    return canvas, floor_y, ("person",)


def _scene_food_table(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(canvas)
    if rng.random() < 0.5:
        table = _hsv(rng.uniform(0.05, 0.11), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.75))
        _textured_rect(draw, (0, 0, s, s), table, _shade(table, 0.85), "vstripes" if rng.random() < 0.5 else "hstripes",
                       rng.uniform(0.05, 0.15) * s)
    else:
        cloth = _random_colour(rng, (0.1, 0.7), (0.5, 0.95))
        _textured_rect(draw, (0, 0, s, s), cloth, (245, 245, 245), str(rng.choice(("checker", "plain", "hstripes"))),
                       rng.uniform(0.08, 0.16) * s)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.15, 0.85) * s, rng.uniform(0.14, 0.3) * s
        plate = _jitter(rng, (238, 238, 232), 10)
        _ellipse(draw, cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r, _shade(plate, 0.85))
        _ellipse(draw, cx - 0.85 * r, cy - 0.68 * r, cx + 0.85 * r, cy + 0.68 * r, plate)
        for _ in range(int(rng.integers(3, 10))):
            fx, fy = cx + rng.uniform(-0.5, 0.5) * r, cy + rng.uniform(-0.4, 0.4) * r
            fr = rng.uniform(0.08, 0.3) * r
            food = _hsv(rng.choice((0.0, 0.05, 0.1, 0.15, 0.3)) + rng.normal(0, 0.02), rng.uniform(0.5, 0.95),
                        rng.uniform(0.3, 0.9))
            _ellipse(draw, fx - fr, fy - 0.7 * fr, fx + fr, fy + 0.7 * fr, food)
    if rng.random() < 0.6:  # cup
        cx, cy, r = rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.9) * s, rng.uniform(0.06, 0.1) * s
        cup = _random_colour(rng, (0.0, 0.5), (0.6, 1.0))
        handle = (int(cx + 0.6 * r), int(cy - 0.4 * r), int(cx + 1.5 * r), int(cy + 0.4 * r))
        draw.arc(handle, 270, 90, fill=cup, width=2)
        _ellipse(draw, cx - r, cy - r, cx + r, cy + r, cup)
        _ellipse(draw, cx - 0.75 * r, cy - 0.75 * r, cx + 0.75 * r, cy + 0.75 * r, (70, 40, 20))
    for _ in range(int(rng.integers(0, 3))):  # cutlery
        x, y = rng.uniform(0.05, 0.95) * s, rng.uniform(0.1, 0.6) * s
        _rect(draw, x, y, x + 0.015 * s, y + rng.uniform(0.2, 0.3) * s, (185, 185, 190))
    return canvas, 0.0, ()


def _scene_nature(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = _sky(rng, s, time_of_day)
    draw = ImageDraw.Draw(canvas)
    horizon = float(rng.uniform(0.5, 0.78)) * s
    if rng.random() < 0.4:  # sun or moon
        r = rng.uniform(0.03, 0.07) * s
        x, y = rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.4) * s
        _ellipse(draw, x - r, y - r, x + r, y + r, (255, 240, 190) if time_of_day != "night" else (230, 230, 210))
    far = _mix(_SKY[time_of_day][1], (60, 70, 80), 0.5)
    for layer in range(int(rng.integers(1, 4))):
        colour = _mix(far, _hsv(rng.uniform(0.25, 0.4), 0.5, 0.35), 0.35 * layer)
        points, x = [(0.0, horizon)], 0.0
        while x < s:
            x += rng.uniform(0.08, 0.25) * s
            points.append((x, horizon - rng.uniform(0.05, 0.35 - 0.07 * layer) * s))
        points.append((float(s), horizon))
        draw.polygon(points, fill=colour)
    _ground(draw, rng, s, horizon, str(rng.choice(("grass", "grass", "sand", "water", "snow"))))
    for _ in range(int(rng.integers(0, 7))):
        base = rng.uniform(horizon, 1.05 * s)
        _tree(draw, rng, rng.uniform(0, s), base, (0.15 + 0.6 * (base - horizon) / (s - horizon + 1)) * s)
    for _ in range(int(rng.integers(0, 4))):  # rocks
        x, y, r = rng.uniform(0, s), rng.uniform(horizon, s), rng.uniform(0.02, 0.08) * s
        _ellipse(draw, x - r, y - 0.6 * r, x + r, y + 0.4 * r, _jitter(rng, (120, 118, 112), 15))
    return canvas, horizon, ("person", "tree")


def _scene_street(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = _sky(rng, s, time_of_day)
    draw = ImageDraw.Draw(canvas)
    horizon = float(rng.uniform(0.55, 0.72)) * s
    x = rng.uniform(-0.1, 0.0) * s
    while x < s:  # ordinary houses and shops: plain boxes, no landmark parts
        w, h = rng.uniform(0.15, 0.35) * s, rng.uniform(0.15, 0.45) * s
        colour = _hsv(rng.random(), rng.uniform(0.05, 0.45), rng.uniform(0.45, 0.9))
        _textured_rect(draw, (x, horizon - h, x + w, horizon + 0.05 * s), colour, _shade(colour, 0.6),
                       "windows" if rng.random() < 0.7 else "plain", rng.uniform(0.05, 0.09) * s)
        if rng.random() < 0.5:  # shop sign
            _rect(draw, x + 0.1 * w, horizon - 0.08 * s, x + 0.9 * w, horizon - 0.04 * s, _random_colour(rng))
        x += w
    _rect(draw, 0, horizon + 0.05 * s, s, s, (95, 95, 100))
    _rect(draw, 0, horizon + 0.05 * s, s, horizon + 0.1 * s, (160, 155, 150))
    vx = rng.uniform(0.3, 0.7) * s
    for k in range(6):  # lane markings
        t0, t1 = (k / 6) ** 1.6, ((k + 0.5) / 6) ** 1.6
        y0, y1 = horizon + 0.1 * s + (s - horizon) * t0 * 0.9, horizon + 0.1 * s + (s - horizon) * t1 * 0.9
        draw.line((vx + (0.5 * s - vx) * t0, y0, vx + (0.5 * s - vx) * t1, y1), fill=(230, 230, 220),
                  width=max(1, int(3 * t1)))
    for _ in range(int(rng.integers(0, 3))):  # poles
        px = rng.uniform(0, s)
        _rect(draw, px, horizon - 0.3 * s, px + 1, horizon + 0.1 * s, (60, 60, 60))
    return canvas, horizon + 0.08 * s, ("person", "car", "car", "tree")


def _scene_people_closeup(rng: np.random.Generator, size: int, time_of_day: str) -> _Scene:
    s = size
    canvas = Image.new("RGB", (s, s), _random_colour(rng, (0.05, 0.5), (0.3, 0.9)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):  # out-of-focus background
        x, y, w = rng.uniform(-0.2, 1.0) * s, rng.uniform(-0.2, 1.0) * s, rng.uniform(0.2, 0.6) * s
        _rect(draw, x, y, x + w, y + w, _random_colour(rng, (0.05, 0.6), (0.3, 0.95)))
    canvas = canvas.filter(ImageFilter.BoxBlur(3))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, r = rng.uniform(0.15, 0.85) * s, rng.uniform(0.3, 0.6) * s, rng.uniform(0.1, 0.22) * s
        skin = _SKIN[int(rng.integers(len(_SKIN)))]
        _ellipse(draw, cx - 2.3 * r, cy + 1.1 * r, cx + 2.3 * r, cy + 4.5 * r, _random_colour(rng))
        _rect(draw, cx - 0.35 * r, cy + 0.6 * r, cx + 0.35 * r, cy + 1.4 * r, _shade(skin, 0.9))
        hair = _hsv(0.08, rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.6))
        if rng.random() < 0.5:  # long hair behind the face
            _rect(draw, cx - 0.95 * r, cy - 0.6 * r, cx + 0.95 * r, cy + 1.3 * r, hair)
        _ellipse(draw, cx - 0.8 * r, cy - r, cx + 0.8 * r, cy + r, skin)
        scalp = (int(cx - 0.85 * r), int(cy - 1.12 * r), int(cx + 0.85 * r), int(cy + 0.5 * r))
        draw.pieslice(scalp, 180, 360, fill=hair)
        for ex in (-0.32, 0.32):
            _ellipse(draw, cx + ex * r - 0.09 * r, cy - 0.05 * r, cx + ex * r + 0.09 * r, cy + 0.1 * r, (35, 30, 30))
        if rng.random() < 0.3:  # sunglasses
            _rect(draw, cx - 0.55 * r, cy - 0.1 * r, cx + 0.55 * r, cy + 0.15 * r, (20, 20, 25))
        mouth = (int(cx - 0.3 * r), int(cy + 0.2 * r), int(cx + 0.3 * r), int(cy + 0.6 * r))
        draw.arc(mouth, 20, 160, fill=(120, 50, 50), width=1)
    return canvas, 0.0, ()


_SCENES = {
    "indoor_room": _scene_indoor_room,
    "food_table": _scene_food_table,
    "nature": _scene_nature,
    "street": _scene_street,
    "people_closeup": _scene_people_closeup,
}
HARD_NEGATIVE_KIND = "generic_building"
NONLANDMARK_KINDS = tuple(_SCENES) + (HARD_NEGATIVE_KIND,)


# ---------------------------------------------------------------------------------------------
# The "camera": placement of the structure, warp and crop, light, optics, sensor and JPEG.

def _place_on_horizon(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator, horizon: float,
                      difficulty: float) -> None:
    s = canvas.width
    d = min(difficulty, 2.0)
    scale = float(rng.uniform(1 - 0.22 * d, 1 + 0.08 * d))
    centre_x = s * (0.5 + float(rng.uniform(-0.12, 0.12)) * d)
    base_y = horizon + s * float(rng.uniform(0.0, 0.05))
    # AFFINE data maps each output pixel to the layer pixel it shows.
    data = (1 / scale, 0.0, s / 2 - centre_x / scale, 0.0, 1 / scale, _BASE_LINE * s - base_y / scale)
    placed = layer.transform((s, s), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR).convert("RGBA")
    canvas.paste(placed, (0, 0), placed)


def _place_filling(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator, difficulty: float) -> None:
    """Zoom and shift a full-frame layer (interior, close-up) without exposing its edges."""
    s = canvas.width
    scale = 1 + float(rng.uniform(0.0, 0.2)) * min(difficulty, 2.0)
    tx, ty = (float(rng.uniform(s - scale * s, 0.0)) for _ in range(2))
    data = (1 / scale, 0.0, -tx / scale, 0.0, 1 / scale, -ty / scale)
    placed = layer.transform((s, s), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR).convert("RGBA")
    canvas.paste(placed, (0, 0), placed)


_GRID_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRID_CACHE:
        axis = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        _GRID_CACHE[size] = (axis[None, :], axis[:, None])
    return _GRID_CACHE[size]


def _photograph(canvas: Image.Image, rng: np.random.Generator, time_of_day: str, difficulty: float,
                size: int) -> tuple[Image.Image, int]:
    """Camera nuisances on a finished scene: returns the photo and its JPEG quality."""
    s = canvas.width
    d = min(difficulty, 2.0)
    # Crop square, rotated and with jittered corners (a perspective warp), resized to ``size``.
    jitter = 0.05 * d * s
    angle = math.radians(float(rng.normal(0.0, 2.0 * d)))
    # A square of side a rotated by the angle spans a * (|cos| + |sin|): keep that inside the canvas.
    spread = abs(math.cos(angle)) + abs(math.sin(angle))
    side = (s - 2 * jitter) * float(rng.uniform(1 - 0.2 * min(d, 1.5), 1.0)) / spread
    extent = side * spread
    cx = float(rng.uniform(jitter + extent / 2, s - jitter - extent / 2))
    cy = float(rng.uniform(jitter + extent / 2, s - jitter - extent / 2))
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    src = []
    for ux, uy in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
        x, y = ux * side / 2, uy * side / 2
        src.append((cx + x * cos_a - y * sin_a + float(rng.uniform(-jitter, jitter)),
                    cy + x * sin_a + y * cos_a + float(rng.uniform(-jitter, jitter))))
    dst = [(0.0, 0.0), (float(size), 0.0), (float(size), float(size)), (0.0, float(size))]
    photo = canvas.transform((size, size), Image.Transform.PERSPECTIVE, _perspective_coeffs(dst, src),
                             resample=Image.Resampling.BILINEAR)
    if rng.random() < 0.35 * min(d, 1.0):  # defocus or motion
        photo = photo.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.5 + 0.7 * d))))

    pixels = np.asarray(photo, dtype=np.float32) * np.float32(1 / 255)
    strength = min(d, 1.5)
    gain = 1 + (np.asarray(_CAST[time_of_day], dtype=np.float32) - 1) * np.float32(strength)
    pixels = pixels * gain
    if time_of_day == "overcast":  # washed-out colours
        grey = 0.299 * pixels[..., 0] + 0.587 * pixels[..., 1] + 0.114 * pixels[..., 2]
        pixels += (grey[..., None] - pixels) * np.float32(0.5 * strength)
    xs, ys = _grid(size)
    theta = float(rng.uniform(0, 2 * math.pi))
    light = 1 + np.float32(rng.uniform(0.0, 0.4) * strength) * (math.cos(theta) * xs + math.sin(theta) * ys)
    pixels *= light[..., None]
    contrast = math.exp(float(rng.normal(0.0, 0.15 * strength)))
    brightness = math.exp(float(rng.normal(0.0, 0.15 * strength)))
    pixels = ((pixels - 0.5) * np.float32(contrast) + 0.5) * np.float32(brightness)
    sigma = float(rng.uniform(0.0, 0.045)) * d
    if sigma > 0:
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(sigma)
    photo = Image.fromarray(np.clip(pixels * 255 + 0.5, 0, 255).astype(np.uint8))
    quality = int(rng.integers(max(10, int(95 - 55 * min(d, 1.3))), 96))
    return photo, quality


# ---------------------------------------------------------------------------------------------
# Rendering one image

class _Task(NamedTuple):
    relpath: str
    stream: int
    index: int
    structure: int  # landmark index whose blueprint is shown; -1 for a non-landmark image
    view: int
    kind: str  # non-landmark kind; "" for landmark images


class _Renderer:
    """Renders tasks of one world; caches blueprints and view layers (pure functions of the config)."""

    def __init__(self, config: SynthConfig, root: Path):
        self.config, self.root = config, root
        self.canvas = int(round(config.image_size * 1.25))  # drawn larger, then cropped and resized
        self._blueprints: dict[int, _Blueprint] = {}
        self._layers: dict[tuple[int, int], Image.Image] = {}

    def _layer(self, structure: int, view: int) -> tuple[_View, Image.Image]:
        if structure not in self._blueprints:
            self._blueprints[structure] = _landmark_blueprint(self.config, structure)
        blueprint = self._blueprints[structure]
        if (structure, view) not in self._layers:
            self._layers[structure, view] = _render_view(blueprint, blueprint.views[view], self.canvas)
        return blueprint.views[view], self._layers[structure, view]

    def _structure_photo(self, view: _View, layer: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
        difficulty, s = self.config.difficulty, self.canvas
        time_of_day = _time_of_day(rng, difficulty)
        if view.framing == "interior":
            canvas, horizon, kinds = Image.new("RGB", (s, s)), 0.6 * s, ("person",)
            _place_filling(canvas, layer, rng, difficulty)
        else:
            canvas, horizon = _exterior_background(rng, s, time_of_day)
            kinds = ("person", "person", "tree", "car")
            if view.framing == "detail":
                _place_filling(canvas, layer, rng, difficulty)
            else:
                _place_on_horizon(canvas, layer, rng, horizon, difficulty)
        _occluders(ImageDraw.Draw(canvas), rng, s, horizon, kinds, _occluder_count(rng, difficulty))
        return _photograph(canvas, rng, time_of_day, difficulty, self.config.image_size)

    def _nonlandmark_photo(self, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
        if kind == HARD_NEGATIVE_KIND:
            # Same vocabulary and camera as a landmark, but a structure that exists only once.
            framing = str(rng.choice(FRAMINGS, p=(0.4, 0.2, 0.1, 0.15, 0.15)))
            blueprint = _make_blueprint(rng, (framing,))
            view = blueprint.views[0]
            return self._structure_photo(view, _render_view(blueprint, view, self.canvas), rng)
        time_of_day = _time_of_day(rng, self.config.difficulty)
        canvas, horizon, kinds = _SCENES[kind](rng, self.canvas, time_of_day)
        if kinds:
            count = _occluder_count(rng, self.config.difficulty)
            _occluders(ImageDraw.Draw(canvas), rng, self.canvas, horizon, kinds, count)
        return _photograph(canvas, rng, time_of_day, self.config.difficulty, self.config.image_size)

    def render(self, task: _Task) -> tuple[Image.Image, int]:
        rng = _rng(self.config.seed, task.stream, task.index)
        if task.structure >= 0:
            view, layer = self._layer(task.structure, task.view)
            return self._structure_photo(view, layer, rng)
        return self._nonlandmark_photo(task.kind, rng)

    def write(self, task: _Task) -> None:
        photo, quality = self.render(task)
        photo.save(self.root / task.relpath, "JPEG", quality=quality)


_worker_renderer: _Renderer | None = None


def _init_worker(config: SynthConfig, root: str) -> None:
    global _worker_renderer
    _worker_renderer = _Renderer(config, Path(root))


def _write_in_worker(task: _Task) -> None:
    _worker_renderer.write(task)


# ---------------------------------------------------------------------------------------------
# The plan: ids, names, places, noise, duplicates, views and kinds of every image.

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "st", "tr", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "m")


def _word(rng: np.random.Generator) -> str:
    syllables = int(rng.integers(2, 4))
    parts = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(syllables)]
    return ("".join(parts) + str(rng.choice(_CODAS))).capitalize()


def _unique_word(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        word = _word(rng)
        if word not in taken:
            taken.add(word)
            return word


@dataclass
class _Plan:
    landmarks: list[dict]
    db: list[dict]
    queries: list[dict]
    nonlandmarks: list[dict]
    distractors: list[dict]
    tasks: list[_Task]
    world: dict


def _nonlandmark_kind(rng: np.random.Generator, hard_negative_share: float) -> str:
    if rng.random() < hard_negative_share:
        return HARD_NEGATIVE_KIND
    return str(rng.choice(tuple(_SCENES)))


def _fmt(degrees: float) -> str:
    return f"{degrees:.6f}"


def _build_plan(config: SynthConfig) -> _Plan:
    n, seed = config.num_landmarks, config.seed
    rng = _rng(seed, _STREAM_PLAN)
    blueprints = [_landmark_blueprint(config, k) for k in range(n)]  # no pixels: cheap
    ids = [int(i) for i in rng.choice(np.arange(1000, 1000 + 10 * n), size=n, replace=False)]

    order = [int(i) for i in rng.permutation(n)]
    dup_count = config.duplicate_landmarks
    duplicate_of = dict(zip(order[:dup_count], order[dup_count:2 * dup_count]))
    structure_of = [duplicate_of.get(k, k) for k in range(n)]
    originals = [k for k in range(n) if k not in duplicate_of]

    names: set[str] = set()
    cities = []
    for _ in range(min(8, max(2, math.ceil(n / 15)))):
        while True:  # cities far apart, so a GPS radius never spans two of them
            lat, lon = float(rng.uniform(-45, 60)), float(rng.uniform(-170, 170))
            if all(abs(lat - c["lat"]) + abs(lon - c["lon"]) > 10 for c in cities):
                break
        cities.append({"name": _unique_word(rng, names), "lat": lat, "lon": lon})
    landmarks = []
    for k in range(n):
        if k in duplicate_of:
            continue
        city = cities[int(rng.integers(len(cities)))]
        landmarks.append({"k": k, "city": city["name"], "lat": city["lat"] + float(rng.normal(0, 0.02)),
                          "lon": city["lon"] + float(rng.normal(0, 0.03))})
    by_index = {row["k"]: row for row in landmarks}
    for dup, original in duplicate_of.items():  # the same place, a few metres apart
        source = by_index[original]
        by_index[dup] = {"k": dup, "city": source["city"], "lat": source["lat"] + float(rng.normal(0, 3e-4)),
                         "lon": source["lon"] + float(rng.normal(0, 3e-4))}
    landmark_rows = []
    for k in range(n):
        suffix = str(rng.choice(_NAME_SUFFIXES[blueprints[structure_of[k]].parts[0].kind]))
        place = by_index[k]
        landmark_rows.append({
            "landmark_id": ids[k], "name": f"{_unique_word(rng, names)} {suffix}",
            "lat": _fmt(place["lat"]), "lon": _fmt(place["lon"]),
            "num_views": len(blueprints[structure_of[k]].views),
            "duplicate_of": ids[duplicate_of[k]] if k in duplicate_of else "", "city": place["city"],
        })

    # Shooting-angle mix per landmark: some angles are photographed far more often than others.
    view_draws = []
    for k in range(n):
        views_rng = _rng(seed, _STREAM_VIEW_MIX, k)
        num_views = len(blueprints[structure_of[k]].views)
        weights = views_rng.dirichlet(np.full(num_views, 2.0))
        # The first images cover every angle once, so each angle is in the DB under its label.
        db_views = [i if i < num_views else int(views_rng.choice(num_views, p=weights))
                    for i in range(config.images_per_landmark)]
        query_views = [int(views_rng.choice(num_views, p=weights)) for _ in range(config.queries_per_landmark)]
        view_draws.append((db_views, query_views))

    total_db = n * config.images_per_landmark
    noisy = round(config.noise_fraction * total_db)
    noisy_nonlandmark = round(config.noise_nonlandmark_share * noisy)
    noisy_rows = [int(i) for i in rng.permutation(total_db)[:noisy]]
    nonlandmark_noise = set(noisy_rows[:noisy_nonlandmark])
    wrong_landmark_noise = set(noisy_rows[noisy_nonlandmark:])

    tasks: list[_Task] = []
    db_rows = []
    for k in range(n):
        lid, meta = ids[k], landmark_rows[k]
        for i in range(config.images_per_landmark):
            row_index = k * config.images_per_landmark + i
            relpath = f"images/db/{lid}/{i}.jpg"
            if row_index in nonlandmark_noise:
                kind = _nonlandmark_kind(rng, config.hard_negative_share)
                task = _Task(relpath, _STREAM_DB, row_index, -1, -1, kind)
                truth, view, is_noise = "", "", 1
            elif row_index in wrong_landmark_noise:
                candidates = [o for o in originals if o != structure_of[k]]
                other = candidates[int(rng.integers(len(candidates)))]
                other_view = int(rng.integers(len(blueprints[other].views)))
                task = _Task(relpath, _STREAM_DB, row_index, other, other_view, "")
                truth, view, is_noise = ids[other], other_view, 1
            else:
                structure, db_view = structure_of[k], view_draws[k][0][i]
                task = _Task(relpath, _STREAM_DB, row_index, structure, db_view, "")
                truth, view, is_noise = ids[structure], db_view, 0
            tasks.append(task)
            db_rows.append({"path": relpath, "landmark_id": lid, "lat": meta["lat"], "lon": meta["lon"],
                            "view": view, "is_noise": is_noise, "true_landmark_id": truth})

    query_rows = []
    for k in originals:
        lid, meta = ids[k], landmark_rows[k]
        for i, query_view in enumerate(view_draws[k][1]):
            relpath = f"images/queries/{lid}/{i}.jpg"
            tasks.append(_Task(relpath, _STREAM_QUERIES, k * config.queries_per_landmark + i, k, query_view, ""))
            query_rows.append({"path": relpath, "landmark_id": lid, "lat": meta["lat"], "lon": meta["lon"],
                               "view": query_view})

    split_rows = {}
    for split, stream, count in (("nonlandmarks", _STREAM_NONLANDMARKS, config.nonlandmark_pool),
                                 ("distractors", _STREAM_DISTRACTORS, config.distractors)):
        rows = []
        for i in range(count):
            kind = _nonlandmark_kind(rng, config.hard_negative_share)
            relpath = f"images/{split}/{i}.jpg"
            tasks.append(_Task(relpath, stream, i, -1, -1, kind))
            rows.append({"path": relpath, "kind": kind})
        split_rows[split] = rows

    by_id = lambda row: int(row["landmark_id"])  # noqa: E731 - stable sort keeps image order within an id
    landmark_rows.sort(key=by_id)
    db_rows.sort(key=by_id)
    query_rows.sort(key=by_id)
    world = {
        "format": FORMAT,
        "config": asdict(config),
        "seed": config.seed,
        "counts": {
            "landmarks": n, "distinct_structures": len(originals), "db": len(db_rows), "queries": len(query_rows),
            "nonlandmarks": len(split_rows["nonlandmarks"]), "distractors": len(split_rows["distractors"]),
        },
        "noise": {"total": noisy, "wrong_landmark": noisy - noisy_nonlandmark, "nonlandmark": noisy_nonlandmark},
        "duplicates": sorted(({"landmark_id": ids[d], "duplicate_of": ids[o]} for d, o in duplicate_of.items()),
                             key=lambda pair: pair["landmark_id"]),
        "kinds": {split: dict(sorted(Counter(r["kind"] for r in rows).items())) for split, rows in split_rows.items()},
        "cities": [{"name": c["name"], "lat": _fmt(c["lat"]), "lon": _fmt(c["lon"])} for c in cities],
        "queries_of_duplicates": "none: a duplicate id's structure is queried under its original id only",
    }
    return _Plan(landmark_rows, db_rows, query_rows, split_rows["nonlandmarks"], split_rows["distractors"],
                 tasks, world)


# ---------------------------------------------------------------------------------------------
# Writing the world

_COLUMNS = {
    "db.csv": ("path", "landmark_id", "lat", "lon", "view", "is_noise", "true_landmark_id"),
    "queries.csv": ("path", "landmark_id", "lat", "lon", "view"),
    "nonlandmarks.csv": ("path", "kind"),
    "distractors.csv": ("path", "kind"),
    "landmarks.csv": ("landmark_id", "name", "lat", "lon", "num_views", "duplicate_of", "city"),
}


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if _is_nonempty(out):
        if not overwrite:
            published = out / "world.json"
            if published.is_file() and published.read_bytes() == (tmp / "world.json").read_bytes():
                # Another process (e.g. a second training rank) published the same world first.
                shutil.rmtree(tmp)
                return
            raise FileExistsError(f"{out} appeared while generating and is not empty; "
                                  "pass overwrite=True to replace it")
    replace_dir(tmp, out)


def generate_world(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig(), workers: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Generate the synthetic landmark world into ``out_dir``; returns the ``world.json`` content.

    The world is written to ``<out_dir>.tmp-<pid>`` and renamed into place when complete, so a
    crash never leaves a half-written world behind under the real name.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if _is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite=True")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    plan = _build_plan(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed run that had this process id
    try:
        for folder in sorted({str(Path(task.relpath).parent) for task in plan.tasks}):
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(plan.tasks), desc="synthetic world", unit="img", disable=not progress)
        if workers == 1:
            renderer = _Renderer(config, tmp)
            for task in plan.tasks:
                renderer.write(task)
                bar.update()
        else:
            with get_context().Pool(workers, initializer=_init_worker, initargs=(config, str(tmp))) as pool:
                for _ in pool.imap_unordered(_write_in_worker, plan.tasks, chunksize=32):
                    bar.update()
        bar.close()
        for name, rows in (("db.csv", plan.db), ("queries.csv", plan.queries), ("nonlandmarks.csv", plan.nonlandmarks),
                           ("distractors.csv", plan.distractors), ("landmarks.csv", plan.landmarks)):
            _write_csv(tmp / name, _COLUMNS[name], rows)
        (tmp / "world.json").write_text(json.dumps(plan.world, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan.world


# ---------------------------------------------------------------------------------------------
# Command line: ``landmarks synth``

def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out`` plus one flag per :class:`SynthConfig` field (``--num-landmarks`` ...)."""
    parser.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    defaults = SynthConfig()
    for field in fields(SynthConfig):
        default = getattr(defaults, field.name)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, type=type(default), default=default,
                            help=f"{CONFIG_HELP[field.name]} (default {default})")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: number of CPUs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_synth_command(args: argparse.Namespace) -> int:
    try:
        config = SynthConfig(**{field.name: getattr(args, field.name) for field in fields(SynthConfig)})
        start = time.perf_counter()
        world = generate_world(args.out, config, workers=args.workers, overwrite=args.overwrite,
                               progress=getattr(args, "progress", True))
    except (FileExistsError, ValueError) as err:
        print(f"landmarks synth: error: {err}", file=sys.stderr)
        return 1
    counts, noise = world["counts"], world["noise"]
    hard = sum(world["kinds"][split].get(HARD_NEGATIVE_KIND, 0) for split in ("nonlandmarks", "distractors"))
    print(
        f"Synthetic landmark world written to {args.out} in {time.perf_counter() - start:.1f} s: "
        f"{counts['landmarks']} landmark ids ({counts['distinct_structures']} distinct structures, "
        f"{len(world['duplicates'])} duplicated under a second id), {counts['db']} DB images with "
        f"{noise['total']} wrong labels ({noise['wrong_landmark']} another landmark, "
        f"{noise['nonlandmark']} no landmark), "
        f"{counts['queries']} landmark queries, {counts['nonlandmarks']} non-landmark training images and "
        f"{counts['distractors']} distractors ({hard} of these non-landmarks are generic buildings); "
        f"{config.image_size} px, difficulty {config.difficulty}, seed {config.seed}. Manifests: db.csv, "
        f"queries.csv, nonlandmarks.csv, distractors.csv, landmarks.csv; ground truth in world.json."
    )
    return 0
