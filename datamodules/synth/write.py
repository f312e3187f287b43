"""Writing a world: render every task (in worker processes), write the CSV manifests and
``world.json`` into a temporary sibling folder, and publish it under the real name with
:func:`core.atomic.replace_dir`, so a crash never leaves a half-written world behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from core.atomic import replace_dir
from datamodules.synth.config import SynthConfig
from datamodules.synth.plan import Plan, build_plan
from datamodules.synth.render import Renderer, init_worker, write_in_worker

_COLUMNS = {
    "db.csv": ("path", "landmark_id", "lat", "lon", "view", "is_noise", "true_landmark_id"),
    "queries.csv": ("path", "landmark_id", "lat", "lon", "view"),
    "nonlandmarks.csv": ("path", "kind"),
    "distractors.csv": ("path", "kind"),
    "landmarks.csv": ("landmark_id", "name", "lat", "lon", "num_views", "duplicate_of", "city"),
}


def generate_world(out_dir: str | os.PathLike, config: SynthConfig = SynthConfig(), workers: int | None = None,
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Generate the synthetic landmark world into ``out_dir``; returns the ``world.json`` content.

    The world is written to ``<out_dir>.tmp-<pid>`` and renamed into place when complete, so a
    crash never leaves a half-written world behind under the real name.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if _is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite=True")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    plan = build_plan(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed run that had this process id
    try:
        _render_images(plan, config, tmp, workers, progress)
        _write_manifests(plan, tmp)
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return plan.world


def _render_images(plan: Plan, config: SynthConfig, tmp: Path, workers: int, progress: bool) -> None:
    for folder in sorted({str(Path(task.relpath).parent) for task in plan.tasks}):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(plan.tasks), desc="synthetic world", unit="img", disable=not progress)
    if workers == 1:
        renderer = Renderer(config, tmp)
        for task in plan.tasks:
            renderer.write(task)
            bar.update()
    else:
        with get_context().Pool(workers, initializer=init_worker, initargs=(config, str(tmp))) as pool:
            for _ in pool.imap_unordered(write_in_worker, plan.tasks, chunksize=32):
                bar.update()
    bar.close()


def _write_manifests(plan: Plan, tmp: Path) -> None:
    """The five CSVs and ``world.json`` (inside the unpublished folder: no per-file atomicity needed)."""
    for name, rows in (("db.csv", plan.db), ("queries.csv", plan.queries), ("nonlandmarks.csv", plan.nonlandmarks),
                       ("distractors.csv", plan.distractors), ("landmarks.csv", plan.landmarks)):
        _write_csv(tmp / name, _COLUMNS[name], rows)
    (tmp / "world.json").write_text(json.dumps(plan.world, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    if _is_nonempty(out):
        if not overwrite:
            published = out / "world.json"
            if published.is_file() and published.read_bytes() == (tmp / "world.json").read_bytes():
                # Another process (e.g. a second training rank) published the same world first.
                shutil.rmtree(tmp)
                return
            raise FileExistsError(f"{out} appeared while generating and is not empty; "
                                  "pass overwrite=True to replace it")
    replace_dir(tmp, out)
