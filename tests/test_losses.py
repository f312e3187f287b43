"""Tests of the metric losses: gradients, non-landmark handling, center updates (also under DDP),
checkpoint round trips, weight imprinting and construction through jsonargparse."""

import math
import os
from collections.abc import Callable

import jsonargparse
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from core.labels import NONLANDMARK
from losses import ArcFaceLoss, CenterSoftmaxLoss, ContrastiveLoss, MetricLoss

NUM_CLASSES = 4
EMBEDDING_SIZE = 16
INPUT_SIZE = 8

LOSSES: dict[str, Callable[[int, int], MetricLoss]] = {
    "arcface": ArcFaceLoss,
    "arcface_ignore": lambda c, d: ArcFaceLoss(c, d, nonlandmarks="ignore"),
    "subcenter_arcface": lambda c, d: ArcFaceLoss(c, d, sub_centers=3),
    "arcface_background_centres": lambda c, d: ArcFaceLoss(c, d, nonlandmarks="class", nonlandmark_centers=3),
    "contrastive_all_pairs": ContrastiveLoss,  # the defaults: all pairs, margin 1.2
    "contrastive_pair_margin": lambda c, d: ContrastiveLoss(c, d, pos_margin=0.0, neg_margin=0.5, miner="pair_margin"),
    "contrastive_batch_hard": lambda c, d: ContrastiveLoss(c, d, miner="batch_hard"),
    "center": CenterSoftmaxLoss,
    "center_push": lambda c, d: CenterSoftmaxLoss(c, d, nonlandmark_margin=1.2),
    "center_no_nonlandmark_class": lambda c, d: CenterSoftmaxLoss(c, d, nonlandmark_class=False),
    "center_no_nonlandmark_class_push": lambda c, d: CenterSoftmaxLoss(
        c, d, nonlandmark_class=False, nonlandmark_margin=1.2
    ),
}


def toy_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4 samples of each of NUM_CLASSES well-separated classes, plus 4 scattered non-landmarks."""
    gen = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(NUM_CLASSES, INPUT_SIZE, generator=gen)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(4)
    inputs = means[labels] + 0.3 * torch.randn(len(labels), INPUT_SIZE, generator=gen)
    nonlandmarks = 3 * torch.randn(4, INPUT_SIZE, generator=gen)
    return torch.cat([inputs, nonlandmarks]), torch.cat([labels, torch.full((4,), NONLANDMARK)])


def make(name: str, seed: int = 0) -> tuple[torch.nn.Linear, MetricLoss]:
    torch.manual_seed(seed)
    return torch.nn.Linear(INPUT_SIZE, EMBEDDING_SIZE), LOSSES[name](NUM_CLASSES, EMBEDDING_SIZE)


def embed(net: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return F.normalize(net(inputs), dim=1)


@pytest.mark.parametrize("name", LOSSES)
def test_gradients_reach_embeddings_network_and_loss_parameters(name):
    net, loss_fn = make(name)
    inputs, labels = toy_batch()
    embeddings = embed(net, inputs)
    embeddings.retain_grad()
    loss = loss_fn(embeddings, labels)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    for grad in [embeddings.grad, net.weight.grad, *(p.grad for p in loss_fn.parameters())]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_sgd_on_separable_toy_problem_reduces_loss(name):
    net, loss_fn = make(name)
    inputs, labels = toy_batch()
    optimizer = torch.optim.SGD([*net.parameters(), *loss_fn.parameters()], lr=0.5)

    def eval_loss() -> float:
        loss_fn.eval()
        with torch.no_grad():
            return loss_fn(embed(net, inputs), labels).item()

    before = eval_loss()
    loss_fn.train()
    for _ in range(30):
        optimizer.zero_grad()
        loss_fn(embed(net, inputs), labels).backward()
        optimizer.step()
    assert eval_loss() < 0.7 * before


@pytest.mark.parametrize("name", ["arcface_ignore", "center_no_nonlandmark_class"])
def test_batch_of_only_nonlandmarks_gives_connected_zero(name):
    net, loss_fn = make(name)
    inputs, labels = toy_batch()
    keep = labels == NONLANDMARK
    loss = loss_fn(embed(net, inputs[keep]), labels[keep])
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    # Every parameter takes part (with a zero gradient), as DDP expects.
    assert all(p.grad is not None for p in [*net.parameters(), *loss_fn.parameters()])


@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch_gives_connected_zero(name):
    # The LightningModule drops unreadable images, so a batch can end up empty.
    net, loss_fn = make(name)
    loss_fn.train()
    centers = getattr(loss_fn, "centers", torch.empty(0)).clone()
    loss = loss_fn(embed(net, torch.empty(0, INPUT_SIZE)), torch.empty(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None for p in [*net.parameters(), *loss_fn.parameters()])
    assert torch.equal(getattr(loss_fn, "centers", torch.empty(0)), centers)


def test_parameters_are_registered_and_survive_autocast():
    net, loss_fn = make("arcface")
    assert [name for name, _ in loss_fn.named_parameters()] == ["arcface.W"]
    inputs, labels = toy_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = embed(net, inputs)
        assert embeddings.dtype == torch.bfloat16
        loss = loss_fn(embeddings, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and loss_fn.arcface.W.dtype == torch.float32


# --- center loss ---------------------------------------------------------------------------


def random_unit(n: int, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(n, EMBEDDING_SIZE, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("margin", [None, 1.2])
def test_nonlandmarks_never_move_centers(margin):
    loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, nonlandmark_margin=margin).train()
    before = loss_fn.centers.clone()
    loss_fn(random_unit(5).requires_grad_(), torch.full((5,), NONLANDMARK)).backward()
    assert torch.equal(loss_fn.centers, before)


def test_center_update_follows_wen_et_al_rule():
    alpha = 0.5
    loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, center_lr=alpha).train()
    c = loss_fn.centers.clone()
    x = random_unit(4)
    # Two samples of class 2, one of class 0, one non-landmark (which must not count for anyone).
    loss_fn(x, torch.tensor([2, NONLANDMARK, 2, 0]))
    expected = c.clone()
    expected[2] = c[2] - alpha * ((c[2] - x[0]) + (c[2] - x[2])) / (1 + 2)
    expected[0] = c[0] - alpha * (c[0] - x[3]) / (1 + 1)
    torch.testing.assert_close(loss_fn.centers, expected, rtol=0, atol=1e-7)
    # Absent classes are untouched, bit for bit.
    assert torch.equal(loss_fn.centers[[1, 3]], c[[1, 3]])


def test_unmodified_center_loss_pulls_nonlandmarks_to_a_center_of_their_own():
    # The ablation baseline: non-landmarks are an ordinary class with a center (no modification).
    alpha, lam = 0.5, 0.3
    loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, center_lr=alpha, center_weight=lam,
                                nonlandmark_center=True, nonlandmark_margin=None).train()
    c, z = loss_fn.centers.clone(), loss_fn.nonlandmark_centroid.clone()
    x = random_unit(4).requires_grad_()
    labels = torch.tensor([2, NONLANDMARK, NONLANDMARK, 0])
    value = loss_fn(x, labels)
    xd = x.detach()
    logits = 16.0 * xd @ torch.nn.functional.normalize(loss_fn.weight.detach(), dim=1).t()
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([2, NUM_CLASSES, NUM_CLASSES, 0]))
    pull = torch.stack([xd[0] - c[2], xd[1] - z[0], xd[2] - z[0], xd[3] - c[0]]).pow(2).sum(1).mean()
    assert value.item() == pytest.approx((ce + lam * 0.5 * pull).item(), rel=1e-5)
    expected_z = z[0] - alpha * ((z[0] - xd[1]) + (z[0] - xd[2])) / (1 + 2)
    torch.testing.assert_close(loss_fn.nonlandmark_centroid[0], expected_z, rtol=0, atol=1e-7)
    torch.testing.assert_close(loss_fn.centers[2], c[2] - alpha * (c[2] - xd[0]) / 2, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="needs nonlandmark_class"):
        CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, nonlandmark_class=False, nonlandmark_center=True)


def test_centers_do_not_move_in_eval_mode():
    loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE).eval()
    before = loss_fn.centers.clone()
    loss_fn(random_unit(4), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(loss_fn.centers, before)


@pytest.mark.parametrize("nonlandmark_class", [True, False])
def test_center_softmax_loss_value_by_hand(nonlandmark_class):
    scale, lam, margin, push_weight = 16.0, 0.3, 1.5, 0.2
    loss_fn = CenterSoftmaxLoss(
        NUM_CLASSES,
        EMBEDDING_SIZE,
        center_weight=lam,
        softmax_scale=scale,
        nonlandmark_class=nonlandmark_class,
        nonlandmark_margin=margin,
        nonlandmark_push_weight=push_weight,
    ).train()
    w, c = F.normalize(loss_fn.weight.detach(), dim=1), loss_fn.centers.clone()
    x, labels = random_unit(5), torch.tensor([1, NONLANDMARK, 3, 1, NONLANDMARK])
    lm = labels != NONLANDMARK
    logits = scale * x @ w.t()
    if nonlandmark_class:
        ce = F.cross_entropy(logits, torch.where(lm, labels, NUM_CLASSES))
    else:
        ce = F.cross_entropy(logits[lm], labels[lm])
    center = 0.5 * ((x[lm] - c[labels[lm]]) ** 2).sum(1).mean()
    push = (F.relu(margin - torch.cdist(x[~lm], c)) ** 2).mean()
    assert push > 0
    expected = ce + lam * center + push_weight * push
    torch.testing.assert_close(loss_fn(x, labels), expected)


def test_push_term_moves_nonlandmarks_away_from_centers():
    loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, nonlandmark_class=False, nonlandmark_margin=1.0)
    # A non-landmark right next to center 0: descending the loss must move it away from that center.
    x = (loss_fn.centers[:1] + 0.1 * random_unit(1)).requires_grad_()
    loss = loss_fn(x, torch.tensor([NONLANDMARK]))
    assert loss > 0
    loss.backward()
    with torch.no_grad():
        stepped = x - 0.1 * x.grad
    assert (stepped - loss_fn.centers[0]).norm() > (x - loss_fn.centers[0]).norm()


def test_push_term_with_center_update_still_backpropagates():
    # The centers are updated in place after cdist saved them; the snapshot must keep backward legal.
    loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, nonlandmark_margin=1.5).train()
    x = random_unit(4).requires_grad_()
    loss_fn(x, torch.tensor([0, NONLANDMARK, 1, NONLANDMARK])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# --- contrastive -----------------------------------------------------------------------------


def test_pair_labels_make_each_nonlandmark_unique():
    loss_fn = ContrastiveLoss(NUM_CLASSES, EMBEDDING_SIZE)
    labels = torch.tensor([NONLANDMARK, 0, NONLANDMARK, 3, 0, NONLANDMARK])
    relabelled = loss_fn.pair_labels(labels)
    nl = labels == NONLANDMARK
    assert torch.equal(relabelled[~nl], labels[~nl])
    assert (relabelled[nl] >= NUM_CLASSES).all() and relabelled[nl].unique().numel() == int(nl.sum())


def test_default_contrastive_margin_pushes_negatives_until_nearly_orthogonal():
    """By hand: unit vectors at angle t are sqrt(2 - 2 cos t) apart. With the defaults (all pairs,
    pos_margin 0.5, neg_margin 1.2) a negative pair at cosine 0.5 (distance 1) pays 1.2 - 1 = 0.2,
    and one at cosine 0 (distance sqrt 2 > 1.2) pays nothing. The old margin 0.5 left both unpaid,
    which let classes collapse into each other (EXPERIMENTS.md, "Paper ablation")."""
    loss_fn = ContrastiveLoss(NUM_CLASSES, 2)
    assert loss_fn.miner is None
    angle = torch.tensor(torch.pi / 3)  # cosine 0.5
    x = torch.stack([torch.tensor([1.0, 0.0]), torch.stack([torch.cos(angle), torch.sin(angle)])])
    # One negative pair, no positive pair: the loss is that pair's hinge (PML averages non-zero terms).
    assert loss_fn(x, torch.tensor([0, 1])).item() == pytest.approx(0.2, abs=1e-5)
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert loss_fn(orthogonal, torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-7)
    old = ContrastiveLoss(NUM_CLASSES, 2, neg_margin=0.5, miner="none")
    assert old(x, torch.tensor([0, 1])).item() == pytest.approx(0.0, abs=1e-7)
    # A positive pair at cosine 0.5 pays its distance beyond pos_margin: 1 - 0.5; one at cosine 0.9
    # (distance sqrt 0.2 = 0.447 < 0.5) pays nothing, and with pos_margin 0 its whole distance.
    assert loss_fn(x, torch.tensor([2, 2])).item() == pytest.approx(0.5, abs=1e-5)
    near = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.9, math.sqrt(1 - 0.81)])])
    assert loss_fn(near, torch.tensor([2, 2])).item() == pytest.approx(0.0, abs=1e-7)
    pulled_together = ContrastiveLoss(NUM_CLASSES, 2, pos_margin=0.0)
    assert pulled_together(near, torch.tensor([2, 2])).item() == pytest.approx(math.sqrt(0.2), abs=1e-5)


@pytest.mark.parametrize("miner", ["none", "pair_margin", "batch_hard"])
def test_nonlandmarks_are_never_positives(miner):
    loss_fn = ContrastiveLoss(NUM_CLASSES, EMBEDDING_SIZE, miner=miner)
    seen = {}

    def capture(_module, args):
        seen["labels"], seen["indices_tuple"] = args[1], args[2]

    loss_fn.contrastive.register_forward_pre_hook(capture)
    # Identical non-landmark embeddings: were they one class, they would be the easiest positives.
    x = random_unit(8)
    labels = torch.tensor([0, 0, 1, 1, NONLANDMARK, NONLANDMARK, NONLANDMARK, NONLANDMARK])
    x[labels == NONLANDMARK] = x[4].clone()
    loss_fn(x, labels)
    # The pairs exactly as PML's ContrastiveLoss forms them from what it was given.
    a1, p, a2, n = lmu.convert_to_pairs(seen["indices_tuple"], seen["labels"])
    nonlandmark_idx = torch.nonzero(labels == NONLANDMARK).flatten()
    assert not torch.isin(torch.cat([a1, p]), nonlandmark_idx).any()
    assert len(a2) > 0 and torch.isin(torch.cat([a2, n]), nonlandmark_idx).any()


# --- checkpoints and imprinting ----------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_state_dict_round_trip(name, tmp_path):
    net, loss_fn = make(name, seed=0)
    inputs, labels = toy_batch()
    loss_fn.train()
    loss_fn(embed(net, inputs), labels).backward()  # moves the centers away from their init
    torch.save(loss_fn.state_dict(), tmp_path / "loss.pt")
    _, restored = make(name, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    original, loaded = loss_fn.state_dict(), restored.state_dict()
    assert original.keys() == loaded.keys()
    assert all(torch.equal(original[k], loaded[k]) for k in original)
    if isinstance(loss_fn, CenterSoftmaxLoss):
        assert "centers" in loaded
    loss_fn.eval(), restored.eval()
    with torch.no_grad():
        embeddings = embed(net, inputs)
        assert torch.equal(loss_fn(embeddings, labels), restored(embeddings, labels))


def all_class_rows(loss_fn: MetricLoss) -> torch.Tensor:
    """Every classifier row, the non-landmark class's included: ``[num_outputs * k, d]``."""
    return (loss_fn.arcface.W.t() if isinstance(loss_fn, ArcFaceLoss) else loss_fn.weight).detach().clone()


@pytest.mark.parametrize(
    "name", ["arcface", "arcface_ignore", "subcenter_arcface", "arcface_background_centres", "center"]
)
def test_imprint_sets_weights_of_given_classes(name):
    _, loss_fn = make(name)
    before = loss_fn.class_weight_matrix().clone()
    rows_before = all_class_rows(loss_fn)
    centers_before = getattr(loss_fn, "centers", None)
    centers_before = None if centers_before is None else centers_before.clone()
    vectors = 3 * random_unit(2)  # not unit length: imprint normalises
    loss_fn.imprint(torch.tensor([3, 1]), vectors)
    after = loss_fn.class_weight_matrix()
    expected = F.normalize(vectors, dim=1)
    if after.ndim == 3:  # sub-centers: every sub-center of the class gets the vector
        expected = expected.unsqueeze(1).expand(-1, after.shape[1], -1)
    torch.testing.assert_close(after[[3, 1]], expected)
    assert torch.equal(after[[0, 2]], before[[0, 2]])
    # Rows past the landmark classes (the non-landmark class, where there is one) are untouched.
    landmark_rows = NUM_CLASSES * getattr(loss_fn, "sub_centers", 1)
    assert torch.equal(all_class_rows(loss_fn)[landmark_rows:], rows_before[landmark_rows:])
    if centers_before is not None:
        torch.testing.assert_close(loss_fn.centers[[3, 1]], F.normalize(vectors, dim=1))
        assert torch.equal(loss_fn.centers[[0, 2]], centers_before[[0, 2]])


def test_background_class_with_several_centres_scores_its_nearest_centre_by_hand():
    torch.manual_seed(0)
    n, d, centres, scale, margin = 3, 8, 4, 30.0, 28.6
    loss = ArcFaceLoss(n, d, margin=margin, scale=scale, nonlandmarks="class", nonlandmark_centers=centres)
    w = loss.arcface.W.detach()
    assert w.shape == (d, n + centres)  # the landmark classes' columns, then the background's
    x = torch.randn(6, d)
    labels = torch.tensor([0, NONLANDMARK, 2, NONLANDMARK, NONLANDMARK, 1])
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=0)
    nearest_centre = cos[:, n:].max(dim=1)
    assert len(set(nearest_centre.indices.tolist())) > 1  # the case is not one centre doing all the work
    cos = torch.cat([cos[:, :n], nearest_centre.values[:, None]], dim=1)
    targets = torch.tensor([0, n, 2, n, n, 1])
    m = math.radians(margin)
    theta = torch.acos(cos.gather(1, targets[:, None]).clamp(-1, 1))
    target = torch.where(theta <= math.pi - m, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))
    logits = scale * cos.scatter(1, targets[:, None], target)
    torch.testing.assert_close(loss(x, labels), F.cross_entropy(logits, targets), atol=1e-4, rtol=1e-5)
    # The background's columns are no class weights: not indexed, imprinted or pushed from.
    assert torch.equal(loss.class_weight_matrix(), w[:, :n].t())
    push = ArcFaceLoss(n, d, nonlandmarks="class", nonlandmark_centers=centres, nonlandmark_max_cosine=0.0)
    rows = torch.randn(5, d)
    by_hand = (
        F.relu((F.normalize(rows, dim=1) @ F.normalize(push.arcface.W[:, :n], dim=0)).max(dim=1).values).pow(2).mean()
    )
    torch.testing.assert_close(push.nonlandmark_push(rows), by_hand)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonlandmark_centers": 2},  # non-landmarks ignored: there is no background class
        {"nonlandmarks": "class", "nonlandmark_centers": 0},
        {"nonlandmarks": "class", "sub_centers": 3, "nonlandmark_centers": 2},
    ],
)
def test_background_centres_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="nonlandmark_centers"):
        ArcFaceLoss(3, 8, **{"nonlandmarks": "ignore", **kwargs})


def test_imprint_per_subcenter_vectors_and_bad_arguments():
    loss_fn = ArcFaceLoss(NUM_CLASSES, EMBEDDING_SIZE, sub_centers=3)
    vectors = random_unit(3).unsqueeze(0)
    loss_fn.imprint(torch.tensor([2]), vectors)
    torch.testing.assert_close(loss_fn.class_weight_matrix()[2], vectors[0])
    with pytest.raises(ValueError):
        loss_fn.imprint(torch.tensor([NUM_CLASSES]), random_unit(1))  # the non-landmark class
    with pytest.raises(ValueError):
        loss_fn.imprint(torch.tensor([0, 1]), random_unit(1))


def test_contrastive_has_no_class_weights():
    loss_fn = ContrastiveLoss(NUM_CLASSES, EMBEDDING_SIZE)
    assert loss_fn.class_weight_matrix() is None
    loss_fn.imprint(torch.tensor([0]), random_unit(1))  # nothing to set, but accepted


# --- jsonargparse ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, check",
    [
        (
            {"class_path": "losses.ArcFaceLoss", "init_args": {"margin": 20.0}},
            lambda loss_fn: loss_fn.arcface.margin == pytest.approx(math.radians(20.0)),
        ),
        (
            {"class_path": "losses.ArcFaceLoss", "init_args": {"sub_centers": 2, "nonlandmarks": "ignore"}},
            lambda loss_fn: loss_fn.class_weight_matrix().shape[1] == 2 and loss_fn.nonlandmarks == "ignore",
        ),
        (
            {"class_path": "losses.ContrastiveLoss", "init_args": {"miner": "batch_hard"}},
            lambda loss_fn: type(loss_fn.miner).__name__ == "BatchHardMiner",
        ),
        (
            {"class_path": "losses.CenterSoftmaxLoss", "init_args": {"nonlandmark_margin": 0.8}},
            lambda loss_fn: loss_fn.nonlandmark_margin == 0.8 and loss_fn.centers.shape == (7, 24),
        ),
    ],
)
def test_jsonargparse_builds_loss_factory(spec, check):
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--loss", type=Callable[[int, int], MetricLoss])
    config = parser.parse_object({"loss": spec})
    factory = parser.instantiate_classes(config).loss
    loss_fn = factory(7, 24)
    assert type(loss_fn).__name__ == spec["class_path"].split(".")[-1]
    assert (loss_fn.num_classes, loss_fn.embedding_size) == (7, 24)
    assert check(loss_fn)
    weights = loss_fn.class_weight_matrix()
    assert weights is None or (weights.shape[0], weights.shape[-1]) == (7, 24)
    embeddings = F.normalize(torch.randn(3, 24), dim=1)
    assert loss_fn(embeddings, torch.tensor([0, 6, NONLANDMARK])).isfinite()


def test_jsonargparse_rejects_unknown_init_arg():
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--loss", type=Callable[[int, int], MetricLoss])
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_object({"loss": {"class_path": "losses.ArcFaceLoss", "init_args": {"margn": 20.0}}})


# --- DDP -------------------------------------------------------------------------------------


# Per step: (embeddings, labels, rows given to rank 0; rank 1 gets the rest). The second step is
# split unevenly and leaves rank 0 with only non-landmarks, so it has no landmark rows to share.
def ddp_steps() -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    y1 = torch.tensor([0, 2, NONLANDMARK, 2, 1, 2, NONLANDMARK, 0])
    y2 = torch.tensor([NONLANDMARK, NONLANDMARK, 3, 3, 0, NONLANDMARK, 1, 3])
    return [(random_unit(8, seed=11), y1, 4), (random_unit(8, seed=12), y2, 2)]


def _ddp_center_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        loss_fn = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, nonlandmark_margin=1.0).train()
        for x, y, split in ddp_steps():
            part = slice(0, split) if rank == 0 else slice(split, None)
            loss_fn(x[part].requires_grad_(), y[part]).backward()
        torch.save(loss_fn.centers, os.path.join(out_dir, f"centers{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_center_update_matches_single_process(tmp_path, free_port):
    mp.spawn(_ddp_center_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    reference = CenterSoftmaxLoss(NUM_CLASSES, EMBEDDING_SIZE, nonlandmark_margin=1.0).train()
    initial = reference.centers.clone()
    for x, y, _ in ddp_steps():
        reference(x, y)
    rank0, rank1 = (torch.load(tmp_path / f"centers{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, reference.centers, rtol=0, atol=1e-6)
    assert not torch.equal(reference.centers, initial)
