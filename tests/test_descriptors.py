"""Global-descriptor post-processing (recognition/descriptors.py) and the index that carries it:
hand-computed whitening, DBA and α-QE, the control that switches them off, the artifact round
trip, and `landmarks index --whiten/--dba/--query-expansion` calibrating on what it searches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_probes import calibration_embeddings, tiny_index_args

from cli.main import main
from recognition.artifact import FORMAT_VERSION, IndexFormatError, LandmarkIndex
from recognition.calibration import calibrate_threshold
from recognition.descriptors import DescriptorParams, Whitening, augment_database, weighted_neighbours
from recognition.recognizer import Recognizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = {"identity": {"embedding_size": 6}}


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _world(seed: int = 0):
    """Three landmarks around axes 0-2 of a 6-d space, a shared nuisance direction (axis 5) that
    every photo varies along strongly, and non-landmark photos."""
    rng = np.random.default_rng(seed)
    photos, ids = [], []
    for landmark in range(3):
        centre = np.eye(6)[landmark]
        for _ in range(8):
            photos.append(centre + 0.15 * rng.standard_normal(6) + rng.normal(0, 0.8) * np.eye(6)[5])
            ids.append(f"L{landmark}")
    others = rng.standard_normal((20, 6)) * [0.3, 0.3, 0.3, 1, 1, 1]
    return _unit(photos), ids, _unit(others)


def test_whitening_decorrelates_the_fitted_photos_and_keeps_what_they_do_not_span_at_the_ridge():
    rng = np.random.default_rng(1)
    # 5 photos in 4-d that span only 3 directions around their mean (the 4th coordinate is 0).
    x = np.zeros((5, 4))
    x[:, :3] = rng.standard_normal((5, 3)) * [3.0, 1.0, 0.2]
    full = Whitening.fit(x, power=0.5, shrink=0.0)
    z = (x - full.mean) @ full.projection
    # Full whitening without shrinkage: unit variance along each spanned direction; the unspanned
    # 4th axis is projected out.
    np.testing.assert_allclose(z.T @ z / len(x), np.diag([1.0, 1.0, 1.0, 0.0]), atol=1e-5)
    np.testing.assert_allclose(full.projection[3], 0.0, atol=1e-12)
    # Power 0 is the identity: nothing is scaled.
    np.testing.assert_allclose(Whitening.fit(x, power=0.0, shrink=1.0).projection, np.eye(4), atol=1e-12)
    # Shrinkage s, ridge r = s·mean λ: a spanned direction of variance λ ends with λ / (λ + r), and
    # the unspanned one is scaled by r^-1/2 (a query's component there is kept).
    shrunk = Whitening.fit(x, power=0.5, shrink=1.0)
    lam = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2 / len(x)
    lam = lam[lam > 1e-8 * lam[0]]
    zs = (x - shrunk.mean) @ shrunk.projection
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(zs.T @ zs / len(x)))[::-1][:3], lam / (lam + lam.mean()),
                               atol=1e-5)
    np.testing.assert_allclose(shrunk.projection @ np.eye(4)[3], np.eye(4)[3] / np.sqrt(lam.mean()), atol=1e-6)
    np.testing.assert_allclose(shrunk.projection, shrunk.projection.T, atol=1e-12)
    assert np.allclose(np.linalg.norm(full(x), axis=1), 1.0)  # applied: unit rows
    with pytest.raises(ValueError, match="at least 2 photos"):
        Whitening.fit(x[:1], 0.5, 1.0)


def test_learned_whitening_whitens_the_matching_pair_differences_not_the_photos():
    rng = np.random.default_rng(2)
    # 3 landmarks far apart along axes 0-2; within each, photos vary by a known transform A
    # (shooting-angle nuisance), of different sizes per landmark.
    a = np.array([[2.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.3, 0.1], [0, 0, 0, 0.5]])
    x, groups = [], []
    for landmark, n in enumerate((5, 9, 14)):
        x.append(10 * np.eye(4)[landmark] + rng.standard_normal((n, 4)) @ a.T)
        groups += [landmark] * n
    x, groups = np.concatenate(x), np.array(groups)
    learned = Whitening.fit(x, power=0.5, shrink=0.0, groups=groups)
    # The scatter of every matching pair's difference, by hand, ends as a multiple of the identity.
    pairs = [(i, j) for i in range(len(x)) for j in range(i + 1, len(x)) if groups[i] == groups[j]]
    scatter = sum(np.outer(x[i] - x[j], x[i] - x[j]) for i, j in pairs)
    white = learned.projection @ scatter @ learned.projection
    np.testing.assert_allclose(white / white[0, 0], np.eye(4), atol=1e-6)
    # Without groups, the photos' own covariance (dominated by the landmarks' spread) is whitened
    # instead, which leaves the pair differences far from white.
    plain = Whitening.fit(x, power=0.5, shrink=0.0)
    other = plain.projection @ scatter @ plain.projection
    assert not np.allclose(other / other[0, 0], np.eye(4), atol=0.1)
    np.testing.assert_allclose(learned.mean, x.mean(axis=0), atol=1e-6)  # centred on all photos
    with pytest.raises(ValueError, match="3 group labels for 28 photos"):
        Whitening.fit(x, 0.5, 0.0, groups=groups[:3])
    with pytest.raises(ValueError, match="at least 2 different photos"):
        Whitening.fit(x, 0.5, 0.0, groups=np.arange(len(x)))


def test_weighted_neighbours_hand_computed_and_dba_skips_each_photo_itself():
    x = _unit([[1, 0, 0]])
    pool = _unit([[1, 0, 0], [1, 1, 0], [0, 1, 0]])  # cosines 1, 0.707, 0
    # k=2, alpha=1: x + 1·e1 + 0.707·(e1+e2)/√2 = (2.5, 0.5, 0)
    np.testing.assert_allclose(weighted_neighbours(x, pool, 2, 1.0), _unit([[2.5, 0.5, 0]]), atol=1e-6)
    # alpha 3: the second neighbour weighs 0.707³ = 0.354.
    w = (1 / np.sqrt(2)) ** 3
    np.testing.assert_allclose(weighted_neighbours(x, pool, 2, 3.0), _unit([[2 + w / np.sqrt(2), w / np.sqrt(2), 0]]),
                               atol=1e-6)
    # A negative cosine adds nothing (max(cos, 0)).
    np.testing.assert_allclose(weighted_neighbours(_unit([[0, 0, 1]]), _unit([[0, 0, -1]]), 1, 1.0),
                               _unit([[0, 0, 1]]), atol=1e-6)
    # DBA: each photo's neighbours are the others, never itself.
    db = _unit([[1, 0, 0], [1, 1, 0], [0, 1, 0]])
    expected = [db[0] + (1 / np.sqrt(2)) * db[1], db[1] + (1 / np.sqrt(2)) * db[0], db[2] + (1 / np.sqrt(2)) * db[1]]
    np.testing.assert_allclose(augment_database(db, 1, 1.0), _unit(expected), atol=1e-6)
    with pytest.raises(ValueError, match="whitening power"):
        DescriptorParams(whiten=2.0)
    with pytest.raises(ValueError, match="count neighbours"):
        DescriptorParams(dba=-1)


def test_off_is_the_control_and_each_option_changes_what_it_should():
    photos, ids, others = _world()
    plain = LandmarkIndex.from_embeddings(photos, ids, MODEL, representation="all")
    off = LandmarkIndex.from_embeddings(photos, ids, MODEL, representation="all", descriptor_params=DescriptorParams())
    queries = np.concatenate([photos[::3], others])
    for a, b in zip(plain.search(queries, 3), off.search(queries, 3)):
        np.testing.assert_array_equal(a, b)
    # α-QE with one neighbour adds the top vector, a monotone change of the top score: the best
    # landmark of every query is the control's (the check EXPERIMENTS.md relies on).
    qe1 = LandmarkIndex.from_embeddings(photos, ids, MODEL, representation="all",
                                        descriptor_params=DescriptorParams(query_expansion=1))
    assert np.array_equal(qe1.top1(queries)[1], plain.top1(queries)[1])
    assert not np.allclose(qe1.top1(queries)[0], plain.top1(queries)[0])
    np.testing.assert_allclose(qe1.describe(queries), weighted_neighbours(queries, plain.vectors, 1, 3.0), atol=1e-6)
    # DBA changes the indexed vectors to exactly augment_database of the photos.
    dba = LandmarkIndex.from_embeddings(photos, ids, MODEL, representation="all",
                                        descriptor_params=DescriptorParams(dba=2))
    np.testing.assert_allclose(dba.vectors, augment_database(photos, 2, 3.0), atol=1e-6)
    # Whitening: fitted on the photos and the unlabelled pool; vectors and queries whitened alike.
    params = DescriptorParams(whiten=0.5, whiten_shrink=0.1)
    white = LandmarkIndex.from_embeddings(photos, ids, MODEL, representation="all", descriptor_params=params,
                                          unlabelled=others)
    fitted = Whitening.fit(np.concatenate([photos, others]), 0.5, 0.1)
    np.testing.assert_allclose(white.vectors, fitted(photos), atol=1e-5)
    scores, rows = white.search(queries, 1)
    sims = fitted(queries) @ fitted(photos).T
    np.testing.assert_allclose(scores[:, 0], sims.max(axis=1), atol=1e-5)
    # The nuisance axis dominates raw cosines; whitening shrinks it, so landmarks separate better.
    truth = np.repeat([0, 1, 2], 8)[::3]
    assert (white.top1(photos[::3])[1] == truth).mean() >= (plain.top1(photos[::3])[1] == truth).mean()


def test_descriptor_round_trip_and_version(tmp_path):
    photos, ids, others = _world()
    params = DescriptorParams(whiten=0.25, whiten_shrink=1.0, dba=1, query_expansion=2, alpha=2.0)
    index = LandmarkIndex.from_embeddings(photos, ids, MODEL, representation="centroids", descriptor_params=params,
                                          unlabelled=others)
    index.set_penalty(others[:10], weight=0.25, k=2)
    out = index.save(tmp_path / "index")
    head = json.loads((out / "index.json").read_text())
    assert head["format_version"] == FORMAT_VERSION == 2
    assert head["descriptors"] == {**params.to_json(), "files": ["whitening_mean.npy", "whitening_projection.npy"]}
    loaded = LandmarkIndex.load(out)
    assert loaded.descriptor_params == params
    queries = np.concatenate([photos[1::4], others[10:]])
    for a, b in zip(loaded.search(queries, 3), index.search(queries, 3)):
        np.testing.assert_array_equal(a, b)
    # An index without post-processing writes no descriptors and reads back the same as a version-1 one.
    plain = LandmarkIndex.from_embeddings(photos, ids, MODEL).save(tmp_path / "plain")
    head = json.loads((plain / "index.json").read_text())
    assert head["descriptors"] is None
    head["format_version"] = 1
    del head["descriptors"]
    (plain / "index.json").write_text(json.dumps(head))
    assert not LandmarkIndex.load(plain).descriptor_params.active
    # A damaged whitening is refused, naming the part.
    np.save(out / "whitening_projection.npy", np.zeros((5, 5), np.float32))
    with pytest.raises(IndexFormatError, match="descriptor post-processing"):
        LandmarkIndex.load(out)


def test_index_command_whitens_expands_and_calibrates_on_what_it_searches(tiny_world, tmp_path, capsys):
    out = tmp_path / "index"
    args = tiny_index_args(tiny_world, out)
    assert main(args + ["--whiten", "0.25", "--dba", "1", "--query-expansion", "1",
                        "--nonlandmark-pool", str(tiny_world / "nonlandmarks.csv")]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    index = LandmarkIndex.load(out)
    n_db = index.build["n_images"]
    # Fewer photos than the 1,280 dimensions: the user is told that such a fit cost recall.
    assert f"--whiten is fitted on {n_db + 40} photos for 1280 dimensions" in captured.err
    assert index.build["whitening_photos"] == n_db + 40
    assert (f"descriptor: whitened (power 0.25, shrink 1, fitted on {n_db + 40} photos); DBA over 1 neighbours; "
            "queries expanded by 1 index vectors") in printed
    emb = calibration_embeddings(Recognizer(index), tiny_world)
    scores, _ = index.top1(emb)
    assert index.calibration.threshold == pytest.approx(calibrate_threshold(scores, 0.05).threshold, abs=1e-5)
    # Those scores are of the post-processed photos, not the raw ones.
    assert not np.allclose(index.describe(emb), emb, atol=1e-3)
    # A mistaken value is one line and exit 2.
    assert main(args + ["--whiten", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("landmarks index: error: --whiten") and "[0, 1]" in err[0]
