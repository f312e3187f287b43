"""Multi-scale embedding (`landmarks index --scales`): the per-scale forward passes summed by hand,
the single-scale identity unchanged (indexes and caches made before the option still match), and
an index that embeds its queries at the scales it was built with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from index_probes import calibration_embeddings, tiny_index_args
from torch import nn

from cli.main import main
from recognition.artifact import LandmarkIndex, ModelMismatchError
from recognition.calibration import calibrate_threshold
from recognition.export import export_model
from recognition.recognizer import Recognizer, load_index_model
from retrieval.embedding_model import MultiScaleNet, load_embedding_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SizeNet(nn.Module):
    """An embedding that depends on the input size: unit ``[H, W, 10 · mean]``."""

    embedding_size = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([torch.full((len(x),), float(x.shape[2])), torch.full((len(x),), float(x.shape[3])),
                            10 * x.mean(dim=(1, 2, 3))], dim=1)
        return F.normalize(rows, dim=1)


def test_multiscale_sums_the_unit_embeddings_of_each_resized_batch():
    x = torch.rand(2, 3, 8, 12)
    net = MultiScaleNet(SizeNet(), (0.5, 1.0, 2.0))
    for i in range(2):
        mean = float(x[i].mean())
        small = F.interpolate(x[i:i + 1], size=(4, 6), mode="bilinear", align_corners=False, antialias=True)
        large = F.interpolate(x[i:i + 1], size=(16, 24), mode="bilinear", align_corners=False)
        rows = [F.normalize(torch.tensor(v), dim=0) for v in ([4.0, 6.0, 10 * float(small.mean())],
                                                             [8.0, 12.0, 10 * mean],
                                                             [16.0, 24.0, 10 * float(large.mean())])]
        by_hand = F.normalize(sum(rows), dim=0)
        torch.testing.assert_close(net(x)[i], by_hand, atol=1e-6, rtol=1e-6)
    # One scale of 1 is the network itself.
    torch.testing.assert_close(MultiScaleNet(SizeNet(), (1.0,))(x), SizeNet()(x))
    for bad in ((), (1.0, 1.0), (0.1, 1.0), (1.0, 5.0)):
        with pytest.raises(ValueError, match="scales must be distinct factors"):
            MultiScaleNet(SizeNet(), bad)


def test_a_module_with_eval_scales_evaluates_the_embedding_the_index_uses():
    from core.errors import UserError
    from lightning_modules import LandmarkModule

    torch.manual_seed(0)
    module = LandmarkModule(num_classes=3, backbone="resnet18", embedding_size=8, eval_scales=[1.0, 1.414]).train()
    batch = {"image": torch.rand(2, 3, 32, 32), "index": torch.arange(2), "label": torch.zeros(2, dtype=torch.long),
             "valid": torch.ones(2, dtype=torch.bool)}
    got = module.validation_step(batch, 0)["embeddings"]
    assert module.training  # the evaluation switches to eval mode only for its forward passes
    with torch.no_grad():
        module.eval()
        large = F.interpolate(batch["image"], scale_factor=1.414, mode="bilinear", align_corners=False)
        assert large.shape[-2:] == (45, 45)
        by_hand = F.normalize(module(batch["image"]) + module(large), dim=1)
        # what `landmarks index --scales 1 1.414` embeds with the same network
        indexed = MultiScaleNet(module.net, (1.0, 1.414))(batch["image"])
    torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got, indexed, atol=1e-6, rtol=1e-6)
    # no scales, or [1]: one forward pass, as before the option
    plain = LandmarkModule(num_classes=3, backbone="resnet18", embedding_size=8, eval_scales=[1.0])
    plain.net.load_state_dict(module.net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.validation_step(batch, 0)["embeddings"], module(batch["image"]))
    with pytest.raises(UserError, match=r"model.eval_scales: scales must be distinct factors"):
        LandmarkModule(num_classes=3, backbone="resnet18", embedding_size=8, eval_scales=[1.0, 1.0])


def test_single_scale_keeps_the_identity_and_multiscale_records_its_scales():
    plain = load_embedding_model(backbone="mobilenetv2_100", image_size=64)
    assert load_embedding_model(backbone="mobilenetv2_100", image_size=64, scales=[1]).identity == plain.identity
    multi = load_embedding_model(backbone="mobilenetv2_100", image_size=64, scales=[0.75, 1, 1.5])
    assert multi.identity == {**plain.identity, "scales": [0.75, 1.0, 1.5]} and multi.key != plain.key
    assert multi.embedding_size == plain.embedding_size
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        parts = [plain.net(F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False, antialias=s < 1))
                 if s != 1 else plain.net(x) for s in (0.75, 1.0, 1.5)]
        torch.testing.assert_close(multi.net(x), F.normalize(sum(parts), dim=1), atol=1e-5, rtol=1e-5)


def test_index_command_embeds_queries_at_the_scales_it_was_built_with(tiny_world, tmp_path, capsys):
    out = tmp_path / "index"
    assert main(tiny_index_args(tiny_world, out) + ["--scales", "0.75", "1", "1.5"]) == 0
    assert "scales:     every photo embedded at 0.75 / 1 / 1.5 × 64 px, summed" in capsys.readouterr().out
    index = LandmarkIndex.load(out)
    assert index.model["identity"]["scales"] == [0.75, 1.0, 1.5]
    # The recogniser reloads the model at those scales, from the index alone or from --backbone.
    for model in (load_index_model(index), load_index_model(index, backbone="mobilenetv2_100")):
        assert isinstance(model.net, MultiScaleNet) and model.net.scales == (0.75, 1.0, 1.5)
    # The exported network is the multi-scale one, checked against the eager model.
    exported = export_model(load_index_model(index), tmp_path / "export", formats=("torchscript",))
    assert exported["files"]["torchscript"]["checked"] and exported["files"]["torchscript"]["max_abs_diff"] < 1e-4
    recognizer = Recognizer(index)
    emb = calibration_embeddings(recognizer, tiny_world)
    # The threshold was calibrated on the multi-scale embeddings the recogniser computes ...
    scores, _ = index.top1(emb)
    assert index.calibration.threshold == pytest.approx(calibrate_threshold(scores, 0.05).threshold, abs=1e-5)
    # ... which are not the single-scale ones: a single-scale model is refused by the index.
    single = load_embedding_model(backbone="mobilenetv2_100", image_size=64)
    with pytest.raises(ModelMismatchError):
        index.check_model(single.identity, single.embedding_size)
    single_emb = np.concatenate([single.net.eval()(recognizer._load(p)[0][None]).detach().numpy()
                                 for p in [str(tiny_world / line.split(",")[0]) for line in
                                           (tiny_world / "calibration.csv").read_text().splitlines()[1:3]]])
    assert not np.allclose(single_emb, emb[:2], atol=1e-3)
    # A bad scale is the user's mistake: one line, exit 2.
    assert main(tiny_index_args(tiny_world, tmp_path / "bad") + ["--scales", "1", "1"]) == 2
    assert "landmarks index: error: --scales: scales must be distinct factors" in capsys.readouterr().err
