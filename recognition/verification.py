"""Spatial verification of a query's top landmark candidates with local features (an index option).

What it does: ``landmarks index --verify`` stores, for each landmark, the local features (SIFT
keypoints and descriptors by default) of a few of its gallery photos (the photo nearest to each
of its centroids, then the next nearest, up to ``images_per_landmark``). At recognition, the
query's own features are matched (SIFT: Lowe's ratio test) against those photos of its ``candidates`` best landmarks by the
global score, a homography is fitted by OpenCV's USAC MAGSAC, and a candidate's score becomes

    global cosine + weight × min(inliers, inlier_cap)        (inliers: the best of its photos)

when the photo has at least ``min_keypoints`` keypoints and the fit at least ``min_inliers``
inliers, else the global cosine unchanged (the minimum-keypoint policy: a blank or tiny photo
is neither helped nor hurt). The index's threshold is calibrated on these verified scores of the
calibration photos, so an index built with ``--verify`` always verifies at recognition; its
decisions go through the one acceptance rule (:func:`retrieval.decision.decide`) like any other.

``--verify-local cnn`` (:class:`CnnExtractor`) replaces SIFT by DELF-style features: the index
model's own stride-16 feature map, its cells of largest activation norm as keypoints, matched as
mutual nearest neighbours.

Why it is off by default: on the real photos a small weight gains within the seed spread. With
SIFT, any weight large enough to matter loses recall at low FPR, because non-landmark photos
reach as many inliers against textured façades as true matches do. The SIFT parameters are the
measured best of that sweep: 500 keypoints at 480 px match as well as 1,000 at 640 px in a third
of the time; a weight of 0.001-0.002 with at least 25 inliers; lower minimums or larger weights
lose recall. With CNN cells, non-landmark photos reach at most 15 inliers, so 20 inliers and a
weight of 0.005 lose nothing; they gain +0.005 recall, also within the spread. Both are in
EXPERIMENTS.md, "spatial verification".

Storage (no pickle): four ``.npy`` files in the index directory, memory-mapped at load, described
by ``index.json``'s ``verification`` entry (format :data:`FORMAT`, version, parameters, counts)::

    local_keypoints.npy      float32 [K, 2]    x, y in the photo decoded at ``max_side``
    local_descriptors.npy    uint8   [K, 128]  SIFT descriptors (OpenCV's uint8 output), or
                             float16 [K, C]    CNN cells' unit descriptors (``local="cnn"``)
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


LOCAL_KINDS = ("sift", "cnn")


@dataclass(frozen=True)
class VerificationParams:
    """How photos are described and matched, and how many are verified per query (the bounds).

    ``local="sift"``: OpenCV SIFT keypoints, Lowe's ratio test. ``local="cnn"``: DELF-style
    features from the index's own network (:meth:`EmbeddingNet.local_feature_map` at stride 16):
    the ``n_features`` cells of largest activation norm, each an L2-normalised descriptor at its
    cell's centre, matched as mutual nearest neighbours. :meth:`for_local` gives each kind's
    measured defaults.
    """

    max_side: int = 480  # photos are decoded with the longer side at most this many pixels
    n_features: int = 500  # SIFT keypoints / CNN cells kept per photo (the strongest)
    ratio: float = 0.8  # Lowe's ratio test (SIFT)
    ransac_px: float = 5.0  # USAC MAGSAC reprojection threshold
    candidates: int = 3  # landmarks verified per query (its best by the global score)
    images_per_landmark: int = 5  # gallery photos stored (and matched) per landmark
    min_keypoints: int = 30  # fewer in the query or a stored photo: no verification for that pair
    min_inliers: int = 25  # fewer inliers add nothing: unrelated photos reach 8-25 (EXPERIMENTS.md)
    weight: float = 0.001  # score added per inlier
    inlier_cap: int = 50  # inliers beyond this add nothing
    local: str = "sift"  # the local features: "sift" or "cnn"

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1" for name in ("max_side", "n_features", "candidates", "images_per_landmark",
                                                        "inlier_cap") if getattr(self, name) < 1]
        if not 0 < self.ratio < 1:
            problems.append("ratio must lie in (0, 1)")
        if self.ransac_px <= 0 or self.weight < 0:
            problems.append("ransac_px must be > 0 and weight >= 0")
        if self.min_keypoints < 4 or self.min_inliers < 4:
            problems.append("min_keypoints and min_inliers must be >= 4 (a homography needs 4 points)")
        if self.local not in LOCAL_KINDS:
            problems.append(f"local features must be one of {LOCAL_KINDS}, got {self.local!r}")
        if problems:
            raise UserError("verification: " + "; ".join(problems))

    @classmethod
    def for_local(cls, local: str = "sift", **overrides) -> "VerificationParams":
        """The measured defaults of ``local`` features, with ``overrides`` (None values ignored).
        CNN cells are 16 px apart, so their homography tolerance is one cell; unrelated photos reach
        at most 15 inliers with them, true matches a median of 15 and 37 % reach 25 (EXPERIMENTS.md,
        "spatial verification"), so 20 inliers and a larger weight than SIFT's."""
        base = {"local": local} if local == "sift" else {"local": local, "ransac_px": CNN_STRIDE,
                                                          "min_inliers": 20, "weight": 0.005}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    @property
    def max_bonus(self) -> float:
        """The most verification can add to a score."""
        return self.weight * self.inlier_cap

    @classmethod
    def from_json(cls, data: dict) -> "VerificationParams":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


CNN_STRIDE = 16  # the feature map DELF-style features come from (pixels of the decoded photo per cell)


def make_sift(params: VerificationParams):
    """An OpenCV SIFT extractor for ``params`` (one per thread: OpenCV's detectors are not shared)."""
    # Positional: OpenCV 5 accepts descriptorType only after the other parameters (their defaults here).
    return cv2.SIFT_create(params.n_features, 3, 0.04, 10, 1.6, cv2.CV_8U)


class CnnExtractor:
    """DELF-style local features of a photo from ``net`` (an ``EmbeddingNet``): its feature map at
    stride 16 on the photo decoded at ``max_side``, the ``n_features`` cells of largest L2 norm
    (the norm stands in for DELF's learned attention), each an L2-normalised float16 descriptor
    placed at its cell's centre in the decoded photo's pixels."""

    def __init__(self, net, params: VerificationParams):
        import torch

        if net is None:
            raise ValueError("CNN local features need the index's network")
        self.net, self.params = net.eval(), params
        try:  # fail before any photo is read when the network has no stride-16 map
            with torch.no_grad():
                net.local_feature_map(torch.zeros(1, 3, 64, 64, device=next(net.parameters()).device), CNN_STRIDE)
        except ValueError as err:
            raise UserError(f"--verify-local cnn: {err}; use --verify-local sift with this model") from None

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        device = next(self.net.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(device).float() / 255.0
        with torch.no_grad():
            fmap = self.net.local_feature_map(x, CNN_STRIDE)[0].float().cpu()
        channels, h, w = fmap.shape
        norms = fmap.norm(dim=0).flatten()
        top = torch.topk(norms, min(self.params.n_features, norms.numel())).indices
        top = top[norms[top] > 0]
        desc = torch.nn.functional.normalize(fmap.flatten(1)[:, top].T, dim=1).numpy().astype(np.float16)
        rows, cols = (top // w).numpy(), (top % w).numpy()
        points = np.stack([(cols + 0.5) * rgb.shape[1] / w, (rows + 0.5) * rgb.shape[0] / h], axis=1)
        return points.astype(np.float32), desc


def make_extractor(params: VerificationParams, net=None):
    """``rgb uint8 [H, W, 3] -> (keypoints float32 [k, 2], descriptors [k, dim])`` for ``params.local``
    (one per thread); ``net`` (the index's ``EmbeddingNet``) is needed for CNN features."""
    if params.local == "cnn":
        return CnnExtractor(net, params)
    sift = make_sift(params)

    def extract_sift(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keypoints, descriptors = sift.detectAndCompute(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None)
        if descriptors is None or not keypoints:
            return no_features(params)
        return np.array([kp.pt for kp in keypoints], dtype=np.float32), np.ascontiguousarray(descriptors, np.uint8)

    return extract_sift


def extract(path: str, params: VerificationParams, extractor=None, net=None) -> tuple[np.ndarray, np.ndarray]:
    """``(keypoints float32 [k, 2], descriptors [k, dim])`` of one photo (k may be 0): SIFT's
    uint8 [k, 128], or the CNN's float16 [k, channels].

    Raises :class:`datamodules.images.UnreadableImage` naming the file if it cannot be decoded.
    """
    return (extractor or make_extractor(params, net))(load_rgb(path, max_side=params.max_side))


def no_features(params: VerificationParams | None = None, dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The features of a photo without keypoints (it never verifies)."""
    dtype = np.float16 if params is not None and params.local == "cnn" else np.uint8
    return np.zeros((0, 2), np.float32), np.zeros((0, dim), dtype)


def query_features(path: str, params: VerificationParams, extractor=None, net=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`extract` for a photo being recognised: one that cannot be read gets no keypoints,
    so its global score stands (the minimum-keypoint policy)."""
    try:
        return extract(path, params, extractor, net)
    except (UnreadableImage, OSError, ValueError):
        return no_features(params)


def match_descriptors(dq: np.ndarray, dg: np.ndarray, params: VerificationParams) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(query rows, photo rows)`` of matched descriptors."""
    if params.local == "cnn":
        # Mutual nearest neighbours by cosine: CNN descriptors of neighbouring cells are too alike
        # for a ratio test (the second neighbour is nearly as close as the first).
        sims = dq.astype(np.float32) @ np.asarray(dg, np.float32).T
        forward, backward = sims.argmax(axis=1), sims.argmax(axis=0)
        mutual = np.flatnonzero(backward[forward] == np.arange(len(dq)))
        return mutual, forward[mutual]
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dq.astype(np.float32), np.asarray(dg, np.float32), k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < params.ratio * n.distance]
    return np.array([m.queryIdx for m in good], np.int64), np.array([m.trainIdx for m in good], np.int64)


def count_inliers(query: tuple[np.ndarray, np.ndarray], photo: tuple[np.ndarray, np.ndarray],
                  params: VerificationParams) -> int:
    """Inliers of a homography between two photos' features (0 below the keypoint minimum or
    with fewer than 4 matches)."""
    (kq, dq), (kg, dg) = query, photo
    if len(kq) < params.min_keypoints or len(kg) < params.min_keypoints:
        return 0
    q_rows, g_rows = match_descriptors(dq, dg, params)
    if len(q_rows) < 4:
        return 0
    src = kq[q_rows].reshape(-1, 1, 2)
    dst = np.asarray(kg)[g_rows].reshape(-1, 1, 2)
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
        dtype = np.float16 if params.local == "cnn" else np.uint8
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0 or self.offsets[-1] != len(keypoints) \
                or np.any(np.diff(self.offsets) < 0) or len(descriptors) != len(keypoints) \
                or keypoints.shape[1:] != (2,) or descriptors.ndim != 2 or descriptors.dtype != dtype \
                or (params.local == "sift" and descriptors.shape[1] != 128):
            raise ValueError(f"inconsistent {params.local} local features: {n} photos, offsets {self.offsets.shape}, "
                             f"keypoints {keypoints.shape}, descriptors {descriptors.shape} {descriptors.dtype}")
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(self.landmark.tolist()):
            groups.setdefault(row, []).append(i)
        self._by_landmark = {row: np.asarray(photos) for row, photos in groups.items()}

    @classmethod
    def extract(cls, paths: Sequence[str], landmark: np.ndarray, params: VerificationParams,
                progress: bool = False, cache: dict | None = None, net=None) -> "LocalFeatures":
        """Features of ``paths`` (landmark rows ``landmark``); an unreadable photo keeps no keypoints.
        ``cache`` maps paths to features already extracted with ``params`` (a benchmark's); ``net``
        is the index's network (CNN features)."""
        extractor = make_extractor(params, net)
        points, descs, offsets, skipped = [], [], [0], 0
        iterator = paths
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(paths, desc="local features", unit="img")
        for path in iterator:
            try:
                kp, desc = cache[path] if cache is not None and path in cache else extract(path, params, extractor)
            except UnreadableImage as err:
                log.warning("verification: %s; stored without keypoints", err)
                kp, desc = no_features(params)
            skipped += len(kp) < params.min_keypoints
            points.append(kp)
            descs.append(desc)
            offsets.append(offsets[-1] + len(kp))
        if skipped:
            log.info("verification: %d of %d gallery photos have fewer than %d keypoints and never verify",
                     skipped, len(paths), params.min_keypoints)
        dim = max((d.shape[1] for d in descs), default=128)  # a CNN's channels; photos without cells too
        descs = [d if len(d) else no_features(params, dim)[1] for d in descs]
        empty = no_features(params, dim)
        return cls(np.concatenate(points) if points else empty[0], np.concatenate(descs) if descs else empty[1],
                   np.asarray(offsets, np.int64), np.asarray(landmark, np.int64), params)

    @classmethod
    def for_index(cls, index, embeddings: np.ndarray, landmark_ids: Sequence[str], paths: Sequence[str],
                  params: VerificationParams, progress: bool = False, cache: dict | None = None,
                  net=None) -> "LocalFeatures":
        """What ``landmarks index --verify`` stores for ``index``, built from the gallery photos
        ``paths`` with their unit ``embeddings`` and ``landmark_ids``: the :func:`choose_photos`
        of each landmark, extracted."""
        row_of = {landmark_id: row for row, landmark_id in enumerate(index.landmark_ids)}
        photo_rows = np.array([row_of.get(i, -1) for i in landmark_ids], dtype=np.int64)
        chosen = choose_photos(embeddings, photo_rows, index.vectors, index.vector_landmark, params.images_per_landmark)
        return cls.extract([paths[i] for i in chosen], photo_rows[chosen], params, progress=progress, cache=cache,
                           net=net)

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
                      progress: bool = False, net=None) -> tuple[np.ndarray, np.ndarray]:
        """``(score float32 [n], landmark row int64 [n])``: each photo's decision score after
        verification (its best rescored candidate), as the recogniser computes it, and that
        candidate's landmark; used to calibrate the threshold. An unreadable photo keeps its global
        score. ``net``: the index's network (CNN features)."""
        extractor = make_extractor(self.params, net)
        out = np.empty(len(paths), dtype=np.float32)
        best = np.empty(len(paths), dtype=np.int64)
        iterator = range(len(paths))
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="verify calibration", unit="img")
        for i in iterator:
            rescored = self.rescore(query_features(paths[i], self.params, extractor), scores[i], rows[i])
            j = int(np.argmax(rescored))
            out[i], best[i] = rescored[j], rows[i][j]
        return out, best

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
