"""Spatial verification: inliers of a warped copy, the minimum-keypoint policy, the re-scoring
arithmetic, which photos are stored, the artifact round trip, and calibration on verified scores."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from cli.main import main
from recognition.artifact import IndexFormatError, LandmarkIndex
from recognition.calibration import calibrate_threshold
from recognition.recognizer import Recognizer
from recognition.verification import (
    LocalFeatures,
    VerificationParams,
    choose_photos,
    count_inliers,
    extract,
    inlier_bonus,
    make_extractor,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BACKGROUND = (235, 235, 235)


def _texture(seed: int, w: int = 480, h: int = 360) -> np.ndarray:
    """A photo-sized scene of random shapes: plenty of SIFT keypoints, different for every seed."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), BACKGROUND[0], np.uint8)
    for _ in range(150):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y, kind = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(3))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 60)), y + int(rng.integers(5, 60))), colour, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), int(rng.integers(3, 30)), colour, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), colour, int(rng.integers(1, 4)))
    return img


def _warp(img: np.ndarray, seed: int, amount: float = 0.08) -> np.ndarray:
    """The same scene from another viewpoint (a random homography)."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = (src + rng.uniform(-amount, amount, (4, 2)) * [w, h]).astype(np.float32)
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderValue=BACKGROUND)


def _save(img: np.ndarray, path) -> str:
    cv2.imwrite(str(path), np.ascontiguousarray(img[:, :, ::-1]))
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("verification")
    scenes = [_texture(seed) for seed in range(3)]
    return {
        "scene": [_save(s, root / f"scene{i}.jpg") for i, s in enumerate(scenes)],
        "view": [_save(_warp(s, 100 + i), root / f"view{i}.jpg") for i, s in enumerate(scenes)],
        "blank": _save(np.full((360, 480, 3), 200, np.uint8), root / "blank.jpg"),
    }


def test_a_warped_copy_has_many_inliers_and_another_scene_few(photos):
    p = VerificationParams()
    scene = [extract(path, p) for path in photos["scene"]]
    view = [extract(path, p) for path in photos["view"]]
    assert all(len(kp) >= 400 and desc.dtype == np.uint8 and desc.shape[1] == 128 for kp, desc in scene)
    same = [count_inliers(scene[i], view[i], p) for i in range(3)]
    other = [count_inliers(scene[i], view[j], p) for i in range(3) for j in range(3) if i != j]
    assert min(same) >= 100, same
    assert max(other) <= 30, other  # random shapes share some local structure, never a whole scene


def test_too_few_keypoints_leave_the_scores_unchanged(photos):
    p = VerificationParams()
    blank = extract(photos["blank"], p)
    assert len(blank[0]) < p.min_keypoints
    features = LocalFeatures.extract([photos["view"][0]], np.array([0]), p)
    scores = np.array([0.5, 0.4], np.float32)
    assert np.array_equal(features.rescore(blank, scores, np.array([0, 1])), scores)


def test_rescore_adds_weight_times_capped_inliers_to_the_verified_candidates_only(photos):
    p = VerificationParams(candidates=2, weight=0.002, inlier_cap=50, min_inliers=8)
    features = LocalFeatures.extract([photos["view"][0], photos["view"][1]], np.array([0, 1]), p)
    query = extract(photos["scene"][0], p)
    inliers = [count_inliers(query, features.photo(i), p) for i in range(2)]
    assert inliers[0] > 50  # so the cap applies
    scores, rows = np.array([0.5, 0.45, 0.4], np.float32), np.array([0, 1, 2])
    out = features.rescore(query, scores, rows)
    other = 0.002 * min(inliers[1], 50) if inliers[1] >= 8 else 0.0  # another scene: a few chance inliers
    expected = [0.5 + 0.002 * 50, 0.45 + other, 0.4]  # row 2: beyond the 2 candidates
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    one = LocalFeatures(features.keypoints, features.descriptors, features.offsets, features.landmark,
                        VerificationParams(candidates=1))
    assert one.rescore(query, scores, rows)[1] == scores[1]


def test_inlier_bonus_by_hand():
    p = VerificationParams(weight=0.002, inlier_cap=50, min_inliers=8)
    np.testing.assert_allclose(inlier_bonus(np.array([0, 7, 8, 30, 60]), p), [0, 0, 0.016, 0.06, 0.1], atol=1e-7)


def test_choose_photos_takes_the_nearest_to_each_vector_then_the_next_nearest():
    # Landmark 0: photos 0-3, vectors along x and y; landmark 1: photos 4-5, one vector.
    emb = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [1, 0], [0, 1]], np.float32)
    landmark = np.array([0, 0, 0, 0, 1, 1])
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float32)
    vector_landmark = np.array([0, 0, 1])
    # Landmark 0: nearest to x is photo 0, to y photo 2; next, photos 1 and 3 tie at 0.8 (stable
    # order: 1). Landmark 1: photo 5 (0.8) is nearest its vector, then photo 4 (0.6).
    assert choose_photos(emb, landmark, vectors, vector_landmark, 1).tolist() == [0, 5]
    assert choose_photos(emb, landmark, vectors, vector_landmark, 2).tolist() == [0, 2, 5, 4]
    assert choose_photos(emb, landmark, vectors, vector_landmark, 3).tolist() == [0, 2, 1, 5, 4]


def test_verified_top1_names_the_candidate_that_wins_after_verification(photos):
    """The calibration's (score, landmark) per photo: the best *rescored* candidate. The scene's
    global top-1 is row 1, but it matches row 0's view with > 50 inliers (the cap: +0.1), so row 0
    wins with 0.45 + 0.1."""
    p = VerificationParams(candidates=2, weight=0.002, inlier_cap=50, min_inliers=8)
    features = LocalFeatures.extract([photos["view"][0], photos["view"][1]], np.array([0, 1]), p)
    query = extract(photos["scene"][0], p)
    other = count_inliers(query, features.photo(1), p)
    bonus_of_row_1 = 0.002 * min(other, 50) if other >= 8 else 0.0
    assert 0.5 + bonus_of_row_1 < 0.55  # a few chance inliers with the other scene, as above
    scores, rows = np.array([[0.5, 0.45, 0.4]], np.float32), np.array([[1, 0, 2]])
    verified, matched = features.verified_top1([photos["scene"][0]], scores, rows)
    assert matched.tolist() == [0] and verified[0] == pytest.approx(0.55, abs=1e-6)


def _index_with_features(photos, p: VerificationParams | None = None):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 8)).astype(np.float32)
    index = LandmarkIndex.from_embeddings(emb / np.linalg.norm(emb, axis=1, keepdims=True), ["a", "a", "b", "b"],
                                          {"identity": {"embedding_size": 8}}, representation="mean")
    index.local_features = LocalFeatures.extract(photos["view"][:2], np.array([0, 1]), p or VerificationParams())
    return index


def test_local_features_round_trip_memory_mapped_and_checked(photos, tmp_path):
    index = _index_with_features(photos)
    out = index.save(tmp_path / "index")
    loaded = LandmarkIndex.load(out)
    lf, lf0 = loaded.local_features, index.local_features
    assert isinstance(lf.descriptors, np.memmap) and isinstance(lf.keypoints, np.memmap)
    for name in ("keypoints", "descriptors", "offsets", "landmark"):
        assert np.array_equal(getattr(lf, name), getattr(lf0, name))
    assert lf.params == lf0.params
    head = json.loads((out / "index.json").read_text())
    head["verification"]["n_keypoints"] += 1
    (out / "index.json").write_text(json.dumps(head))
    with pytest.raises(IndexFormatError, match="verification features: header says"):
        LandmarkIndex.load(out)
    head["verification"]["n_keypoints"] -= 1
    head["verification"]["format_version"] = 99
    (out / "index.json").write_text(json.dumps(head))
    with pytest.raises(IndexFormatError, match="version 99"):
        LandmarkIndex.load(out)
    head["verification"]["format_version"] = 1
    (out / "index.json").write_text(json.dumps(head))
    (out / "local_descriptors.npy").unlink()
    with pytest.raises(IndexFormatError, match="local_descriptors.npy"):
        LandmarkIndex.load(out)


def test_bad_parameters_are_named(tmp_path, capsys):
    with pytest.raises(Exception, match="ratio must lie in"):
        VerificationParams(ratio=1.5)
    code = main(["index", "--manifest", str(tmp_path / "db.csv"), "--out", str(tmp_path / "idx"),
                 "--backbone", "mobilenetv2_100", "--verify", "--verify-min-inliers", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("landmarks index: error: verification: min_keypoints and min_inliers must be >= 4 "
                                 "(a homography needs 4 points)")


def _scenes_to_index(tmp_path, landmarks: int, views: int) -> tuple[list[str], list[str], list[str]]:
    """Photos for `landmarks index`: ``views`` warped views of each landmark's scene (db.csv), 10
    other scenes (nl.csv, the calibration), and one more view per landmark as its query. Returns the
    calibration paths, the queries and the command's arguments without ``--out``."""
    rows = [{"path": _save(_warp(_texture(lm), 10 * lm + v), tmp_path / f"lm{lm}_{v}.jpg"), "landmark_id": f"L{lm}"}
            for lm in range(landmarks) for v in range(views)]
    calibration = [_save(_texture(50 + k), tmp_path / f"other{k}.jpg") for k in range(10)]
    queries = [_save(_warp(_texture(lm), 77 + lm), tmp_path / f"query{lm}.jpg") for lm in range(landmarks)]
    pd.DataFrame(rows).to_csv(tmp_path / "db.csv", index=False)
    pd.DataFrame({"path": calibration}).to_csv(tmp_path / "nl.csv", index=False)
    # One scale: the scenes' chance inlier counts below were checked against the photos that the
    # single-scale embedding stores (which photos are stored depends on the embedding).
    args = ["index", "--manifest", str(tmp_path / "db.csv"), "--backbone", "mobilenetv2_100", "--image-size", "64",
            "--scales", "1", "--nonlandmarks", str(tmp_path / "nl.csv"), "--target-fpr", "0.1", "--num-workers", "0",
            "--cache-dir", ""]
    return calibration, queries, args


def test_index_verify_calibrates_on_verified_scores_and_the_recognizer_applies_them(tmp_path, capsys):
    """Through `landmarks index --verify` and the Recognizer: 3 landmarks × 4 views, 10 other scenes."""
    paths, queries, args = _scenes_to_index(tmp_path, landmarks=3, views=4)
    out = tmp_path / "index"
    assert main(args + ["--out", str(out), "--verify", "--verify-photos", "2"]) == 0
    assert "verified:   6 photos stored" in capsys.readouterr().out
    index = LandmarkIndex.load(out)
    assert sorted(index.local_features.landmark.tolist()) == [0, 0, 1, 1, 2, 2]

    # The threshold is the calibration of the verified scores of the 10 other scenes.
    plain = LandmarkIndex.load(out)
    plain.local_features = None
    global_recognizer = Recognizer(plain, threshold=0.0)
    emb = np.concatenate([global_recognizer.embed_tensors(global_recognizer._load(p)[0][None]) for p in paths])
    scores, cand = index.search(emb, index.local_features.params.candidates)
    verified, matched = index.local_features.verified_top1(paths, scores, cand)
    # Up to float noise: the index embedded the photos in one batch, this test one at a time, and
    # the threshold is the next float above a calibration score (a 1-ulp difference moves it).
    assert index.calibration.threshold == pytest.approx(calibrate_threshold(verified, 0.1).threshold, abs=1e-6)
    # Other scenes reach a few chance inliers, below min_inliers (25): they gain nothing.
    assert np.array_equal(verified, scores.max(axis=1)) and np.array_equal(matched, cand[:, 0])
    # The hardest calibration photos the index records carry those verified scores and landmarks.
    hardest = index.build["hardest_calibration_photos"]
    assert len(hardest) == 8 and sum(h["accepted"] for h in hardest) == index.calibration.n_false_positives
    for h in hardest:
        i = paths.index(h["photo"])
        assert h["score"] == pytest.approx(float(verified[i]), abs=1e-5)
        assert h["landmark_id"] == index.landmark_ids[matched[i]]

    # Each query's decision score is its global score plus the capped inlier bonus of its landmark.
    recognizer = Recognizer(out)
    for i, (result, unverified) in enumerate(zip(recognizer.recognize(queries), global_recognizer.recognize(queries))):
        assert result.landmark_id == unverified.landmark_id == f"L{i}"
        assert result.score == pytest.approx(unverified.score + 0.001 * 50, abs=1e-5)
        assert result.accepted

    # A photo whose best global score + the largest bonus (0.05) stays under the threshold is
    # rejected either way and not verified; one that could reach it is verified.
    features = recognizer.index.local_features
    scores, rows = np.array([0.5, 0.4], np.float32), np.array([0, 1])
    recognizer.threshold = 0.5 + 0.05 + 1e-3
    kept, status = recognizer.verify(queries[0], scores, rows)
    assert np.array_equal(kept, scores) and status == "skipped"
    recognizer.threshold = 0.5 + 0.05 - 1e-3
    verified, status = recognizer.verify(queries[0], scores, rows)
    np.testing.assert_allclose(verified, features.rescore(extract(queries[0], features.params), scores, rows))
    assert status == "verified" and verified[0] == pytest.approx(0.55)
    # A flat photo has no keypoints to verify with: its global scores stand and the result says so.
    blank = _save(np.full((360, 480, 3), 200, np.uint8), tmp_path / "blank.jpg")
    kept, status = recognizer.verify(blank, scores, rows)
    assert np.array_equal(kept, scores) and status == "few_keypoints"
    recognizer.threshold = -1.0  # every photo could reach it, so every photo is verified or marked
    marked = {r.path: r for r in recognizer.recognize(queries + [blank])}
    assert [marked[q].verification for q in queries] == ["verified"] * 3
    assert marked[blank].verification == "few_keypoints" and marked[blank].error is None
    assert marked[blank].score == pytest.approx(global_recognizer.recognize([blank])[0].score, abs=1e-6)
    assert all(r.verification is None for r in global_recognizer.recognize(queries))
    # top_k bounds what is reported, not what is verified: with top_k=1 the recogniser still
    # re-scores the 3 candidates that calibration re-scored, so the decisions are the same.
    narrow = Recognizer(out, top_k=1)
    assert narrow._search_k == index.local_features.params.candidates == 3
    for wide_result, narrow_result in zip(Recognizer(out).recognize(queries), narrow.recognize(queries)):
        assert (narrow_result.landmark_id, narrow_result.accepted) == (wide_result.landmark_id, wide_result.accepted)
        assert narrow_result.score == pytest.approx(wide_result.score, abs=1e-6)
        assert len(narrow_result.candidates) == 1 and narrow_result.candidates[0] == wide_result.candidates[0]


@pytest.fixture(scope="module")
def imagenet_net():
    from lightning_modules import EmbeddingNet

    return EmbeddingNet("mobilenetv2_100", pretrained="offline", embedding_size=None).eval()


def test_cnn_features_are_the_strongest_stride16_cells_and_match_a_warped_copy(photos, imagenet_net):
    """DELF-style features: cells of the network's stride-16 map, at their centres, unit float16
    descriptors; a warped copy of a scene has hundreds of inliers, another scene a handful."""
    import torch

    from datamodules.images import load_rgb

    p = VerificationParams.for_local("cnn")
    assert (p.local, p.ransac_px, p.min_inliers, p.weight) == ("cnn", 16.0, 20, 0.005)
    extractor = make_extractor(p, imagenet_net)
    scene = [extract(path, p, extractor) for path in photos["scene"]]
    view = [extract(path, p, extractor) for path in photos["view"]]
    kp, desc = scene[0]
    # 480 x 360 px at stride 16: a 30 x 23 map (timm rounds up); the 500 cells of largest norm.
    with torch.no_grad():
        rgb = load_rgb(photos["scene"][0], max_side=p.max_side)
        fmap = imagenet_net.local_feature_map(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0]
    h, w = fmap.shape[1:]
    assert (h, w) == (23, 30) and len(kp) == 500 and desc.dtype == np.float16 and desc.shape[1] == 96
    cols, rows = kp[:, 0] / (480 / w) - 0.5, kp[:, 1] / (360 / h) - 0.5
    np.testing.assert_allclose(cols, np.round(cols), atol=1e-3)
    np.testing.assert_allclose(rows, np.round(rows), atol=1e-3)
    norms = fmap.norm(dim=0).numpy()
    kept = norms[np.round(rows).astype(int), np.round(cols).astype(int)]
    assert kept.min() >= np.sort(norms.ravel())[-500] - 1e-4
    np.testing.assert_allclose(np.linalg.norm(desc.astype(np.float32), axis=1), 1.0, atol=2e-3)
    same = [count_inliers(scene[i], view[i], p) for i in range(3)]
    other = [count_inliers(scene[i], view[j], p) for i in range(3) for j in range(3) if i != j]
    assert min(same) >= 100 and max(other) < p.min_inliers, (same, other)
    with pytest.raises(ValueError, match="need the index's network"):
        make_extractor(p, None)
    with pytest.raises(ValueError, match="no feature map at stride 7"):
        imagenet_net.local_feature_map(torch.zeros(1, 3, 64, 64), 7)

    class NoStride16(torch.nn.Module):  # a network without that map: refused before any photo is read
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def local_feature_map(self, images, reduction):
            raise ValueError(f"NoStride16 has no feature map at stride {reduction}")

    from core.errors import UserError

    with pytest.raises(UserError, match="--verify-local cnn: NoStride16 has no feature map at stride 16; use "
                                        "--verify-local sift"):
        make_extractor(p, NoStride16())
    # A photo too small for 30 cells is not verified (the minimum-keypoint policy).
    tiny = _save(_texture(5, 80, 60), photos["blank"].replace("blank", "tiny"))
    assert len(extract(tiny, p, extractor)[0]) < p.min_keypoints


def test_index_verify_with_cnn_features_round_trip_and_recognizer(photos, tmp_path, capsys):
    """`landmarks index --verify --verify-local cnn`: float16 features stored and memory-mapped,
    the threshold calibrated on verified scores, and the recogniser adding the same bonus."""
    paths, queries, args = _scenes_to_index(tmp_path, landmarks=2, views=3)
    out = tmp_path / "index"
    assert main(args + ["--out", str(out), "--verify", "--verify-local", "cnn", "--verify-photos", "2"]) == 0
    assert "verified:   4 photos stored (2000 CNN feature cells)" in capsys.readouterr().out
    index = LandmarkIndex.load(out)
    lf = index.local_features
    assert lf.params == VerificationParams.for_local("cnn", images_per_landmark=2)
    assert isinstance(lf.descriptors, np.memmap) and lf.descriptors.dtype == np.float16
    plain = LandmarkIndex.load(out)
    plain.local_features = None
    global_recognizer = Recognizer(plain, threshold=0.0)
    emb = np.concatenate([global_recognizer.embed_tensors(global_recognizer._load(p)[0][None]) for p in paths])
    scores, cand = index.search(emb, lf.params.candidates)
    verified, _ = lf.verified_top1(paths, scores, cand, net=global_recognizer.net)
    assert index.calibration.threshold == pytest.approx(calibrate_threshold(verified, 0.1).threshold, abs=1e-6)
    assert np.array_equal(verified, scores.max(axis=1))  # other scenes stay under 20 inliers
    recognizer = Recognizer(out, threshold=-1.0)
    for result, unverified in zip(recognizer.recognize(queries), global_recognizer.recognize(queries)):
        assert result.verification == "verified" and result.landmark_id == unverified.landmark_id
        assert result.score == pytest.approx(unverified.score + 0.005 * 50, abs=1e-5)  # > 50 inliers: capped
