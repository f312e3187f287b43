"""LightningDataModule: landmark DB + non-landmark pool for training, up to five evaluation sets.

Training batches are P landmarks × K images plus a share of non-landmark images labelled
``NONLANDMARK`` (:mod:`datamodules.sampler`). Evaluation uses one loader per non-empty set, in
this order (``eval_set_names`` maps a loader index to its set):

    * ``gallery``     — the landmark database (what the recogniser indexes),
    * ``queries``     — held-out landmark photos,
    * ``distractors`` — non-landmark photos, the false-positive test,
    * ``calibration`` — optional non-landmark photos a threshold is calibrated on (never trained
      on, disjoint from the distractors), as ``landmarks index --nonlandmarks`` does,
    * ``nonlandmark_pool`` — only with ``evaluate_nonlandmark_pool``: the training non-landmark
      pool, the known non-landmarks of the shipped index's penalty (``landmarks index
      --nonlandmark-pool``; ``RetrievalEvaluation(nonlandmark_penalty=...)``).

Every sample carries its dataset index, so the evaluation callback can gather embeddings across
DDP ranks and drop the duplicates that ``DistributedSampler`` pads with.

Skip policy for bad images (``on_bad_image``):
    * ``"skip"`` (default): files that are missing or empty are dropped from the manifests when
      the data module is built, with one warning giving the count and the first paths; files that
      exist but cannot be decoded (truncated, corrupt, not an image) are replaced at load time by
      a placeholder flagged ``valid=False`` that the loss and the metrics exclude; the evaluation
      callback logs their count as ``<stage>/unreadable`` (and stops, naming the manifest, when
      no gallery or query photo is left). A landmark whose every DB photo is missing is still a
      landmark of the DB: its queries stay, as queries no gallery photo can answer.
    * ``"error"``: any missing or empty file is an error naming it (checked when
      ``check_files`` is on; files that exist but fail to decode are always placeholders).
Labels are never guessed: a malformed manifest is always an error (:mod:`datamodules.manifest`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from core.errors import UserError
from core.labels import NONLANDMARK
from datamodules.datasets import ImageDataset, manifest_dataset, seed_worker_transforms
from datamodules.manifest import ClassMap, Manifest, ManifestError, drop_repeated_rows, load_manifest, merged_id_aliases
from datamodules.sampler import LandmarkBatchSampler, ResumableLoader
from datamodules.shards import ShardError, damaged_shards
from datamodules.synth import SynthConfig
from datamodules.transforms import eval_transform, train_transform
from datamodules.workers import WorkerStart, start_worker_server, worker_context

log = logging.getLogger(__name__)

EVAL_SETS = ("gallery", "queries", "distractors", "calibration", "nonlandmark_pool")


def _drop_missing_files(manifest: Manifest, policy: str) -> Manifest:
    if manifest.shard_dir is not None:
        return _drop_damaged_shards(manifest, policy)
    bad = np.array([not os.path.isfile(p) or os.path.getsize(p) == 0 for p in manifest.paths], dtype=bool)
    if not bad.any():
        return manifest
    examples = [p for p, b in zip(manifest.paths, bad) if b][:3]
    if policy == "error":
        first = int(np.flatnonzero(bad)[0])
        raise ManifestError(
            f"{manifest.source}: line {manifest.lines[first]}: image missing or empty: {manifest.paths[first]} "
            f"({int(bad.sum())} such rows; on_bad_image='skip' drops them)"
        )
    log.warning(
        "%s: skipping %d of %d rows whose image is missing or empty, e.g. %s",
        manifest.source, int(bad.sum()), len(bad), examples,
    )
    return manifest.subset(~bad)


def _drop_damaged_shards(manifest: Manifest, policy: str) -> Manifest:
    damaged = damaged_shards(manifest)
    if not damaged:
        return manifest
    if policy == "error":
        raise ShardError(f"{next(iter(damaged.values()))} ({len(damaged)} damaged shard(s); "
                         "on_bad_image='skip' drops their samples)")
    bad = manifest.table["shard"].isin(list(damaged)).to_numpy()
    log.warning("%s: skipping the %d samples of %d damaged shard(s), e.g. %s",
                manifest.source, int(bad.sum()), len(damaged), next(iter(damaged.values())))
    return manifest.subset(~bad)


def _check_pool_disjoint(pool: Manifest | None, others: Sequence[Manifest | None]) -> None:
    """A penalty pool that holds a distractor or a calibration photo would mark it as a known
    non-landmark: the false-positive rate measured on it would be too good."""
    if pool is None or len(pool) == 0:
        raise ManifestError("evaluate_nonlandmark_pool needs a non-empty non-landmark pool (nonlandmark_manifest)")
    known = {os.path.abspath(p): line for p, line in zip(pool.paths, pool.lines)}
    for other in others:
        if other is None:
            continue
        shared = [(p, line) for p, line in zip(other.paths, other.lines) if os.path.abspath(p) in known]
        if shared:
            path, line = shared[0]
            raise ManifestError(f"{other.source}: line {line}: {path} is also in the non-landmark pool "
                                f"{pool.source} (line {known[os.path.abspath(path)]}; {len(shared)} such photo(s)); "
                                "the penalty's pool must be disjoint from the photos it is measured on")


class LandmarkDataModule(pl.LightningDataModule):
    """Cleaned landmark + non-landmark data for metric learning.

    Args:
        data_dir: folder the manifest names below are relative to.
        db_manifest: landmark database (``path,landmark_id``): training set and gallery. A CSV,
            an ImageFolder directory (``<landmark_id>/<image>``) or a shard set (``landmarks
            prepare shards``; every manifest below may be one, see :mod:`datamodules.shards`).
            Rows whose ``decision`` column says ``remove`` (output of ``landmarks clean``) are
            left out.
        nonlandmark_manifest: non-landmark training pool (``path``), or null for none.
        query_manifest: held-out landmark queries (``path,landmark_id``).
        distractor_manifest: non-landmark distractor queries (``path``).
        calibration_manifest: non-landmark photos to calibrate the shipped threshold on (``path``;
            the synthetic world's ``calibration.csv``), or null: see ``RetrievalEvaluation``.
        evaluate_nonlandmark_pool: embed the training non-landmark pool at every evaluation too,
            for the shipped decision's non-landmark penalty; the pool must then share no photo
            with the distractors or the calibration set (checked, by path).
        synthetic: when ``data_dir`` does not exist, generate this synthetic world there first.
        oracle_clean: drop DB rows whose ground truth says they are noise (``is_noise == 1``; the
            synthetic world records it). An upper bound for ``landmarks clean``, for experiments
            only: real data has no such column, and asking for it there is an error.
        image_size: training and evaluation resolution (square).
        classes_per_batch: P, landmarks per batch on each rank.
        samples_per_class: K, images per landmark in a batch.
        nonlandmark_share: fraction of each training batch that is non-landmark images.
        batches_per_epoch: optimisation steps per epoch; default: one pass over the DB.
        eval_batch_size: batch size of the evaluation loaders.
        num_workers: loader worker processes.
        eval_num_workers: worker processes of the evaluation loaders (default: ``num_workers``).
            0 is faster on a few CPU cores with small images: decoding is cheap next to the
            forward pass, and each worker start costs seconds per loader.
        worker_start: how the loaders' worker processes start: ``forkserver`` (default), from a
            small server process started when a fit begins, or ``fork``, from this process. A
            forked worker makes the trainer copy every page it writes while the worker lives, each
            epoch (:mod:`datamodules.workers`). With ``forkserver`` (as with ``spawn``), a script
            that trains with workers must guard its entry point (``if __name__ == "__main__":``).
        augment_strength: scales the training augmentations (0 = crops and flips only... 1 = default).
        on_bad_image: ``skip`` or ``error``; see the module docstring.
        extra_columns: ``error`` or ``ignore`` unknown manifest columns.
        check_files: stat every file when the data module is built (disable for millions of
            files on a slow file system; unreadable files are still skipped at load time). The
            shards of a shard set are always checked (a few thousand files).
        seed: seed of the sampler's plan and of the training augmentations (combined with the
            epoch, the rank and the loader worker); a run's seeds should vary it with
            ``seed_everything``, as the sweep files and ``landmarks demo --seed`` do.
    """

    def __init__(
        self,
        data_dir: str = "data/synthetic",
        db_manifest: str = "db.csv",
        nonlandmark_manifest: str | None = "nonlandmarks.csv",
        query_manifest: str | None = "queries.csv",
        distractor_manifest: str | None = "distractors.csv",
        calibration_manifest: str | None = None,
        evaluate_nonlandmark_pool: bool = False,
        synthetic: SynthConfig | None = None,
        oracle_clean: bool = False,
        image_size: int = 96,
        classes_per_batch: int = 16,
        samples_per_class: int = 4,
        nonlandmark_share: float = 0.2,
        batches_per_epoch: int | None = None,
        eval_batch_size: int = 128,
        num_workers: int = 2,
        eval_num_workers: int | None = None,
        worker_start: WorkerStart = "forkserver",
        augment_strength: float = 1.0,
        on_bad_image: Literal["skip", "error"] = "skip",
        extra_columns: Literal["error", "ignore"] = "error",
        check_files: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= nonlandmark_share < 1.0:
            raise UserError(f"nonlandmark_share must be in [0, 1), got {nonlandmark_share}")
        # Settings out of range fail here, in one line, not as a traceback from the sampler, the
        # loader or albumentations' validation once the fit has started.
        for name, value, low in (("image_size", image_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("num_workers", num_workers, 0), ("eval_num_workers", eval_num_workers, 0),
                                 ("batches_per_epoch", batches_per_epoch, 1)):
            if value is not None and value < low:
                raise UserError(f"data.{name} must be >= {low}, got {value}")
        if not 0.0 <= augment_strength <= 1.0:
            raise UserError(f"data.augment_strength must lie in [0, 1] (1: the default augmentations), got {augment_strength}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        if not self.data_dir.exists() and synthetic is None:
            raise FileNotFoundError(
                f"data_dir {self.data_dir} does not exist; point data.data_dir at your data, or set "
                "data.synthetic to generate the synthetic landmark world there"
            )
        if synthetic is not None and (not self.data_dir.exists() or (self.data_dir / "world.json").exists()):
            # A synthetic world is generated when missing, and regenerated when half-written (it is
            # moved aside, never read); a folder of other data is left alone.
            from datamodules.synth import ensure_world  # the renderer: loaded only to generate a world

            ensure_world(self.data_dir, synthetic)
        # The DB is read here, not in setup(): the class count must be known when LightningCLI
        # links it into the model (link_arguments apply_on="instantiate").
        self.db = self._load("db_manifest", "landmark", drop_missing=False)
        # Ids that `landmarks clean --duplicates merge` renamed: queries naming them are relabelled.
        self.id_aliases = merged_id_aliases(self.db)
        if self.id_aliases:
            log.info("%s: %d merged-away landmark id(s); queries naming them are relabelled to their group's id",
                     self.db.source, len(self.id_aliases))
        # Before missing photos, cleaning decisions and oracle_clean drop rows: a landmark the DB
        # lists is a real landmark whatever happened to its photos.
        listed_ids = set(self.db.landmark_ids)
        self.db = self._drop_missing(self.db)
        if "decision" in self.db.table.columns:
            keep = self.db.table["decision"].str.strip().str.lower().ne("remove").to_numpy()
            log.info("%s: using %d of %d rows (decision != remove)", self.db.source, int(keep.sum()), len(keep))
            self.db = self.db.subset(keep)
        if oracle_clean:
            if "is_noise" not in self.db.table.columns:
                raise ManifestError(f"{self.db.source}: oracle_clean needs an 'is_noise' column (synthetic worlds have one)")
            keep = self.db.table["is_noise"].str.strip().ne("1").to_numpy()
            log.info("%s: oracle_clean keeps %d of %d rows (ground-truth noise removed)", self.db.source, int(keep.sum()), len(keep))
            self.db = self.db.subset(keep)
        if len(self.db) == 0:
            raise ManifestError(f"{self.db.source}: no usable landmark images")
        self.class_map = ClassMap.from_ids(self.db.landmark_ids)
        self.db_labels = self.class_map.encode(self.db.landmark_ids, self.db.source, self.db.lines)
        # Landmarks the DB lists but whose every photo was dropped (missing files, a cleaning's
        # decision=remove, or oracle_clean): their queries are still the user's photos of real landmarks.
        self.removed_landmarks = frozenset(listed_ids - set(self.class_map.landmark_ids))
        counts = np.bincount(self.db_labels, minlength=len(self.class_map))
        if (counts == 1).any():
            # Kept on purpose: the sampler repeats the image with different augmentations, so the
            # class still gets positives; it is also a valid gallery entry.
            log.warning("%d landmark(s) have a single image; they are sampled with replacement", int((counts == 1).sum()))
        self._datasets: dict[str, ImageDataset] = {}
        self.query_landmark_ids: list[str] = []  # each query's landmark id (after merges), set by setup()
        # What a curriculum callback asks the training batches to hold (None: all classes, and
        # the configured non-landmark share); applied to the live sampler and to any new one.
        self._active_classes: list[int] | None = None
        self._nonlandmark_share: float | None = None
        self._waiting_weight = 0.0
        self._train_sampler: LandmarkBatchSampler | None = None
        self._hard_nonlandmarks: tuple[list[int] | None, float] = (None, 0.0)

    # ---- what the model and callbacks read -------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.class_map)

    @property
    def unanswerable_label(self) -> int:
        """The label of a query whose landmark has no photo left in the DB (see ``removed_landmarks``):
        a landmark label (not ``NONLANDMARK``) that no gallery photo has, so the metrics count the
        query as a miss for recall and leave it out of P@1 (``n_queries_no_relevant``)."""
        return len(self.class_map)

    def state_dict(self) -> dict:
        # Saved by Lightning in every checkpoint: resuming on a different DB must fail loudly.
        return {"landmark_ids": self.class_map.to_list()}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("landmark_ids")
        if saved is not None and list(saved) != self.class_map.to_list():
            raise ManifestError(
                f"checkpoint was trained on {len(saved)} landmarks that differ from the {self.num_classes} "
                f"landmarks of {self.db.source}; resume with the same database"
            )

    # ---- loading ---------------------------------------------------------------------------

    def _load(self, name: str, kind: str, drop_missing: bool = True) -> Manifest | None:
        location = self.hparams[name]
        if location is None:
            return None
        manifest = load_manifest(self.data_dir / location, kind, extra_columns=self.hparams.extra_columns)
        return self._drop_missing(manifest) if drop_missing else manifest

    def _drop_missing(self, manifest: Manifest) -> Manifest:
        if self.hparams.check_files or manifest.shard_dir is not None:
            manifest = _drop_missing_files(manifest, self.hparams.on_bad_image)
        return manifest

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":  # the fork server imports while the fit sets itself up
            start_worker_server(self.hparams.num_workers, self.hparams.worker_start)
        if self._datasets:
            return
        size = self.hparams.image_size
        train_tf, eval_tf = train_transform(size, self.hparams.augment_strength), eval_transform(size)
        pool = self._load("nonlandmark_manifest", "nonlandmark")
        queries = self._load("query_manifest", "landmark")
        distractors = self._load("distractor_manifest", "nonlandmark")
        calibration = self._load("calibration_manifest", "nonlandmark")
        if self.hparams.evaluate_nonlandmark_pool:  # before anything is stored: a failed setup leaves none
            _check_pool_disjoint(pool, (distractors, calibration))
        if self.hparams.nonlandmark_share > 0 and (pool is None or len(pool) == 0):
            raise ManifestError(
                f"nonlandmark_share={self.hparams.nonlandmark_share} but the non-landmark pool "
                f"({pool.source if pool is not None else 'nonlandmark_manifest: null'}) is empty; "
                "add non-landmark images or set data.nonlandmark_share: 0"
            )
        self._datasets["train_landmarks"] = manifest_dataset(self.db, self.db_labels, train_tf, size)
        # Training may repeat a row on purpose (oversampling); the gallery holds each photo once,
        # or the repeat would count twice in P@1 and mAP@k.
        gallery = drop_repeated_rows(self.db, "in the evaluation gallery")
        self._datasets["gallery"] = manifest_dataset(
            gallery, self.class_map.encode(gallery.landmark_ids, gallery.source, gallery.lines), eval_tf, size)
        if pool is not None:
            self._datasets["train_nonlandmarks"] = manifest_dataset(pool, np.full(len(pool), NONLANDMARK), train_tf, size)
            # The training pool as the model sees it at evaluation (hard non-landmark mining embeds it).
            self._datasets["nonlandmark_pool"] = manifest_dataset(pool, np.full(len(pool), NONLANDMARK), eval_tf, size)
        else:
            for name, tf in (("train_nonlandmarks", train_tf), ("nonlandmark_pool", eval_tf)):
                self._datasets[name] = ImageDataset([], np.empty(0, dtype=np.int64), tf, size)
        if queries is not None:
            query_ids = [self.id_aliases.get(i, i) for i in queries.landmark_ids]
            lost = np.array([i in self.removed_landmarks for i in query_ids], dtype=bool)
            query_labels = np.full(len(query_ids), self.unanswerable_label, dtype=np.int64)
            kept = np.flatnonzero(~lost)
            query_labels[kept] = self.class_map.encode([query_ids[i] for i in kept], queries.source,
                                                       [queries.lines[i] for i in kept])
            if lost.any():
                log.warning("%s: %d queries name %d landmark(s) whose every DB photo was removed or is missing; "
                            "kept as queries no gallery photo can answer (misses for recall, left out of P@1)",
                            queries.source, int(lost.sum()), len({query_ids[i] for i in np.flatnonzero(lost)}))
            self.query_landmark_ids = query_ids
            self._datasets["queries"] = manifest_dataset(queries, query_labels, eval_tf, size)
        if distractors is not None:
            self._datasets["distractors"] = manifest_dataset(distractors, np.full(len(distractors), NONLANDMARK),
                                                             eval_tf, size)
        if calibration is not None:
            self._datasets["calibration"] = manifest_dataset(calibration, np.full(len(calibration), NONLANDMARK),
                                                             eval_tf, size)

    def _is_evaluated(self, name: str) -> bool:
        if name == "nonlandmark_pool" and not self.hparams.evaluate_nonlandmark_pool:
            return False  # built for hard non-landmark mining; an evaluation set only when asked
        return len(self._datasets.get(name, ())) > 0

    def eval_dataset(self, name: str) -> ImageDataset:
        self.setup()
        return self._datasets[name]

    @property
    def eval_set_names(self) -> tuple[str, ...]:
        """The non-empty evaluation sets, in loader order (the callback maps loader index → name)."""
        self.setup()
        return tuple(name for name in EVAL_SETS if self._is_evaluated(name))

    # ---- loaders ---------------------------------------------------------------------------

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def set_training_classes(
        self, active_classes: Sequence[int] | None, nonlandmark_share: float | None = None, waiting_weight: float = 0.0
    ) -> None:
        """Restrict training batches to ``active_classes`` with ``nonlandmark_share`` non-landmarks.

        Takes effect at the next epoch's batches (a curriculum switches on epoch boundaries);
        ``None`` restores all classes / the configured share. ``waiting_weight`` > 0 draws the
        other classes too, at that rate relative to an active one (a soft curriculum).
        """
        if nonlandmark_share is not None and not 0.0 <= nonlandmark_share < 1.0:
            raise UserError(f"nonlandmark_share must be in [0, 1), got {nonlandmark_share}")
        self._active_classes = None if active_classes is None else sorted(int(c) for c in active_classes)
        self._nonlandmark_share = nonlandmark_share
        self._waiting_weight = float(waiting_weight)
        if self._train_sampler is not None:
            self._train_sampler.set_classes(self._active_classes, self.nonlandmarks_per_batch(), self._waiting_weight)

    def set_hard_nonlandmarks(self, positions: Sequence[int] | None, share: float = 0.0) -> None:
        """Draw ``share`` of each batch's non-landmarks from pool ``positions`` (see the sampler)."""
        self._hard_nonlandmarks = (None if positions is None else [int(i) for i in positions], float(share))
        if self._train_sampler is not None:
            self._train_sampler.set_hard_nonlandmarks(*self._hard_nonlandmarks)

    @property
    def eval_workers(self) -> int:
        """Loader workers for embedding passes: ``eval_num_workers``, else ``num_workers``."""
        return self.hparams.num_workers if self.hparams.eval_num_workers is None else self.hparams.eval_num_workers

    def class_sizes(self) -> np.ndarray:
        """Training images per landmark class (after cleaning/oracle filtering), in class-index order."""
        return np.bincount(self.db_labels, minlength=self.num_classes)

    def nonlandmarks_per_batch(self) -> int:
        share = self.hparams.nonlandmark_share if self._nonlandmark_share is None else self._nonlandmark_share
        if share > 0 and len(self._datasets.get("train_nonlandmarks", ())) == 0 and self._datasets:
            raise ManifestError(f"a non-landmark share of {share} was asked for, but the non-landmark pool is empty")
        landmark_images = self.hparams.classes_per_batch * self.hparams.samples_per_class
        return int(round(landmark_images * share / (1.0 - share)))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self._rank_and_world()
        landmarks, nonlandmarks = self._datasets["train_landmarks"], self._datasets["train_nonlandmarks"]
        sampler = LandmarkBatchSampler(
            class_of_image=landmarks.labels,
            num_nonlandmarks=len(nonlandmarks),
            classes_per_batch=self.hparams.classes_per_batch,
            samples_per_class=self.hparams.samples_per_class,
            nonlandmarks_per_batch=self.nonlandmarks_per_batch(),
            num_batches=self.hparams.batches_per_epoch,
            seed=self.hparams.seed,
            rank=rank,
            world_size=world,
            active_classes=self._active_classes,
            waiting_weight=self._waiting_weight,
        )
        sampler.set_hard_nonlandmarks(*self._hard_nonlandmarks)
        self._train_sampler = sampler
        return ResumableLoader(
            ConcatDataset([landmarks, nonlandmarks]),
            batch_sampler=sampler,
            num_workers=self.hparams.num_workers,
            worker_init_fn=seed_worker_transforms,
            persistent_workers=False,
            pin_memory=False,
            multiprocessing_context=worker_context(self.hparams.num_workers, self.hparams.worker_start),
        )

    def _eval_loader(self, name: str) -> DataLoader:
        dataset = self._datasets[name]
        rank, world = self._rank_and_world()
        # DistributedSampler pads the last shard with repeated indices; the evaluation callback
        # deduplicates by the index every sample carries.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(
            dataset,
            batch_size=self.hparams.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.eval_workers,
            multiprocessing_context=worker_context(self.eval_workers, self.hparams.worker_start),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(name) for name in self.eval_set_names]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
