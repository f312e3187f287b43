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


def test_waiting_slots_are_the_rounded_running_total_of_their_share():
    # G = 2 × 2 = 4 classes a step; 4 active, 6 waiting at weight 0.5: share 3 / (4 + 3) = 3/7,
    # 12/7 = 1.714 a step; running totals 0, 1.71, 3.43, 5.14, 6.86 round to 0, 2, 3, 5, 7.
    sampler = _sampler(class_of_image=np.repeat(np.arange(10), 5), num_nonlandmarks=0, nonlandmarks_per_batch=0,
                       classes_per_batch=2, world_size=2, active_classes=[0, 1, 2, 3], waiting_weight=0.5)
    assert sorted(sampler.waiting_classes.tolist()) == list(range(4, 10))
    assert sampler.waiting_slots(4).tolist() == [2, 1, 2, 2]
    # 12 classes: 8 waiting at 0.5 weigh as much as the 4 active, so half of each step.
    assert _sampler(classes_per_batch=2, world_size=2, active_classes=[0, 1, 2, 3],
                    waiting_weight=0.5).waiting_slots(3).tolist() == [2, 2, 2]
    # A step never asks a set for more than it has: 3 active, P = 6, so ≥ 3 waiting each step.
    assert _sampler(classes_per_batch=6, active_classes=[1, 2, 3], waiting_weight=0.1).waiting_slots(2).tolist() == [3, 3]
    # Without a weight, or with every class active, nothing is drawn from a waiting set.
    assert _sampler(active_classes=[0, 1, 2, 3]).waiting_slots(3).tolist() == [0, 0, 0]
    assert _sampler(waiting_weight=0.5).waiting_slots(3).tolist() == [0, 0, 0]


def test_waiting_classes_are_drawn_at_their_weight_on_disjoint_rank_slices():
    classes = np.repeat(np.arange(10), 5)
    ranks = [_sampler(class_of_image=classes, num_nonlandmarks=0, nonlandmarks_per_batch=0, classes_per_batch=2,
                      samples_per_class=1, num_batches=70, world_size=2, rank=r, active_classes=[0, 1, 2, 3],
                      waiting_weight=0.5) for r in range(2)]
    steps = [list(batches) for batches in zip(*ranks)]
    for step in steps:
        # Four distinct classes a step over both ranks, each rank two of them.
        assert len({int(classes[i]) for batch in step for i in batch}) == 4
    counts = np.bincount(classes[np.concatenate([b for step in steps for b in step])], minlength=10)
    # 70 steps × 4 classes = 280 draws; 4 active at rate 1 and 6 waiting at 0.5 share them 4 : 3,
    # so 160 for the active (40 each) and 120 for the waiting (20 each): every class of a set
    # equally often, since each set is cycled through in passes.
    assert counts.tolist() == [40] * 4 + [20] * 6
    # At weight 1 every class is drawn as often (here 28 each).
    even = _sampler(class_of_image=classes, num_nonlandmarks=0, nonlandmarks_per_batch=0, classes_per_batch=4,
                    samples_per_class=1, num_batches=70, active_classes=[0, 1, 2, 3], waiting_weight=1.0)
    assert np.bincount(classes[np.concatenate(list(even))]).tolist() == [28] * 10


def test_soft_sampler_state_round_trips():
    sampler = _sampler(active_classes=[2, 5, 7], waiting_weight=0.25)
    sampler.set_epoch(3)
    full = list(sampler)
    state = {**sampler.state_dict(), "skip": 5}
    fresh = _sampler()
    fresh.load_state_dict(state)
    assert fresh.waiting_weight == 0.25 and fresh.active_classes.tolist() == [2, 5, 7]
    assert list(fresh) == full[5:]


def test_clear_errors():
    with pytest.raises(ValueError, match="non-landmark pool is empty"):
        _sampler(num_nonlandmarks=0)
    with pytest.raises(ValueError, match="needs 24 distinct classes"):
        _sampler(classes_per_batch=6, world_size=4)
    with pytest.raises(ValueError, match="waiting_weight must lie in"):
        _sampler(active_classes=[1, 2, 3], waiting_weight=1.5)
    # Fewer active classes than a step needs is fine while the waiting ones make up the rest ...
    _sampler(classes_per_batch=6, active_classes=[1, 2, 3], waiting_weight=0.1)
    # ... but not without them.
    with pytest.raises(ValueError, match=r"needs 6 distinct classes .* only 3 are active$"):
        _sampler(classes_per_batch=6, active_classes=[1, 2, 3])
    with pytest.raises(ValueError, match=r"needs 13 distinct classes .* only 3 are active and 9 waiting"):
        _sampler(classes_per_batch=13, active_classes=[1, 2, 3], waiting_weight=0.5)


def test_lightning_sets_the_epoch_through_batch_sampler_sampler():
    from lightning_fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = _sampler()
    loader = DataLoader(list(range(N_LANDMARK + N_POOL)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)
    assert sampler.epoch == 5
