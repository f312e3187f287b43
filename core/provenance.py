"""Which code produced a result: the git commit and whether the working tree had local changes."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or "unknown", "dirty": bool, or None when unknown}`` (no git: unknown)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    try:
        # Tracked files only: untracked run outputs do not make the code dirty.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}
