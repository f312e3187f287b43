"""Where a photo was taken (EXIF GPS or a CSV column), and the distance filter that uses it.

A phone photo taken in Berlin does not show the Eiffel Tower; if both the photo and a candidate
landmark have coordinates and they are farther apart than a radius, the candidate is rejected
and the next candidate within the radius (if any) takes its place. The filter can only remove
acceptances, never add one, so it never raises the calibrated false-positive rate.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from core.errors import UserError
from core.tables import read_text_csv

log = logging.getLogger(__name__)

__all__ = ["EARTH_RADIUS_KM", "GpsError", "haversine_km", "read_exif_gps", "read_gps_csv", "within_radius"]

#: Mean Earth radius (IUGG), km.
EARTH_RADIUS_KM = 6371.0088


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


def _degrees(dms, ref) -> float:
    d, m, s = (float(v) for v in dms)
    value = d + m / 60.0 + s / 3600.0
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    return -value if str(ref).strip().upper() in ("S", "W") else value


def read_exif_gps(path: str | os.PathLike) -> tuple[float, float] | None:
    """``(lat, lon)`` in degrees from a photo's EXIF GPS block, or None if it has none (or a broken one)."""
    try:
        with Image.open(path) as image:
            gps = image.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None  # unreadable files are reported by the recogniser itself
    tags = ExifTags.GPS
    try:
        lat = _degrees(gps[tags.GPSLatitude], gps.get(tags.GPSLatitudeRef, "N"))
        lon = _degrees(gps[tags.GPSLongitude], gps.get(tags.GPSLongitudeRef, "E"))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
        log.warning("%s: EXIF GPS (%s, %s) is out of range; ignored", path, lat, lon)
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
        lat, lon = lat.strip(), lon.strip()
        if not lat and not lon:
            continue
        try:
            value = (float(lat), float(lon))
        except ValueError:
            raise GpsError(f"{csv_path}: line {line}: {lat_column}={lat!r}, {lon_column}={lon!r} are not both numbers") from None
        if not (-90 <= value[0] <= 90 and -180 <= value[1] <= 180):
            raise GpsError(f"{csv_path}: line {line}: coordinates {value} out of range")
        full = path if os.path.isabs(path) else str(csv_path.parent / path)
        out[os.path.abspath(full)] = value
    return out
