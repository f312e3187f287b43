"""`landmarks demo` (README command 1): the whole chain on a miniature world, its summary, resuming
from the last finished stage (also after a kill in the fit), ``--fresh``, and the world it needs."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cli.demo
from cli.demo import DEMO_CALIBRATION_RULE, DEMO_SCALES, _fmt
from cli.main import main
from core.embedding import bf16_is_fast
from recognition.artifact import LandmarkIndex
from recognition.centroids import CentroidParams
from retrieval.metrics import saturation_warning

ROOT = Path(__file__).resolve().parent.parent
LANDMARKS = str(Path(sys.executable).with_name("landmarks"))
STAGES = ("warmup", "clean", "untrained", "fit", "index", "recognize", "albums")


def _demo_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["demo", "--tiny", "--target-fpr", "0.05", "--world", str(world), "--out", str(out),
            "--trainer.logger=false", *extra]


def _markers(out: Path) -> dict[str, int]:
    return {stage: (out / stage / "stage.json").stat().st_mtime_ns for stage in STAGES}


def test_demo_runs_the_whole_chain_and_resumes_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    world, out = tmp_path / "world", tmp_path / "chain"
    conformal = ("--calibration-rule", "conformal")  # the other rule than the default, to see it reach both
    assert main(_demo_args(world, out, *conformal)) == 0
    printed = capsys.readouterr().out
    for line in ("1 clean", "2 train", "3 index", "4 recognize", "5 albums", "page:"):
        assert line in printed
    summary = json.loads((out / "summary.json").read_text())
    # Every stage with the numbers a user checks; the pre-chain keys are still there.
    assert {"removed", "removal_precision", "removal_recall", "applied", "label_agreement"} <= set(summary["cleaning"])
    assert {"untrained", "trained"} <= set(summary["training"])
    assert summary["training"]["trained"]["n_queries"] == summary["training"]["untrained"]["n_queries"] > 0
    assert any(k.startswith("centroid/") for k in summary["training"]["trained"])  # the shipped decision, per epoch
    recognizer = summary["recognizer"]
    assert {"target_fpr", "achieved_fpr", "recall", "precision", "precision_prior_0.01", "p_at_1"} <= set(recognizer)
    assert recognizer["target_fpr"] == 0.05
    results = pd.read_csv(recognizer["results"], dtype=str, keep_default_na=False)
    assert len(results) == recognizer["queries"] + recognizer["distractors"]
    # The figures are those of the written results, recomputed here by hand.
    accepted = results["accepted"] == "1"
    is_query = results["true_landmark_id"] != ""
    assert recognizer["achieved_fpr"] == pytest.approx((accepted & ~is_query).sum() / (~is_query).sum())
    correct = accepted & is_query & (results["landmark_id"] == results["true_landmark_id"])
    assert recognizer["recall"] == pytest.approx(correct.sum() / is_query.sum())
    # The same photos with each one's position: decided by the index's GPS threshold, figures from its results.
    gps = recognizer["with_gps"]
    placed = pd.read_csv(gps["results"], dtype=str, keep_default_na=False)
    assert list(placed["path"]) == list(results["path"]) and gps["with_position"] == len(placed)
    index = LandmarkIndex.load(summary["index"]["path"])
    assert gps["threshold"] == index.gps_calibration.calibration.threshold == summary["index"]["gps_calibration"][
        "calibration"]["threshold"] and index.gps_calibration.radius_km == gps["radius_km"] == 50
    accepted = placed["accepted"] == "1"
    assert gps["achieved_fpr"] == pytest.approx((accepted & ~is_query).sum() / (~is_query).sum())
    correct = accepted & is_query & (placed["landmark_id"] == placed["true_landmark_id"])
    assert gps["recall"] == pytest.approx(correct.sum() / is_query.sum())
    assert (placed["score"][accepted].astype(float) >= gps["threshold"] - 1e-6).all()
    assert "with each photo's position: recall" in printed
    # The shipped index carries the non-landmark penalty (the training pool), and the fit's evaluation
    # scored that very decision, with the index without it as the control.
    trained = summary["training"]["trained"]
    # Each resolved kNN recall comes with its bootstrap interval, before and after the fit. (A
    # percentile interval need not hold the figure itself, so only its order is checked here.)
    for metrics in (summary["training"]["untrained"], trained):
        recalls = [k.removeprefix("recall@") for k in metrics if k.startswith("recall@fpr=")]
        assert recalls and all(0 <= metrics[f"recall_low@{a}"] <= metrics[f"recall_high@{a}"] <= 1 for a in recalls)
    low, high = _fmt(trained["recall_low@fpr=5e-02"]), _fmt(trained["recall_high@fpr=5e-02"])
    assert f"trained recall, 95 % bootstrap interval: {low}–{high} @ FPR 5e-2\n" in printed
    pool = len(pd.read_csv(world / "nonlandmarks.csv"))
    assert summary["index"]["nonlandmark_penalty"] == {"weight": 0.25, "k": 1, "pool": pool}
    assert recognizer["recall"] == pytest.approx(trained["centroid/recall@fpr=5e-02"])
    # ... calibrated by the rule asked for (not the default) in both, since the evaluation's figure
    # equals the recogniser's: of 50 photos at FPR 0.05 at most floor(0.05 * 51) - 1 = 1 passes.
    calibration = summary["index"]["calibration"]
    assert calibration["rule"] == "conformal" != DEMO_CALIBRATION_RULE
    assert calibration["n_calibration"] == 50 and calibration["n_false_positives"] <= 1
    assert "calibrated at FPR 0.05 (conformal rule)" in printed
    # ... and what that promises about new photos, from the same counts.
    promise = summary["index"]["new_photo_fpr"]
    assert promise["expected"] == pytest.approx((calibration["n_false_positives"] + 1) / 51)
    assert promise["expected"] < promise["under_95"] < 1 and 0 < promise["chance_above_2x_target"] < 1
    assert f"FPR on new photos: {promise['expected']:.2g} expected" in printed
    # ... at the index's scales: the evaluation embedded at them, and the index and the recogniser
    # reused those very embeddings (checked against photos embedded afresh by the indexed model).
    assert summary["index"]["scales"] == list(DEMO_SCALES) == LandmarkIndex.load(summary["index"]["path"]).model["identity"]["scales"]
    assert trained["embeddings_reused"] > 0
    assert recognizer["without_penalty"]["recall"] == trained["centroid/no_penalty/recall@fpr=5e-02"]
    assert "without the penalty (same model and index, the control)" in printed
    albums = summary["albums"]
    assert Path(albums["page"]).is_file()
    collection = pd.read_csv(world / "collection.csv", dtype=str, keep_default_na=False)
    assert albums["photos"] == len(collection) and albums["landmark_photos"] == int((collection["landmark_id"] != "").sum())
    assert albums["in_albums"] == albums["correct"] + albums["wrong_landmark"] + albums["non_landmarks_in_albums"]
    assert set(summary["phases_seconds"]) == {"world", *STAGES}
    for key in ("untrained", "trained", "run_dir", "checkpoint", "configs", "overrides", "seconds", "phases_seconds"):
        assert key in summary
    # The measured recipe by default: ArcFace + LR warm-up + non-landmark push + hard non-landmark mining
    # + half-strength augmentations + a longer fit, paid for by bf16 inference ...
    assert [Path(c).name for c in summary["configs"]] == [
        "demo.yaml", "arcface.yaml", "lr_warmup.yaml", "nonlandmark_push.yaml", "hard_nonlandmarks.yaml",
        "mild_augmentation.yaml", "longer_fit.yaml", "bf16_inference.yaml"]
    # ... which reaches the index, whose vectors the fit's bf16 evaluation made (reused above);
    # float32 on a CPU without bf16 arithmetic.
    expected = "bf16" if bf16_is_fast("cpu") else "float32"
    assert LandmarkIndex.load(summary["index"]["path"]).model["identity"].get("inference_precision", "float32") == expected
    assert Path(summary["checkpoint"]).is_file() and Path(summary["index"]["path"]).is_dir()
    # Every path it records is absolute, so the summary names its files from any folder.
    recorded = [summary[k] for k in ("world", "out", "run_dir", "checkpoint")] + [
        summary["index"]["path"], summary["index"]["hardest_sheet"], summary["albums"]["page"],
        summary["cleaning"]["manifest"]]
    assert Path(summary["index"]["hardest_sheet"]) == Path(summary["index"]["path"]) / "hardest_calibration_photos.jpg"
    assert Path(summary["index"]["hardest_sheet"]).is_file()
    assert all(Path(p).is_absolute() for p in recorded), recorded
    # ... and the printout shows them as a person in that folder would type them.
    assert "page: chain/albums/index.html" in printed and "stages:     chain/<stage>/, summary.json" in printed
    # The collapse guard: a line under the kNN table exactly when an evaluation's threshold lies
    # among near-duplicate scores. The fit's own figures decide whether it shows here ...
    trained = summary["training"]["trained"]
    assert "saturated_distractors" in trained
    assert ("warning (trained):" in printed) == (saturation_warning(trained) is not None)
    # ... and a summary whose FPR-5e-2 threshold lies among them prints it.
    collapsed = {**trained, "saturated_distractors": 0.25, "threshold@fpr=5e-02": 0.995}
    line = next(x for x in cli.demo.format_summary({**summary, "training": {**summary["training"], "trained": collapsed}})
                .splitlines() if "warning (trained):" in x)
    n = trained["n_distractors"]
    assert line.strip() == f"warning (trained): {round(0.25 * n)} of {n} distractors (25.00%) match a gallery photo at " \
        "cosine >= 0.99, so the threshold at FPR 5e-02 lies among near-duplicate scores: the embedding may have put " \
        "some non-landmark photos on top of landmark photos (e.g. every dark photo at one point)"

    # The same command again: every stage is finished, nothing is recomputed.
    before = _markers(out)
    assert main(_demo_args(world, out, *conformal)) == 0
    assert _markers(out) == before
    assert json.loads((out / "summary.json").read_text())["recognizer"] == recognizer
    # --fresh starts over.
    assert main(_demo_args(world, out, *conformal, "--fresh")) == 0
    after = _markers(out)
    assert all(after[s] > before[s] for s in STAGES)
    # So does a change of the centroid defaults, which the index and the evaluation use.
    capsys.readouterr()
    monkeypatch.setattr(cli.demo, "CentroidParams", functools.partial(CentroidParams, distance_threshold=0.2))
    assert main(_demo_args(world, out, *conformal)) == 0
    assert "the arguments changed since" in capsys.readouterr().out
    assert all(_markers(out)[s] > after[s] for s in STAGES)


def test_the_oracle_clean_chain_drops_exactly_the_noise_and_fits_every_epoch_from_the_imagenet_start(
        tiny_world, tmp_path, monkeypatch):
    """--oracle-clean, the upper bound of cleaning: no warm-up, the world's noisy rows removed and no
    other, and a fit of all trainer.max_epochs whose class weights start at random (nothing to
    imprint from; imprinting at the ImageNet start by a one-stage curriculum measured level)."""
    import torch

    from losses.arcface import ArcFaceLoss

    calls = []
    monkeypatch.setattr(ArcFaceLoss, "imprint", lambda self, *args: calls.append(args))
    out = tmp_path / "chain"
    assert main(_demo_args(tiny_world, out, "--oracle-clean")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert not (out / "warmup").exists() and "warmup" not in summary["phases_seconds"]
    db = pd.read_csv(tiny_world / "db.csv", dtype=str, keep_default_na=False)
    clean = pd.read_csv(summary["cleaning"]["manifest"], dtype=str, keep_default_na=False)
    assert (clean["decision"] == "remove").tolist() == (db["is_noise"] == "1").tolist()
    assert summary["cleaning"]["removed"] == int((db["is_noise"] == "1").sum()) > 0
    final = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    # Every one of the tiny fit's 4 epochs of 3 steps, none spent on a warm-up.
    assert (final["epoch"], final["global_step"]) == (4, 12)
    assert calls == [] and not any(key.startswith("Curriculum") for key in final["callbacks"])


@pytest.mark.slow
def test_demo_killed_in_the_fit_resumes_from_the_last_finished_stage(tmp_path):
    world, out = tmp_path / "world", tmp_path / "chain"
    # 9 fit epochs after the 3 warm-up ones: each writes last.ckpt, so the kill lands before the
    # fit ends even when its tiny epochs take a fraction of a second (with 3, it once did not).
    extra = ("--trainer.max_epochs=12", "--data.batches_per_epoch=6")
    env = dict(os.environ, WANDB_MODE="disabled")
    # Started with paths relative to its folder, resumed from another folder with absolute ones:
    # what the first run recorded must still name its files.
    proc = subprocess.Popen([LANDMARKS, *_demo_args(Path("world"), Path("chain"), *extra)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((out / "fit").glob("checkpoints/last.ckpt")) and time.time() < deadline:
            assert proc.poll() is None, "the demo finished before it could be killed in the fit"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (out / "fit" / "stage.json").exists()
    finished = {s: (out / s / "stage.json").stat().st_mtime_ns for s in ("warmup", "clean", "untrained")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([LANDMARKS, *_demo_args(world, out, *extra)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming the fit from" in done.stdout
    assert {s: (out / s / "stage.json").stat().st_mtime_ns for s in finished} == finished
    summary = json.loads((out / "summary.json").read_text())
    import torch

    # The rest of max_epochs after the 3 warm-up epochs, all run: 9 epochs of 6 steps (the last
    # checkpoint is written at the end of training, its epoch counter already past the last).
    final = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert (final["epoch"], final["global_step"]) == (9, 54)
    assert "recall" in summary["recognizer"]


def test_a_half_written_world_is_moved_aside_and_regenerated(tmp_path):
    from datamodules.synth import SynthConfig, ensure_world, generate_world, world_problems

    config = SynthConfig.tiny(seed=2)
    world = tmp_path / "world"
    generate_world(world, config, workers=1, progress=False)
    assert world_problems(world) == []
    image = world / pd.read_csv(world / "db.csv")["path"][3]
    reference = image.read_bytes()
    image.unlink()  # an interrupted copy, say
    problems = world_problems(world)
    assert len(problems) == 1 and "db.csv: 1 image(s) missing" in problems[0]
    ensure_world(world, config, progress=False)
    assert world_problems(world) == [] and image.read_bytes() == reference
    assert (tmp_path / "world.stale-1").is_dir()  # moved aside, not deleted
    # A world of another config is refused only when asked to match; an unknown folder is never read.
    ensure_world(world, config, progress=False)
    assert not (tmp_path / "world.stale-2").exists()
    ensure_world(world, SynthConfig.tiny(seed=3), progress=False, match_config=True)
    assert json.loads((world / "world.json").read_text())["seed"] == 3 and (tmp_path / "world.stale-2").is_dir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holds no synthetic world"):
        ensure_world(tmp_path / "other", config, progress=False)
    # world.json of an older format (no calibration split): not read, regenerated.
    meta = json.loads((world / "world.json").read_text())
    (world / "world.json").write_text(json.dumps({**meta, "format": "synthetic-landmark-world/1"}))
    assert "format" in world_problems(world)[0]


def test_the_world_has_a_calibration_split_and_a_collection_with_exif_gps(tiny_world):
    from recognition.gps import read_exif_gps

    calibration = pd.read_csv(tiny_world / "calibration.csv", dtype=str)
    distractors = pd.read_csv(tiny_world / "distractors.csv", dtype=str)
    pool = pd.read_csv(tiny_world / "nonlandmarks.csv", dtype=str)
    assert len(calibration) == 50
    assert not set(calibration["path"]) & (set(distractors["path"]) | set(pool["path"]))
    collection = pd.read_csv(tiny_world / "collection.csv", dtype=str, keep_default_na=False)
    landmarks = pd.read_csv(tiny_world / "landmarks.csv", dtype=str, keep_default_na=False)
    assert 0 < (collection["landmark_id"] != "").sum() < len(collection)
    assert set(collection.loc[collection["landmark_id"] != "", "landmark_id"]) <= set(
        landmarks.loc[landmarks["duplicate_of"] == "", "landmark_id"])
    with_gps = collection["lat"] != ""
    assert 0 < with_gps.sum() < len(collection)
    for _, row in collection.iterrows():
        gps = read_exif_gps(tiny_world / row["path"])
        if row["lat"]:
            assert gps == pytest.approx((float(row["lat"]), float(row["lon"])), abs=1e-5)
        else:
            assert gps is None
    # A landmark photo's GPS is at its landmark (within a few hundred metres).
    place = landmarks.set_index("landmark_id")
    for _, row in collection[(collection["landmark_id"] != "") & with_gps].iterrows():
        lat, lon = float(place.loc[row["landmark_id"], "lat"]), float(place.loc[row["landmark_id"], "lon"])
        assert abs(float(row["lat"]) - lat) < 0.01 and abs(float(row["lon"]) - lon) < 0.01


def test_the_evaluation_calibrates_the_shipped_threshold_on_the_calibration_set():
    from core.labels import NONLANDMARK
    from recognition.evaluation import evaluate_centroid_index

    rng = np.random.default_rng(0)
    d = 8
    centres = np.eye(d)[:3]
    gallery = np.repeat(centres, 5, axis=0) + 0.05 * rng.standard_normal((15, d))
    labels = np.repeat(np.arange(3), 5)
    queries = centres + 0.05 * rng.standard_normal((3, d))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    distractors = unit(rng.standard_normal((200, d)))
    # Calibration photos far less landmark-like than the distractors: a low threshold, so the
    # distractors' achieved FPR is well above the target, which the metric must show.
    calibration = unit(-np.abs(rng.standard_normal((200, d))))
    own = evaluate_centroid_index(unit(gallery), labels, unit(queries), np.arange(3), distractors, alphas=[0.05])
    calibrated = evaluate_centroid_index(unit(gallery), labels, unit(queries), np.arange(3), distractors,
                                         alphas=[0.05], calibration_emb=calibration)
    assert own["actual_fpr@fpr=5e-02"] <= 0.05
    assert calibrated["threshold@fpr=5e-02"] < own["threshold@fpr=5e-02"]
    assert calibrated["actual_fpr@fpr=5e-02"] > 0.05
    assert NONLANDMARK not in labels


def test_the_recognizer_decides_the_same_from_cached_embeddings(tiny_world, tmp_path):
    from recognition.indexing import build_landmark_index
    from recognition.recognizer import Recognizer

    cache = tmp_path / "cache"
    _, path = build_landmark_index(tiny_world / "db.csv", tmp_path / "index", backbone="mobilenetv2_100",
                                   image_size=64, nonlandmarks=tiny_world / "calibration.csv", target_fpr=0.1,
                                   num_workers=0, accelerator="cpu", cache_dir=cache, progress=False)
    photos = [str(tiny_world / p) for name in ("queries.csv", "distractors.csv")
              for p in pd.read_csv(tiny_world / name)["path"]]
    direct = Recognizer(path).recognize(photos)
    cached = Recognizer(path, cache_dir=cache).recognize(photos)
    assert [(r.landmark_id, r.accepted) for r in cached] == [(r.landmark_id, r.accepted) for r in direct]
    np.testing.assert_allclose([r.score for r in cached], [r.score for r in direct], atol=1e-4)
    chunks = sorted(cache.rglob("chunk-*.json"))
    Recognizer(path, cache_dir=cache).recognize(photos)  # everything is cached now: nothing is embedded again
    assert sorted(cache.rglob("chunk-*.json")) == chunks
