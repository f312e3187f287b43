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


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, batch sizes)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (worker counts where 0 means "in this process", optional counts)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (a threshold on a cosine score)."""
    return _number(text, float)


def positive_float(text: str) -> float:
    """A finite number > 0 (scales, learning rates, radii)."""
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (weights and distances, where 0 switches a term off)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def rate(text: str) -> float:
    """A rate strictly between 0 and 1 (a target false-positive rate)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a precision or recall target, an interpolation weight)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text!r}")
    return value


def jpeg_quality(text: str) -> int:
    """A JPEG quality, 1-100."""
    value = _number(text, int)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 100], got {text!r}")
    return value


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
