"""Where a photo was taken (EXIF GPS or a CSV column), the distance filter that uses it, and a
threshold calibrated for photos that pass through it.

A phone photo taken in Berlin does not show the Eiffel Tower; if both the photo and a candidate
landmark have coordinates and they are farther apart than a radius, the candidate is rejected
and the next candidate within the radius (if any) takes its place. At the plain threshold the
filter can only remove acceptances, never add one, so it never raises the calibrated
false-positive rate.

It also lowers that rate below the target: a non-landmark photo is a false positive only if it
matches a landmark near where it was taken. :func:`calibrate_with_gps` therefore sets a second
threshold on calibration photos that have a position, with the filter applied as the recogniser
applies it (:func:`near_candidates` over the first ``candidates`` landmarks of the search), at the
same target rate; the recogniser uses it for photos with a position and the plain threshold for the
others. On the demo's world it raised recall at FPR 1e-3 for photos with a position (EXPERIMENTS.md,
"The GPS filter and a threshold calibrated with it").
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from core.errors import UserError
from core.tables import read_text_csv
from recognition.calibration import Calibration, calibrate_threshold
from retrieval.decision import select

log = logging.getLogger(__name__)

__all__ = ["EARTH_RADIUS_KM", "GPS_CANDIDATES", "GpsCalibration", "GpsError", "calibrate_with_gps", "haversine_km",
           "landmark_coordinates", "near_candidates", "parse_position", "photo_positions", "read_exif_gps",
           "read_gps_csv", "within_radius"]

#: Mean Earth radius (IUGG), km.
EARTH_RADIUS_KM = 6371.0088
#: How many of a photo's best landmarks the filter looks through for one within the radius, when a
#: threshold is calibrated with it (as many as ``landmarks recognize`` reports by default). A deeper
#: search finds a nearby landmark for more non-landmark photos, so the depth is part of the
#: calibration, and the recogniser decides such photos over exactly these candidates.
GPS_CANDIDATES = 5


class GpsError(UserError):
    """A GPS CSV cannot be used as given; the message names the file and line."""


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (numpy-broadcast)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2, dtype=np.float64) - np.asarray(lon1, dtype=np.float64))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def within_radius(lat: float, lon: float, cand_lat, cand_lon, radius_km: float) -> np.ndarray:
    """bool per candidate: True if it lies within ``radius_km`` of ``(lat, lon)`` or has no coordinates."""
    cand_lat = np.asarray(cand_lat, dtype=np.float64)
    cand_lon = np.asarray(cand_lon, dtype=np.float64)
    known = np.isfinite(cand_lat) & np.isfinite(cand_lon)
    dist = np.where(known, haversine_km(lat, lon, np.where(known, cand_lat, 0.0), np.where(known, cand_lon, 0.0)), 0.0)
    return ~known | (dist <= radius_km)


def landmark_coordinates(landmarks: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(lat, lon)`` of an index's landmarks (``landmarks.json`` entries), NaN where unknown."""
    lat = np.array([np.nan if lm.get("lat") is None else lm["lat"] for lm in landmarks], dtype=np.float64)
    lon = np.array([np.nan if lm.get("lon") is None else lm["lon"] for lm in landmarks], dtype=np.float64)
    return lat, lon


def parse_position(lat: str, lon: str, source, line: int, lat_column: str = "lat",
                   lon_column: str = "lon") -> tuple[float, float] | None:
    """``(lat, lon)`` from a CSV row's two cells, or None when both are empty; a half-filled,
    non-numeric or out-of-range pair is a :class:`GpsError` naming ``source`` and ``line``. The one
    reader of a photo's position cells (``--gps-csv``, a calibration manifest's columns)."""
    lat, lon = str(lat).strip(), str(lon).strip()
    if not lat and not lon:
        return None
    if not lat or not lon:
        raise GpsError(f"{source}: line {line}: {lat_column} and {lon_column} must both be given or both be empty")
    try:
        value = (float(lat), float(lon))
    except ValueError:
        raise GpsError(f"{source}: line {line}: {lat_column}={lat!r}, {lon_column}={lon!r} are not both numbers") from None
    if not (-90 <= value[0] <= 90 and -180 <= value[1] <= 180):
        raise GpsError(f"{source}: line {line}: coordinates {value} out of range")
    return value


def photo_positions(manifest, use_exif_gps: bool = True) -> np.ndarray:
    """float64 ``[n, 2]``: each photo's (lat, lon) from the manifest's ``lat``/``lon`` columns, else
    (``use_exif_gps``) from its EXIF, as ``landmarks recognize`` takes a photo's position; NaN where
    neither has one."""
    table = manifest.table
    present = [c for c in ("lat", "lon") if c in table.columns]
    if len(present) == 1:
        missing = "lon" if present == ["lat"] else "lat"
        raise GpsError(f"{manifest.source}: has a {present[0]} column but no {missing} column")
    out = np.full((len(manifest), 2), np.nan)
    for i, (path, line) in enumerate(zip(manifest.paths, manifest.lines)):
        where = parse_position(table["lat"].iat[i], table["lon"].iat[i], manifest.source, int(line)) if present else None
        if where is None and use_exif_gps:
            where = read_exif_gps(path)
        if where is not None:
            out[i] = where
    return out


def near_candidates(landmark_lat, landmark_lon, rows, positions, radius_km: float,
                    candidates: int | None = None) -> np.ndarray:
    """bool ``[n, k]``: which candidates the GPS filter lets through.

    ``rows`` are ``[n, k]`` landmark rows (``-1``: an empty slot, never let through) into
    ``landmark_lat`` / ``landmark_lon`` (NaN: no coordinates, always let through); ``positions``
    ``[n, 2]`` are the photos' (lat, lon), a row of NaN for a photo without a position, whose
    candidates all pass. ``candidates``: only the first that many columns may pass (a GPS
    threshold's depth, :class:`GpsCalibration`). The one filter rule, for the recogniser and for
    calibration.
    """
    rows = np.asarray(rows, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.float64).reshape(len(rows), 2)
    lat = np.asarray(landmark_lat, dtype=np.float64)[np.maximum(rows, 0)]
    lon = np.asarray(landmark_lon, dtype=np.float64)[np.maximum(rows, 0)]
    placed = np.isfinite(positions).all(axis=1)
    near = np.ones(rows.shape, dtype=bool)
    for i in np.flatnonzero(placed):
        near[i] = within_radius(positions[i, 0], positions[i, 1], lat[i], lon[i], radius_km)
    if candidates is not None:
        near[:, candidates:] = False
    return near & (rows >= 0)


@dataclass(frozen=True)
class GpsCalibration:
    """A threshold for photos with a position, calibrated with the GPS filter of ``radius_km``
    over each photo's first ``candidates`` landmarks; ``n_without_position`` calibration photos
    had no position and are not in it."""

    radius_km: float
    candidates: int
    calibration: Calibration
    n_without_position: int

    def to_json(self) -> dict:
        return {"radius_km": self.radius_km, "candidates": self.candidates,
                "calibration": self.calibration.to_json(), "n_without_position": self.n_without_position}

    @classmethod
    def from_json(cls, data: dict) -> "GpsCalibration":
        """Raises ValueError, KeyError or TypeError for a malformed record (the index loader names the file)."""
        radius, candidates, unplaced = data["radius_km"], data["candidates"], data["n_without_position"]
        number = isinstance(radius, (int, float)) and not isinstance(radius, bool)
        if not (number and math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius_km must be a number > 0, got {radius!r}")
        for key, value, least in (("candidates", candidates, 1), ("n_without_position", unplaced, 0)):
            if type(value) is not int or value < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
        calibration = Calibration.from_json(data["calibration"])
        if not math.isfinite(calibration.threshold):
            raise ValueError(f"the threshold must be a finite number, got {calibration.threshold}")
        return cls(float(radius), candidates, calibration, unplaced)


def calibrate_with_gps(index, embeddings: np.ndarray, positions: np.ndarray, radius_km: float, target_fpr: float,
                       *, candidates: int = GPS_CANDIDATES, rule: str = "empirical",
                       allow_unresolved: bool = False) -> GpsCalibration:
    """The threshold at ``target_fpr`` for non-landmark photos that have a position.

    ``embeddings`` are the calibration photos' (the model's raw unit embeddings, as
    :meth:`recognition.artifact.LandmarkIndex.search` takes them) and ``positions`` ``[n, 2]``
    their (lat, lon), NaN where unknown. Each photo with a position is scored by the first of its
    ``candidates`` best landmarks that the filter lets through (:func:`near_candidates`), or not at
    all (``-inf``, never accepted) when none is near; the threshold is then calibrated on those
    scores as :func:`recognition.calibration.calibrate_threshold` does.
    """
    positions = np.asarray(positions, dtype=np.float64).reshape(len(embeddings), 2)
    placed = np.isfinite(positions).all(axis=1)
    lat, lon = landmark_coordinates(index.landmarks)
    scores = np.zeros(0, dtype=np.float32)
    if placed.any():
        found, rows = index.search(np.asarray(embeddings)[placed], candidates)
        scores = select(found, rows, near_candidates(lat, lon, rows, positions[placed], radius_km, candidates)).score
    calibration = calibrate_threshold(scores, target_fpr, allow_unresolved=allow_unresolved, rule=rule)
    near = int(np.isfinite(scores).sum())
    if calibration.threshold <= -np.finfo(np.float32).max:
        # The rule may admit more photos than have any landmark near them: the "threshold" would
        # then accept every nearby match whatever its score, from a handful of photos.
        raise UserError(
            f"only {near} of the {len(scores)} calibration photos with a position have a landmark within "
            f"{radius_km:g} km among their best {candidates}, too few to set a threshold at FPR {target_fpr:g}: "
            "give a larger radius or more calibration photos taken where the landmarks are")
    return GpsCalibration(float(radius_km), int(candidates), calibration, int((~placed).sum()))


def _degrees(dms, ref, refs: tuple[str, str]) -> float:
    """Signed degrees from EXIF degrees/minutes/seconds and a hemisphere reference; ValueError for a
    reference other than ``refs`` (e.g. N/S) or minutes or seconds outside [0, 60] (60 itself
    comes from writers that round 59.99996), which no real fix has."""
    d, m, s = (float(v) for v in dms)
    if not (0 <= m <= 60 and 0 <= s <= 60 and d >= 0):
        raise ValueError(f"degrees/minutes/seconds {d}, {m}, {s}")
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = str(ref).strip().upper()
    if ref not in refs:
        raise ValueError(f"reference {ref!r} is not {refs[0]} or {refs[1]}")
    value = d + m / 60.0 + s / 3600.0
    return -value if ref == refs[1] else value


def read_exif_gps(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(lat, lon)`` in degrees from a photo's EXIF GPS block, or None if it has none (or a broken one)."""
    try:
        with Image.open(path) as image:
            gps = image.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None  # unreadable files are reported by the recogniser itself
    tags = ExifTags.GPS
    if tags.GPSLatitude not in gps or tags.GPSLongitude not in gps:
        return None
    try:
        lat = _degrees(gps[tags.GPSLatitude], gps.get(tags.GPSLatitudeRef, "N"), ("N", "S"))
        lon = _degrees(gps[tags.GPSLongitude], gps.get(tags.GPSLongitudeRef, "E"), ("E", "W"))
    except (TypeError, ValueError, ZeroDivisionError) as err:
        log.warning("%s: EXIF GPS block is malformed (%s); ignored", path, err)
        return None
    if not (math.isfinite(lat) and math.isfinite(lon)):
        log.warning("%s: EXIF GPS (%s, %s) is not a number (a zero denominator); ignored", path, lat, lon)
        return None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        log.warning("%s: EXIF GPS (%s, %s) is out of range; ignored", path, lat, lon)
        return None
    if lat == 0 and lon == 0:
        # Cameras without a fix write 0/0/0, 0/0/0; the real (0, 0) is open sea, where no landmark is.
        log.warning("%s: EXIF GPS is (0, 0), what cameras write without a fix; ignored", path)
        return None
    return lat, lon


def read_gps_csv(csv_path: str | os.PathLike, lat_column: str = "lat", lon_column: str = "lon") -> dict[str, tuple[float, float]]:
    """``{absolute path: (lat, lon)}`` from a CSV with ``path`` and latitude/longitude columns.

    Relative paths are resolved against the CSV's folder. Rows with both coordinates empty are
    photos without GPS; a half-filled, non-numeric or out-of-range coordinate is an error naming
    the line.
    """
    csv_path = pathlib.Path(csv_path)
    table = read_text_csv(csv_path, "GPS CSV", GpsError)
    missing = [c for c in ("path", lat_column, lon_column) if c not in table.columns]
    if missing:
        raise GpsError(f"{csv_path}: missing column(s) {missing}; found {list(table.columns)}")
    out: dict[str, tuple[float, float]] = {}
    for line, (path, lat, lon) in enumerate(zip(table["path"], table[lat_column], table[lon_column]), start=2):
        value = parse_position(lat, lon, csv_path, line, lat_column, lon_column)
        if value is None:
            continue
        full = path if os.path.isabs(path) else str(csv_path.parent / path)
        out[os.path.abspath(full)] = value
    return out
