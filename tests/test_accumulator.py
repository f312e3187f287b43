"""core/accumulator.py: ordering, dedup, loud failures; a real 2-process gloo DDP run."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from core.accumulator import EmbeddingAccumulator
from core.labels import NONLANDMARK
from retrieval.metrics import evaluate_recognition

# ----------------------------------------------------------------------------------------------
# single process
# ----------------------------------------------------------------------------------------------


def _table(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def test_orders_by_dataset_index_and_reorders_extras():
    emb = _table(10)
    labels = torch.arange(10) * 3
    valid = torch.arange(10) % 2 == 0
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    acc = EmbeddingAccumulator(expected_size=10)
    for chunk in perm.split(3):
        acc.update(emb[chunk], chunk, label=labels[chunk], valid=valid[chunk])
    assert len(acc) == 10
    out, extras = acc.compute()
    assert torch.equal(out, emb)
    assert torch.equal(extras["label"], labels)
    assert torch.equal(extras["valid"], valid) and extras["valid"].dtype == torch.bool
    assert torch.equal(extras["indices"], torch.arange(10))


def test_duplicates_are_dropped_keeping_the_first():
    emb = _table(5)
    acc = EmbeddingAccumulator(expected_size=5)
    acc.update(emb[[0, 1, 2]], torch.tensor([0, 1, 2]), tag=torch.tensor([10, 11, 12]))
    # padding-style repeats, with last-bit noise that must be tolerated
    acc.update(emb[[3, 4, 0]] + 1e-6, torch.tensor([3, 4, 0]), tag=torch.tensor([13, 14, 10]))
    out, extras = acc.compute()
    assert torch.equal(out[0], emb[0])  # the first occurrence, not the noisy repeat
    assert extras["tag"].tolist() == [10, 11, 12, 13, 14]


def test_missing_index_fails_loudly():
    emb = _table(10)
    acc = EmbeddingAccumulator(expected_size=10)
    keep = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9])
    acc.update(emb[keep], keep)
    with pytest.raises(RuntimeError, match=r"expected the 10 dataset indices.*got 8 unique.*2 missing \(e\.g\. \[3, 7\]\)"):
        acc.compute()


def test_out_of_range_and_wrong_size_fail_loudly():
    acc = EmbeddingAccumulator(expected_size=3)
    acc.update(_table(4), torch.arange(4))
    with pytest.raises(RuntimeError, match=r"1 out of range \(e\.g\. \[3\]\)"):
        acc.compute()
    acc = EmbeddingAccumulator(expected_size=3)
    with pytest.raises(RuntimeError, match="got 0 unique"):
        acc.compute()


def test_conflicting_duplicates_fail_loudly():
    acc = EmbeddingAccumulator(expected_size=2)
    acc.update(_table(2), torch.tensor([0, 1]))
    acc.update(_table(1, seed=5), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="different embeddings"):
        acc.compute()
    acc = EmbeddingAccumulator(expected_size=2)
    acc.update(_table(2), torch.tensor([0, 1]), label=torch.tensor([4, 5]))
    acc.update(_table(2)[1:], torch.tensor([1]), label=torch.tensor([6]))
    with pytest.raises(RuntimeError, match="different label"):
        acc.compute()


def test_bad_updates_and_reset():
    acc = EmbeddingAccumulator()
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        acc.update(torch.zeros(3), torch.arange(3))
    with pytest.raises(ValueError, match="3 embeddings but 2"):
        acc.update(torch.zeros(3, 2), torch.arange(2))
    with pytest.raises(ValueError, match="integer"):
        acc.update(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match=">= 0"):
        acc.update(torch.zeros(1, 2), torch.tensor([-1]))
    acc.update(torch.zeros(2, 2), torch.arange(2), label=torch.zeros(2))
    with pytest.raises(ValueError, match="dim changed"):
        acc.update(torch.zeros(2, 3), torch.arange(2), label=torch.zeros(2))
    with pytest.raises(ValueError, match="extras changed"):
        acc.update(torch.zeros(2, 2), torch.arange(2))
    with pytest.raises(ValueError, match="leading dim"):
        acc.update(torch.zeros(2, 2), torch.arange(2), label=torch.zeros(3))
    acc.reset()
    assert len(acc) == 0
    acc.update(torch.ones(1, 5), torch.tensor([7]))  # a new dim is fine after reset
    out, extras = acc.compute()  # expected_size=None: no coverage check
    assert out.shape == (1, 5) and extras["indices"].tolist() == [7]


def test_gradients_are_detached():
    x = torch.randn(2, 3, requires_grad=True)
    acc = EmbeddingAccumulator(expected_size=2)
    acc.update(x * 2, torch.arange(2))
    assert not acc.compute()[0].requires_grad


# ----------------------------------------------------------------------------------------------
# 2-process DDP (gloo, CPU)
# ----------------------------------------------------------------------------------------------

N_GALLERY, N_QUERY, DIM, BATCH = 301, 97, 16, 16  # odd sizes: DistributedSampler pads


def _eval_data():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((12, DIM))

    def make(n, noise):
        labels = rng.integers(0, 12, n)
        x = centers[labels] + noise * rng.standard_normal((n, DIM))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels

    gallery, g_labels = make(N_GALLERY, 0.9)
    query, q_labels = make(N_QUERY, 0.9)
    q_labels[::4] = NONLANDMARK  # a quarter of the queries are distractors
    return gallery, g_labels, query, q_labels


def _shard(rank: int, world: int, data: np.ndarray, labels: np.ndarray, skip_last_batch: bool = False):
    acc = EmbeddingAccumulator(expected_size=len(data))
    sampler = DistributedSampler(range(len(data)), num_replicas=world, rank=rank, shuffle=True, seed=3)
    idx = torch.tensor(list(sampler))
    batches = idx.split(BATCH)
    if skip_last_batch:
        batches = batches[:-1]
    for b in batches:
        acc.update(
            torch.from_numpy(data[b.numpy()]),
            b,
            label=torch.from_numpy(labels[b.numpy()]),
            is_landmark=torch.from_numpy(labels[b.numpy()] != NONLANDMARK),
        )
    return acc, len(idx)


def _same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def _ddp_worker(rank: int, world: int, port: int) -> None:
    import faiss

    faiss.omp_set_num_threads(1)  # two ranks on two cores
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        gallery, g_labels, query, q_labels = _eval_data()

        g_acc, n_local = _shard(rank, world, gallery, g_labels)
        assert n_local * world > N_GALLERY  # the sampler really padded
        q_acc, _ = _shard(rank, world, query, q_labels)
        g_emb, g_extra = g_acc.compute()
        q_emb, q_extra = q_acc.compute()

        # exactly the single-process arrays, on every rank
        assert torch.equal(g_emb, torch.from_numpy(gallery))
        assert torch.equal(g_extra["label"], torch.from_numpy(g_labels))
        assert torch.equal(q_emb, torch.from_numpy(query))
        assert torch.equal(q_extra["is_landmark"], torch.from_numpy(q_labels != NONLANDMARK))
        assert torch.equal(q_extra["indices"], torch.arange(N_QUERY))

        # and therefore exactly the single-process metrics
        kw = dict(alphas=(0.05, 0.02), k=5)
        ddp = evaluate_recognition(g_emb.numpy(), g_extra["label"].numpy(), q_emb.numpy(), q_extra["label"].numpy(), **kw)
        single = evaluate_recognition(gallery, g_labels, query, q_labels, **kw)
        assert "recall@fpr=5e-02" in single.metrics
        assert _same_metrics(ddp.metrics, single.metrics), (ddp.metrics, single.metrics)

        # a rank that saw nothing still joins the collectives
        acc = EmbeddingAccumulator(expected_size=N_QUERY)
        if rank == 0:
            acc.update(torch.from_numpy(query), torch.arange(N_QUERY), label=torch.from_numpy(q_labels))
        emb, extra = acc.compute()
        assert torch.equal(emb, torch.from_numpy(query)) and torch.equal(extra["label"], torch.from_numpy(q_labels))

        # a skipped batch on one rank: every rank raises the same clear error (no hang)
        bad, _ = _shard(rank, world, gallery, g_labels, skip_last_batch=(rank == 1))
        with pytest.raises(RuntimeError, match=rf"expected the {N_GALLERY} dataset indices.*missing"):
            bad.compute()
    finally:
        dist.destroy_process_group()



@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_processes_match_single_process(free_port):
    mp.spawn(_ddp_worker, args=(2, free_port), nprocs=2, join=True)
