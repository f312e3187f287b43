"""Writing a world: render every task (in worker processes), write the CSV manifests and
``world.json`` into a temporary sibling folder, and publish it under the real name with
:func:`core.atomic.replace_dir`, so a crash never leaves a half-written world behind.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from core.atomic import replace_dir
from datamodules.synth.config import FORMAT, SynthConfig
from datamodules.synth.plan import Plan, build_plan
from datamodules.synth.render import Renderer, init_worker, write_in_worker

log = logging.getLogger(__name__)

_COLUMNS = {
    "db.csv": ("path", "landmark_id", "lat", "lon", "view", "is_noise", "true_landmark_id"),
    "queries.csv": ("path", "landmark_id", "lat", "lon", "view"),
    "nonlandmarks.csv": ("path", "kind"),
    "distractors.csv": ("path", "kind", "lat", "lon"),
    "landmarks.csv": ("landmark_id", "name", "lat", "lon", "num_views", "duplicate_of", "city"),
    "calibration.csv": ("path", "kind", "lat", "lon"),
    "collection.csv": ("path", "landmark_id", "kind", "lat", "lon"),
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
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another folder")
    if _is_nonempty(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another folder or pass overwrite=True "
                              "(`landmarks synth --overwrite`)")
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
    """The CSVs and ``world.json`` (inside the unpublished folder: no per-file atomicity needed)."""
    for name, rows in (("db.csv", plan.db), ("queries.csv", plan.queries), ("nonlandmarks.csv", plan.nonlandmarks),
                       ("distractors.csv", plan.distractors), ("landmarks.csv", plan.landmarks),
                       ("calibration.csv", plan.calibration), ("collection.csv", plan.collection)):
        _write_csv(tmp / name, _COLUMNS[name], rows)
    (tmp / "world.json").write_text(json.dumps(plan.world, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)


def world_problems(path: str | os.PathLike) -> list[str]:
    """Why ``path`` is not a complete world of this format; an empty list when it is one.

    Checks ``world.json`` (readable, this format), every manifest (present, the header written
    here, as many rows as ``world.json`` counts) and every image the manifests name (present and
    non-empty). A world cut short by a crash, a partial copy or a deleted file shows up here.
    """
    root = Path(path)
    try:
        world = json.loads((root / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"world.json unreadable ({type(err).__name__})"]
    if world.get("format") != FORMAT:
        return [f"format {world.get('format')!r}, not {FORMAT!r}"]
    counts = dict(world.get("counts", {}), **{"landmarks.csv": world.get("counts", {}).get("landmarks")})
    problems = []
    for name, columns in _COLUMNS.items():
        try:
            with open(root / name, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except OSError:
            problems.append(f"{name} missing")
            continue
        expected = counts.get(name) if name == "landmarks.csv" else counts.get(name.removesuffix(".csv"))
        if not rows or tuple(rows[0]) != columns:
            problems.append(f"{name}: unexpected header")
        elif expected is not None and len(rows) - 1 != expected:
            problems.append(f"{name}: {len(rows) - 1} rows, world.json says {expected}")
        elif "path" in columns:
            missing = [r[0] for r in rows[1:] if not (root / r[0]).is_file() or (root / r[0]).stat().st_size == 0]
            if missing:
                problems.append(f"{name}: {len(missing)} image(s) missing or empty, e.g. {missing[0]}")
    return problems


def ensure_world(out_dir: str | os.PathLike, config: SynthConfig, workers: int | None = None,
                 progress: bool = True, match_config: bool = False) -> dict:
    """The world at ``out_dir``: read if it is complete, else generated.

    A folder holding an incomplete world (:func:`world_problems`), one of another format, or
    (``match_config``) one generated with another config is never read: it is moved aside to
    ``<out_dir>.stale-<n>`` (nothing is deleted) and a new world is generated in its place. A
    non-empty folder without ``world.json`` is not a synthetic world and is refused.
    """
    out = Path(out_dir)
    if _is_nonempty(out):
        if not (out / "world.json").exists() and not match_config:
            raise FileExistsError(f"{out} is not empty and holds no synthetic world (world.json)")
        problems = world_problems(out)
        if not problems and match_config:
            written = json.loads((out / "world.json").read_text(encoding="utf-8")).get("config")
            if written != asdict(config):
                problems = ["generated with another config"]
        if not problems:
            return json.loads((out / "world.json").read_text(encoding="utf-8"))
        aside = next(out.with_name(f"{out.name}.stale-{n}") for n in range(1, 10**6)
                     if not out.with_name(f"{out.name}.stale-{n}").exists())
        log.warning("%s is not a usable world (%s); moved aside to %s, generating a new one",
                    out, "; ".join(problems[:3]), aside)
        os.replace(out, aside)
    return generate_world(out, config, workers=workers, progress=progress)


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
                                  "pass overwrite=True (`landmarks synth --overwrite`) to replace it")
    replace_dir(tmp, out)
