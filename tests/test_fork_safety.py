"""core.fork_safety: no thread is born when a progress bar opens (CPython gh-112275, see the module)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter, so that no earlier test has already imported core or opened a bar.
_SCRIPT = """
import sys, threading
sys.path.insert(0, {root!r})
if sys.argv[1] == "core":
    import core  # noqa: F401  (what every entry point of the project imports first)
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
before = {{t.ident for t in threading.enumerate()}}
bar = Tqdm(total=3, disable=True)  # what a rank other than 0 opens for predict
born = [type(t).__name__ for t in threading.enumerate() if t.ident not in before]
bar.close()
print(",".join(born))
"""


def _threads_born_by_a_bar(mode: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_SCRIPT.format(root=str(ROOT))), mode],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return [name for name in done.stdout.strip().split(",") if name]


def test_a_progress_bar_starts_no_thread_once_core_is_imported():
    # control: without the setting, even a disabled bar starts tqdm's monitor thread, the thread
    # whose birth can deadlock a data-loader worker forked at that moment
    assert _threads_born_by_a_bar("plain") == ["TMonitor"]
    assert _threads_born_by_a_bar("core") == []
