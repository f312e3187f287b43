"""Revisited Oxford/Paris: the protocol on hand-computed cases, the ground-truth reader on a
miniature ``roxford5k`` in the published layout, query cropping, the CLI and the test callback."""

from __future__ import annotations

import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
from ddp_runs import run_ranks
from PIL import Image

from cli.main import main
from datamodules.manifest import ManifestError
from datamodules.revisited import RevisitedImages, crop_box, load_revisited
from retrieval.revisited import (
    average_precision,
    protocol_ground_truth,
    rank_database,
    revisited_map,
    revisited_metrics,
)

# ---------------------------------------------------------------------------------------------
# metrics, by hand
# ---------------------------------------------------------------------------------------------


def test_junk_is_removed_from_the_ranking_before_counting():
    # Ranking 0..5; positives 0 and 2; image 1 (between them) is junk.
    ranks = np.array([[0, 1, 2, 3, 4, 5]])
    with_junk = revisited_map(ranks, [{"ok": [0, 2], "junk": [1]}], n_database=6)
    # Junk removed: positives at 0 and 1 → each trapezoid (1 + 1)/2 · 1/2 → AP 1.
    assert with_junk.mean_ap == pytest.approx(1.0)
    # Junk counted as a negative: second positive at 2 → (1/2 + 2/3)/2 · 1/2 = 7/24; AP = 1/2 + 7/24.
    without = revisited_map(ranks, [{"ok": [0, 2], "junk": []}], n_database=6)
    assert without.mean_ap == pytest.approx(0.5 + 7 / 24)


def test_average_precision_is_the_trapezoidal_rule_not_plain_ap():
    # Positives at 0-based positions 1 and 3 (non-relevant images at 0 and 2):
    # (0 + 1/2)/2 · 1/2 + (1/3 + 2/4)/2 · 1/2 = 1/8 + 5/24 = 1/3; plain AP would be (1/2 + 2/4)/2 = 1/2.
    assert average_precision(np.array([1, 3]), 2) == pytest.approx(1 / 3)
    ranks = np.array([[5, 1, 4, 3, 0, 2]])
    assert revisited_map(ranks, [{"ok": [1, 3]}], n_database=6).mean_ap == pytest.approx(1 / 3)
    # A positive never retrieved contributes nothing but still counts in n.
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)


def test_precision_at_k_uses_the_official_min_k_last_positive_rule():
    ranks = np.array([[5, 1, 4, 3, 0, 2]])  # positives at 1-based positions 2 and 4
    result = revisited_map(ranks, [{"ok": [1, 3]}], kappas=(1, 5, 10), n_database=6)
    # k=1: k_q = min(1, 4) = 1 → 0/1; k=5 and 10: k_q = min(k, 4) = 4 → 2/4 (plain P@5 would be 2/5).
    assert result.mean_precision == pytest.approx({1: 0.0, 5: 0.5, 10: 0.5})


def _two_queries():
    # Query 0: easy {0}, hard {2}, junk {4}; query 1: easy {5} only (no hard positive).
    gnd = [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [2], "junk": [4]},
           {"bbx": [0, 0, 1, 1], "easy": [5], "hard": [], "junk": []}]
    ranks = np.array([[1, 2, 4, 0, 3, 5], [5, 0, 1, 2, 3, 4]])
    return gnd, ranks


def test_easy_medium_hard_setups_by_hand():
    gnd, ranks = _two_queries()
    m = revisited_metrics(ranks, gnd, n_database=6)
    # Easy, query 0: ok {0} at 3, junk {4, 2} at 2 and 1 → p' = 1 → AP (0 + 1/2)/2 = 1/4; query 1: AP 1.
    assert m["map_easy"] == pytest.approx((0.25 + 1.0) / 2)
    # Medium, query 0: ok {0, 2} at 3 and 1, junk {4} at 2 → p' = 1, 2 →
    # (0 + 1/2)/2 · 1/2 + (1/2 + 2/3)/2 · 1/2 = 1/8 + 7/24 = 5/12; query 1: 1.
    assert m["map_medium"] == pytest.approx((5 / 12 + 1.0) / 2)
    # Hard: query 1 has no hard positive and is skipped; query 0: ok {2} at 1, junk {4, 0} after it → AP 1/4.
    assert m["map_hard"] == pytest.approx(0.25)
    assert (m["n_evaluated_easy"], m["n_evaluated_medium"], m["n_evaluated_hard"]) == (2, 2, 1)
    # mP@k: Easy query 0 pos' 1-based [2] → P@1 0, P@5 = 1/min(5, 2) = 1/2; query 1 → 1, 1.
    assert (m["mp@1_easy"], m["mp@5_easy"], m["mp@10_easy"]) == pytest.approx((0.5, 0.75, 0.75))
    # Medium query 0: [2, 3] → P@1 0, P@5 = 2/3.
    assert (m["mp@1_medium"], m["mp@5_medium"]) == pytest.approx((0.5, (2 / 3 + 1) / 2))
    assert (m["mp@1_hard"], m["mp@5_hard"], m["mp@10_hard"]) == pytest.approx((0.0, 0.5, 0.5))


def test_queries_without_positives_are_skipped_and_all_skipped_is_nan():
    gnd, ranks = _two_queries()
    hard = revisited_map(ranks, protocol_ground_truth(gnd, "hard"), n_database=6)
    assert math.isnan(hard.ap[1]) and np.isnan(hard.precision[1]).all() and hard.n_evaluated == 1
    empty = revisited_map(ranks, [{"ok": [], "junk": [1]}, {"ok": []}], n_database=6)
    assert math.isnan(empty.mean_ap) and all(math.isnan(v) for v in empty.mean_precision.values())
    assert empty.n_evaluated == 0


def _reference_ap_and_pk(ranking, ok, junk, kappas):
    """An independent, literal reading of the protocol: drop junk, then walk the list."""
    kept = [i for i in ranking if i not in set(junk)]
    hits = [p for p, i in enumerate(kept) if i in set(ok)]
    ap = 0.0
    for j, p in enumerate(hits):
        before = 1.0 if p == 0 else j / p
        ap += (before + (j + 1) / (p + 1)) / 2 / len(ok)
    last = hits[-1] + 1
    return ap, [sum(1 for p in hits if p + 1 <= min(k, last)) / min(k, last) for k in kappas]


def test_vectorised_protocol_equals_a_literal_walk_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(5, 40))
        ranks = np.stack([rng.permutation(n) for _ in range(3)])
        labels = rng.choice(["easy", "hard", "junk", "none"], size=(3, n), p=[0.2, 0.2, 0.2, 0.4])
        gnd = [{key: np.flatnonzero(labels[q] == key).tolist() for key in ("easy", "hard", "junk")} for q in range(3)]
        m = revisited_metrics(ranks, gnd, n_database=n)
        for setup, (pos_keys, junk_keys) in {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
                                             "hard": (["hard"], ["junk", "easy"])}.items():
            aps, pks = [], []
            for q in range(3):
                ok = [i for key in pos_keys for i in gnd[q][key]]
                if not ok:
                    continue
                ap, pk = _reference_ap_and_pk(ranks[q].tolist(), ok, [i for key in junk_keys for i in gnd[q][key]], (1, 5, 10))
                aps.append(ap)
                pks.append(pk)
            if aps:
                assert m[f"map_{setup}"] == pytest.approx(np.mean(aps))
                assert [m[f"mp@{k}_{setup}"] for k in (1, 5, 10)] == pytest.approx(np.mean(pks, axis=0).tolist())
            else:
                assert math.isnan(m[f"map_{setup}"])


def test_ranks_must_be_full_and_in_range():
    gnd, ranks = _two_queries()
    with pytest.raises(ValueError, match="full ranking"):
        revisited_metrics(ranks[:, :4], gnd, n_database=6)
    with pytest.raises(ValueError, match="n_queries=2"):
        revisited_metrics(ranks[:1], gnd, n_database=6)
    with pytest.raises(ValueError, match="outside"):
        revisited_metrics(ranks + 1, gnd, n_database=6)
    with pytest.raises(ValueError, match="lacks"):
        protocol_ground_truth([{"easy": [0]}], "easy")


def test_rank_database_orders_by_similarity_with_stable_ties():
    q = np.array([[1.0, 0.0]], np.float32)
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    assert rank_database(q, x).tolist() == [[1, 3, 0, 2]]


# ---------------------------------------------------------------------------------------------
# the miniature roxford5k: gnd_roxford5k.pkl + jpg/
# ---------------------------------------------------------------------------------------------

QUERY_BOX = [10.4, 6.6, 42.5, 30.2]  # PIL.Image.crop rounds → (10, 7, 42, 30)


def _noise_image(seed: int, size=(64, 48)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.NEAREST))


def _save_png_as_jpg_name(array: np.ndarray, path):
    # Lossless content under the .jpg name (Pillow detects PNG by content): the test compares pixels.
    Image.fromarray(array).save(path, format="PNG")


@pytest.fixture
def roxford(tmp_path):
    """``<root>/roxford5k/{gnd_roxford5k.pkl, jpg/}``: 6 database images, 2 queries.

    Database image 0 is exactly the crop of query 0's box (an "easy" positive that only a
    cropped query matches perfectly); the rest is noise.
    """
    folder = tmp_path / "revisitop" / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    imlist = [f"all_souls_{i:06d}" for i in range(6)]
    qimlist = ["all_souls_000013", "ashmolean_000058"]
    queries = [_noise_image(100), _noise_image(101)]
    for name, image in zip(qimlist, queries):
        _save_png_as_jpg_name(image, folder / "jpg" / f"{name}.jpg")
    x1, y1, x2, y2 = 10, 7, 42, 30
    database = [queries[0][y1:y2, x1:x2].copy()] + [_noise_image(i) for i in range(1, 6)]
    for name, image in zip(imlist, database):
        _save_png_as_jpg_name(image, folder / "jpg" / f"{name}.jpg")
    gnd = {
        "imlist": imlist,
        "qimlist": qimlist,
        "gnd": [
            {"bbx": QUERY_BOX, "easy": [0, 3], "hard": [2], "junk": [4]},
            {"bbx": [0.0, 0.0, 64.0, 48.0], "easy": [5], "hard": [1], "junk": []},
        ],
    }
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gnd, protocol=2))
    return tmp_path / "revisitop", folder, queries


def test_reader_finds_the_published_layout_and_validates(roxford):
    root, folder, _ = roxford
    for where in (root, folder, folder / "gnd_roxford5k.pkl"):
        data = load_revisited(where, "roxford5k")
        assert data.name == "roxford5k" and len(data.imlist) == 6 and len(data.qimlist) == 2
        assert data.database_paths[0] == str(folder / "jpg" / "all_souls_000000.jpg")
        assert data.gnd[0] == {"bbx": QUERY_BOX, "easy": [0, 3], "hard": [2], "junk": [4]}


def test_queries_are_cropped_to_their_box_like_pil(roxford):
    root, _, queries = roxford
    data = load_revisited(root, "roxford5k")
    assert crop_box(64, 48, QUERY_BOX) == (10, 7, 42, 30)
    assert crop_box(64, 48, [-3, -1, 80, 60]) == (0, 0, 64, 48)  # clipped to the image
    identity = lambda image: {"image": torch.from_numpy(image)}  # noqa: E731
    sample = RevisitedImages(data, "queries", identity, 32)[0]
    assert sample["valid"] and sample["image"].numpy().tolist() == queries[0][7:30, 10:42].tolist()
    assert tuple(RevisitedImages(data, "database", identity, 32)[0]["image"].shape) == (23, 32, 3)


def test_pickle_that_would_run_code_is_refused(roxford, tmp_path):
    _, folder, _ = roxford
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": Exploit()}))
    with pytest.raises(ManifestError, match=r"refusing to load (posix|os)\.system"):
        load_revisited(folder, "roxford5k")
    assert not marker.exists()


def test_numeric_numpy_arrays_are_accepted_object_arrays_refused(roxford):
    _, folder, _ = roxford
    raw = pickle.loads((folder / "gnd_roxford5k.pkl").read_bytes())
    raw["gnd"][0]["easy"] = np.array([0, 3], dtype=np.int64)
    raw["gnd"][0]["bbx"] = np.array(QUERY_BOX)
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(raw))
    data = load_revisited(folder, "roxford5k")
    assert data.gnd[0]["easy"] == [0, 3] and type(data.gnd[0]["easy"][0]) is int
    raw["gnd"][0]["hard"] = np.array([2], dtype=object)
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(ManifestError, match="dtype object"):
        load_revisited(folder, "roxford5k")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g: g.pop("qimlist"), r"missing key\(s\) \['qimlist'\]"),
        (lambda g: g["gnd"].pop(), "one entry per query"),
        (lambda g: g["gnd"][1].update(easy=[6]), r"gnd\[1\] \(ashmolean_000058\): easy indexes outside the 6"),
        (lambda g: g["gnd"][0].update(bbx=[5, 5, 5, 9]), "empty bounding box"),
        (lambda g: g["gnd"][0].pop("junk"), r"missing \['junk'\]"),
    ],
)
def test_malformed_ground_truth_is_an_error_naming_the_entry(roxford, change, message):
    _, folder, _ = roxford
    raw = pickle.loads((folder / "gnd_roxford5k.pkl").read_bytes())
    change(raw)
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(ManifestError, match=message):
        load_revisited(folder, "roxford5k")


def test_missing_image_is_an_error(roxford):
    _, folder, _ = roxford
    (folder / "jpg" / "all_souls_000004.jpg").unlink()
    with pytest.raises(ManifestError, match="1 of 8 images missing"):
        load_revisited(folder, "roxford5k")


def test_prepare_writes_json_ground_truth_that_loads_identically(roxford, tmp_path):
    root, _, _ = roxford
    before = (root / "roxford5k" / "gnd_roxford5k.pkl").read_bytes()
    assert main(["prepare", "revisited", "--root", str(root), "--out", str(tmp_path / "out"),
                 "--dataset", "roxford5k"]) == 0
    written = tmp_path / "out" / "gnd_roxford5k.json"
    assert json.loads(written.read_text())["format"] == "revisited-ground-truth/1"
    a, b = load_revisited(root, "roxford5k"), load_revisited(written)
    assert (a.imlist, a.qimlist, a.gnd, a.database_paths) == (b.imlist, b.qimlist, b.gnd, b.database_paths)
    assert (root / "roxford5k" / "gnd_roxford5k.pkl").read_bytes() == before  # input untouched


# A stub embedding whose output is worked out by hand: the direction of an image's mean colour,
# (R, G, B) / |(R, G, B)|. The evaluation transform (area resize of a solid colour, black padding)
# scales all three channel means alike, so the direction is exactly the painted colour's.
# Query 0 is blue with a red box exactly on its crop (rows 7:30, columns 10:42): cropped, it is pure
# red (1, 0, 0); uncropped it would be mostly blue. Query 1 is solid green (0, 1, 0).
COLOUR_DATABASE = [(250, 150, 0), (200, 120, 100), (120, 60, 150), (0, 100, 200), (150, 0, 150), (60, 250, 60)]
# cos(red, db)   = R/|c|: .857  .788  .596  0     .707  .227 → ranking [0, 1, 4, 2, 5, 3]
# cos(green, db) = G/|c|: .514  .473  .298  .447  0     .947 → ranking [5, 0, 1, 3, 2, 4]
# Ground truth: query 0 easy {0, 3}, hard {2}, junk {4}; query 1 easy {5}, hard {1}.
# Query 0, ranking [0, 1, 4, 2, 5, 3]:
#   Easy   (junk 4, 2):  kept [0, 1, 5, 3], positives at p = 0, 3:
#          (1 + 1)/2 · 1/2 + (1/3 + 2/4)/2 · 1/2 = 1/2 + 5/24 = 17/24;   P@1 = 1/1, P@5 = P@10 = 2/min(k, 4) = 1/2
#   Medium (junk 4):     kept [0, 1, 2, 5, 3], positives at p = 0, 2, 4:
#          (1 + 1)/2 · 1/3 + (1/2 + 2/3)/2 · 1/3 + (2/4 + 3/5)/2 · 1/3 = 1/3 + 7/36 + 11/60 = 32/45;
#          P@1 = 1, P@5 = P@10 = 3/5
#   Hard   (junk 4, 0, 3): kept [1, 2, 5], positive at p = 1: (0 + 1/2)/2 = 1/4; P@1 = 0, P@5 = P@10 = 1/2
# Query 1, ranking [5, 0, 1, 3, 2, 4]:
#   Easy   (junk 1):     positive at p = 0: AP 1; P@k = 1
#   Medium:              positives at p = 0, 2: 1/2 + (1/2 + 2/3)/2 · 1/2 = 19/24; P@1 = 1, P@5 = P@10 = 2/3
#   Hard   (junk 5):     kept [0, 1, 3, 2, 4], positive at p = 1: AP 1/4; P@1 = 0, P@5 = P@10 = 1/2
EXPECTED_COLOUR_METRICS = {
    "map_easy": (17 / 24 + 1) / 2, "map_medium": (32 / 45 + 19 / 24) / 2, "map_hard": 0.25,  # 41/48, 541/720
    "mp@1_easy": 1.0, "mp@5_easy": 0.75, "mp@10_easy": 0.75,
    "mp@1_medium": 1.0, "mp@5_medium": (3 / 5 + 2 / 3) / 2, "mp@10_medium": (3 / 5 + 2 / 3) / 2,  # 19/30
    "mp@1_hard": 0.0, "mp@5_hard": 0.5, "mp@10_hard": 0.5,
    "n_evaluated_easy": 2, "n_evaluated_medium": 2, "n_evaluated_hard": 2,
}


def _mean_colour_direction(images: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(images.float().mean(dim=(2, 3)), dim=1)


class _ColourNet(torch.nn.Module):
    embedding_size = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return _mean_colour_direction(images)


def _paint_colour_world(folder) -> None:
    query0 = np.zeros((48, 64, 3), np.uint8)
    query0[...] = (0, 0, 255)
    query0[7:30, 10:42] = (255, 0, 0)  # exactly crop_box(64, 48, QUERY_BOX) = (10, 7, 42, 30)
    _save_png_as_jpg_name(query0, folder / "jpg" / "all_souls_000013.jpg")
    _save_png_as_jpg_name(np.full((48, 64, 3), (0, 255, 0), np.uint8), folder / "jpg" / "ashmolean_000058.jpg")
    for i, colour in enumerate(COLOUR_DATABASE):
        _save_png_as_jpg_name(np.full((48, 64, 3), colour, np.uint8), folder / "jpg" / f"all_souls_{i:06d}.jpg")


def test_evaluate_cli_crops_queries_and_scores_the_protocol(roxford, tmp_path, monkeypatch):
    from retrieval import embedding_model

    root, folder, _ = roxford
    _paint_colour_world(folder)
    asked = []

    def stub_loader(**kw):
        asked.append(kw)
        return embedding_model.EmbeddingModel(_ColourNet(), kw["image_size"] or 224, {"source": "stub"})

    monkeypatch.setattr(embedding_model, "load_embedding_model", stub_loader)
    out = tmp_path / "revisited.json"
    assert main(["evaluate", "revisited", "--root", str(root), "--backbone", "mobilenetv2_100",
                 "--image-size", "64", "--workers", "0", "--out", str(out)]) == 0
    assert asked == [{"backbone": "mobilenetv2_100", "image_size": 64}]
    results = json.loads(out.read_text())
    assert results["model"] == {"source": "stub"} and results["image_size"] == 64
    # Uncropped, query 0 would rank [2, 4, 3, 1, 5, 0] and every number would differ.
    assert results["roxford5k"] == pytest.approx(EXPECTED_COLOUR_METRICS)


def test_callback_logs_the_protocol_after_test(roxford, tiny_world, tmp_path):
    import pytorch_lightning as pl

    from callbacks.revisited_evaluation import RevisitedEvaluation
    from datamodules import LandmarkDataModule

    class ColourModule(pl.LightningModule):
        def forward(self, images):
            return _mean_colour_direction(images)

        def test_step(self, batch, batch_idx, dataloader_idx=0):
            return None

    root, folder, _ = roxford
    _paint_colour_world(folder)
    datamodule = LandmarkDataModule(data_dir=str(tiny_world), image_size=32, classes_per_batch=4, samples_per_class=2,
                                    num_workers=0, eval_batch_size=16)
    callback = RevisitedEvaluation(root=str(root), datasets=["roxford5k"], num_workers=0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path)
    logged = trainer.test(ColourModule(), datamodule=datamodule, verbose=False)[0]
    for key in ("map_easy", "map_medium", "map_hard", "mp@1_medium", "mp@5_medium", "mp@1_hard", "mp@5_hard"):
        assert logged[f"test/roxford5k/{key}"] == pytest.approx(EXPECTED_COLOUR_METRICS[key], abs=1e-6), key
    assert {k: v for k, v in callback.last_metrics.items() if k.startswith("roxford5k/")} == pytest.approx(
        {f"roxford5k/{k}": v for k, v in EXPECTED_COLOUR_METRICS.items()}
    )


_DDP_CALLBACK_SCRIPT = r"""
import json, sys
import pytorch_lightning as pl
from callbacks.revisited_evaluation import RevisitedEvaluation
from datamodules import LandmarkDataModule
from test_revisited import _mean_colour_direction

class ColourModule(pl.LightningModule):
    def forward(self, images):
        return _mean_colour_direction(images)
    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return None

root, world, out = sys.argv[1:4]
datamodule = LandmarkDataModule(data_dir=world, image_size=32, classes_per_batch=4, samples_per_class=2,
                                num_workers=0, eval_batch_size=16)
callback = RevisitedEvaluation(root=root, datasets=["roxford5k"], num_workers=0, batch_size=2)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[callback], default_root_dir=out)
logged = trainer.test(ColourModule(), datamodule=datamodule, verbose=False)[0]
json.dump({k: float(v) for k, v in logged.items() if k.startswith("test/roxford5k/")},
          open(f"{out}/rank{trainer.global_rank}.json", "w"))
"""


@pytest.mark.slow
def test_callback_on_two_ddp_processes_logs_the_single_process_numbers(roxford, tiny_world, tmp_path):
    import sys
    from pathlib import Path

    root, folder, _ = roxford
    _paint_colour_world(folder)
    script = tmp_path / "ddp_revisited.py"
    script.write_text(_DDP_CALLBACK_SCRIPT)
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]), OMP_NUM_THREADS="1",
               WANDB_MODE="disabled")
    done = run_ranks([sys.executable, str(script), str(root), str(tiny_world), str(tmp_path)], env=env,
                     cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # The same numbers as one process (test_callback_logs_the_protocol_after_test), on both ranks:
    # 6 database images and 2 queries split over 2 ranks (with padding) and gathered back in order.
    for rank in (0, 1):
        logged = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert logged == pytest.approx({f"test/roxford5k/{k}": v for k, v in EXPECTED_COLOUR_METRICS.items()}, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# bad inputs to the commands: one line naming the fault, exit status 2, inputs untouched
# ---------------------------------------------------------------------------------------------


def _one_line_error(argv, capsys, command: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    # Progress and INFO lines may come first (the error can follow the embedding); the error is one line, the last.
    assert "Traceback" not in out + err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    assert errors[0].startswith(f"landmarks {command}: error: "), err
    return errors[0]


def _rewrite_pickle(folder, change) -> None:
    raw = pickle.loads((folder / "gnd_roxford5k.pkl").read_bytes())
    change(raw)
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(raw))


def _prepared_json(roxford, tmp_path):
    root, _, _ = roxford
    assert main(["prepare", "revisited", "--root", str(root), "--out", str(tmp_path / "out")]) == 0
    return tmp_path / "out" / "gnd_roxford5k.json"


def test_a_repeated_index_is_scored_as_given_with_a_warning(roxford, caplog):
    """Refused for a while, but the official files must never be turned away: scored as the
    official code scores it, and said."""
    import logging

    root, folder, _ = roxford
    _rewrite_pickle(folder, lambda g: g["gnd"][0].update(easy=[0, 3, 3]))
    with caplog.at_level(logging.WARNING):
        data = load_revisited(root, "roxford5k")
    assert data.gnd[0]["easy"] == [0, 3, 3]
    assert "gnd[0] (all_souls_000013): easy lists database index 3 more than once" in caplog.text


def test_prepare_refuses_a_dataset_that_the_file_name_contradicts(roxford, tmp_path, capsys):
    _, folder, _ = roxford
    pkl = folder / "gnd_roxford5k.pkl"
    # Before: Oxford's ground truth written as gnd_rparis6k.json with "dataset": "rparis6k", exit 0.
    err = _one_line_error(["prepare", "revisited", "--root", str(pkl), "--dataset", "rparis6k",
                           "--out", str(tmp_path / "o")], capsys, "prepare")
    assert f"{pkl}: the file name says dataset 'roxford5k', but 'rparis6k' was asked for" in err
    assert not (tmp_path / "o").exists()


def test_prepared_json_is_named_by_its_dataset_field(roxford, tmp_path, capsys):
    written = _prepared_json(roxford, tmp_path)
    renamed = written.parent / "foo.json"  # beside it: image_dir is relative
    renamed.write_bytes(written.read_bytes())
    # Before: the dataset was called "foo" (after the file), not the roxford5k its JSON records.
    assert load_revisited(renamed).name == "roxford5k"
    assert main(["prepare", "revisited", "--root", str(renamed), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "gnd_roxford5k.json").read_text())["dataset"] == "roxford5k"
    err = _one_line_error(["prepare", "revisited", "--root", str(renamed), "--dataset", "rparis6k",
                           "--out", str(tmp_path / "o")], capsys, "prepare")
    assert f"{renamed}: holds dataset 'roxford5k' (its 'dataset' field), but 'rparis6k' was asked for" in err
    misnamed = written.parent / "gnd_rparis6k.json"
    misnamed.write_bytes(written.read_bytes())
    with pytest.raises(ManifestError, match="holds dataset 'roxford5k' .* but 'rparis6k' is in the file name"):
        load_revisited(misnamed)


@pytest.mark.parametrize("content, message", [
    (b"", r"not valid JSON \(Expecting value: line 1 column 1 \(char 0\); empty or truncated\?\)"),
    (None, r"not valid JSON \(.*; empty or truncated\?\)"),  # the prepared file cut in half
    (b"[1, 2]", "expected a JSON object with format, imlist, qimlist, gnd; found list"),
    (b"\xff\xfe", "not UTF-8 text, so not a revisited-ground-truth/1 file"),
    ("image_dir", r"image_dir must be a folder path \(a string\), found 123"),
])
def test_malformed_json_ground_truth_is_an_error_naming_the_file(roxford, tmp_path, capsys, content, message):
    written = _prepared_json(roxford, tmp_path)
    good = written.read_bytes()
    if content is None:
        content = good[: len(good) // 2]
    elif content == "image_dir":
        content = json.dumps({**json.loads(good), "image_dir": 123}).encode()
    written.write_bytes(content)
    # Before: JSONDecodeError, AttributeError, UnicodeDecodeError, TypeError tracebacks.
    with pytest.raises(ManifestError, match=f"^{re.escape(str(written))}: {message}"):
        load_revisited(written)
    err = _one_line_error(["prepare", "revisited", "--root", str(written), "--out", str(tmp_path / "o")],
                          capsys, "prepare")
    assert str(written) in err


def test_a_text_file_named_pkl_is_not_a_readable_pickle(roxford, tmp_path, capsys):
    root, folder, _ = roxford
    pkl = folder / "gnd_roxford5k.pkl"
    pkl.write_text("imlist, qimlist, gnd\n" * 20)
    # Before: "...: Memo value not found at index 101" (pickle's words, not what is wrong).
    err = _one_line_error(["prepare", "revisited", "--root", str(root), "--out", str(tmp_path / "o")],
                          capsys, "prepare")
    assert f"{pkl}: not a readable ground-truth pickle" in err


def test_prepare_refuses_to_overwrite_its_input(roxford, tmp_path, capsys):
    written = _prepared_json(roxford, tmp_path)
    before = written.read_bytes()
    err = _one_line_error(["prepare", "revisited", "--root", str(written), "--out", str(written.parent)],
                          capsys, "prepare")
    assert f"{written}: is the input ground truth; choose another --out" in err
    assert written.read_bytes() == before


@pytest.fixture
def colour_evaluate(roxford, tmp_path, monkeypatch):
    """``landmarks evaluate revisited`` argv on the colour world, with the stub embedding."""
    from retrieval import embedding_model

    root, folder, _ = roxford
    _paint_colour_world(folder)
    monkeypatch.setattr(embedding_model, "load_embedding_model",
                        lambda **kw: embedding_model.EmbeddingModel(_ColourNet(), 64, {"source": "stub"}))
    return ["evaluate", "revisited", "--root", str(root), "--backbone", "mobilenetv2_100", "--workers", "0",
            "--device", "cpu"], folder


def test_evaluate_refuses_a_dataset_that_the_file_name_contradicts(colour_evaluate, capsys):
    argv, folder = colour_evaluate
    argv = [*argv, "--root", str(folder / "gnd_roxford5k.pkl"), "--dataset", "rparis6k"]
    assert "the file name says dataset 'roxford5k', but 'rparis6k'" in _one_line_error(argv, capsys, "evaluate")


def test_evaluate_given_one_file_scores_only_its_dataset(colour_evaluate, tmp_path, capsys):
    argv, folder = colour_evaluate
    out = tmp_path / "r.json"
    # Before: with no --dataset, a file --root was scored twice, as roxford5k and as rparis6k.
    assert main([*argv, "--root", str(folder / "gnd_roxford5k.pkl"), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == {"model", "image_size", "roxford5k"}


def test_evaluate_names_the_first_undecodable_image(colour_evaluate, capsys):
    argv, folder = colour_evaluate
    bad = folder / "jpg" / "all_souls_000004.jpg"
    bad.write_text("x")
    # Before: RuntimeError "roxford5k: 1 database image(s) could not be decoded" (a traceback, no path).
    err = _one_line_error(argv, capsys, "evaluate")
    assert f"roxford5k: 1 database image(s) could not be decoded, first {bad}" in err


@pytest.mark.parametrize("device, message", [
    ("tpu", "argument --device: expected cpu, cuda, cuda:N or auto, got 'tpu'"),
    ("cuda:abc", "argument --device: expected cpu, cuda, cuda:N or auto, got 'cuda:abc'"),
    ("cuda", "argument --device: 'cuda': this machine has 0 CUDA device(s)"),
])
def test_evaluate_refuses_a_device_it_cannot_use(colour_evaluate, capsys, monkeypatch, device, message):
    argv, _ = colour_evaluate
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    # Before: a RuntimeError traceback from torch.device (or from the first .to(device)).
    assert message in _one_line_error([*argv, "--device", device], capsys, "evaluate")


def test_evaluate_writes_null_and_warns_when_no_query_has_positives(colour_evaluate, tmp_path, capsys):
    argv, folder = colour_evaluate
    _rewrite_pickle(folder, lambda g: [q.update(easy=[], hard=[]) for q in g["gnd"]])
    out = tmp_path / "r.json"
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "WARNING cli.evaluate: roxford5k: no query has positives in the Easy, Medium, Hard setup(s): their mAP and " \
           "mP@k are undefined (nan here, null in --out)" in err
    # Before: a bare NaN, which is not JSON.
    metrics = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["roxford5k"]
    assert metrics["map_medium"] is None and metrics["mp@5_hard"] is None and metrics["n_evaluated_easy"] == 0
