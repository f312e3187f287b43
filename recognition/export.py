"""Export the embedding network for serving without this code base: TorchScript and ONNX.

Both take ``float32 [B, 3, S, S]`` images in [0, 1] (mean/std normalisation is inside the
network) and return unit-norm ``[B, D]`` embeddings; the batch dimension is dynamic, ``S`` is
the model's image size. ``export.json`` next to the files records the model identity, so that a
server can check it against an index's ``index.json``.

* TorchScript: ``torch.jit.trace`` (torch 2.14 warns that it is deprecated in favour of
  ``torch.export``, but still what many C++/mobile runtimes load).
* ONNX: the ``torch.export``-based exporter (``dynamo=True``), which needs the optional
  ``onnx`` + ``onnxscript`` packages (``pip install -e ".[export]"``; ``onnxruntime`` for checks).

Every export is checked against the eager model on real-looking inputs before it is kept.
"""

from __future__ import annotations

import logging
import os
import pathlib
import warnings

import numpy as np
import torch

from core.atomic import atomic_path, write_json_atomic
from core.embedding import inference_precision
from core.errors import UserError
from retrieval.embedding_model import EmbeddingModel

log = logging.getLogger(__name__)

__all__ = ["EXPORT_FORMATS", "ExportError", "export_model", "export_onnx", "export_torchscript", "run_exported"]

EXPORT_FORMATS = ("torchscript", "onnx")
#: Largest |exported - eager| accepted for unit-norm float32 embeddings (both run fp32 kernels
#: that differ only in summation order; measured differences are ~1e-7).
DEFAULT_TOLERANCE = 1e-4


class ExportError(UserError, RuntimeError):
    """An export failed or does not reproduce the eager model (or its optional packages are missing).

    A :class:`~core.errors.UserError` (the command line reports it in one line) and, as before, a
    ``RuntimeError``.
    """


def _example(model: EmbeddingModel, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, model.image_size, model.image_size, generator=g)


def export_torchscript(model: EmbeddingModel, path: str | os.PathLike) -> pathlib.Path:
    """Trace ``model.net`` and save it (atomically) as TorchScript."""
    path = pathlib.Path(path)
    net = model.net.eval()
    with warnings.catch_warnings():
        # Deprecated upstream (see the module docstring); the export is still checked below.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*")
        with torch.no_grad():
            traced = torch.jit.trace(net, _example(model, 2), check_trace=False)
        with atomic_path(path) as tmp:
            traced.save(str(tmp))
    return path


def export_onnx(model: EmbeddingModel, path: str | os.PathLike, opset: int | None = None) -> pathlib.Path:
    """Export ``model.net`` to a single ONNX file (dynamic batch) with torch's ``torch.export`` exporter."""
    try:
        import onnx  # noqa: F401  (the exporter needs both; fail with an install hint instead of deep inside)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs the optional packages: pip install -e \".[export]\" ({err})") from err
    path = pathlib.Path(path)
    net = model.net.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    with atomic_path(path) as tmp:
        torch.onnx.export(
            net, (_example(model, 2),), str(tmp), dynamo=True, input_names=["images"], output_names=["embeddings"],
            dynamic_shapes=({0: batch},), external_data=False, opset_version=opset, verbose=False,
        )
    return path


def run_exported(path: str | os.PathLike, fmt: str, images: torch.Tensor) -> np.ndarray:
    """Embeddings of ``images`` computed by an exported file (TorchScript, or ONNX via onnxruntime)."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*")
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return module(images).numpy()
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as err:
            raise ExportError(f"checking an ONNX file needs onnxruntime: pip install -e \".[export]\" ({err})") from err
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"images": images.numpy()})[0]
    raise ValueError(f"unknown export format {fmt!r}; expected one of {EXPORT_FORMATS}")


def export_model(
    model: EmbeddingModel,
    out: str | os.PathLike,
    formats=EXPORT_FORMATS,
    check_batch: int = 3,
    tolerance: float = DEFAULT_TOLERANCE,
    check: bool = True,
) -> dict:
    """Export to ``out/model.pt`` / ``out/model.onnx`` and ``out/export.json``; returns that JSON.

    With ``check``, each file is run on ``check_batch`` images (a batch size the trace never saw,
    to exercise the dynamic batch) and compared with the eager model; a difference above
    ``tolerance`` removes the file and raises :class:`ExportError`. ONNX is checked only when
    onnxruntime is installed (otherwise recorded as unchecked).
    """
    precision = inference_precision(model.net)
    if precision != "32":
        # The traced graph runs in float32: its vectors would not be the ones the index holds.
        raise ExportError(f"the model embeds in {precision} (model.inference_precision), which an exported float32 "
                          "graph does not reproduce: export the checkpoint with --inference-precision 32 and "
                          "build the index it serves with --inference-precision 32 too")
    formats = tuple(formats)
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ValueError(f"export formats must be among {EXPORT_FORMATS}, got {formats}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = _example(model, check_batch, seed=1)
    with torch.no_grad():
        eager = model.net.eval()(images).numpy()
    files = {}
    for fmt in formats:
        target = out / ("model.pt" if fmt == "torchscript" else "model.onnx")
        (export_torchscript if fmt == "torchscript" else export_onnx)(model, target)
        entry = {"file": target.name, "checked": False, "max_abs_diff": None}
        if check:
            try:
                got = run_exported(target, fmt, images)
            except ExportError as err:
                if fmt != "onnx":
                    raise
                log.warning("%s written but not checked: %s", target, err)
                got = None
            if got is not None:
                diff = float(np.abs(got - eager).max()) if got.shape == eager.shape else float("inf")
                if not diff <= tolerance:
                    target.unlink(missing_ok=True)
                    raise ExportError(f"{fmt} export differs from the eager model by {diff:.3g} > {tolerance:g} "
                                      f"(output shape {got.shape} vs {eager.shape}); file removed")
                entry.update(checked=True, max_abs_diff=diff)
        files[fmt] = entry
        log.info("exported %s: %s", fmt, target)
    meta = {
        "identity": model.identity,
        "key": model.key,
        "input": {"name": "images", "dtype": "float32", "shape": ["batch", 3, model.image_size, model.image_size],
                  "range": [0.0, 1.0], "note": "RGB; mean/std normalisation is inside the model"},
        "output": {"name": "embeddings", "dtype": "float32", "shape": ["batch", model.embedding_size],
                   "note": "L2-normalised; cosine similarity = inner product"},
        "files": files,
        "torch": torch.__version__,
    }
    write_json_atomic(out / "export.json", meta)
    return meta
