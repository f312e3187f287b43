"""LandmarkModule: every loss trains the whole network; checkpoints round-trip safely."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from core.errors import UserError
from core.labels import NONLANDMARK
from datamodules import LandmarkDataModule
from lightning_modules import LandmarkModule
from losses import ArcFaceLoss, CenterSoftmaxLoss, ContrastiveLoss

LOSSES = {
    "arcface": lambda c, d: ArcFaceLoss(c, d, scale=16.0),
    "subcenter_arcface": lambda c, d: ArcFaceLoss(c, d, sub_centers=3),
    "center": lambda c, d: CenterSoftmaxLoss(c, d, nonlandmark_margin=0.5),
    "contrastive": lambda c, d: ContrastiveLoss(c, d, miner="none"),
}


def _batch(num_classes=4, per_class=3, nonlandmarks=2, size=64):  # 2x2 final map: GeM is not the identity
    labels = torch.tensor([c for c in range(num_classes) for _ in range(per_class)] + [NONLANDMARK] * nonlandmarks)
    return {
        "image": torch.rand(len(labels), 3, size, size),
        "label": labels,
        "index": torch.arange(len(labels)),
        "valid": torch.ones(len(labels), dtype=torch.bool),
    }


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_backbone_head_pooling_and_loss(name):
    torch.manual_seed(0)
    module = LandmarkModule(num_classes=4, backbone="resnet10t", embedding_size=32, loss=LOSSES[name])
    module.train()
    batch = _batch()
    loss = module.loss(module(batch["image"]), batch["label"])
    loss.backward()
    assert torch.isfinite(loss)
    assert module.net.backbone.conv1[0].weight.grad.abs().sum() > 0
    assert module.net.fc.weight.grad.abs().sum() > 0
    assert module.net.pool.p.grad is not None and module.net.pool.p.grad != 0
    own = [p for p in module.loss.parameters()]
    if name != "contrastive":
        assert own and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)


class _RecordingLoss(torch.nn.Module):
    def forward(self, embeddings, labels):
        self.labels = labels.clone()
        return embeddings.sum() * 0


def test_unreadable_samples_are_masked_out_of_the_loss():
    module = LandmarkModule(num_classes=4, backbone="resnet10t", embedding_size=32)
    module.loss = _RecordingLoss()
    module.log = lambda *args, **kwargs: None  # logging needs a trainer; not under test here
    seen = []
    module.net.register_forward_pre_hook(lambda net, args: seen.append(args[0].shape[0]))
    batch = _batch()
    batch["valid"][[0, 5, 13]] = False
    module.training_step(batch, 0)
    keep = torch.ones(len(batch["label"]), dtype=torch.bool)
    keep[[0, 5, 13]] = False
    assert torch.equal(module.loss.labels, batch["label"][keep])
    assert seen == [len(keep) - 3]  # placeholders never reach the network (BatchNorm statistics)
    batch["valid"][:] = False
    batch["valid"][2] = True
    module.training_step(batch, 0)  # one readable image: whole batch through, loss on that one
    assert seen[-1] == len(keep) and torch.equal(module.loss.labels, batch["label"][2:3])


def test_a_batch_with_placeholders_trains_like_the_same_batch_without_them():
    """The unmasked path (every image readable) and the masked one give the same loss: BatchNorm in
    train mode sees the same rows, and the placeholders never reach the loss."""
    torch.manual_seed(0)
    module = LandmarkModule(num_classes=4, backbone="resnet10t", embedding_size=32, loss=LOSSES["center"])
    module.train()
    module.log = lambda *args, **kwargs: None  # logging needs a trainer; not under test here
    clean = _batch()
    padded = {k: torch.cat([v[:3], v[:2], v[3:]]) for k, v in clean.items()}  # 2 placeholder rows at 3, 4
    padded["valid"][3:5] = False
    padded["image"][3:5] = 0.0
    centers = module.loss.centers.clone()
    loss_clean = module.training_step(clean, 0)
    module.loss.centers.copy_(centers)  # the center update is in place: start the second step equal
    torch.testing.assert_close(module.training_step(padded, 0), loss_clean)


def test_embeddings_are_unit_norm_and_input_is_normalised_inside():
    module = LandmarkModule(num_classes=3, backbone="resnet10t", embedding_size=16).eval()
    with torch.no_grad():
        emb = module(torch.rand(5, 3, 48, 48))
    assert emb.shape == (5, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    assert module.net.mean.shape == (1, 3, 1, 1)


def test_checkpoint_round_trip_with_weights_only(tiny_world, tmp_path):
    datamodule = LandmarkDataModule(data_dir=str(tiny_world), image_size=32, classes_per_batch=4,
                                    samples_per_class=2, num_workers=0, eval_batch_size=16)
    module = LandmarkModule(num_classes=datamodule.num_classes, backbone="resnet10t", embedding_size=32,
                            loss=lambda c, d: CenterSoftmaxLoss(c, d))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, use_distributed_sampler=False,
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    raw = torch.load(path, weights_only=True, map_location="cpu")  # no pickle needed to read it
    info = raw["landmark_recognition"]
    assert info["landmark_ids"] == datamodule.class_map.to_list()
    assert raw["LandmarkDataModule"]["landmark_ids"] == datamodule.class_map.to_list()
    restored = LandmarkModule.load_from_checkpoint(path, loss=lambda c, d: CenterSoftmaxLoss(c, d), weights_only=True)
    torch.testing.assert_close(restored.loss.centers, module.loss.centers, rtol=0, atol=0)
    assert restored.landmark_ids == datamodule.class_map.to_list()
    assert restored.hparams.num_classes == datamodule.num_classes


def test_pretrained_without_network_says_what_to_pass(monkeypatch):
    # As on a machine without internet, but immediate. huggingface_hub reads the variable when it
    # is imported (timm imports it at collection), so its constant is set too.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match=r"pretrained: offline.*mobilenetv2_100.*pretrained_path"):
        LandmarkModule(num_classes=3, backbone="resnet18", pretrained=True)


def test_offline_weights_give_the_backbone_imagenet_statistics():
    module = LandmarkModule(num_classes=3, backbone="mobilenetv2_100", pretrained="offline", embedding_size=16)
    torch.testing.assert_close(module.net.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    lite = LandmarkModule(num_classes=3, backbone="tf_efficientnet_lite0", pretrained="offline", embedding_size=16)
    torch.testing.assert_close(lite.net.std.flatten(), torch.tensor([0.5, 0.5, 0.5]))


def test_a_checkpoint_of_another_configuration_is_a_user_error_naming_the_tensors():
    """Lightning loads --ckpt_path's weights strictly through load_state_dict; a mismatch was a
    RuntimeError traceback listing tensors, and is now one line saying which config to pass."""
    def module(loss, classes=4):
        torch.manual_seed(0)
        return LandmarkModule(num_classes=classes, backbone="resnet10t", embedding_size=32, loss=LOSSES[loss])

    arcface = module("arcface").state_dict()
    with pytest.raises(UserError, match=r'does not fit the model.*Missing key\(s\).*"loss.weight".*'
                                        r"--config RUN/config.yaml"):
        module("center").load_state_dict(arcface)
    with pytest.raises(UserError, match=r"size mismatch for loss.arcface.W"):
        module("arcface", classes=6).load_state_dict(arcface)
    # What a loss fills in itself still loads: ArcFace checkpoints from before the margin schedule.
    old = {k: v for k, v in arcface.items() if k not in ("loss.step", "loss.class_margins")}
    restored = module("arcface")
    restored.load_state_dict(old)
    torch.testing.assert_close(restored.loss.arcface.W, arcface["loss.arcface.W"], rtol=0, atol=0)
