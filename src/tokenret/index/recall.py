"""How well an approximate index finds the true nearest neighbours: recall@k against exact search.

Two definitions are in use. :func:`recall_at_k` is the overlap of the top-k lists (|approx top-k ∩ exact
top-k| / k): what re-ranking and mAP depend on, and tokenret's default everywhere. :func:`nn_recall_at_k`
is the product-quantization literature's recall@R (Jégou et al., TPAMI 2011; FAISS's "R@k"): the fraction
of queries whose exact nearest neighbour is among the approximate top-k. Neither bounds the other (a
list can hold 99 of the true top 100 but miss the first), but for compact codes the second is usually
far higher.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from tokenret.index.base import VectorIndex, check_k


def _id_arrays(
    approx_ids: np.ndarray, exact_ids: np.ndarray, k: int, exact_width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both id lists as int64 (nq, width) arrays, checked: the same nq, at least k approximate and
    ``exact_width`` exact columns."""
    approx_ids = np.asarray(approx_ids, dtype=np.int64)
    exact_ids = np.asarray(exact_ids, dtype=np.int64)
    if approx_ids.ndim != 2 or exact_ids.ndim != 2 or len(approx_ids) != len(exact_ids):
        raise ValueError(
            f"need two (nq, k) id arrays with the same nq, got {approx_ids.shape} and {exact_ids.shape}"
        )
    if approx_ids.shape[1] < k or exact_ids.shape[1] < exact_width:
        raise ValueError(f"k={k} exceeds the result width ({approx_ids.shape[1]}, {exact_ids.shape[1]})")
    return approx_ids, exact_ids


def recall_per_query(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each query's exact top-``k`` ids found in its approximate top-``k``.

    Args:
        approx_ids: (nq, >=k) ids from the index under test, best first; -1 is padding.
        exact_ids: (nq, >=k) ids from exact search, best first; -1 is padding.
        k: cut-off.

    Returns:
        (nq,) float64 recalls; NaN for queries whose exact list is empty.
    """
    k = check_k(k)
    approx_ids, exact_ids = _id_arrays(approx_ids, exact_ids, k, k)
    a = approx_ids[:, :k]
    e = exact_ids[:, :k]
    # padding must never match: give it distinct negative values on each side
    a = np.where(a < 0, -2, a)
    e_valid = e >= 0
    e = np.where(e_valid, e, -3)
    both = np.sort(np.concatenate([a, e], axis=1), axis=1)
    # ids are unique within one list, so an id seen twice in a row is in both lists
    hits = ((both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)).sum(axis=1)
    n_true = e_valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_true > 0, hits / np.maximum(n_true, 1), np.nan)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean recall@k over queries: |approx top-k ∩ exact top-k| / |exact top-k|.

    Queries with no exact result are left out; the result is NaN if none has one.

    Example:
        >>> recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 1, 4]]), k=3)
        0.6666666666666666
    """
    per_query = recall_per_query(approx_ids, exact_ids, k)
    valid = ~np.isnan(per_query)
    return float(per_query[valid].mean()) if valid.any() else float("nan")


def nn_recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Fraction of queries whose exact nearest neighbour (``exact_ids[:, 0]``) is in the approximate top-k.

    Queries with no exact result are left out; the result is NaN if none has one.

    Example:
        >>> nn_recall_at_k(np.array([[1, 2], [5, 6]]), np.array([[2, 9], [7, 5]]), k=2)
        0.5
    """
    k = check_k(k)
    approx_ids, exact_ids = _id_arrays(approx_ids, exact_ids, k, 1)
    nearest = exact_ids[:, :1]
    valid = nearest[:, 0] >= 0
    if not valid.any():
        return float("nan")
    found = (approx_ids[:, :k] == nearest).any(axis=1)
    return float(found[valid].mean())


@dataclass
class RecallReport:
    """Outcome of :func:`check_recall`."""

    k: int
    n_queries: int
    recall: float
    min_recall: float
    approx_ms_per_query: float
    exact_ms_per_query: float
    nn_recall: float = float("nan")  # the exact nearest neighbour in the approximate top-k (R@k)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"recall@{self.k} = {self.recall:.4f} (worst query {self.min_recall:.3f}; nearest neighbour "
            f"in the top {self.k}: {self.nn_recall:.4f}) over {self.n_queries} queries; "
            f"{self.approx_ms_per_query:.2f} ms/query approximate "
            f"vs {self.exact_ms_per_query:.2f} ms/query exact"
        )


def check_recall(
    index: VectorIndex, exact_index: VectorIndex, queries: np.ndarray, k: int = 100
) -> RecallReport:
    """Search ``queries`` in both indexes and report recall@k of ``index`` against ``exact_index``.

    Both indexes must hold the same vectors under the same ids (e.g. an ``ExactIndex`` built
    from the descriptors the approximate index was built from). Queries are searched as one
    batch in each index; times are per query of that batch.

    Example:
        >>> report = check_recall(ann_index, exact_index, sample_queries, k=100)   # doctest: +SKIP
        >>> print(report)                                                           # doctest: +SKIP
    """
    k = check_k(k)
    if index.dim != exact_index.dim:
        raise ValueError(f"indexes differ in dimension: {index.dim} vs {exact_index.dim}")
    if index.ntotal != exact_index.ntotal:
        raise ValueError(
            f"indexes hold different numbers of vectors ({index.ntotal} vs {exact_index.ntotal}); "
            "build the exact index from the same descriptors"
        )
    queries = np.asarray(queries, dtype=np.float32)
    nq = max(len(queries), 1)
    t0 = time.perf_counter()
    _, approx_ids = index.search(queries, k)
    t1 = time.perf_counter()
    _, exact_ids = exact_index.search(queries, k)
    t2 = time.perf_counter()
    per_query = recall_per_query(approx_ids, exact_ids, k)
    valid = per_query[~np.isnan(per_query)]
    return RecallReport(
        k=k,
        n_queries=len(queries),
        recall=float(valid.mean()) if len(valid) else float("nan"),
        min_recall=float(valid.min()) if len(valid) else float("nan"),
        approx_ms_per_query=1e3 * (t1 - t0) / nq,
        exact_ms_per_query=1e3 * (t2 - t1) / nq,
        nn_recall=nn_recall_at_k(approx_ids, exact_ids, k),
    )
