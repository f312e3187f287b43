"""The "camera": placing the structure layer on a scene, then crop and perspective warp, colour
cast of the time of day, lighting gradient, contrast, blur, sensor noise and a JPEG quality.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from datamodules.synth.geometry import BASE_LINE, perspective_coeffs

# Per-channel gain of the light at each time of day (applied with strength ~ difficulty).
_CAST = {
    "day": (1.0, 1.0, 1.0),
    "sunset": (1.15, 0.88, 0.7),
    "night": (0.45, 0.5, 0.8),
    "overcast": (0.92, 0.95, 1.0),
}


def place_on_horizon(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator, horizon: float,
                     difficulty: float) -> None:
    s = canvas.width
    d = min(difficulty, 2.0)
    scale = float(rng.uniform(1 - 0.22 * d, 1 + 0.08 * d))
    centre_x = s * (0.5 + float(rng.uniform(-0.12, 0.12)) * d)
    base_y = horizon + s * float(rng.uniform(0.0, 0.05))
    # AFFINE data maps each output pixel to the layer pixel it shows.
    data = (1 / scale, 0.0, s / 2 - centre_x / scale, 0.0, 1 / scale, BASE_LINE * s - base_y / scale)
    placed = layer.transform((s, s), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR).convert("RGBA")
    canvas.paste(placed, (0, 0), placed)


def place_filling(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator, difficulty: float) -> None:
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


def photograph(canvas: Image.Image, rng: np.random.Generator, time_of_day: str, difficulty: float,
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
    photo = canvas.transform((size, size), Image.Transform.PERSPECTIVE, perspective_coeffs(dst, src),
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
