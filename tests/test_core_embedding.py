"""core/embedding.py: the one forward pass and the one loop over a dataset (also on 2 gloo ranks)."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from core.embedding import embed_batch, embed_dataset, eval_mode

N_ITEMS = 11
POSITIONS = [9, 2, 7, 2, 0, 5, 10]  # shuffled, one item twice, some left out


def _net() -> nn.Module:
    """Train and eval mode give different rows (BatchNorm, Dropout); one part frozen in eval."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6),
    )
    with torch.no_grad():  # running statistics that differ from any batch's
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.train()
    net[3].eval()  # e.g. a layer frozen on purpose: must stay in eval mode afterwards
    return net


class _Images(Dataset):
    def __init__(self, n: int = N_ITEMS):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(n, 3, 8, 8, generator=g)
        self.read: list[int] = []  # items this process loaded

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        self.read.append(i)
        return {"image": self.images[i], "label": 100 + i, "index": i, "valid": i % 3 != 1}


def _modes(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def _reference(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    net = _copy_in_eval(net)
    with torch.no_grad():
        return net(images)


def _copy_in_eval(net: nn.Module) -> nn.Module:
    copy = _net()
    copy.load_state_dict(net.state_dict())
    return copy.eval()


def test_embed_batch_is_the_eval_forward_and_restores_every_mode():
    net = _net()
    before = _modes(net)
    images = _Images().images[:5]
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(net.training)
        yield

    rows = embed_batch(net, images, forward_context=context)
    assert _modes(net) == before and before[0] and not before[4]  # train, with the frozen Dropout
    assert entered == [False]  # the forward ran in eval mode, inside the given context
    assert rows.dtype == torch.float32 and not rows.requires_grad
    assert torch.equal(rows, _reference(net, images))


def test_eval_mode_restores_modes_after_an_error():
    net = _net()
    before = _modes(net)
    with pytest.raises(RuntimeError), eval_mode(net):
        assert not any(_modes(net))
        raise RuntimeError("boom")
    assert _modes(net) == before


def test_embed_dataset_gives_rows_in_the_order_of_positions():
    net, data = _net(), _Images()
    before = _modes(net)
    emb, extras = embed_dataset(net, data, batch_size=3, positions=POSITIONS, extras=("label", "valid"))
    assert _modes(net) == before
    torch.testing.assert_close(emb, _reference(net, data.images[POSITIONS]), rtol=0, atol=1e-6)
    assert extras["label"].tolist() == [100 + p for p in POSITIONS]
    assert extras["valid"].tolist() == [p % 3 != 1 for p in POSITIONS]
    assert extras["indices"].tolist() == list(range(len(POSITIONS)))

    everything, _ = embed_dataset(net, data, batch_size=4)  # no positions: the whole dataset, in order
    torch.testing.assert_close(everything, _reference(net, data.images), rtol=0, atol=1e-6)


def _ddp_worker(rank: int, world: int, port: int, expected: torch.Tensor, expected_labels: list[int]) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        net, data = _net(), _Images()
        emb, extras = embed_dataset(net, data, batch_size=2, positions=POSITIONS, extras=("label",))
        # every rank gets the whole single-process result, in the order of the positions
        torch.testing.assert_close(emb, expected, rtol=0, atol=1e-6)
        assert extras["label"].tolist() == expected_labels
        # ... while each rank embedded its own, disjoint part of the positions
        read: list[list[int]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(read, data.read)
        assert read[rank] == POSITIONS[rank::world]
        assert sorted(read[0] + read[1]) == sorted(POSITIONS)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_ranks_embed_disjoint_parts_and_both_get_the_single_process_result(free_port):
    emb, extras = embed_dataset(_net(), _Images(), batch_size=3, positions=POSITIONS, extras=("label",))
    mp.spawn(_ddp_worker, args=(2, free_port, emb, extras["label"].tolist()), nprocs=2, join=True)
