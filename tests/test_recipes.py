"""Training-recipe mechanics: parameter groups, LR warm-up, frozen backbone, ArcFace margin schedules,
non-landmark push, hard non-landmark mining, contrastive miners with a cross-batch memory.

Every value is checked against a hand-computed one; the mechanics are driven from YAML where
users set them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from pytorch_metric_learning import losses as pml_losses

from callbacks.hard_nonlandmarks import HardNonlandmarkMining, hardest_nonlandmarks
from core.labels import NONLANDMARK
from datamodules.sampler import LandmarkBatchSampler
from lightning_modules import LandmarkModule
from losses import ArcFaceLoss, ContrastiveLoss

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "experiments" / "recipes"


def _tiny_module(**kwargs) -> LandmarkModule:
    torch.manual_seed(0)
    return LandmarkModule(num_classes=6, backbone="resnet18", embedding_size=16,
                          loss=lambda c, d: ArcFaceLoss(c, d, scale=30.0), **kwargs)


# ---- parameter groups --------------------------------------------------------------------------


def test_param_groups_from_a_config_file_get_their_learning_rates(tiny_world, tmp_path, monkeypatch):
    """The YAML recipe file → LightningCLI → optimizer groups with the file's lr/weight decay."""
    from cli.lightning_cli import LandmarkCLI  # noqa: PLC0415  (the CLI layer is only needed here)

    monkeypatch.chdir(tmp_path)
    cli = LandmarkCLI(args=[
        "--config", str(ROOT / "experiments" / "demo.yaml"), "--config", str(ROOT / "experiments" / "arcface.yaml"),
        "--config", str(RECIPES / "param_groups.yaml"), f"--data.data_dir={tiny_world}",
        "--model.pretrained=false", "--data.num_workers=0",
    ], run=False)
    optimizer = cli.model.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {"backbone": 5.0e-4, "head": 1.0e-3, "loss": 1.0e-2}
    # Left out of the file: the optimizer's own weight decay (demo.yaml's AdamW 1e-4).
    assert {n: g["weight_decay"] for n, g in groups.items()} == {"backbone": 1.0e-4, "head": 1.0e-4, "loss": 0.0}
    model = cli.model
    assert groups["loss"]["params"] == [model.loss.arcface.W]
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_param_groups_reject_an_unknown_part():
    with pytest.raises(ValueError, match="unknown part 'classifier'"):
        _tiny_module(param_groups={"classifier": {"lr": 1.0}})


# ---- warm-up and frozen backbone -------------------------------------------------------------


class _Batches(torch.utils.data.Dataset):
    def __init__(self, steps: int):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(steps, 8, 3, 32, 32, generator=g)
        self.labels = torch.tensor([0, 0, 1, 1, 2, 2, NONLANDMARK, NONLANDMARK])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels, "index": torch.arange(8),
                "valid": torch.ones(8, dtype=torch.bool)}


class _RecordLR(pl.Callback):
    def __init__(self):
        self.lrs: list[list[float]] = []
        self.backbone: list[torch.Tensor] = []
        self.head: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Runs inside optimizer_step, before the step itself: the LRs that this step uses.
        self.lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.backbone.append(next(pl_module.net.backbone.parameters()).detach().clone())
        self.head.append(pl_module.net.fc.weight.detach().clone())


def _fit(module: LandmarkModule, steps: int, tmp_path) -> _RecordLR:
    record = _RecordLR()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                         default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(steps), batch_size=None))
    return record


def test_lr_warmup_scales_each_step_and_leaves_the_scheduled_lr(tmp_path):
    module = _tiny_module(
        warmup_steps=4, param_groups={"loss": {"lr": 1.0e-2}},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    record = _fit(module, 6, tmp_path)
    # Step t runs at (t + 1) / 4 of each group's LR, then the full LR.
    expected = [[0.1 * f, 0.1 * f, 0.01 * f] for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)]
    assert np.allclose(record.lrs, expected)
    optimizer = module.trainer.optimizers[0]
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1, 0.01]


def test_cosine_decay_reaches_zero_at_the_fit_end_on_top_of_the_warmup(tmp_path):
    module = _tiny_module(warmup_steps=2, cosine_decay=True, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    record = _fit(module, 4, tmp_path)
    # 4 steps: warm-up 1/2, 1, 1, 1 times the half cosine (1 + cos(pi t / 4)) / 2 = 1, 0.854, 0.5, 0.146.
    factors = [0.5 * 1.0, 1.0 * 0.853553, 1.0 * 0.5, 1.0 * 0.146447]
    assert np.allclose(record.lrs, [[0.1 * f] * 3 for f in factors], atol=1e-6)
    assert [g["lr"] for g in module.trainer.optimizers[0].param_groups] == [0.1, 0.1, 0.1]  # the scheduled LR


def test_cosine_decay_off_leaves_the_lr(tmp_path):
    record = _fit(_tiny_module(optimizer=lambda params: torch.optim.SGD(params, lr=0.1)), 3, tmp_path)
    assert np.allclose(record.lrs, 0.1)


def test_frozen_backbone_steps_keep_the_backbone_and_train_the_head(tmp_path):
    module = _tiny_module(freeze_backbone_steps=3)
    start_backbone = next(module.net.backbone.parameters()).detach().clone()
    start_head = module.net.fc.weight.detach().clone()
    record = _fit(module, 5, tmp_path)
    for step in range(3):
        assert torch.equal(record.backbone[step], start_backbone), step
        assert not torch.equal(record.head[step], start_head if step == 0 else record.head[step - 1])
    assert not torch.equal(record.backbone[3], start_backbone)


def test_l2sp_penalty_and_its_gradient_by_hand():
    module = _tiny_module(l2sp_weight=0.3)
    module.on_fit_start()  # the anchor: the weights at the start
    first = next(module.net.backbone.parameters())
    with torch.no_grad():
        first.add_(0.5)  # every element of one tensor moved by 0.5
    penalty = module.l2sp_penalty()
    assert penalty.item() == pytest.approx(0.5 * 0.3 * 0.25 * first.numel(), rel=1e-5)
    penalty.backward()
    assert torch.allclose(first.grad, torch.full_like(first, 0.3 * 0.5))  # d/dw = weight · (w − w0)
    others = [p.grad for p in list(module.net.backbone.parameters())[1:]]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in others)
    with pytest.raises(ValueError, match="l2sp_weight must be >= 0"):
        _tiny_module(l2sp_weight=-1.0)


def test_l2sp_keeps_the_backbone_nearer_its_start_and_its_anchor_survives_a_checkpoint(tmp_path):
    def drift(weight: float) -> tuple[float, LandmarkModule]:
        module = _tiny_module(l2sp_weight=weight, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
        start = [p.detach().clone() for p in module.net.backbone.parameters()]
        _fit(module, 6, tmp_path)
        return sum(float(((p - s) ** 2).sum()) for p, s in zip(module.net.backbone.parameters(), start)), module

    free, _ = drift(0.0)
    held, module = drift(5.0)
    assert held < 0.5 * free, (held, free)
    # The anchor goes into the checkpoint and comes back; a resumed fit keeps the original start.
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    restored = _tiny_module(l2sp_weight=5.0)
    restored.on_load_checkpoint(checkpoint)
    restored.on_fit_start()
    for name, tensor in module.l2sp_anchor.items():
        assert torch.equal(restored.l2sp_anchor[name], tensor), name
    plain: dict = {}
    _tiny_module().on_save_checkpoint(plain)
    assert "l2sp_anchor" not in plain


def test_frozen_backbone_batchnorm_keeps_its_statistics_while_its_weights_train(tmp_path):
    def fit(freeze: bool) -> tuple[LandmarkModule, dict[str, torch.Tensor]]:
        module = _tiny_module(freeze_backbone_bn=freeze)
        start = {k: v.clone() for k, v in module.net.backbone.state_dict().items()}
        _fit(module, 4, tmp_path)
        return module, start

    module, start = fit(True)
    after = module.net.backbone.state_dict()
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], start[k]) for k in stats)
    assert not torch.equal(after["bn1.weight"], start["bn1.weight"])  # affine weights still train
    assert not torch.equal(after["conv1.weight"], start["conv1.weight"])
    assert module.net.bn.training or not module.training  # the head's BatchNorm is not frozen
    # The control: without the flag the same fit moves the running statistics.
    module, start = fit(False)
    after = module.net.backbone.state_dict()
    assert not all(torch.equal(after[k], start[k]) for k in stats)


def test_frozen_stages_keep_the_stem_and_early_stages_whole_while_the_rest_trains(tmp_path):
    """resnet18's feature stages are act1 (the stem, stride 2), layer1, ..., layer4: 2 fixes conv1,
    bn1 and layer1 (weights and BatchNorm statistics) and leaves them out of the optimizer."""
    module = _tiny_module(frozen_stages=2)
    start = {k: v.clone() for k, v in module.net.backbone.state_dict().items()}
    _fit(module, 4, tmp_path)
    after = module.net.backbone.state_dict()
    frozen = [k for k in start if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert any(k.endswith("running_var") for k in frozen)
    assert all(torch.equal(after[k], start[k]) for k in frozen), [k for k in frozen if not torch.equal(after[k], start[k])]
    for key in ("layer2.0.conv1.weight", "layer2.0.bn1.running_mean", "layer4.1.conv2.weight"):
        assert not torch.equal(after[key], start[key]), key
    trained = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    names = {id(p): n for n, p in module.net.backbone.named_parameters()}
    assert sorted(n for i, n in names.items() if i not in trained) == sorted(
        n for n, _ in module.net.backbone.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1.")))


def test_frozen_stages_end_where_the_backbone_says_its_stage_ends():
    module = LandmarkModule(num_classes=3, backbone="mobilenetv2_100", embedding_size=8, frozen_stages=2)
    grads = {n: p.requires_grad for n, p in module.net.backbone.named_parameters()}
    # MobileNetV2: the stem, blocks.0 (stride 2) and blocks.1 (stride 4); blocks.2 on trains.
    assert not any(v for n, v in grads.items() if n.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")))
    assert all(v for n, v in grads.items() if not n.startswith(("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")))
    assert all(p.requires_grad for p in LandmarkModule(num_classes=3, backbone="mobilenetv2_100").parameters())
    with pytest.raises(ValueError, match=r"frozen_stages: .* has 5 feature stages \(blocks.0, blocks.1, .*got 6"):
        LandmarkModule(num_classes=3, backbone="mobilenetv2_100", frozen_stages=6)
    with pytest.raises(ValueError, match="frozen_stages must be >= 0"):
        LandmarkModule(num_classes=3, backbone="mobilenetv2_100", frozen_stages=-1)


# ---- ArcFace: margins ------------------------------------------------------------------------


def test_margin_warmup_schedule_values():
    loss = ArcFaceLoss(3, 4, margin=30.0, margin_warmup_steps=10)
    assert [loss.margin_scale(t) for t in (0, 1, 5, 10, 25)] == [0.0, 0.1, 0.5, 1.0, 1.0]
    embeddings = F.normalize(torch.randn(4, 4), dim=1)
    labels = torch.tensor([0, 1, 2, NONLANDMARK])
    loss.train()
    for _ in range(3):
        loss(embeddings, labels)
    assert int(loss.step) == 3 and loss.margin_scale() == pytest.approx(0.3)
    loss.eval()
    loss(embeddings, labels)
    assert int(loss.step) == 3  # evaluation never advances the clock
    # The clock is part of the state: a resumed fit continues the ramp.
    restored = ArcFaceLoss(3, 4, margin=30.0, margin_warmup_steps=10)
    restored.load_state_dict(loss.state_dict())
    assert int(restored.step) == 3


def test_row_margins_equal_pml_arcface_at_a_fixed_margin_and_zero_margin_is_plain_softmax():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(6, 8), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    ours = ArcFaceLoss(4, 8, margin=20.0, scale=16.0)
    pml = pml_losses.ArcFaceLoss(4, 8, margin=20.0, scale=16.0)
    pml.W.data.copy_(ours.arcface.W.data)
    assert torch.allclose(ours(embeddings, labels), pml(embeddings, labels), atol=1e-6)
    # Margin warm-up at step 0: margin 0, so the loss is cross-entropy over scaled cosines.
    ramp = ArcFaceLoss(4, 8, margin=20.0, scale=16.0, margin_warmup_steps=5)
    ramp.arcface.W.data.copy_(ours.arcface.W.data)
    cosine = embeddings @ F.normalize(ours.arcface.W.data, dim=0)
    assert torch.allclose(ramp(embeddings, labels), F.cross_entropy(16.0 * cosine, labels), atol=1e-5)


def test_dynamic_margins_from_class_sizes_by_hand():
    loss = ArcFaceLoss(3, 4, margin=30.0, dynamic_margins=True, margin_min=10.0, margin_power=0.5)
    loss.set_class_sizes([1, 4, 16])
    # n^-0.5 = 1, 0.5, 0.25 → a = (30 - 10) / (1 - 0.25) = 26.667, b = 10 - a · 0.25 = 3.333
    # margins = a · n^-0.5 + b = 30, 16.667, 10
    assert torch.allclose(loss.class_margins, torch.tensor([30.0, 50.0 / 3.0, 10.0]), atol=1e-5)
    # Each row's margin is its class's: the loss equals PML's with that scalar margin per class.
    embeddings = F.normalize(torch.randn(3, 4), dim=1)
    for c, m in enumerate((30.0, 50.0 / 3.0, 10.0)):
        pml = pml_losses.ArcFaceLoss(3, 4, margin=m, scale=64.0)
        pml.W.data.copy_(loss.arcface.W.data)
        assert torch.allclose(loss(embeddings[c:c + 1], torch.tensor([c])),
                              pml(embeddings[c:c + 1], torch.tensor([c])), atol=1e-5)
    # A non-landmark class keeps the full margin; off by default; a wrong count is an error.
    with_class = ArcFaceLoss(3, 4, margin=30.0, dynamic_margins=True, margin_min=10.0, nonlandmarks="class")
    with_class.set_class_sizes([2, 2, 2])
    assert with_class.class_margins.tolist() == [30.0] * 4
    plain = ArcFaceLoss(3, 4, margin=30.0)
    plain.set_class_sizes([1, 4, 16])
    assert plain.class_margins.tolist() == [30.0] * 3
    with pytest.raises(ValueError, match="one count"):
        loss.set_class_sizes([1, 2])


def test_old_arcface_state_without_the_schedule_buffers_loads():
    loss = ArcFaceLoss(3, 4)
    state = {k: v for k, v in loss.state_dict().items() if k not in ("step", "class_margins")}
    fresh = ArcFaceLoss(3, 4)
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.arcface.W, loss.arcface.W)


def test_nonlandmark_push_by_hand_and_its_gradient():
    loss = ArcFaceLoss(2, 2, scale=10.0, nonlandmark_max_cosine=0.5, nonlandmark_push_weight=2.0)
    loss.arcface.W.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # [d, classes]: class 0 = x axis, 1 = y axis
    angle = math.radians(30.0)
    x = torch.tensor([[math.cos(angle), math.sin(angle)], [-1.0, 0.0]], requires_grad=True)
    push = loss.nonlandmark_push(x)
    # Row 0: max cosine = cos 30° = 0.866 → (0.866 - 0.5)² = 0.134; row 1: max cosine 0 → 0.
    assert push.item() == pytest.approx((math.cos(angle) - 0.5) ** 2 / 2, abs=1e-6)
    # Only non-landmark rows pay it, added with its weight to the ArcFace term of the landmark rows.
    labels = torch.tensor([NONLANDMARK, NONLANDMARK])
    assert loss(x, labels).item() == pytest.approx(2.0 * push.item(), abs=1e-6)
    push.backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1].abs().sum() == 0
    # Inactive classes (a curriculum's) are not pushed from.
    loss.set_active_classes(torch.tensor([1]))
    assert loss.nonlandmark_push(x.detach()).item() == pytest.approx(0.0)


def test_contrastive_nonlandmark_push_by_hand_and_its_gradient():
    """Contrastive has no class weights: a non-landmark is pushed from its nearest landmark *photo*."""
    kwargs = dict(neg_margin=1.2, nonlandmark_max_cosine=0.5, nonlandmark_push_weight=3.0)
    loss, plain = ContrastiveLoss(2, 2, **kwargs), ContrastiveLoss(2, 2, neg_margin=1.2)
    angle = math.radians(30.0)
    # Non-landmark 0 at 30° from class 0's photo (x axis, unnormalised), non-landmark 1 opposite it;
    # class 1's photo on the y axis is at 60° and 90° from them.
    x = torch.tensor([[math.cos(angle), math.sin(angle)], [-1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([NONLANDMARK, NONLANDMARK, 0, 1])
    # Row 0's nearest photo is at cos 30° = 0.866 → (0.866 - 0.5)²; row 1's nearest at cos 0 → 0.
    expected_push = (math.cos(angle) - 0.5) ** 2 / 2
    total = loss(x, labels)
    assert total.item() == pytest.approx(plain(x.detach(), labels).item() + 3.0 * expected_push, abs=1e-6)
    # The push alone moves the pushed non-landmark and the photo it is nearest, not the others.
    push = total - plain(x, labels)
    push.backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[2].abs().sum() > 0
    assert x.grad[1].abs().sum() == 0 and x.grad[3].abs().sum() == 0
    # Nothing to push from without a landmark photo, nothing to push without a non-landmark.
    only_nonlandmarks, only_photos = x.detach()[:2], x.detach()[2:]
    for rows, row_labels in ((only_nonlandmarks, labels[:2]), (only_photos, labels[2:])):
        assert loss(rows, row_labels).item() == pytest.approx(plain(rows, row_labels).item(), abs=1e-7)
    with pytest.raises(ValueError, match="nonlandmark_max_cosine"):
        ContrastiveLoss(2, 2, nonlandmark_max_cosine=-1.5)


def test_the_push_recipe_file_sets_the_same_arguments_on_arcface_and_contrastive():
    recipe = yaml.safe_load((RECIPES / "nonlandmark_push.yaml").read_text())["model"]["loss"]["init_args"]
    for loss_class in (ArcFaceLoss, ContrastiveLoss):
        built = loss_class(3, 4, **recipe)
        assert (built.nonlandmark_max_cosine, built.nonlandmark_push_weight) == (0.2, 4.0)


# ---- hard non-landmark mining ----------------------------------------------------------------


def test_hardest_nonlandmarks_by_hand():
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    nonlandmarks = torch.tensor([
        [0.0, 0.0, 1.0],    # cos 0 to both
        [0.9, 0.1, 0.0],    # near centre 0: cos 0.994
        [0.0, -1.0, 0.0],   # opposite centre 1: max cos 0
        [0.5, 0.5, 0.7],    # cos 0.5/0.995 = 0.503 to both
        [0.1, 2.0, 0.0],    # near centre 1 (unnormalised): cos 0.999
    ])
    assert hardest_nonlandmarks(nonlandmarks, centres, 3).tolist() == [4, 1, 3]
    assert hardest_nonlandmarks(nonlandmarks, centres, 10).tolist() == [4, 1, 3, 0, 2]  # ties: lower row first
    with pytest.raises(ValueError, match="centres"):
        hardest_nonlandmarks(nonlandmarks, centres[:, :2], 1)


def test_sampler_draws_the_share_from_the_hard_set_and_resumes():
    labels = np.repeat(np.arange(8), 4)
    sampler = LandmarkBatchSampler(labels, num_nonlandmarks=100, classes_per_batch=2, samples_per_class=2,
                                   nonlandmarks_per_batch=8, num_batches=20, seed=3)
    plain = list(sampler)
    hard = [5, 17, 42, 63, 99]
    sampler.set_hard_nonlandmarks(hard, share=0.5)
    mined = list(sampler)
    first = len(labels)
    for batch_plain, batch in zip(plain, mined):
        nonlandmarks = np.array(batch[4:]) - first
        assert len(nonlandmarks) == 8
        assert np.isin(nonlandmarks, hard).sum() >= 4  # 4 drawn from the hard set (+ uniform luck)
        assert len(set(nonlandmarks[np.isin(nonlandmarks, hard)])) >= 4  # distinct within the step (4 ≤ 5)
        assert batch[:4] != [] and len(batch) == len(batch_plain)
    # The state round-trips, mid-epoch, through a fresh sampler.
    state = {**sampler.state_dict(), "skip": 7}
    fresh = LandmarkBatchSampler(labels, num_nonlandmarks=100, classes_per_batch=2, samples_per_class=2,
                                 nonlandmarks_per_batch=8, num_batches=20, seed=3)
    fresh.load_state_dict(state)
    assert list(fresh) == mined[7:]
    # Switched off: the draws are exactly those of a sampler that never mined.
    sampler.set_hard_nonlandmarks(None)
    assert list(sampler) == plain


def test_mining_callback_sends_the_hand_computed_nearest_pool_images(tiny_world, tmp_path):
    """At epoch 1's start the sampler holds exactly the pool images nearest to the class weights."""
    from core.embedding import embed_dataset  # noqa: PLC0415
    from datamodules import LandmarkDataModule  # noqa: PLC0415

    data = LandmarkDataModule(data_dir=str(tiny_world), image_size=32, classes_per_batch=2, samples_per_class=2,
                              nonlandmark_share=0.2, num_workers=0, eval_batch_size=16, oracle_clean=True)
    torch.manual_seed(0)
    module = LandmarkModule(num_classes=data.num_classes, backbone="resnet18", embedding_size=16,
                            loss=lambda c, d: ArcFaceLoss(c, d, scale=30.0))
    mining = HardNonlandmarkMining(hard_fraction=0.25, share=0.5, start_epoch=1, pool_sample=None)
    seen: dict[int, tuple[list[int], list[int]]] = {}

    class ByHand(pl.Callback):  # runs after the mining callback, before any step of the epoch
        def on_train_epoch_start(self, trainer, pl_module):
            pool = trainer.datamodule.eval_dataset("nonlandmark_pool")
            embeddings, _ = embed_dataset(pl_module, pool, batch_size=16)
            weights = pl_module.loss.class_weight_matrix()
            cos = (F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).t()).max(dim=1).values.numpy()
            by_hand = sorted(np.argsort(-cos, kind="stable")[: int(round(0.25 * len(pool)))].tolist())
            sampler = trainer.datamodule._train_sampler
            seen[trainer.current_epoch] = (sorted(sampler.hard_nonlandmarks.tolist()), by_hand)

    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[mining, ByHand()], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert seen[0][0] == []  # start_epoch 1: nothing mined in epoch 0
    mined, by_hand = seen[1]
    assert mined == by_hand and len(mined) > 0
    assert mining.mined_epoch == 1 and mining.state_dict() == {"mined_epoch": 1}


# ---- contrastive: miners and memory ----------------------------------------------------------


def test_contrastive_memory_gives_nonlandmarks_labels_unique_across_batches():
    torch.manual_seed(0)
    loss = ContrastiveLoss(3, 8, pos_margin=0.0, miner="none", neg_margin=1.5, memory_size=16)
    labels = torch.tensor([0, 0, 1, NONLANDMARK, NONLANDMARK])
    assert loss.pair_labels(labels).tolist() == [0, 0, 1, 3, 4]
    first = F.normalize(torch.randn(5, 8), dim=1).requires_grad_()
    value = loss(first, labels)
    # First batch: the memory holds only this batch, so the loss is PML's over the batch's pairs.
    plain = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.5)(first, torch.tensor([0, 0, 1, 3, 4]))
    assert torch.allclose(value, plain)
    value.backward()
    assert first.grad.abs().sum() > 0
    assert loss.pair_labels(labels).tolist() == [0, 0, 1, 5, 6]  # the next batch's non-landmarks are new
    assert sorted(loss.memory.label_memory[:5].tolist()) == [0, 0, 1, 3, 4]
    # Second batch: its anchors also meet the first batch's embeddings in the memory.
    second = F.normalize(torch.randn(5, 8), dim=1)
    with_memory = loss(second, labels)
    alone = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=1.5)(second, torch.tensor([0, 0, 1, 5, 6]))
    assert loss.memory.queue_idx == 10 and not torch.allclose(with_memory, alone)


def test_multi_similarity_miner_without_memory_matches_pml():
    from pytorch_metric_learning.distances import LpDistance  # noqa: PLC0415
    from pytorch_metric_learning.miners import MultiSimilarityMiner  # noqa: PLC0415

    torch.manual_seed(1)
    embeddings = F.normalize(torch.randn(8, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, NONLANDMARK, NONLANDMARK])
    ours = ContrastiveLoss(3, 4, pos_margin=0.0, neg_margin=0.5, miner="multi_similarity",
                           multi_similarity_epsilon=0.2)
    pair_labels = ours.pair_labels(labels)
    pairs = MultiSimilarityMiner(epsilon=0.2, distance=LpDistance())(embeddings, pair_labels)
    expected = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=0.5)(embeddings, pair_labels, pairs)
    assert torch.allclose(ours(embeddings, labels), expected)
