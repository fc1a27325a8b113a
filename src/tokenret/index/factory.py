"""Index choice by name: a short spec string (``"Flat"``, ``"HNSW32"``, ``"IVF4096,PQ64"``, ``"qdrant"``)
makes an empty index, a saved index loads by the kind its header records, and the default spec for a
collection size.

Example:
    >>> from tokenret.index import make_index, choose_index_spec
    >>> make_index(choose_index_spec(10_000, 256), 256).ntotal
    0
"""

from __future__ import annotations

import math
import os
from typing import Any

from tokenret.index.base import EXACT_SEARCH_LIMIT, VectorIndex
from tokenret.index.exact import ExactIndex
from tokenret.index.faiss_index import FaissIndex  # faiss itself is imported on first use
from tokenret.index.qdrant_index import QdrantIndex  # qdrant-client too

_EXACT_SPECS = {"flat", "exact"}


def load_index(path: str | os.PathLike) -> VectorIndex:
    """Load any index saved with ``save(path)``, choosing the class from the header's ``kind``.

    Example:
        >>> index = load_index("photos.index")   # doctest: +SKIP
        >>> scores, ids = index.search(query_descriptors, 100)   # doctest: +SKIP
    """
    return VectorIndex.load(path)  # every kind is imported above


def make_index(spec: str, dim: int, **options: Any) -> VectorIndex:
    """Create an empty index from a short spec string.

    Args:
        spec: ``"Flat"`` or ``"exact"`` (case-insensitive) for :class:`~tokenret.index.ExactIndex`;
            ``"qdrant"`` for :class:`~tokenret.index.QdrantIndex` (a Qdrant collection: pass ``url=``,
            ``path=`` or ``location=":memory:"`` and ``collection=``; needs ``pip install qdrant-client``);
            anything else is a faiss ``index_factory`` string (``"HNSW32"``, ``"IVF4096,PQ64"``)
            wrapped in :class:`~tokenret.index.FaissIndex` (needs ``pip install faiss-cpu``).
        dim: descriptor dimension.
        **options: passed to the class, e.g. ``chunk_size`` for the exact index, or
            ``refine_factor``, ``nprobe``, ``efSearch`` for FAISS indexes.

    Example:
        >>> index = make_index("Flat", 1024)
        >>> type(index).__name__
        'ExactIndex'
        >>> ann = make_index("IVF4096_HNSW32,PQ64", 1024, refine_factor=8, nprobe=16)  # doctest: +SKIP
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index spec must be a non-empty string such as 'Flat' or 'HNSW32', got {spec!r}")
    if is_exact_spec(spec):
        return ExactIndex(dim, **options)
    if spec.strip().lower() == "qdrant":
        return QdrantIndex(dim, **options)
    return FaissIndex(spec.strip(), dim, **options)


def is_exact_spec(spec: str) -> bool:
    """True for the specs :func:`make_index` maps to the exact index (``"Flat"``, ``"exact"``, any case)."""
    return spec.strip().lower() in _EXACT_SPECS


def choose_index_spec(n: int, dim: int) -> str:
    """Pick an index spec for ``n`` vectors of size ``dim``: exact up to 200k, IVF-PQ above.

    Rationale: up to ~200k descriptors an exact fp16 scan (400 MB for 1024-d) is quick enough for
    interactive search and always right; above that, :func:`ivf_pq_spec` keeps memory under
    100 B per image. ``HNSW32`` stores full fp32 vectors plus its graph (over 4 KB per 1024-d
    image) and needed efSearch > 512 for recall 0.95 at 1M, so it is not the default.
    Measurements: bench/README.md, "search".

    Example:
        >>> choose_index_spec(50_000, 1024)
        'Flat'
        >>> choose_index_spec(1_000_000, 1024)
        'IVF4096_HNSW32,PQ128x4fs'
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"need n >= 0 and dim > 0, got n={n}, dim={dim}")
    if n <= EXACT_SEARCH_LIMIT:
        return "Flat"
    return ivf_pq_spec(n, dim)


def ivf_pq_spec(n: int, dim: int) -> str:
    """The IVF-PQ spec for ``n`` vectors: ``IVF{nlist}_HNSW32,PQ{m}x4fs``.

    nlist ~ 4 sqrt(n) rounded to a power of two; an HNSW graph over the centroids (a flat scan
    reads all 4096 x 1024-d centroids, 16 MB, for every query); m = dim/8 four-bit codes (64 B for
    1024-d) searched with FAISS's SIMD "fast scan": the same recall as dim/16 eight-bit codes on
    clustered descriptors (0.71 at 1M), with codes compared in SIMD registers instead of table
    look-ups. PQ alone only reaches recall@100 ~0.7 there: build with ``refine_factor`` (exact
    re-ranking against float16 vectors) for 0.95-0.98. Measurements: bench/README.md, "search".

    Example:
        >>> ivf_pq_spec(200_000, 1024)
        'IVF2048_HNSW32,PQ128x4fs'
    """
    if n < 0 or dim <= 0:
        raise ValueError(f"need n >= 0 and dim > 0, got n={n}, dim={dim}")
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    # the largest even number of 4-bit sub-quantizers <= dim/8 that divides dim (fast scan packs pairs)
    m = max(2, dim // 8)
    while m > 2 and (dim % m or m % 2):
        m -= 1
    return f"IVF{nlist}_HNSW32,PQ{m}x4fs"
