"""Spatial verification of a query's top landmark candidates with local features (an index option).

What it does: ``landmarks index --verify`` stores, for each landmark, the SIFT keypoints and
descriptors of a few of its gallery photos (the photo nearest to each of its centroids, then the
next nearest, up to ``images_per_landmark``). At recognition, the query's own SIFT features are
matched (Lowe's ratio test) against those photos of its ``candidates`` best landmarks by the
global score, a homography is fitted by OpenCV's USAC MAGSAC, and a candidate's score becomes

    global cosine + weight × min(inliers, inlier_cap)        (inliers: the best of its photos)

when the photo has at least ``min_keypoints`` keypoints and the fit at least ``min_inliers``
inliers, else the global cosine unchanged (the minimum-keypoint policy: a blank or tiny photo
is neither helped nor hurt). The index's threshold is calibrated on these verified scores of the
calibration photos, so an index built with ``--verify`` always verifies at recognition; its
decisions go through the one acceptance rule (:func:`retrieval.decision.decide`) like any other.

Why it is off by default: on the real photos a small weight gains within the seed spread and
any weight large enough to matter loses recall at low FPR, because non-landmark photos reach as
many inliers against textured façades as true matches do (EXPERIMENTS.md, "spatial
verification"). The parameters are the measured best of that sweep: 500 keypoints at 480 px match
as well as 1,000 at 640 px in a third of the time; a weight of 0.001-0.002 with at least 25
inliers; lower minimums or larger weights lose recall.

Storage (no pickle): four ``.npy`` files in the index directory, memory-mapped at load, described
by ``index.json``'s ``verification`` entry (format :data:`FORMAT`, version, parameters, counts)::

    local_keypoints.npy      float32 [K, 2]    x, y in the photo decoded at ``max_side``
    local_descriptors.npy    uint8   [K, 128]  SIFT descriptors (OpenCV's uint8 output)
    local_offsets.npy        int64   [n + 1]   photo i owns rows offsets[i]:offsets[i+1]
    local_landmark.npy       int64   [n]       landmark row of each stored photo
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from core.errors import UserError
from datamodules.images import UnreadableImage, load_rgb

log = logging.getLogger(__name__)

FORMAT = "landmark-local-features"
FORMAT_VERSION = 1
FILES = ("local_keypoints.npy", "local_descriptors.npy", "local_offsets.npy", "local_landmark.npy")


@dataclass(frozen=True)
class VerificationParams:
    """How photos are described and matched, and how many are verified per query (the bounds)."""

    max_side: int = 480  # photos are decoded with the longer side at most this many pixels
    n_features: int = 500  # SIFT keypoints kept per photo (the strongest)
    ratio: float = 0.8  # Lowe's ratio test
    ransac_px: float = 5.0  # USAC MAGSAC reprojection threshold
    candidates: int = 3  # landmarks verified per query (its best by the global score)
    images_per_landmark: int = 5  # gallery photos stored (and matched) per landmark
    min_keypoints: int = 30  # fewer in the query or a stored photo: no verification for that pair
    min_inliers: int = 25  # fewer inliers add nothing: unrelated photos reach 8-25 (EXPERIMENTS.md)
    weight: float = 0.001  # score added per inlier
    inlier_cap: int = 50  # inliers beyond this add nothing

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1" for name in ("max_side", "n_features", "candidates", "images_per_landmark",
                                                        "inlier_cap") if getattr(self, name) < 1]
        if not 0 < self.ratio < 1:
            problems.append("ratio must lie in (0, 1)")
        if self.ransac_px <= 0 or self.weight < 0:
            problems.append("ransac_px must be > 0 and weight >= 0")
        if self.min_keypoints < 4 or self.min_inliers < 4:
            problems.append("min_keypoints and min_inliers must be >= 4 (a homography needs 4 points)")
        if problems:
            raise UserError("verification: " + "; ".join(problems))

    @property
    def max_bonus(self) -> float:
        """The most verification can add to a score."""
        return self.weight * self.inlier_cap

    @classmethod
    def from_json(cls, data: dict) -> "VerificationParams":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def make_sift(params: VerificationParams):
    """An OpenCV SIFT extractor for ``params`` (one per thread: OpenCV's detectors are not shared)."""
    # Positional: OpenCV 5 accepts descriptorType only after the other parameters (their defaults here).
    return cv2.SIFT_create(params.n_features, 3, 0.04, 10, 1.6, cv2.CV_8U)


def extract(path: str, params: VerificationParams, sift=None) -> tuple[np.ndarray, np.ndarray]:
    """``(keypoints float32 [k, 2], descriptors uint8 [k, 128])`` of one photo (k may be 0).

    Raises :class:`datamodules.images.UnreadableImage` naming the file if it cannot be decoded.
    """
    gray = cv2.cvtColor(load_rgb(path, max_side=params.max_side), cv2.COLOR_RGB2GRAY)
    keypoints, descriptors = (sift or make_sift(params)).detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return no_features()
    points = np.array([kp.pt for kp in keypoints], dtype=np.float32)
    return points, np.ascontiguousarray(descriptors, dtype=np.uint8)


def no_features() -> tuple[np.ndarray, np.ndarray]:
    """The features of a photo without keypoints (it never verifies)."""
    return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8)


def query_features(path: str, params: VerificationParams, sift=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract` for a photo being recognised: one that cannot be read gets no keypoints,
    so its global score stands (the minimum-keypoint policy)."""
    try:
        return extract(path, params, sift)
    except (UnreadableImage, OSError, ValueError):
        return no_features()


def count_inliers(query: tuple[np.ndarray, np.ndarray], photo: tuple[np.ndarray, np.ndarray],
                  params: VerificationParams) -> int:
    """Inliers of a homography between two photos' features (0 below the keypoint minimum or
    with fewer than 4 ratio-test matches)."""
    (kq, dq), (kg, dg) = query, photo
    if len(kq) < params.min_keypoints or len(kg) < params.min_keypoints:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dq.astype(np.float32), np.asarray(dg, np.float32), k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < params.ratio * n.distance]
    if len(good) < 4:
        return 0
    src = kq[[m.queryIdx for m in good]].reshape(-1, 1, 2)
    dst = np.asarray(kg)[[m.trainIdx for m in good]].reshape(-1, 1, 2)
    _, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, params.ransac_px)
    return 0 if mask is None else int(mask.sum())


def inlier_bonus(inliers: np.ndarray, params: VerificationParams) -> np.ndarray:
    """What verification adds to a candidate's score: ``weight × min(inliers, inlier_cap)``, and
    nothing below ``min_inliers`` (so few chance matches between unrelated photos never count)."""
    inliers = np.asarray(inliers)
    bonus = params.weight * np.minimum(inliers, params.inlier_cap)
    return np.where(inliers >= params.min_inliers, bonus, 0.0).astype(np.float32)


def choose_photos(embeddings: np.ndarray, landmark: np.ndarray, vectors: np.ndarray, vector_landmark: np.ndarray,
                  per_landmark: int) -> np.ndarray:
    """Positions of the gallery photos to store: per landmark, the photo nearest to each of its
    index vectors first (one per shooting angle), then the photos nearest to any of them, up to
    ``per_landmark``. ``landmark``/``vector_landmark`` are landmark rows of photos and vectors."""
    chosen: list[int] = []
    for row in np.unique(vector_landmark):
        members = np.flatnonzero(landmark == row)
        if not len(members):
            continue
        sims = embeddings[members] @ vectors[vector_landmark == row].T  # [photos, vectors]
        picked: list[int] = []
        for col in np.argsort(-sims.max(axis=0)):  # vectors, best-matched first
            best = int(members[np.argmax(sims[:, col])])
            if best not in picked:
                picked.append(best)
        for pos in np.argsort(-sims.max(axis=1), kind="stable"):
            if len(picked) >= per_landmark:
                break
            if int(members[pos]) not in picked:
                picked.append(int(members[pos]))
        chosen.extend(picked[:per_landmark])
    return np.asarray(chosen, dtype=np.int64)


class LocalFeatures:
    """Stored local features of the verified gallery photos (see the module docstring)."""

    def __init__(self, keypoints: np.ndarray, descriptors: np.ndarray, offsets: np.ndarray, landmark: np.ndarray,
                 params: VerificationParams):
        self.keypoints, self.descriptors = keypoints, descriptors
        self.offsets, self.landmark, self.params = np.asarray(offsets), np.asarray(landmark), params
        n = len(self.landmark)
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0 or self.offsets[-1] != len(keypoints) \
                or np.any(np.diff(self.offsets) < 0) or len(descriptors) != len(keypoints) \
                or keypoints.shape[1:] != (2,) or descriptors.shape[1:] != (128,):
            raise ValueError(f"inconsistent local features: {n} photos, offsets {self.offsets.shape}, "
                             f"keypoints {keypoints.shape}, descriptors {descriptors.shape}")
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(self.landmark.tolist()):
            groups.setdefault(row, []).append(i)
        self._by_landmark = {row: np.asarray(photos) for row, photos in groups.items()}

    @classmethod
    def extract(cls, paths: Sequence[str], landmark: np.ndarray, params: VerificationParams,
                progress: bool = False, cache: dict | None = None) -> "LocalFeatures":
        """Features of ``paths`` (landmark rows ``landmark``); an unreadable photo keeps no keypoints.
        ``cache`` maps paths to features already extracted with ``params`` (a benchmark's)."""
        sift = make_sift(params)
        points, descs, offsets, skipped = [], [], [0], 0
        iterator = paths
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(paths, desc="local features", unit="img")
        for path in iterator:
            try:
                kp, desc = cache[path] if cache is not None and path in cache else extract(path, params, sift)
            except UnreadableImage as err:
                log.warning("verification: %s; stored without keypoints", err)
                kp, desc = no_features()
            skipped += len(kp) < params.min_keypoints
            points.append(kp)
            descs.append(desc)
            offsets.append(offsets[-1] + len(kp))
        if skipped:
            log.info("verification: %d of %d gallery photos have fewer than %d keypoints and never verify",
                     skipped, len(paths), params.min_keypoints)
        empty = no_features()
        return cls(np.concatenate(points) if points else empty[0], np.concatenate(descs) if descs else empty[1],
                   np.asarray(offsets, np.int64), np.asarray(landmark, np.int64), params)

    @classmethod
    def for_index(cls, index, embeddings: np.ndarray, landmark_ids: Sequence[str], paths: Sequence[str],
                  params: VerificationParams, progress: bool = False, cache: dict | None = None) -> "LocalFeatures":
        """What ``landmarks index --verify`` stores for ``index``, built from the gallery photos
        ``paths`` with their unit ``embeddings`` and ``landmark_ids``: the :func:`choose_photos`
        of each landmark, extracted."""
        row_of = {landmark_id: row for row, landmark_id in enumerate(index.landmark_ids)}
        photo_rows = np.array([row_of.get(i, -1) for i in landmark_ids], dtype=np.int64)
        chosen = choose_photos(embeddings, photo_rows, index.vectors, index.vector_landmark, params.images_per_landmark)
        return cls.extract([paths[i] for i in chosen], photo_rows[chosen], params, progress=progress, cache=cache)

    def photo(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.keypoints[a:b], self.descriptors[a:b]

    def candidate_inliers(self, query: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Per candidate landmark row: the most inliers of the query with any of its stored photos,
        for the first ``candidates`` rows (0 for the rest and for landmarks without photos)."""
        inliers = np.zeros(len(rows), dtype=np.int64)
        for j in range(min(self.params.candidates, len(rows))):
            photos = self._by_landmark.get(int(rows[j]))
            if rows[j] >= 0 and photos is not None:
                inliers[j] = max(count_inliers(query, self.photo(int(i)), self.params) for i in photos)
        return inliers

    def rescore(self, query: tuple[np.ndarray, np.ndarray], scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Verified scores of one query's candidates (``scores``/``rows`` from
        :meth:`LandmarkIndex.search`, best first): the first ``candidates`` rows are verified."""
        return np.asarray(scores, dtype=np.float32) + inlier_bonus(self.candidate_inliers(query, rows), self.params)

    def verified_top1(self, paths: Sequence[str], scores: np.ndarray, rows: np.ndarray,
                      progress: bool = False) -> np.ndarray:
        """The decision score of each photo after verification (its best rescored candidate), as
        the recogniser computes it; used to calibrate the threshold. An unreadable photo keeps its
        global score."""
        sift = make_sift(self.params)
        out = np.empty(len(paths), dtype=np.float32)
        iterator = range(len(paths))
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="verify calibration", unit="img")
        for i in iterator:
            out[i] = self.rescore(query_features(paths[i], self.params, sift), scores[i], rows[i]).max()
        return out

    # ---- persistence ---------------------------------------------------------------------------

    def header(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "params": dataclasses.asdict(self.params),
                "n_photos": int(len(self.landmark)), "n_keypoints": int(len(self.keypoints)), "files": list(FILES)}

    def save(self, directory: pathlib.Path) -> None:
        for name, array in zip(FILES, (self.keypoints, self.descriptors, self.offsets, self.landmark)):
            np.save(directory / name, np.ascontiguousarray(array), allow_pickle=False)

    @classmethod
    def load(cls, directory: pathlib.Path, header: dict) -> "LocalFeatures":
        """Memory-mapped features; raises ValueError naming what disagrees with ``header``."""
        if header.get("format") != FORMAT or header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"local features are {header.get('format')!r} version {header.get('format_version')!r}, "
                             f"this code reads {FORMAT!r} version {FORMAT_VERSION}")
        missing = [name for name in FILES if not (directory / name).is_file()]
        if missing:
            raise ValueError(f"missing local-feature file(s) {missing}")
        arrays = [np.load(directory / name, mmap_mode="r", allow_pickle=False) for name in FILES]
        features = cls(*arrays, VerificationParams.from_json(header.get("params", {})))
        if len(features.landmark) != header.get("n_photos") or len(features.keypoints) != header.get("n_keypoints"):
            raise ValueError(f"header says {header.get('n_photos')} photos / {header.get('n_keypoints')} keypoints, "
                             f"the files hold {len(features.landmark)} / {len(features.keypoints)}")
        return features
