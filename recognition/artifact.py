"""The recognition index artifact: a versioned directory, written atomically, with no pickle.

Layout of an index directory (format version :data:`FORMAT_VERSION`)::

    index.json            header: format + version, model identity and how to reload the model,
                          calibrated threshold (and, with ``--gps-radius-km``, the threshold for
                          photos with a position, ``gps_calibration``), build parameters (with the absolute paths of the
                          manifest, the calibration set, its hardest photos and their landmarks' nearest DB
                          photos), counts, file list
    vectors.faiss         the FAISS index over the vectors (faiss.write_index)
    vectors.npy           float32 [m, d] the indexed vectors themselves (exact; allow_pickle=False),
                          so an approximate index can be rebuilt and a round trip checked
    vector_landmark.npy   int64 [m] row of landmarks.json each vector stands for
    vector_size.npy       int64 [m] gallery images summarised by each vector
    landmarks.json        per landmark: landmark_id, name, city, lat, lon, n_images, n_centroids
    local_*.npy           only with ``landmarks index --verify``: the verified gallery photos' SIFT
                          features (recognition.verification; memory-mapped at load)
    penalty_pool.npy      only with ``--nonlandmark-pool``: float32 [p, d] unit embeddings of known
                          non-landmark photos; every score is lowered by ``weight`` × the query's
                          mean cosine to its ``k`` nearest of them (``index.json``: ``nonlandmark_penalty``)
    hardest_calibration_photos.jpg  written by ``landmarks index`` beside the artifact, not read
                          back: the first 8 calibration photos listed in ``index.json``, each above
                          its landmark's nearest DB photo
    whitening_mean.npy,   only with ``--whiten``: float32 [d] and [d, d], the PCA-whitening applied to
    whitening_projection.npy  every embedding before it meets the index (``index.json``: ``descriptors``,
                          with the DBA and query-expansion settings; :mod:`recognition.descriptors`)

A directory is built under a temporary name next to the target and renamed into place, so a
reader never sees half an index and a failed build leaves the previous index untouched.
Loading checks the format name, the version and that every part agrees on the vector count and
the embedding size; :meth:`LandmarkIndex.check_model` refuses embeddings from another model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import faiss
import numpy as np

from core.atomic import replace_dir
from core.errors import UserError
from recognition.calibration import Calibration
from recognition.centroids import CentroidParams, CentroidSet, Representation, build_representation
from recognition.descriptors import DescriptorParams, Whitening, augment_database, weighted_neighbours
from recognition.gps import GpsCalibration
from recognition.verification import LocalFeatures
from retrieval.index import build_index, search, validate_embeddings

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "INDEX_KINDS", "IndexFormatError", "LandmarkIndex", "ModelMismatchError",
    "PenaltyParams", "landmark_metadata",
]


@dataclass(frozen=True)
class PenaltyParams:
    """The non-landmark penalty's defaults (``landmarks index --nonlandmark-pool``, the demo, and
    the evaluation's shipped decision): a score is lowered by ``weight`` × the photo's mean cosine
    to its ``k`` nearest pool photos. Chosen on the demo chain (EXPERIMENTS.md, "non-landmark
    penalty"): weight 0.25 of 0.1–1, k 1 of 1 and 5."""

    weight: float = 0.25
    k: int = 1


FORMAT = "landmark-recognition-index"
#: Version 2 added the descriptor post-processing (``descriptors`` in the header). A version-1
#: index has none and reads the same; a version-1 reader refuses version 2, so an index that
#: whitens its queries is never searched with raw ones.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
INDEX_KINDS = ("flat", "ivf", "ivfpq", "hnsw")
HEADER = "index.json"
_FILES = ("vectors.faiss", "vectors.npy", "vector_landmark.npy", "vector_size.npy", "landmarks.json")
# Top-k landmarks need k * (vectors per landmark) neighbours to be exact; for a full-gallery
# representation that can be thousands, so the search depth is capped.
_MAX_SEARCH_DEPTH = 1024
_WHITENING_FILES = ("whitening_mean.npy", "whitening_projection.npy")


class IndexFormatError(UserError):
    """A directory is not a recognition index this code can read."""


class ModelMismatchError(UserError):
    """Embeddings come from a model other than the one the index was built with."""


def _faiss_index(vectors: np.ndarray, kind: str, params: dict) -> faiss.Index:
    if kind in ("flat", "ivf", "hnsw"):
        return build_index(vectors, kind=kind, **params)
    if kind != "ivfpq":
        raise ValueError(f"unknown index kind {kind!r}; expected one of {INDEX_KINDS}")
    x = validate_embeddings(vectors, "index vectors")
    n, d = x.shape
    nlist = int(params.get("nlist") or max(1, min(int(round(4 * math.sqrt(n))), n // 39)))
    pq_m = int(params.get("pq_m") or max(1, d // 16))
    nbits = int(params.get("pq_bits", 8))
    if d % pq_m:
        raise ValueError(f"ivfpq: pq_m={pq_m} must divide the embedding size {d}")
    if n < max(nlist, 2**nbits):
        raise ValueError(
            f"ivfpq needs at least max(nlist={nlist}, 2^pq_bits={2**nbits}) vectors to train, got {n}; "
            "use the exact 'flat' index for an index this small"
        )
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(params.get("seed", 1234))
    index.train(x)
    index.add(x)
    index.nprobe = max(1, min(int(params.get("nprobe", 16)), nlist))
    return index


def _apply_search_params(index: faiss.Index, params: dict) -> None:
    """Query-time settings that faiss.write_index does not keep (IVF nprobe, HNSW efSearch)."""
    ivf = faiss.try_extract_index_ivf(index) if not isinstance(index, faiss.IndexFlat) else None
    if ivf is not None:
        ivf.nprobe = max(1, min(int(params.get("nprobe", 16)), ivf.nlist))
    elif hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(params.get("ef_search", 128))


def _write_json(path: pathlib.Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _json_number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def check_index_target(directory: str | os.PathLike, overwrite: bool = True) -> pathlib.Path:
    """The absolute path an index may be written to; FileExistsError if something else is there.

    An existing folder is replaced only if it is itself an index (has ``index.json``), so a
    mistyped ``--out`` never wipes someone's photo folder. ``landmarks index`` asks before it
    embeds anything, :meth:`LandmarkIndex.save` again before it writes.
    """
    target = pathlib.Path(directory).absolute()
    if target.exists():
        if not (target / HEADER).is_file():
            raise FileExistsError(f"{target} exists and is not a landmark index; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{target} exists")
    return target


@dataclass
class LandmarkIndex:
    """Landmark vectors with their FAISS index, metadata, model identity and threshold.

    Attributes:
        vectors: float32 ``[m, d]`` unit-norm rows (centroids, means or gallery embeddings).
        vector_landmark: int64 ``[m]`` row of :attr:`landmarks` each vector belongs to.
        vector_size: int64 ``[m]`` gallery images behind each vector.
        landmarks: one dict per landmark: ``landmark_id, name, city, lat, lon, n_images, n_centroids``.
        model: ``{"identity": ..., "key": ..., "source": ...}`` (``source`` says how to reload it).
        calibration: the threshold and what it was calibrated for, or None (uncalibrated).
        build: how the index was built (representation, clustering, index kind, inputs).
        faiss_index: built from :attr:`vectors` with ``build["index_kind"]`` when not given.
        local_features: the stored features for spatial verification, or None (no verification).
            An index that has them calibrated its threshold on verified scores, so it verifies.
        penalty: the non-landmark penalty, or None: ``{"pool": float32 [p, d] unit rows,
            "weight": w, "k": k, ...}``. Scores from :meth:`search` and :meth:`top1` are then
            lowered by ``w`` × the query's mean cosine to its ``k`` nearest pool photos (see
            :meth:`set_penalty`); the threshold is calibrated on those scores.
        descriptor_params: the descriptor post-processing (:mod:`recognition.descriptors`; all off
            by default). :attr:`vectors` were built from whitened (and DBA-augmented) embeddings;
            :meth:`search` and :meth:`top1` take the model's raw embeddings and whiten and expand
            them (:meth:`describe`) themselves.
        whitening: the fitted PCA-whitening, present exactly when ``descriptor_params.whiten > 0``.
        gps_calibration: the threshold for photos with a position, calibrated with the GPS filter
            (:func:`recognition.gps.calibrate_with_gps`), or None.
        represented: bool ``[n]`` over the photos the index was built from (:meth:`from_centroids`,
            :meth:`from_embeddings`): False for those in clusters dropped as too small. A fact of the
            build, not of the artifact: not saved, None after :meth:`load`.
    """

    vectors: np.ndarray
    vector_landmark: np.ndarray
    vector_size: np.ndarray
    landmarks: list[dict]
    model: dict
    calibration: Calibration | None = None
    build: dict = field(default_factory=dict)
    faiss_index: faiss.Index | None = field(default=None, repr=False)
    local_features: LocalFeatures | None = field(default=None, repr=False)
    penalty: dict | None = field(default=None, repr=False)
    descriptor_params: DescriptorParams = field(default_factory=DescriptorParams)
    whitening: Whitening | None = field(default=None, repr=False)
    represented: np.ndarray | None = field(default=None, repr=False, compare=False)
    gps_calibration: GpsCalibration | None = None

    def __post_init__(self):
        self.vectors = validate_embeddings(self.vectors, "index vectors")
        self.vector_landmark = np.asarray(self.vector_landmark, dtype=np.int64)
        self.vector_size = np.asarray(self.vector_size, dtype=np.int64)
        m = len(self.vectors)
        if m == 0:
            raise ValueError("an index needs at least one vector")
        if self.vector_landmark.shape != (m,) or self.vector_size.shape != (m,):
            raise ValueError(
                f"{m} vectors but {self.vector_landmark.shape} landmark rows and {self.vector_size.shape} sizes"
            )
        if self.vector_landmark.min() < 0 or self.vector_landmark.max() >= len(self.landmarks):
            raise ValueError(f"vector_landmark must index the {len(self.landmarks)} landmarks")
        size = int(self.model.get("identity", {}).get("embedding_size", self.vectors.shape[1]))
        if size != self.vectors.shape[1]:
            raise ValueError(f"model embedding size {size} != vector dimension {self.vectors.shape[1]}")
        self.build.setdefault("index_kind", "flat")
        self.build.setdefault("index_params", {})
        if self.faiss_index is None:
            self.faiss_index = _faiss_index(self.vectors, self.build["index_kind"], self.build["index_params"])
        else:
            _apply_search_params(self.faiss_index, self.build["index_params"])
        if self.faiss_index.ntotal != m or self.faiss_index.d != self.vectors.shape[1]:
            raise ValueError(
                f"faiss index holds {self.faiss_index.ntotal} x {self.faiss_index.d} but there are "
                f"{m} x {self.vectors.shape[1]} vectors"
            )
        self._max_per_landmark = int(np.bincount(self.vector_landmark).max())
        if (self.whitening is not None) != (self.descriptor_params.whiten > 0):
            raise ValueError(f"whitening power {self.descriptor_params.whiten} but "
                             f"{'a' if self.whitening is not None else 'no'} fitted whitening")
        if self.whitening is not None and self.whitening.mean.shape[0] != self.vectors.shape[1]:
            raise ValueError(f"the whitening is {self.whitening.mean.shape[0]}-d, the vectors "
                             f"{self.vectors.shape[1]}-d")
        if self.penalty is not None:
            self.set_penalty(**self.penalty)

    def set_penalty(self, pool: np.ndarray, weight: float, k: int, **info) -> None:
        """Lower every score by ``weight`` × the query's mean cosine to its ``k`` nearest rows of
        ``pool`` (known non-landmark photos, the model's unit embeddings; whitened here like a
        query): a photo that looks like non-landmarks needs a higher similarity to a landmark to
        be accepted. ``info`` is kept in the header."""
        pool = validate_embeddings(pool, "non-landmark pool")
        if pool.shape[1] != self.embedding_size:
            raise ValueError(f"non-landmark pool is {pool.shape[1]}-d, the index is {self.embedding_size}-d")
        if not weight >= 0 or not 1 <= int(k) <= len(pool):
            raise ValueError(f"the non-landmark penalty needs weight >= 0 and 1 <= k <= {len(pool)} pool photos, "
                             f"got weight={weight}, k={k}")
        self.penalty = {"pool": pool, "weight": float(weight), "k": int(k), **info}
        self._pool_index = build_index(self.whiten(pool), kind="flat")

    def nonlandmark_penalty(self, embeddings: np.ndarray, memory_budget_mb: float = 256) -> np.ndarray:
        """float32 ``[n]``: what :meth:`search` subtracts from each query's scores (0 without a pool)."""
        return self._penalty(self.describe(embeddings, memory_budget_mb), memory_budget_mb)

    def _penalty(self, described: np.ndarray, memory_budget_mb: float) -> np.ndarray:
        if self.penalty is None:
            return np.zeros(len(described), dtype=np.float32)
        sims, _ = search(self._pool_index, described, self.penalty["k"], memory_budget_mb=memory_budget_mb)
        return (self.penalty["weight"] * sims.mean(axis=1)).astype(np.float32)

    def whiten(self, embeddings: np.ndarray) -> np.ndarray:
        """The model's unit embeddings in the space of :attr:`vectors` (unchanged without whitening)."""
        return embeddings if self.whitening is None else self.whitening(embeddings)

    def describe(self, embeddings: np.ndarray, memory_budget_mb: float = 256) -> np.ndarray:
        """The model's embeddings as this index compares them: whitened, then query-expanded
        (identity when the index has neither)."""
        q = validate_embeddings(embeddings, "query embeddings")
        if q.shape[1] != self.embedding_size:
            raise ModelMismatchError(f"query embeddings are {q.shape[1]}-d, the index is {self.embedding_size}-d")
        if len(q) == 0:
            return q
        q = self.whiten(q)
        if self.descriptor_params.query_expansion:
            q = weighted_neighbours(q, self.vectors, self.descriptor_params.query_expansion,
                                    self.descriptor_params.alpha, index=self.faiss_index,
                                    memory_budget_mb=memory_budget_mb)
        return q

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_centroids(
        cls,
        centroids: CentroidSet,
        model: dict,
        metadata: dict[str, dict] | None = None,
        index_kind: str = "flat",
        index_params: dict | None = None,
        build: dict | None = None,
        descriptor_params: DescriptorParams = DescriptorParams(),
        whitening: Whitening | None = None,
    ) -> "LandmarkIndex":
        """An (uncalibrated) index over ``centroids``.

        ``metadata`` maps landmark id -> ``{name, city, lat, lon}`` (any subset; missing = None).
        ``centroids`` are in the space ``whitening`` maps to, when there is one.
        """
        metadata = metadata or {}
        per_landmark = centroids.centroids_per_landmark
        landmarks = []
        for row, landmark_id in enumerate(centroids.landmark_ids):
            meta = metadata.get(landmark_id, {})
            landmarks.append({
                "landmark_id": landmark_id,
                "name": meta.get("name") or None,
                "city": meta.get("city") or None,
                "lat": _json_number(meta.get("lat")),
                "lon": _json_number(meta.get("lon")),
                "n_images": int(centroids.images_per_landmark[row]),
                "n_centroids": int(per_landmark[row]),
            })
        info = dict(build or {})
        info.update(index_kind=index_kind, index_params=dict(index_params or {}),
                    dropped_images=int(centroids.dropped_images))
        return cls(centroids.vectors, centroids.landmark, centroids.sizes, landmarks, model, None, info,
                   descriptor_params=descriptor_params, whitening=whitening, represented=centroids.represented)

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        landmark_ids: Sequence[str],
        model: dict | None = None,
        representation: Representation = "centroids",
        params: CentroidParams = CentroidParams(),
        metadata: dict[str, dict] | None = None,
        index_kind: str = "flat",
        index_params: dict | None = None,
        build: dict | None = None,
        progress: bool = False,
        descriptor_params: DescriptorParams = DescriptorParams(),
        unlabelled: np.ndarray | None = None,
    ) -> "LandmarkIndex":
        """The (uncalibrated) index that ``landmarks index`` builds from a database's embeddings.

        :func:`recognition.centroids.build_representation` then :meth:`from_centroids`, with the
        command's defaults (shooting-angle centroids, :class:`CentroidParams` defaults, an exact
        flat index). ``model`` may be omitted for an index that is never saved (an evaluation).
        ``descriptor_params`` whitens (fitted on ``embeddings`` plus ``unlabelled`` photos, e.g. the
        non-landmark pool) and augments (DBA) the embeddings before the representation is built.
        """
        whitening = None
        if descriptor_params.whiten > 0:
            fit_on = embeddings if unlabelled is None or not len(unlabelled) else np.concatenate([embeddings, unlabelled])
            whitening = Whitening.fit(fit_on, descriptor_params.whiten, descriptor_params.whiten_shrink)
            embeddings = whitening(embeddings)
        if descriptor_params.dba:
            embeddings = augment_database(embeddings, descriptor_params.dba, descriptor_params.alpha)
        reps = build_representation(embeddings, landmark_ids, representation, params, progress=progress)
        return cls.from_centroids(reps, model or {}, metadata, index_kind=index_kind, index_params=index_params,
                                  build=build, descriptor_params=descriptor_params, whitening=whitening)

    # ---- properties --------------------------------------------------------------------------

    @property
    def embedding_size(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration.threshold

    @property
    def landmark_ids(self) -> list[str]:
        return [lm["landmark_id"] for lm in self.landmarks]

    def __len__(self) -> int:
        return len(self.vectors)

    # ---- model check -------------------------------------------------------------------------

    def check_model(self, identity: dict, embedding_size: int | None = None, what: str = "the model") -> None:
        """Raise :class:`ModelMismatchError` unless ``identity`` is the model this index was built with."""
        size = int(embedding_size if embedding_size is not None else identity.get("embedding_size", -1))
        if size != self.embedding_size:
            raise ModelMismatchError(
                f"{what} makes {size}-d embeddings but this index holds {self.embedding_size}-d vectors "
                f"(built with {_describe(self.model.get('identity', {}))}); rebuild the index with this model"
            )
        mine = self.model.get("identity", {})
        if identity != mine:
            raise ModelMismatchError(
                f"{what} ({_describe(identity)}) is not the model this index was built with "
                f"({_describe(mine)}); its embeddings are not comparable, so rebuild the index with it "
                "or recognise with the index's own model"
            )

    # ---- search ------------------------------------------------------------------------------

    def search(self, embeddings: np.ndarray, k: int = 5, memory_budget_mb: float = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` distinct landmarks per query: ``(scores float32 [n, k], landmark rows int64 [n, k])``.

        A landmark's score is the cosine similarity to its best vector. Slots without a landmark
        (fewer than ``k`` found) hold row ``-1`` and score ``-inf``.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self.describe(embeddings, memory_budget_mb)
        n = len(q)
        depth = min(len(self), max(k, min(k * self._max_per_landmark, _MAX_SEARCH_DEPTH)))
        scores, ids = search(self.faiss_index, q, depth, memory_budget_mb=memory_budget_mb)
        lm = np.where(ids >= 0, self.vector_landmark[np.maximum(ids, 0)], -1)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        if self._max_per_landmark == 1:
            first = lm >= 0
        else:
            # First occurrence of each landmark in every row (rows are sorted by score).
            order = np.argsort(lm, axis=1, kind="stable")
            sorted_lm = np.take_along_axis(lm, order, axis=1)
            first_sorted = np.ones_like(sorted_lm, dtype=bool)
            first_sorted[:, 1:] = sorted_lm[:, 1:] != sorted_lm[:, :-1]
            first = np.zeros_like(first_sorted)
            np.put_along_axis(first, order, first_sorted, axis=1)
            first &= lm >= 0
        rank = np.cumsum(first, axis=1) - 1
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        out_lm = np.full((n, k), -1, dtype=np.int64)
        sel = first & (rank < k)
        rows, cols = np.nonzero(sel)
        out_scores[rows, rank[rows, cols]] = scores[rows, cols]
        out_lm[rows, rank[rows, cols]] = lm[rows, cols]
        return out_scores - self._penalty(q, memory_budget_mb)[:, None], out_lm

    def top1(self, embeddings: np.ndarray, memory_budget_mb: float = 256,
             penalised: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(score float32 [n], landmark row int64 [n])`` of the best landmark per query.

        ``penalised=False``: the plain cosine, without the non-landmark penalty (if the index has one).
        """
        q = self.describe(embeddings, memory_budget_mb)
        scores, ids = search(self.faiss_index, q, 1, memory_budget_mb=memory_budget_mb)
        lm = np.where(ids[:, 0] >= 0, self.vector_landmark[np.maximum(ids[:, 0], 0)], -1)
        penalty = self._penalty(q, memory_budget_mb) if penalised else 0.0
        return np.where(ids[:, 0] >= 0, scores[:, 0] - penalty, -np.inf).astype(np.float32), lm

    # ---- persistence -------------------------------------------------------------------------

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "embedding_size": self.embedding_size,
            "n_vectors": len(self),
            "n_landmarks": len(self.landmarks),
            "model": self.model,
            "calibration": None if self.calibration is None else self.calibration.to_json(),
            "build": self.build,
            "files": list(_FILES),
            "verification": None if self.local_features is None else self.local_features.header(),
            "nonlandmark_penalty": None if self.penalty is None else {
                **{k: v for k, v in self.penalty.items() if k != "pool"}, "n_pool": len(self.penalty["pool"]),
                "file": "penalty_pool.npy"},
            "gps_calibration": None if self.gps_calibration is None else self.gps_calibration.to_json(),
            "descriptors": None if not self.descriptor_params.active else {
                **self.descriptor_params.to_json(),
                "files": list(_WHITENING_FILES) if self.whitening is not None else []},
        }

    def save(self, directory: str | os.PathLike, overwrite: bool = True) -> pathlib.Path:
        """Write the index directory atomically (see the module docstring); returns its path.

        An existing directory is replaced only if it is itself an index (has ``index.json``), so
        a mistyped ``--out`` never wipes someone's photo folder.
        """
        target = check_index_target(directory, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            faiss.write_index(self.faiss_index, str(tmp / "vectors.faiss"))
            np.save(tmp / "vectors.npy", self.vectors, allow_pickle=False)
            np.save(tmp / "vector_landmark.npy", self.vector_landmark, allow_pickle=False)
            np.save(tmp / "vector_size.npy", self.vector_size, allow_pickle=False)
            _write_json(tmp / "landmarks.json", self.landmarks)
            if self.local_features is not None:
                self.local_features.save(tmp)
            if self.penalty is not None:
                np.save(tmp / "penalty_pool.npy", self.penalty["pool"], allow_pickle=False)
            if self.whitening is not None:
                np.save(tmp / _WHITENING_FILES[0], self.whitening.mean, allow_pickle=False)
                np.save(tmp / _WHITENING_FILES[1], self.whitening.projection, allow_pickle=False)
            _write_json(tmp / HEADER, self.header())  # last: its presence marks a complete index
            os.chmod(tmp, 0o755)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LandmarkIndex":
        """Read an index directory, checking format, version and internal consistency."""
        root = pathlib.Path(directory)
        if root.exists() and not root.is_dir():
            raise IndexFormatError(f"{root} is a file, not an index folder (build one with `landmarks index`)")
        if not root.is_dir():
            raise IndexFormatError(f"index directory not found: {root}")
        head_path = root / HEADER
        if not head_path.is_file():
            raise IndexFormatError(f"{root}: no {HEADER}; not a landmark index (build one with `landmarks index`)")
        try:
            head = json.loads(head_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IndexFormatError(f"{head_path}: not valid JSON ({err})") from err
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise IndexFormatError(f"{head_path}: format {head.get('format') if isinstance(head, dict) else None!r} "
                                   f"is not {FORMAT!r}")
        version = head.get("format_version")
        if version not in _READABLE_VERSIONS:
            raise IndexFormatError(
                f"{root}: index format version {version!r}, but this code reads version {FORMAT_VERSION}; "
                "rebuild the index with `landmarks index` (or use the code version that wrote it)"
            )
        missing = [name for name in _FILES if not (root / name).is_file()]
        if missing:
            raise IndexFormatError(f"{root}: missing file(s) {missing}")
        readers = {
            "vectors.npy": lambda path: np.load(path, allow_pickle=False),
            "vector_landmark.npy": lambda path: np.load(path, allow_pickle=False),
            "vector_size.npy": lambda path: np.load(path, allow_pickle=False),
            "landmarks.json": lambda path: json.loads(path.read_text()),
            "vectors.faiss": lambda path: faiss.read_index(str(path)),
        }
        loaded = {}
        for name, read in readers.items():  # one at a time, so the message names the bad file
            try:
                loaded[name] = read(root / name)
            except (ValueError, OSError, RuntimeError, UnicodeDecodeError, EOFError) as err:  # EOFError: an empty file
                raise IndexFormatError(f"{root / name}: unreadable or corrupt ({err})") from err
        vectors, vector_landmark, vector_size, landmarks, index = loaded.values()
        d = head.get("embedding_size")
        if vectors.ndim != 2 or vectors.shape != (head.get("n_vectors"), d) or index.d != d:
            raise IndexFormatError(
                f"{root}: header says {head.get('n_vectors')} x {d} vectors, vectors.npy has {vectors.shape}, "
                f"vectors.faiss is {index.ntotal} x {index.d}"
            )
        _check_landmarks(root / "landmarks.json", landmarks)
        _check_model(head_path, head.get("model"))
        if len(landmarks) != head.get("n_landmarks"):
            raise IndexFormatError(f"{root}: header says {head.get('n_landmarks')} landmarks, landmarks.json has {len(landmarks)}")
        calibration = head.get("calibration")
        local_features = None
        if head.get("verification") is not None:
            try:
                local_features = LocalFeatures.load(root, head["verification"])
            except (ValueError, OSError) as err:
                raise IndexFormatError(f"{root}: verification features: {err}") from err
        penalty = head.get("nonlandmark_penalty")
        if penalty is not None:
            try:
                pool = np.load(root / "penalty_pool.npy", allow_pickle=False)
            except (ValueError, OSError) as err:
                raise IndexFormatError(f"{root}: penalty_pool.npy: {err}") from err
            if len(pool) != penalty.get("n_pool"):
                raise IndexFormatError(f"{root}: header says {penalty.get('n_pool')} non-landmark pool photos, "
                                       f"penalty_pool.npy has {len(pool)}")
            penalty = {**{k: v for k, v in penalty.items() if k not in ("n_pool", "file")}, "pool": pool}
        descriptors = head.get("descriptors")
        params, whitening = DescriptorParams(), None
        if descriptors is not None:
            try:
                params = DescriptorParams(**{k: v for k, v in descriptors.items() if k != "files"})
                if params.whiten > 0:
                    whitening = Whitening(*(np.load(root / name, allow_pickle=False) for name in _WHITENING_FILES))
            except (TypeError, ValueError, OSError) as err:
                raise IndexFormatError(f"{root}: descriptor post-processing: {err}") from err
        gps_calibration = head.get("gps_calibration")
        if gps_calibration is not None:
            try:
                gps_calibration = GpsCalibration.from_json(gps_calibration)
            except (KeyError, ValueError, TypeError) as err:
                raise IndexFormatError(f"{head_path}: gps_calibration: malformed ({err!r})") from err
        try:
            return cls(vectors, vector_landmark, vector_size, landmarks, head["model"],
                       None if calibration is None else Calibration.from_json(calibration), head.get("build", {}), index,
                       local_features, penalty, params, whitening, gps_calibration=gps_calibration)
        except (KeyError, ValueError, TypeError) as err:
            raise IndexFormatError(f"{root}: inconsistent index ({err})") from err


def _check_landmarks(path: pathlib.Path, landmarks: Any) -> None:
    """Refuse a (hand-edited) landmarks.json whose entries the recognizer and albums would
    trip over later, mid-output, or silently merge (two landmarks with one id)."""
    if not isinstance(landmarks, list):
        raise IndexFormatError(f"{path}: expected a list of landmarks, got {type(landmarks).__name__}")
    seen: dict[str, int] = {}
    for i, entry in enumerate(landmarks):
        if not isinstance(entry, dict):
            raise IndexFormatError(f"{path}: landmark {i}: expected an object, got {type(entry).__name__}")
        landmark_id = entry.get("landmark_id")
        if not isinstance(landmark_id, str) or not landmark_id:
            raise IndexFormatError(f"{path}: landmark {i}: 'landmark_id' must be a non-empty string, "
                                   f"got {landmark_id!r}")
        where = f"{path}: landmark {i} ({landmark_id!r})"
        if landmark_id in seen:
            raise IndexFormatError(f"{where}: 'landmark_id' repeats landmark {seen[landmark_id]}; "
                                   "each landmark needs its own id")
        seen[landmark_id] = i
        # save() writes every key, null for unknown, so a missing key is an edit, not an old index.
        for key in ("name", "city"):
            if key not in entry:
                raise IndexFormatError(f"{where}: no '{key}' (a string, or null when unknown)")
            if entry[key] is not None and not isinstance(entry[key], str):
                raise IndexFormatError(f"{where}: '{key}' must be a string or null, got {entry[key]!r}")
        for key, limit in (("lat", 90), ("lon", 180)):
            if key not in entry:
                raise IndexFormatError(f"{where}: no '{key}' (a number, or null when unknown)")
            value = entry[key]
            if value is None:
                continue
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not -limit <= value <= limit):
                raise IndexFormatError(f"{where}: '{key}' must be a number in [-{limit}, {limit}] or null, "
                                       f"got {value!r}")


def _check_model(path: pathlib.Path, model: Any) -> None:
    """Refuse a model record whose sizes the recognizer and the export would fail to read."""
    if not isinstance(model, dict) or not isinstance(model.get("identity", {}), dict):
        raise IndexFormatError(f"{path}: 'model' must be an object with an 'identity' object")
    identity = model.get("identity", {})
    # Absent is allowed: indexes of toy models have no image size (the recognizer then uses 224).
    for key in ("image_size", "embedding_size"):
        value = identity.get(key)
        if key in identity and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise IndexFormatError(f"{path}: model.identity.{key} must be a positive integer, got {value!r}")


def _describe(identity: dict) -> str:
    if not identity:
        return "unknown model"
    parts = [f"{identity.get('source', '?')} {identity.get('backbone', '?')}"]
    if identity.get("checkpoint_sha256"):
        parts.append(f"checkpoint sha256 {identity['checkpoint_sha256'][:12]}")
    parts.append(f"{identity.get('embedding_size', '?')}-d, {identity.get('image_size', '?')} px")
    if identity.get("scales"):
        parts.append("scales " + " / ".join(f"{s:g}" for s in identity["scales"]))
    parts.append(identity.get("inference_precision", "float32"))
    return ", ".join(parts)


def landmark_metadata(rows: Iterable[dict]) -> dict[str, dict]:
    """``{landmark_id: {name, city, lat, lon}}`` from rows, first non-empty value per field winning."""
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(str(row["landmark_id"]), {})
        for key in ("name", "city", "lat", "lon"):
            value = row.get(key)
            if entry.get(key) is None and value is not None and value != "":
                entry[key] = value
    return out
