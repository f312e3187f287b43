"""Landmark geometry, without pixels: the part vocabulary, blueprints (palette, parts and shooting
angles) drawn from the seed, where a structure stands in its layer, and perspective maps.

A blueprint is a pure function of ``(seed, landmark index)``: the plan reads it (names, number of
views) without drawing anything, and every renderer process rebuilds the same one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datamodules.synth.colours import RGB, hsv, luma, shaded
from datamodules.synth.config import FRAMINGS, SynthConfig
from datamodules.synth.streams import STREAM_BLUEPRINT, stream_rng

PART_KINDS = ("tower", "dome", "arch", "facade", "spire", "colonnade", "pyramid")
TEXTURES = ("plain", "hstripes", "vstripes", "bricks", "windows", "checker", "arcade")
TOPS = ("flat", "crenels", "roof", "dome", "spire")
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
NAME_SUFFIXES = {
    "tower": ("Tower", "Belfry", "Campanile"),
    "dome": ("Basilica", "Dome", "Rotunda"),
    "arch": ("Gate", "Arch"),
    "facade": ("Palace", "Hall", "Library"),
    "spire": ("Cathedral", "Spire", "Chapel"),
    "colonnade": ("Temple", "Forum", "Pavilion"),
    "pyramid": ("Pyramid", "Ziggurat"),
}
# Where a structure layer's ground line lies (fraction of the canvas); photos put it on the horizon.
BASE_LINE = 0.86


@dataclass(frozen=True)
class Part:
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
class View:
    framing: str
    layout_seed: int  # the composition of this view is fixed, only the photo nuisances vary


@dataclass(frozen=True)
class Blueprint:
    palette: tuple[RGB, ...]
    parts: tuple[Part, ...]
    views: tuple[View, ...]


def _make_palette(rng: np.random.Generator) -> tuple[RGB, ...]:
    base_hue = rng.random()
    palette = []
    for _ in range(5):
        hue = base_hue + rng.normal(0, 0.06) + (0.5 if rng.random() < 0.25 else 0.0)
        if rng.random() < 0.55:  # stone, plaster, brick: muted
            palette.append(hsv(hue, rng.uniform(0.05, 0.35), rng.uniform(0.45, 0.95)))
        else:
            palette.append(hsv(hue, rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.9)))
    return tuple(palette)


def _make_part(rng: np.random.Generator, kind: str, palette: tuple[RGB, ...]) -> Part:
    (w0, w1), (h0, h1) = _PART_SIZES[kind]
    colour_index, accent_index = rng.choice(len(palette), 2, replace=False)
    colour, accent = palette[colour_index], palette[accent_index]
    if abs(luma(colour) - luma(accent)) < 40:  # textures must stay visible after blur and JPEG
        accent = shaded(accent, 0.55) if luma(accent) > 110 else shaded(accent, 1.8)
    texture, side_texture = rng.choice(TEXTURES, 2, replace=False)
    return Part(
        kind=kind, width=float(rng.uniform(w0, w1)), height=float(rng.uniform(h0, h1)),
        colour=colour, accent=accent, texture=str(texture), side_texture=str(side_texture),
        period=float(rng.uniform(0.035, 0.08)), top=str(rng.choice(TOPS)), ornament=bool(rng.random() < 0.6),
    )


def make_blueprint(rng: np.random.Generator, framings: tuple[str, ...]) -> Blueprint:
    palette = _make_palette(rng)
    kinds = [str(k) for k in rng.choice(PART_KINDS, int(rng.integers(4, 7)))]
    parts = tuple(_make_part(rng, kind, palette) for kind in kinds)
    views = tuple(View(framing, int(rng.integers(2**32))) for framing in framings)
    return Blueprint(palette, parts, views)


def landmark_blueprint(config: SynthConfig, landmark_index: int) -> Blueprint:
    rng = stream_rng(config.seed, STREAM_BLUEPRINT, landmark_index)
    num_views = int(rng.integers(config.min_views, config.max_views + 1))
    # Every landmark has a front view; the others are distinct angles drawn from the rest.
    framings = ("front",) + tuple(str(f) for f in rng.choice(FRAMINGS[1:], num_views - 1, replace=False))
    return make_blueprint(rng, framings)



def perspective_coeffs(dst: list[tuple[float, float]], src: list[tuple[float, float]]) -> tuple[float, ...]:
    """PIL PERSPECTIVE data mapping each output point in ``dst`` to the input point in ``src``."""
    rows, values = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values += [u, v]
    solution = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(values, dtype=np.float64))
    return tuple(float(c) for c in solution)
