"""Revisited Oxford and Paris (ROxford5k, RParis6k): ground truth and images.

Layout, as distributed by ``filipradenovic/revisitop`` (``configdataset``): a folder
``<root>/<dataset>/`` (or ``<root>`` itself) holding ``gnd_<dataset>.pkl`` and ``jpg/`` with one
``<name>.jpg`` per entry of ``imlist`` (4,993 database images for ROxford5k, 6,322 for RParis6k)
and of ``qimlist`` (70 queries each; the queries are not in the database). The pickle is a dict::

    {"imlist": [str, ...], "qimlist": [str, ...],
     "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [int, ...], "hard": [int, ...], "junk": [int, ...]}, ...]}

with ``gnd[q]`` the annotation of query ``q``: indices into ``imlist`` and the query's bounding
box in pixels of the full image. Queries are cropped to that box before anything else, as the
protocol requires (``PIL.Image.crop`` semantics: coordinates rounded to whole pixels).

Reading it needs :mod:`pickle`, which can run code named in the file. :class:`_GroundTruthUnpickler`
therefore resolves no global at all except a narrow numpy allow-list, so a tampered file fails
with an error instead of executing anything: the official file holds only dicts, lists, strings,
ints and floats (the public loaders index into it as plain sequences; the file itself could not
be inspected here, which is why numeric numpy arrays are also accepted if present). After loading,
every field is validated and turned into plain Python types. :func:`prepare_revisited`
(``landmarks prepare revisited``) writes the same ground truth as JSON, which the evaluation
also reads, so the pickle need be opened only once.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from core.atomic import write_json_atomic
from datamodules.datasets import ImageDataset
from datamodules.images import load_rgb
from datamodules.manifest import ManifestError

log = logging.getLogger(__name__)

__all__ = [
    "REVISITED_DATASETS",
    "RevisitedData",
    "RevisitedImages",
    "find_ground_truth",
    "load_revisited",
    "prepare_revisited",
    "read_ground_truth_pickle",
]

REVISITED_DATASETS = ("roxford5k", "rparis6k")
JSON_FORMAT = "revisited-ground-truth/1"

# numpy's pickle protocol for arrays and scalars (module names before/after numpy 2).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A name the unpickler will not resolve (told apart from a file that is no pickle at all)."""


class _GroundTruthUnpickler(pickle.Unpickler):
    """Resolves no importable name except numpy's array reconstruction (no code runs from the file).

    Arrays of object dtype are refused after loading (:func:`_plain`); everything else a pickle
    could name (functions, classes, ``os.system``) raises here, before it could be called.
    """

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return getattr(__import__(module, fromlist=[name]), name)
        raise _RefusedGlobal(
            f"refusing to load {module}.{name}: a Revisited ground-truth file holds only lists, dicts, "
            "numbers and strings"
        )


def _plain(value, where: str):
    """numpy arrays/scalars → lists/ints/floats; object arrays are an error."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iufb":
            raise ManifestError(f"{where}: array of dtype {value.dtype} (expected numbers)")
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class RevisitedData:
    """A Revisited dataset: names, per-query ground truth, and where the images are."""

    name: str
    image_dir: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict]  # per query: bbx [4 floats], easy/hard/junk [int]
    source: str

    @property
    def database_paths(self) -> list[str]:
        return [str(self.image_dir / f"{name}.jpg") for name in self.imlist]

    @property
    def query_paths(self) -> list[str]:
        return [str(self.image_dir / f"{name}.jpg") for name in self.qimlist]

    @property
    def query_boxes(self) -> list[tuple[float, float, float, float]]:
        return [tuple(g["bbx"]) for g in self.gnd]


def _validate(raw, source: str) -> tuple[list[str], list[str], list[dict]]:
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: expected a dict with imlist, qimlist, gnd; found {type(raw).__name__}")
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in raw]
    if missing:
        raise ManifestError(f"{source}: missing key(s) {missing}; found {sorted(map(str, raw))}")
    imlist, qimlist, gnd = (_plain(raw[key], f"{source}: {key}") for key in ("imlist", "qimlist", "gnd"))
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ManifestError(f"{source}: {key} must be a list of image names (strings)")
        if len(set(names)) != len(names):
            raise ManifestError(f"{source}: {key} names an image twice")
    if not isinstance(gnd, list) or len(gnd) != len(qimlist):
        raise ManifestError(f"{source}: gnd must be a list with one entry per query ({len(qimlist)}), found "
                            f"{len(gnd) if isinstance(gnd, list) else type(gnd).__name__}")
    n_db = len(imlist)
    clean: list[dict] = []
    overlaps = 0
    for q, entry in enumerate(gnd):
        where = f"{source}: gnd[{q}] ({qimlist[q]})"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: expected a dict, found {type(entry).__name__}")
        absent = [key for key in ("bbx", "easy", "hard", "junk") if key not in entry]
        if absent:
            raise ManifestError(f"{where}: missing {absent}")
        box = _plain(entry["bbx"], where)
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise ManifestError(f"{where}: bbx must be [x1, y1, x2, y2], found {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (x2 > x1 and y2 > y1):
            raise ManifestError(f"{where}: empty bounding box {box!r}")
        out = {"bbx": [x1, y1, x2, y2]}
        for key in ("easy", "hard", "junk"):
            values = _plain(entry[key], where)
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ManifestError(f"{where}: {key} must be a list of database indices")
            if values and (min(values) < 0 or max(values) >= n_db):
                raise ManifestError(f"{where}: {key} indexes outside the {n_db} database images")
            # A repeat counts one image as two positives (or junk twice), as the official scorer
            # would count it too: warned, not refused, so an official file is never turned away.
            repeated = sorted(v for v, n in Counter(values).items() if n > 1)
            if repeated:
                log.warning("%s: %s lists database index %d more than once (repeated: %s); scored as given, as the "
                            "official code would", where, key, repeated[0], repeated[:10])
            out[key] = [int(v) for v in values]
        sets = [set(out[k]) for k in ("easy", "hard", "junk")]
        overlaps += len(sets[0] & sets[1]) + len(sets[0] & sets[2]) + len(sets[1] & sets[2])
        clean.append(out)
    if overlaps:
        # The protocol is defined for disjoint lists; an overlap would count an image as both.
        log.warning("%s: %d image(s) are listed in two of easy/hard/junk of the same query", source, overlaps)
    return imlist, qimlist, clean


def read_ground_truth_pickle(path: str | os.PathLike) -> tuple[list[str], list[str], list[dict]]:
    """``gnd_<dataset>.pkl`` → validated ``(imlist, qimlist, gnd)`` in plain Python types."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"Revisited ground truth not found: {path}")
    data = path.read_bytes()
    try:
        raw = _GroundTruthUnpickler(io.BytesIO(data)).load()
    except _RefusedGlobal as err:
        raise ManifestError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        # E.g. a text file saved under the .pkl name: pickle's own message ("Memo value not found")
        # would not say what is wrong with the file.
        raise ManifestError(f"{path}: not a readable ground-truth pickle ({type(err).__name__}: {err})") from None
    return _validate(raw, str(path))


def _name_in_file_name(path: Path) -> str | None:
    """``roxford5k`` for ``gnd_roxford5k.pkl`` / ``.json``; None for a file named otherwise."""
    return path.stem[4:] if path.stem.startswith("gnd_") and len(path.stem) > 4 else None


def find_ground_truth(root: str | os.PathLike, dataset: str | None = None) -> tuple[str, Path]:
    """(dataset name, ground-truth file) from a folder, a ``gnd_*.pkl`` or our JSON; error if none.

    A file named ``gnd_<name>.*`` is the ground truth of ``<name>``: asking for another dataset
    is an error (it would score, or save, one dataset's data under the other's name).
    """
    root = Path(root)
    if root.is_file():
        named = _name_in_file_name(root)
        if dataset and named and dataset != named:
            raise ManifestError(f"{root}: the file name says dataset {named!r}, but {dataset!r} was asked for")
        return dataset or named or root.stem, root
    candidates = [dataset] if dataset else list(REVISITED_DATASETS)
    for name in candidates:
        for folder in (root, root / name):
            for filename in (f"gnd_{name}.json", f"gnd_{name}.pkl"):
                if (folder / filename).is_file():
                    return name, folder / filename
    raise ManifestError(
        f"{root}: no Revisited ground truth (gnd_<dataset>.pkl or .json for {', '.join(candidates)}) in it or in "
        f"<dataset>/ below it"
    )


def _read_json(path: Path) -> dict:
    """The payload of a :func:`prepare_revisited` JSON, or an error naming the file and the fault."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text, so not a {JSON_FORMAT} file") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err}; empty or truncated?); "
                            "run `landmarks prepare revisited` again") from None
    if not isinstance(payload, dict):
        raise ManifestError(f"{path}: expected a JSON object with format, imlist, qimlist, gnd; "
                            f"found {type(payload).__name__}")
    if payload.get("format") != JSON_FORMAT:
        raise ManifestError(f"{path}: not a {JSON_FORMAT} file (format {payload.get('format')!r})")
    image_dir = payload.get("image_dir", "jpg")
    if not isinstance(image_dir, str) or not image_dir:
        raise ManifestError(f"{path}: image_dir must be a folder path (a string), found {image_dir!r}")
    return payload


def load_revisited(
    root: str | os.PathLike, dataset: str | None = None, image_dir: str | os.PathLike | None = None,
    check_files: bool = True,
) -> RevisitedData:
    """Find, read and validate a Revisited dataset.

    ``root`` may be the dataset folder (with ``gnd_<dataset>.pkl`` and ``jpg/``), its parent, the
    ``.pkl`` itself, or the JSON written by :func:`prepare_revisited`. Images default to the
    ``jpg/`` folder next to the ground truth (or the one recorded in the JSON). The dataset is named
    by the JSON's ``dataset`` field, else by the file name ``gnd_<dataset>.*``; ``dataset``, if
    given, must agree with both. With
    ``check_files`` a missing image is an error: the protocol is defined on the full database.
    """
    name, gt_file = find_ground_truth(root, dataset)
    if gt_file.suffix == ".json":
        payload = _read_json(gt_file)
        recorded = payload.get("dataset")
        if recorded is not None:
            # The JSON says which dataset it holds; its file name and the caller must agree with it.
            if not isinstance(recorded, str) or not recorded:
                raise ManifestError(f"{gt_file}: 'dataset' must be a dataset name, found {recorded!r}")
            for claim, what in ((dataset, "was asked for"), (_name_in_file_name(gt_file), "is in the file name")):
                if claim and claim != recorded:
                    raise ManifestError(f"{gt_file}: holds dataset {recorded!r} (its 'dataset' field), but {claim!r} {what}")
            name = recorded
        imlist, qimlist, gnd = _validate(payload, str(gt_file))
        default_dir = Path(os.path.normpath(gt_file.parent / payload.get("image_dir", "jpg")))
    else:
        imlist, qimlist, gnd = read_ground_truth_pickle(gt_file)
        default_dir = gt_file.parent / "jpg"
    images = Path(image_dir) if image_dir is not None else default_dir
    data = RevisitedData(name=name, image_dir=images, imlist=imlist, qimlist=qimlist, gnd=gnd, source=str(gt_file))
    if check_files:
        absent = [p for p in data.query_paths + data.database_paths if not os.path.isfile(p)]
        if absent:
            raise ManifestError(
                f"{gt_file}: {len(absent)} of {len(imlist) + len(qimlist)} images missing under {images}, e.g. {absent[0]}"
            )
    log.info("%s: %d database images, %d queries", name, len(imlist), len(qimlist))
    return data


def prepare_revisited(root: str | os.PathLike, out: str | os.PathLike, dataset: str | None = None) -> Path:
    """Validate the ground truth and write it as ``<out>/gnd_<dataset>.json`` (atomically).

    The JSON records the image folder relative to ``out``, so later runs never open the pickle.
    """
    data = load_revisited(root, dataset)
    out = Path(out)
    target = out / f"gnd_{data.name}.json"
    source = Path(data.source)
    # Inputs are never modified: re-preparing a JSON into its own folder would rewrite it in place.
    if target.resolve() == source.resolve() or (target.exists() and os.path.samefile(target, source)):
        raise ManifestError(f"{target}: is the input ground truth; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": JSON_FORMAT, "dataset": data.name, "source": data.source,
        "image_dir": os.path.relpath(data.image_dir, out),
        "imlist": data.imlist, "qimlist": data.qimlist, "gnd": data.gnd,
    }
    write_json_atomic(target, payload, indent=None, newline=False)
    return target


def crop_box(width: int, height: int, box) -> tuple[int, int, int, int]:
    """A query box in whole pixels, rounded like ``PIL.Image.crop`` and clipped to the image."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, y1 = max(0, min(x1, width - 1)), max(0, min(y1, height - 1))
    x2, y2 = max(x1 + 1, min(x2, width)), max(y1 + 1, min(y2, height))
    return x1, y1, x2, y2


class RevisitedImages(ImageDataset):
    """Database images, or queries cropped to their boxes, as :class:`ImageDataset` samples.

    Each sample is ``{"image", "label" (= its index), "index", "valid"}``. Images are decoded at
    full size (the box is in full-size pixels), cropped, then transformed (e.g.
    :func:`datamodules.transforms.eval_transform`). An unreadable image becomes a black
    placeholder with ``valid=False``; the evaluation refuses to score with one (a protocol over a
    partial database would be a different benchmark).
    """

    def __init__(self, data: RevisitedData, split: Literal["database", "queries"], transform, image_size: int):
        if split not in ("database", "queries"):
            raise ValueError(f"split must be 'database' or 'queries', got {split!r}")
        paths = data.database_paths if split == "database" else data.query_paths
        super().__init__(paths, np.arange(len(paths)), transform, image_size)
        self.boxes = None if split == "database" else data.query_boxes

    def decode(self, index: int) -> np.ndarray:
        image = load_rgb(self.paths[index])
        if self.boxes is not None:
            x1, y1, x2, y2 = crop_box(image.shape[1], image.shape[0], self.boxes[index])
            image = np.ascontiguousarray(image[y1:y2, x1:x2])
        return image
