"""Re-ranking on global descriptors: alpha-QE, DBA, and SuperGlobal's top-M re-ranking.

SuperGlobal's re-ranking (Shao et al., ICCV 2023; MDescAug + RerankwMDA) is :func:`superglobal_rerank`, see
its docstring for its definition; the rest of this docstring is about alpha-QE and DBA.

alpha-QE and DBA:

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "SuperGlobalRerank",
    "alpha_query_expansion",
    "check_superglobal_settings",
    "database_side_augmentation",
    "nearest_neighbours",
    "superglobal_option",
    "superglobal_rerank",
    "superglobal_rerank_candidates",
]

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


# ------------------------------------------------------------------------------------- SuperGlobal

#: Bound on the floats :func:`superglobal_rerank` holds at once per chunk of queries (float32: 128 MiB).
SUPERGLOBAL_MAX_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class SuperGlobalRerank:
    """Settings of SuperGlobal's re-ranking; the defaults are the paper's (M = 400, K = 9, beta = 0.15).

    Args:
        m: candidates re-ranked per query (the top M of the first ranking).
        k: neighbours averaged into each candidate, and candidates max-pooled into the new query (K).
        beta: weight of a neighbour per unit of similarity.

    Example:
        >>> SuperGlobalRerank(m=200).settings()
        {'method': 'superglobal', 'm': 200, 'k': 9, 'beta': 0.15}
    """

    m: int = 400
    k: int = 9
    beta: float = 0.15

    def __post_init__(self) -> None:
        check_superglobal_settings(self.m, self.k, self.beta)

    def settings(self) -> dict[str, Any]:
        """JSON-ready record of the settings (reports)."""
        return {"method": "superglobal", "m": int(self.m), "k": int(self.k), "beta": float(self.beta)}

    def __call__(
        self, queries: np.ndarray, database: np.ndarray, ranks: np.ndarray | None = None
    ) -> np.ndarray:
        """:func:`superglobal_rerank` with these settings."""
        return superglobal_rerank(queries, database, ranks, m=self.m, k=self.k, beta=self.beta)


#: Re-ranking methods by name (``rerank=`` of the search path, ``--rerank`` of the command line).
RERANKERS = ("superglobal",)


def superglobal_option(
    rerank: str | None, m: int = 400, k: int = 9, beta: float = 0.15
) -> SuperGlobalRerank | None:
    """The re-ranking a ``rerank=`` option names: None for None, settings for ``"superglobal"``.

    Raises:
        ValueError: another name, or settings out of range.
    """
    if rerank is None:
        return None
    if rerank not in RERANKERS:
        raise ValueError(f"unknown re-ranking {rerank!r}; expected None or one of {list(RERANKERS)}")
    return SuperGlobalRerank(m=m, k=k, beta=beta)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_superglobal_settings(m: int, k: int, beta: float) -> None:
    """Refuse re-ranking settings that mean nothing (a ValueError naming the setting and the value)."""
    if not _is_int(m) or m < 1:
        raise ValueError(f"re-ranking m (candidates re-ranked per query) must be an integer >= 1; got {m!r}")
    if not _is_int(k) or k < 0:
        raise ValueError(f"re-ranking k (neighbours per candidate) must be an integer >= 0; got {k!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.number)) or not math.isfinite(beta):
        raise ValueError(f"re-ranking beta must be a finite number; got {beta!r}")
    if beta < 0:
        raise ValueError(f"re-ranking beta must be >= 0 (it weights similar neighbours); got {beta!r}")


def _compute_dtype(*arrays: Any) -> np.dtype:
    """float64 when an input is float64, else float32 (float16 stores are widened)."""
    return np.result_type(*(np.dtype(a.dtype) for a in arrays), np.float32)


def _check_vectors(queries: np.ndarray, database: Any) -> None:
    if queries.ndim != 2 or len(database.shape) != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(
            f"queries (n_queries, d) and database (n_db, d) must be 2-D with the same d; got "
            f"{queries.shape}, {tuple(database.shape)}"
        )


def _nearest_in_gram(gram: torch.Tensor, k1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and values of the ``k1`` largest entries of each row of ``gram`` (c, M, M), largest first,
    ties to the lower position."""
    n = gram.shape[-1]
    vals, idx = torch.topk(gram, min(k1 + 1, n), dim=-1)  # one more: it shows a tie across the k1-th place
    # topk orders equal values arbitrarily; that matters where a tie crosses the k1-th place or the first
    # place (the first entry weighs 1, the others by their similarity): redo those rows with a stable sort.
    ambiguous = vals[..., k1] == vals[..., k1 - 1] if k1 < n else None
    if k1 > 1:
        first = vals[..., 0] == vals[..., 1]
        ambiguous = first if ambiguous is None else ambiguous | first
    vals, idx = vals[..., :k1], idx[..., :k1]
    if ambiguous is not None and bool(ambiguous.any()):
        vals, idx = vals.clone(), idx.clone()
        order = torch.sort(gram[ambiguous], dim=-1, descending=True, stable=True)
        idx[ambiguous] = order.indices[:, :k1]
        vals[ambiguous] = order.values[:, :k1]
    return idx, vals


def _superglobal_chunk(
    q: torch.Tensor, x: torch.Tensor, k: int, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank one chunk: queries (c, d), their candidates (c, M, d) in first-stage order.

    Returns the candidate positions in the new order (c, M) and their final scores (c, M), descending.

    x~ = sum_j w_j x_j / sum_j w_j is linear, so q.x~ and q~.x~ are computed as the same weighted means of
    q.x_j and q~.x_j: only the Gram matrix costs M^2 d (the rest is about 1% of the work); the x~ themselves
    are formed only for the K+1 that make q~, from their (K+1)^2 neighbour vectors.
    """
    c, n, d = x.shape
    k1 = min(k + 1, n)
    nb, w = _nearest_in_gram(torch.bmm(x, x.transpose(1, 2)), k1)  # MDescAug: K+1 nearest among the M
    w = w * beta
    w[..., 0] = 1.0  # the first (most similar: itself) entry
    den = w.sum(-1)
    flat_nb = nb.reshape(c, n * k1)

    def augmented_dot(v: torch.Tensor) -> torch.Tensor:  # v . x~_i for every candidate i, v (c, d)
        dots = torch.bmm(x, v.unsqueeze(2)).view(c, n)
        return (w * dots.gather(1, flat_nb).view(c, n, k1)).sum(-1) / den

    s1 = augmented_dot(q)
    order1 = torch.sort(s1, dim=1, descending=True, stable=True).indices  # ties: earlier in the first ranking
    s1_sorted = s1.gather(1, order1)
    best = order1[:, :k1]  # RerankwMDA: the K+1 best by s1 ...
    rows = best.unsqueeze(2).expand(c, k1, k1)
    best_vecs = x[torch.arange(c).unsqueeze(1), nb.gather(1, rows).view(c, k1 * k1)].view(c * k1, k1, d)
    best_w = (w.gather(1, rows) / den.gather(1, best).unsqueeze(2)).view(c * k1, 1, k1)
    q_max = torch.bmm(best_w, best_vecs).view(c, k1, d).amax(dim=1)  # their x~, max-pooled into q~
    s2_sorted = augmented_dot(q_max).gather(1, order1)
    final = (s1_sorted + s2_sorted) / 2
    order2 = torch.sort(final, dim=1, descending=True, stable=True).indices  # ties: earlier by s1
    return order1.gather(1, order2), final.gather(1, order2)


def superglobal_rerank_candidates(
    queries: np.ndarray,
    candidates: np.ndarray,
    vectors: np.ndarray | Callable[[np.ndarray], np.ndarray],
    *,
    k: int = 9,
    beta: float = 0.15,
    max_elements: int = SUPERGLOBAL_MAX_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray]:
    """Re-order each query's candidates (all of them: its top M) by SuperGlobal's re-ranking.

    The definition is :func:`superglobal_rerank`'s; this is its core, for callers that hold candidate ids
    and read vectors their own way (an index's float16 store).

    Args:
        queries: (n_queries, d) L2-normalised query descriptors.
        candidates: (n_queries, M) database ids per query, first-stage order, best first.
        vectors: the database, an array indexed by id ((n_db, d); float16 or a memory map is fine), or a
            function that returns the (len(ids), d) vectors of an id array.
        k, beta: as in :func:`superglobal_rerank`.
        max_elements: bound on the floats held at once (queries are processed in chunks under it).

    Returns:
        ``(ids, scores)``: both (n_queries, M), the candidates in their new order and their final scores
        (s1 + s2) / 2, descending.
    """
    check_superglobal_settings(1, k, beta)
    queries = np.asarray(queries)
    candidates = np.asarray(candidates)
    if candidates.ndim != 2 or candidates.shape[0] != queries.shape[0]:
        raise ValueError(
            f"candidates must be (n_queries, M) = ({queries.shape[0]}, M); got shape {candidates.shape}"
        )
    if candidates.size and not np.issubdtype(candidates.dtype, np.integer):
        raise TypeError(f"candidates must hold integer database ids; got dtype {candidates.dtype}")
    nq, n = candidates.shape
    if n == 0 or nq == 0:
        return candidates.astype(np.int64), np.zeros(candidates.shape, dtype=np.float32)
    read = vectors if callable(vectors) else vectors.__getitem__
    d = queries.shape[1]
    dtype = _compute_dtype(queries, np.empty(0, np.float32) if callable(vectors) else vectors)
    step = max(1, int(max_elements) // (n * (n + 2 * d)))
    ids_out = np.empty((nq, n), dtype=np.int64)
    scores_out = np.empty((nq, n), dtype=dtype)
    for start in range(0, nq, step):
        cand = candidates[start : start + step].astype(np.int64)
        c = cand.shape[0]
        x = np.asarray(read(cand.reshape(-1)), dtype=dtype)
        if x.shape != (c * n, d):
            raise ValueError(
                f"the vectors read for {c * n} candidate ids have shape {x.shape}, not {(c * n, d)}"
            )
        q = torch.from_numpy(np.ascontiguousarray(queries[start : start + step], dtype=dtype))
        order, final = _superglobal_chunk(q, torch.from_numpy(x).view(c, n, d), k, float(beta))
        ids_out[start : start + c] = np.take_along_axis(cand, order.numpy(), axis=1)
        scores_out[start : start + c] = final.numpy()
    return ids_out, scores_out


def _check_rank_array(ranks: Any, n_queries: int, n_db: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != n_queries:
        raise ValueError(
            f"ranks must be (rows, n_queries) = (rows, {n_queries}), one column per query, best first; got "
            f"shape {ranks.shape} (transpose it if it is (n_queries, rows))"
        )
    if ranks.size == 0:
        return ranks.astype(np.int64)
    if not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"ranks must hold integer database indices; got dtype {ranks.dtype}")
    low, high = int(ranks.min()), int(ranks.max())
    if low < 0 or high >= n_db:
        raise ValueError(
            f"ranks hold database indices from {low} to {high}, outside 0..{n_db - 1} (padding such as -1 "
            "must be removed first)"
        )
    return ranks.astype(np.int64)


def _database_scores(queries: np.ndarray, database: Any, dtype: np.dtype, max_elements: int) -> np.ndarray:
    """queries . database^T as (n_queries, n_db), reading the database in chunks of rows."""
    q = np.asarray(queries, dtype=dtype)
    n_db, d = database.shape
    out = np.empty((q.shape[0], n_db), dtype=dtype)
    step = max(1, max_elements // max(d, 1))
    for start in range(0, n_db, step):
        out[:, start : start + step] = q @ np.asarray(database[start : start + step], dtype=dtype).T
    return out


def _exact_ranks(queries: np.ndarray, database: Any, top: int | None, max_elements: int) -> np.ndarray:
    """The exact first ranking (rows, n_queries) by dot product, ties to the lower index: all n_db rows
    (``top`` None), else the first ``top``, keeping only those while scanning the database."""
    nq, n_db = queries.shape[0], database.shape[0]
    dtype = _compute_dtype(queries, database)
    if top is None:
        out = np.empty((n_db, nq), dtype=np.int64)
        step = max(1, max_elements // max(n_db, 1))
        for start in range(0, nq, step):
            scores = _database_scores(queries[start : start + step], database, dtype, max_elements)
            out[:, start : start + step] = np.argsort(-scores, axis=1, kind="stable").T
        return out
    top = min(top, n_db)
    best_ids = np.empty((nq, 0), dtype=np.int64)
    best_scores = np.empty((nq, 0), dtype=dtype)
    step = max(1, max_elements // max(nq + database.shape[1], 1))
    for start in range(0, n_db, step):
        chunk = np.asarray(database[start : start + step], dtype=dtype)
        # kept results all have lower indices than this chunk and are sorted with ties to the lower index,
        # so "ties to the lower column" of _top_k_rows is "ties to the lower database index"
        scores = np.concatenate([best_scores, np.asarray(queries, dtype=dtype) @ chunk.T], axis=1)
        ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(start, start + len(chunk)), (nq, len(chunk)))], axis=1
        )
        cols = _top_k_rows(scores, top)
        best_ids = np.take_along_axis(ids, cols, axis=1)
        best_scores = np.take_along_axis(scores, cols, axis=1)
    return np.ascontiguousarray(best_ids.T)


def superglobal_rerank(
    queries: np.ndarray,
    database: np.ndarray,
    ranks: np.ndarray | None = None,
    *,
    m: int = 400,
    k: int = 9,
    beta: float = 0.15,
    top: int | None = None,
    max_elements: int = SUPERGLOBAL_MAX_ELEMENTS,
) -> np.ndarray:
    """SuperGlobal's re-ranking (MDescAug + RerankwMDA, official code's semantics) of each query's top ``m``.

    Per query q (descriptors L2-normalised, similarity = dot product), with x_1..x_M its top M database
    vectors in the first ranking:

    1. each x_i becomes x~_i, the weighted mean of its K+1 nearest among the M (by dot product, itself
       included): weight 1 for the first (most similar: itself), beta * similarity for the other K, divided
       by the sum of the weights; no L2 normalisation;
    2. s1_i = q . x~_i; the M are ordered by s1, descending;
    3. q~ = the element-wise maximum of the x~ of the K+1 best by s1;
    4. s2_i = q~ . x~_i; the M are ordered by (s1_i + s2_i) / 2, descending; rows past M keep their order.

    Ties (left to chance in the official code) are broken deterministically: nearest neighbours and the
    first ranking by the lower position/database index, the s1 order by the first ranking, the final order
    by the s1 order. K+1 is capped at M. The result equals the official one up to float rounding (the
    scores are computed through the linearity of x~ rather than by forming every x~).

    Args:
        queries: (n_queries, d) query descriptors.
        database: (n_db, d) database descriptors; float16 and memory maps are read only where needed (each
            query's top ``m`` rows; the whole file for an exact first ranking).
        ranks: first ranking (rows, n_queries), one column per query, best first, e.g. the top rows of an
            approximate search; its top ``m`` are re-ranked. None: rank the database exactly first.
        m: candidates re-ranked per query (M); capped at the rows of the ranking.
        k: neighbours (K) of each candidate, and candidates max-pooled into q~ (K+1).
        beta: neighbour weight per unit of similarity.
        top: rows returned (None: all). Without ``ranks``, only max(m, top) are then kept per query while
            scanning the database, which bounds memory for a million vectors.
        max_elements: bound on the floats held at once; queries are processed in chunks under it.

    Returns:
        int64 ranks (rows, n_queries), the layout :func:`tokenret.evaluate.compute_revisited_map` takes:
        n_db rows (or those of ``ranks``), or the first ``top``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> db = rng.normal(size=(500, 32)); db /= np.linalg.norm(db, axis=1, keepdims=True)
        >>> ranks = superglobal_rerank(db[:3] + 0.05 * rng.normal(size=(3, 32)), db, m=100, k=9, beta=0.15)
        >>> ranks.shape
        (500, 3)
    """
    check_superglobal_settings(m, k, beta)
    queries = np.asarray(queries)
    if not isinstance(database, np.ndarray):
        database = np.asarray(database)
    _check_vectors(queries, database)
    if top is not None and (not _is_int(top) or top < 1):
        raise ValueError(f"top (rows returned) must be an integer >= 1 or None; got {top!r}")
    nq, n_db = queries.shape[0], database.shape[0]
    if ranks is None:
        ranks = _exact_ranks(queries, database, None if top is None else max(m, top), max_elements)
    else:
        ranks = _check_rank_array(ranks, nq, n_db).copy()
    head = min(m, ranks.shape[0])
    if head > 0 and nq > 0:
        ids, _ = superglobal_rerank_candidates(
            queries, ranks[:head].T, database, k=k, beta=beta, max_elements=max_elements
        )
        ranks[:head] = ids.T
    return ranks if top is None else ranks[:top]
