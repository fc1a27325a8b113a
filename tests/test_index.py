"""Indexes: exact search against a numpy brute force, FAISS wrappers, persistence, recall."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

import tokenret.index.exact as exact_module
from tokenret.index import (
    ExactIndex,
    FaissIndex,
    IndexFormatError,
    VectorIndex,
    check_recall,
    choose_index_spec,
    ivf_pq_spec,
    load_index,
    make_index,
    nn_recall_at_k,
    recall_at_k,
)
from tokenret.index.recall import recall_per_query

#: faiss-cpu is optional for users (the [faiss] extra); .ci/run always installs it.
NO_FAISS = "faiss-cpu is not installed (pip install 'tokenret[faiss]')"


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, n_clusters: int, seed: int, latent: int = 16) -> np.ndarray:
    """Unit vectors around cluster centres in a low-dimensional subspace (neighbour structure
    like real descriptors; ANN recall is meaningless on i.i.d. noise)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((latent, dim))
    centres = rng.standard_normal((n_clusters, latent))
    z = centres[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, latent))
    return unit_rows(z @ basis + 0.3 * rng.standard_normal((n, dim)))


def naive_search(data: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    """float64 brute force, ordered by (score desc, id asc), padded with (-inf, -1)."""
    scores = queries.astype(np.float64) @ data.astype(np.float64).T
    out_s = np.full((len(queries), k), -np.inf)
    out_i = np.full((len(queries), k), -1, np.int64)
    for r, row in enumerate(scores):
        order = np.lexsort((ids, -row))[:k]
        out_s[r, : len(order)] = row[order]
        out_i[r, : len(order)] = ids[order]
    return out_s, out_i


def assert_same_ranking(scores, ids, ref_scores, ref_ids, atol=1e-5):
    """Scores agree; ids agree except where the reference has near-equal scores (float rounding)."""
    np.testing.assert_allclose(scores, ref_scores, atol=atol)
    differ = ids != ref_ids
    # a swap is only acceptable between neighbours whose reference scores are within atol
    for r, c in np.argwhere(differ):
        near = np.abs(ref_scores[r] - ref_scores[r, c]) <= atol
        assert ids[r, c] in ref_ids[r, near], f"query {r} rank {c}: id {ids[r, c]} not among near-ties"


# ----------------------------------------------------------------------------------------------
# Exact index


@pytest.fixture(scope="module")
def integer_data():
    """Small-integer vectors: every product is exact in float32, and scores tie often."""
    rng = np.random.default_rng(0)
    data = rng.integers(-2, 3, size=(1000, 16)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(9, 16)).astype(np.float32)
    ids = rng.permutation(5000)[:1000].astype(np.int64)  # not in storage order
    return data, ids, queries


@pytest.mark.parametrize(
    "chunk_size,query_block,select_rows", [(7, 2, 21), (100, 1024, 64), (4096, 4, None), (1000, 9, 1000)]
)
@pytest.mark.parametrize("k", [1, 10, 257, 1500])
def test_exact_equals_brute_force_with_ties_and_padding(
    integer_data, monkeypatch, chunk_size, query_block, select_rows, k
):
    data, ids, queries = integer_data
    if select_rows is not None:  # many top-k selections and candidate merges per search
        monkeypatch.setattr(exact_module, "_MAX_SELECT_ROWS", select_rows)
        monkeypatch.setattr(exact_module, "_MERGE_WIDTH_FACTOR", 2)
    index = ExactIndex(16, chunk_size=chunk_size, query_block=query_block)
    index.add(data[:600], ids[:600])
    index.add(data[600:], ids[600:])
    scores, found = index.search(queries, k)
    ref_scores, ref_ids = naive_search(data, ids, queries, k)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and scores.shape == (9, k)
    np.testing.assert_array_equal(found, ref_ids)  # exact integers: ties ordered by id
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
    if k > 1000:
        assert (found[:, 1000:] == -1).all() and np.isneginf(scores[:, 1000:]).all()


@pytest.mark.parametrize("k", [5, 60, 700])
def test_exact_block_selection_with_removed_rows_equals_brute_force(integer_data, monkeypatch, k):
    """Many score blocks, each after the first filtered by the running k-th best, with removed rows (kept
    in storage, masked) in the first blocks: removed ids never come back, ties stay ordered by id."""
    data, ids, queries = integer_data
    monkeypatch.setattr(exact_module, "_MAX_SELECT_ROWS", 40)
    index = ExactIndex(16, chunk_size=8)
    index.add(data, ids)
    gone = ids[[0, 3, 5, 8, 13, 21, 34, 35, 36, 37, 38, 39, 55]]  # under 1/16: masked, not compacted
    index.remove(gone)
    assert index._alive is not None
    scores, found = index.search(queries, k)
    keep = ~np.isin(ids, gone)
    ref_scores, ref_ids = naive_search(data[keep], ids[keep], queries, k)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))


def test_exact_float_data_matches_float32_brute_force_on_fp16_rounded():
    rng = np.random.default_rng(1)
    x = unit_rows(rng.standard_normal((3000, 64)))
    q = unit_rows(rng.standard_normal((20, 64)))
    index = ExactIndex(64, chunk_size=333)
    ids = index.add(x)
    np.testing.assert_array_equal(ids, np.arange(3000))
    # storage is float16, rounded like numpy
    np.testing.assert_array_equal(index.reconstruct(ids[:50]), x[:50].astype(np.float16).astype(np.float32))
    scores, found = index.search(q, 50)
    ref_scores, ref_ids = naive_search(x.astype(np.float16), ids, q, 50)
    assert_same_ranking(scores, found, ref_scores, ref_ids, atol=1e-6)
    # a single vector is accepted as one query
    s1, i1 = index.search(q[0], 5)
    assert i1.shape == (1, 5) and (i1[0] == found[0, :5]).all()


@pytest.mark.parametrize("step", [7, 1])  # ids 0, 7, 14, ... (looked up) or 0..n-1 (the row is the id)
def test_exact_rescore_against_numpy(step):
    rng = np.random.default_rng(12)
    x = unit_rows(rng.standard_normal((200, 24)))
    q = unit_rows(rng.standard_normal((5, 24)))
    index = ExactIndex(24)
    index.add(x, np.arange(200) * step)
    cand = rng.integers(0, 200, size=(5, 30)) * step
    cand[:, -3:] = -1  # padding
    cand[0, 0] = 5 if step == 7 else 200  # not in the index
    got = index.rescore(q, cand, query_block=2)
    ref = q @ x.astype(np.float16).astype(np.float32).T
    expect = np.take_along_axis(ref, np.minimum(np.maximum(cand // step, 0), 199), axis=1)
    valid = (cand >= 0) & (cand % step == 0) & (cand < 200 * step)
    np.testing.assert_allclose(got[valid], expect[valid], atol=1e-6)
    assert np.isneginf(got[~valid]).all()
    assert np.isneginf(ExactIndex(24).rescore(q, cand)).all()


def test_exact_add_remove_and_ids():
    rng = np.random.default_rng(2)
    x = unit_rows(rng.standard_normal((100, 8)))
    index = ExactIndex(8, chunk_size=16)
    assert len(index) == 0 and index.search(x[:2], 3)[1].tolist() == [[-1] * 3] * 2
    assert index.add(x[:10]).tolist() == list(range(10))
    assert index.add(x[10:20], np.arange(100, 110)).tolist() == list(range(100, 110))
    assert index.add(x[20:22]).tolist() == [110, 111]  # numbering continues after the largest id
    with pytest.raises(ValueError, match="unique"):
        index.add(x[22:23], np.array([5]))
    with pytest.raises(ValueError, match="unique"):
        index.add(x[22:24], np.array([7000, 7000]))
    with pytest.raises(ValueError, match="shape"):
        index.add(x[:2, :4])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 8), np.nan, np.float32))
    assert index.remove(np.array([3, 104, 999])) == 2  # unknown ids are ignored
    assert len(index) == 20 and index.ntotal == 20
    _, found = index.search(x[[3, 14]], 22)
    assert 3 not in found and 104 not in found
    assert (found[:, 20:] == -1).all()
    assert set(found[0, :20]) == set(index.ids)
    index.add(x[3:4], np.array([3]))  # a removed id can be used again
    assert index.search(x[3], 1)[1][0, 0] == 3


def test_exact_remove_on_memory_mapped_index_marks_rows(tmp_path):
    rng = np.random.default_rng(3)
    x = unit_rows(rng.standard_normal((300, 8)))
    built = ExactIndex(8)
    built.add(x)
    built.save(tmp_path / "idx")
    index = load_index(tmp_path / "idx")
    index.chunk_size = 64
    assert index.is_memory_mapped
    assert index.remove(np.arange(0, 300, 2)) == 150
    assert index.is_memory_mapped  # only marked, storage untouched
    scores, found = index.search(x[:4], 300)
    assert (found[:, :150] % 2 == 1).all() and (found[:, 150:] == -1).all()
    assert np.isneginf(scores[:, 150:]).all()
    ref_s, ref_i = naive_search(x[1::2].astype(np.float16), np.arange(1, 300, 2), x[:4], 150)
    assert_same_ranking(scores[:, :150], found[:, :150], ref_s, ref_i, atol=1e-6)
    # saving over the directory it is mapped from writes only the live rows
    index.save(tmp_path / "idx")
    again = load_index(tmp_path / "idx")
    assert len(again) == 150 and (np.sort(again.ids) == np.arange(1, 300, 2)).all()
    np.testing.assert_array_equal(again.search(x[:4], 150)[1], found[:, :150])
    index.compact()
    assert not index.is_memory_mapped and len(index) == 150


def test_exact_save_load_round_trip_is_memory_mapped(tmp_path):
    rng = np.random.default_rng(4)
    x = unit_rows(rng.standard_normal((500, 32)))
    ids = rng.permutation(10_000)[:500]
    index = ExactIndex(32)
    index.add(x, ids)
    q = unit_rows(rng.standard_normal((7, 32)))
    before = index.search(q, 20)
    index.save(tmp_path / "exact")
    header = json.loads((tmp_path / "exact" / "index.json").read_text())
    assert header["kind"] == "exact" and header["dim"] == 32 and header["ntotal"] == 500
    mapped = np.load(tmp_path / "exact" / "vectors.npy", mmap_mode="r")
    assert mapped.dtype == np.float16 and mapped.shape == (500, 32)
    loaded = ExactIndex.load(tmp_path / "exact")
    assert isinstance(loaded, ExactIndex) and loaded.is_memory_mapped
    after = loaded.search(q, 20)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    # adding to a memory-mapped index copies it into memory and keeps working
    loaded.add(x[:1], np.array([10_001]))
    assert not loaded.is_memory_mapped and len(loaded) == 501
    assert loaded.search(x[0], 2)[1][0].tolist() in ([ids[0], 10_001], [10_001, ids[0]])
    # an empty index round-trips too
    ExactIndex(4).save(tmp_path / "empty")
    assert len(load_index(tmp_path / "empty")) == 0


def test_load_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="not a tokenret index"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "tokenret-index", "version": 99}))
    with pytest.raises(IndexFormatError, match="upgrade"):
        load_index(tmp_path)


# ----------------------------------------------------------------------------------------------
# FAISS


@pytest.fixture(scope="module")
def faiss():
    return pytest.importorskip("faiss", reason=NO_FAISS)


def test_faiss_flat_same_ranking_as_exact(faiss):
    rng = np.random.default_rng(5)
    x = unit_rows(rng.standard_normal((2000, 48))).astype(np.float16).astype(np.float32)
    q = unit_rows(rng.standard_normal((25, 48)))
    ids = rng.permutation(100_000)[:2000]
    exact, flat = make_index("exact", 48, chunk_size=500), make_index("Flat ", 48)
    fl = FaissIndex("Flat", 48)
    for index in (exact, flat, fl):
        index.add(x, ids)
    assert isinstance(exact, ExactIndex) and isinstance(flat, ExactIndex) and isinstance(fl, FaissIndex)
    ref = exact.search(q, 100)
    got = fl.search(q, 100)
    assert_same_ranking(got[0], got[1], ref[0], ref[1], atol=1e-5)
    # k larger than the collection pads
    s, i = fl.search(q[:2], 2100)
    assert (i[:, 2000:] == -1).all() and np.isneginf(s[:, 2000:]).all()
    assert set(i[0, :2000]) == set(ids)


def test_faiss_add_remove_ids_and_hnsw_removal_error(faiss):
    x = clustered(3000, 32, 30, seed=6)
    ivf = FaissIndex("IVF16,Flat", 32, nprobe=16)
    assert not ivf.is_trained
    assert ivf.add(x[:2000]).tolist() == list(range(2000))
    assert ivf.is_trained and ivf.nlist == 16
    assert FaissIndex("IVF64,Flat", 32).nprobe == 16  # not faiss's default of 1
    ivf.add(x[2000:], np.arange(5000, 6000))
    with pytest.raises(ValueError, match="unique"):
        ivf.add(x[:1], np.array([5000]))
    assert ivf.remove(np.array([0, 5000, 123456])) == 2
    assert len(ivf) == 2998
    _, found = ivf.search(x[[0, 2000]], 50)
    assert 0 not in found and 5000 not in found
    hnsw = make_index("HNSW16", 32)
    hnsw.add(x[:100])
    with pytest.raises(NotImplementedError, match="HNSW"):
        hnsw.remove(np.array([1]))
    with pytest.raises(ValueError, match="no nprobe"):
        hnsw.set_search_params(nprobe=4)
    hnsw.set_search_params(efSearch=64)
    assert hnsw.efSearch == 64
    assert (
        faiss.downcast_index(make_index("HNSW8", 32, efConstruction=99).faiss_index.index).hnsw.efConstruction
        == 99
    )
    with pytest.raises(ValueError, match="no HNSW graph"):
        make_index("IVF16,Flat", 32, efConstruction=99)
    flat = FaissIndex("Flat", 32, metric="l2")
    flat.add(x[:100])
    assert flat.remove(np.arange(10)) == 10
    s, i = flat.search(x[10], 1)  # l2 distances come back as inner products
    assert i[0, 0] == 10 and s[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_faiss_too_few_training_vectors(faiss):
    x = clustered(500, 16, 5, seed=7)
    index = FaissIndex("IVF64,PQ4", 16)
    with pytest.raises(ValueError, match=r"at least 2496 training vectors.*smaller"):
        index.add(x)
    assert len(index) == 0


@pytest.mark.parametrize("spec", ["IVF16,PQ8", "IVF16,PQ8x4fs"])
def test_faiss_save_load_round_trip_with_refine(faiss, tmp_path, spec):
    x = clustered(4000, 32, 40, seed=8)
    q = clustered(10, 32, 40, seed=9)
    index = FaissIndex(spec, 32, refine_factor=3, nprobe=4)
    index.add(x, np.arange(4000) * 3)
    before = index.search(q, 30)
    index.save(tmp_path / "ivfpq")
    header = json.loads((tmp_path / "ivfpq" / "index.json").read_text())
    assert header["kind"] == "faiss" and header["spec"] == spec and header["nprobe"] == 4
    loaded = VectorIndex.load(tmp_path / "ivfpq")
    assert isinstance(loaded, FaissIndex) and loaded.nprobe == 4 and loaded.refine_factor == 3
    assert loaded._store.is_memory_mapped  # the float16 vectors for re-ranking stay on disk
    after = loaded.search(q, 30)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0])
    # re-ranking can be switched off and on again
    loaded.refine_factor = None
    assert recall_at_k(loaded.search(q, 30)[1], after[1], 30) < 1.0
    loaded.refine_factor = 3
    np.testing.assert_array_equal(loaded.search(q, 30)[1], before[1])
    with pytest.raises(ValueError, match="no vectors for re-ranking"):
        FaissIndex("Flat", 32).refine_factor = 2
    with pytest.raises(IndexFormatError, match="FaissIndex"):
        ExactIndex.load(tmp_path / "ivfpq")
    # re-ranked scores are exact inner products with the float16-rounded vectors
    ref = q @ x.astype(np.float16).astype(np.float32).T
    np.testing.assert_allclose(after[0][0], ref[0, after[1][0] // 3], atol=1e-5)
    # removal (fast-scan lists too): removed ids never come back, the rest keep their order
    gone = before[1][:, :5].ravel()
    assert loaded.remove(gone) == len(np.unique(gone))
    ids_after = loaded.search(q, 30)[1]
    assert not np.isin(ids_after, gone).any()


@pytest.fixture(scope="module")
def recall_data():
    x = clustered(20_000, 64, 200, seed=10)
    rng = np.random.default_rng(11)
    # queries: perturbed database points, so they fall in the same clusters
    q = unit_rows(x[rng.choice(len(x), 100, replace=False)] + 0.05 * rng.standard_normal((100, 64)))
    exact = ExactIndex(64)
    exact.add(x)
    return x, q, exact


@pytest.mark.parametrize(
    "spec,options,min_recall",
    [
        ("HNSW32", {"efSearch": 128}, 0.95),
        ("IVF64,PQ16", {"nprobe": 16, "refine_factor": 4}, 0.95),
        ("IVF64_HNSW16,PQ16", {"nprobe": 16, "refine_factor": 4, "efSearch": 64, "efConstruction": 80}, 0.95),
        ("IVF64_HNSW32,PQ16x4fs", {"nprobe": 16, "refine_factor": 4}, 0.95),  # ivf_pq_spec's kind
    ],
)
@pytest.mark.slow
def test_ann_recall_on_clustered_data(faiss, recall_data, spec, options, min_recall):
    x, q, exact = recall_data
    index = make_index(spec, 64, **options)
    index.add(x)
    report = check_recall(index, exact, q, k=100)
    assert report.recall >= min_recall, str(report)
    assert report.n_queries == 100
    assert report.nn_recall >= 0.95, str(report)  # the exact nearest neighbour is found too


@pytest.mark.slow
def test_refinement_raises_pq_recall(faiss, recall_data):
    x, q, exact = recall_data
    plain = FaissIndex("IVF64,PQ8", 64, nprobe=16)
    plain.add(x)
    refined = FaissIndex("IVF64,PQ8", 64, nprobe=16, refine_factor=4)
    refined.add(x)
    _, truth = exact.search(q, 100)
    r_plain = recall_at_k(plain.search(q, 100)[1], truth, 100)
    r_refined = recall_at_k(refined.search(q, 100)[1], truth, 100)
    assert r_refined > r_plain + 0.05 and r_refined >= 0.9, (r_plain, r_refined)


def test_missing_faiss_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        make_index("HNSW32", 16)
    assert isinstance(make_index("Flat", 16), ExactIndex)  # exact search needs no faiss


# ----------------------------------------------------------------------------------------------
# Factories and recall


def test_make_index_and_choose_index_spec(faiss):
    assert isinstance(make_index("exact", 8), ExactIndex)
    assert isinstance(make_index("FLAT", 8, chunk_size=10), ExactIndex)
    assert isinstance(make_index("HNSW32", 8), FaissIndex)
    with pytest.raises(ValueError, match="cannot build"):
        make_index("NoSuchIndex12", 8)
    with pytest.raises(ValueError, match="non-empty"):
        make_index("", 8)
    assert choose_index_spec(0, 1024) == "Flat"
    assert choose_index_spec(200_000, 1024) == "Flat"
    assert choose_index_spec(200_001, 1024) == "IVF2048_HNSW32,PQ128x4fs"
    assert choose_index_spec(1_000_000, 1024) == "IVF4096_HNSW32,PQ128x4fs"
    assert choose_index_spec(10_000_000, 2048) == "IVF16384_HNSW32,PQ256x4fs"
    # 100/8 -> 12 does not divide 100, 11 is odd (fast scan packs pairs of 4-bit codes): 10
    assert choose_index_spec(1_000_000, 100) == "IVF4096_HNSW32,PQ10x4fs"
    assert ivf_pq_spec(1000, 64) == "IVF128_HNSW32,PQ8x4fs"  # the same rule below the exact limit
    with pytest.raises(ValueError, match="need n >= 0"):
        ivf_pq_spec(-1, 64)
    # every chosen spec is buildable
    make_index(choose_index_spec(1_000_000, 100), 100)


def test_recall_at_k_against_hand_count():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    approx = np.array([[4, 9, 1, 8], [6, -1, -1, -1], [-1, -1, -1, -1]])
    per_query = recall_per_query(approx, exact, 4)
    np.testing.assert_allclose(per_query[:2], [2 / 4, 1 / 2])
    assert np.isnan(per_query[2])
    assert recall_at_k(approx, exact, 4) == pytest.approx((0.5 + 0.5) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx((0 + 0) / 2)
    assert recall_at_k(exact, exact, 2) == 1.0
    with pytest.raises(ValueError, match="exceeds"):
        recall_at_k(approx, exact, 5)


def test_nn_recall_counts_queries_whose_nearest_neighbour_is_found():
    exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1], [7, 8, 9, 10]])
    approx = np.array([[4, 9, 1, 8], [6, -1, -1, -1], [-1, -1, -1, -1], [8, 9, 10, 11]])
    # the first query's nearest (1) is third, the second's (5) missing, the fourth's (7) missing
    assert nn_recall_at_k(approx, exact, 4) == pytest.approx(1 / 3)
    assert nn_recall_at_k(approx, exact, 2) == 0.0
    assert nn_recall_at_k(exact, exact, 1) == 1.0
    # against a naive loop on random lists
    rng = np.random.default_rng(0)
    a = np.stack([rng.permutation(50)[:10] for _ in range(40)])
    e = np.stack([rng.permutation(50)[:10] for _ in range(40)])
    for k in (1, 5, 10):
        naive = np.mean([e[i, 0] in a[i, :k] for i in range(40)])
        assert nn_recall_at_k(a, e, k) == pytest.approx(naive)
    assert nn_recall_at_k(a, e, 1) == pytest.approx(recall_at_k(a, e, 1))
    with pytest.raises(ValueError, match="exceeds"):
        nn_recall_at_k(approx, exact, 5)


def test_from_arrays_searches_rows_in_place_and_skips_dead_rows(tmp_path):
    from tokenret.index.exact import ExactIndex

    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    path = tmp_path / "v.f16"
    path.write_bytes(x.astype(np.float16).tobytes())
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=(50, 16))
    alive = np.ones(50, bool)
    alive[::3] = False
    ids = np.arange(50, dtype=np.int64) + 1000
    ids[~alive] = -1
    index = ExactIndex.from_arrays(mm, ids, alive)
    assert index.ntotal == alive.sum() and index._vectors is mm
    scores, found = index.search(x[:5], 4)
    xa = x.astype(np.float16).astype(np.float32)
    brute = xa[alive] @ x[:5].T
    expected = (np.flatnonzero(alive)[np.argsort(-brute, axis=0, kind="stable")[:4]] + 1000).T
    np.testing.assert_array_equal(found, expected)
    with pytest.raises(ValueError, match="unique"):
        ExactIndex.from_arrays(mm, np.zeros(50, np.int64))


@pytest.mark.parametrize("threads", [1, 3])
def test_single_queries_by_the_faiss_float16_scan_equal_the_blas_path(threads, monkeypatch):
    """Few queries go through FAISS's float16 scan over the rows it owns; more through upcast + BLAS. Both
    must give the same ids and (to summation order) scores, with removals, growth, compaction and ties.
    With 3 threads the scan is split into 3 row ranges scanned at once, then merged."""
    pytest.importorskip("faiss", reason=NO_FAISS)
    from tokenret.index import exact

    monkeypatch.setattr(exact, "PARALLEL_SCAN_MIN_ROWS", 500)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    x[100] = x[7]  # an exact tie: lower id first in both paths
    x[2000] = x[51]  # a tie across two of the 3 ranges
    fast = ExactIndex(48)
    slow = ExactIndex(48, faiss_scan=False)
    for index in (fast, slow):
        index.add(x[:1500])
        index.add(x[1500:])  # grows the storage
        index.remove(np.arange(1, 3000, 7))  # 14% removed (not 7, 51, 100): compacted past 1/16
        index.remove([2999])
    assert fast._sq is not None and slow._sq is None
    q = np.concatenate([x[[7, 51]], rng.standard_normal((3, 48)).astype(np.float32)])
    for i in range(len(q)):
        sf, idf = fast.search(q[i : i + 1], 20)
        ss, ids = slow.search(q[i : i + 1], 20)
        np.testing.assert_array_equal(idf, ids)
        np.testing.assert_allclose(sf, ss, rtol=1e-6, atol=1e-6)
    assert fast.search(x[7:8], 3)[1][0, :2].tolist() == [7, 100]
    assert fast.search(x[51:52], 3)[1][0, :2].tolist() == [51, 2000]
    assert 2999 not in fast.search(x[2999:3000], 50)[1]
    # more queries than FAISS_SCAN_MAX_QUERIES take the BLAS path: identical results
    many = q[: exact.FAISS_SCAN_MAX_QUERIES + 1]
    np.testing.assert_array_equal(fast.search(many, 20)[1], slow.search(many, 20)[1])
    # k beyond the live rows pads
    small = ExactIndex(48)
    small.add(x[:3])
    s, i = small.search(x[:1], 5)
    assert i[0].tolist()[3:] == [-1, -1] and np.isinf(s[0, 3:]).all()


def test_in_memory_copy_of_a_memory_mapped_index_searches_the_same(tmp_path):
    pytest.importorskip("faiss", reason=NO_FAISS)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    index = ExactIndex(32)
    index.add(x, ids=np.arange(1000, 1500))
    index.save(tmp_path / "idx")
    mapped = load_index(tmp_path / "idx")
    assert mapped.is_memory_mapped and mapped._sq is None
    mapped.remove([1003, 1200])  # marked only (memory-mapped)
    copy = mapped.in_memory()
    assert not copy.is_memory_mapped and copy._sq is not None and copy.ntotal == 498
    for q in (x[3:4], x[10:11], x[:5]):
        s1, i1 = mapped.search(q, 10)
        s2, i2 = copy.search(q, 10)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=1e-6, atol=1e-6)
    assert 1003 not in copy.search(x[3:4], 10)[1]


@pytest.mark.parametrize("nq, m, k", [(1, 400, 100), (5, 30, 10), (3, 8, 10)])
def test_sort_results_equals_a_naive_sort(nq, m, k):
    """(score desc, id asc), -1 / -inf padding last, padded to k: against Python's sorted() per row."""
    from tokenret.index.base import sort_results

    rng = np.random.default_rng(nq * m)
    scores = rng.integers(0, 6, (nq, m)).astype(np.float32) / 4  # many ties
    ids = np.stack([rng.permutation(10 * m)[:m] for _ in range(nq)]).astype(np.int64)
    ids[:, ::7] = -1  # padding entries
    scores[:, 1::9] = -np.inf
    got_s, got_i = sort_results(scores, ids, k)
    for r in range(nq):
        real = sorted((-s, i) for s, i in zip(scores[r], ids[r], strict=True) if i >= 0 and s > -np.inf)[:k]
        want_i = [i for _, i in real] + [-1] * (k - len(real))
        want_s = [-s for s, _ in real] + [-np.inf] * (k - len(real))
        assert got_i[r].tolist() == want_i
        np.testing.assert_array_equal(got_s[r], np.float32(want_s))
