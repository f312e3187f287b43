"""Embed a list of image files with Lightning ``Trainer.predict``, cached on disk.

Database cleaning and index building embed the same hundreds of thousands of photos again and
again (another threshold, another run after a crash). :func:`embed_paths` therefore keeps every
embedding it computes in a cache folder and only ever computes what is missing:

* **Key.** One sub-folder per model (``embeddings-<model.key>``; the key hashes the model's
  identity, so a retrained checkpoint never reuses another model's vectors). Inside it, a row is
  keyed by the image's absolute path (``os.path.abspath``; symbolic links are not resolved) plus
  its size and modification time, so a file replaced under the same name is embedded again.
* **Chunks.** Rows are written in completed chunks (``chunk-<uuid>.npy`` float32 ``[n, D]`` and
  ``chunk-<uuid>.json`` with paths, sizes, mtimes and decode status). Each file is written to a
  temporary name and renamed (atomic on POSIX), the JSON last, so a reader sees whole chunks or
  nothing; a run killed half-way leaves its finished chunks, and the rerun computes the rest.
* **Reads** are memory-mapped (``np.load(mmap_mode="r", allow_pickle=False)``); no pickle anywhere.

Multi-GPU: with ``devices > 1`` (``strategy="ddp"`` or ``"ddp_spawn"``) each rank embeds a
disjoint part (Lightning's unrepeated distributed sampler for predict) and writes its own chunks;
after a barrier every rank (and, for ``ddp_spawn``, the launching process) reads the full result
from the cache. Without ``cache_dir`` a temporary cache is used, rank 0's folder broadcast to all
ranks; for multi-node runs give a ``cache_dir`` that every node can read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from torch.utils.data import DataLoader

from core.atomic import save_npy_atomic, write_json_atomic
from core.embedding import embed_batch
from core.launched_ranks import remember, stop_launched_ranks
from datamodules.datasets import ImageDataset
from datamodules.transforms import eval_transform
from datamodules.workers import worker_context
from retrieval.embedding_model import EmbeddingModel

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "EmbeddingResult", "cache_folder", "embed_paths", "store_embeddings"]

CACHE_FORMAT = "landmark-embedding-cache/1"
# Rows per cache chunk: the work a crash can lose, and the granularity of resuming.
DEFAULT_CHUNK_ROWS = 4096


@dataclass
class EmbeddingResult:
    """``embeddings[i]`` is the unit-norm float32 embedding of ``paths[i]``; all-zero where
    ``valid[i]`` is False (the file is missing, empty or could not be decoded)."""

    embeddings: np.ndarray
    valid: np.ndarray


def cache_folder(cache_dir: str | os.PathLike, model: EmbeddingModel) -> Path:
    """The folder holding ``model``'s cached embeddings under ``cache_dir``."""
    return Path(cache_dir) / f"embeddings-{model.key}"


def _file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file, or (-1, -1) if it does not exist, to detect replaced files."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _write_chunk(folder: Path, paths: list[str], stamps: list[tuple[int, int]], valid: np.ndarray,
                 embeddings: np.ndarray) -> None:
    name = f"chunk-{uuid.uuid4().hex}"
    save_npy_atomic(folder / f"{name}.npy", np.ascontiguousarray(embeddings, dtype=np.float32))
    # The JSON is the commit marker: written last, so a chunk without it is never read.
    write_json_atomic(
        folder / f"{name}.json",
        {
            "format": CACHE_FORMAT,
            "rows": len(paths),
            "dim": int(embeddings.shape[1]),
            "paths": paths,
            "sizes": [s for s, _ in stamps],
            "mtimes_ns": [m for _, m in stamps],
            "valid": [bool(v) for v in valid],
        },
        indent=None, newline=False,
    )


def store_embeddings(cache_dir: str | os.PathLike, model: EmbeddingModel, paths: Sequence[str],
                     embeddings: np.ndarray, valid: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> int:
    """Put embeddings computed elsewhere (e.g. by the evaluation that ran with ``model``'s very
    weights) into ``model``'s cache, so that :func:`embed_paths` finds them; returns rows written.

    The caller vouches that they are ``model``'s embeddings of ``paths`` under the evaluation
    transform; files are stamped now (size, mtime), as :func:`embed_paths` would.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    valid = np.asarray(valid, dtype=bool)
    if embeddings.shape != (len(paths), model.embedding_size) or valid.shape != (len(paths),):
        raise ValueError(f"store_embeddings: {len(paths)} paths, embeddings {embeddings.shape}, valid {valid.shape}; "
                         f"expected [{len(paths)}, {model.embedding_size}] and [{len(paths)}]")
    folder = cache_folder(cache_dir, model)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.json").exists():
        write_json_atomic(folder / "model.json", {"format": CACHE_FORMAT, "identity": model.identity},
                          indent=None, newline=False)
    abs_paths = [os.path.abspath(os.fspath(p)) for p in paths]
    stamps = [_file_stamp(p) for p in abs_paths]
    rows = np.where(valid[:, None], embeddings, 0.0).astype(np.float32)
    for s in range(0, len(abs_paths), chunk_rows):
        _write_chunk(folder, abs_paths[s:s + chunk_rows], stamps[s:s + chunk_rows], valid[s:s + chunk_rows],
                     rows[s:s + chunk_rows])
    return len(abs_paths)


def _lookup(folder: Path, paths: list[str], stamps: list[tuple[int, int]], dim: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Where each wanted path lives in the cache: ``(chunk number, row)`` or -1, plus the chunks.

    A cached row counts only if the file's size and mtime still match. Chunks that cannot be
    read (a foreign file, another dimension) are skipped with a warning, never trusted.
    """
    n = len(paths)
    chunk_of = np.full(n, -1, dtype=np.int64)
    row_of = np.full(n, -1, dtype=np.int64)
    chunks: list[tuple[Path, np.ndarray]] = []  # (npy path, valid flags)
    if not folder.is_dir() or n == 0:
        return chunk_of, row_of, chunks
    wanted: dict[str, int] = {}
    for i, p in enumerate(paths):
        wanted.setdefault(p, i)
    duplicates = n != len(wanted)
    for meta_path in sorted(folder.glob("chunk-*.json")):
        npy = meta_path.with_suffix(".npy")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            if int(meta["dim"]) != dim:
                raise ValueError(f"dimension {meta['dim']} != model's {dim}")
            header = np.load(npy, mmap_mode="r", allow_pickle=False)
            if header.shape != (int(meta["rows"]), dim) or len(meta["paths"]) != header.shape[0]:
                raise ValueError(f"array shape {header.shape} does not match its {meta['rows']} rows")
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("embedding cache: skipping unreadable chunk %s (%s)", meta_path, err)
            continue
        number = len(chunks)
        chunks.append((npy, np.asarray(meta["valid"], dtype=bool)))
        for row, (p, size, mtime) in enumerate(zip(meta["paths"], meta["sizes"], meta["mtimes_ns"])):
            i = wanted.get(p)
            if i is not None and stamps[i] == (size, mtime):
                chunk_of[i], row_of[i] = number, row
    if duplicates:  # a path listed twice gets the row found for its first occurrence
        for i, p in enumerate(paths):
            first = wanted[p]
            if first != i:
                chunk_of[i], row_of[i] = chunk_of[first], row_of[first]
    return chunk_of, row_of, chunks


def _assemble(chunk_of: np.ndarray, row_of: np.ndarray, chunks: list, dim: int) -> EmbeddingResult:
    n = len(chunk_of)
    embeddings = np.zeros((n, dim), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    for number, (npy, chunk_valid) in enumerate(chunks):
        dst = np.flatnonzero(chunk_of == number)
        if len(dst) == 0:
            continue
        src = row_of[dst]
        array = np.load(npy, mmap_mode="r", allow_pickle=False)
        order = np.argsort(src, kind="stable")  # read the memory map front to back
        embeddings[dst[order]] = array[src[order]]
        valid[dst] = chunk_valid[src]
    embeddings[~valid] = 0.0
    return EmbeddingResult(embeddings=embeddings, valid=valid)


def _rank_zero_decides(compute: bool, strategy: str) -> bool:
    """Whether this call runs ``Trainer.predict``: under a DDP strategy, once a process group
    exists, rank 0's answer on every rank; otherwise this process's own ``compute``.

    Each rank looks at the cache by itself, and another job writing to the same cache folder (two
    runs of a sweep, two users) can fill it between rank 0's look and rank 1's. A rank that then
    skips predict while the others enter it leaves them in its collectives: they fail when it
    exits, or wait for torch's 30-minute timeout while it lives on. Before the group exists (a
    rank's first embedding pass, the one that made Lightning launch it) there is nobody to ask; the
    ranks look at the same files moments apart. A single-device pass inside some other process
    group is that process's own business.
    """
    import torch.distributed as dist

    if "ddp" not in str(strategy) or not (dist.is_available() and dist.is_initialized()
                                          and dist.get_world_size() > 1):
        return compute
    flag = torch.tensor([int(compute)], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _worker_start(num_workers: int, world_size: int):
    """How loader workers start: forked (the default), except in a DDP rank, where they come from a
    fork server.

    A DDP rank runs threads (gloo's, the process group's, the loader's queue feeders), and Python up
    to 3.11.7 (CPython gh-112275) can leave a child forked while another thread creates or deletes
    its thread state deadlocked on the interpreter's HEAD lock in ``PyOS_AfterFork_Child``. Seen as
    ``landmarks index --devices 2 --strategy ddp`` hanging in about one run in 30 on a loaded 2-core
    machine: a worker of rank 1 stuck there, rank 1 waiting for its batch, rank 0 in the next
    barrier for torch's 30-minute timeout. A fork server (:mod:`datamodules.workers`) is a
    single-threaded process started once per rank, with torch and the dataset code preloaded, so a
    worker costs a fork of it. A single process's embedding pass keeps forking: no hang was ever
    seen there, its one loader per pass copies the parent's pages once (a fit's train loader does
    so every epoch), and a short ``landmarks index`` would pay the server's imports (~5 s).
    """
    return worker_context(num_workers, "forkserver") if world_size > 1 else None


class _PredictEmbeddings(pl.LightningModule):
    """Wraps ``model.net`` for ``Trainer.predict``; writes finished chunks to the cache folder.

    It owns its data loader (``predict_dataloader``) so that the list of images to embed can be
    taken from rank 0 in :meth:`setup`, after the process group exists: every rank then shards
    the very same list, even if the ranks looked at the cache at slightly different times.
    """

    def __init__(self, model: EmbeddingModel, paths: list[str], stamps: list[tuple[int, int]], todo: np.ndarray,
                 folder: Path, batch_size: int, num_workers: int, chunk_rows: int):
        super().__init__()
        self.net = model.net
        self.image_size = int(model.image_size)
        self.identity = dict(model.identity)
        self.paths, self.stamps = paths, stamps
        self.todo, self.folder = todo, folder
        self.batch_size, self.num_workers, self.chunk_rows = batch_size, num_workers, chunk_rows
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0

    def setup(self, stage: str) -> None:
        self.folder, self.todo = self.trainer.strategy.broadcast((self.folder, self.todo), src=0)
        if self.trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            model_json = self.folder / "model.json"
            if not model_json.exists():
                write_json_atomic(model_json, {"format": CACHE_FORMAT, "identity": self.identity}, indent=None, newline=False)
        self.trainer.strategy.barrier("embedding-cache-folder")

    def predict_dataloader(self) -> DataLoader:
        todo_paths = [self.paths[i] for i in self.todo]
        dataset = ImageDataset(todo_paths, np.zeros(len(todo_paths), dtype=np.int64),
                               eval_transform(self.image_size), self.image_size)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=False, pin_memory=torch.cuda.is_available(),
                          multiprocessing_context=_worker_start(self.num_workers, self.trainer.world_size))

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        embeddings = embed_batch(self.net, batch["image"])
        valid = batch["valid"].bool()
        embeddings = torch.where(valid[:, None], embeddings, torch.zeros_like(embeddings))
        self._buffer.append((batch["index"].cpu().numpy(), embeddings.cpu().numpy(), valid.cpu().numpy()))
        self._buffered += len(valid)
        if self._buffered >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        index = np.concatenate([b[0] for b in self._buffer])
        embeddings = np.concatenate([b[1] for b in self._buffer])
        valid = np.concatenate([b[2] for b in self._buffer])
        self._buffer, self._buffered = [], 0
        rows = self.todo[index]
        _write_chunk(self.folder, [self.paths[i] for i in rows], [self.stamps[i] for i in rows], valid, embeddings)

    def on_predict_epoch_end(self) -> None:
        self._flush()
        self.trainer.strategy.barrier("embedding-chunks-written")


class _StderrPredictionBar(TQDMProgressBar):
    """Lightning's bar, on stderr: the commands that embed (index, clean …) keep stdout for results."""

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.predict_description, position=2 * self.process_position, disable=self.is_disabled,
                    leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0, bar_format=self.BAR_FORMAT)


def embed_paths(
    model: EmbeddingModel,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str | list[int] = 1,
    strategy: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> EmbeddingResult:
    """Embed ``paths`` (in order) with ``model``; reuse and extend the cache in ``cache_dir``.

    Args:
        model: from :func:`retrieval.embedding_model.load_embedding_model`.
        paths: image files; relative paths are taken relative to the working directory.
        batch_size, num_workers: of the predict data loader. Under DDP the workers start from a
            fork server (see ``_worker_start``), so a script that calls this with ``num_workers > 0``
            and ``devices > 1`` must guard its entry point (``if __name__ == "__main__":``), as for
            any spawn-started loader; the ``landmarks`` commands do.
        accelerator, devices, strategy: passed to ``pl.Trainer`` (``devices=4, strategy="ddp"``).
        cache_dir: where embeddings are kept between runs (see the module docstring); ``None``
            computes everything (in a temporary cache removed afterwards).
        progress: Lightning's progress bar while embedding.
        chunk_rows: rows per cache chunk, the most a crash can lose.

    Returns:
        :class:`EmbeddingResult` with ``len(paths)`` rows, identical on every DDP rank.
    """
    if batch_size < 1 or chunk_rows < 1:
        raise ValueError(f"batch_size and chunk_rows must be >= 1, got {batch_size}, {chunk_rows}")
    abs_paths = [os.path.abspath(os.fspath(p)) for p in paths]
    stamps = [_file_stamp(p) for p in abs_paths]
    dim = int(model.embedding_size)
    temporary = None
    if cache_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="landmark-embeddings-")
        cache_dir = temporary.name
    folder = cache_folder(cache_dir, model)
    try:
        chunk_of, row_of, chunks = _lookup(folder, abs_paths, stamps, dim)
        # Each distinct missing path once (a path listed twice is embedded once).
        missing = np.flatnonzero(chunk_of < 0)
        seen: set[str] = set()
        todo = np.asarray([i for i in missing if not (abs_paths[i] in seen or seen.add(abs_paths[i]))], dtype=np.int64)
        log.info("embeddings: %d images, %d cached in %s, %d to compute",
                 len(abs_paths), len(abs_paths) - len(missing), folder if temporary is None else "(no cache)",
                 len(todo))
        compute = _rank_zero_decides(len(todo) > 0, strategy)
        if compute:
            trainer = pl.Trainer(
                accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                callbacks=[_StderrPredictionBar()] if progress else None, precision="32-true",
            )
            module = _PredictEmbeddings(model, abs_paths, stamps, todo, folder, batch_size, num_workers, chunk_rows)
            parameter = next(iter(model.net.parameters()), None)
            try:
                trainer.predict(module, return_predictions=False)
            except BaseException:
                stop_launched_ranks(trainer)
                raise
            remember(trainer)
            if parameter is not None:
                model.net.to(parameter.device)  # Lightning leaves it on the accelerator
            folder = module.folder  # rank 0's folder (differs from ours only for a temporary cache)
            chunk_of, row_of, chunks = _lookup(folder, abs_paths, stamps, dim)
        left = np.flatnonzero(chunk_of < 0)
        if len(left):
            raise RuntimeError(
                f"embedding: {len(left)} of {len(abs_paths)} images are missing from {folder} after "
                f"{'predict' if compute else 'rank 0 found every image cached'} (e.g. {abs_paths[left[0]]}); was a "
                "file changed while it was being embedded, or do the ranks see different cache folders?"
            )
        result = _assemble(chunk_of, row_of, chunks, dim)
        if compute:
            # Keep rank 0's temporary folder until every rank has read it.
            trainer.strategy.barrier("embedding-cache-read")
        bad = int((~result.valid).sum())
        if bad:
            log.warning("embeddings: %d of %d images could not be decoded (all-zero rows, valid=False)",
                        bad, len(abs_paths))
        return result
    finally:
        if temporary is not None:
            shutil.rmtree(temporary.name, ignore_errors=True)
