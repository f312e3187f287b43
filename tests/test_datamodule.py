"""LandmarkDataModule on hand-made folders: skip policy, clear errors, loaders, class map."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.labels import NONLANDMARK
from datamodules import LandmarkDataModule
from datamodules.manifest import ManifestError


def _world(root: Path, images_per_class=(3, 3, 3, 1), pool=6, distractors=5, queries=True) -> Path:
    rng = np.random.default_rng(0)
    lines = ["path,landmark_id"]
    for c, n in enumerate(images_per_class):
        for i in range(n):
            path = root / "db" / f"{c}_{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
            lines.append(f"db/{c}_{i}.jpg,{100 + c}")
    (root / "db.csv").write_text("\n".join(lines) + "\n")
    for name, count in (("nonlandmarks", pool), ("distractors", distractors)):
        rows = ["path"]
        for i in range(count):
            path = root / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(path)
            rows.append(f"{name}/{i}.jpg")
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    if queries:
        (root / "queries.csv").write_text("path,landmark_id\ndb/0_0.jpg,100\ndb/1_0.jpg,101\n")
    return root


def _dm(root, **kw):
    args = dict(data_dir=str(root), image_size=32, classes_per_batch=2, samples_per_class=2,
                nonlandmark_share=0.2, num_workers=0, eval_batch_size=4)
    args.update(kw)
    return LandmarkDataModule(**args)


def test_loaders_compose_batches_and_carry_indices(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        dm = _dm(_world(tmp_path))
    # Landmark 103 has one image: kept, and said so (the sampler repeats it with new augmentations).
    assert any("1 landmark(s) have a single image" in r.message for r in caplog.records)
    assert dm.num_classes == 4 and dm.class_map.landmark_ids == ("100", "101", "102", "103")
    assert dm.nonlandmarks_per_batch() == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 32, 32)
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0  # model normalises
    labels = batch["label"].tolist()
    assert labels.count(NONLANDMARK) == 1 and set(Counter(y for y in labels if y >= 0).values()) == {2}
    names = dm.eval_set_names
    assert names == ("gallery", "queries", "distractors")
    loaders = dm.val_dataloader()
    gallery = torch.cat([b["index"] for b in loaders[0]])
    assert gallery.tolist() == list(range(10))
    assert torch.cat([b["label"] for b in loaders[2]]).eq(NONLANDMARK).all()


def test_missing_and_empty_files_skipped_with_a_logged_count(tmp_path, caplog):
    root = _world(tmp_path)
    (root / "db" / "0_1.jpg").unlink()
    (root / "db" / "1_1.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
    assert len(dm.db) == 8
    assert any("skipping 2 of 10 rows" in r.message for r in caplog.records)
    with pytest.raises(ManifestError, match=r"db\.csv: line 3: image missing or empty: .*0_1\.jpg"):
        _dm(root, on_bad_image="error")


def test_corrupt_image_becomes_a_masked_placeholder(tmp_path):
    root = _world(tmp_path)
    data = (root / "db" / "2_0.jpg").read_bytes()
    (root / "db" / "2_0.jpg").write_bytes(data[:200])  # truncated JPEG
    dm = _dm(root)
    gallery = dm.eval_dataset("gallery")
    bad = gallery[6]
    assert bad["valid"] is False and bad["label"] == 2 and bad["image"].abs().sum() == 0
    assert gallery[0]["valid"] is True


def test_empty_nonlandmark_pool_is_an_error_when_batches_need_it(tmp_path):
    root = _world(tmp_path, pool=0)
    with pytest.raises(ManifestError, match="non-landmark pool .*nonlandmarks.csv.* is empty"):
        _dm(root).setup()
    _dm(root, nonlandmark_share=0.0).setup()  # fine without non-landmarks


def test_query_of_unknown_landmark_names_the_row(tmp_path):
    root = _world(tmp_path)
    (root / "queries.csv").write_text("path,landmark_id\ndb/0_0.jpg,100\ndb/0_1.jpg,999\n")
    with pytest.raises(ManifestError, match=r"queries\.csv: line 3: landmark_id '999'"):
        _dm(root).setup()


def test_cleaning_decisions_are_respected(tmp_path):
    root = _world(tmp_path)
    text = (root / "db.csv").read_text().splitlines()
    rows = [text[0] + ",decision,reason"] + [f"{line},keep," for line in text[1:]]
    rows[-1] = rows[-1].replace("keep,", "remove,singleton")
    (root / "clean.csv").write_text("\n".join(rows) + "\n")
    dm = _dm(root, db_manifest="clean.csv")
    assert len(dm.db) == 9 and dm.num_classes == 3  # landmark 103's only image was removed


def test_queries_of_a_merged_away_id_are_relabelled(tmp_path):
    # `landmarks clean --duplicates merge` renamed 101 to 100 (one structure under two ids) and
    # removed 103's only image; queries written against the input DB still say 101 — and 103.
    root = _world(tmp_path)
    text = (root / "db.csv").read_text().splitlines()
    rows = [text[0] + ",decision,original_landmark_id"]
    for line in text[1:]:
        path, lid = line.split(",")
        new = "100" if lid == "101" else lid
        rows.append(f"{path},{new},{'remove' if lid == '103' else 'keep'},{lid}")
    (root / "clean.csv").write_text("\n".join(rows) + "\n")
    (root / "queries.csv").write_text("path,landmark_id\ndb/0_0.jpg,100\ndb/1_0.jpg,101\ndb/2_0.jpg,102\n")
    dm = _dm(root, db_manifest="clean.csv")
    dm.setup()
    assert dm.id_aliases == {"101": "100"}
    assert dm.class_map.to_list() == ["100", "102"]
    labels = dm._datasets["queries"].labels.tolist()
    assert labels == [dm.class_map.to_list().index(x) for x in ("100", "100", "102")]
    # A query of a landmark whose every DB photo the cleaning removed (103) is the user's photo of a
    # real landmark that the index can no longer answer: kept, with a label no gallery photo has, so
    # it is a miss for recall and left out of P@1. (It stopped `landmarks demo` with an error when
    # a cleaning removed whole landmarks.) An id the DB never listed is still an error.
    (root / "queries.csv").write_text("path,landmark_id\ndb/3_0.jpg,103\ndb/2_0.jpg,102\n")
    dm = _dm(root, db_manifest="clean.csv")
    dm.setup()
    assert dm.removed_landmarks == {"103"} and dm.query_landmark_ids == ["103", "102"]
    labels = dm._datasets["queries"].labels
    assert labels.tolist() == [dm.unanswerable_label, dm.class_map.to_list().index("102")]
    assert dm.unanswerable_label not in set(dm.db_labels.tolist()) and dm.unanswerable_label != NONLANDMARK
    from retrieval.metrics import evaluate_recognition

    gallery = np.eye(3, dtype=np.float32)[[0, 1]]  # one photo of each kept landmark
    gallery_labels = np.array([dm.class_map.to_list().index(x) for x in ("100", "102")])
    queries = np.eye(3, dtype=np.float32)[[0, 1]]  # the lost landmark's query looks like 100's photo
    result = evaluate_recognition(gallery, gallery_labels, queries, labels, alphas=(0.5,), k=1,
                                  distractor_emb=np.eye(3, dtype=np.float32)[[2, 2]])
    assert result.metrics["n_queries_no_relevant"] == 1  # out of P@1 ...
    assert result.metrics["p@1"] == 1.0
    assert result.metrics["recall@fpr=5e-01"] == 0.5  # ... and a miss for recall
    (root / "queries.csv").write_text("path,landmark_id\ndb/3_0.jpg,999\n")
    with pytest.raises(ManifestError, match=r"queries\.csv: line 2: landmark_id '999'"):
        _dm(root, db_manifest="clean.csv").setup()


def test_a_landmark_whose_every_db_photo_is_missing_keeps_its_queries_as_unanswerable(tmp_path, caplog):
    # Before: the missing photos were dropped before the DB's landmarks were listed, so the queries
    # of 103 (its one photo deleted) stopped the fit with "landmark_id '103' is not among the 3
    # landmarks of the training database", though db.csv lists it.
    root = _world(tmp_path)
    (root / "db" / "3_0.jpg").unlink()
    (root / "queries.csv").write_text("path,landmark_id\ndb/2_0.jpg,103\ndb/2_1.jpg,102\n")
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
        dm.setup()
    assert "skipping 1 of 10 rows whose image is missing or empty" in caplog.text
    assert "1 queries name 1 landmark(s) whose every DB photo was removed or is missing" in caplog.text
    assert dm.removed_landmarks == {"103"} and dm.class_map.to_list() == ["100", "101", "102"]
    assert dm._datasets["queries"].labels.tolist() == [dm.unanswerable_label, 2]
    # on_bad_image='error' still refuses the missing photo, naming it
    with pytest.raises(ManifestError, match=r"db\.csv: line 11: image missing or empty: .*3_0\.jpg"):
        _dm(root, on_bad_image="error")


def test_the_gallery_holds_a_repeated_db_row_once_and_training_keeps_it(tmp_path, caplog):
    root = _world(tmp_path)
    with (root / "db.csv").open("a") as f:
        f.write("db/0_0.jpg,100\ndb/0_0.jpg,100\ndb/0_1.jpg,101\n")  # two repeats, and one photo under a 2nd id
    with caplog.at_level(logging.WARNING):
        dm = _dm(root)
        dm.setup()
    assert "2 row(s) repeat an earlier row's path and landmark_id (first at line 12); each photo is in the " \
           "evaluation gallery once" in caplog.text
    gallery = dm.eval_dataset("gallery")
    names = [(Path(p).name, int(label)) for p, label in zip(gallery.paths, gallery.labels)]
    assert len(names) == 11 and len(set(names)) == 11 and ("0_1.jpg", 1) in names  # 10 photos + 0_1 under 101
    assert len(dm._datasets["train_landmarks"]) == 13  # training may oversample on purpose


def test_an_id_renamed_two_ways_is_a_clear_error(tmp_path):
    root = _world(tmp_path)
    (root / "clean.csv").write_text(
        "path,landmark_id,original_landmark_id\ndb/0_0.jpg,100,100\ndb/1_0.jpg,100,101\ndb/1_1.jpg,102,101\n"
    )
    with pytest.raises(ManifestError, match=r"clean\.csv, line 4: original_landmark_id '101' is renamed to '102', "
                                            r"but to '100' on line 3"):
        _dm(root, db_manifest="clean.csv")


def test_missing_data_dir_without_synthetic_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.synthetic"):
        _dm(tmp_path / "nowhere")


def test_class_map_mismatch_on_resume_fails(tmp_path):
    dm = _dm(_world(tmp_path))
    state = dm.state_dict()
    dm.load_state_dict(state)
    with pytest.raises(ManifestError, match="differ"):
        dm.load_state_dict({"landmark_ids": ["1", "2"]})


def test_oracle_clean_uses_ground_truth_and_refuses_real_data(tmp_path):
    root = _world(tmp_path)
    lines = (root / "db.csv").read_text().splitlines()
    noisy = [lines[0] + ",is_noise"] + [f"{line},{1 if i in (0, 4) else 0}" for i, line in enumerate(lines[1:])]
    (root / "noisy.csv").write_text("\n".join(noisy) + "\n")
    dm = _dm(root, db_manifest="noisy.csv", oracle_clean=True)
    assert len(dm.db) == 8 and not any(p.endswith(("0_0.jpg", "1_1.jpg")) for p in dm.db.paths)
    with pytest.raises(ManifestError, match="oracle_clean needs an 'is_noise' column"):
        _dm(root, oracle_clean=True)


def test_each_worker_and_epoch_draws_different_augmentations(tmp_path):
    root = _world(tmp_path, images_per_class=(4, 4, 4, 4))
    # Every DB image gets the same pixels: two samples can then only differ by their augmentation.
    same = (root / "db" / "0_0.jpg").read_bytes()
    for path in (root / "db").glob("*.jpg"):
        path.write_bytes(same)
    dm = _dm(root, num_workers=2, classes_per_batch=2, samples_per_class=2, nonlandmark_share=0.0,
             batches_per_epoch=2)
    loader = dm.train_dataloader()  # the real training loader: its sampler, workers and worker_init_fn
    assert loader.num_workers == 2 and len(loader) == 2  # batch 0 is built by worker 0, batch 1 by worker 1

    def epoch():
        batches = list(loader)
        assert [len(b["image"]) for b in batches] == [4, 4]
        return [b["image"][i].numpy().tobytes() for b in batches for i in range(4)]

    first = epoch()
    loader.batch_sampler.set_epoch(1)  # as Lightning does at every epoch start
    second = epoch()
    # Workers replaying one copied RNG would give batch 1 the same 4 augmentations as batch 0.
    assert len(set(first)) == 8  # the 4 samples of worker 0 and the 4 of worker 1 all differ
    assert len(set(second)) == 8
    assert set(first).isdisjoint(second)  # and the next epoch differs again


@pytest.mark.parametrize("workers,start", [(0, "forkserver"), (2, "forkserver"), (2, "fork")])
def test_augmentations_depend_on_the_seed_and_epoch_not_on_the_process_history(tmp_path, workers, start):
    import random

    root = _world(tmp_path, images_per_class=(4, 4, 4, 4))

    def epoch_images(epoch: int, history: int) -> list[bytes]:
        # Whatever ran before in the process (other fits, evaluations) moved the global RNGs.
        torch.rand(history), np.random.rand(history), random.random()
        dm = _dm(root, num_workers=workers, classes_per_batch=2, samples_per_class=2, batches_per_epoch=2,
                 worker_start=start)
        loader = dm.train_dataloader()
        loader.batch_sampler.set_epoch(epoch)  # a resumed run starts at its epoch
        return [image.numpy().tobytes() for batch in loader for image in batch["image"]]

    first = epoch_images(0, history=1)
    assert epoch_images(0, history=1000) == first  # seeded from the run's settings alone
    assert epoch_images(1, history=7) == epoch_images(1, history=3)  # a resume at epoch 1 = the uninterrupted one
    assert set(epoch_images(1, history=1)).isdisjoint(first)  # and each epoch draws new ones


def test_workers_from_the_fork_server_draw_the_batches_forked_workers_draw(tmp_path):
    import multiprocessing
    from multiprocessing import forkserver

    from datamodules.workers import PRELOAD

    root = _world(tmp_path, images_per_class=(4, 4, 4, 4))

    def loader(start: str, epoch: int):
        dm = _dm(root, num_workers=2, classes_per_batch=2, samples_per_class=2, batches_per_epoch=4,
                 worker_start=start)
        dm.setup("fit")
        train = dm.train_dataloader()
        train.batch_sampler.set_epoch(epoch)
        return dm, train

    dm, served = loader("forkserver", 3)
    # The default: a fork server, started by setup("fit") and importing the dataset code once.
    assert dm.hparams.worker_start == "forkserver"
    assert served.multiprocessing_context is multiprocessing.get_context("forkserver")
    assert set(PRELOAD) <= set(forkserver._forkserver._preload_modules)
    assert forkserver._forkserver._forkserver_pid is not None
    assert all(v.multiprocessing_context is served.multiprocessing_context for v in dm.val_dataloader())
    _, forked = loader("fork", 3)
    assert forked.multiprocessing_context is multiprocessing.get_context("fork")

    def batches(train) -> list[tuple]:
        return [(b["image"].numpy().tobytes(), b["label"].tolist(), b["index"].tolist()) for b in train]

    # Each worker unpickles the dataset as its loader starts (epoch seed included): same pixels.
    assert batches(served) == batches(forked)
    # No workers, no server needed; a misspelt method is refused by name.
    assert _dm(root, num_workers=0).train_dataloader().multiprocessing_context is None
    with pytest.raises(ValueError, match="worker_start must be one of forkserver, fork, spawn; got 'forks'"):
        _dm(root, num_workers=2, worker_start="forks").train_dataloader()


def test_the_training_pool_is_an_evaluation_set_only_when_asked_and_must_be_disjoint(tmp_path):
    root = _world(tmp_path)
    assert "nonlandmark_pool" not in _dm(root).eval_set_names  # built for mining, not evaluated
    dm = _dm(root, evaluate_nonlandmark_pool=True)
    assert dm.eval_set_names == ("gallery", "queries", "distractors", "nonlandmark_pool")
    pool = torch.cat([b["index"] for b in dm.val_dataloader()[3]])
    assert pool.tolist() == list(range(6)) and dm.eval_dataset("nonlandmark_pool").labels.tolist() == [NONLANDMARK] * 6
    # A distractor that is also a pool photo would be a "known" non-landmark: refused, by file and line.
    (root / "distractors.csv").write_text("path\ndistractors/0.jpg\nnonlandmarks/4.jpg\n")
    with pytest.raises(ManifestError, match=r"distractors.csv: line 3: .*nonlandmarks/4.jpg is also in the "
                                            r"non-landmark pool .*nonlandmarks.csv \(line 6; 1 such photo"):
        _dm(root, evaluate_nonlandmark_pool=True).setup()
    _dm(root).setup()  # without the pool as an evaluation set, nothing is checked
