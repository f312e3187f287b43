"""retrieval/index.py: exactness of the flat index, chunking, approximate-index recall, errors."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.index import build_index, search, search_chunk_size


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def random_data():
    rng = np.random.default_rng(0)
    return unit(rng.standard_normal((1000, 32))), unit(rng.standard_normal((300, 32)))


@pytest.fixture(scope="module")
def clustered_data():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((100, 64))
    g_labels = rng.integers(0, 100, 8000)
    q_labels = rng.integers(0, 100, 500)
    gallery = unit(centers[g_labels] + 0.6 * rng.standard_normal((8000, 64)))
    queries = unit(centers[q_labels] + 0.6 * rng.standard_normal((500, 64)))
    return gallery, g_labels, queries, q_labels


def test_flat_equals_bruteforce(random_data):
    gallery, queries = random_data
    scores, ids = search(build_index(gallery, "flat"), queries, 10)
    sim = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    ref_ids = np.argsort(-sim, axis=1, kind="stable")[:, :10]
    ref_scores = np.take_along_axis(sim, ref_ids, axis=1)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == (300, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_chunked_search_equals_single_shot(random_data):
    gallery, queries = random_data
    index = build_index(gallery)
    s1, i1 = search(index, queries, 7, memory_budget_mb=1024)
    assert search_chunk_size(index, 7, 1024) >= len(queries)
    # a budget small enough for ~23-query chunks (13 faiss calls)
    budget = 23 * (2 * 12 * 7 + 4 * 1000) / 2**20
    assert search_chunk_size(index, 7, budget) == 23
    s2, i2 = search(index, queries, 7, memory_budget_mb=budget)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    # even one query per call
    s3, i3 = search(index, queries[:40], 7, memory_budget_mb=1e-6)
    np.testing.assert_array_equal(i1[:40], i3)


def test_chunk_size_uses_faiss_tile_not_full_gallery_row(random_data):
    gallery, _ = random_data
    index = build_index(np.concatenate([gallery] * 3))  # 3000 rows > faiss' 1024-row tile
    # per query: 2 x 12 B x k (results + faiss heaps) + 4 B x 1024 (one row of faiss' BLAS tile)
    assert search_chunk_size(index, 10, 1) == 2**20 // (240 + 4096)


def test_k_clipped_to_gallery_size(random_data):
    gallery, queries = random_data
    scores, ids = search(build_index(gallery[:20]), queries[:5], 50)
    assert ids.shape == (5, 20)
    assert sorted(ids[0].tolist()) == list(range(20))


def test_progress_bar_and_empty_queries(random_data, capsys):
    gallery, queries = random_data
    index = build_index(gallery)
    capsys.readouterr()
    quiet_s, quiet_i = search(index, queries, 3, memory_budget_mb=0.1, progress=False)
    assert capsys.readouterr() == ("", "")  # progress off: nothing written
    # 0.1 MiB = 104857 B; one flat query costs 2*12*3 + 4*min(1000, 1024) = 4072 B -> 25 queries
    # per chunk -> 300 / 25 = 12 chunks.
    assert search_chunk_size(index, 3, 0.1) == 25
    s, i = search(index, queries, 3, memory_budget_mb=0.1, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert "faiss search" in err and "12/12" in err  # tqdm's bar, on stderr, ran to completion
    assert i.shape == (300, 3)
    np.testing.assert_array_equal(i, quiet_i)
    np.testing.assert_array_equal(s, quiet_s)
    s, i = search(index, queries[:0], 3)
    assert s.shape == (0, 3) and s.dtype == np.float32
    assert i.shape == (0, 3) and i.dtype == np.int64


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_on_clustered_data(clustered_data, kind):
    gallery, g_labels, queries, q_labels = clustered_data
    flat_s, flat_i = search(build_index(gallery, "flat"), queries, 10)
    s, i = search(build_index(gallery, kind), queries, 10)
    # neighbour recall: fraction of the exact top-10 that the approximate index returns
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i, flat_i)])
    assert overlap >= 0.9
    # and top-1 label accuracy within 90 % of the exact one
    flat_p1 = np.mean(g_labels[flat_i[:, 0]] == q_labels)
    p1 = np.mean(g_labels[i[:, 0]] == q_labels)
    assert p1 >= 0.9 * flat_p1


def test_ivf_default_nlist_and_nprobe():
    rng = np.random.default_rng(2)
    small = unit(rng.standard_normal((1000, 16)))
    index = build_index(small, "ivf")
    assert index.nlist == 1000 // 39  # 4*sqrt(1000) = 126 clipped to 25 (>= 39 points per list)
    assert index.nprobe == 16
    big = unit(rng.standard_normal((40000, 8)))
    assert build_index(big, "ivf").nlist == 800  # 4 * sqrt(40000), 50 points per list
    assert build_index(small, "ivf", nlist=4, nprobe=16).nprobe == 4  # clipped to nlist
    tiny = build_index(small[:10], "ivf")
    assert tiny.nlist == 1
    _, ids = search(tiny, small[:3], 2)
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_hnsw_ef_search():
    rng = np.random.default_rng(3)
    index = build_index(unit(rng.standard_normal((200, 8))), "hnsw", hnsw_m=8, ef_search=64)
    assert index.hnsw.efSearch == 64


def test_bad_inputs():
    rng = np.random.default_rng(4)
    good = unit(rng.standard_normal((50, 8)))
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(good, "lsh")
    with pytest.raises(ValueError, match="2-D"):
        build_index(good[0])
    with pytest.raises(ValueError, match="2-D"):
        build_index(good[None])
    nan = good.copy()
    nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(nan)
    inf = good.copy()
    inf[4, 0] = -np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        build_index(inf)
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(good * 1.01)
    build_index(good * (1 + 5e-4))  # within the 1e-3 tolerance
    with pytest.raises(ValueError, match="floating"):
        build_index(np.ones((3, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="empty"):
        build_index(good[:0])
    with pytest.raises(ValueError, match="nlist"):
        build_index(good, "ivf", nlist=51)

    index = build_index(good)
    with pytest.raises(ValueError, match="dimension"):
        search(index, unit(rng.standard_normal((2, 9))), 1)
    with pytest.raises(ValueError, match="k must be"):
        search(index, good, 0)
    with pytest.raises(ValueError, match="L2-normalised"):
        search(index, good * 2, 1)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        search(index, good, 1, memory_budget_mb=0)


def test_float64_input_is_accepted(random_data):
    gallery, queries = random_data
    s64, i64 = search(build_index(gallery.astype(np.float64)), queries.astype(np.float64), 3)
    s32, i32 = search(build_index(gallery), queries, 3)
    np.testing.assert_array_equal(i64, i32)
