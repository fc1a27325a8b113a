"""Query expansion (alpha-QE) and database-side augmentation (DBA) on global descriptors.

Definitions from Radenovic, Tolias and Chum, "Fine-tuning CNN image retrieval with no human annotation"
(TPAMI 2018): a vector is replaced by the L2-normalised weighted sum of itself and its nearest database
neighbours, each neighbour weighted by (similarity)^alpha; alpha = 0 gives average QE.

Conventions (the paper leaves them open):

* descriptors are rows, L2-normalised; similarity is the dot product;
* the vector itself always has weight 1 (its similarity with itself);
* for alpha > 0, neighbours with similarity <= 0 get weight 0, so a fractional alpha never yields NaN and
  an odd alpha never subtracts a dissimilar image; alpha = 0 weights every one of the k neighbours 1
  (similarity^0), which is average QE;
* alpha-QE: the query plus its ``k`` nearest database vectors (the query is not in the database);
* DBA: ``k`` counts the item itself, i.e. the item plus its ``k - 1`` nearest *other* database vectors
  (the item is excluded by index, so an exact duplicate elsewhere in the database is still a neighbour);
* ties in similarity go to the lower database index; all updates use the original vectors;
* results are divided by their L2 norm (a zero vector stays zero).

Work is done in chunks of rows so that at most about ``max_scores`` similarities are held at a time.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> db = rng.normal(size=(100, 16)); db /= np.linalg.norm(db, axis=1, keepdims=True)
    >>> q = db[:3] + 0.1 * rng.normal(size=(3, 16))
    >>> alpha_query_expansion(q, db, k=2, alpha=3.0).shape
    (3, 16)
"""

from __future__ import annotations

import numpy as np

__all__ = ["alpha_query_expansion", "database_side_augmentation", "nearest_neighbours"]

#: Default bound on the similarities held at once (float64: 128 MiB).
DEFAULT_MAX_SCORES = 1 << 24


def _check_inputs(queries: np.ndarray, database: np.ndarray, k: int, alpha: float) -> None:
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries (n, d) and database (m, d) must be 2-D with the same d; got {queries.shape}, "
            f"{database.shape}"
        )
    if k < 0:
        raise ValueError(f"k must be >= 0; got {k}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0; got {alpha}")


def _top_k_rows(sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values per row, descending; ties go to the lower index."""
    n = sims.shape[1]
    if k >= n:
        return np.argsort(-sims, axis=1, kind="stable")
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(sims, top, axis=1).min(axis=1)
    # argpartition picks arbitrarily among values equal to the k-th; redo those rows exactly.
    ambiguous = np.flatnonzero((sims >= kth[:, None]).sum(axis=1) > k)
    for r in ambiguous:
        cand = np.flatnonzero(sims[r] >= kth[r])
        top[r] = cand[np.argsort(-sims[r, cand], kind="stable")[:k]]
    top_sims = np.take_along_axis(sims, top, axis=1)
    order = np.lexsort((top, -top_sims), axis=1)
    return np.take_along_axis(top, order, axis=1)


def nearest_neighbours(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    exclude_self: bool = False,
    max_scores: int = DEFAULT_MAX_SCORES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows by dot product, for each query row.

    Args:
        queries: (n, d).
        database: (m, d).
        k: neighbours per query; capped at the number of candidates.
        exclude_self: queries are the database itself; row i never returns i.
        max_scores: bound on the similarities computed at once.

    Returns:
        ``(indices, similarities)``, both (n, k'), most similar first, ties to the lower index.
    """
    n, m = queries.shape[0], database.shape[0]
    if exclude_self and n != m:
        raise ValueError("exclude_self needs queries to be the database itself")
    k = min(k, m - 1 if exclude_self else m)
    indices = np.empty((n, max(k, 0)), dtype=np.int64)
    sims_out = np.empty((n, max(k, 0)))
    if k <= 0 or n == 0:
        return indices, sims_out
    step = max(1, max_scores // max(m, 1))
    for start in range(0, n, step):
        sims = np.asarray(queries[start : start + step] @ database.T, dtype=np.float64)
        rows = np.arange(sims.shape[0])
        if exclude_self:
            sims[rows, start + rows] = -np.inf
        top = _top_k_rows(sims, k)
        indices[start : start + step] = top
        sims_out[start : start + step] = np.take_along_axis(sims, top, axis=1)
    return indices, sims_out


def _expand(
    vectors: np.ndarray, database: np.ndarray, indices: np.ndarray, sims: np.ndarray, alpha: float, step: int
) -> np.ndarray:
    out_dtype = np.result_type(vectors.dtype, database.dtype, np.float32)
    out = np.empty(vectors.shape, dtype=out_dtype)
    # max(s, 0)^alpha: 0 for dissimilar neighbours when alpha > 0, and 0^0 = 1 (average QE) when alpha = 0;
    # a missing neighbour (fewer than k in the database) has similarity -inf and weight 0
    weights = np.where(np.isfinite(sims), np.maximum(sims, 0.0) ** alpha, 0.0)
    for start in range(0, vectors.shape[0], step):
        stop = start + step
        acc = np.asarray(vectors[start:stop], dtype=np.float64).copy()
        for j in range(indices.shape[1]):  # one neighbour rank at a time keeps memory at chunk x d
            acc += weights[start:stop, j, None] * database[indices[start:stop, j]]
        norms = np.linalg.norm(acc, axis=1, keepdims=True)
        out[start:stop] = acc / np.where(norms > 0, norms, 1.0)
    return out


def alpha_query_expansion(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    alpha: float = 3.0,
    *,
    max_scores: int = DEFAULT_MAX_SCORES,
) -> np.ndarray:
    """alpha-QE: each query becomes normalise(q + sum of w(x) x over its k nearest database vectors x).

    The weight is w(x) = (q.x)^alpha where q.x > 0, else 0.

    Args:
        queries: L2-normalised query descriptors (n_queries, d).
        database: L2-normalised database descriptors (n_db, d).
        k: number of database neighbours added (0 returns the normalised queries).
        alpha: weight exponent (3 is common; 0 = average QE).
        max_scores: bound on the similarities computed at once.

    Returns:
        expanded queries (n_queries, d), L2-normalised, float32 or wider.

    Example:
        >>> qe = alpha_query_expansion(qvecs, vecs, k=2, alpha=3.0)  # doctest: +SKIP
        >>> ranks = tokenret.evaluate.ranks_from_scores(vecs @ qe.T)  # doctest: +SKIP
    """
    queries, database = np.asarray(queries), np.asarray(database)
    _check_inputs(queries, database, k, alpha)
    indices, sims = nearest_neighbours(queries, database, k, max_scores=max_scores)
    return _expand(queries, database, indices, sims, alpha, _chunk_rows(database.shape[1], max_scores))


def database_side_augmentation(
    database: np.ndarray, k: int, alpha: float = 3.0, *, max_scores: int = DEFAULT_MAX_SCORES
) -> np.ndarray:
    """DBA: each database vector becomes the weighted sum of its top-k neighbours, itself included.

    Args:
        database: L2-normalised descriptors (n_db, d).
        k: neighbours per item counting the item itself (weight 1); k <= 1 only normalises.
        alpha: weight exponent for the other k - 1 neighbours.
        max_scores: bound on the similarities computed at once.

    Returns:
        augmented database (n_db, d), L2-normalised; query with the same database afterwards.
    """
    database = np.asarray(database)
    _check_inputs(database, database, k, alpha)
    indices, sims = nearest_neighbours(
        database, database, max(k - 1, 0), exclude_self=True, max_scores=max_scores
    )
    return _expand(database, database, indices, sims, alpha, _chunk_rows(database.shape[1], max_scores))


def _chunk_rows(dim: int, max_scores: int) -> int:
    return max(1, max_scores // max(dim, 1))
