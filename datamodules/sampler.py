"""P×K batches of landmarks plus a share of non-landmarks, identical in composition on every rank.

Metric losses need several images of each class in a batch (positives) and many classes
(negatives); the paper's center loss also needs non-landmark images mixed in. Every rank draws
the *same global plan* from ``(seed, epoch)`` — world_size × P classes and world_size × N
non-landmarks per step — and takes its own slice, so shards are disjoint, together they are the
whole global batch, and no communication is needed.

Indices refer to a combined dataset: ``[0, n_landmark_images)`` are landmark images,
``[n_landmark_images, n_landmark_images + n_nonlandmarks)`` the non-landmark pool.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class LandmarkBatchSampler(Sampler[list[int]]):
    """Yields lists of indices: P classes × K images, then N non-landmark images.

    Args:
        class_of_image: class index of every landmark image (combined-dataset order).
        num_nonlandmarks: size of the non-landmark pool that follows the landmark images.
        classes_per_batch: P, classes per batch on each rank.
        samples_per_class: K, images per class; a class with fewer images is sampled with
            replacement (its copies get different augmentations).
        nonlandmarks_per_batch: N, non-landmark images per batch on each rank.
        num_batches: batches per epoch per rank; default: one pass over the landmark images.
        seed: base seed; the epoch is mixed in by :meth:`set_epoch`.
        rank, world_size: this process's place in DDP (the data module reads them from the trainer).
        active_classes: draw only these classes (a curriculum narrows it); default all.
    """

    def __init__(
        self,
        class_of_image: np.ndarray,
        num_nonlandmarks: int,
        classes_per_batch: int,
        samples_per_class: int,
        nonlandmarks_per_batch: int = 0,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        active_classes: Sequence[int] | None = None,
    ):
        class_of_image = np.asarray(class_of_image, dtype=np.int64)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError("classes_per_batch and samples_per_class must be ≥ 1")
        if nonlandmarks_per_batch and num_nonlandmarks == 0:
            raise ValueError(
                f"{nonlandmarks_per_batch} non-landmark images per batch requested, but the non-landmark pool is empty"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_landmark_images = len(class_of_image)
        order = np.argsort(class_of_image, kind="stable")
        classes, starts = np.unique(class_of_image[order], return_index=True)
        bounds = np.append(starts, len(order))
        self._images_of_class = {int(c): order[bounds[i] : bounds[i + 1]] for i, c in enumerate(classes)}
        self.active_classes = np.array(sorted(self._images_of_class) if active_classes is None else sorted(active_classes))
        unknown = set(self.active_classes.tolist()) - set(self._images_of_class)
        if unknown:
            raise ValueError(f"active classes without images: {sorted(unknown)[:10]}")
        global_classes = classes_per_batch * world_size
        if global_classes > len(self.active_classes):
            raise ValueError(
                f"a global batch needs {global_classes} distinct classes (P={classes_per_batch} × "
                f"{world_size} ranks) but only {len(self.active_classes)} are available"
            )
        self.num_nonlandmarks = num_nonlandmarks
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.nonlandmarks_per_batch = nonlandmarks_per_batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        # Lightning calls set_epoch on `batch_sampler.sampler` (not on the batch sampler) at every
        # epoch start, also when resuming; this proxy forwards that call here.
        self.sampler = _EpochForwarder(self)
        if num_batches is None:
            active_images = sum(len(self._images_of_class[c]) for c in self.active_classes.tolist())
            num_batches = max(1, math.ceil(active_images / (global_classes * samples_per_class)))
        self.num_batches = num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        p, k, n, w = self.classes_per_batch, self.samples_per_class, self.nonlandmarks_per_batch, self.world_size
        class_stream = _Cycle(self.active_classes, rng)
        nonlandmark_stream = _Cycle(np.arange(self.num_nonlandmarks), rng) if n else None
        for _ in range(self.num_batches):
            # The global plan is drawn in full on every rank (same RNG), then sliced: this keeps
            # the RNG streams of all ranks in lockstep.
            step_classes = class_stream.take(p * w)
            picks = []
            for c in step_classes.tolist():
                images = self._images_of_class[c]
                picks.append(rng.choice(images, size=k, replace=len(images) < k))
            step_nonlandmarks = nonlandmark_stream.take(n * w) if nonlandmark_stream is not None else np.empty(0, int)
            mine = np.concatenate(picks[self.rank * p : (self.rank + 1) * p])
            mine_nl = step_nonlandmarks[self.rank * n : (self.rank + 1) * n] + self.num_landmark_images
            yield np.concatenate([mine, mine_nl]).astype(np.int64).tolist()


class _EpochForwarder:
    def __init__(self, target: LandmarkBatchSampler):
        self._target = target

    def set_epoch(self, epoch: int) -> None:
        self._target.set_epoch(epoch)


class _Cycle:
    """Endless shuffled passes over ``items``; ``take(m)`` returns ``m`` distinct items when m ≤ len."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator):
        self.items = np.asarray(items)
        self.rng = rng
        self.buffer = rng.permutation(self.items)

    def take(self, m: int) -> np.ndarray:
        while len(self.buffer) < m:
            # Start a new pass; items still waiting in the old pass go last in the new one, so a
            # take never repeats an item when m ≤ len(items) (distinct classes per step).
            fresh = self.rng.permutation(self.items)
            waiting = np.isin(fresh, self.buffer)
            self.buffer = np.concatenate([self.buffer, fresh[~waiting], fresh[waiting]])
        out, self.buffer = self.buffer[:m], self.buffer[m:]
        return out
