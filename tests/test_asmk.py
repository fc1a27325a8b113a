"""Codebook and ASMK / ASMK*: against brute-force numpy restatements of the kernel (spec local-features.md
section 6, items 4-8)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenret.aggregate import asmk as asmk_module
from tokenret.aggregate.asmk import (
    AsmkIndex,
    aggregate_residuals,
    asmk_similarity,
    binarize_and_pack,
    packed_hamming,
)
from tokenret.aggregate.codebook import Codebook
from tokenret.index.base import IndexFormatError


def nn_words(x: np.ndarray, centroids: np.ndarray, m: int) -> np.ndarray:
    """Brute force: the m nearest centroids of each row by float64 squared L2, nearest first."""
    d = ((x[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :m]


def residual_sums(x: np.ndarray, centroids: np.ndarray, m: int) -> dict[int, list[np.ndarray]]:
    """word -> list of float64 residuals of the descriptors having it among their m nearest words."""
    out: dict[int, list[np.ndarray]] = {}
    for xi, words in zip(x, nn_words(x, centroids, m), strict=True):
        for w in words:
            out.setdefault(int(w), []).append(xi.astype(np.float64) - centroids[w])
    return out


def all_pairs_asmk(xq, xd, centroids, mq, md):
    """Spec test 5: non-binary ASMK, alpha 1, no threshold, no IDF, as a sum over ALL descriptor pairs."""
    rq, rd = residual_sums(xq, centroids, mq), residual_sums(xd, centroids, md)
    total = 0.0
    for w in set(rq) & set(rd):
        pairs = sum(float(a @ b) for a in rq[w] for b in rd[w])
        norm_q = np.linalg.norm(np.sum(rq[w], axis=0)) + 1e-6
        norm_d = np.linalg.norm(np.sum(rd[w], axis=0)) + 1e-6
        total += pairs / (norm_q * norm_d)
    return total / np.sqrt(len(rq) * len(rd))


def asmk_star_direct(xq, xd, centroids, mq, md, alpha=3.0, tau=0.0, idf=None):
    """Spec test 6: +-1 vectors (bit = A > 0), u = dot / d, keep u >= tau, sum u^alpha, normalise."""
    rq, rd = residual_sums(xq, centroids, mq), residual_sums(xd, centroids, md)
    weight = (lambda w: 1.0) if idf is None else (lambda w: float(idf[w]))
    total = 0.0
    for w in set(rq) & set(rd):
        bq = np.where(np.sum(rq[w], axis=0) > 0, 1.0, -1.0)
        bd = np.where(np.sum(rd[w], axis=0) > 0, 1.0, -1.0)
        u = float(bq @ bd) / len(bq)
        if u >= tau:
            total += weight(w) * np.sign(u) * abs(u) ** alpha
    norm_q = sum(weight(w) for w in rq)
    norm_d = sum(weight(w) for w in rd)
    return total / np.sqrt(norm_q * norm_d)


def random_codebook(k=16, d=16, seed=0) -> Codebook:
    return Codebook(np.random.default_rng(seed).standard_normal((k, d)).astype(np.float32))


def random_sets(n_sets, d=16, sizes=(5, 40), seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(*sizes)), d)).astype(np.float32) for _ in range(n_sets)]


# ---------------------------------------------------------------------------------------------- codebook


def test_kmeans_recovers_well_separated_blob_centres():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((4, 8)) * 10
    x = centres[rng.integers(0, 4, 2000)] + 0.1 * rng.standard_normal((2000, 8))
    codebook = Codebook.train(x.astype(np.float32), size=4, seed=3, nredo=10)
    dist = ((codebook.centroids[:, None].astype(np.float64) - centres[None]) ** 2).sum(-1)
    assert sorted(dist.argmin(axis=1).tolist()) == [0, 1, 2, 3]  # one centroid per blob
    assert dist.min(axis=1).max() < 0.01


def test_quantize_equals_bruteforce_argsort():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((1500, 16)).astype(np.float32)
    codebook = Codebook.train(train, size=32, seed=0)
    assert codebook.centroids.shape == (32, 16) and codebook.centroids.dtype == np.float32
    x = rng.standard_normal((300, 16)).astype(np.float32)
    for m in (1, 5):
        words, dist = codebook.quantize(x, m, return_distances=True)
        assert words.dtype == np.int64 and words.shape == (300, m)
        np.testing.assert_array_equal(words, nn_words(x, codebook.centroids, m))
        ref = ((x[:, None] - codebook.centroids[words]) ** 2).sum(-1)
        np.testing.assert_allclose(dist, ref, rtol=1e-4, atol=1e-4)


def test_codebook_refuses_too_few_descriptors_and_round_trips(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="at least 64 training descriptors, got 20"):
        Codebook.train(x, size=64)
    with pytest.raises(ValueError, match="at least 8 training descriptors, got 5"):
        Codebook.train(x, size=8, max_descriptors=5)  # sub-sampled below K
    codebook = Codebook.train(x, size=8, seed=1)
    again = Codebook.train(x, size=8, seed=1)
    np.testing.assert_array_equal(codebook.centroids, again.centroids)  # seeded
    path = codebook.save(tmp_path / "cb" / "codebook.npy")
    loaded = Codebook.load(path)
    np.testing.assert_array_equal(loaded.centroids, codebook.centroids)
    np.testing.assert_array_equal(loaded.quantize(x, 3), codebook.quantize(x, 3))
    with pytest.raises(ValueError, match="multiple assignment"):
        codebook.quantize(x, 9)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        codebook.quantize(x[:, :3])


# ------------------------------------------------------------------------------------------ aggregation


def test_query_descriptor_contributes_to_each_of_its_m_words():
    codebook = random_codebook(k=16, d=16)
    x = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)
    agg = aggregate_residuals(x, codebook, m=5, binary=False)
    expected_words = np.sort(nn_words(x, codebook.centroids, 5)[0])
    np.testing.assert_array_equal(agg.words, expected_words)
    for w, v in zip(agg.words, agg.vectors, strict=True):
        r = x[0].astype(np.float64) - codebook.centroids[w]
        np.testing.assert_allclose(v, r / (np.linalg.norm(r) + 1e-6), rtol=1e-5, atol=1e-6)
    binary = aggregate_residuals(x, codebook, m=5, binary=True)
    np.testing.assert_array_equal(binary.words, expected_words)
    assert binary.vectors.shape == (5, 2) and binary.vectors.dtype == np.uint8
    bits = np.unpackbits(binary.vectors, axis=1, bitorder="little")
    np.testing.assert_array_equal(bits, (x[0] - codebook.centroids[expected_words]) > 0)


@pytest.mark.parametrize("mq", [1, 3])
def test_nonbinary_asmk_equals_sum_over_all_descriptor_pairs(mq):
    codebook = random_codebook(k=12, d=8, seed=2)
    xq, *database = random_sets(6, d=8, sizes=(10, 30), seed=3)
    index = AsmkIndex(
        codebook, binary=False, alpha=1.0, tau=-np.inf, query_assignment=mq, database_assignment=1
    )
    index.add(database)
    scores = index.score_all(xq)
    for j, xd in enumerate(database):
        expected = all_pairs_asmk(xq, xd, codebook.centroids, mq, 1)
        q = aggregate_residuals(xq, codebook, mq, binary=False)
        d = aggregate_residuals(xd, codebook, 1, binary=False)
        assert asmk_similarity(q, d, alpha=1.0, tau=-np.inf) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert scores[j] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_asmk_star_equals_direct_pm1_evaluation_for_every_database_image():
    codebook = random_codebook(k=32, d=16, seed=4)
    c = codebook.centroids
    rng = np.random.default_rng(6)
    xq = (np.repeat(c[:3], 8, axis=0) + 0.5 * rng.standard_normal((24, 16))).astype(np.float32)
    database = random_sets(8, d=16, sizes=(10, 40), seed=7)
    database += [(c[i] + 0.5 * rng.standard_normal((12, 16))).astype(np.float32) for i in range(3)]
    # an image whose only word is one the query (m = 5) never uses: it must score exactly 0
    query_words = set(nn_words(xq, c, 5).ravel().tolist())
    unused = next(w for w in range(32) if w not in query_words)
    database.append((c[unused] + 1e-3 * rng.standard_normal((3, 16))).astype(np.float32))
    index = AsmkIndex(codebook)  # HOW's settings: binary, alpha 3, tau 0, m 5 / 1, no IDF
    ids = index.add(database)
    scores = index.score_all(xq)
    expected = np.array([asmk_star_direct(xq, xd, c, 5, 1) for xd in database])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    assert scores[-1] == 0.0 and (expected[:-1] > 0).any()
    found_scores, found = index.search([xq], k=len(database))
    np.testing.assert_allclose(found_scores[0], np.sort(expected)[::-1], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        expected[np.searchsorted(ids, found[0])], found_scores[0], rtol=1e-5, atol=1e-7
    )


def test_threshold_and_exponent_follow_the_selectivity_function():
    codebook = random_codebook(k=8, d=16, seed=8)
    c = codebook.centroids
    xq, xd = random_sets(2, d=16, sizes=(30, 31), seed=9)
    q = aggregate_residuals(xq, codebook, 5, binary=True)
    d = aggregate_residuals(xd, codebook, 1, binary=True)
    for alpha, tau in [(3.0, 0.0), (1.0, -np.inf), (3.0, -np.inf), (2.0, 0.25), (3.0, 1.01)]:
        expected = asmk_star_direct(xq, xd, c, 5, 1, alpha=alpha, tau=tau)
        assert asmk_similarity(q, d, alpha=alpha, tau=tau) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # tau above every possible u: nothing counts; alpha 3 keeps the sign of negative similarities
    assert asmk_similarity(q, d, alpha=3.0, tau=1.01) == 0.0
    u_all = 1 - 2 * packed_hamming(q.vectors[:, None], d.vectors[None]) / 16
    assert u_all.min() >= -1 and u_all.max() <= 1


def test_packed_hamming_equals_bit_count_and_u_bounds():
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((50, 128)), rng.standard_normal((50, 128))
    pa, pb = binarize_and_pack(a), binarize_and_pack(b)
    assert pa.shape == (50, 16)
    expected = ((a > 0) != (b > 0)).mean(axis=1) * 128  # scipy.spatial.distance.hamming x 128
    np.testing.assert_array_equal(packed_hamming(pa, pb), expected)
    u = 1 - 2 * packed_hamming(pa, pb) / 128
    assert (u >= -1).all() and (u <= 1).all()
    assert (packed_hamming(pa, pa) == 0).all()  # identical codes: u = 1
    assert (packed_hamming(pa, binarize_and_pack(-a)) == 128).all()  # opposite signs: u = -1
    assert binarize_and_pack(np.zeros((1, 8)))[0, 0] == 0  # a zero component maps to bit 0


# ---------------------------------------------------------------------------------------- inverted file


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("use_idf", [False, True])
def test_inverted_file_ranks_like_scoring_every_image(binary, use_idf):
    codebook = random_codebook(k=24, d=16, seed=11)
    database = random_sets(30, d=16, sizes=(3, 25), seed=12)
    queries = random_sets(4, d=16, sizes=(5, 30), seed=13)
    index = AsmkIndex(codebook, binary=binary, use_idf=use_idf)
    ids = index.add(database, ids=np.arange(100, 130))
    idf = index.idf if use_idf else None
    aggregated = [aggregate_residuals(x, codebook, 1, binary=binary) for x in database]
    scores, found = index.search(queries, k=10)
    assert scores.shape == found.shape == (4, 10)
    for qi, xq in enumerate(queries):
        q = aggregate_residuals(xq, codebook, 5, binary=binary)
        ref = np.array([asmk_similarity(q, d, alpha=3.0, tau=0.0, idf=idf) for d in aggregated])
        np.testing.assert_allclose(index.score_all(xq), ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(scores[qi], np.sort(ref)[::-1][:10], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ref[found[qi] - 100], scores[qi], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(index.ids, ids)


def test_search_reads_posting_lists_in_chunks_without_changing_scores(monkeypatch):
    codebook = random_codebook(k=8, d=16, seed=14)
    database = random_sets(40, d=16, sizes=(5, 20), seed=15)
    (xq,) = random_sets(1, d=16, sizes=(20, 21), seed=16)
    index = AsmkIndex(codebook, binary=False)
    index.add(database)
    whole = index.score_all(xq)
    monkeypatch.setattr(asmk_module, "SEARCH_CHUNK_ENTRIES", 7)
    np.testing.assert_allclose(index.score_all(xq), whole, rtol=1e-6, atol=1e-7)


def test_idf_weights_and_a_word_in_every_image_contributes_nothing():
    codebook = random_codebook(k=10, d=16, seed=17)
    c = codebook.centroids
    rng = np.random.default_rng(18)
    database = []
    for i in range(6):
        common = c[0] + 1e-3 * rng.standard_normal((2, 16))  # word 0 in every image
        other = c[1 + i % 3] + 1e-3 * rng.standard_normal((2, 16))  # words 1..3, each in 2 images
        database.append(np.concatenate([common, other]).astype(np.float32))
    index = AsmkIndex(codebook, binary=False, use_idf=True, query_assignment=1)
    index.add(database)
    counts = np.zeros(10)
    for x in database:
        counts[np.unique(nn_words(x, c, 1))] += 1
    held = counts > 0
    expected_idf = np.ones(10)
    expected_idf[held] = np.log(6 / counts[held]) ** 2
    np.testing.assert_allclose(index.idf, expected_idf)
    assert index.idf[0] == 0.0 and index.idf[1] == pytest.approx(np.log(3) ** 2)
    np.testing.assert_array_equal(index.counts, counts)
    # query = word 0 and word 1: only word 1 can score; changing the word-0 descriptors changes nothing
    q1 = (c[1] + 1e-3 * rng.standard_normal((2, 16))).astype(np.float32)
    q0a = (c[0] + 0.5 * rng.standard_normal((2, 16))).astype(np.float32)
    q0b = (c[0] + 0.5 * rng.standard_normal((2, 16))).astype(np.float32)
    s_a = index.score_all(np.concatenate([q0a, q1]))
    s_b = index.score_all(np.concatenate([q0b, q1]))
    np.testing.assert_allclose(s_a, s_b, rtol=1e-6)
    assert (s_a[[0, 3]] > 0).all() and (s_a[[1, 2, 4, 5]] == 0).all()
    # direct formula with idf: idf_w sigma(u) / sqrt(sum idf over W_q) / sqrt(sum idf over W_d)
    xq = np.concatenate([q0a, q1])
    for j, xd in enumerate(database):
        expected = direct_nonbinary(xq, xd, c, alpha=3.0, tau=0.0, idf=expected_idf)
        assert s_a[j] == pytest.approx(expected, rel=1e-5, abs=1e-8)
    # a query of word 0 only: nothing to score, all zeros (not NaN)
    assert (index.score_all(q0a) == 0).all()


def direct_nonbinary(xq, xd, c, alpha, tau, idf):
    rq, rd = residual_sums(xq, c, 1), residual_sums(xd, c, 1)
    total = 0.0
    for w in set(rq) & set(rd):
        a, b = np.sum(rq[w], axis=0), np.sum(rd[w], axis=0)
        u = float(a @ b) / ((np.linalg.norm(a) + 1e-6) * (np.linalg.norm(b) + 1e-6))
        if u >= tau:
            total += idf[w] * np.sign(u) * abs(u) ** alpha
    return total / np.sqrt(sum(idf[w] for w in rq) * sum(idf[w] for w in rd))


def test_save_load_round_trip_remove_and_id_rules(tmp_path):
    codebook = random_codebook(k=16, d=16, seed=19)
    database = random_sets(12, d=16, sizes=(4, 30), seed=20)
    queries = random_sets(3, d=16, sizes=(5, 30), seed=21)
    for binary in (True, False):
        index = AsmkIndex(codebook, binary=binary, use_idf=True, alpha=2.0, tau=0.1, query_assignment=3)
        index.add(database[:7])
        index.add(database[7:])  # two batches: pending entries merged
        before = index.search(queries, k=5)
        index.save(tmp_path / f"asmk_{binary}")
        loaded = AsmkIndex.load(tmp_path / f"asmk_{binary}")
        assert loaded.settings() == index.settings() and loaded.ntotal == 12
        after = loaded.search(queries, k=5)
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_array_equal(after[0], before[0])
        # removal: same scores as an index built without those images (IDF and norms recomputed)
        assert loaded.remove(np.array([0, 5, 11, 99])) == 3
        fresh = AsmkIndex(codebook, binary=binary, use_idf=True, alpha=2.0, tau=0.1, query_assignment=3)
        keep = [i for i in range(12) if i not in (0, 5, 11)]
        fresh.add([database[i] for i in keep], ids=np.array(keep))
        for xq in queries:
            np.testing.assert_allclose(loaded.score_all(xq), fresh.score_all(xq), rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="unique"):
        index.add(database[:1], ids=np.array([3]))
    assert index.add(database[:2]).tolist() == [12, 13]
    # k larger than the index: padding
    small = AsmkIndex(codebook)
    small.add(database[:2])
    scores, found = small.search(queries[0], k=4)
    assert found[0, 2:].tolist() == [-1, -1] and np.isneginf(scores[0, 2:]).all()
    empty_scores, empty_found = AsmkIndex(codebook).search(queries, k=2)
    assert (empty_found == -1).all()
    with pytest.raises(IndexFormatError):
        AsmkIndex.load(tmp_path / "missing")
    (tmp_path / f"asmk_{True}" / "asmk.npz").unlink()
    with pytest.raises(IndexFormatError, match="lacks asmk.npz"):
        AsmkIndex.load(tmp_path / f"asmk_{True}")


def test_posting_entries_are_int32_and_files_with_int64_entries_still_load(tmp_path):
    cb = random_codebook()
    index = AsmkIndex(cb, binary=True)
    sets = random_sets(12)
    index.add(sets)
    index.remove([3])
    index.save(tmp_path / "new")
    loaded = AsmkIndex.load(tmp_path / "new")
    assert loaded._words.dtype == np.int32 and loaded._rows.dtype == np.int32
    # an index saved with int64 entries (before) loads to the same scores
    arrays = dict(np.load(tmp_path / "new" / "asmk.npz"))
    arrays["words"], arrays["rows"] = arrays["words"].astype(np.int64), arrays["rows"].astype(np.int64)
    (tmp_path / "old").mkdir()
    for name in ("index.json", "codebook.npy"):
        (tmp_path / "old" / name).write_bytes((tmp_path / "new" / name).read_bytes())
    with open(tmp_path / "old" / "asmk.npz", "wb") as f:
        np.savez(f, **arrays)
    old = AsmkIndex.load(tmp_path / "old")
    for q in sets[:4]:
        np.testing.assert_array_equal(old.score_all(q), index.score_all(q))


def test_a_learned_codebook_is_learned_from_each_evaluated_database(monkeypatch):
    from tokenret.aggregate import aggregators

    rng = np.random.default_rng(0)
    db1 = [rng.standard_normal((50, 8)).astype(np.float32) for _ in range(4)]
    db2 = [rng.standard_normal((50, 8)).astype(np.float32) + 5.0 for _ in range(4)]
    calls = []
    real = aggregators.learn_codebook
    monkeypatch.setattr(aggregators, "learn_codebook", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    agg = aggregators.AsmkAggregator(codebook_size=4)
    assert agg.needs_preparation
    agg.scores(db1, db1[:2])  # prepares itself
    agg.prepare(db1)  # the same database: not learned again
    assert len(calls) == 1 and calls[0] is db1
    agg.prepare(db2)  # the next dataset: its own words, not the first one's
    assert len(calls) == 2 and calls[1] is db2
    np.testing.assert_allclose(agg.codebook.centroids, real(db2, 4).centroids)
    assert agg.codebook.centroids.mean() > 4  # learnt where db2 lies
    # a given codebook is never replaced
    given = real(db1, 4)
    fixed = aggregators.VladAggregator(given)
    fixed.prepare(db2)
    assert fixed.codebook is given and not fixed.needs_preparation and len(calls) == 2
