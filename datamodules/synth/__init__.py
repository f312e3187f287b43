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
    <out>/images/calibration/<i>.jpg             non-landmark photos for threshold calibration
    <out>/images/collection/<i>.jpg              a user's collection (GPS in the EXIF of a share)
    <out>/db.csv           path,landmark_id,lat,lon,view,is_noise,true_landmark_id
    <out>/queries.csv      path,landmark_id,lat,lon,view
    <out>/nonlandmarks.csv path,kind
    <out>/distractors.csv  path,kind,lat,lon   (where each was taken: a city of the world; CSV only)
    <out>/landmarks.csv    landmark_id,name,lat,lon,num_views,duplicate_of,city
    <out>/calibration.csv  path,kind,lat,lon   (the same)
    <out>/collection.csv   path,landmark_id,kind,lat,lon   (truth; lat/lon empty = no GPS in the EXIF)
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

Modules, one concern each (lowest first)::

    config    SynthConfig, its presets and the vocabularies it names (no drawing)
    streams   independent random streams per purpose
    colours   RGB helpers
    geometry  blueprints (parts, palette, shooting angles), base line, perspective maps: no pixels
    plan      ids, names, places, duplicates, noise, view mix: one render task per image
    draw      PIL drawing of a structure: part kinds, compositions, the view layer
    scenes    sky, ground, occluders and the everyday non-landmark scenes
    camera    placement, crop and warp, light, blur, noise, JPEG quality
    render    the renderer: task → JPEG file (and its worker-process entry points)
    write     generate_world: render, write the manifests, publish atomically; world_problems /
              ensure_world: a half-written or stale world is detected, moved aside, regenerated

Importing this package (or :class:`SynthConfig`) does not import the renderer: ``generate_world``
is loaded on first use, so ``LandmarkDataModule`` and ``landmarks --help`` stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from datamodules.synth.config import (
    CONFIG_HELP,
    FORMAT,
    FRAMINGS,
    HARD_NEGATIVE_KIND,
    NONLANDMARK_KINDS,
    SCENE_KINDS,
    SynthConfig,
)

if TYPE_CHECKING:
    from datamodules.synth.write import ensure_world, generate_world, world_problems

_LAZY = ("ensure_world", "generate_world", "world_problems")
__all__ = ["CONFIG_HELP", "FORMAT", "FRAMINGS", "HARD_NEGATIVE_KIND", "NONLANDMARK_KINDS", "SCENE_KINDS",
           "SynthConfig", "ensure_world", "generate_world", "world_problems"]


def __getattr__(name: str):
    # Lazy: writing a world pulls in the renderer (PIL drawing), which only world generation needs.
    if name in _LAZY:
        from datamodules.synth import write

        return getattr(write, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
