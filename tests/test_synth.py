"""The synthetic landmark world: determinism, manifests, distinct views, atomic writes, CLI."""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from cli.synth import add_synth_arguments, run_synth_command
from datamodules.synth import (
    FORMAT,
    HARD_NEGATIVE_KIND,
    NONLANDMARK_KINDS,
    SynthConfig,
    generate_world,
)

DB_COLUMNS = ["path", "landmark_id", "lat", "lon", "view", "is_noise", "true_landmark_id"]
QUERY_COLUMNS = ["path", "landmark_id", "lat", "lon", "view"]
NONLANDMARK_COLUMNS = ["path", "kind"]
PLACED_COLUMNS = ["path", "kind", "lat", "lon"]  # distractors and calibration photos: where each was taken
LANDMARK_COLUMNS = ["landmark_id", "name", "lat", "lon", "num_views", "duplicate_of", "city"]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# A tiny world with more noise than the default, so every kind of noisy row occurs.
CONFIG = replace(SynthConfig.tiny(seed=3), noise_fraction=0.25, duplicate_landmarks=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "world"
    return out, generate_world(out, CONFIG, workers=1, progress=False)


def test_same_seed_same_bytes_whatever_the_workers(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    generate_world(again, CONFIG, workers=2, progress=False)
    first, second = _hashes(out), _hashes(again)
    assert len(first) > 100
    assert first == second


def test_other_seed_other_images(world, tmp_path):
    out, _ = world
    other = tmp_path / "other"
    generate_world(other, replace(CONFIG, seed=CONFIG.seed + 1), workers=2, progress=False)
    images = lambda root: {h for p, h in _hashes(root).items() if p.endswith(".jpg")}  # noqa: E731
    assert not images(out) & images(other)


def test_more_distractors_extend_the_same_world(world, tmp_path):
    # Generated with more distractors, the world is the same world plus distractors: every file of
    # the smaller one but the distractor manifest and world.json is byte-identical in it, and so
    # are the first distractors. A checkpoint fitted on one can be evaluated against the larger
    # set (docs/metrics.md, "How much one run's figure says").
    out, _ = world
    assert CONFIG.distractors > 0
    larger = tmp_path / "larger"
    generate_world(larger, replace(CONFIG, distractors=3 * CONFIG.distractors), workers=2, progress=False)
    small, big = _hashes(out), _hashes(larger)
    assert {p for p in small if big.get(p) != small[p]} == {"distractors.csv", "world.json"}
    assert _read_csv(larger / "distractors.csv")[1][: CONFIG.distractors] == _read_csv(out / "distractors.csv")[1]
    assert len(big) - len(small) == 2 * CONFIG.distractors  # only new distractor photos


def test_manifests_round_trip(world):
    out, meta = world
    config = CONFIG
    columns = {}
    tables = {}
    for name in ("db", "queries", "nonlandmarks", "distractors", "landmarks"):
        columns[name], tables[name] = _read_csv(out / f"{name}.csv")
    assert columns == {"db": DB_COLUMNS, "queries": QUERY_COLUMNS, "nonlandmarks": NONLANDMARK_COLUMNS,
                       "distractors": PLACED_COLUMNS, "landmarks": LANDMARK_COLUMNS}
    assert _read_csv(out / "calibration.csv")[0] == PLACED_COLUMNS
    on_disk = json.loads((out / "world.json").read_text())
    assert on_disk == meta
    assert meta["format"] == FORMAT and meta["seed"] == config.seed
    assert meta["config"]["num_landmarks"] == config.num_landmarks

    structures = config.num_landmarks - config.duplicate_landmarks
    expected = {
        "landmarks": config.num_landmarks, "distinct_structures": structures,
        "db": config.num_landmarks * config.images_per_landmark, "queries": structures * config.queries_per_landmark,
        "nonlandmarks": config.nonlandmark_pool, "distractors": config.distractors,
        "calibration": config.calibration, "collection": config.collection,
    }
    collection = _read_csv(out / "collection.csv")[1]
    assert {k: v for k, v in meta["counts"].items() if k in expected} == expected
    assert meta["counts"]["collection_landmark_photos"] == sum(1 for r in collection if r["landmark_id"]) >= 1
    assert meta["counts"]["collection_with_gps"] == sum(1 for r in collection if r["lat"])
    assert {name: len(rows) for name, rows in tables.items() if name in expected} == {
        name: expected[name] for name in tables if name in expected}

    images = [row["path"] for name in ("db", "queries", "nonlandmarks", "distractors") for row in tables[name]]
    images += [row["path"] for name in ("calibration", "collection") for row in _read_csv(out / f"{name}.csv")[1]]
    assert len(set(images)) == len(images)
    assert sum(1 for _ in (out / "images").rglob("*.jpg")) == len(images)
    for path in images:
        with Image.open(out / path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (config.image_size, config.image_size)

    landmarks = {int(row["landmark_id"]): row for row in tables["landmarks"]}
    ids = sorted(landmarks)
    # Ids are never class indices, and names and cities are filled in.
    assert min(ids) >= 1000 and ids != list(range(len(ids)))
    assert len({row["name"] for row in landmarks.values()}) == len(ids)
    assert len({row["city"] for row in landmarks.values()}) >= 2
    for split in ("db", "queries"):
        for row in tables[split]:
            labelled = landmarks[int(row["landmark_id"])]
            assert row["path"].startswith(f"images/{split}/{row['landmark_id']}/")
            assert (row["lat"], row["lon"]) == (labelled["lat"], labelled["lon"])
    for name in ("nonlandmarks", "distractors"):
        assert {row["kind"] for row in tables[name]} <= set(NONLANDMARK_KINDS)

    # Noise: the configured share of rows, split between the two kinds, with ground truth.
    noisy = [row for row in tables["db"] if row["is_noise"] == "1"]
    assert len(noisy) == round(config.noise_fraction * expected["db"]) == meta["noise"]["total"]
    no_landmark = [row for row in noisy if row["true_landmark_id"] == ""]
    wrong_landmark = [row for row in noisy if row["true_landmark_id"] != ""]
    assert len(no_landmark) == meta["noise"]["nonlandmark"] == round(config.noise_nonlandmark_share * len(noisy))
    assert len(wrong_landmark) == meta["noise"]["wrong_landmark"]
    assert all(row["view"] == "" for row in no_landmark)
    duplicate_of = {int(k): int(v["duplicate_of"]) for k, v in landmarks.items() if v["duplicate_of"]}
    for row in wrong_landmark:
        truth, label = int(row["true_landmark_id"]), int(row["landmark_id"])
        assert truth in landmarks and truth not in duplicate_of
        assert truth != duplicate_of.get(label, label)
        assert 0 <= int(row["view"]) < int(landmarks[truth]["num_views"])

    # Duplicates: recorded in landmarks.csv and world.json, shown as the original, not noise.
    assert len(duplicate_of) == config.duplicate_landmarks
    assert {(d["landmark_id"], d["duplicate_of"]) for d in meta["duplicates"]} == set(duplicate_of.items())
    for row in tables["db"]:
        label = int(row["landmark_id"])
        if row["is_noise"] == "0":
            assert int(row["true_landmark_id"]) == duplicate_of.get(label, label)
            assert 0 <= int(row["view"]) < int(landmarks[label]["num_views"])
    for dup, original in duplicate_of.items():
        assert original not in duplicate_of
        assert landmarks[dup]["num_views"] == landmarks[original]["num_views"]
        assert landmarks[dup]["city"] == landmarks[original]["city"]
    assert not {int(row["landmark_id"]) for row in tables["queries"]} & set(duplicate_of)

    for name in ("nonlandmarks", "distractors"):
        assert meta["kinds"][name] == dict(sorted(Counter(row["kind"] for row in tables[name]).items()))
    # Every distractor and calibration photo was taken in one of the world's cities (within ~0.3°,
    # six standard deviations), and they are spread over more than one city.
    cities = np.array([(float(c["lat"]), float(c["lon"])) for c in meta["cities"]])
    for rows in (tables["distractors"], _read_csv(out / "calibration.csv")[1]):
        where = np.array([(float(r["lat"]), float(r["lon"])) for r in rows])
        nearest = np.abs(where[:, None, :] - cities[None]).max(axis=2).argmin(axis=1)
        assert (np.abs(where - cities[nearest]).max(axis=1) < 0.3).all()
        assert len(set(nearest)) > 1
    hard = sum(meta["kinds"][name].get(HARD_NEGATIVE_KIND, 0) for name in ("nonlandmarks", "distractors"))
    assert 0 < hard < config.nonlandmark_pool + config.distractors


def test_views_look_different(tmp_path):
    """Two shooting angles of one landmark differ more than two photos from the same angle."""
    config = SynthConfig(num_landmarks=10, images_per_landmark=12, queries_per_landmark=0, nonlandmark_pool=0,
                         distractors=0, image_size=64, min_views=2, max_views=2, noise_fraction=0.0,
                         duplicate_landmarks=0, difficulty=0.2, seed=5)
    out = tmp_path / "views"
    generate_world(out, config, workers=2, progress=False)
    _, rows = _read_csv(out / "db.csv")
    same_view, other_view = [], []
    for _, group in itertools.groupby(rows, key=lambda row: row["landmark_id"]):
        pixels = {}
        for row in group:
            with Image.open(out / row["path"]) as image:
                pixels.setdefault(row["view"], []).append(np.asarray(image, dtype=np.float32))
        views = sorted(pixels)
        assert len(views) == 2
        distance = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
        same_view.append(np.mean([distance(a, b) for v in views for a, b in itertools.combinations(pixels[v], 2)]))
        other_view.append(np.mean([distance(a, b) for a in pixels[views[0]] for b in pixels[views[1]]]))
    assert np.mean(other_view) > 1.15 * np.mean(same_view)
    assert np.mean(np.array(other_view) > np.array(same_view)) >= 0.7


def test_refuses_non_empty_out_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "world"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_world(out, SynthConfig.tiny(), workers=1, progress=False)
    assert (out / "keep.txt").read_text() == "mine"

    generate_world(out, SynthConfig.tiny(), workers=1, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "world.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["world"]

    empty = tmp_path / "empty"
    empty.mkdir()
    generate_world(empty, SynthConfig.tiny(), workers=1, progress=False)
    assert (empty / "db.csv").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_failed_generation_removes_its_temporary(tmp_path, monkeypatch):
    from datamodules.synth.render import Renderer

    def broken(self, task):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Renderer, "write", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_world(tmp_path / "world", SynthConfig.tiny(), workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


RENDERER_MODULES = ("datamodules.synth.render", "datamodules.synth.draw", "datamodules.synth.scenes",
                    "datamodules.synth.camera", "datamodules.synth.write")


@pytest.mark.slow
def test_data_module_import_does_not_load_the_renderer():
    """`import datamodules.landmark_datamodule` (and SynthConfig) leaves the renderer unloaded;
    `generate_world` loads it on first use."""
    code = (
        "import sys\n"
        "import datamodules.landmark_datamodule\n"
        "from datamodules.synth import SynthConfig\n"
        f"modules = {RENDERER_MODULES!r}\n"
        "print(sorted(m for m in modules if m in sys.modules))\n"
        "from datamodules.synth import generate_world\n"
        "print(sorted(m for m in modules if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.strip().splitlines()[-2:]
    assert before == "[]"
    assert after == repr(sorted(RENDERER_MODULES))


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="max_views"):
        SynthConfig(min_views=3, max_views=2)
    with pytest.raises(ValueError, match="noise_fraction"):
        SynthConfig(noise_fraction=1.5)
    with pytest.raises(ValueError, match="duplicate_landmarks"):
        SynthConfig(num_landmarks=4, duplicate_landmarks=3)


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_synth_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--out", str(out), "--num-landmarks", "4", "--images-per-landmark", "3",
                              "--queries-per-landmark", "1", "--nonlandmark-pool", "5", "--distractors", "7",
                              "--image-size", "48", "--duplicate-landmarks", "1", "--noise-fraction", "0.2",
                              "--seed", "9", "--workers", "1", "--no-progress"])
    assert run_synth_command(args) == 0
    summary = capsys.readouterr().out
    assert str(out) in summary and "12 DB images" in summary
    meta = json.loads((out / "world.json").read_text())
    assert meta["config"]["image_size"] == 48 and meta["seed"] == 9 and meta["counts"]["distractors"] == 7

    with pytest.raises(FileExistsError, match="not empty"):
        run_synth_command(args)
    # Through `landmarks`: one line, exit status 2.
    argv = ["synth", "--out", str(out), "--num-landmarks", "4", "--duplicate-landmarks", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("landmarks synth: error: ") and "not empty" in err and len(err.splitlines()) == 1
    assert main(["synth", "--out", str(tmp_path / "x"), "--num-landmarks", "4", "--duplicate-landmarks", "3"]) == 2
    # The options the user typed, not SynthConfig's field names (was "invalid SynthConfig: duplicate_landmarks ...").
    assert capsys.readouterr().err == (
        "landmarks synth: error: --duplicate-landmarks needs two landmarks each (a duplicate and its original); need "
        "at least 2 distinct structures (--num-landmarks - --duplicate-landmarks >= 2)\n")
