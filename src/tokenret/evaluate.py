"""Revisited Oxford/Paris evaluation: mAP and mP@k under the Easy, Medium and Hard protocols.

The definitions are those of the revisitop benchmark (Radenovic et al., CVPR 2018), as written down in
``shared/spec/eval-protocol.md`` section 3:

* ``ranks`` has shape ``(n_db, n_queries)``; column ``q`` lists database indices for query ``q``, best first.
  It may be truncated to fewer rows than the database (e.g. the top-k of a large search).
* Protocols: Easy counts ``easy`` as positives and ignores ``junk + hard``; Medium counts ``easy + hard`` and
  ignores ``junk``; Hard counts ``hard`` and ignores ``junk + easy``. Everything else is a negative.
* Junk images are removed from the ranking: each positive's position drops by the number of junk images
  ranked before it.
* AP uses the trapezoidal rule over *all* annotated positives (positives missing from a truncated ranking
  add nothing).
* P@k caps k at the 1-based position of the last found positive: ``kq = min(last, k)``.
* Queries without positives get AP = P@k = NaN and are left out of the means (ROxford Easy: 68 of 70).

One choice the reference leaves open (it crashes there): when a truncated column holds no positive at all,
AP = 0 and P@k = 0 for every k, and the query still counts in the means (it has positives; none were found).

Only numpy is used; nothing here imports torch.

Example:
    >>> import numpy as np
    >>> gnd = [{"easy": [2], "hard": [0], "junk": [1], "bbx": [0, 0, 1, 1]}]
    >>> res = compute_revisited_map(np.array([[2], [1], [0], [3]]), gnd)
    >>> round(res["medium"]["map"], 4), res["easy"]["map"], res["hard"]["map"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PROTOCOLS",
    "compute_ap",
    "compute_map",
    "compute_revisited_map",
    "format_results",
    "junk_adjusted_positions",
    "precision_at_k",
    "protocol_ground_truth",
    "ranks_from_scores",
    "ranks_topk",
]

#: Why SuperGlobal's re-ranking is not mixed with alpha-QE or DBA.
RERANK_WITH_QE_DBA = (
    "SuperGlobal re-ranking (--rerank superglobal) does not combine with alpha-QE or DBA (--qe/--dba): it "
    "does its own database-side augmentation and query expansion (MDescAug, RerankwMDA); use one or the other"
)

#: protocol name -> (gnd keys that are positives, gnd keys that are ignored).
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def _index_array(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def protocol_ground_truth(
    gnd: Sequence[Mapping[str, Any]], protocol: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query ``(positives, junk)`` index arrays for one protocol ('easy', 'medium' or 'hard')."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
    ok_keys, junk_keys = PROTOCOLS[protocol]
    out = []
    for q, g in enumerate(gnd):
        missing = [key for key in ok_keys + junk_keys if key not in g]
        if missing:
            raise KeyError(
                f"gnd[{q}] lacks {missing}; expected revisitop ground truth with easy/hard/junk lists"
            )
        ok = np.concatenate([_index_array(g[key]) for key in ok_keys])
        junk = np.concatenate([_index_array(g[key]) for key in junk_keys])
        out.append((ok, junk))
    return out


def junk_adjusted_positions(column: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """Sorted 0-based positions of the positives in ``column`` after removing junk images from the list."""
    column = np.asarray(column)
    pos = np.flatnonzero(np.isin(column, ok))
    if junk.size == 0 or pos.size == 0:
        return pos
    junk_pos = np.flatnonzero(np.isin(column, junk))
    # Number of junk entries ranked strictly before each positive (positions never coincide).
    return pos - np.searchsorted(junk_pos, pos, side="left")


def compute_ap(positions: np.ndarray, n_positives: int) -> float:
    """Trapezoidal average precision of sorted 0-based ``positions`` of the found positives.

    Args:
        positions: junk-adjusted 0-based positions of the positives found in the ranking, ascending.
        n_positives: number of annotated positives (the recall denominator, found or not).

    Returns:
        AP in [0, 1]; each found positive j at position r adds the mean of the precision just before it
        (1 at r = 0, else j / r) and just after it ((j + 1) / (r + 1)), divided by ``n_positives``.
    """
    if n_positives <= 0:
        raise ValueError("compute_ap needs at least one annotated positive")
    r = np.asarray(positions, dtype=np.float64)
    if r.size == 0:
        return 0.0
    j = np.arange(r.size, dtype=np.float64)
    before = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    after = (j + 1.0) / (r + 1.0)
    return float(np.sum((before + after) / 2.0) / n_positives)


def precision_at_k(positions: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """revisitop P@k for sorted 0-based ``positions``: k is capped at the last found positive (1-based).

    A ranking without any found positive (possible only when truncated) gets 0 for every k.
    """
    pos1 = np.asarray(positions, dtype=np.int64) + 1
    if pos1.size == 0:
        return np.zeros(len(ks))
    last = int(pos1.max())
    out = np.empty(len(ks))
    for i, k in enumerate(ks):
        kq = min(last, int(k))
        out[i] = np.count_nonzero(pos1 <= kq) / kq
    return out


def _check_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D (n_db, n_queries); got shape {ranks.shape}")
    if ranks.size and not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"ranks must hold integer database indices; got dtype {ranks.dtype}")
    if ranks.shape[1] != n_queries:
        raise ValueError(
            f"ranks has {ranks.shape[1]} columns but the ground truth has {n_queries} queries; "
            "ranks must be (n_db, n_queries) — transpose it if it is (n_queries, n_db)"
        )
    return ranks


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1; got {ks}")
    return ks


def compute_map(
    ranks: np.ndarray, ground_truth: Sequence[tuple[np.ndarray, np.ndarray]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """mAP and mP@k of ``ranks`` for per-query ``(positives, junk)`` arrays (one protocol).

    Returns:
        dict with ``map`` (float, NaN if no query has positives), ``mp_at_k`` (k -> float), ``ap``
        (per-query array, NaN where a query has no positives), ``p_at_k`` ((n_queries, len(ks)), NaN rows
        likewise) and ``n_queries`` (queries with positives, the denominator of the means).
    """
    ks = _check_ks(ks)
    ranks = _check_ranks(ranks, len(ground_truth))
    nq = len(ground_truth)
    ap = np.full(nq, np.nan)
    p_at_k = np.full((nq, len(ks)), np.nan)
    for q, (ok, junk) in enumerate(ground_truth):
        if ok.size == 0:
            continue
        positions = junk_adjusted_positions(ranks[:, q], ok, junk)
        ap[q] = compute_ap(positions, ok.size)
        p_at_k[q] = precision_at_k(positions, ks)
    used = ~np.isnan(ap)
    n_used = int(used.sum())
    if n_used:
        mean_ap = float(ap[used].mean())
        mean_p = p_at_k[used].mean(axis=0)
    else:
        mean_ap = float("nan")
        mean_p = np.full(len(ks), np.nan)
    return {
        "map": mean_ap,
        "mp_at_k": {k: float(v) for k, v in zip(ks, mean_p, strict=True)},
        "ap": ap,
        "p_at_k": p_at_k,
        "n_queries": n_used,
    }


def compute_revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, dict[str, Any]]:
    """Evaluate ``ranks`` under the Easy, Medium and Hard protocols of Revisited Oxford/Paris.

    Args:
        ranks: int array (n_db or fewer rows, n_queries); column q is the database order for query q.
        gnd: the per-query dicts of a revisitop ground-truth file (keys easy, hard, junk; bbx unused).
        ks: the k of mP@k.

    Returns:
        ``{"easy": ..., "medium": ..., "hard": ...}``, each as returned by :func:`compute_map`.

    Example:
        >>> from tokenret.data import RevisitedDataset
        >>> ds = RevisitedDataset.from_root("data", "roxford5k")  # doctest: +SKIP
        >>> res = compute_revisited_map(ranks_from_scores(db @ queries.T), ds.gnd)  # doctest: +SKIP
        >>> print("\\n".join(format_results(ds.name, res)))  # doctest: +SKIP
    """
    return {name: compute_map(ranks, protocol_ground_truth(gnd, name), ks) for name in PROTOCOLS}


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}"


def format_results(name: str, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The printed summary of :func:`compute_revisited_map` results, values x100 with 2 decimals.

    Lines: ``>> Test Dataset: <name> *** mAP Easy: .., Medium: .., Hard: ..``, then
    ``>> mAP Medium: .., Hard: ..`` (the two numbers papers report), then one
    ``>> mP@k[1, 5, 10] <Protocol>: [.., .., ..]`` line per protocol.
    """
    e, m, h = (results[p] for p in ("easy", "medium", "hard"))
    lines = [
        f">> Test Dataset: {name} *** mAP Easy: {_pct(e['map'])}, Medium: {_pct(m['map'])}, "
        f"Hard: {_pct(h['map'])}",
        f">> mAP Medium: {_pct(m['map'])}, Hard: {_pct(h['map'])}",
    ]
    for label, res in (("Easy", e), ("Medium", m), ("Hard", h)):
        ks = list(res["mp_at_k"])
        values = ", ".join(_pct(res["mp_at_k"][k]) for k in ks)
        lines.append(f">> mP@k{ks} {label}: [{values}]")
    return lines


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """Database order per query from ``scores`` (n_db, n_queries), highest first; ties to the lower index."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_db, n_queries); got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    return np.argsort(-scores, axis=0, kind="stable")


def ranks_topk(db: np.ndarray, queries: np.ndarray, k: int, chunk_size: int = 65536) -> np.ndarray:
    """Top-k database indices per query by dot product, computed over database chunks.

    Equal to ``ranks_from_scores(db @ queries.T)[:k]`` (same tie rule: lower index first) while holding at
    most ``(chunk_size + k) x n_queries`` scores; ``db`` may be a memory-mapped array.

    Args:
        db: database descriptors, one per row (n_db, d).
        queries: query descriptors, one per row (n_queries, d).
        k: number of results kept per query; capped at n_db.
        chunk_size: database rows scored at a time.

    Returns:
        int64 array (min(k, n_db), n_queries).
    """
    queries = np.asarray(queries)
    if not isinstance(db, np.ndarray):  # np.memmap is kept as is: rows are read chunk by chunk
        db = np.asarray(db)
    if db.ndim != 2 or queries.ndim != 2 or db.shape[1] != queries.shape[1]:
        raise ValueError(
            f"db (n_db, d) and queries (n_queries, d) must share d; got {tuple(db.shape)} and {queries.shape}"
        )
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be >= 1; got k={k}, chunk_size={chunk_size}")
    k = min(int(k), db.shape[0])
    nq = queries.shape[0]
    best_scores = np.empty((0, nq))
    best_idx = np.empty((0, nq), dtype=np.int64)
    for start in range(0, db.shape[0], chunk_size):
        chunk_scores = np.asarray(db[start : start + chunk_size]) @ queries.T
        chunk_idx = np.broadcast_to(
            np.arange(start, start + chunk_scores.shape[0])[:, None], chunk_scores.shape
        )
        # Kept results all have lower indices than this chunk, so a stable sort keeps the tie rule.
        cand_scores = np.concatenate([best_scores, chunk_scores.astype(np.float64)])
        cand_idx = np.concatenate([best_idx, chunk_idx])
        order = np.argsort(-cand_scores, axis=0, kind="stable")[:k]
        best_scores = np.take_along_axis(cand_scores, order, axis=0)
        best_idx = np.take_along_axis(cand_idx, order, axis=0)
    return best_idx


# ------------------------------------------------------------------------------------------------ driver


def _merge_chunks(parts: Sequence[dict[str, dict[str, Any]]], ks: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Combine per-query results computed on query chunks into one result per protocol."""
    merged: dict[str, dict[str, Any]] = {}
    for proto in PROTOCOLS:
        ap = np.concatenate([p[proto]["ap"] for p in parts])
        p_at_k = np.concatenate([p[proto]["p_at_k"] for p in parts])
        used = ~np.isnan(ap)
        mean_p = p_at_k[used].mean(axis=0) if used.any() else np.full(len(ks), np.nan)
        merged[proto] = {
            "map": float(ap[used].mean()) if used.any() else float("nan"),
            "mp_at_k": {int(k): float(v) for k, v in zip(ks, mean_p, strict=True)},
            "ap": ap,
            "p_at_k": p_at_k,
            "n_queries": int(used.sum()),
        }
    return merged


def evaluate_descriptors(
    database: np.ndarray,
    queries: np.ndarray,
    gnd: Sequence[Mapping[str, Any]],
    ks: Sequence[int] = (1, 5, 10),
    qe: tuple[int, float] | None = None,
    dba: tuple[int, float] | None = None,
    keep_top: int = 100,
    query_chunk: int | None = None,
    rerank: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Rank the database for each query by dot product and score the ranking.

    Args:
        database: (n_db, d) L2-normalised descriptors; rows past ``len(imlist)`` are distractors (R1M).
        queries: (n_queries, d) L2-normalised descriptors.
        gnd: the per-query ground truth.
        qe: (k, alpha) for alpha query expansion, or None.
        dba: (k, alpha) for database-side augmentation, or None (applied before QE).
        keep_top: rows of the ranking returned (for reports and pictures).
        query_chunk: queries ranked at a time; bounds memory at n_db x chunk (default: all when the
            database is small, else chunks of 8, about 64 MB per million database images).
        rerank: a :class:`tokenret.rerank.SuperGlobalRerank` (any ``(queries, database, ranks) -> ranks``):
            re-rank each query's top ``m`` with SuperGlobal's MDescAug + RerankwMDA, or None. It does its own
            query expansion and database-side augmentation, so it is refused together with ``qe`` or ``dba``.

    Returns:
        (results per protocol as from :func:`compute_revisited_map`, top ``keep_top`` ranks (keep, n_q)).
    """
    from tokenret.rerank import alpha_query_expansion, database_side_augmentation

    if rerank is not None and (qe is not None or dba is not None):
        raise ValueError(RERANK_WITH_QE_DBA)
    database = np.asarray(database, dtype=np.float32)
    queries = np.asarray(queries, dtype=np.float32)
    if np.isnan(database).any() or np.isnan(queries).any():
        raise ValueError("descriptors contain NaN (unreadable images?): refusing to score an incomplete set")
    if dba is not None:
        database = database_side_augmentation(database, int(dba[0]), float(dba[1])).astype(np.float32)
    if qe is not None:
        queries = alpha_query_expansion(queries, database, int(qe[0]), float(qe[1])).astype(np.float32)
    n_db, nq = database.shape[0], queries.shape[0]
    chunk = query_chunk or (nq if n_db * nq <= 50_000_000 else 8)
    parts, tops = [], []
    for start in range(0, nq, chunk):
        stop = min(nq, start + chunk)
        ranks = ranks_from_scores(database @ queries[start:stop].T)
        if rerank is not None:
            ranks = rerank(queries[start:stop], database, ranks)
        parts.append(compute_revisited_map(ranks, gnd[start:stop], ks))
        tops.append(ranks[:keep_top])
    return _merge_chunks(parts, _check_ks(ks)), np.concatenate(tops, axis=1)


def evaluate_scores(
    scores: np.ndarray, gnd: Sequence[Mapping[str, Any]], ks: Sequence[int] = (1, 5, 10), keep_top: int = 100
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Score a ranking given by a similarity matrix (n_db, n_queries), e.g. ASMK's; higher is better.

    Returns:
        As :func:`evaluate_descriptors`: results per protocol and the top ``keep_top`` ranks (keep, n_q).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(gnd):
        raise ValueError(f"scores must be (n_db, {len(gnd)} queries), got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: refusing to rank")
    ranks = ranks_from_scores(scores)
    return compute_revisited_map(ranks, gnd, ks), ranks[:keep_top]


def results_to_json(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """JSON-ready copy of results: mAP and mP@k x100 rounded to 2 decimals, per-query AP as lists."""

    def clean(v: float) -> float | None:
        return None if np.isnan(v) else round(100.0 * float(v), 2)

    return {
        proto: {
            "map": clean(r["map"]),
            "mp_at_k": {str(k): clean(v) for k, v in r["mp_at_k"].items()},
            "n_queries": int(r["n_queries"]),
            "ap": [clean(v) for v in np.asarray(r["ap"])],
        }
        for proto, r in results.items()
    }
