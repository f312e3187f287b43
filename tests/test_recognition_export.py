"""Export: TorchScript and ONNX files give the eager model's embeddings."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from datamodules.images import load_rgb
from datamodules.transforms import eval_transform
from lightning_modules.embedding_net import EmbeddingNet
from recognition.export import ExportError, export_model, run_exported
from retrieval.embedding_model import EmbeddingModel

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_model():
    # timm's tiny test EfficientNet (depthwise convs, BN, SiLU, like the real backbones) in the real
    # head (GeM -> FC -> BN -> L2): agreement does not depend on the weights, and the ONNX exporter's
    # cost grows with the graph (MobileNetV2-0.5: ~40 s on a busy 2-core machine; this: ~10 s).
    torch.manual_seed(0)
    net = EmbeddingNet("test_efficientnet", pretrained=False, embedding_size=32).eval()
    for module in net.modules():  # non-trivial BatchNorm statistics, so the test can see them
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    identity = {"source": "test", "backbone": "test_efficientnet", "embedding_size": 32, "image_size": 64}
    return EmbeddingModel(net, 64, identity)


def _photos(tiny_world, n=5):
    transform = eval_transform(64)
    paths = sorted((tiny_world / "images" / "queries").rglob("*.jpg"))[:n]
    return torch.stack([transform(image=load_rgb(p, max_side=128))["image"] for p in paths])


def test_torchscript_export_agrees_with_eager(small_model, tiny_world, tmp_path):
    meta = export_model(small_model, tmp_path, formats=["torchscript"])
    assert meta["files"]["torchscript"]["checked"] and meta["files"]["torchscript"]["max_abs_diff"] < 1e-4
    images = _photos(tiny_world)  # real photos, a batch size the trace never saw
    with torch.no_grad():
        eager = small_model.net(images).numpy()
    got = run_exported(tmp_path / "model.pt", "torchscript", images)
    np.testing.assert_allclose(got, eager, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    saved = json.loads((tmp_path / "export.json").read_text())
    assert saved["identity"] == small_model.identity and saved["output"]["shape"] == ["batch", 32]


@pytest.mark.skipif(not HAVE_ONNX, reason="ONNX export needs the optional extra: pip install -e '.[export]' "
                    "(onnx, onnxscript, onnxruntime)")
@pytest.mark.slow
def test_onnx_export_agrees_with_eager(small_model, tiny_world, tmp_path):
    meta = export_model(small_model, tmp_path, formats=["onnx"])
    assert meta["files"]["onnx"]["checked"] and meta["files"]["onnx"]["max_abs_diff"] < 1e-4
    for batch in (1, 5):  # dynamic batch dimension
        images = _photos(tiny_world, batch)
        with torch.no_grad():
            eager = small_model.net(images).numpy()
        got = run_exported(tmp_path / "model.onnx", "onnx", images)
        assert got.shape == (batch, 32)
        np.testing.assert_allclose(got, eager, atol=1e-5)


def test_a_wrong_export_is_caught_and_removed(small_model, tmp_path, monkeypatch):
    import recognition.export as export

    real = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda path, fmt, images: real(path, fmt, images) + 1e-2)
    with pytest.raises(ExportError, match="differs from the eager model"):
        export_model(small_model, tmp_path, formats=["torchscript"])
    assert not (tmp_path / "model.pt").exists()


def test_the_export_command_logs_its_files_only_with_verbose(small_model, tmp_path, monkeypatch, capsys):
    """Without -v, stderr repeated stdout's table as ``INFO recognition.export: exported torchscript: ...``."""
    import retrieval.embedding_model
    from cli.main import main

    monkeypatch.setattr(retrieval.embedding_model, "load_embedding_model", lambda **kwargs: small_model)
    argv = ["export", "--backbone", "test_efficientnet", "--format", "torchscript", "--out"]
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "quiet")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("torchscript ") and "quiet/model.pt" in out
    assert err == ""
    assert main(["-v", *argv, str(tmp_path / "loud")]) == 0
    assert "INFO recognition.export: exported torchscript: " in capsys.readouterr().err
