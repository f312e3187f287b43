"""The one way this project embeds images with a model: a batch, or a whole (sub)set of a dataset.

* :func:`embed_batch` is the forward pass every caller uses (validation/test/predict steps, the
  cached ``Trainer.predict`` embedding, the recogniser, the loop below): no gradients, the network
  in eval mode for the call (every submodule's own mode restored afterwards), an optional
  precision context (``trainer.precision_plugin.forward_context``), the network's own inference
  precision (:func:`inference_precision`: bf16 autocast for a network that asks for it, inside a
  float32 fit too), float32 rows out.
* :func:`embed_dataset` embeds a dataset, or the items at ``positions``, in batches. Under DDP
  (a default process group is initialised) it is a collective: each rank embeds a disjoint part
  and every rank gets the whole result, gathered by :class:`core.accumulator.EmbeddingAccumulator`
  into the caller's order.

What lives elsewhere: the on-disk cache and the multi-GPU ``Trainer.predict`` path
(``retrieval.embed``), and threads that decode photos ahead of the network (``recognition``);
both call :func:`embed_batch`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from core.accumulator import EmbeddingAccumulator, rank_and_world

__all__ = ["BF16_CPU_FLAGS", "INFERENCE_PRECISIONS", "bf16_is_fast", "check_inference_precision", "embed_batch",
           "embed_dataset", "eval_mode", "inference_autocast", "inference_precision", "multiscale_forward",
           "scale_factors"]

ForwardContext = Callable[[], AbstractContextManager]

#: What a network may embed in: float32, or bfloat16 autocast (convolutions and matrix products in
#: bf16, accumulated in float32; ~2x the embedding rate on CPUs with AVX-512 BF16 and on GPUs).
INFERENCE_PRECISIONS = ("32", "bf16")


def check_inference_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`INFERENCE_PRECISIONS`; otherwise a ``ValueError`` naming it."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"inference_precision must be one of {', '.join(map(repr, INFERENCE_PRECISIONS))}, "
                         f"got {precision!r}")
    return precision


def inference_precision(net: nn.Module) -> str:
    """The precision ``net`` embeds in: its ``inference_precision`` attribute (an ``EmbeddingNet``'s,
    which a ``LandmarkModule`` and a multi-scale wrapper pass on), ``"32"`` for a network without one."""
    return getattr(net, "inference_precision", "32")


#: CPU flags (Linux ``/proc/cpuinfo``) of bf16 arithmetic: x86 AVX-512 BF16 and AMX, Arm's BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def bf16_is_fast(device_type: str = "cpu", cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether ``device_type`` has bf16 arithmetic: a GPU that supports it, or a CPU whose flags in
    ``cpuinfo`` name one of :data:`BF16_CPU_FLAGS` (unknown, e.g. no such file: False). Elsewhere
    bf16 autocast still computes, but emulated, slower than float32. (oneDNN's own check only asks
    for AVX-512, which CPUs without BF16 instructions have too.)"""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open(cpuinfo) as handle:
            flags = {flag for line in handle if line.split(":")[0].strip() in ("flags", "Features")
                     for flag in line.split(":", 1)[1].split()}
    except OSError:
        return False
    return bool(flags & BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()


def inference_autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The context an inference pass in ``precision`` runs in on ``device_type`` ("cpu", "cuda")."""
    if check_inference_precision(precision) == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode inside the block; afterwards every submodule has its own mode back.

    (Restoring with ``net.train(was_training)`` would switch on training in submodules that were
    deliberately in eval mode, such as frozen BatchNorm layers.)
    """
    modes = [(module, module.training) for module in net.modules()]
    net.eval()
    try:
        yield net
    finally:
        for module, training in modes:
            module.training = training


def scale_factors(scales) -> tuple[float, ...] | None:
    """``scales`` as distinct float factors in [0.25, 4]; None for one scale (None or ``[1]``), whose
    model keeps the single-scale identity. Anything else is a ``ValueError`` naming the scales."""
    if scales is None:
        return None
    factors = tuple(float(s) for s in scales)
    if not factors or any(not 0.25 <= s <= 4.0 for s in factors) or len(set(factors)) != len(factors):
        raise ValueError(f"scales must be distinct factors in [0.25, 4], got {list(factors)}")
    return None if factors == (1.0,) else factors


def multiscale_forward(net: nn.Module, images: torch.Tensor, scales) -> torch.Tensor:
    """``net`` applied to the batch resized by each of ``scales``; the normalised sum of the
    per-scale unit embeddings (Radenović et al.'s multi-scale descriptor with exponent 1, cirtorch's
    ``extract_ms``: the input tensor is resized bilinearly, with antialiasing when shrinking).
    Scale 1 is the batch as given; one scale (None or ``[1]``) is ``net(images)`` itself."""
    factors = scale_factors(scales)
    if factors is None:
        return net(images).float()
    total = None
    for scale in factors:
        x = images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear",
                                                      align_corners=False, antialias=scale < 1.0)
        rows = net(x).float()
        total = rows if total is None else total + rows
    return F.normalize(total, dim=1)


def embed_batch(
    net: nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device | str | None = None,
    forward_context: ForwardContext | None = None,
    scales=None,
) -> torch.Tensor:
    """Float32 embeddings ``[B, D]`` of ``images`` (``[B, 3, H, W]``), on the network's device.

    Args:
        net: maps a batch of images to embedding rows (an ``EmbeddingNet``, a LightningModule);
            it runs in its :func:`inference_precision`.
        images: the batch; moved to ``device`` first when one is given.
        device: where the network is.
        forward_context: a callable giving the context to run the forward pass in, e.g. a
            Lightning trainer's ``precision_plugin.forward_context`` (autocast for mixed precision).
        scales: embed at these multiples of the batch's size and sum (:func:`multiscale_forward`);
            None: one scale.
    """
    if device is not None:
        images = images.to(device, non_blocking=True)
    with (torch.no_grad(), eval_mode(net), (forward_context or nullcontext)(),
          inference_autocast(inference_precision(net), images.device.type)):
        return multiscale_forward(net, images, scales)


def embed_dataset(
    net: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    positions: Sequence[int] | np.ndarray | None = None,
    extras: Sequence[str] = ("valid",),
    forward_context: ForwardContext | None = None,
    progress: bool = False,
    desc: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Embed ``dataset`` (or its items at ``positions``) with :func:`embed_batch`.

    The dataset's items are dicts with an ``"image"`` tensor and the keys named in ``extras``
    (``ImageDataset``'s ``label``, ``valid``, ...). When a default process group is initialised
    this is a collective: every rank must call it with the same arguments; rank ``r`` of ``w``
    embeds items ``r, r + w, r + 2w, ...`` and every rank returns the whole result.

    Args:
        net, device, forward_context: as for :func:`embed_batch`.
        batch_size, num_workers: of the data loader (``pin_memory`` when ``device`` is CUDA).
        positions: the dataset items to embed, in the order wanted (repeats allowed); default all.
        extras: item keys collected next to the embeddings.
        progress, desc: a tqdm bar over this rank's batches.

    Returns:
        ``(embeddings, extras)`` on the CPU: ``embeddings[i]`` (float32) belongs to item
        ``positions[i]`` (item ``i`` without ``positions``), each requested extra is in the same
        order, and ``extras["indices"]`` is ``0 .. n-1``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = np.arange(len(dataset)) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
    rank, world = rank_and_world()
    mine = np.arange(len(items))[rank::world]  # places in ``items`` this rank embeds, in order
    loader = DataLoader(
        Subset(dataset, items[mine].tolist()), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device is not None and torch.device(device).type == "cuda",
    )
    accumulator = EmbeddingAccumulator(expected_size=len(items))
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    offset = 0
    for batch in loader:
        rows = embed_batch(net, batch["image"], device=device, forward_context=forward_context)
        # The loader's order is ``mine``'s: the accumulator gets places in ``items``, not the
        # dataset's own indices (``positions`` may repeat an item).
        where = torch.from_numpy(mine[offset : offset + len(rows)])
        accumulator.update(rows, where, **{key: torch.as_tensor(batch[key]) for key in extras})
        offset += len(rows)
    return accumulator.compute()
