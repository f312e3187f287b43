"""P×K + non-landmark batches: composition, determinism, DDP shards disjoint and complete."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from datamodules.sampler import LandmarkBatchSampler

# 12 classes with 1..12 images each (class 0 has a single image), then a pool of 50 non-landmarks.
CLASS_OF_IMAGE = np.repeat(np.arange(12), np.arange(1, 13))
N_LANDMARK = len(CLASS_OF_IMAGE)
N_POOL = 50


def _sampler(**kw):
    args = dict(class_of_image=CLASS_OF_IMAGE, num_nonlandmarks=N_POOL, classes_per_batch=3,
                samples_per_class=4, nonlandmarks_per_batch=2, num_batches=20, seed=7)
    args.update(kw)
    return LandmarkBatchSampler(**args)


def test_batch_is_p_classes_times_k_plus_nonlandmarks():
    for batch in _sampler():
        assert len(batch) == 3 * 4 + 2
        landmark, pool = [i for i in batch if i < N_LANDMARK], [i for i in batch if i >= N_LANDMARK]
        assert len(pool) == 2 and all(i < N_LANDMARK + N_POOL for i in pool)
        per_class = Counter(CLASS_OF_IMAGE[landmark].tolist())
        assert len(per_class) == 3 and set(per_class.values()) == {4}


def test_small_classes_sampled_with_replacement_large_without():
    k = 4
    small_seen, large_seen = set(), set()
    small_images_drawn = {c: set() for c in range(3)}  # classes 0, 1, 2 have 1, 2, 3 < K images
    for batch in _sampler(num_batches=60):
        landmark = np.array([i for i in batch if i < N_LANDMARK])
        for c in np.unique(CLASS_OF_IMAGE[landmark]).tolist():
            picks = landmark[CLASS_OF_IMAGE[landmark] == c].tolist()
            own = set(np.flatnonzero(CLASS_OF_IMAGE == c).tolist())
            assert len(picks) == k and set(picks) <= own  # always K images, all of the class's own
            if len(own) < k:
                # With replacement: its few images repeat to fill the K slots.
                small_seen.add(c)
                small_images_drawn[c].update(picks)
                assert len(set(picks)) < k and max(Counter(picks).values()) >= 2
                if len(own) == 1:
                    assert picks == [min(own)] * k
            else:
                # Without replacement: no image twice in a batch (class 3, exactly K images: all of them).
                large_seen.add(c)
                assert len(set(picks)) == k
                if len(own) == k:
                    assert set(picks) == own
    assert small_seen == {0, 1, 2} and {3, 11} <= large_seen  # both cases were actually exercised
    # Replacement draws from all of a small class's images, not the same one over and over.
    assert all(drawn == set(np.flatnonzero(CLASS_OF_IMAGE == c).tolist()) for c, drawn in small_images_drawn.items())


def test_every_class_is_visited_and_epochs_differ():
    sampler = _sampler(num_batches=4)  # 4 steps × 3 classes = all 12 classes once
    first = [tuple(b) for b in sampler]
    seen = {int(CLASS_OF_IMAGE[i]) for b in first for i in b if i < N_LANDMARK}
    assert seen == set(range(12))
    assert [tuple(b) for b in sampler] == first  # same epoch → same batches
    sampler.set_epoch(1)
    assert [tuple(b) for b in sampler] != first


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_are_disjoint_slices_of_one_global_batch(world):
    shards = [list(_sampler(rank=r, world_size=world, num_batches=10)) for r in range(world)]
    for step in range(10):
        batches = [shards[r][step] for r in range(world)]
        classes = [set(CLASS_OF_IMAGE[[i for i in b if i < N_LANDMARK]].tolist()) for b in batches]
        # Same composition on every rank, classes disjoint across ranks.
        assert all(len(b) == 3 * 4 + 2 for b in batches)
        assert all(len(c) == 3 for c in classes)
        assert len(set().union(*classes)) == 3 * world
        pools = [set(i for i in b if i >= N_LANDMARK) for b in batches]
        assert sum(len(p) for p in pools) == len(set().union(*pools)) == 2 * world
    # Complete: over enough steps every class appears on some rank.
    seen = {int(CLASS_OF_IMAGE[i]) for shard in shards for b in shard for i in b if i < N_LANDMARK}
    assert seen == set(range(12))


def test_default_length_is_one_pass_over_images():
    assert len(_sampler(num_batches=None)) == int(np.ceil(N_LANDMARK / 12))
    assert len(_sampler(num_batches=None, world_size=2)) == int(np.ceil(N_LANDMARK / 24))


def test_active_classes_restrict_sampling():
    sampler = _sampler(active_classes=[2, 5, 7, 9])
    seen = {int(CLASS_OF_IMAGE[i]) for b in sampler for i in b if i < N_LANDMARK}
    assert seen == {2, 5, 7, 9}


def test_clear_errors():
    with pytest.raises(ValueError, match="non-landmark pool is empty"):
        _sampler(num_nonlandmarks=0)
    with pytest.raises(ValueError, match="needs 24 distinct classes"):
        _sampler(classes_per_batch=6, world_size=4)


def test_lightning_sets_the_epoch_through_batch_sampler_sampler():
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = _sampler()
    loader = DataLoader(list(range(N_LANDMARK + N_POOL)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)
    assert sampler.epoch == 5
