"""Randomness of a world: independent streams per purpose, so adding draws to one never shifts another.

Every image's randomness comes from ``(seed, split stream, index)`` and every landmark's blueprint
from ``(seed, blueprint stream, landmark index)``: the same config and seed give the same world
whatever the number of worker processes or the order the images are rendered in.
"""

from __future__ import annotations

import numpy as np

STREAM_DB, STREAM_QUERIES, STREAM_NONLANDMARKS, STREAM_DISTRACTORS = 1, 2, 3, 4
STREAM_CALIBRATION, STREAM_COLLECTION = 5, 6
STREAM_BLUEPRINT, STREAM_PLAN, STREAM_VIEW_MIX = 10, 11, 12
# Plans of the splits added in format 2 draw from their own stream: format-1 worlds keep their bytes.
STREAM_PLAN_2 = 13
# Format 3: where the calibration photos and distractors were taken, after every format-2 draw.
STREAM_POSITIONS = 14


def stream_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *index]))
