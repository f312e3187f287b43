"""Recognition index on hand-built arrays: centroids, search, artifact round trip, calibration, GPS, albums."""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import urllib.parse

import numpy as np
import pytest
from PIL import ExifTags, Image

from core.errors import UserError
from recognition.albums import group_albums, write_albums
from recognition.artifact import FORMAT_VERSION, IndexFormatError, LandmarkIndex, ModelMismatchError
from recognition.calibration import CalibrationError, calibrate_threshold
from recognition.centroids import CentroidParams, build_representation, landmark_centroids
from recognition.gps import (
    GpsCalibration,
    GpsError,
    calibrate_with_gps,
    haversine_km,
    near_candidates,
    read_exif_gps,
    read_gps_csv,
    within_radius,
)
from recognition.recognizer import Recognition, Recognizer, expand_paths

D = 8


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def axis(i, d=D):
    e = np.zeros(d)
    e[i] = 1.0
    return e


def jitter(center, n, rng, scale=0.05):
    return unit(center + scale * rng.standard_normal((n, len(center))))


@pytest.fixture
def gallery():
    """Landmark A: two shooting angles (axes 0 and 1, 6 + 4 photos) and one stray photo (axis 7);
    landmark B: one angle (axis 2); landmark C: a single photo (axis 3)."""
    rng = np.random.default_rng(0)
    emb = np.concatenate([jitter(axis(0), 6, rng), jitter(axis(1), 4, rng), unit(axis(7))[None],
                          jitter(axis(2), 5, rng), unit(axis(3))[None]])
    ids = ["A"] * 11 + ["B"] * 5 + ["C"]
    return emb.astype(np.float32), ids


MODEL = {"identity": {"source": "backbone", "backbone": "toy", "embedding_size": D, "image_size": 32}, "key": "k",
         "source": {"backbone": "toy"}}


# ---- centroids -------------------------------------------------------------------------------


def test_landmark_centroids_one_per_angle_and_stray_photo_dropped(gallery):
    emb, _ = gallery
    centroids, sizes, dropped = landmark_centroids(emb[:11], CentroidParams(distance_threshold=0.3))
    assert sizes.tolist() == [6, 4] and dropped == 1
    np.testing.assert_allclose(centroids[0], unit(emb[:6].astype(np.float64).sum(0)), atol=1e-6)
    np.testing.assert_allclose(centroids[1], unit(emb[6:10].astype(np.float64).sum(0)), atol=1e-6)
    # the bound keeps the biggest cluster only
    centroids, sizes, dropped = landmark_centroids(emb[:11], CentroidParams(distance_threshold=0.3, max_centroids=1))
    assert sizes.tolist() == [6] and dropped == 5
    # a huge cut merges everything into one mean
    centroids, sizes, _ = landmark_centroids(emb[:11], CentroidParams(distance_threshold=2.0))
    assert sizes.tolist() == [11]


def test_landmark_with_only_tiny_clusters_is_kept(gallery):
    emb, _ = gallery
    two_angles = emb[[0, 6]]  # one photo per angle: every cluster is below min_cluster_size
    centroids, sizes, dropped = landmark_centroids(two_angles, CentroidParams(distance_threshold=0.3, min_cluster_size=3))
    assert sizes.tolist() == [1, 1] and dropped == 0
    np.testing.assert_allclose(centroids, two_angles, atol=1e-6)
    # 2 + 2 + 1 photos with min size 3: the two pairs stay, the stray photo goes
    centroids, sizes, dropped = landmark_centroids(emb[[0, 1, 6, 7, 10]], CentroidParams(0.3, min_cluster_size=3))
    assert sizes.tolist() == [2, 2] and dropped == 1


def test_representations(gallery):
    emb, ids = gallery
    params = CentroidParams(distance_threshold=0.3, few_photos=0)
    cent = build_representation(emb, ids, "centroids", params)
    assert cent.landmark_ids == ["A", "B", "C"]
    assert cent.landmark.tolist() == [0, 0, 1, 2] and cent.sizes.tolist() == [6, 4, 5, 1]
    assert cent.images_per_landmark.tolist() == [11, 5, 1] and cent.dropped_images == 1
    assert cent.represented.tolist() == [True] * 10 + [False] + [True] * 6  # A's stray photo has no vector
    # ... in the input's order, whatever order the landmarks' rows come in
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = build_representation(emb[order], [ids[i] for i in order], "centroids", params)
    assert np.flatnonzero(~shuffled.represented).tolist() == [int(np.flatnonzero(order == 10)[0])]
    mean = build_representation(emb, ids, "mean")
    assert mean.landmark.tolist() == [0, 1, 2] and mean.sizes.tolist() == [11, 5, 1]
    np.testing.assert_allclose(mean.vectors[0], unit(emb[:11].astype(np.float64).sum(0)), atol=1e-6)
    full = build_representation(emb, ids, "all")
    assert len(full.vectors) == 17 and full.landmark.tolist() == [0] * 11 + [1] * 5 + [2]
    assert mean.represented.all() and full.represented.all()
    with pytest.raises(ValueError, match="embeddings but"):
        build_representation(emb, ids[:-1])
    with pytest.raises(ValueError, match="unknown representation"):
        build_representation(emb, ids, "medoids")


def test_a_landmark_with_few_photos_keeps_them_and_optionally_their_mean(gallery):
    emb, ids = gallery  # A: 11 photos, B: 5, C: 1
    few = build_representation(emb, ids, "centroids", CentroidParams(distance_threshold=0.3, few_photos=6))
    # A (11 ≥ 6) is clustered as before; B keeps its 5 photos (no mean by default); C its one photo.
    assert few.landmark.tolist() == [0, 0] + [1] * 5 + [2]
    assert few.sizes.tolist() == [6, 4, 1, 1, 1, 1, 1, 1] and few.dropped_images == 1  # A's stray photo
    assert np.flatnonzero(~few.represented).tolist() == [10]
    np.testing.assert_allclose(few.vectors[2:7], unit(emb[11:16]), atol=1e-6)
    np.testing.assert_allclose(few.vectors[7], unit(emb[16]), atol=1e-6)
    # few_photos_mean adds B's normalised mean after its photos; C (one photo) gets no copy of it.
    meaned = build_representation(emb, ids, "centroids",
                                  CentroidParams(distance_threshold=0.3, few_photos=6, few_photos_mean=True))
    assert meaned.landmark.tolist() == [0, 0] + [1] * 6 + [2]
    assert meaned.sizes.tolist() == [6, 4, 1, 1, 1, 1, 1, 5, 1]
    np.testing.assert_allclose(meaned.vectors[2:7], unit(emb[11:16]), atol=1e-6)
    np.testing.assert_allclose(meaned.vectors[7], unit(unit(emb[11:16]).astype(np.float64).sum(0)), atol=1e-6)
    # The default threshold (15) covers all three here: the representation is the gallery itself.
    default = build_representation(emb, ids, "centroids", CentroidParams(distance_threshold=0.3))
    assert default.landmark.tolist() == [0] * 11 + [1] * 5 + [2]
    everything = build_representation(emb, ids, "all")
    np.testing.assert_allclose(default.vectors, everything.vectors[np.argsort(everything.landmark, kind="stable")],
                               atol=1e-6)
    assert CentroidParams().few_photos == 15 and CentroidParams().few_photos_mean is False
    with pytest.raises(ValueError, match="few_photos"):
        CentroidParams(few_photos=-1)


def test_centroids_recognise_a_side_view_that_one_mean_misses(gallery):
    emb, ids = gallery
    side_view = unit(axis(1) + 0.02 * axis(4))[None].astype(np.float32)
    cent = LandmarkIndex.from_centroids(build_representation(emb, ids, "centroids", CentroidParams(0.3)), MODEL)
    mean = LandmarkIndex.from_centroids(build_representation(emb, ids, "mean"), MODEL)
    s_cent, lm_cent = cent.top1(side_view)
    s_mean, lm_mean = mean.top1(side_view)
    assert lm_cent[0] == lm_mean[0] == 0
    assert s_cent[0] > 0.99 and s_mean[0] < 0.75  # the mean of two orthogonal angles is ~45° off both


# ---- search ----------------------------------------------------------------------------------


def test_search_returns_distinct_landmarks_with_their_best_score():
    vectors = unit(np.array([axis(0), axis(0) + 0.1 * axis(1), axis(1), axis(2)])).astype(np.float32)
    landmarks = [{"landmark_id": x, "name": None, "city": None, "lat": None, "lon": None} for x in "AB"]
    index = LandmarkIndex(vectors, [0, 0, 1, 1], [1, 1, 1, 1], landmarks, MODEL)
    q = unit(axis(0) + 0.05 * axis(1))[None].astype(np.float32)
    scores, rows = index.search(q, k=3)
    assert rows.tolist() == [[0, 1, -1]]
    sims = vectors @ q[0]
    np.testing.assert_allclose(scores[0, :2], [sims[:2].max(), sims[2:].max()], rtol=1e-6)
    assert scores[0, 2] == -np.inf


# ---- artifact --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,params", [("flat", {}), ("hnsw", {"hnsw_m": 8, "ef_search": 16}), ("ivf", {"nlist": 2})])
def test_artifact_round_trip_gives_identical_search(tmp_path, gallery, kind, params):
    emb, ids = gallery
    meta = {"A": {"name": "Alpha", "city": "X", "lat": 1.5, "lon": 2.5}}
    index = LandmarkIndex.from_centroids(build_representation(emb, ids, "all"), MODEL, meta,
                                         index_kind=kind, index_params=params)
    index.calibration = calibrate_threshold(np.linspace(0, 1, 100, dtype=np.float32), 0.05)
    out = index.save(tmp_path / "idx")
    loaded = LandmarkIndex.load(out)
    rng = np.random.default_rng(1)
    queries = unit(rng.standard_normal((20, D))).astype(np.float32)
    for a, b in zip(index.search(queries, 3), loaded.search(queries, 3)):
        np.testing.assert_array_equal(a, b)
    assert loaded.calibration == index.calibration
    assert loaded.landmarks[0] == {"landmark_id": "A", "name": "Alpha", "city": "X", "lat": 1.5, "lon": 2.5,
                                   "n_images": 11, "n_centroids": 11}
    assert loaded.landmarks[1]["name"] is None
    assert loaded.build["index_kind"] == kind
    # no pickle anywhere: every .npy loads with allow_pickle=False and the metadata is JSON
    for f in out.glob("*.npy"):
        np.load(f, allow_pickle=False)
    json.loads((out / "index.json").read_text())


def test_ivfpq_index_round_trip_and_small_input_refused(tmp_path):
    rng = np.random.default_rng(2)
    emb = unit(rng.standard_normal((300, D))).astype(np.float32)
    ids = [str(i % 30) for i in range(300)]
    params = {"nlist": 4, "pq_m": 2, "nprobe": 4}
    index = LandmarkIndex.from_centroids(build_representation(emb, ids, "all"), MODEL, index_kind="ivfpq",
                                         index_params=params)
    loaded = LandmarkIndex.load(index.save(tmp_path / "pq"))
    for a, b in zip(index.search(emb[:20], 3), loaded.search(emb[:20], 3)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ivfpq needs at least .* use the exact 'flat' index"):
        LandmarkIndex.from_centroids(build_representation(emb[:100], ids[:100], "all"), MODEL, index_kind="ivfpq",
                                     index_params=params)


def test_artifact_save_replaces_an_index_but_never_another_folder(tmp_path, gallery):
    emb, ids = gallery
    index = LandmarkIndex.from_centroids(build_representation(emb, ids, "mean"), MODEL)
    target = tmp_path / "idx"
    index.save(target)
    bigger = LandmarkIndex.from_centroids(build_representation(emb, ids, "all"), MODEL)
    bigger.save(target)
    assert len(LandmarkIndex.load(target)) == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp or backup folder left
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a landmark index"):
        index.save(photos)
    assert (photos / "a.jpg").read_bytes() == b"x"


def test_artifact_version_and_corruption_errors(tmp_path, gallery):
    emb, ids = gallery
    out = LandmarkIndex.from_centroids(build_representation(emb, ids, "mean"), MODEL).save(tmp_path / "idx")
    header = json.loads((out / "index.json").read_text())
    header["format_version"] = FORMAT_VERSION + 1
    (out / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match=rf"format version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"):
        LandmarkIndex.load(out)
    header["format_version"] = FORMAT_VERSION
    header["embedding_size"] = D + 1
    (out / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match="vectors"):
        LandmarkIndex.load(out)
    header["embedding_size"] = D
    (out / "index.json").write_text(json.dumps(header))
    landmarks_json = (out / "landmarks.json").read_text()
    (out / "landmarks.json").write_text("{bad")
    with pytest.raises(IndexFormatError, match=r"landmarks.json: unreadable or corrupt"):  # names the file
        LandmarkIndex.load(out)
    (out / "landmarks.json").write_text(landmarks_json)
    sizes = (out / "vector_size.npy").read_bytes()
    (out / "vector_size.npy").write_bytes(b"")  # cut to nothing by a full disk: EOFError, named too
    with pytest.raises(IndexFormatError, match=r"vector_size.npy: unreadable or corrupt"):
        LandmarkIndex.load(out)
    (out / "vector_size.npy").write_bytes(sizes)
    (out / "vector_size.npy").unlink()
    with pytest.raises(IndexFormatError, match="missing file"):
        LandmarkIndex.load(out)
    with pytest.raises(IndexFormatError, match="no index.json"):
        LandmarkIndex.load(tmp_path)


def _drop(entry, *keys):
    for key in keys:
        del entry[key]


@pytest.mark.parametrize("edit, named", [
    # Before: a KeyError traceback in the recognizer's decision, after the table header was printed.
    (lambda lms, head: _drop(lms[1], "name", "city"), r"landmarks.json: landmark 1 \('B'\): no 'name'"),
    (lambda lms, head: lms[0].update(city=7), r"landmark 0 \('A'\): 'city' must be a string or null, got 7"),
    # Before: ValueError: could not convert string to float, in the recognizer.
    (lambda lms, head: lms[2].update(lat="abc"), r"landmark 2 \('C'\): 'lat' must be a number in \[-90, 90\] "
                                                 r"or null, got 'abc'"),
    (lambda lms, head: lms[0].update(lon=200.0), r"'lon' must be a number in \[-180, 180\] or null, got 200.0"),
    (lambda lms, head: lms[1].update(landmark_id=""), r"landmark 1: 'landmark_id' must be a non-empty string"),
    (lambda lms, head: lms[1].update(landmark_id=5), r"landmark 1: 'landmark_id' must be a non-empty string, got 5"),
    # Before: loaded silently, and albums merged the landmarks that share an id.
    (lambda lms, head: [lm.update(landmark_id="A") for lm in lms],
     r"landmark 1 \('A'\): 'landmark_id' repeats landmark 0; each landmark needs its own id"),
    # Before: ValueError: invalid literal for int(), when the recognizer or export loaded the model.
    (lambda lms, head: head["model"]["identity"].update(image_size="abc"),
     r"index.json: model.identity.image_size must be a positive integer, got 'abc'"),
    (lambda lms, head: head["model"]["identity"].update(image_size=0), r"image_size must be a positive integer"),
])
def test_a_hand_edited_index_is_refused_at_load_naming_the_entry_and_key(tmp_path, gallery, edit, named):
    emb, ids = gallery
    meta = {"A": {"name": "Alpha", "city": "X", "lat": 1.5, "lon": 2.5}}
    out = LandmarkIndex.from_centroids(build_representation(emb, ids, "mean"), MODEL, meta).save(tmp_path / "idx")
    landmarks = json.loads((out / "landmarks.json").read_text())
    header = json.loads((out / "index.json").read_text())
    edit(landmarks, header)
    (out / "landmarks.json").write_text(json.dumps(landmarks))
    (out / "index.json").write_text(json.dumps(header))
    with pytest.raises(IndexFormatError, match=named):
        LandmarkIndex.load(out)


def test_a_file_given_as_an_index_is_named_as_a_file(tmp_path):
    (tmp_path / "idx.txt").write_text("not an index\n")
    with pytest.raises(IndexFormatError, match=r"idx.txt is a file, not an index folder"):
        LandmarkIndex.load(tmp_path / "idx.txt")


def test_model_mismatch_is_refused(gallery):
    emb, ids = gallery
    index = LandmarkIndex.from_centroids(build_representation(emb, ids, "mean"), MODEL)
    index.check_model(dict(MODEL["identity"]))  # the same model passes
    with pytest.raises(ModelMismatchError, match=f"makes 16-d embeddings but this index holds {D}-d"):
        index.check_model({**MODEL["identity"], "embedding_size": 16})
    with pytest.raises(ModelMismatchError, match="not the model this index was built with"):
        index.check_model({**MODEL["identity"], "backbone": "other"})
    with pytest.raises(ModelMismatchError, match="16-d"):
        index.search(np.ones((1, 16), np.float32) / 4.0)


# ---- calibration -----------------------------------------------------------------------------


def test_calibration_hits_the_target_fpr_on_the_calibration_set():
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.arange(2000, dtype=np.float32) / 2000)  # distinct scores 0 .. 0.9995
    cal = calibrate_threshold(scores, 1e-3)
    # 2 of 2000 may pass: the two highest (0.9995, 0.999); the third (0.9985) must not
    assert cal.n_false_positives == 2 and cal.achieved_fpr == 1e-3 and cal.n_calibration == 2000
    assert np.float32(0.9985) < cal.threshold <= np.float32(0.999) and cal.resolved
    assert int((scores >= cal.threshold).sum()) == 2
    cal = calibrate_threshold(scores, 1e-2)
    assert cal.n_false_positives == 20 and int((scores >= cal.threshold).sum()) == 20


def test_calibration_with_ties_is_conservative():
    scores = np.array([0.1] * 95 + [0.9] * 5, dtype=np.float32)
    cal = calibrate_threshold(scores, 0.03)  # 3 allowed, but 5 tie at the top: none pass
    assert cal.n_false_positives == 0 and cal.threshold > 0.9


def test_calibration_refuses_a_set_too_small_for_the_fpr(caplog):
    scores = np.linspace(0, 1, 999, dtype=np.float32)
    with pytest.raises(CalibrationError, match="999 calibration images cannot resolve .* at least 1000"):
        calibrate_threshold(scores, 1e-3)
    with caplog.at_level(logging.WARNING):
        cal = calibrate_threshold(scores, 1e-3, allow_unresolved=True)
    assert "cannot resolve" in caplog.text
    assert not cal.resolved and cal.n_false_positives == 0 and cal.threshold > scores.max()
    with pytest.raises(CalibrationError, match="no readable calibration images"):
        calibrate_threshold([], 1e-2)


# ---- GPS -------------------------------------------------------------------------------------


def test_haversine_and_radius():
    paris, london = (48.8566, 2.3522), (51.5074, -0.1278)
    assert haversine_km(*paris, *london) == pytest.approx(343.5, abs=1.0)
    assert haversine_km(0, 0, 0, 180) == pytest.approx(math.pi * 6371.0088, rel=1e-9)
    mask = within_radius(*paris, [51.5074, 48.86, np.nan], [-0.1278, 2.35, np.nan], 100)
    assert mask.tolist() == [False, True, True]  # no coordinates: cannot judge, kept


def _jpeg_with_gps(path, lat, lon):
    exif = Image.Exif()
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "S" if lat < 0 else "N",
        ExifTags.GPS.GPSLatitude: _dms(abs(lat)),
        ExifTags.GPS.GPSLongitudeRef: "W" if lon < 0 else "E",
        ExifTags.GPS.GPSLongitude: _dms(abs(lon)),
    }
    Image.new("RGB", (32, 32), (120, 80, 40)).save(path, exif=exif)


def _dms(x):
    d = int(x)
    m = int((x - d) * 60)
    return (float(d), float(m), round((x - d - m / 60) * 3600, 4))


def test_exif_gps_round_trip(tmp_path):
    _jpeg_with_gps(tmp_path / "a.jpg", -33.8568, 151.2153)
    lat, lon = read_exif_gps(tmp_path / "a.jpg")
    assert lat == pytest.approx(-33.8568, abs=1e-5) and lon == pytest.approx(151.2153, abs=1e-5)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    assert read_exif_gps(tmp_path / "b.jpg") is None
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    assert read_exif_gps(tmp_path / "c.jpg") is None


@pytest.mark.parametrize("block, logged", [
    # Each was read as a real position before, and the GPS filter then rejected the right landmark.
    ({ExifTags.GPS.GPSLatitudeRef: "Q"}, "reference 'Q' is not N or S"),
    ({ExifTags.GPS.GPSLatitude: (3.0, 120.0, 0.0)}, "degrees/minutes/seconds 3.0, 120.0, 0.0"),
    ({ExifTags.GPS.GPSLatitude: (0.0, 0.0, 0.0), ExifTags.GPS.GPSLongitude: (0.0, 0.0, 0.0)},
     "is (0, 0), what cameras write without a fix"),
])
def test_a_malformed_exif_gps_block_is_no_position(block, logged, tmp_path, caplog):
    import logging

    exif = Image.Exif()
    gps = {ExifTags.GPS.GPSLatitudeRef: "S", ExifTags.GPS.GPSLatitude: _dms(3.8),
           ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: _dms(18.25)}
    exif[ExifTags.IFD.GPSInfo] = {**gps, **block}
    Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / "a.jpg", exif=exif)
    with caplog.at_level(logging.WARNING):
        assert read_exif_gps(tmp_path / "a.jpg") is None
    assert logged in caplog.text
    exif[ExifTags.IFD.GPSInfo] = {**gps, ExifTags.GPS.GPSLatitudeRef: "s"}  # lower case is still a hemisphere
    Image.new("RGB", (32, 32)).save(tmp_path / "b.jpg", exif=exif)
    assert read_exif_gps(tmp_path / "b.jpg") == pytest.approx((-3.8, 18.25), abs=1e-4)


def test_gps_csv(tmp_path):
    (tmp_path / "gps.csv").write_text("path,lat,lon\nphotos/a.jpg,10.5,-20\n/abs/b.jpg,,\n")
    gps = read_gps_csv(tmp_path / "gps.csv")
    assert gps == {str(tmp_path / "photos" / "a.jpg"): (10.5, -20.0)}
    (tmp_path / "bad.csv").write_text("path,lat,lon\na.jpg,10,\n")
    with pytest.raises(GpsError, match="line 2"):
        read_gps_csv(tmp_path / "bad.csv")
    (tmp_path / "far.csv").write_text("path,lat,lon\na.jpg,91,0\n")
    with pytest.raises(GpsError, match="line 2: coordinates .* out of range"):
        read_gps_csv(tmp_path / "far.csv")


def _decider(index, **kw):
    """A Recognizer without a network: only decide() is exercised."""
    r = Recognizer.__new__(Recognizer)
    r.index, r.threshold, r.gps_radius_km, r.use_exif_gps = index, kw.get("threshold", 0.5), kw.get("radius"), True
    r.gps, r.top_k = kw.get("gps", {}), kw.get("top_k", 5)
    r.gps_calibration = kw.get("gps_calibration")
    r._lat = np.array([np.nan if lm["lat"] is None else lm["lat"] for lm in index.landmarks])
    r._lon = np.array([np.nan if lm["lon"] is None else lm["lon"] for lm in index.landmarks])
    return r


def test_gps_filter_rejects_far_landmarks_and_falls_back_to_a_near_one(tmp_path, gallery):
    emb, ids = gallery
    meta = {"A": {"name": "Alpha", "lat": 48.8584, "lon": 2.2945}, "B": {"name": "Beta", "lat": 51.5007, "lon": -0.1246}}
    index = LandmarkIndex.from_centroids(build_representation(emb, ids, "mean"), MODEL, meta)
    photo = str(tmp_path / "london.jpg")
    scores, rows = np.array([0.9, 0.7, 0.2], np.float32), np.array([0, 1, 2])
    plain = _decider(index).decide(photo, scores, rows)
    assert (plain.landmark_id, plain.accepted) == ("A", True)
    london = _decider(index, radius=50, gps={photo: (51.51, -0.12)}).decide(photo, scores, rows)
    assert (london.landmark_id, london.score, london.accepted) == ("B", pytest.approx(0.7), True)
    assert london.gps_rejected == ["A"] and london.gps == [51.51, -0.12]
    assert [c["landmark_id"] for c in london.candidates] == ["A", "B", "C"]  # candidates are unfiltered
    # EXIF GPS in the photo itself (Sydney): A and B are rejected, C has no coordinates and stays
    _jpeg_with_gps(photo, -33.86, 151.21)
    sydney = _decider(index, radius=50).decide(photo, scores, rows)
    assert (sydney.landmark_id, sydney.accepted, sydney.gps_rejected) == ("C", False, ["A", "B"])
    # nothing left within the radius: no landmark at all
    nowhere = _decider(index, radius=50).decide(photo, scores[:2], rows[:2])
    assert nowhere.landmark_id is None and not nowhere.accepted and nowhere.score is None


PARIS, LONDON, SYDNEY = (48.8584, 2.2945), (51.5007, -0.1246), (-33.86, 151.21)


def _three_landmark_index():
    """A (Paris), B (London), C (no coordinates), each one vector: the axes 0, 1, 2."""
    emb = np.stack([axis(0), axis(1), axis(2)]).astype(np.float32)
    meta = {"A": {"lat": PARIS[0], "lon": PARIS[1]}, "B": {"lat": LONDON[0], "lon": LONDON[1]}}
    return LandmarkIndex.from_centroids(build_representation(emb, ["A", "B", "C"], "mean"), MODEL, meta)


def test_near_candidates_by_hand():
    lat, lon = np.array([PARIS[0], LONDON[0], np.nan]), np.array([PARIS[1], LONDON[1], np.nan])
    rows = np.array([[0, 1, 2], [0, 1, -1], [1, 0, 2]])
    positions = np.array([LONDON, [np.nan, np.nan], SYDNEY])
    # London (Paris is 340 km away); no position: all pass but the empty slot; Sydney: only C (no coordinates)
    assert near_candidates(lat, lon, rows, positions, 50).tolist() == [
        [False, True, True], [True, True, False], [False, False, True]]
    assert near_candidates(lat, lon, rows[:1], [LONDON], 400).tolist() == [[True, True, True]]


def test_a_gps_threshold_is_calibrated_on_filtered_scores_by_hand():
    index = _three_landmark_index()
    # cosines to A, B, C (the rows are unit vectors; the index's scores are these cosines)
    cos = np.array([[0.9, 0.3, 0.1], [0.8, 0.5, 0.2], [0.7, 0.2, 0.6], [0.95, 0.1, 0.1], [0.6, 0.55, 0.3]])
    emb = np.hstack([cos, np.sqrt(1 - (cos ** 2).sum(1, keepdims=True)), np.zeros((5, D - 4))]).astype(np.float32)
    positions = np.array([LONDON, LONDON, SYDNEY, PARIS, [np.nan, np.nan]])
    gps = calibrate_with_gps(index, emb, positions, 50, 0.25)
    # filtered top-1 scores: London → B 0.3 and 0.5; Sydney → C 0.6; Paris → A 0.95; no position: left out.
    # 4 photos at FPR 0.25 admit 1: the threshold lies just above the 2nd highest, 0.6.
    assert gps.n_without_position == 1 and gps.calibration.n_calibration == 4
    assert gps.calibration.n_false_positives == 1
    assert np.float32(0.6) < gps.calibration.threshold <= np.nextafter(np.float32(0.6), np.float32(1)) + 1e-7
    # Without the filter the same photos' top-1 (0.9, 0.8, 0.7, 0.95) give a threshold above 0.9.
    plain = calibrate_threshold(index.top1(emb[:4])[0], 0.25)
    assert plain.threshold > 0.9
    # One candidate deep: a London photo whose best landmark is A has none near: -inf, never accepted.
    # Sydney's best is A too: the scores are -inf, -inf, -inf, 0.95. The rule admits 1 of 4, and only one photo
    # has a candidate: the "threshold" would accept every nearby match whatever its score. Refused.
    with pytest.raises(UserError, match=r"only 1 of the 4 calibration photos with a position have a landmark "
                                        r"within 50 km among their best 1, too few"):
        calibrate_with_gps(index, emb, positions, 50, 0.25, candidates=1)
    # two with a candidate: a threshold again, set by the filtered scores
    two = calibrate_with_gps(index, emb[:4], [LONDON, PARIS, SYDNEY, PARIS], 50, 0.25, candidates=1)
    assert two.calibration.n_false_positives == 1 and np.float32(0.8) < two.calibration.threshold <= 0.95


def test_the_recogniser_decides_a_photo_with_a_position_by_the_gps_threshold(tmp_path, caplog):
    index = _three_landmark_index()
    gps = GpsCalibration(50.0, 2, calibrate_threshold(np.array([0.1, 0.2, 0.3, 0.4]), 0.25), 0)  # threshold ~0.3
    index.gps_calibration = gps
    placed, unplaced = str(tmp_path / "london.jpg"), str(tmp_path / "unknown.jpg")
    r = _decider(index, threshold=0.7, radius=50, gps={placed: LONDON}, gps_calibration=gps)
    scores, rows = np.array([0.9, 0.5, 0.45], np.float32), np.array([0, 1, 2])
    # London: A rejected, B at 0.5 passes the GPS threshold (not the plain 0.7)
    london = r.decide(placed, scores, rows)
    assert (london.landmark_id, london.accepted, london.gps_rejected) == ("B", True, ["A"])
    # no position: the plain threshold, no filter
    assert (r.decide(unplaced, scores, rows).landmark_id, r.decide(unplaced, scores, rows).accepted) == ("A", True)
    assert not r.decide(unplaced, np.array([0.5, 0.4, 0.3], np.float32), rows).accepted
    # only the first 2 candidates count, as calibrated: with A and B far, C (3rd) is not taken
    r.gps = {placed: SYDNEY}
    sydney = r.decide(placed, scores, rows)
    assert sydney.landmark_id is None and not sydney.accepted
    # The GPS threshold applies at its own radius, and not under a threshold given by hand.
    r.gps_radius_km = 50.0
    assert r._usable_gps_calibration(None) is gps
    assert r._usable_gps_calibration(0.8) is None
    r.gps_radius_km = 10.0
    with caplog.at_level(logging.WARNING):
        assert r._usable_gps_calibration(None) is None
    assert "calibrated for a radius of 50 km, not 10 km" in caplog.text


def test_a_gps_threshold_survives_a_round_trip_and_a_bad_one_is_refused(tmp_path):
    index = _three_landmark_index()
    index.gps_calibration = GpsCalibration(25.0, 5, calibrate_threshold(np.array([0.1, 0.2, 0.3, -np.inf]), 0.25), 3)
    index.save(tmp_path / "i")
    assert LandmarkIndex.load(tmp_path / "i").gps_calibration == index.gps_calibration
    head = json.loads((tmp_path / "i" / "index.json").read_text())
    good = json.loads(json.dumps(head["gps_calibration"]))
    for key, value, named in (("radius_km", -1, "radius_km must be a number > 0"),
                              ("radius_km", "50", "radius_km must be a number > 0"),
                              ("candidates", True, "candidates must be an integer >= 1"),
                              ("candidates", 0, "candidates must be an integer >= 1"),
                              ("n_without_position", -2, "n_without_position must be an integer >= 0"),
                              ("calibration", {**good["calibration"], "threshold": float("nan")},
                               "the threshold must be a finite number")):
        head["gps_calibration"] = {**good, key: value}
        (tmp_path / "i" / "index.json").write_text(json.dumps(head))
        with pytest.raises(IndexFormatError, match=rf"index.json: gps_calibration: malformed .*{named}"):
            LandmarkIndex.load(tmp_path / "i")
    head["gps_calibration"] = {k: v for k, v in good.items() if k != "candidates"}
    (tmp_path / "i" / "index.json").write_text(json.dumps(head))
    with pytest.raises(IndexFormatError, match=r"gps_calibration: malformed \(KeyError\('candidates'\)\)"):
        LandmarkIndex.load(tmp_path / "i")


def test_calibration_positions_come_from_the_columns_then_exif(tmp_path):
    from datamodules.manifest import load_manifest
    from recognition.gps import photo_positions

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.jpg")
    _jpeg_with_gps(tmp_path / "c.jpg", *SYDNEY)
    (tmp_path / "cal.csv").write_text(f"path,lat,lon\na.jpg,{LONDON[0]},{LONDON[1]}\nb.jpg,,\nc.jpg,,\n")
    got = photo_positions(load_manifest(tmp_path / "cal.csv", "nonlandmark"))
    assert got[0].tolist() == list(LONDON) and np.isnan(got[1]).all() and got[2] == pytest.approx(SYDNEY, abs=1e-4)
    assert np.isnan(photo_positions(load_manifest(tmp_path / "cal.csv", "nonlandmark"), use_exif_gps=False)[2]).all()
    (tmp_path / "half.csv").write_text("path,lat,lon\na.jpg,10,\n")
    with pytest.raises(GpsError, match=r"half.csv: line 2: lat and lon must both be given"):
        photo_positions(load_manifest(tmp_path / "half.csv", "nonlandmark"))
    (tmp_path / "nan.csv").write_text("path,lat,lon\na.jpg,nan,1\n")
    with pytest.raises(GpsError, match=r"nan.csv: line 2: coordinates \(nan, 1.0\) out of range"):
        photo_positions(load_manifest(tmp_path / "nan.csv", "nonlandmark"))
    (tmp_path / "lat.csv").write_text("path,lat\na.jpg,10\n")
    with pytest.raises(GpsError, match=r"lat.csv: has a lat column but no lon column"):
        photo_positions(load_manifest(tmp_path / "lat.csv", "nonlandmark"))


# ---- inputs and albums ---------------------------------------------------------------------


def test_expand_paths(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.jpg", "d/sub/a.PNG", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# photos\nd/b.jpg\n\n/abs/missing.jpg\n")
    got = expand_paths([tmp_path / "d", tmp_path / "list.txt", tmp_path / "gone.jpg"])
    assert got == [str(tmp_path / "d/b.jpg"), str(tmp_path / "d/sub/a.PNG"), str(tmp_path / "d/b.jpg"),
                   "/abs/missing.jpg", str(tmp_path / "gone.jpg")]


def test_albums_group_and_write(tmp_path):
    for name, colour in (("p1.jpg", (200, 0, 0)), ("p2.jpg", (0, 200, 0)), ("p3.jpg", (0, 0, 200))):
        Image.new("RGB", (64, 48), colour).save(tmp_path / name)
    results = [
        Recognition(str(tmp_path / "p1.jpg"), "7", "Tower", 0.8, True, "Paris"),
        Recognition(str(tmp_path / "p2.jpg"), "7", "Tower", 0.9, True, "Paris"),
        Recognition(str(tmp_path / "p3.jpg"), "9", "Bridge <b>", 0.95, True, None),
        Recognition(str(tmp_path / "p4.jpg"), "9", "Bridge <b>", 0.3, False, None),
        Recognition(str(tmp_path / "bad.jpg"), error="bad.jpg: not an image"),
    ]
    albums = group_albums(results)
    assert [a["landmark_id"] for a in albums["albums"]] == ["7", "9"]
    assert [p["score"] for p in albums["albums"][0]["photos"]] == [0.9, 0.8]
    assert [(c["city"], c["landmarks"], c["n_photos"]) for c in albums["cities"]] == [
        ("Paris", ["7"], 2), ("Other places", ["9"], 1)]
    assert albums["unrecognised"] == [str(tmp_path / "p4.jpg")]
    assert albums["counts"] == {"photos": 5, "recognised": 3, "unrecognised": 1, "unreadable": 1, "albums": 2}
    out = tmp_path / "out"
    written = write_albums(albums, out, thumb_size=32)
    data = json.loads((out / "albums.json").read_text())
    thumbs = [p["thumbnail"] for a in data["albums"] for p in a["photos"]]
    assert len(thumbs) == 3 and all((out / t).is_file() for t in thumbs)
    assert max(Image.open(out / thumbs[0]).size) == 32
    page = (out / "index.html").read_text()
    assert page.count("<figure>") == 3 and "Bridge &lt;b&gt;" in page and "Bridge <b>" not in page
    assert all(f'src="{t}"' in page for t in thumbs) and "bad.jpg: not an image" in page
    assert written["html"] == str(out / "index.html")



def test_albums_thumbnails_follow_the_photo_and_the_size(tmp_path):
    """A photo replaced at its path, or another thumbnail size, gets a new thumbnail; thumbnails the
    page no longer uses are removed (only ours: other files in thumbs/ stay)."""
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (64, 48), (200, 0, 0)).save(photo)
    out = tmp_path / "out"

    def write(size):
        albums = group_albums([Recognition(str(photo), "7", "Tower", 0.9, True, "Paris")])
        write_albums(albums, out, thumb_size=size)
        [thumb] = [p["thumbnail"] for a in albums["albums"] for p in a["photos"]]
        return out / thumb

    first = write(32)
    (out / "thumbs" / "notes.txt").write_text("mine")
    assert write(32) == first  # unchanged photo, same size: the same thumbnail
    resized = write(24)
    assert max(Image.open(resized).size) == 24 and not first.exists()
    Image.new("RGB", (64, 48), (0, 0, 200)).save(photo)
    os.utime(photo, ns=(1, 1))  # a new mtime even where the clock's resolution is coarse
    replaced = write(24)
    assert replaced != resized and not resized.exists()
    assert Image.open(replaced).convert("RGB").getpixel((5, 5))[2] > 150  # the new photo's colour
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == sorted([replaced.name, "notes.txt"])


def test_albums_of_a_photo_whose_name_is_not_utf8(tmp_path, monkeypatch):
    import recognition.albums

    name = os.fsdecode(b"bad\xff\xfe.jpg")
    try:
        Image.new("RGB", (64, 48), (200, 0, 0)).save(tmp_path / name)
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    results = [Recognition(str(tmp_path / name), "7", "Tower", 0.9, True, "Paris"),
               Recognition(str(tmp_path / ("x" + name)), error=f"{tmp_path / ('x' + name)}: not an image")]
    out = tmp_path / "out"
    write_albums(group_albums(results), out, thumb_size=32)
    data = json.loads((out / "albums.json").read_text(encoding="utf-8"))
    [photo] = data["albums"][0]["photos"]
    assert photo["path"] == str(tmp_path / "bad\ufffd\ufffd.jpg") and (out / photo["thumbnail"]).is_file()
    page = (out / "index.html").read_text(encoding="utf-8")
    href = "file://" + urllib.parse.quote(os.fsencode(tmp_path)) + "/bad%FF%FE.jpg"
    assert f'href="{href}"' in page and ">bad\ufffd\ufffd.jpg<br>" in page and "xbad\ufffd\ufffd.jpg: not an image" in page
    assert urllib.parse.unquote_to_bytes(href.removeprefix("file://")) == os.fsencode(tmp_path / name)  # the raw bytes
    # Both files are built before either is written: a page that cannot be built leaves neither.
    monkeypatch.setattr(recognition.albums, "_html_page", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_albums(group_albums(results), tmp_path / "out2", thumb_size=32)
    assert not (tmp_path / "out2" / "albums.json").exists()

def test_nearest_db_photo_of_a_hardest_calibration_photo_is_one_the_index_represents(gallery, tmp_path):
    """The sheet's DB photo: the matched landmark's photo nearest to the calibration photo, by cosine
    after the index's whitening, among the photos a vector stands for. A's stray photo (axis 7, in
    a cluster dropped as too small) is nearest to a photo on axis 7 but played no part in its score."""
    from recognition.indexing import _with_nearest_db_photos

    emb, ids = gallery
    index = LandmarkIndex.from_embeddings(emb, ids, params=CentroidParams(distance_threshold=0.3, few_photos=0))
    db_paths = [str(tmp_path / f"db{i}.jpg") for i in range(len(ids))]
    photos = [str(tmp_path / "near_stray.jpg"), str(tmp_path / "near_b.jpg"), str(tmp_path / "none.jpg")]
    queries = unit(np.stack([axis(7) + 0.6 * axis(1), axis(2) + 0.01 * axis(5), axis(4)])).astype(np.float32)
    hardest = [{"photo": photos[0], "landmark_id": "A"}, {"photo": photos[1], "landmark_id": "B"},
               {"photo": photos[2], "landmark_id": None}]
    rows = np.arange(len(ids))
    nearest_b = 11 + int(np.argmax(emb[11:16] @ queries[1]))
    nearest_a_kept = int(np.argmax(emb[:10] @ queries[0]))
    assert nearest_a_kept in range(6, 10) and int(np.argmax(emb[:11] @ queries[0])) == 10  # the stray is nearer
    out = _with_nearest_db_photos(hardest, photos, queries, db_paths, emb, rows, ids, index.represented, index.whiten)
    assert [h["nearest_db_photo"] for h in out] == [db_paths[nearest_a_kept], db_paths[nearest_b], None]
    # The DB rows may skip unreadable photos: row i of the embeddings / paths is the i-th id's.
    out = _with_nearest_db_photos([dict(hardest[1])], photos, queries, ["x.jpg"] + db_paths, np.r_[emb[:1], emb],
                                  rows + 1, ids, index.represented, index.whiten)
    assert out[0]["nearest_db_photo"] == db_paths[nearest_b]


def test_repeated_db_rows_are_indexed_once_and_counted(tmp_path, caplog):
    import logging

    from datamodules.manifest import drop_repeated_rows, load_manifest

    (tmp_path / "db.csv").write_text("path,landmark_id\na.jpg,1\nb.jpg,1\na.jpg,1\na.jpg,2\nb.jpg,1\n")
    with caplog.at_level(logging.WARNING):
        kept = drop_repeated_rows(load_manifest(tmp_path / "db.csv", "landmark"), "indexed")
    # a.jpg under landmark 2 stays: one photo may show two landmarks
    assert [(pathlib.Path(p).name, i) for p, i in zip(kept.paths, kept.landmark_ids)] == [
        ("a.jpg", "1"), ("b.jpg", "1"), ("a.jpg", "2")]
    assert list(kept.lines) == [2, 3, 5]
    assert "2 row(s) repeat an earlier row's path and landmark_id (first at line 4); each photo is indexed once" \
        in caplog.text
