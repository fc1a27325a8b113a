"""How well a folder index's approximate search agrees with its exact search."""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenret.index import choose_index_spec, make_index, recall_at_k


def sampled_recall(
    index: Any, spec: str | None = None, k: int = 100, n_queries: int = 100, seed: int = 0
) -> dict[str, Any]:
    """recall@k of approximate search against exact search, with stored vectors as queries.

    Queries are stored vectors sampled at random (the way new photos of the same places look to the index).

    Args:
        spec: None measures the index's configured backend (refine included), as searches run it; a spec
            (``"auto"`` resolves at the index's size) measures a FAISS index built for the purpose.
    """
    vecs, ids, rows = index.vectors()
    n = len(ids)
    if n == 0:
        raise ValueError(f"{index.path} holds no vectors")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    queries = np.asarray(vecs[rows[pick]], dtype=np.float32)
    k = min(k, n)
    _, exact_ids = index.knn(queries, k, exact=True)
    if spec is None:
        _, approx_ids = index.knn(queries, k)
        spec = index.backend_spec(n)
        extra = {"backend": index.backend, "refine": index.refine}
    else:
        if spec in ("auto", "exact"):
            spec = choose_index_spec(n, index.dim)
        data = np.asarray(vecs[rows], dtype=np.float32)
        # PQ codes alone rank coarsely; exact re-ranking of 8k candidates is what brings recall@100 past 0.95
        approx = make_index(spec, index.dim, **({"refine_factor": 8} if "PQ" in spec else {}))
        approx.add(data, ids)
        _, approx_ids = approx.search(queries, k)
        extra = {}
    return {
        "spec": spec,
        **extra,
        "k": k,
        "n_queries": len(queries),
        "recall": float(recall_at_k(approx_ids, exact_ids, k)),
    }
