"""The renderer: one :class:`~datamodules.synth.plan.Task` → one JPEG file.

A landmark image is its view layer (cached per structure and view) placed on a background with
occluders and photographed; a non-landmark image is an everyday scene, or a hard negative (a
one-off structure from the landmarks' vocabulary). Each image's randomness comes from its own
stream, so workers can render tasks in any order. ``init_worker`` / ``write_in_worker`` are the
entry points of a worker process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageDraw

from datamodules.synth.camera import photograph, place_filling, place_on_horizon
from datamodules.synth.config import FRAMINGS, HARD_NEGATIVE_KIND, SynthConfig
from datamodules.synth.draw import render_view
from datamodules.synth.geometry import Blueprint, View, landmark_blueprint, make_blueprint
from datamodules.synth.plan import Task
from datamodules.synth.scenes import SCENES, add_occluders, exterior_background, occluder_count, pick_time_of_day
from datamodules.synth.streams import stream_rng


class Renderer:
    """Renders tasks of one world; caches blueprints and view layers (pure functions of the config)."""

    def __init__(self, config: SynthConfig, root: Path):
        self.config, self.root = config, root
        self.canvas = int(round(config.image_size * 1.25))  # drawn larger, then cropped and resized
        self._blueprints: dict[int, Blueprint] = {}
        self._layers: dict[tuple[int, int], Image.Image] = {}

    def _layer(self, structure: int, view: int) -> tuple[View, Image.Image]:
        if structure not in self._blueprints:
            self._blueprints[structure] = landmark_blueprint(self.config, structure)
        blueprint = self._blueprints[structure]
        if (structure, view) not in self._layers:
            self._layers[structure, view] = render_view(blueprint, blueprint.views[view], self.canvas)
        return blueprint.views[view], self._layers[structure, view]

    def _structure_photo(self, view: View, layer: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, int]:
        difficulty, s = self.config.difficulty, self.canvas
        time_of_day = pick_time_of_day(rng, difficulty)
        if view.framing == "interior":
            canvas, horizon, kinds = Image.new("RGB", (s, s)), 0.6 * s, ("person",)
            place_filling(canvas, layer, rng, difficulty)
        else:
            canvas, horizon = exterior_background(rng, s, time_of_day)
            kinds = ("person", "person", "tree", "car")
            if view.framing == "detail":
                place_filling(canvas, layer, rng, difficulty)
            else:
                place_on_horizon(canvas, layer, rng, horizon, difficulty)
        add_occluders(ImageDraw.Draw(canvas), rng, s, horizon, kinds, occluder_count(rng, difficulty))
        return photograph(canvas, rng, time_of_day, difficulty, self.config.image_size)

    def _nonlandmark_photo(self, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
        if kind == HARD_NEGATIVE_KIND:
            # Same vocabulary and camera as a landmark, but a structure that exists only once.
            framing = str(rng.choice(FRAMINGS, p=(0.4, 0.2, 0.1, 0.15, 0.15)))
            blueprint = make_blueprint(rng, (framing,))
            view = blueprint.views[0]
            return self._structure_photo(view, render_view(blueprint, view, self.canvas), rng)
        time_of_day = pick_time_of_day(rng, self.config.difficulty)
        canvas, horizon, kinds = SCENES[kind](rng, self.canvas, time_of_day)
        if kinds:
            count = occluder_count(rng, self.config.difficulty)
            add_occluders(ImageDraw.Draw(canvas), rng, self.canvas, horizon, kinds, count)
        return photograph(canvas, rng, time_of_day, self.config.difficulty, self.config.image_size)

    def render(self, task: Task) -> tuple[Image.Image, int]:
        rng = stream_rng(self.config.seed, task.stream, task.index)
        if task.structure >= 0:
            view, layer = self._layer(task.structure, task.view)
            return self._structure_photo(view, layer, rng)
        return self._nonlandmark_photo(task.kind, rng)

    def write(self, task: Task) -> None:
        photo, quality = self.render(task)
        extra = {} if task.gps is None else {"exif": _gps_exif(*task.gps)}
        photo.save(self.root / task.relpath, "JPEG", quality=quality, **extra)


def _gps_exif(lat: float, lon: float) -> Image.Exif:
    """An EXIF block with a GPS position, as a phone writes it (degrees, minutes, seconds)."""
    def dms(value: float) -> tuple[float, float, float]:
        value = abs(value)
        degrees, minutes = int(value), int((value - int(value)) * 60)
        return float(degrees), float(minutes), round((value - degrees - minutes / 60) * 3600, 4)

    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "S" if lat < 0 else "N", ExifTags.GPS.GPSLatitude: dms(lat),
        ExifTags.GPS.GPSLongitudeRef: "W" if lon < 0 else "E", ExifTags.GPS.GPSLongitude: dms(lon),
    }
    return exif


_worker_renderer: Renderer | None = None


def init_worker(config: SynthConfig, root: str) -> None:
    global _worker_renderer
    _worker_renderer = Renderer(config, Path(root))


def write_in_worker(task: Task) -> None:
    _worker_renderer.write(task)
