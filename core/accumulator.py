"""Collect per-batch embeddings during evaluation, across DDP ranks, into dataset order.

Under DDP each rank sees a shard of the evaluation set, and ``DistributedSampler`` pads the last
shard by repeating dataset indices so that every rank gets the same number of samples. Metrics on
the raw concatenation would therefore double-count some images and depend on the world size.
:class:`EmbeddingAccumulator` gathers every rank's rows, drops the padding duplicates by dataset
index, sorts by index, and refuses to return anything but exactly ``{0, ..., expected_size-1}``:
a silently missing or extra image would shift every metric without any visible symptom.

Metric computation itself stays in ``retrieval.metrics`` (pure functions): this module only
moves tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["EmbeddingAccumulator", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (CPU runs, tests) only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``local`` ([n_r, *tail], n_r may differ) in rank order.

    Tensor ``all_gather`` needs equal shapes, so each rank pads to the largest row count, gathers,
    and the padding is trimmed with the row counts gathered beforehand. (``all_gather_object``
    would pickle the tensors through a byte buffer: several copies of a multi-GB gallery.)
    """
    max_n = max(sizes)
    device = _comm_device()
    # bool is not supported by every backend; ship it as uint8.
    is_bool = local.dtype == torch.bool
    send = local.to(torch.uint8) if is_bool else local
    padded = torch.zeros((max_n, *send.shape[1:]), dtype=send.dtype, device=device)
    padded[: len(send)] = send.to(device)
    buffers = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(buffers, padded)
    out = torch.cat([b[:n].cpu() for b, n in zip(buffers, sizes)])
    return out.to(torch.bool) if is_bool else out


class EmbeddingAccumulator:
    """Accumulate ``(embedding, dataset index, extras)`` per batch; return them in dataset order.

    Usage (identical on one process and under DDP; every rank must call :meth:`compute`, it is a
    collective)::

        acc = EmbeddingAccumulator(expected_size=len(dataset))
        for batch in loader:
            acc.update(model(batch["image"]), batch["index"], label=batch["label"])
        emb, extras = acc.compute()  # emb[i] is dataset item i; extras["label"][i] its label

    Args:
        expected_size: dataset length. When given, :meth:`compute` raises ``RuntimeError`` unless
            the unique gathered indices are exactly ``0 .. expected_size - 1``. ``None`` skips the
            check (the result then covers whatever indices were seen; see ``extras["indices"]``).
        duplicate_atol: padding duplicates of one index must agree (float tensors within this
            absolute tolerance, since a sample batched differently on two GPUs may differ in the
            last bits; other dtypes exactly). Disagreement means the "indices" are not dataset
            indices, and raises. ``None`` disables the check.

    Rows are stored detached on the CPU, so evaluating a large gallery does not hold accelerator
    memory between batches.
    """

    def __init__(self, expected_size: int | None = None, duplicate_atol: float | None = 1e-3):
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"expected_size must be >= 0 or None, got {expected_size}")
        self.expected_size = expected_size
        self.duplicate_atol = duplicate_atol
        self.reset()

    def reset(self) -> None:
        self._embeddings: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._extras: dict[str, list[torch.Tensor]] = {}
        self._extra_keys: tuple[str, ...] | None = None
        self._dim: int | None = None
        self._cache: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def __len__(self) -> int:
        """Rows accumulated on this rank (before gathering and deduplication)."""
        return sum(len(i) for i in self._indices)

    def update(self, embeddings: torch.Tensor, indices: torch.Tensor, **extras: torch.Tensor) -> None:
        """Add a batch: ``embeddings`` [b, d], ``indices`` [b] dataset indices, extras [b, ...]."""
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [batch, dim], got shape {tuple(embeddings.shape)}")
        indices = torch.as_tensor(indices)
        if indices.ndim != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
        b = embeddings.shape[0]
        if len(indices) != b:
            raise ValueError(f"{b} embeddings but {len(indices)} indices")
        if b and int(indices.min()) < 0:
            raise ValueError(f"dataset indices must be >= 0, got {int(indices.min())}")
        if self._dim is None:
            self._dim = embeddings.shape[1]
        elif embeddings.shape[1] != self._dim:
            raise ValueError(f"embedding dim changed from {self._dim} to {embeddings.shape[1]}")
        keys = tuple(sorted(extras))
        if self._extra_keys is None:
            self._extra_keys = keys
            self._extras = {k: [] for k in keys}
        elif keys != self._extra_keys:
            raise ValueError(f"extras changed from {self._extra_keys} to {keys}")
        for k, v in extras.items():
            v = torch.as_tensor(v)
            if v.ndim == 0 or v.shape[0] != b:
                raise ValueError(f"extra {k!r} must have leading dim {b}, got shape {tuple(v.shape)}")
            self._extras[k].append(v.detach().cpu())
        self._embeddings.append(embeddings.detach().cpu())
        self._indices.append(indices.detach().cpu().to(torch.int64))
        self._cache = None

    # ------------------------------------------------------------------------------------------

    def _local(self) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.cat(self._indices) if self._indices else torch.empty(0, dtype=torch.int64)
        emb = torch.cat(self._embeddings) if self._embeddings else None
        extras = {k: torch.cat(v) for k, v in self._extras.items()}
        return emb, idx, extras

    @staticmethod
    def _meta(emb: torch.Tensor | None, extras: dict[str, torch.Tensor]) -> dict:
        """Shapes/dtypes, so that ranks which saw no batch can still join the gathers."""
        return {
            "n": 0 if emb is None else len(emb),
            "emb": None if emb is None else (tuple(emb.shape[1:]), emb.dtype),
            "extras": {k: (tuple(v.shape[1:]), v.dtype) for k, v in extras.items()},
        }

    def _gather(self, emb, idx, extras):
        _, world = rank_and_world()
        meta = self._meta(emb, extras)
        metas: list[dict] = [None] * world  # type: ignore[list-item]
        # Metadata only (a few bytes per rank), so all_gather_object is fine here.
        dist.all_gather_object(metas, meta)
        seen = [m for m in metas if m["n"] > 0]
        if not seen:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.int64), {}
        ref = seen[0]
        for r, m in enumerate(metas):
            if m["n"] > 0 and (m["emb"] != ref["emb"] or m["extras"] != ref["extras"]):
                raise RuntimeError(
                    f"EmbeddingAccumulator: rank {r} accumulated {m['emb']} / extras {m['extras']}, "
                    f"but another rank has {ref['emb']} / extras {ref['extras']}"
                )
        sizes = [m["n"] for m in metas]

        def local_or_empty(t, spec):
            shape, dtype = spec
            return t if t is not None else torch.empty((0, *shape), dtype=dtype)

        emb = _all_gather_rows(local_or_empty(emb, ref["emb"]), sizes)
        idx = _all_gather_rows(idx if len(idx) else torch.empty(0, dtype=torch.int64), sizes)
        out_extras = {
            k: _all_gather_rows(local_or_empty(extras.get(k), spec), sizes)
            for k, spec in sorted(ref["extras"].items())
        }
        return emb, idx, out_extras

    def compute(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gather across ranks, deduplicate by index, sort; return ``(embeddings, extras)``.

        ``embeddings[i]`` belongs to the i-th smallest dataset index (= dataset item ``i`` when
        ``expected_size`` is set); each extra is reordered alike, and ``extras["indices"]`` holds
        the dataset indices themselves. Of duplicated indices the first occurrence in rank order
        is kept. Same result on every rank.

        Raises:
            RuntimeError: the unique indices are not exactly ``0 .. expected_size - 1``
                (names expected vs got and a few missing / unexpected indices), or padding
                duplicates disagree.
        """
        if self._cache is not None:
            return self._cache
        emb, idx, extras = self._local()
        _, world = rank_and_world()
        if world > 1:
            emb, idx, extras = self._gather(emb, idx, extras)
        elif emb is None:
            emb = torch.empty(0, self._dim or 0)

        # Stable sort keeps rank order inside a run of equal indices, so "first" is well defined.
        idx_sorted, order = torch.sort(idx, stable=True)
        first = torch.ones_like(idx_sorted, dtype=torch.bool)
        first[1:] = idx_sorted[1:] != idx_sorted[:-1]
        if not bool(first.all()):
            self._check_duplicates(idx_sorted, order, first, emb, extras)
        keep = order[first]
        unique_idx = idx_sorted[first]
        self._check_coverage(unique_idx, total_rows=len(idx), world=world)

        out_extras = {k: v[keep] for k, v in extras.items()}
        out_extras["indices"] = unique_idx
        self._cache = (emb[keep], out_extras)
        return self._cache

    def _check_duplicates(self, idx_sorted, order, first, emb, extras) -> None:
        if self.duplicate_atol is None:
            return
        # Compare every duplicate row with the kept row of its run.
        run_start = torch.cummax(torch.where(first, torch.arange(len(first)), 0), dim=0).values
        dup = ~first
        kept_rows, dup_rows = order[run_start[dup]], order[dup]
        for name, t in [("embeddings", emb), *extras.items()]:
            a, b = t[kept_rows], t[dup_rows]
            if t.dtype.is_floating_point:
                same = torch.isclose(a, b, rtol=0.0, atol=self.duplicate_atol, equal_nan=True)
            else:
                same = a == b
            bad = ~same.reshape(len(a), -1).all(dim=1)
            if bool(bad.any()):
                bad_idx = idx_sorted[dup][bad][:5].tolist()
                raise RuntimeError(
                    f"EmbeddingAccumulator: {int(bad.sum())} duplicated dataset indices carry "
                    f"different {name} (e.g. indices {bad_idx}); duplicates should only be "
                    "DistributedSampler padding of the same sample. Are the indices dataset indices?"
                )

    def _check_coverage(self, unique_idx: torch.Tensor, total_rows: int, world: int) -> None:
        n_exp = self.expected_size
        if n_exp is None:
            return
        n_got = len(unique_idx)
        if n_got == n_exp and (n_got == 0 or (int(unique_idx[0]) == 0 and int(unique_idx[-1]) == n_exp - 1)):
            return  # sorted + unique + right count + right ends => exactly 0..n_exp-1
        in_range = unique_idx[unique_idx < n_exp]
        present = torch.zeros(n_exp, dtype=torch.bool)
        present[in_range] = True
        missing = torch.nonzero(~present).flatten()
        extra = unique_idx[unique_idx >= n_exp]
        raise RuntimeError(
            f"EmbeddingAccumulator: expected the {n_exp} dataset indices 0..{n_exp - 1}, got "
            f"{n_got} unique indices ({total_rows} rows gathered from {world} rank(s)); "
            f"{len(missing)} missing (e.g. {missing[:5].tolist()}), "
            f"{len(extra)} out of range (e.g. {extra[:5].tolist()}). "
            "Was a batch skipped (limit_val_batches? drop_last=True?) or the wrong dataset length given?"
        )
