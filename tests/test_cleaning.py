"""Database cleaning: hand-built embedding sets with known right answers, bad input, the CLI end to end."""

from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cleaning.algorithm import CleaningParams, clean_embeddings, cluster_landmark
from cleaning.truth import score_against_truth
from datamodules.manifest import read_manifest, write_manifest

D = 16

# The cases below were hand-made in cosine units, with the defaults before they became relative
# to the embedding's scale (CleaningParams.units): the absolute values those defaults stand for.
ABSOLUTE_DEFAULTS = dict(units="absolute", distance_threshold=0.4, attach_distance=0.7, duplicate_distance=0.06,
                         reassign_margin=0.2, nonlandmark_margin=0.3, evidence_threshold=0.16)


def _absolute(**changes) -> CleaningParams:
    return CleaningParams(**{**ABSOLUTE_DEFAULTS, **changes})


def _axis(i: int, d: int = D) -> np.ndarray:
    v = np.zeros(d)
    v[i] = 1.0
    return v


def _blob(center: np.ndarray, n: int, rng: np.random.Generator, spread: float = 0.03) -> np.ndarray:
    x = center + spread * rng.standard_normal((n, len(center)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rotated(angle_deg: float, a: int = 0, b: int = 1) -> np.ndarray:
    """Unit vector in the plane of axes a, b at ``angle_deg`` from axis a."""
    t = np.deg2rad(angle_deg)
    return np.cos(t) * _axis(a) + np.sin(t) * _axis(b)


def _world(rng):
    """A: two shooting angles (axes 0 and 1) + one stray (axis 2). B: axis 3. C: axis 4.
    D: the same structure as C under another id (axis 4 too), fewer images."""
    parts = [
        ("A", _blob(_axis(0), 9, rng)), ("A", _blob(_axis(1), 6, rng)), ("A", _blob(_axis(2), 1, rng)),
        ("B", _blob(_axis(3), 10, rng)),
        ("C", _blob(_axis(4), 12, rng)),
        ("D", _blob(_axis(4), 7, rng)),
    ]
    ids = [lid for lid, block in parts for _ in range(len(block))]
    return np.concatenate([block for _, block in parts]).astype(np.float32), ids


def test_two_shooting_angles_are_both_kept_and_a_stray_is_removed_with_its_reason():
    emb, ids = _world(np.random.default_rng(0))
    result = clean_embeddings(emb, ids, _absolute(duplicates="flag"))
    a = np.flatnonzero(np.asarray(ids) == "A")
    assert result.landmarks["A"]["cluster_sizes"] == [9, 6]  # both angles are valid clusters
    assert result.cluster[a].tolist() == [0] * 9 + [1] * 6 + [-1]
    assert result.keep[a].tolist() == [True] * 15 + [False]
    stray = a[-1]
    assert result.reason_code[stray] == "small_cluster"
    clusters = result.clusters["A"]
    gap = 1.0 - float((clusters.centroids @ emb[stray]).max())
    assert result.reason[stray] == f"small_cluster: in a cluster of 1 < 3 images, {gap:.3f} from the nearest kept cluster's centre (> 0.7)"
    assert gap > 0.9  # orthogonal to both angles
    assert result.keep[np.asarray(ids) != "A"].all()
    assert result.reason[result.keep].tolist() == [""] * int(result.keep.sum())
    # Centroids are the unit means of the clusters.
    expected = emb[a[:9]].astype(np.float64).sum(0)
    np.testing.assert_allclose(clusters.centroids[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_an_unusual_photo_near_a_kept_cluster_is_attached_to_it():
    rng = np.random.default_rng(9)
    # A tight cut (0.1) splits off the photo at 30° (cosine distance 0.134 from the angle's centre).
    emb = np.concatenate([_blob(_rotated(0), 10, rng, spread=0.005), _rotated(30)[None, :]]).astype(np.float32)
    ids = ["A"] * 11
    attached = clean_embeddings(emb, ids, _absolute(distance_threshold=0.1, attach_distance=0.2))
    assert attached.clusters["A"].labels[10] == 1 and attached.clusters["A"].attached.tolist() == [False] * 10 + [True]
    assert attached.keep.all() and attached.cluster.tolist() == [0] * 11
    strict = clean_embeddings(emb, ids, _absolute(distance_threshold=0.1, attach_distance=None))
    assert strict.keep.tolist() == [True] * 10 + [False]
    assert strict.reason[10] == "small_cluster: in a cluster of 1 < 3 images"
    too_far = clean_embeddings(emb, ids, _absolute(distance_threshold=0.1, attach_distance=0.12))
    assert not too_far.keep[10] and "0.13" in too_far.reason[10]


def test_two_ids_of_one_structure_are_flagged_or_merged():
    emb, ids = _world(np.random.default_rng(1))
    flagged = clean_embeddings(emb, ids, _absolute(duplicates="flag"))
    assert [g["members"] for g in flagged.duplicate_groups] == [["C", "D"]]
    assert flagged.duplicate_groups[0]["landmark_id"] == "C"  # the one with more clustered images
    rows_d = np.flatnonzero(np.asarray(ids) == "D")
    assert flagged.landmark_id[rows_d].tolist() == ["D"] * 7  # flag: ids unchanged
    assert flagged.duplicate_of[rows_d].tolist() == ["C"] * 7
    assert flagged.keep[rows_d].all()  # a duplicate's images are not "closer to another landmark"
    assert flagged.landmarks["D"]["duplicate_of"] == "C" and flagged.landmarks["A"]["duplicate_of"] == ""
    merged = clean_embeddings(emb, ids, _absolute(duplicates="merge"))
    assert merged.landmark_id[rows_d].tolist() == ["C"] * 7
    assert merged.input_landmark_id[rows_d].tolist() == ["D"] * 7
    assert merged.counts()["distinct_landmarks_kept"] == 3 == flagged.counts()["distinct_landmarks_kept"]
    # Different structures are never paired: A's angles, B and C are all orthogonal.
    assert all(set(p["landmarks"]) == {"C", "D"} for p in merged.duplicate_pairs)
    # A stricter share requirement than D's overlap (100 %) cannot be met... but 1.0 still is.
    assert len(clean_embeddings(emb, ids, _absolute(duplicate_min_share=1.0)).duplicate_groups) == 1
    # Coinciding clusters beyond the distance threshold are not duplicates.
    assert clean_embeddings(emb, ids, _absolute(duplicate_distance=0.0)).duplicate_groups == []


def test_image_closer_to_another_landmark_is_removed():
    rng = np.random.default_rng(2)
    # A around 0°, B around 60° (cosine distance 0.5: distinct landmarks); one image of A at 35°
    # joins A's cluster (average distance ~0.18 < 0.5) but is closer to B's centroid (25° away).
    a = _blob(_rotated(0), 10, rng, spread=0.01)
    b = _blob(_rotated(60), 10, rng, spread=0.01)
    x = _rotated(35)[None, :]
    emb = np.concatenate([a, x, b]).astype(np.float32)
    ids = ["A"] * 11 + ["B"] * 10
    result = clean_embeddings(emb, ids, _absolute(distance_threshold=0.4, reassign_margin=0.0))
    assert result.cluster[10] == 0  # it is inside A's valid cluster ...
    assert not result.keep[10] and result.reason_code[10] == "other_landmark"  # ... and still removed
    assert result.reason[10].startswith("other_landmark: closer to landmark B (0.9")
    assert result.other_landmark[10] == "B"
    assert result.keep[:10].all() and result.keep[11:].all()
    # A margin larger than the gap keeps it.
    lenient = clean_embeddings(emb, ids, _absolute(distance_threshold=0.4, reassign_margin=0.2))
    assert lenient.keep.all()
    assert clean_embeddings(emb, ids, _absolute(distance_threshold=0.4, reassign_margin=None)).keep.all()


def test_images_near_the_nonlandmark_pool_are_removed_only_when_asked():
    rng = np.random.default_rng(3)
    emb = np.concatenate([_blob(_axis(0), 8, rng), _blob(_axis(1), 8, rng)]).astype(np.float32)
    ids = ["A"] * 8 + ["B"] * 8
    pool = np.stack([_axis(5), emb[3] + 0.001, np.zeros(D)]).astype(np.float32)  # the zero row is skipped
    result = clean_embeddings(emb, ids, _absolute(nonlandmark_distance=0.001), nonlandmark_embeddings=pool)
    assert np.flatnonzero(~result.keep).tolist() == [3]
    assert result.reason_code[3] == "near_nonlandmark" and result.nonlandmark_neighbour[3] == 1
    assert result.reason[3].startswith("near_nonlandmark: cosine distance 0.000 to non-landmark image 1, ")
    off = clean_embeddings(emb, ids, _absolute(nonlandmark_distance=None), nonlandmark_embeddings=pool)
    assert off.keep.all()


def test_images_closer_to_the_nonlandmarks_than_to_their_landmark_are_removed_by_margin():
    rng = np.random.default_rng(10)
    # Image 8 of A lies 50° from A's angle towards a non-landmark photo at 90°: it joins A's
    # cluster (distance 0.36 < 0.5) but is closer to the non-landmark (cos 40° = 0.77 vs cos 50° = 0.64).
    emb = np.concatenate([_blob(_rotated(0, 0, 5), 8, rng, spread=0.005), _rotated(50, 0, 5)[None, :]]).astype(np.float32)
    pool = _axis(5)[None, :].astype(np.float32)
    ids = ["A"] * 9
    params = dict(nonlandmark_distance=0.1)  # the absolute test alone does not fire (distance 0.23)
    assert clean_embeddings(emb, ids, _absolute(**params), nonlandmark_embeddings=pool).keep.all()
    result = clean_embeddings(emb, ids, _absolute(**params, nonlandmark_margin=0.05), nonlandmark_embeddings=pool)
    assert result.cluster[8] == 0 and np.flatnonzero(~result.keep).tolist() == [8]
    assert result.reason_code[8] == "near_nonlandmark"
    assert abs(result.nonlandmark_similarity[8] - np.cos(np.deg2rad(40))) < 1e-6
    assert clean_embeddings(emb, ids, _absolute(**params, nonlandmark_margin=0.2), nonlandmark_embeddings=pool).keep.all()


def test_unreadable_rows_and_dropped_landmarks_follow_the_policy():
    rng = np.random.default_rng(4)
    emb = np.concatenate([_blob(_axis(0), 6, rng), np.zeros((2, D)), _blob(_axis(1), 2, rng)]).astype(np.float32)
    ids = ["A"] * 6 + ["E"] * 2 + ["F"] * 2  # E: nothing readable; F: 2 images < min_cluster_size 3
    valid = np.ones(10, dtype=bool)
    valid[0] = False
    result = clean_embeddings(emb, ids, _absolute(), valid=valid)
    assert result.reason_code.tolist() == ["unreadable"] + [""] * 5 + ["unreadable"] * 2 + ["landmark_dropped"] * 2
    assert result.landmarks["E"]["dropped"] and result.landmarks["F"]["dropped"] and not result.landmarks["A"]["dropped"]
    assert result.reason[8] == "landmark_dropped: no cluster of >= 3 images (largest 2 of 2)"
    # min_cluster_fraction: 30 % of A's 5 readable images -> a cluster needs 2 (ceil 1.5), so 3 >= max(3, 2).
    assert _absolute(min_cluster_fraction=0.3).min_size(5) == 3
    assert _absolute(min_cluster_size=1, min_cluster_fraction=0.3).min_size(5) == 2


def test_parallel_clustering_equals_in_process():
    emb, ids = _world(np.random.default_rng(5))
    one = clean_embeddings(emb, ids, _absolute())
    two = clean_embeddings(emb, ids, _absolute(), n_jobs=2)
    for name in ("keep", "cluster", "reason", "landmark_id"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))


def test_unit_rows_normalises_a_copy_and_leaves_the_input_alone():
    from retrieval.clustering import unit_rows

    x = np.array([[3.0, 4.0], [0.0, 2.0]])
    before = x.copy()
    for dtype in (np.float64, np.float32):
        unit = unit_rows(x, dtype=dtype)
        assert unit.dtype == dtype
        np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
        np.testing.assert_array_equal(x, before)  # normalised in place, but in its own copy


def test_bad_input_gets_clear_errors():
    emb, ids = _world(np.random.default_rng(6))
    broken = emb.copy()
    broken[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"row 7 has NaN or inf"):
        clean_embeddings(broken, ids)
    with pytest.raises(ValueError, match=r"has 45 rows but there are 44 landmark ids"):
        clean_embeddings(emb, ids[:-1])
    with pytest.raises(ValueError, match=r"row 2: empty landmark id"):
        clean_embeddings(emb, ids[:2] + [" "] + ids[3:])
    with pytest.raises(ValueError, match="no rows to clean"):
        clean_embeddings(np.zeros((0, D), np.float32), [])
    with pytest.raises(ValueError, match=r"min_cluster_size must be >= 1.*duplicates must be"):
        _absolute(min_cluster_size=0, duplicates="drop")
    with pytest.raises(ValueError, match="a landmark with no rows"):
        cluster_landmark(np.zeros((0, D)), _absolute())


def test_truth_scores_are_hand_computed():
    emb, ids = _world(np.random.default_rng(7))
    result = clean_embeddings(emb, ids, _absolute())
    n = len(ids)
    table = pd.DataFrame({"landmark_id": ids, "is_noise": ["0"] * n, "true_landmark_id": ids})
    table.loc[15, "is_noise"], table.loc[15, "true_landmark_id"] = "1", ""  # A's stray: really no landmark
    table.loc[0, "is_noise"] = "1"  # pretend one kept image of A were noise too
    table.loc[table.landmark_id == "D", "true_landmark_id"] = "C"
    scores = score_against_truth(table, result)
    assert scores["removal"] == {"noise_rows": 2, "removed": 1, "true_positives": 1, "false_positives": 0,
                                 "false_negatives": 1, "precision": 1.0, "recall": 0.5}
    assert scores["recall_by_noise_kind"] == {"no_landmark": 1.0, "other_landmark": 0.0}
    assert scores["duplicates"]["true_pairs"] == [["C", "D"]] and scores["duplicates"]["recall"] == 1.0
    assert score_against_truth(table.drop(columns="is_noise"), result) is None


# ---- the command, end to end, on the tiny synthetic world ------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_report(out: Path) -> None:
    page = out / "report.html"
    root = ET.fromstring(page.read_text(encoding="utf-8"))  # well-formed, or this raises
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    images = root.findall(".//h:img", ns)
    assert images, "the report shows thumbnails"
    for img in images:
        src = img.get("src")
        assert not src.startswith(("http:", "https:", "/")), src  # offline, relative
        assert (out / src).is_file(), src
    assert root.findall(".//h:section", ns), "one section per landmark"


def test_clean_command_end_to_end_with_an_offline_backbone(tiny_world, tmp_path, capsys):
    from cli.main import main

    db = tiny_world / "db.csv"
    before = _digest(db)
    out = tmp_path / "clean"
    code = main(["clean", "--manifest", str(db), "--out", str(out), "--backbone", "mobilenetv2_100",
                 "--image-size", "32", "--nonlandmarks", str(tiny_world / "nonlandmarks.csv"), "--no-progress",
                 "--batch-size", "32", "--min-cluster-size", "2"])
    assert code == 0, capsys.readouterr().err
    assert _digest(db) == before  # the input is never modified
    assert "rows kept" in capsys.readouterr().out
    source = pd.read_csv(db, dtype=str, keep_default_na=False)
    clean = pd.read_csv(out / "clean.csv", dtype=str, keep_default_na=False)
    assert len(clean) == len(source)
    assert clean["original_landmark_id"].tolist() == source["landmark_id"].tolist()
    assert set(clean["decision"]) <= {"keep", "remove"}
    assert (clean["reason"].eq("") == clean["decision"].eq("keep")).all()
    for column in source.columns:
        if column not in ("path", "landmark_id"):
            assert clean[column].tolist() == source[column].tolist(), column
    # Paths are rewritten relative to the output folder and name the same files.
    assert [os.path.realpath(out / p) for p in clean["path"]] == [os.path.realpath(tiny_world / p) for p in source["path"]]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["rows"] == len(source)
    assert summary["counts"]["kept"] == int(clean["decision"].eq("keep").sum())
    assert summary["input"]["sha256"] == before
    assert summary["ground_truth"]["removal"]["noise_rows"] == int(source["is_noise"].eq("1").sum())
    assert summary["embeddings"]["backbone"] == "mobilenetv2_100"
    _check_report(out)
    assert list((out / "embedding-cache").glob("embeddings-*/chunk-*.npy"))

    # The data module trains on clean.csv directly: removed rows are left out.
    from datamodules.landmark_datamodule import LandmarkDataModule

    dm = LandmarkDataModule(data_dir=str(tiny_world), db_manifest=str(out / "clean.csv"), image_size=64)
    assert len(dm.db) == int(clean["decision"].eq("keep").sum())
    assert set(dm.class_map.landmark_ids) == set(clean.loc[clean["decision"] == "keep", "landmark_id"])


def test_clean_command_with_precomputed_embeddings_and_bad_inputs(tiny_world, tmp_path, capsys):
    from cleaning.command import clean_manifest
    from cli.main import main

    db = read_manifest(tiny_world / "db.csv")
    rng = np.random.default_rng(8)
    codes = {lid: i for i, lid in enumerate(sorted(set(db.landmark_ids)))}
    emb = np.stack([_blob(_axis(codes[lid] % D), 1, rng)[0] for lid in db.landmark_ids]).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    # Rows listed in another order than the manifest, through --embedding-paths.
    order = rng.permutation(len(db))
    np.save(tmp_path / "shuffled.npy", emb[order])
    write_manifest(pd.DataFrame({"path": [db.paths[i] for i in order]}), tmp_path / "paths.csv")
    straight = clean_manifest(tiny_world / "db.csv", tmp_path / "a", embeddings=str(tmp_path / "emb.npy"),
                              report=False, progress=False)
    shuffled = clean_manifest(tiny_world / "db.csv", tmp_path / "b", embeddings=str(tmp_path / "shuffled.npy"),
                              embedding_paths=str(tmp_path / "paths.csv"), report=False, progress=False)
    np.testing.assert_array_equal(straight.keep, shuffled.keep)
    assert straight.keep.all()  # one tight blob per landmark id; the duplicate id has its own axis
    assert (tmp_path / "a" / "summary.json").is_file() and not (tmp_path / "a" / "report.html").exists()

    def fails(*extra: str) -> str:
        assert main(["clean", "--manifest", str(tiny_world / "db.csv"), "--out", str(tmp_path / "bad"),
                     "--no-progress", *extra]) == 2
        return capsys.readouterr().err

    # Unknown paths: a manifest image the embeddings do not cover.
    write_manifest(pd.DataFrame({"path": [db.paths[i] for i in order[1:]]}), tmp_path / "short.csv")
    np.save(tmp_path / "short.npy", emb[order[1:]])
    err = fails("--embeddings", str(tmp_path / "short.npy"), "--embedding-paths", str(tmp_path / "short.csv"))
    missing = int(order[0])
    assert f"line {missing + 2}: {db.table['path'].iloc[missing]!r} has no embedding" in err
    assert "1 of 48 manifest paths are unknown" in err
    # Row count mismatch without a paths file.
    assert "has 47 rows but" in fails("--embeddings", str(tmp_path / "short.npy"))
    # NaN embeddings: the error names the manifest line and file.
    broken = emb.copy()
    broken[5, 0] = np.nan
    np.save(tmp_path / "nan.npy", broken)
    err = fails("--embeddings", str(tmp_path / "nan.npy"))
    assert "db.csv: line 7" in err and db.table["path"].iloc[5].split("/")[-1] in err and "NaN" in err
    # An empty class (a row without a landmark id) is a manifest error naming its line.
    table = db.table.copy()
    table.loc[3, "landmark_id"] = ""
    write_manifest(table, tmp_path / "empty_id.csv")
    err = main(["clean", "--manifest", str(tmp_path / "empty_id.csv"), "--out", str(tmp_path / "bad"),
                "--embeddings", str(tmp_path / "emb.npy")])
    assert err == 2 and "line 5: empty 'landmark_id'" in capsys.readouterr().err
    # A cleaned manifest is not cleaned again (its decisions would be mixed with the new ones).
    err = main(["clean", "--manifest", str(tmp_path / "a" / "clean.csv"), "--out", str(tmp_path / "bad"),
                "--embeddings", str(tmp_path / "emb.npy")])
    assert err == 2 and "already has the cleaning column(s) ['decision', 'reason'" in capsys.readouterr().err


def test_blas_condensed_distances_equal_scipy():
    from scipy.spatial.distance import pdist

    from retrieval.clustering import condensed_cosine_distances

    x = np.random.default_rng(11).standard_normal((37, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for block in (5, 36, 256):  # blocks that do and do not divide the rows
        np.testing.assert_allclose(condensed_cosine_distances(x, block_rows=block), pdist(x, "cosine"), atol=1e-12)


def test_tune_picks_on_one_half_and_scores_the_other(tmp_path, capsys):
    from cli.main import main

    rng = np.random.default_rng(12)
    blocks, ids, noise = [], [], []
    for k in range(6):  # 6 landmarks of 8 images on their own axis + 1 stray each (the noise)
        blocks += [_blob(_axis(k), 8, rng), _blob(_axis(8 + k), 1, rng)]
        ids += [f"L{k}"] * 9
        noise += ["0"] * 8 + ["1"]
    np.save(tmp_path / "emb.npy", np.concatenate(blocks).astype(np.float32))
    write_manifest(pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(ids))], "landmark_id": ids,
                                 "is_noise": noise, "true_landmark_id": ["" if n == "1" else i for n, i in zip(noise, ids)]}),
                   tmp_path / "db.csv")
    # min_cluster_size 10 drops every landmark (precision 6/54), 3 removes exactly the strays.
    code = main(["clean-tune", "--manifest", str(tmp_path / "db.csv"), "--embeddings", str(tmp_path / "emb.npy"),
                 "--grid", '{"min_cluster_size": [10, 3]}', "--out", str(tmp_path / "tune.json")])
    assert code == 0
    out = json.loads((tmp_path / "tune.json").read_text())
    assert [h["params"] for h in out["held_out"]] == [{"min_cluster_size": 3}] * 2
    assert out["held_out_pooled"] == {"precision": 1.0, "recall": 1.0}
    assert out["whole_database"]["removal"]["precision"] == 1.0 and out["chosen"] == {"min_cluster_size": 3}
    assert sum(sum(f[:2]) for f in out["combinations"][0]["per_fold_tp_fp_fn"]) == 54  # everything removed
    assert "| all (pooled) | | **1.000** | **1.000** |" in capsys.readouterr().out


def test_separability_command_scores_each_model_and_plots_a_clean_run(tmp_path, capsys, monkeypatch):
    """`landmarks clean-separability`: per model, the precision at the required recall; a
    `landmarks clean` decision file becomes an operating point. Embeddings are stubbed per model:
    "good" puts the strays on other axes (perfectly separable), "bad" leaves them in their class."""
    from cleaning import separability
    from cli.main import main

    rng = np.random.default_rng(13)
    ids, noise, good, bad = [], [], [], []
    for k in range(4):  # 4 landmarks of 6 images + 1 stray each
        ids += [f"L{k}"] * 7
        noise += ["0"] * 6 + ["1"]
        good += [_blob(_axis(k), 6, rng), _blob(_axis(8 + k), 1, rng)]
        bad += [_blob(_axis(k), 7, rng)]
    write_manifest(pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(ids))], "landmark_id": ids,
                                 "is_noise": noise, "true_landmark_id": ["" if n == "1" else i for n, i in zip(noise, ids)]}),
                   tmp_path / "db.csv")
    write_manifest(pd.DataFrame({"path": ["p0.jpg", "p1.jpg"]}), tmp_path / "pool.csv")
    pool = _blob(_axis(15), 2, rng)
    stub = {"good.ckpt": np.concatenate(good), "bad.ckpt": np.concatenate(bad)}
    monkeypatch.setattr(separability, "_embed", lambda manifest, pool_, name, checkpoint, cache_dir:
                        (stub[checkpoint], pool))
    decided = pd.read_csv(tmp_path / "db.csv", dtype=str).assign(decision=["keep"] * 6 + ["remove"] + ["keep"] * 21)
    write_manifest(decided, tmp_path / "clean.csv")
    capsys.readouterr()
    assert main(["clean-separability", "--manifest", str(tmp_path / "db.csv"), "--nonlandmarks",
                 str(tmp_path / "pool.csv"), "--model", "good=good.ckpt", "--model", "bad=bad.ckpt",
                 "--decisions", f"run={tmp_path / 'clean.csv'}", "--out", str(tmp_path / "sep")]) == 0
    out = capsys.readouterr().out
    assert "good: precision 1.0 at recall >= 0.9, best F1 1.0" in out
    result = json.loads((tmp_path / "sep" / "separability.json").read_text())
    assert result["models"]["bad"]["precision_at_recall_0.9"] < 1.0
    assert result["decisions"] == {"run": {"precision": 1.0, "recall": 0.25}}
    assert (tmp_path / "sep" / "separability.png").is_file()
    assert main(["clean-separability", "--manifest", str(tmp_path / "db.csv"), "--nonlandmarks",
                 str(tmp_path / "pool.csv"), "--model", "good.ckpt", "--out", str(tmp_path / "sep")]) == 2
    assert capsys.readouterr().err == "landmarks clean-separability: error: --model wants NAME=CHECKPOINT, got 'good.ckpt'\n"


def test_evidence_rule_removes_images_with_neighbours_elsewhere_and_keeps_a_rare_angle():
    """image_rule="evidence": a mislabelled photo of B (inside B's images) and a non-landmark photo
    labelled A are removed; a lone rare-angle photo of A, near nothing else, is kept — the cluster
    rule removes it as a small cluster; C and its duplicate D keep all their images."""
    rng = np.random.default_rng(5)
    emb, ids = _world(rng)  # A: axes 0 (9) + 1 (6) + a lone image on axis 2; B: axis 3; C, D: axis 4
    wrong = _blob(_axis(3), 1, rng)  # a photo of B labelled A
    no_landmark = _blob(_axis(5), 1, rng)  # labelled A, next to the non-landmark pool
    emb = np.concatenate([emb, wrong, no_landmark]).astype(np.float32)
    ids = ids + ["A", "A"]
    pool = _blob(_axis(5), 4, rng).astype(np.float32)
    lone, wrong_row, nl_row = ids.index("B") - 1, len(ids) - 2, len(ids) - 1
    params = _absolute(image_rule="evidence", evidence_k=3, evidence_threshold=0.3, duplicates="flag")
    result = clean_embeddings(emb, ids, params, nonlandmark_embeddings=pool)
    removed = set(np.flatnonzero(~result.keep).tolist())
    assert removed == {wrong_row, nl_row}
    assert result.reason_code[wrong_row] == result.reason_code[nl_row] == "neighbour_evidence"
    assert "first B" in result.reason[wrong_row] and "non-landmark image" in result.reason[nl_row]
    # The evidence, by hand: mean of the 3 nearest B images - mean of its 3 nearest A images.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = unit @ unit[wrong_row]
    rows_a = [r for r in np.flatnonzero(np.asarray(ids) == "A") if r != wrong_row]
    expected = np.sort(sims[np.asarray(ids) == "B"])[-3:].mean() - np.sort(sims[rows_a])[-3:].mean()
    assert result.reason[wrong_row].startswith(f"neighbour_evidence: {expected:.3f} >= 0.3")
    assert result.other_similarity[wrong_row] == pytest.approx(np.sort(sims[np.asarray(ids) == "B"])[-3:].mean(), abs=1e-5)
    # The lone image of A is orthogonal to everything: no evidence either way, kept (cluster -1) ...
    assert result.keep[lone] and result.cluster[lone] == -1
    # ... while the paper's cluster rule removes it as a small cluster.
    clusters_rule = clean_embeddings(emb, ids, _absolute(duplicates="flag"), nonlandmark_embeddings=pool)
    assert not clusters_rule.keep[lone] and clusters_rule.reason_code[lone] == "small_cluster"
    # C and D are one structure: each is the other's nearest images, which is no evidence (one group).
    assert result.keep[np.isin(ids, ["C", "D"])].all() and [g["members"] for g in result.duplicate_groups] == [["C", "D"]]
    # A higher threshold keeps everything; bad values are refused.
    assert clean_embeddings(emb, ids, _absolute(image_rule="evidence", evidence_threshold=2.0),
                            nonlandmark_embeddings=pool).keep.all()
    with pytest.raises(ValueError, match="evidence_k <= evidence_search"):
        _absolute(image_rule="evidence", evidence_k=5, evidence_search=4)
    with pytest.raises(ValueError, match="image_rule"):
        _absolute(image_rule="knn")


def test_evidence_rule_with_few_images_retrieved_never_understates_the_evidence():
    """With evidence_search smaller than a class, other landmarks' images may not be retrieved at
    all; they then count as similar as the last image retrieved (an upper bound)."""
    rng = np.random.default_rng(6)
    a = _blob(_rotated(0), 12, rng, spread=0.01)
    b = _blob(_rotated(60), 12, rng, spread=0.01)
    emb = np.concatenate([a, b]).astype(np.float32)
    ids = ["A"] * 12 + ["B"] * 12
    exact = clean_embeddings(emb, ids, _absolute(image_rule="evidence", evidence_search=64, evidence_threshold=2.0))
    bounded = clean_embeddings(emb, ids, _absolute(image_rule="evidence", evidence_search=4, evidence_threshold=2.0))
    # Exact: B's images are 60° away from A's (similarity ~0.5); bounded: only A's images were
    # retrieved for an image of A, so "other" is the lowest similarity retrieved (~1), never lower.
    assert np.all(exact.other_similarity[:12] < 0.6)
    assert np.all(bounded.other_similarity[:12] >= exact.other_similarity[:12])
    assert np.all(bounded.other_similarity[:12] > 0.99)


def test_evidence_rule_does_not_count_a_merged_duplicate_as_evidence():
    """A is B photographed again under another id: A's 5 images lie 25° around B's axis in
    different directions (far from each other, close to B). Their nearest images are B's, which
    is no evidence against them once A and B are one duplicate group."""
    rng = np.random.default_rng(7)
    b = _blob(_axis(4), 20, rng, spread=0.005)
    t = np.deg2rad(25)
    a = np.stack([np.cos(t) * _axis(4) + np.sin(t) * _axis(6 + i) for i in range(5)])
    c = _blob(_axis(0), 10, rng, spread=0.01)
    emb = np.concatenate([a, b, c]).astype(np.float32)
    ids = ["A"] * 5 + ["B"] * 20 + ["C"] * 10
    params = _absolute(image_rule="evidence", evidence_search=4, evidence_threshold=0.05)
    result = clean_embeddings(emb, ids, params)
    assert [g["members"] for g in result.duplicate_groups] == [["A", "B"]]
    assert result.keep.all(), result.reason[~result.keep]
    # Without the duplicate group, B's images ARE evidence against A's (they are another landmark).
    apart = clean_embeddings(emb, ids, replace(params, duplicate_distance=0.0))
    assert apart.duplicate_groups == [] and not apart.keep[:5].any()
    assert all(r.startswith("neighbour_evidence") and "first B" in r for r in apart.reason[:5])


def test_evidence_rule_ignores_faiss_padding_of_an_approximate_index():
    """IVF probes few lists and pads missing neighbours with id -1 and score -FLT_MAX: those must
    not enter the evidence (they would make every image look unlike other landmarks)."""
    rng = np.random.default_rng(8)
    blocks, ids = [], []
    for j in range(2):
        blocks.append(_blob(_axis(j), 1200, rng, spread=0.02))
        ids += [f"L{j}"] * 1200
    emb = np.concatenate(blocks).astype(np.float32)
    # 1,000 neighbours asked of an IVF index whose 16 probed lists (all in the image's own
    # landmark) hold fewer vectors: padding, and no other landmark among the hits.
    params = _absolute(image_rule="evidence", evidence_search=1000, evidence_threshold=0.5)
    exact = clean_embeddings(emb, ids, replace(params, index="flat"))
    approx = clean_embeddings(emb, ids, replace(params, index="ivf"))
    for result in (exact, approx):
        assert np.all(np.isfinite(result.other_similarity)) and np.all(result.other_similarity >= -1.0 - 1e-6)
        assert result.keep.all()



def test_tune_ratios_follow_the_one_empty_ratio_rule():
    import math

    from cleaning.tune import _pr

    # Nothing removed, 3 noise rows: precision undefined (NaN, not a made-up 1.0), recall 0.
    p, r = _pr(0, 0, 3)
    assert math.isnan(p) and r == 0.0
    # No noise rows, 2 wrongly removed: precision 0, recall undefined.
    p, r = _pr(0, 2, 0)
    assert p == 0.0 and math.isnan(r)
    assert _pr(3, 1, 1) == (0.75, 0.75)


# ---- never destroy a database: no chained merges, scale-free defaults, a floor on the model ------


def test_duplicate_merges_do_not_chain():
    """A~B and B~C pass the duplicate test, A and C do not: B joins the closer one, C stays apart."""
    rng = np.random.default_rng(3)
    a, b, c = _rotated(0, 5, 6), _rotated(12, 5, 6), _rotated(26, 5, 6)  # cos(12°)≈0.978, cos(14°)≈0.970, cos(26°)≈0.899
    emb = np.concatenate([_blob(v, 10, rng, spread=0.002) for v in (a, b, c)]
                         + [_blob(_axis(i), 10, rng) for i in (0, 1, 2)]).astype(np.float32)
    ids = [x for x in "ABC" for _ in range(10)] + [x for x in "XYZ" for _ in range(10)]
    result = clean_embeddings(emb, ids, _absolute(duplicate_distance=0.035))
    assert [g["members"] for g in result.duplicate_groups] == [["A", "B"]]
    pairs = {tuple(p["landmarks"]): p for p in result.duplicate_pairs}
    assert pairs[("B", "C")]["duplicate"] and not pairs[("B", "C")]["merged"]  # passed, refused as a chain link
    assert pairs[("A", "B")]["merged"] and ("A", "C") not in pairs
    assert set(result.landmark_id[np.asarray(ids) == "C"]) == {"C"}
    # Three landmarks that are pairwise duplicates do form one group.
    tight = clean_embeddings(emb, ids, _absolute(duplicate_distance=0.2))
    assert [g["members"] for g in tight.duplicate_groups] == [["A", "B", "C"]]


def _compress(emb: np.ndarray, common: np.ndarray, weight: float) -> np.ndarray:
    """Distances squeezed the way ImageNet features are: every photo leans on one shared direction."""
    x = weight * common[None, :] + emb
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_relative_units_clean_a_compressed_embedding_like_the_original():
    emb, ids = _world(np.random.default_rng(0))
    squeezed = _compress(emb, np.full(D, 1.0 / np.sqrt(D)), 2.0)
    reference = clean_embeddings(emb, ids, CleaningParams(duplicates="flag"))
    relative = clean_embeddings(squeezed, ids, CleaningParams(duplicates="flag"))
    assert reference.scale == pytest.approx(1.0, abs=0.1) and relative.scale < 0.3
    np.testing.assert_array_equal(relative.keep, reference.keep)
    assert [g["members"] for g in relative.duplicate_groups] == [["C", "D"]]
    # The same defaults read as cosine distances see one blur: A's two angles and its stray
    # become one cluster, and the stray that the original cleaning removes is kept.
    assert not reference.keep.all()
    absolute = clean_embeddings(squeezed, ids, _absolute(duplicates="flag"))
    assert absolute.keep.all() and absolute.landmarks["A"]["valid_clusters"] == 1
    assert relative.params.distance_threshold == pytest.approx(0.4 * relative.scale)
    assert relative.asked_params.units == "relative"


def test_a_model_too_weak_to_clean_with_removes_nothing_unless_forced():
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((120, D)).astype(np.float32)  # no landmark structure at all
    ids = [str(i % 6) for i in range(120)]
    result = clean_embeddings(emb, ids, CleaningParams())
    assert result.separability["weak"] and result.separability["label_agreement"] < 0.6
    assert not result.applied and result.keep.all() and (result.reason == "").all()
    assert list(result.landmark_id) == ids and result.duplicate_groups == []
    assert result.proposed is not None and not result.proposed.keep.all()
    forced = clean_embeddings(emb, ids, CleaningParams(), force=True)
    assert forced.applied and np.array_equal(forced.keep, result.proposed.keep)
    # A separable embedding passes the floor.
    good, good_ids = _world(np.random.default_rng(0))
    assert clean_embeddings(good, good_ids, CleaningParams()).applied


def test_clean_command_reports_a_weak_model_and_force_applies_it(tiny_world, tmp_path, capsys):
    from cli.main import main

    db = read_manifest(tiny_world / "db.csv")
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal((len(db), D)).astype(np.float32))
    args = ["clean", "--manifest", str(tiny_world / "db.csv"), "--embeddings", str(tmp_path / "noise.npy"),
            "--no-report", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "weak")]) == 0
    out = capsys.readouterr().out
    assert "too weak to clean with" in out and "--force" in out
    summary = json.loads((tmp_path / "weak" / "summary.json").read_text())
    assert summary["applied"] is False and summary["counts"]["removed"] == 0 and "proposed" in summary
    assert pd.read_csv(tmp_path / "weak" / "clean.csv")["decision"].eq("keep").all()
    assert main([*args, "--out", str(tmp_path / "forced"), "--force"]) == 0
    assert json.loads((tmp_path / "forced" / "summary.json").read_text())["applied"] is True


def test_label_agreement_by_hand_and_its_sample_past_the_exact_budget(monkeypatch):
    import cleaning.algorithm as algorithm

    # Landmark 0 at (1, 0) ± a little, landmark 1 at (0, 1); row 5 is labelled 0 but sits with 1.
    emb = np.array([[1, 0.01], [1, -0.01], [1, 0.02], [0.01, 1], [-0.01, 1], [0.02, 1]], dtype=np.float32)
    codes = np.array([0, 0, 0, 1, 1, 0])
    valid = np.ones(6, dtype=bool)
    # Rows 0-2 agree; row 5 disagrees with its nearest (a 1), and so does the 1 whose nearest is 5.
    sims = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    np.fill_diagonal(sims, -np.inf)
    by_hand = float(np.mean(codes[sims.argmax(1)] == codes))
    assert by_hand == pytest.approx(4 / 6)
    assert algorithm.label_agreement(emb, codes, valid, CleaningParams()) == pytest.approx(by_hand)
    # Past the budget of queries × DB products the sample shrinks to the floor, seeded.
    monkeypatch.setattr(algorithm, "_AGREEMENT_PRODUCTS", 1)
    monkeypatch.setattr(algorithm, "_AGREEMENT_MIN_QUERIES", 3)
    sampled = algorithm.label_agreement(emb, codes, valid, CleaningParams(), seed=1)
    assert sampled * 3 == pytest.approx(round(sampled * 3))  # a share of 3 queries
    assert sampled == algorithm.label_agreement(emb, codes, valid, CleaningParams(), seed=1)


# ---- inputs that must not pass for something else (review of the cleaning commands) --------------


def _small_db(tmp_path: Path, ids: list[str], name: str = "db.csv", **columns) -> Path:
    """A manifest of ``ids`` with made-up paths (precomputed embeddings need no images)."""
    path = tmp_path / name
    paths = columns.pop("paths", [f"{i}.jpg" for i in range(len(ids))])
    write_manifest(pd.DataFrame({"path": paths, "landmark_id": ids, **columns}), path)
    return path


def test_repeated_rows_are_removed_and_do_not_pass_a_weak_model(tmp_path, capsys):
    """300 copies of one row agree with each other: counted, they lifted random embeddings past the
    weak-model floor and the run removed most real rows. They are removed as repeated_row, and the
    guard sees what it sees on the rows without them."""
    from cli.main import main

    rng = np.random.default_rng(21)
    ids = [f"L{i % 6}" for i in range(48)]
    emb = rng.standard_normal((48, D)).astype(np.float32)  # a weak model: no landmark structure
    _small_db(tmp_path, ids, "plain.csv")
    np.save(tmp_path / "plain.npy", emb)
    _small_db(tmp_path, ids + [ids[0]] * 300, "repeated.csv",
              paths=[f"{i}.jpg" for i in range(48)] + ["0.jpg"] * 300)
    np.save(tmp_path / "repeated.npy", np.concatenate([emb, np.repeat(emb[:1], 300, axis=0)]))
    for name in ("plain", "repeated"):
        assert main(["clean", "--manifest", str(tmp_path / f"{name}.csv"), "--embeddings",
                     str(tmp_path / f"{name}.npy"), "--out", str(tmp_path / f"out_{name}"), "--no-report",
                     "--no-progress"]) == 0
    assert "too weak to clean with" in capsys.readouterr().out
    plain_summary = json.loads((tmp_path / "out_plain" / "summary.json").read_text())
    summary = json.loads((tmp_path / "out_repeated" / "summary.json").read_text())
    assert summary["separability"] == plain_summary["separability"] and summary["applied"] is False
    table = pd.read_csv(tmp_path / "out_repeated" / "clean.csv", dtype=str, keep_default_na=False)
    assert len(table) == 348  # one row per input row
    assert table["decision"].iloc[:48].eq("keep").all()
    assert table["decision"].iloc[48:].eq("remove").all()
    assert table["reason"].iloc[48:].str.startswith("repeated_row: ").all()
    assert summary["counts"]["removed_by_reason"] == {"repeated_row": 300}


def test_a_db_of_one_photo_per_landmark_is_not_emptied(tmp_path, capsys):
    """No landmark has two photos: the label agreement is undefined, which is no evidence of a
    model that separates landmarks (every row used to be removed, exit 0)."""
    from cli.main import main

    db = _small_db(tmp_path, [f"L{i}" for i in range(8)])
    np.save(tmp_path / "emb.npy", np.eye(D, dtype=np.float32)[:8])
    assert main(["clean", "--manifest", str(db), "--embeddings", str(tmp_path / "emb.npy"), "--out",
                 str(tmp_path / "out"), "--no-report", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "too weak to clean with: its label agreement cannot be measured: no landmark has two readable photos" in out
    assert "8 of 8 rows kept" in out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["applied"] is False and summary["separability"]["label_agreement"] is None


def _truth_db(tmp_path: Path, truth: list[str] | None = None, noise: list[str] | None = None,
              ids: list[str] | None = None) -> tuple[Path, Path]:
    """6 landmarks of 8 images on their own axis + 1 stray each (the noise), and their embeddings."""
    rng = np.random.default_rng(12)
    blocks, default_ids, default_noise = [], [], []
    for k in range(6):
        blocks += [_blob(_axis(k), 8, rng), _blob(_axis(8 + k), 1, rng)]
        default_ids += [f"{1010 + k}"] * 9
        default_noise += ["0"] * 8 + ["1"]
    ids = ids or default_ids
    noise = noise or default_noise
    truth = truth or ["" if n == "1" else i for n, i in zip(noise, ids)]
    np.save(tmp_path / "emb.npy", np.concatenate(blocks).astype(np.float32))
    return _small_db(tmp_path, ids, is_noise=noise, true_landmark_id=truth), tmp_path / "emb.npy"


def test_a_ground_truth_resaved_through_a_float_column_is_refused(tmp_path, capsys):
    """pandas writes a true_landmark_id column with empty cells back as floats ('1010.0'): scored as
    text, every true duplicate pair looked missed. Refused where the truth is read, naming the line."""
    from cli.main import main

    db, emb = _truth_db(tmp_path)
    pd.read_csv(db).to_csv(tmp_path / "resaved.csv", index=False)
    expected = (f"{tmp_path / 'resaved.csv'}: line 2: column true_landmark_id: '1010.0' names no landmark_id but "
                "'1010' does; the file looks re-saved through a float column")
    assert main(["clean", "--manifest", str(tmp_path / "resaved.csv"), "--embeddings", str(emb), "--out",
                 str(tmp_path / "out"), "--no-report", "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"landmarks clean: error: {expected}")
    assert main(["clean-tune", "--manifest", str(tmp_path / "resaved.csv"), "--embeddings", str(emb)]) == 2
    assert capsys.readouterr().err.startswith(f"landmarks clean-tune: error: {expected}")
    # The file as written (ids as text) is scored.
    assert main(["clean", "--manifest", str(db), "--embeddings", str(emb), "--out", str(tmp_path / "out"),
                 "--no-report", "--no-progress"]) == 0


@pytest.mark.parametrize("case, expected", [
    ("one_landmark", "relative units (the default) need the embedding's scale, measured on readable images of two "
                     "landmarks; give absolute parameters (--grid '{\"units\": [\"absolute\"], ...}')"),
    ("is_noise_yes", "db.csv: line 2: column is_noise: 'yes' is not 0/1 (or true/false)"),
    ("no_noise", "db.csv: every row has is_noise 0: no noisy rows; tuning needs both"),
    ("all_noise", "db.csv: every row has is_noise 1: no clean rows; tuning needs both"),
    ("header_only", "db.csv: no rows; tuning needs noisy and clean rows"),  # was an IndexError traceback
    ('{"distance_threshold": [-1]}', "--grid: distance_threshold: -1: invalid cleaning parameters: "
                                     "distance_threshold must be in [0, inf], got -1"),
    ('{"linkage": ["nope"]}', "--grid: linkage: 'nope': invalid cleaning parameters: unknown linkage 'nope'"),
    ('{"distance_threshold": ["x"]}', "--grid: distance_threshold: 'x' is not a float"),
    ('{"attach_distance": [true]}', "--grid: attach_distance: True is not a float or null"),
    ("{}", "--grid: empty; give {param: [values]}"),
    ("out_folder", "is a folder; give the JSON file to write"),
    ("text_embeddings", "emb.npy: not a .npy array file (save one with numpy.save)"),  # was a pickle traceback
    ("flat_embeddings", "emb.npy: expected a 2-D float array [rows, dim], got float64 (54,)"),
])
def test_clean_tune_refuses_bad_inputs_in_one_line(tmp_path, capsys, monkeypatch, case, expected):
    from cleaning import tune
    from cli.main import main

    db, emb = _truth_db(tmp_path, ids=["1010"] * 54 if case == "one_landmark" else None,
                        noise={"is_noise_yes": ["yes"] + ["0"] * 53, "no_noise": ["0"] * 54,
                               "all_noise": ["1"] * 54}.get(case))
    args = ["clean-tune", "--manifest", str(db), "--embeddings", str(emb)]
    if case.startswith("{"):
        args += ["--grid", case]
        # Refused before any combination runs.
        monkeypatch.setattr(tune, "_fold_scores", lambda *a, **k: pytest.fail("tuned with a bad grid"))
    elif case == "out_folder":
        args += ["--out", str(tmp_path), "--grid", '{"min_cluster_size": [3]}']
        monkeypatch.setattr(tune, "_fold_scores", lambda *a, **k: pytest.fail("tuned before checking --out"))
    else:
        args += ["--grid", '{"min_cluster_size": [3]}']
    if case == "text_embeddings":
        emb.write_text("0.1,0.2\n")
    elif case == "flat_embeddings":
        np.save(emb, np.zeros(54))
    if case == "header_only":
        db.write_text(db.read_text().splitlines()[0] + "\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("landmarks clean-tune: error: ") and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("noise, expected", [
    (["0"] * 8, "every row has is_noise 0: no noisy rows; this analysis needs both"),
    (["1"] * 8, "every row has is_noise 1: no clean rows; this analysis needs both"),
    (["yes"] + ["0"] * 7, "line 2: column is_noise: 'yes' is not 0/1 (or true/false)"),
])
def test_clean_separability_refuses_a_ground_truth_it_cannot_score_before_embedding(tmp_path, capsys, monkeypatch,
                                                                                   noise, expected):
    from cleaning import separability
    from cli.main import main

    db = _small_db(tmp_path, [f"L{i % 2}" for i in range(8)], is_noise=noise)
    write_manifest(pd.DataFrame({"path": ["p0.jpg"]}), tmp_path / "pool.csv")
    monkeypatch.setattr(separability, "_embed", lambda *a: pytest.fail("embedded before checking the truth"))
    assert main(["clean-separability", "--manifest", str(db), "--nonlandmarks", str(tmp_path / "pool.csv"),
                 "--model", "m=m.ckpt", "--out", str(tmp_path / "sep")]) == 2
    assert capsys.readouterr().err == f"landmarks clean-separability: error: {db}: {expected}\n"


def test_a_rerun_without_report_removes_the_previous_report(tmp_path):
    """A report.html and thumbs/ left from an earlier run would contradict this run's clean.csv;
    a page and pictures that clean did not write stay."""
    from cleaning.command import clean_manifest
    from cleaning.report import REPORT_MARK

    db, emb = _truth_db(tmp_path)
    out = tmp_path / "out"
    (out / "thumbs").mkdir(parents=True)
    (out / "thumbs" / "0123456789abcdef0123.jpg").write_bytes(b"old")
    (out / "report.html").write_text(f"<head>{REPORT_MARK}</head> old run")
    (out / "notes.txt").write_text("the user's")
    clean_manifest(db, out, embeddings=str(emb), report=False, progress=False)
    assert not (out / "report.html").exists() and not (out / "thumbs").exists()
    assert (out / "notes.txt").read_text() == "the user's"
    assert json.loads((out / "summary.json").read_text())["outputs"]["report"] is None
    # Someone else's page and pictures (an albums page, say) are never removed.
    (out / "thumbs").mkdir()
    (out / "thumbs" / "holiday.jpg").write_bytes(b"mine")
    (out / "report.html").write_text("<html>the user's page</html>")
    clean_manifest(db, out, embeddings=str(emb), report=False, progress=False)
    assert (out / "report.html").read_text() == "<html>the user's page</html>"
    assert (out / "thumbs" / "holiday.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize("case, expected", [
    ("huge", "0.jpg): --embeddings {npy}: row 0 has a norm of 1e+30, too large to normalise in float32"),
    ("zero", "--embeddings {npy}: no readable rows: every row is all-zero (no embedding) or unreadable"),
    ("no_columns", "--embeddings {npy}: expected a 2-D float array [rows, dim], got float32 (54, 0)"),
    ("text", "--embeddings {npy}: not a .npy array file (save one with numpy.save)"),
])
def test_clean_names_the_embeddings_file_in_what_is_wrong_with_it(tmp_path, capsys, case, expected):
    from cli.main import main

    db, emb = _truth_db(tmp_path)
    npy = tmp_path / f"{case}.npy"
    if case == "huge":  # float32 squares overflow: the rows used to normalise to zero ("gallery ... norm 0")
        np.save(npy, np.load(emb) * np.float32(1e30))
    elif case == "zero":
        np.save(npy, np.zeros((54, D), dtype=np.float32))
    elif case == "no_columns":
        np.save(npy, np.zeros((54, 0), dtype=np.float32))
    else:
        npy.write_text("path,x\n0.jpg,1\n")
    assert main(["clean", "--manifest", str(db), "--embeddings", str(npy), "--out", str(tmp_path / "out"),
                 "--no-report", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("landmarks clean: error: ") and expected.format(npy=npy) in err and err.count("\n") == 1
    assert "gallery" not in err and "pickle" not in err


def test_clean_tune_cleans_what_clean_cleans_repeated_rows_left_out(tmp_path, monkeypatch):
    """clean-tune called the cleaning without the repeated-row mask, so it tuned on another input
    than `landmarks clean` cleans (the repeats counted in the agreement)."""
    from cleaning import tune

    db, emb = _truth_db(tmp_path)
    lines = db.read_text().splitlines()
    db.write_text("\n".join(lines + [lines[1], lines[1]]) + "\n")  # the first photo listed twice more
    vectors = np.load(emb)
    np.save(emb, np.concatenate([vectors, vectors[:1], vectors[:1]]))
    seen = []
    real = tune.clean_embeddings

    def spy(*args, repeated=None, **kwargs):
        seen.append(None if repeated is None else np.flatnonzero(repeated).tolist())
        return real(*args, repeated=repeated, **kwargs)

    monkeypatch.setattr(tune, "clean_embeddings", spy)
    tune.tune_cleaning(db, embeddings=emb, grid={"min_cluster_size": [3]}, cache_dir=None, progress=False)
    n = len(vectors)
    assert seen and all(rows == [n, n + 1] for rows in seen)  # every combination and the final run
