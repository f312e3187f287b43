"""bfloat16 inference (`model.inference_precision: bf16`): every inference pass runs the backbone
under bf16 autocast and training does not; the precision travels with the checkpoint into
`landmarks clean` / `index` / `recognize`, is part of the model identity (so caches and indexes
never mix bf16 and float32 vectors), and an index embeds its queries in its own precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.embedding import embed_batch, inference_precision
from core.errors import UserError
from lightning_modules import LandmarkModule
from lightning_modules.landmark_module import CHECKPOINT_FORMAT
from recognition.artifact import LandmarkIndex, ModelMismatchError
from recognition.recognizer import load_index_model
from retrieval.embedding_model import MultiScaleNet, load_embedding_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _conv_dtypes(net: nn.Module) -> list[torch.dtype]:
    """Records the output dtype of every convolution of ``net`` from now on."""
    seen: list[torch.dtype] = []
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    return seen


class _Net(nn.Module):
    def __init__(self, precision: str):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.inference_precision = nn.Conv2d(3, 8, 3), precision

    def forward(self, x):
        return F.normalize(self.conv(x).float().mean(dim=(2, 3)), dim=1)


def test_embed_batch_runs_a_bf16_network_under_autocast_and_returns_float32():
    x = torch.rand(4, 3, 16, 16)
    plain, half = _Net("32"), _Net("bf16")
    plain_dtypes, half_dtypes = _conv_dtypes(plain), _conv_dtypes(half)
    reference = embed_batch(plain, x)
    got = embed_batch(half, x)
    assert plain_dtypes == [torch.float32] and half_dtypes == [torch.bfloat16]
    assert got.dtype == torch.float32
    torch.testing.assert_close(reference, plain(x).detach())  # float32 is the network itself
    assert not torch.equal(got, reference)  # bf16 really ran ...
    assert (got * reference).sum(dim=1).min() > 0.99  # ... and stays close to float32
    assert inference_precision(nn.Linear(2, 2)) == "32"  # a network that does not say: float32
    with pytest.raises(ValueError, match="inference_precision must be one of '32', 'bf16', got 'fp8'"):
        embed_batch(_Net("fp8"), x)


def test_a_bf16_module_evaluates_in_bf16_and_trains_in_float32():
    module = LandmarkModule(num_classes=3, backbone="resnet10t", embedding_size=8, inference_precision="bf16").train()
    assert module.inference_precision == "bf16" and module.net.inference_precision == "bf16"
    dtypes = _conv_dtypes(module.net)
    batch = {"image": torch.rand(4, 3, 32, 32), "index": torch.arange(4), "label": torch.tensor([0, 0, 1, 1]),
             "valid": torch.ones(4, dtype=torch.bool)}
    rows = module.validation_step(batch, 0)["embeddings"]
    assert rows.dtype == torch.float32 and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    module.training_step(batch, 0).backward()
    assert set(dtypes) == {torch.float32}
    with pytest.raises(UserError, match="model.inference_precision must be one of '32', 'bf16', got '16'"):
        LandmarkModule(num_classes=3, backbone="resnet10t", embedding_size=8, inference_precision="16")


def _checkpoint(tmp_path, precision: str | None):
    """A LandmarkModule checkpoint as Lightning writes it (``None``: one from before the option)."""
    extra = {} if precision is None else {"inference_precision": precision}
    module = LandmarkModule(num_classes=3, backbone="resnet10t", embedding_size=8, **extra)
    hparams = dict(module.hparams)
    if precision is None:
        hparams.pop("inference_precision")
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": hparams, "datamodule_hyper_parameters": {"image_size": 32}}
    module.on_save_checkpoint(ckpt)
    assert ckpt["landmark_recognition"]["format"] == CHECKPOINT_FORMAT
    path = tmp_path / f"{precision}.ckpt"
    torch.save(ckpt, path)
    return path


def test_the_checkpoint_carries_its_precision_into_the_identity(tmp_path):
    old, plain, half = (_checkpoint(tmp_path, p) for p in (None, "32", "bf16"))
    old_model = load_embedding_model(checkpoint=old)
    assert old_model.net.inference_precision == "32" and "inference_precision" not in old_model.identity
    assert "inference_precision" not in load_embedding_model(checkpoint=plain).identity  # float32 as before
    half_model = load_embedding_model(checkpoint=half, scales=[1, 1.414])
    assert isinstance(half_model.net, MultiScaleNet) and inference_precision(half_model.net) == "bf16"
    assert half_model.identity["inference_precision"] == "bf16" and half_model.identity["scales"] == [1.0, 1.414]
    # asked for explicitly, either way round; the key (caches) follows the identity
    forced = load_embedding_model(checkpoint=half, scales=[1, 1.414], inference_precision="32")
    assert "inference_precision" not in forced.identity and forced.key != half_model.key
    assert load_embedding_model(checkpoint=plain, inference_precision="bf16").identity["inference_precision"] == "bf16"
    backbone = load_embedding_model(backbone="mobilenetv2_100", image_size=32, inference_precision="bf16")
    assert backbone.identity["inference_precision"] == "bf16"
    with pytest.raises(ValueError, match="got 'half'"):
        load_embedding_model(checkpoint=half, inference_precision="half")


def test_an_index_embeds_its_queries_in_its_own_precision(tiny_world, tmp_path, capsys):
    from cli.main import main
    from recognition.recognizer import Recognizer

    ckpt = _checkpoint(tmp_path, "bf16")
    common = ["index", "--manifest", str(tiny_world / "db.csv"), "--checkpoint", str(ckpt), "--scales", "1",
              "--nonlandmarks", str(tiny_world / "calibration.csv"), "--target-fpr", "0.05", "--num-workers", "0",
              "--cache-dir", ""]
    for precision, args in (("bf16", []), ("32", ["--inference-precision", "32"])):
        out = tmp_path / f"index-{precision}"
        assert main(common + ["--out", str(out)] + args) == 0
        index = LandmarkIndex.load(out)
        assert index.model["identity"].get("inference_precision", "32") == precision
        # Reloaded from the index alone, or from the checkpoint given again: the index's precision,
        # whatever the checkpoint records; and the queries really are embedded in it.
        for model in (load_index_model(index), load_index_model(index, checkpoint=ckpt)):
            assert inference_precision(model.net) == precision
        recognizer = Recognizer(index)
        dtypes = _conv_dtypes(recognizer.model.net)
        recognizer.embed_tensors(torch.rand(2, 3, 32, 32))
        assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    # The same weights in the other precision are another model to the index, and the refusal says which.
    plain = load_embedding_model(checkpoint=ckpt, scales=[1], inference_precision="32")
    with pytest.raises(ModelMismatchError, match=r"float32\) is not the model .* bf16\)"):
        LandmarkIndex.load(tmp_path / "index-bf16").check_model(plain.identity, plain.embedding_size)
    capsys.readouterr()


def test_export_refuses_a_bf16_model_whose_vectors_a_float32_graph_would_not_match(tmp_path):
    from recognition.export import ExportError, export_model

    ckpt = _checkpoint(tmp_path, "bf16")
    with pytest.raises(ExportError, match=r"embeds in bf16 .* --inference-precision 32 "):
        export_model(load_embedding_model(checkpoint=ckpt), tmp_path / "export", formats=("torchscript",))
    assert not (tmp_path / "export" / "model.pt").exists()
    meta = export_model(load_embedding_model(checkpoint=ckpt, inference_precision="32"), tmp_path / "export",
                        formats=("torchscript",))
    assert meta["files"]["torchscript"]["checked"] and "inference_precision" not in meta["identity"]


def test_export_command_takes_a_precision_and_says_what_to_do_with_a_bf16_model(tmp_path, capsys):
    from cli.main import main

    ckpt = str(_checkpoint(tmp_path, "bf16"))
    export = ["export", "--checkpoint", ckpt, "--format", "torchscript", "--out"]
    assert main(export + [str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("landmarks export: error: the model embeds in bf16")
    assert "--inference-precision 32" in err[0]
    assert main(export + [str(tmp_path / "b"), "--inference-precision", "32"]) == 0
    assert (tmp_path / "b" / "model.pt").is_file()


def test_the_demo_embeds_in_float32_on_a_cpu_without_bf16_arithmetic(monkeypatch, capsys):
    import core.embedding
    from cli.demo import _precision_overrides

    monkeypatch.setattr(core.embedding, "bf16_is_fast", lambda device_type="cpu": True)
    assert _precision_overrides() == [] and capsys.readouterr().out == ""
    monkeypatch.setattr(core.embedding, "bf16_is_fast", lambda device_type="cpu": False)
    assert _precision_overrides() == ["--model.inference_precision=32"]
    assert "this CPU has no bfloat16 instructions" in capsys.readouterr().out


@pytest.mark.parametrize("flags, fast", [
    ("fpu avx2 avx512f avx512_vnni", False),          # AVX-512 without BF16 (e.g. Ice Lake): emulated
    ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),  # Zen 4, Cooper Lake
    ("fpu avx512f amx_bf16 amx_tile", True),          # Sapphire Rapids
])
def test_bf16_is_fast_only_on_a_cpu_with_bf16_instructions(tmp_path, flags, fast):
    from core.embedding import bf16_is_fast

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert bf16_is_fast("cpu", cpuinfo=str(cpuinfo)) is fast
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert bf16_is_fast("cpu", cpuinfo=str(arm))
    assert not bf16_is_fast("cpu", cpuinfo=str(tmp_path / "absent"))
