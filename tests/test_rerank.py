"""alpha-QE and DBA against straightforward per-vector loops."""

from __future__ import annotations

import numpy as np
import pytest

from tokenret.rerank import alpha_query_expansion, database_side_augmentation, nearest_neighbours


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_expand(vector, database, candidates, k, alpha):
    """vector + sum over the k most similar candidates (ties: lower index) of weight * candidate."""
    sims = {j: float(np.dot(vector, database[j])) for j in candidates}
    chosen = sorted(candidates, key=lambda j: (-sims[j], j))[:k]
    total = np.array(vector, dtype=np.float64)
    for j in chosen:
        weight = 1.0 if alpha == 0 else sims[j] ** alpha if sims[j] > 0 else 0.0  # alpha 0: average QE
        total = total + weight * database[j]
    norm = np.linalg.norm(total)
    return total / norm if norm > 0 else total


def naive_qe(queries, database, k, alpha):
    return np.stack([naive_expand(q, database, list(range(len(database))), k, alpha) for q in queries])


def naive_dba(database, k, alpha):
    n = len(database)
    return np.stack(
        [
            naive_expand(x, database, [j for j in range(n) if j != i], k - 1, alpha)
            for i, x in enumerate(database)
        ]
    )


@pytest.mark.parametrize("k, alpha", [(1, 3.0), (5, 3.0), (10, 0.0), (7, 0.5)])
@pytest.mark.parametrize("max_scores", [1 << 24, 37])
def test_alpha_qe_matches_loop(k, alpha, max_scores):
    rng = np.random.default_rng(0)
    db = unit_rows(rng, 80, 12)
    queries = unit_rows(rng, 9, 12)
    out = alpha_query_expansion(queries, db, k, alpha, max_scores=max_scores)
    np.testing.assert_allclose(out, naive_qe(queries, db, k, alpha), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.isfinite(out).all()  # fractional alpha with negative similarities


@pytest.mark.parametrize("k, alpha", [(1, 3.0), (2, 3.0), (6, 3.0), (4, 0.0)])
@pytest.mark.parametrize("max_scores", [1 << 24, 50])
def test_dba_matches_loop(k, alpha, max_scores):
    rng = np.random.default_rng(1)
    db = unit_rows(rng, 60, 8)
    out = database_side_augmentation(db, k, alpha, max_scores=max_scores)
    np.testing.assert_allclose(out, naive_dba(db, k, alpha), atol=1e-12)


def test_dba_counts_itself_and_keeps_duplicates_as_neighbours():
    rng = np.random.default_rng(2)
    db = unit_rows(rng, 10, 5)
    db[7] = db[3]  # exact duplicate: still a neighbour of 3 (and 3 of 7), the item itself counted once
    np.testing.assert_allclose(database_side_augmentation(db, 2, 3.0), naive_dba(db, 2, 3.0), atol=1e-12)
    expected = (db[3] + 1.0 * db[7]) / np.linalg.norm(db[3] + db[7])
    np.testing.assert_allclose(database_side_augmentation(db, 2, 3.0)[3], expected, atol=1e-12)
    # k = 1: only the item itself.
    np.testing.assert_allclose(database_side_augmentation(db, 1, 3.0), db, atol=1e-12)


def test_ties_go_to_lower_index():
    db = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    q = np.array([[0.0, 1.0]])
    idx, sims = nearest_neighbours(q, db, 2)
    assert idx.tolist() == [[1, 2]] and sims.tolist() == [[1.0, 1.0]]
    rng = np.random.default_rng(3)
    ints = rng.integers(-1, 2, size=(40, 3)).astype(float)  # many exact ties
    queries = rng.integers(-1, 2, size=(6, 3)).astype(float)
    for max_scores in (1 << 20, 41):
        idx, _ = nearest_neighbours(queries, ints, 5, max_scores=max_scores)
        for q in range(len(queries)):
            s = ints @ queries[q]
            assert idx[q].tolist() == sorted(range(40), key=lambda j: (-s[j], j))[:5]
    np.testing.assert_allclose(alpha_query_expansion(queries, ints, 5, 2.0), naive_qe(queries, ints, 5, 2.0))


def test_k_zero_and_k_beyond_database():
    rng = np.random.default_rng(4)
    db = unit_rows(rng, 6, 4)
    q = unit_rows(rng, 2, 4)
    np.testing.assert_allclose(alpha_query_expansion(q, db, 0), q)
    np.testing.assert_allclose(alpha_query_expansion(q, db, 50, 1.0), naive_qe(q, db, 6, 1.0), atol=1e-12)
    np.testing.assert_allclose(database_side_augmentation(db, 50, 1.0), naive_dba(db, 6, 1.0), atol=1e-12)


def test_float32_in_float32_out():
    rng = np.random.default_rng(5)
    db = unit_rows(rng, 20, 4).astype(np.float32)
    assert database_side_augmentation(db, 3).dtype == np.float32
    assert alpha_query_expansion(db[:2], db, 3).dtype == np.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match="same d"):
        alpha_query_expansion(np.zeros((2, 3)), np.zeros((4, 5)), 1)
    with pytest.raises(ValueError, match="k must be"):
        database_side_augmentation(np.zeros((4, 5)), -1)
    with pytest.raises(ValueError, match="alpha"):
        database_side_augmentation(np.zeros((4, 5)), 2, alpha=-1)


def test_alpha_zero_is_average_qe_even_over_dissimilar_neighbours():
    q = np.array([[1.0, 0.0, 0.0]])
    db = np.array([[-0.6, 0.8, 0.0], [-0.6, 0.0, 0.8]])  # both dissimilar to the query (similarity -0.6)
    avg = q[0] + db[0] + db[1]  # average QE: the query and its k neighbours, equal weights
    np.testing.assert_allclose(alpha_query_expansion(q, db, 2, 0.0)[0], avg / np.linalg.norm(avg), atol=1e-12)
    np.testing.assert_allclose(alpha_query_expansion(q, db, 2, 3.0)[0], q[0], atol=1e-12)  # weights 0
    np.testing.assert_allclose(alpha_query_expansion(q, db, 5, 0.0)[0], avg / np.linalg.norm(avg), atol=1e-12)
