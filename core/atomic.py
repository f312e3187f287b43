"""The one way this project writes an output: to a temporary sibling, then ``os.replace``.

A reader (another rank, a resumed run, a user's browser) therefore sees the old file or the
whole new one, never half a file; a crash leaves at most a hidden ``.NAME.tmp-…`` file, never a
truncated output. The temporary name keeps the target's suffix, because some writers choose
the format from it (``savefig``) or append one (``np.save``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "replace_dir", "save_npy_atomic", "write_json_atomic", "write_text_atomic"]


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``.

    ``with atomic_path(out / "plot.png") as tmp: figure.savefig(tmp)``. If the block raises, the
    temporary file is removed and ``target`` is left as it was. The parent folder must exist.
    """
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(target: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(target)


def write_json_atomic(target: str | os.PathLike, obj: Any, *, indent: int | None = 2, newline: bool = True,
                      **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, indent=indent, **dumps_kwargs)`` written atomically (``allow_nan``,
    ``default`` … pass through)."""
    return write_text_atomic(target, json.dumps(obj, indent=indent, **dumps_kwargs) + ("\n" if newline else ""))


def save_npy_atomic(target: str | os.PathLike, array: Any) -> Path:
    """``np.save`` without pickle, atomically. ``target`` should end in ``.npy``."""
    import numpy as np

    with atomic_path(target) as tmp:
        np.save(tmp, array, allow_pickle=False)
    return Path(target)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder ``tmp`` at ``target``, replacing a folder that is there.

    Folders cannot be swapped in one atomic step on POSIX: the old folder is first renamed
    aside, the new one renamed in, then the old one removed, so ``target`` is missing for an
    instant but never half-written. ``tmp`` and ``target`` must be on one file system.
    """
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
