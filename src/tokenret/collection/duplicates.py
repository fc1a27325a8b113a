"""Near-duplicate groups in an image index: connected components of the 'similarity >= t' graph."""

from __future__ import annotations

from typing import Any

import numpy as np


def find_duplicate_groups(index: Any, threshold: float = 0.9, max_neighbours: int = 50) -> list[list[str]]:
    """Groups (largest first) of images linked by cosine similarity >= ``threshold``.

    Each stored image is searched for its ``max_neighbours`` nearest others; pairs above the threshold are
    joined with union-find, so a chain a~b~c forms one group even where a and c are less similar.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    vecs, ids, rows = index.vectors()
    n = len(ids)
    if n < 2:
        return []
    exact = index.vector_index()
    parent = {int(i): int(i) for i in ids}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    k = min(max_neighbours + 1, n)
    for start in range(0, n, 256):
        q = np.asarray(vecs[rows[start : start + 256]], dtype=np.float32)
        scores, nbrs = exact.search(q, k)
        for a, srow, nrow in zip(ids[start : start + 256], scores, nbrs, strict=True):
            for s, b in zip(srow, nrow, strict=True):
                if b >= 0 and b != a and s >= threshold:
                    ra, rb = find(int(a)), find(int(b))
                    if ra != rb:
                        parent[ra] = rb
    path_of = dict(index.db.execute("SELECT id, path FROM images WHERE status = 'ok'"))
    groups: dict[int, list[str]] = {}
    for i in parent:
        groups.setdefault(find(i), []).append(path_of[i])
    out = [sorted(g) for g in groups.values() if len(g) > 1]
    return sorted(out, key=lambda g: (-len(g), g[0]))
