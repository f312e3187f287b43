"""Decode any photo users bring into an 8-bit RGB array, or say clearly why it cannot be read.

Real collections hold CMYK JPEGs, 16-bit PNGs, images with alpha, greyscale scans, phone photos
with an EXIF rotation and 50-megapixel originals. All of them become ``uint8 [H, W, 3]`` RGB with
the orientation a viewer would show, downscaled early (JPEG draft mode decodes at 1/2, 1/4, 1/8
size directly) because a landmark model never needs more than a few hundred pixels.
Anything that cannot be decoded raises :class:`UnreadableImage` naming the file; the data module
turns that into its documented skip policy.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import UserError

# Pillow refuses images over 2x this many pixels as "decompression bombs"; 100 MP originals exist.
Image.MAX_IMAGE_PIXELS = 400_000_000


class UnreadableImage(UserError):
    """The file is missing, empty, truncated or not an image (the user's file: a one-line error)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's convert("L") clips 16-bit values at 255 (a nearly white image); rescale instead.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent areas become white, as a browser would show them on a page.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's conversions are correct for these.
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike, max_side: int | None = None) -> np.ndarray:
    """Read ``path`` as ``uint8 [H, W, 3]`` RGB, longer side at most ``max_side`` pixels."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(f"{path}: empty file (0 bytes)")
    except FileNotFoundError as err:
        raise UnreadableImage(f"{path}: file not found") from err
    return _decode(path, str(path), max_side)


def decode_rgb(data: bytes, name: str, max_side: int | None = None) -> np.ndarray:
    """:func:`load_rgb` for an encoded image held in memory (a tar shard's member); ``name`` is
    what an error message calls it (the shard and the byte offset)."""
    if len(data) == 0:
        raise UnreadableImage(f"{name}: empty image (0 bytes)")
    return _decode(io.BytesIO(data), name, max_side)


def _decode(source, name: str, max_side: int | None) -> np.ndarray:
    try:
        with Image.open(source) as image:
            if max_side is not None and image.format == "JPEG":
                # Decode straight at a reduced scale (≥ the requested size): far faster for big files.
                # The request keeps the aspect ratio: draft() only reduces while *both* sides stay
                # at least as requested, so a square request never shrinks a landscape photo.
                scale = max_side / max(image.size)
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
            if max_side is not None and max(image.size) > max_side:
                scale = max_side / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
            return np.asarray(image, dtype=np.uint8).copy()
    except FileNotFoundError as err:
        raise UnreadableImage(f"{name}: file not found") from err
    except UnidentifiedImageError as err:
        raise UnreadableImage(f"{name}: not an image Pillow can identify") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Truncated JPEGs raise OSError("image file is truncated ..."), broken headers SyntaxError.
        raise UnreadableImage(f"{name}: cannot decode ({err})") from err
