"""Argument types for the commands' numeric options, checked when the line is parsed.

A value out of range is the user's mistake, so it must fail before any photo is embedded, in the
one-line form every command uses (``landmarks index: error: argument --target-fpr: ...``, exit
status 2) -- not as a traceback from deep inside the work, and not by being quietly replaced by a
default. ``argparse`` prints an :class:`argparse.ArgumentTypeError`'s message after the option's name.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _checked(kind: type, ok, requirement: str, name: str):
    """An argparse type: ``text`` read as ``kind``, refused unless ``ok(value)``."""
    def parse(text: str):
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must {requirement}, got {text!r}")
        return value

    parse.__name__ = name
    return parse


# Sizes, counts, batch sizes.
positive_int = _checked(int, lambda v: v >= 1, "be an integer >= 1", "positive_int")
# Worker counts where 0 means "in this process", optional counts.
nonnegative_int = _checked(int, lambda v: v >= 0, "be an integer >= 0", "nonnegative_int")
# Any finite number (a threshold on a cosine score).
finite_float = _checked(float, lambda v: True, "be finite", "finite_float")
# Scales, learning rates, radii.
positive_float = _checked(float, lambda v: v > 0, "be > 0", "positive_float")
# Weights and distances, where 0 switches a term off.
nonnegative_float = _checked(float, lambda v: v >= 0, "be >= 0", "nonnegative_float")
# A target false-positive rate.
rate = _checked(float, lambda v: 0 < v < 1, "lie in (0, 1)", "rate")
# A precision or recall target, an interpolation weight.
fraction = _checked(float, lambda v: 0 <= v <= 1, "lie in [0, 1]", "fraction")
jpeg_quality = _checked(int, lambda v: 1 <= v <= 100, "be an integer in [1, 100]", "jpeg_quality")


def torch_device(text: str) -> str:
    """``auto``, or a device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:1`` …)."""
    import torch

    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}") from None
    if device.type == "cuda":
        available = torch.cuda.device_count()
        if device.index is None and not available or device.index is not None and device.index >= available:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {available} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")
    return text
