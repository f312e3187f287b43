"""RGB colour helpers shared by the blueprints, the structure drawing and the scenes (no PIL)."""

from __future__ import annotations

import colorsys

import numpy as np

RGB = tuple[int, int, int]


def hsv(hue: float, sat: float, val: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0))
    return (int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5))


def shaded(colour: RGB, factor: float) -> RGB:
    return tuple(min(255, max(0, int(c * factor + 0.5))) for c in colour)  # type: ignore[return-value]


def mixed(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(x + (y - x) * t + 0.5) for x, y in zip(a, b))  # type: ignore[return-value]


def luma(colour: RGB) -> float:
    return 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]


def jittered(rng: np.random.Generator, colour: RGB, spread: float) -> RGB:
    return tuple(int(min(255, max(0, c + rng.normal(0, spread)))) for c in colour)  # type: ignore[return-value]


def random_colour(rng: np.random.Generator, sat: tuple[float, float] = (0.3, 0.9),
                  val: tuple[float, float] = (0.3, 0.95)) -> RGB:
    return hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))
