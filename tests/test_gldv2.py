"""GLDv2: the published CSV files → manifests; recognition GAP with non-landmark queries; the
gldv2_paper recipe on a miniature GLDv2 + Places365 converted to manifests."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from public_datasets import GLDV2_TRAIN, gldv2_id, gldv2_path, make_gldv2, make_places365

from cli.main import main
from datamodules.gldv2 import (
    prepare_gldv2,
    read_gldv2_train,
    read_recognition_predictions,
    read_recognition_solution,
)
from datamodules.manifest import ManifestError, read_manifest
from retrieval.gldv2 import gldv2_gap, top1_accuracy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gldv2(tmp_path):
    return make_gldv2(tmp_path / "gldv2")


def _ids(numbers):
    return [gldv2_id(n) for n in numbers]


# ---------------------------------------------------------------------------------------------
# readers and the converter
# ---------------------------------------------------------------------------------------------


def test_prepare_writes_db_queries_and_distractors(gldv2, tmp_path):
    out = tmp_path / "manifests"
    before = {p: p.read_bytes() for p in gldv2.glob("*.csv")}
    summary = prepare_gldv2(gldv2, out, progress=False)
    db = read_manifest(out / "db.csv")
    assert list(db.table.columns) == ["path", "id", "landmark_id", "url", "name"]
    clean_ids = [i for _, (_, kept) in GLDV2_TRAIN.items() for i in _ids(kept)]
    assert db.table["id"].tolist() == clean_ids
    assert db.landmark_ids == ["1", "1", "1", "17", "17", "17", "256", "256"]
    assert db.table["path"].iloc[0] == f"../gldv2/train/{clean_ids[0][0]}/{clean_ids[0][1]}/{clean_ids[0][2]}/{clean_ids[0]}.jpg"
    assert all(os.path.isfile(p) for p in db.paths)
    assert db.table["url"].iloc[3].endswith("/photo_3.jpg")  # url joined from train.csv
    assert db.table["name"].tolist()[::3] == ["Eiffel Tower", "Café de Flore", "Brandenburger Tor"]

    queries = read_manifest(out / "queries.csv")
    assert queries.table["id"].tolist() == sorted(_ids([100, 101]))
    assert dict(zip(queries.table["id"], queries.landmark_ids)) == {gldv2_id(100): "17", gldv2_id(101): "1"}
    distractors = read_manifest(out / "distractors.csv", "nonlandmark")
    assert sorted(distractors.table["id"]) == sorted(_ids([104, 105]))  # Ignored 106 left out
    assert summary["queries"]["skipped"] == {"multi_landmark": 1, "landmark_not_in_db": 1, "missing_files": 0}
    assert {p: p.read_bytes() for p in gldv2.glob("*.csv")} == before  # inputs untouched


def test_usage_and_all_train(gldv2, tmp_path):
    prepare_gldv2(gldv2, tmp_path / "public", usages=["Public"], progress=False)
    assert read_manifest(tmp_path / "public" / "queries.csv").table["id"].tolist() == _ids([100])
    assert read_manifest(tmp_path / "public" / "distractors.csv", "nonlandmark").table["id"].tolist() == _ids([104])
    summary = prepare_gldv2(gldv2, tmp_path / "all", clean=False, progress=False)
    db = read_manifest(tmp_path / "all" / "db.csv")
    assert len(db) == 12 and "9000" in db.landmark_ids  # train.csv: noisy images and landmark 9000 too
    # Landmark 9000 is now in the DB, so its test image becomes a query.
    assert gldv2_id(103) in read_manifest(tmp_path / "all" / "queries.csv").table["id"].tolist()
    assert summary["queries"]["skipped"]["landmark_not_in_db"] == 0


def test_missing_images_are_skipped_with_a_count_or_an_error(gldv2):
    gldv2_path(gldv2, "train", gldv2_id(4)).unlink()
    manifest, skipped = read_gldv2_train(gldv2, progress=False)
    assert skipped == {"missing_files": 1} and len(manifest) == 7 and gldv2_id(4) not in manifest.table["id"].tolist()
    # Messages point at the line of train_clean.csv that lists the image (landmark 17 is line 3).
    with pytest.raises(ManifestError, match=rf"train_clean.csv: line 3: image missing: .*{gldv2_id(4)}\.jpg \(1 of 8"):
        read_gldv2_train(gldv2, on_missing="error", progress=False)


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "filename, line, text, message",
    [
        ("train_clean.csv", 1, "landmark,images", r"header is \['landmark', 'images'\], expected \['landmark_id', 'images'\]"),
        ("train_clean.csv", 4, f"256,{gldv2_id(7)} {gldv2_id(3)}", rf"line 4: image '{gldv2_id(3)}' is listed twice"),
        ("train_clean.csv", 2, f"1,{gldv2_id(0)} {gldv2_id(5)}", rf"line 2: image '{gldv2_id(5)}' is under landmark 1 here but 17"),
        ("train_clean.csv", 2, "1,0123456789abcdef", r"line 2: image '0123456789abcdef' is not in .*train.csv"),
        ("train_clean.csv", 3, f"x17,{gldv2_id(3)}", r"line 3: landmark_id 'x17' is not a non-negative integer"),
        ("train.csv", 3, f"{gldv2_id(1)[:15]},u,1", r"train.csv: line 3: image id .* is not a 16-character id"),
    ],
)
def test_malformed_training_files_are_errors_naming_file_and_line(gldv2, filename, line, text, message):
    _replace_line(gldv2 / filename, line, text)
    with pytest.raises(ManifestError, match=message):
        read_gldv2_train(gldv2, check_files=False)


@pytest.mark.parametrize(
    "line, text, message",
    [
        (2, f"{gldv2_id(100)},17,Secret", r"line 2: Usage 'Secret' is not one of \['Public', 'Private', 'Ignored'\]"),
        (3, f"{gldv2_id(101)},1;2,Private", r"line 3: landmarks '1;2' is not a space-separated list"),
        (4, f"{gldv2_id(100)},,Public", rf"line 4: test image '{gldv2_id(100)}' listed twice"),
    ],
)
def test_malformed_solution_is_an_error_naming_the_line(gldv2, line, text, message):
    _replace_line(gldv2 / "recognition_solution_v2.1.csv", line, text)
    with pytest.raises(ManifestError, match=message):
        read_recognition_solution(gldv2 / "recognition_solution_v2.1.csv")


def test_solution_keeps_requested_usages_and_multi_labels(gldv2):
    solution = read_recognition_solution(gldv2 / "recognition_solution_v2.1.csv")
    assert solution.landmarks[gldv2_id(102)] == [256, 17] and solution.landmarks[gldv2_id(104)] == []
    assert set(solution.landmarks) == set(_ids([100, 101, 102, 103, 104, 105]))
    assert sorted(solution.ignored) == sorted(_ids([106, 107]))
    public = read_recognition_solution(gldv2 / "recognition_solution_v2.1.csv", ["Public"])
    assert set(public.landmarks) == set(_ids([100, 102, 104]))


# ---------------------------------------------------------------------------------------------
# GAP
# ---------------------------------------------------------------------------------------------


def test_gap_by_hand_with_non_landmark_queries_and_multi_labels():
    solution = {"q1": [10], "q2": [20, 30], "q3": [], "q4": [40]}
    predictions = {"q1": (10, 0.9), "q3": (10, 0.8), "q2": (30, 0.7)}
    # Ranked: q1 correct (P=1/1), q3 a non-landmark (wrong), q2 correct via its 2nd label (P=2/3);
    # q4 has no prediction but counts in M = 3 landmark queries: (1 + 2/3) / 3 = 5/9.
    assert gldv2_gap(predictions, solution) == pytest.approx(5 / 9)
    # Without the non-landmark query in the ranking: (1 + 2/2) / 3.
    assert gldv2_gap(predictions, solution, ignore_nonlandmark_queries=True) == pytest.approx(2 / 3)
    assert top1_accuracy(predictions, solution) == pytest.approx(2 / 3)
    # A low score on the non-landmark puts it last and restores GAP to 2/3.
    assert gldv2_gap({**predictions, "q3": (10, 0.1)}, solution) == pytest.approx(2 / 3)


def test_gap_ties_are_ordered_by_image_id_like_kaggle():
    solution = {"a": [], "b": [1]}
    # Equal scores: "a" (wrong) ranks before "b" (correct) → P(2) = 1/2, whatever the dict order.
    assert gldv2_gap({"b": (1, 0.5), "a": (1, 0.5)}, solution) == pytest.approx(0.5)
    assert gldv2_gap({"a": (1, 0.5), "b": (1, 0.5)}, {"z": [], "b": [1]} | {"a": []}) == pytest.approx(0.5)


def test_gap_edge_cases():
    assert math.isnan(gldv2_gap({"a": (1, 0.9)}, {"a": []}))  # no landmark query: undefined
    with pytest.raises(ValueError, match="not in the solution"):
        gldv2_gap({"x": (1, 0.9)}, {"a": [1]})
    with pytest.raises(ValueError, match="NaN"):
        gldv2_gap({"a": (1, float("nan"))}, {"a": [1]})


def _write_predictions(path: Path, rows: dict[int, str]) -> Path:
    path.write_text("id,landmarks\n" + "".join(f"{gldv2_id(n)},{cell}\n" for n, cell in rows.items()))
    return path


def test_kaggle_predictions_file_and_evaluate_cli_by_hand(gldv2, tmp_path):
    predictions = _write_predictions(tmp_path / "submission.csv", {
        100: "17 0.9",     # Public, correct
        104: "1 0.8",      # Public, non-landmark: a false positive ranked 2nd
        102: "256 0.7",    # Public, multi-label: correct
        101: "256 0.95",   # Private, wrong
        105: "",           # Private non-landmark, no prediction
        106: "1 0.99",     # Ignored: not scored
        107: "1 0.1",      # Ignored
    })
    solution = read_recognition_solution(gldv2 / "recognition_solution_v2.1.csv")
    parsed = read_recognition_predictions(predictions, solution)
    assert set(parsed) == set(_ids([100, 104, 102, 101])) and parsed[gldv2_id(100)] == (17, 0.9)
    out = tmp_path / "gap.json"
    assert main(["evaluate", "gldv2", "--solution", str(gldv2 / "recognition_solution_v2.1.csv"),
                 "--predictions", str(predictions), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    # Public: M = 2 (100, 102); ranked 100 ✓ (1/1), 104 ✗, 102 ✓ (2/3) → (1 + 2/3)/2.
    assert results["public"]["gap"] == pytest.approx((1 + 2 / 3) / 2)
    assert results["public"]["gap_without_nonlandmarks"] == pytest.approx(1.0)
    # Private: M = 2 (101, 103); only a wrong prediction → 0.
    assert results["private"]["gap"] == 0.0 and results["private"]["n_landmark_images"] == 2
    # All: M = 4; ranked 101 ✗ (0.95), 100 ✓ (1/2), 104 ✗, 102 ✓ (2/4) → (1/2 + 1/2)/4.
    assert results["all"]["gap"] == pytest.approx(0.25)
    assert results["n_ignored"] == 2


def test_malformed_predictions_are_errors(gldv2, tmp_path):
    solution = read_recognition_solution(gldv2 / "recognition_solution_v2.1.csv")
    with pytest.raises(ManifestError, match=r"line 2: prediction '17' is not '<landmark_id> <score>'"):
        read_recognition_predictions(_write_predictions(tmp_path / "a.csv", {100: "17"}), solution)
    bad = tmp_path / "b.csv"
    bad.write_text(f"id,landmarks\n{gldv2_id(100)},17 0.5\n{gldv2_id(100)},17 0.6\n")
    with pytest.raises(ManifestError, match="line 3: .* predicted twice"):
        read_recognition_predictions(bad, solution)
    bad.write_text("id,landmarks\nffffffffffffffff,17 0.5\n")
    with pytest.raises(ManifestError, match="line 2: test image 'ffffffffffffffff' is not in"):
        read_recognition_predictions(bad, solution)


def test_predictions_with_a_nan_score_or_a_negative_landmark_name_their_line(gldv2, tmp_path):
    """Both were ValueError tracebacks from the scorer, without the file or the line."""
    solution = read_recognition_solution(gldv2 / "recognition_solution_v2.1.csv")
    for cell, reason in (("17 nan", "a score that is not a finite number"), ("17 inf", "a score that is not a finite"),
                         ("-5 0.5", "a negative landmark id")):
        with pytest.raises(ManifestError, match=rf"a.csv: line 2: prediction '{cell}' is not '<landmark_id> <score>' "
                                                rf"\({reason}"):
            read_recognition_predictions(_write_predictions(tmp_path / "a.csv", {100: cell}), solution)


def test_evaluate_refuses_flags_a_predictions_file_ignores_and_a_solution_with_nothing_scored(gldv2, tmp_path, capsys):
    predictions = _write_predictions(tmp_path / "submission.csv", {100: "17 0.9"})
    base = ["evaluate", "gldv2", "--solution", str(gldv2 / "recognition_solution_v2.1.csv"),
            "--predictions", str(predictions)]
    written = tmp_path / "written.csv"
    assert main([*base, "--write-predictions", str(written), "--backbone", "mobilenetv2_100"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "landmarks evaluate: error: --write-predictions, --backbone only apply with --gallery (predicting); "
        "--predictions is scored as it is"]
    assert not written.exists()
    ignored = tmp_path / "ignored.csv"
    rows = (gldv2 / "recognition_solution_v2.1.csv").read_text().splitlines()
    ignored.write_text("\n".join([rows[0]] + [",".join(r.split(",")[:2] + ["Ignored"]) for r in rows[1:]]) + "\n")
    assert main(["evaluate", "gldv2", "--solution", str(ignored), "--predictions", str(predictions)]) == 2
    assert "ignored.csv: no Public or Private row: nothing to score" in capsys.readouterr().err


def test_prepare_checks_everything_before_writing_and_refuses_an_empty_query_set(gldv2, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    # No test image on disk: every query's file is missing. Before: 0-row queries.csv, exit 0.
    shutil.rmtree(gldv2 / "test")
    assert main(["prepare", "gldv2", "--root", str(gldv2), "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the file check's progress bars
    assert err.startswith("landmarks prepare: error: ") and "recognition_solution_v2.1.csv: no test image of usage " \
        "Public/Private can be a query" in err and "left out: 1 multi landmark, 1 landmark not in db, 4 missing files" \
        in err, err
    assert not out.exists()  # before: db.csv was written, then the error
    # A rerun without the solution file next to another run's test manifests would pair them with a new db.csv.
    out.mkdir()
    (out / "queries.csv").write_text("path,landmark_id\n")
    (gldv2 / "recognition_solution_v2.1.csv").unlink()
    assert main(["prepare", "gldv2", "--root", str(gldv2), "--out", str(out)]) == 2
    assert "holds queries.csv from an earlier run, and this run writes none" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["queries.csv"]


def test_evaluate_refuses_a_test_dir_with_no_readable_image(gldv2, tmp_path, capsys):
    """Before: warnings, then GAP 0.00 for every subset and exit 0."""
    prepare_gldv2(gldv2, tmp_path / "m", progress=False)
    (tmp_path / "empty-test").mkdir()
    argv = ["evaluate", "gldv2", "--solution", str(gldv2 / "recognition_solution_v2.1.csv"), "--gallery",
            str(tmp_path / "m" / "db.csv"), "--backbone", "mobilenetv2_100", "--image-size", "32", "--workers", "0",
            "--test-dir", str(tmp_path / "empty-test"), "--out", str(tmp_path / "gap.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"landmarks evaluate: error: {tmp_path / 'empty-test'}: none of the 6 scored test "
                              "images could be read"), err
    assert not (tmp_path / "gap.json").exists()


QUADRANTS = {"top_left": (slice(0, 16), slice(0, 16)), "top_right": (slice(0, 16), slice(16, 32)),
             "bottom_left": (slice(16, 32), slice(0, 16)), "bottom_right": (slice(16, 32), slice(16, 32))}


def _paint(path: Path, colour, quadrant: str | None = None) -> None:
    """A 32 × 32 image: ``colour`` everywhere, or only in one quadrant (black elsewhere)."""
    import numpy as np
    from PIL import Image

    image = np.zeros((32, 32, 3), np.uint8)
    image[QUADRANTS[quadrant] if quadrant else (slice(None), slice(None))] = colour
    # Lossless content under the .jpg name (Pillow detects PNG by content): exact colours.
    Image.fromarray(image).save(path, format="PNG")


def test_evaluate_cli_predicts_from_a_gallery(tmp_path, monkeypatch):
    import torch

    from retrieval import embedding_model

    class QuadrantColours(torch.nn.Module):
        """Stub embedding worked out by hand: the mean colour of each quadrant, [TL, TR, BL, BR]
        (12 numbers), L2-normalised. A solid colour c gives (c, c, c, c) / (2|c|); c in one quadrant
        only gives c / |c| in that slot. So cos(solid d, solid c) = d·c / (|d||c|), and
        cos(solid d, c in one quadrant) is half of that."""

        embedding_size = 12

        def forward(self, images):
            quadrants = [images[:, :, rows, cols].float().mean(dim=(2, 3)) for rows, cols in QUADRANTS.values()]
            return torch.nn.functional.normalize(torch.cat(quadrants, dim=1), dim=1)

    monkeypatch.setattr(embedding_model, "load_embedding_model",
                        lambda **kw: embedding_model.EmbeddingModel(QuadrantColours(), 32, {"source": "stub"}))
    root = make_gldv2(tmp_path / "gldv2")
    # Gallery (train_clean): per landmark one solid image and the others coloured in one quadrant:
    # landmark 1 = 0 red, 1 red top-left, 2 red bottom-right; 17 = 3 green, 4 green top-right,
    # 6 green bottom-left; 256 = 7 blue, 9 blue top-left.
    gallery = {0: ((255, 0, 0), None), 1: ((255, 0, 0), "top_left"), 2: ((255, 0, 0), "bottom_right"),
               3: ((0, 255, 0), None), 4: ((0, 255, 0), "top_right"), 6: ((0, 255, 0), "bottom_left"),
               7: ((0, 0, 255), None), 9: ((0, 0, 255), "top_left")}
    for n, (colour, quadrant) in gallery.items():
        _paint(gldv2_path(root, "train", gldv2_id(n)), colour, quadrant)
    # Solid test images: the top-1 neighbour is the solid gallery image of the largest channel (a
    # one-quadrant image scores at most half of it), its cosine that channel / |colour|.
    test_colours = {
        100: (0, 240, 70),    # truth 17 (Public):       → 17,  240/250 = 0.96   correct
        101: (150, 0, 200),   # truth 1 (Private):       → 256, 200/250 = 0.8    wrong
        102: (0, 0, 250),     # truth 256 17 (Public):   → 256, 1.0              correct
        103: (234, 88, 0),    # truth 9000 (Private):    → 1,   234/250 = 0.936  wrong (not in the gallery)
        104: (0, 240, 54),    # no landmark (Public):    → 17,  240/246 = 0.9756 a false positive
        105: (160, 120, 150), # no landmark (Private):   → 1,   160/250 = 0.64
    }
    for n, colour in test_colours.items():
        _paint(gldv2_path(root, "test", gldv2_id(n)), colour)
    prepare_gldv2(root, tmp_path / "m", progress=False)
    out, submission = tmp_path / "gap.json", tmp_path / "predicted.csv"
    assert main(["evaluate", "gldv2", "--solution", str(root / "recognition_solution_v2.1.csv"),
                 "--gallery", str(tmp_path / "m" / "db.csv"), "--backbone", "mobilenetv2_100", "--image-size", "32",
                 "--workers", "0", "--write-predictions", str(submission), "--out", str(out)]) == 0
    solution = read_recognition_solution(root / "recognition_solution_v2.1.csv")
    predicted = read_recognition_predictions(submission, solution)
    expected = {100: (17, 0.96), 101: (256, 0.8), 102: (256, 1.0), 103: (1, 0.936), 104: (17, 240 / 246), 105: (1, 0.64)}
    assert set(predicted) == set(_ids(expected))  # every scored test image, none of the Ignored ones
    for n, (landmark, score) in expected.items():
        assert predicted[gldv2_id(n)][0] == landmark, n
        assert predicted[gldv2_id(n)][1] == pytest.approx(score, abs=1e-5), n
    results = json.loads(out.read_text())
    # All: M = 4 landmark images (100..103). Ranked by score: 102 ✓ (1.0, P = 1/1), 104 ✗ (0.976),
    # 100 ✓ (0.96, P = 2/3), 103 ✗, 101 ✗, 105 ✗ → GAP (1 + 2/3)/4 = 5/12.
    # Without the non-landmarks 104, 105: 102 ✓ 1/1, 100 ✓ 2/2 → (1 + 1)/4 = 1/2; top-1: 2 of 4.
    assert results["all"]["gap"] == pytest.approx(5 / 12, abs=1e-6)
    assert results["all"]["gap_without_nonlandmarks"] == pytest.approx(0.5, abs=1e-6)
    assert results["all"]["top1_accuracy"] == pytest.approx(0.5)
    assert (results["all"]["n_predicted"], results["all"]["n_landmark_images"]) == (6, 4)
    # Public (100, 102, 104): M = 2; 102 ✓ 1/1, 104 ✗, 100 ✓ 2/3 → (1 + 2/3)/2 = 5/6; without 104: 1.
    assert results["public"]["gap"] == pytest.approx(5 / 6, abs=1e-6)
    assert results["public"]["gap_without_nonlandmarks"] == pytest.approx(1.0, abs=1e-6)
    # Private (101, 103, 105): both landmark images predicted wrong → 0.
    assert results["private"]["gap"] == 0.0 and results["private"]["top1_accuracy"] == 0.0


# ---------------------------------------------------------------------------------------------
# the recipe on converted data
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gldv2_paper_recipe_fits_on_converted_gldv2_and_places365(tmp_path, monkeypatch):
    data = tmp_path / "data"
    prepare_gldv2(make_gldv2(tmp_path / "gldv2"), data, progress=False)
    assert main(["prepare", "places365", "--root", str(make_places365(tmp_path / "places365")), "--out", str(data)]) == 0
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(ROOT / "experiments" / "paper.yaml"), "--config", str(ROOT / "experiments" / "gldv2_paper.yaml"),
            f"--data.data_dir={data}", "--data.image_size=32", "--data.classes_per_batch=2", "--data.samples_per_class=2",
            "--data.eval_batch_size=8", "--data.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
            "--trainer.fast_dev_run=true", "--model.pretrained=false", "--model.backbone=resnet10t"]
    assert main(args) == 0


def test_loader_decodes_large_landscape_jpegs_at_reduced_scale(tmp_path, monkeypatch):
    """Draft mode must shrink non-square photos too (the GLDv2 recipe relies on it, BENCHMARKS.md)."""
    import numpy as np
    from PIL import Image, JpegImagePlugin

    from datamodules.images import load_rgb

    path = tmp_path / "landscape.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)).save(path)
    decoded = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        decoded.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = load_rgb(path, max_side=448)
    assert decoded == [(512, 384)]  # libjpeg decoded at 1/2 scale, not the full 1024 × 768
    assert out.shape == (336, 448, 3)
