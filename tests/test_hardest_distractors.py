"""The distractors that set the low-FPR thresholds: found, mapped back to their files, listed and drawn."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pytorch_lightning.trainer.states import TrainerFn

from callbacks.retrieval_evaluation import RetrievalEvaluation
from core.labels import NONLANDMARK
from datamodules.datasets import ImageDataset
from datamodules.manifest import ClassMap
from retrieval.metrics import evaluate_recognition, hardest_distractors


def _at(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Gallery rows (readable ones): 0° (class 0), 90° (class 1), 180° (class 2).
GALLERY = np.array([_at(0), _at(90), _at(180)], np.float32)
# Distractors (readable ones) at 10°, 200°, 60° and -80°: top-1 cosines 0.985 (row 0, the 0° photo),
# 0.940 (the 180° photo), 0.866 (the 90° photo) and 0.174 (the 0° photo).
DISTRACTORS = np.array([_at(10), _at(200), _at(60), _at(-80)], np.float32)
QUERIES = np.array([_at(5), _at(95)], np.float32)


def test_evaluation_keeps_each_distractor_s_match_and_ranks_the_hardest_by_hand():
    result = evaluate_recognition(GALLERY, [0, 1, 2], QUERIES, [0, 1], DISTRACTORS, alphas=(0.25,), k=2)
    assert result.distractor_matches.tolist() == [0, 2, 1, 0]
    np.testing.assert_allclose(result.distractor_scores, np.cos(np.radians([10, 20, 30, 80])), atol=1e-6)
    assert hardest_distractors(result.distractor_scores, 3).tolist() == [0, 1, 2]
    # Ties keep the lower row first; no prediction (-inf) never counts; count 0 is empty.
    assert hardest_distractors(np.array([0.5, -np.inf, 0.9, 0.5]), 4).tolist() == [2, 0, 3]
    assert hardest_distractors(np.array([0.5]), 0).tolist() == []
    with pytest.raises(ValueError, match="count"):
        hardest_distractors(np.array([0.5]), -1)
    assert evaluate_recognition(GALLERY, [0, 1, 2], QUERIES, [0, 1], None).distractor_matches.size == 0


def _photos(folder, names, unreadable):
    folder.mkdir()
    paths = []
    for i, name in enumerate(names):
        path = folder / f"{name}.png"
        if name == unreadable:
            path.write_bytes(b"not an image")
        else:
            Image.new("RGB", (12, 10), (20 * i, 100, 200)).save(path)
        paths.append(str(path))
    return paths


def test_the_callback_lists_and_draws_the_hardest_distractors_with_their_files(tmp_path):
    # Dataset rows include an unreadable photo in each set, so readable row i is not dataset row i.
    gallery_paths = _photos(tmp_path / "gallery", ["g0", "broken", "g90", "g180"], "broken")
    distractor_paths = _photos(tmp_path / "distractors", ["d10", "d200", "broken", "d60", "d-80"], "broken")
    gallery = ImageDataset(gallery_paths, np.array([0, 1, 1, 2]), transform=None, image_size=16)
    distractors = ImageDataset(distractor_paths, np.full(5, NONLANDMARK), transform=None, image_size=16)
    datamodule = SimpleNamespace(eval_dataset={"gallery": gallery, "distractors": distractors}.__getitem__,
                                 class_map=ClassMap.from_ids(["arch", "bridge", "castle"]))

    callback = RetrievalEvaluation(alphas=(0.25,), top_k=2, user_prior=None, hardest_distractors=3)

    def gather():
        callback.last_embeddings = {"gallery": (None, np.array([1, 0, 1, 1], bool)),
                                    "distractors": (None, np.array([1, 1, 0, 1, 1], bool))}
        return {"gallery": (GALLERY, np.array([0, 1, 2]), 1), "queries": (QUERIES, np.array([0, 1]), 0),
                "distractors": (DISTRACTORS, np.full(4, NONLANDMARK), 1)}

    callback._gather = gather
    trainer = SimpleNamespace(
        log_dir=str(tmp_path / "run"), default_root_dir=".", state=SimpleNamespace(fn=TrainerFn.FITTING),
        is_global_zero=True, strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), current_epoch=2,
        global_step=0, datamodule=datamodule, loggers=[],
    )
    callback._finish(trainer, SimpleNamespace(log_dict=lambda values, **kw: None), "val")

    plots = tmp_path / "run" / "plots"
    rows = list(csv.DictReader(open(plots / "val_epoch002_hardest_distractors.csv")))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert [r["distractor"] for r in rows] == [distractor_paths[0], distractor_paths[1], distractor_paths[3]]
    assert [r["matched_gallery_photo"] for r in rows] == [gallery_paths[0], gallery_paths[3], gallery_paths[2]]
    assert [r["matched_landmark"] for r in rows] == ["arch", "castle", "bridge"]
    np.testing.assert_allclose([float(r["score"]) for r in rows], np.cos(np.radians([10, 20, 30])), atol=1e-5)
    figure = plots / "val_epoch002_hardest_distractors.jpg"
    assert figure.stat().st_size > 5000 and figure.read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    assert not [p for p in plots.iterdir() if p.name.startswith(".")]  # atomic writes left no temporaries

    # 0 turns it off; a negative count is a user's mistake.
    figure.unlink()
    callback.hardest_distractors = 0
    callback._finish(trainer, SimpleNamespace(log_dict=lambda values, **kw: None), "val")
    assert not figure.exists()
    with pytest.raises(ValueError, match="hardest_distractors"):
        RetrievalEvaluation(hardest_distractors=-1)


def test_the_sheet_says_at_which_fprs_each_distractor_is_accepted():
    from retrieval.plots import plot_hardest_distractors

    photo = np.zeros((4, 4, 3), np.uint8)
    pairs = [(photo, None, 0.9, "arch"), (None, photo, 0.8, "bridge"), (photo, photo, 0.7, "castle")]
    figure = plot_hardest_distractors(pairs, {"1e-02": 0.8, "1e-03": 0.85})
    titles = [ax.get_title() for ax in figure.axes]  # the distractor row, then the matched row
    # A score equal to a threshold is accepted there (the one acceptance rule: score >= threshold).
    assert titles[:3] == ["#1  cos 0.900\naccepted at FPR\n1e-02, 1e-03", "#2  cos 0.800\naccepted at FPR\n1e-02",
                          "#3  cos 0.700\nnot accepted at\nany FPR shown"]
    assert titles[3:] == ["landmark arch", "landmark bridge", "landmark castle"]
    assert plot_hardest_distractors([], {}).axes[0].texts[0].get_text() == "no distractors"


def test_an_index_records_its_hardest_calibration_photos_by_hand():
    """`landmarks index`'s list (recognition.calibration): the same order and tie rule as the
    evaluation's, each photo with the landmark it matched and whether the threshold accepts it."""
    from recognition.calibration import hardest_calibration_photos

    scores = [0.5, 0.9, -np.inf, 0.7, 0.9, 0.2]
    rows = np.array([1, 0, -1, 2, 1, -1])  # the last: a score but no landmark row
    paths = ["/p/a.jpg", "/p/b.jpg", "/p/c.jpg", "/p/d.jpg", "/p/e.jpg", "/p/f.jpg"]
    listed = hardest_calibration_photos(scores, rows, paths, ["L0", "L1", "L2"], threshold=0.8, count=6)
    # Ties keep the lower row first; the -inf photo (no prediction) is never listed.
    assert [(h["rank"], h["photo"], h["landmark_id"], h["accepted"]) for h in listed] == [
        (1, "/p/b.jpg", "L0", True), (2, "/p/e.jpg", "L1", True), (3, "/p/d.jpg", "L2", False),
        (4, "/p/a.jpg", "L1", False), (5, "/p/f.jpg", None, False)]
    assert [h["score"] for h in listed] == pytest.approx([0.9, 0.9, 0.7, 0.5, 0.2])
    # The rule is score >= threshold: a photo exactly at it is accepted.
    assert [h["accepted"] for h in hardest_calibration_photos([0.75, 0.5], [0, 0], ["x", "y"], ["L0"], 0.75)] == [True, False]
    # More accepted photos than `count`: the list grows to the first one rejected, which sets the threshold.
    many = hardest_calibration_photos(np.linspace(1.0, 0.1, 10), np.zeros(10, int), [f"/p/{i}" for i in range(10)],
                                      ["L0"], threshold=0.25, count=3)
    assert [h["accepted"] for h in many] == [True] * 8 + [False]
    with pytest.raises(ValueError, match="one of each per photo"):
        hardest_calibration_photos(scores, rows[:4], paths, ["L0", "L1", "L2"], threshold=0.8)
