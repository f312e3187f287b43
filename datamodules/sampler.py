"""P×K batches of landmarks plus a share of non-landmarks, identical in composition on every rank.

Metric losses need several images of each class in a batch (positives) and many classes
(negatives); the paper's center loss also needs non-landmark images mixed in. Every rank draws
the *same global plan* from ``(seed, epoch)`` — world_size × P classes and world_size × N
non-landmarks per step — and takes its own slice, so shards are disjoint, together they are the
whole global batch, and no communication is needed.

Indices refer to a combined dataset: ``[0, n_landmark_images)`` are landmark images,
``[n_landmark_images, n_landmark_images + n_nonlandmarks)`` the non-landmark pool.

The sampler is *resumable*: its state (epoch, batches already delivered, active classes,
non-landmarks per batch) round-trips through :meth:`state_dict`, and an epoch resumed after
``skip`` batches yields exactly the batches the uninterrupted epoch would have yielded next.
A curriculum changes the active classes and the non-landmark count between epochs through
:meth:`set_classes`; the number of batches per epoch never changes, so a run with and without a
curriculum takes the same number of optimisation steps. A soft curriculum also draws the classes
that are not active yet ("waiting"), at a given rate relative to an active one.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import DataLoader, Sampler

from core.errors import UserError
from datamodules.datasets import seed_augmentations


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
        waiting_weight: with ``active_classes``, also draw the other classes, each at this rate
            relative to an active class (0: never; see :meth:`set_classes`).
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
        waiting_weight: float = 0.0,
    ):
        class_of_image = np.asarray(class_of_image, dtype=np.int64)
        if classes_per_batch < 1 or samples_per_class < 1:
            raise UserError("classes_per_batch and samples_per_class must be ≥ 1")
        if nonlandmarks_per_batch and num_nonlandmarks == 0:
            raise UserError(
                f"{nonlandmarks_per_batch} non-landmark images per batch requested, but the non-landmark pool is empty"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_landmark_images = len(class_of_image)
        order = np.argsort(class_of_image, kind="stable")
        classes, starts = np.unique(class_of_image[order], return_index=True)
        bounds = np.append(starts, len(order))
        self._images_of_class = {int(c): order[bounds[i] : bounds[i + 1]] for i, c in enumerate(classes)}
        self.num_nonlandmarks = num_nonlandmarks
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip = 0  # batches of the current epoch already delivered before a resume
        self.set_classes(active_classes, nonlandmarks_per_batch, waiting_weight)
        self.set_hard_nonlandmarks(None)
        # Lightning calls set_epoch on `batch_sampler.sampler` (not on the batch sampler) at every
        # epoch start, also when resuming; this proxy forwards that call here.
        self.sampler = _EpochForwarder(self)
        if num_batches is None:
            # One pass over all landmark images, whatever a curriculum activates: the epoch length
            # (and so the step count of a run) must not depend on the stage.
            num_batches = max(1, math.ceil(len(class_of_image) / (classes_per_batch * world_size * samples_per_class)))
        self.num_batches = num_batches

    def set_classes(
        self, active_classes: Sequence[int] | None, nonlandmarks_per_batch: int | None = None, waiting_weight: float = 0.0
    ) -> None:
        """Draw ``active_classes`` (None: all) and ``nonlandmarks_per_batch`` from the next epoch on.

        ``waiting_weight`` w in [0, 1] is the rate at which each class outside ``active_classes``
        is drawn relative to an active one. With w = 0 (the paper's stages) only active classes
        appear. With w > 0 a step's classes are split between the two sets in proportion to
        n_active : w × n_waiting, each set cycled through in shuffled passes of its own, so
        every class of a set appears equally often.
        """
        if not 0.0 <= waiting_weight <= 1.0:
            raise UserError(f"waiting_weight must lie in [0, 1], got {waiting_weight}")
        everything = np.array(sorted(self._images_of_class))
        active = everything if active_classes is None else np.array(sorted(set(map(int, active_classes))), dtype=np.int64)
        unknown = set(active.tolist()) - set(self._images_of_class)
        if unknown:
            raise ValueError(f"active classes without images: {sorted(unknown)[:10]}")
        waiting = np.setdiff1d(everything, active) if waiting_weight > 0 else np.empty(0, dtype=np.int64)
        global_classes = self.classes_per_batch * self.world_size
        if global_classes > len(active) + len(waiting):
            raise UserError(
                f"a global batch needs {global_classes} distinct classes (P={self.classes_per_batch} × "
                f"{self.world_size} ranks) but only {len(active)} are active"
                + (f" and {len(waiting)} waiting" if len(waiting) else "")
            )
        if nonlandmarks_per_batch is not None:
            if nonlandmarks_per_batch and self.num_nonlandmarks == 0:
                raise UserError(
                    f"{nonlandmarks_per_batch} non-landmark images per batch requested, but the non-landmark pool is empty"
                )
            self.nonlandmarks_per_batch = int(nonlandmarks_per_batch)
        self.active_classes = active
        self.waiting_classes = waiting
        self.waiting_weight = float(waiting_weight)

    def waiting_slots(self, steps: int) -> np.ndarray:
        """Classes drawn from the waiting set at each of ``steps`` steps (all ranks together).

        The waiting set's share of the global batch's G classes is w·n_w / (n_a + w·n_w); the
        counts are that share's running total rounded, so over an epoch they add up to it within
        one class, and a step never asks a set for more distinct classes than it has.
        """
        g = self.classes_per_batch * self.world_size
        n_a, n_w, w = len(self.active_classes), len(self.waiting_classes), self.waiting_weight
        if n_w == 0:
            return np.zeros(steps, dtype=np.int64)
        share = w * n_w / (n_a + w * n_w)
        totals = np.floor(np.arange(steps + 1) * g * share + 0.5).astype(np.int64)
        return np.clip(np.diff(totals), max(0, g - n_a), min(g, n_w))

    def set_hard_nonlandmarks(self, indices: Sequence[int] | None, share: float = 0.0) -> None:
        """From the next epoch on, ``share`` of each step's non-landmarks come from ``indices``.

        ``indices`` are positions in the non-landmark pool (0-based), e.g. the images nearest to
        the landmark classes; they are cycled through in shuffled passes like the classes. The
        rest of the step's non-landmarks still come from the whole pool, so an image can appear
        twice in one step (with different augmentations). ``None`` or share 0: uniform draws only.
        """
        if not 0.0 <= share <= 1.0:
            raise UserError(f"hard non-landmark share must lie in [0, 1], got {share}")
        hard = np.unique(np.asarray([] if indices is None else indices, dtype=np.int64))
        if len(hard) and (hard.min() < 0 or hard.max() >= self.num_nonlandmarks):
            raise ValueError(f"hard non-landmark positions must lie in [0, {self.num_nonlandmarks})")
        self.hard_nonlandmarks = hard
        self.hard_share = float(share) if len(hard) else 0.0

    def state_dict(self) -> dict:
        return {
            "hard_nonlandmarks": self.hard_nonlandmarks.tolist(),
            "hard_share": self.hard_share,
            "epoch": self.epoch,
            "skip": self.skip,
            "active_classes": self.active_classes.tolist(),
            "waiting_weight": self.waiting_weight,
            "nonlandmarks_per_batch": self.nonlandmarks_per_batch,
            "num_batches": self.num_batches,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_batches"] != self.num_batches or state["seed"] != self.seed:
            raise UserError(
                f"sampler state is for {state['num_batches']} batches per epoch with seed {state['seed']}, "
                f"this run has {self.num_batches} with seed {self.seed}; resume with the same data settings"
            )
        self.set_classes(state["active_classes"], state["nonlandmarks_per_batch"], state.get("waiting_weight", 0.0))
        self.set_hard_nonlandmarks(state.get("hard_nonlandmarks"), state.get("hard_share", 0.0))
        self.epoch, self.skip = int(state["epoch"]), int(state["skip"])
        if self.skip >= self.num_batches:
            # Saved after the epoch's last batch: the resumed run starts the next epoch.
            self.epoch, self.skip = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        p, k, n, w = self.classes_per_batch, self.samples_per_class, self.nonlandmarks_per_batch, self.world_size
        class_stream = _Cycle(self.active_classes, rng)
        # Created only for a soft curriculum, so every other run draws exactly as before.
        waiting_stream = _Cycle(self.waiting_classes, rng) if len(self.waiting_classes) else None
        waiting_slots = self.waiting_slots(self.num_batches)
        nonlandmark_stream = _Cycle(np.arange(self.num_nonlandmarks), rng) if n else None
        hard = int(round(n * w * self.hard_share)) if n else 0
        # Created only when mining is on, so a run without it draws exactly as before.
        hard_stream = _Cycle(self.hard_nonlandmarks, rng) if hard else None
        skip, self.skip = self.skip, 0  # a resume skips once; the next epoch starts from its beginning
        for step in range(self.num_batches):
            # The global plan is drawn in full on every rank (same RNG), then sliced: this keeps
            # the RNG streams of all ranks in lockstep.
            if waiting_stream is None:
                step_classes = class_stream.take(p * w)
            else:
                # Mixed by a permutation, so every rank's slice gets its share of waiting classes.
                m = int(waiting_slots[step])
                step_classes = rng.permutation(np.concatenate([class_stream.take(p * w - m), waiting_stream.take(m)]))
            picks = []
            for c in step_classes.tolist():
                images = self._images_of_class[c]
                picks.append(rng.choice(images, size=k, replace=len(images) < k))
            step_nonlandmarks = nonlandmark_stream.take(n * w - hard) if nonlandmark_stream is not None else np.empty(0, int)
            if hard_stream is not None:
                # Shuffled together, so every rank's slice gets its share of the hard ones.
                step_nonlandmarks = rng.permutation(np.concatenate([hard_stream.take(hard), step_nonlandmarks]))
            if step < skip:
                continue  # drawn all the same, so the RNG stream matches the uninterrupted epoch
            mine = np.concatenate(picks[self.rank * p : (self.rank + 1) * p])
            mine_nl = step_nonlandmarks[self.rank * n : (self.rank + 1) * n] + self.num_landmark_images
            yield np.concatenate([mine, mine_nl]).astype(np.int64).tolist()


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`LandmarkBatchSampler` whose position survives a checkpoint.

    Lightning saves the ``state_dict`` of a stateful train loader in every checkpoint and loads it
    into the new loader before the first ``iter()`` of a resumed fit, so a run killed mid-epoch
    continues with the batches it had not yet trained on (instead of replaying the epoch's first
    batches). Batches are counted as they are handed to the training loop, not as workers fetch
    them, so prefetching does not shift the count.
    """

    def __init__(self, dataset, batch_sampler: LandmarkBatchSampler, **kwargs):
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._delivered = 0

    def __iter__(self):
        self._delivered = self.batch_sampler.skip
        # Augmentations from the run's settings, not from the process's history (albumentations
        # seeds its pipelines from OS entropy, and torch's worker seeds from the global RNG, which
        # every earlier step of the process moves): so a fit gives the same weights alone, after
        # other work in the same process, or resumed at an epoch boundary. A resume in mid-epoch
        # gets that epoch's remaining batches but not their exact augmentations.
        sampler = self.batch_sampler
        seed = int(np.random.SeedSequence([sampler.seed, sampler.epoch, sampler.rank, 0xA06]).generate_state(1)[0])
        if hasattr(self.dataset, "__dict__"):  # a Dataset object (plain sequences carry no pipelines)
            self.dataset.augment_seed = seed
        if self.num_workers == 0:
            seed_augmentations(self.dataset, seed)
        for batch in super().__iter__():
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict:
        return {**self.batch_sampler.state_dict(), "skip": self._delivered}

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)
        self._delivered = self.batch_sampler.skip


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
