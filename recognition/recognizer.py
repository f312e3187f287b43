"""``Recognizer``: photos in, landmark decisions out, in-process (the engine of ``landmarks recognize``).

One forward pass per image, in batches: decode (threads, overlapping the network) → the
evaluation transform the index's gallery was embedded with → the embedding network → top-k
distinct landmarks from the index → optional GPS filter → accept iff the best remaining score
reaches the calibrated threshold (:func:`retrieval.decision.decide`, the rule the evaluation
metrics use too). A photo that cannot be read becomes a result with ``error`` set; the run
goes on.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from core.embedding import embed_batch
from core.errors import UserError
from datamodules.images import UnreadableImage, load_rgb
from datamodules.manifest import IMAGE_SUFFIXES
from datamodules.transforms import eval_transform
from recognition.artifact import LandmarkIndex, ModelMismatchError
from recognition.gps import landmark_coordinates, near_candidates, read_exif_gps
from recognition.verification import make_extractor, query_features
from retrieval.decision import decide
from retrieval.embedding_model import EmbeddingModel, load_embedding_model

log = logging.getLogger(__name__)

__all__ = ["Recognition", "Recognizer", "expand_paths", "load_index_model"]


@dataclass
class Recognition:
    """The decision for one photo.

    ``landmark_id``/``name``/``score`` describe the best candidate (after the GPS filter) even
    when it is not accepted, so that near misses can be inspected; only ``accepted`` says the
    photo shows that landmark. ``error`` is set (and everything else empty) for unreadable photos.
    ``verification`` is None for an index without local features (``landmarks index --verify``),
    else ``"verified"`` (the candidates' scores include the inlier bonus), ``"skipped"`` (the best
    candidate could not reach the threshold even with the largest bonus: rejected either way) or
    ``"few_keypoints"`` (too few local features to verify with: the global scores stand).
    """

    path: str
    landmark_id: str | None = None
    name: str | None = None
    score: float | None = None
    accepted: bool = False
    city: str | None = None
    candidates: list[dict] = field(default_factory=list)
    gps: list[float] | None = None
    gps_rejected: list[str] = field(default_factory=list)
    error: str | None = None
    verification: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


# Photo formats a folder scan reports as unreadable entries instead of passing over them like
# other files: a phone's HEIC photo left out without a word would look like a photo with no landmark.
UNSUPPORTED_PHOTO_SUFFIXES = (".heic", ".heif", ".avif", ".dng", ".cr2", ".nef", ".arw")


def _photos_below(folder: pathlib.Path) -> list[str]:
    """Photos under ``folder``, sorted: folder links followed (each real folder once, so a link loop
    ends), hidden files and folders (``.thumbnails``, macOS ``._x.jpg``) left out, and a link
    whose target is gone kept, so that it is reported as an error entry."""
    found: list[str] = []
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            suffix = os.path.splitext(name)[1].lower()
            if not name.startswith(".") and (suffix in IMAGE_SUFFIXES or suffix in UNSUPPORTED_PHOTO_SUFFIXES):
                found.append(os.path.join(top, name))
    return sorted(found)


def _read_photo(path: str, max_side: int) -> tuple[np.ndarray | None, str | None]:
    """``(pixels, None)``, or ``(None, why)`` for a photo that cannot be read: the decoder's reason
    ("empty file", "file not found", "cannot decode ..."), or the OS's (a folder or device given as
    a photo, no permission, a NUL in a list file's line)."""
    try:
        return load_rgb(path, max_side=max_side), None
    except UnreadableImage as err:
        return None, str(err)
    except (OSError, ValueError) as err:
        return None, f"{path}: {err}"


def _why_unreadable(path: str) -> str:
    """The reason, read again, for the few photos the embedding cache only marks as unreadable."""
    return _read_photo(path, 64)[1] or f"{path}: unreadable image"


def expand_paths(items: Iterable[str | os.PathLike]) -> list[str]:
    """Files, folders (photos below them, sorted; see :func:`_photos_below`) and list files
    (``.txt``/``.lst``: one path per line, ``#`` comments and blank lines ignored).

    A list file's relative paths are resolved against the list file's folder. A listed path that
    does not exist is kept, so that it is reported as an error entry rather than silently skipped.
    """
    out: list[str] = []
    for item in items:
        p = pathlib.Path(item)
        if p.is_dir():
            out.extend(_photos_below(p))
        elif p.suffix.lower() in (".txt", ".lst") and p.is_file():
            try:
                text = p.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of a path
            except UnicodeDecodeError as err:
                raise UserError(f"{p}: not UTF-8 text (byte {err.start}); save the list as UTF-8") from None
            for line in text.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line if os.path.isabs(line) else str(p.parent / line))
        else:
            out.append(str(p))
    return out


def load_index_model(
    index: LandmarkIndex,
    checkpoint: str | os.PathLike | None = None,
    backbone: str | None = None,
) -> EmbeddingModel:
    """The embedding model for ``index``: the one given (checked against the index) or the index's own.

    With neither argument, the model recorded in the index is reloaded (a checkpoint from its
    recorded path, whose content hash must still match; a backbone from its name and settings).
    """
    identity = index.model.get("identity", {})
    image_size = int(identity.get("image_size", 224))
    # Queries are embedded the way the index was: at its scales, in its inference precision.
    same = dict(image_size=image_size, scales=identity.get("scales"),
                inference_precision=identity.get("inference_precision", "32"))
    if checkpoint is not None or backbone is not None:
        model = load_embedding_model(checkpoint=checkpoint, backbone=backbone, **same,
                                     **_backbone_options(identity) if backbone is not None else {})
        index.check_model(model.identity, model.embedding_size, what=f"model {checkpoint or backbone}")
        return model
    source = index.model.get("source", {})
    if "checkpoint" in source:
        path = pathlib.Path(source["checkpoint"])
        if not path.is_file():
            raise FileNotFoundError(
                f"the index was built with checkpoint {path}, which is gone; pass the checkpoint explicitly"
            )
        model = load_embedding_model(checkpoint=path, **same)
    elif "backbone" in source:
        model = load_embedding_model(backbone=source["backbone"], **same, **_backbone_options(identity))
    else:
        raise ModelMismatchError("the index does not record its model; pass a checkpoint or backbone explicitly")
    index.check_model(model.identity, model.embedding_size, what=f"the index's model ({source})")
    return model


def _backbone_options(identity: dict) -> dict:
    options = {k: identity[k] for k in ("pooling", "gem_p") if k in identity}
    if identity.get("pretrained") in ("True", "offline"):
        options["pretrained"] = True if identity["pretrained"] == "True" else "offline"
    return options


class Recognizer:
    """Recognise landmarks in photos with a saved index.

    Args:
        index: a :class:`LandmarkIndex` or its directory.
        model: an :class:`EmbeddingModel` (checked against the index); else ``checkpoint`` /
            ``backbone`` (loaded and checked); else the index's own model.
        threshold: overrides the index's calibrated threshold (needed if it has none), for every
            photo (the index's GPS threshold too).
        top_k: candidates reported per photo (and searched by the GPS filter; an index with
            verification is searched at least ``candidates`` deep, as its calibration was, and a
            photo decided by the index's GPS threshold over exactly the landmarks it was calibrated
            with).
        gps_radius_km: enable the GPS filter with this radius. If the index has a threshold
            calibrated with the filter at this radius (``landmarks index --gps-radius-km``), a
            photo with a position is decided by it, over the first landmarks it was calibrated
            with; a photo without a position by the plain threshold.
        gps: ``{absolute path: (lat, lon)}`` (e.g. :func:`recognition.gps.read_gps_csv`); photos
            not in it fall back to their EXIF GPS when ``use_exif_gps``.
        batch_size: images per forward pass.
        workers: decoding threads (they overlap with the forward pass).
        device: ``"cpu"``, ``"cuda"``, or ``"auto"``.
        cache_dir: an embedding cache (``retrieval.embed``, as ``landmarks index --cache-dir``):
            photos whose embedding by this model is cached there are not embedded again, the
            others are embedded and added to it. None: every photo is embedded here.
    """

    def __init__(
        self,
        index: LandmarkIndex | str | os.PathLike,
        model: EmbeddingModel | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        backbone: str | None = None,
        threshold: float | None = None,
        top_k: int = 5,
        gps_radius_km: float | None = None,
        gps: dict[str, tuple[float, float]] | None = None,
        use_exif_gps: bool = True,
        batch_size: int = 32,
        workers: int = 2,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
    ):
        self.index = index if isinstance(index, LandmarkIndex) else LandmarkIndex.load(index)
        if model is not None:
            self.index.check_model(model.identity, model.embedding_size)
        else:
            model = load_index_model(self.index, checkpoint=checkpoint, backbone=backbone)
        self.model = model
        self.threshold = float(threshold) if threshold is not None else self.index.threshold
        if self.threshold is None or math.isnan(self.threshold):
            raise UserError("the index has no calibrated threshold (built without --nonlandmarks); pass a threshold")
        if threshold is not None:
            self._warn_if_outside_the_scores(float(threshold))
        if top_k < 1 or batch_size < 1:
            raise UserError(f"top_k and batch_size must be >= 1, got {top_k}, {batch_size}")
        if gps_radius_km is not None and not gps_radius_km > 0:
            raise UserError(f"gps_radius_km must be > 0, got {gps_radius_km}")
        self.top_k = int(top_k)
        self.gps_radius_km = gps_radius_km
        self.gps = {os.path.abspath(k): v for k, v in (gps or {}).items()}
        self.use_exif_gps = use_exif_gps
        self.cache_dir = cache_dir
        self.batch_size = int(batch_size)
        self.workers = max(1, int(workers))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net = model.net.to(self.device).eval()
        self.transform = eval_transform(model.image_size)
        lms = self.index.landmarks
        self._lat, self._lon = landmark_coordinates(lms)
        self._extractor = None if self.index.local_features is None else make_extractor(
            self.index.local_features.params, self.net)
        # Verification re-scores the index's `candidates` best landmarks, as calibration did: a
        # smaller top_k must not verify fewer (the threshold would not fit the scores), so the
        # search is at least that deep and top_k only bounds what is reported.
        self._search_k = self.top_k if self.index.local_features is None else max(
            self.top_k, self.index.local_features.params.candidates)
        self.gps_calibration = self._usable_gps_calibration(threshold)
        if self.gps_calibration is not None:
            self._search_k = max(self._search_k, self.gps_calibration.candidates)

    def _warn_if_outside_the_scores(self, threshold: float) -> None:
        """A threshold given by hand that no score can reach (or every score reaches) decides
        nothing: say so. Scores are cosines in [-1, 1], moved by at most the non-landmark penalty's
        weight either way and raised by at most the verification bonus."""
        weight = 0.0 if self.index.penalty is None else self.index.penalty["weight"]
        bonus = 0.0 if self.index.local_features is None else self.index.local_features.params.max_bonus
        low, high = -1.0 - weight, 1.0 + weight + bonus
        if threshold > high:
            log.warning("threshold %g is above every possible score (at most %g): no photo will be accepted",
                        threshold, high)
        elif threshold <= low:
            log.warning("threshold %g is at or below every possible score (at least %g): every photo with a "
                        "candidate will be accepted", threshold, low)

    def _usable_gps_calibration(self, threshold: float | None):
        """The index's GPS threshold where it applies: the filter on, at the radius it was calibrated
        for, and no threshold given by hand."""
        gps = self.index.gps_calibration
        if gps is None or self.gps_radius_km is None:
            return None
        if threshold is not None:
            log.info("the given threshold %.4f decides every photo; the index's GPS threshold is not used", threshold)
            return None
        if not math.isclose(gps.radius_km, self.gps_radius_km, rel_tol=1e-9):
            log.warning("the index's GPS threshold was calibrated for a radius of %g km, not %g km: photos with a "
                        "position are decided by the plain threshold", gps.radius_km, self.gps_radius_km)
            return None
        return gps

    # ---- pieces --------------------------------------------------------------------------------

    def _load(self, path: str) -> tuple[torch.Tensor | None, str | None]:
        # Same decode hint and transform as the gallery's embedding (ImageDataset).
        image, why = _read_photo(path, 2 * self.model.image_size)
        return (None, why) if image is None else (self.transform(image=image)["image"], None)

    def _decoded_batches(self, paths: Sequence[str]) -> Iterator[tuple[list[str], list]]:
        """Batches of decoded images, decoded by threads up to two batches ahead of the network."""
        starts = range(0, len(paths), self.batch_size)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            pending: collections.deque = collections.deque()
            it = iter(starts)
            for start in it:
                pending.append((start, [pool.submit(self._load, p) for p in paths[start:start + self.batch_size]]))
                if len(pending) >= 2:
                    break
            while pending:
                start, futures = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, [pool.submit(self._load, p) for p in paths[nxt:nxt + self.batch_size]]))
                yield list(paths[start:start + self.batch_size]), [f.result() for f in futures]

    def embed_tensors(self, images: torch.Tensor) -> np.ndarray:
        """Unit-norm float32 embeddings of a ``[B, 3, S, S]`` batch in [0, 1]."""
        return embed_batch(self.net, images, device=self.device).cpu().numpy()

    def _photo_gps(self, path: str) -> tuple[float, float] | None:
        found = self.gps.get(os.path.abspath(path))
        if found is None and self.use_exif_gps:
            found = read_exif_gps(path)
        return found

    def verify(self, path: str, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, str | None]:
        """``(scores, status)``: the scores after spatial verification when the index stores local
        features (built with ``--verify``; its threshold was calibrated on verified scores), and
        what happened (:attr:`Recognition.verification`); ``(scores, None)`` for an index without."""
        features = self.index.local_features
        if features is None:
            return scores, None
        if not scores[0] + features.params.max_bonus >= self.threshold:
            # Even the largest bonus cannot lift the best candidate to the threshold: the photo is
            # rejected either way (most photos of a collection), so its verification is skipped and
            # its scores stay the global ones. Only which rejected candidate is reported can differ.
            return scores, "skipped"
        query = query_features(path, features.params, self._extractor)
        if len(query[0]) < features.params.min_keypoints:
            # Flat sky, night, a tiny or unreadable photo: nothing to verify with; the global
            # scores stand (the minimum-keypoint policy), and the result says so.
            return scores, "few_keypoints"
        return features.rescore(query, scores, rows), "verified"

    def decide(self, path: str, scores: np.ndarray, rows: np.ndarray) -> Recognition:
        """The decision for one photo from its top-k ``scores`` and landmark ``rows`` (verified first)."""
        scores, verification = self.verify(path, scores, rows)
        lms = self.index.landmarks
        valid = rows >= 0
        result = Recognition(path=path, verification=verification)
        # The top_k best by the decision score (after verification, which can reorder them).
        shown = np.flatnonzero(valid)[np.argsort(-scores[valid], kind="stable")[: self.top_k]]
        result.candidates = [
            {"landmark_id": lms[rows[j]]["landmark_id"], "name": lms[rows[j]]["name"], "score": float(scores[j])}
            for j in shown
        ]
        allowed = valid.copy()
        threshold = self.threshold
        if self.gps_radius_km is not None:
            where = self._photo_gps(path)
            if where is not None:
                result.gps = [float(where[0]), float(where[1])]
                near = near_candidates(self._lat, self._lon, rows[None, :], [where], self.gps_radius_km)[0]
                result.gps_rejected = [lms[r]["landmark_id"] for r in rows[valid & ~near]]
                if self.gps_calibration is not None:
                    # As calibrated: the first `candidates` landmarks, by the global score
                    # (no verification: such an index has no GPS threshold), and its threshold.
                    near = near_candidates(self._lat, self._lon, rows[None, :], [where], self.gps_radius_km,
                                           self.gps_calibration.candidates)[0]
                    threshold = self.gps_calibration.calibration.threshold
                allowed &= near
        # The one acceptance rule (retrieval.decision), which the evaluation metrics apply too.
        decision = decide(scores[None, :], rows[None, :], threshold, allowed[None, :])
        best = int(decision.position[0])
        if best >= 0:
            r = int(rows[best])
            result.landmark_id, result.name, result.city = lms[r]["landmark_id"], lms[r]["name"], lms[r]["city"]
            result.score = float(decision.score[0])
            result.accepted = bool(decision.accepted[0])
        return result

    # ---- API ---------------------------------------------------------------------------------

    def iter_recognize(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> Iterator[Recognition]:
        """Results in input order, a batch at a time (for streaming output)."""
        paths = [str(p) for p in paths]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(paths), desc="recognise", unit="img")
        try:
            if self.cache_dir is not None:
                yield from self._recognize_cached(paths, bar)
                return
            for batch_paths, loaded in self._decoded_batches(paths):
                ok = [i for i, (tensor, _) in enumerate(loaded) if tensor is not None]
                decided: dict[int, Recognition] = {}
                if ok:
                    emb = self.embed_tensors(torch.stack([loaded[i][0] for i in ok]))
                    scores, rows = self.index.search(emb, self._search_k)
                    for j, i in enumerate(ok):
                        decided[i] = self.decide(batch_paths[i], scores[j], rows[j])
                for i, path in enumerate(batch_paths):
                    if i in decided:
                        yield decided[i]
                    else:
                        log.warning("unreadable image: %s", loaded[i][1])
                        yield Recognition(path=path, error=loaded[i][1])
                if bar is not None:
                    bar.update(len(batch_paths))
        finally:
            if bar is not None:
                bar.close()

    def _recognize_cached(self, paths: list[str], bar) -> Iterator[Recognition]:
        """With ``cache_dir``: embeddings from the cache (the missing ones computed into it), then
        the same search and decision as for photos embedded here."""
        from retrieval.embed import embed_paths

        device = "gpu" if self.device.type == "cuda" else "cpu"
        devices = [self.device.index] if self.device.index is not None else 1  # cuda:N embeds on GPU N
        result = embed_paths(self.model, paths, batch_size=self.batch_size, num_workers=0, accelerator=device,
                             devices=devices, cache_dir=self.cache_dir, progress=False)
        for s in range(0, len(paths), self.batch_size):
            batch = range(s, min(len(paths), s + self.batch_size))
            ok = [i for i in batch if result.valid[i]]
            decided: dict[int, Recognition] = {}
            if ok:
                scores, rows = self.index.search(result.embeddings[ok], self._search_k)
                decided = {i: self.decide(paths[i], scores[j], rows[j]) for j, i in enumerate(ok)}
            for i in batch:
                if i in decided:
                    yield decided[i]
                else:
                    reason = _why_unreadable(paths[i])
                    log.warning("unreadable image: %s", reason)
                    yield Recognition(path=paths[i], error=reason)
            if bar is not None:
                bar.update(len(batch))

    def recognize(self, paths: Sequence[str | os.PathLike], progress: bool = False) -> list[Recognition]:
        """One :class:`Recognition` per path, in order (unreadable photos get ``error`` set)."""
        return list(self.iter_recognize(paths, progress=progress))
