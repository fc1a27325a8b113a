"""Vector indexes: exact search, FAISS and Qdrant (beyond one machine) behind one small faiss-like interface.

Example:
    >>> import numpy as np
    >>> from tokenret.index import make_index, choose_index_spec, load_index
    >>> x = np.random.default_rng(0).standard_normal((500, 32)).astype(np.float32)
    >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
    >>> index = make_index(choose_index_spec(len(x), 32), 32)   # 'Flat': exact below 200k
    >>> ids = index.add(x)
    >>> scores, found = index.search(x[:2], k=10)
    >>> found.shape, found[:, 0].tolist()
    ((2, 10), [0, 1])
"""

from tokenret.index.base import EXACT_SEARCH_LIMIT, IndexFormatError, VectorIndex
from tokenret.index.exact import ExactIndex
from tokenret.index.factory import choose_index_spec, is_exact_spec, ivf_pq_spec, load_index, make_index
from tokenret.index.faiss_index import FaissIndex  # faiss itself is imported on first use
from tokenret.index.qdrant_index import QdrantIndex  # qdrant-client too
from tokenret.index.recall import RecallReport, check_recall, nn_recall_at_k, recall_at_k, recall_per_query

__all__ = [
    "EXACT_SEARCH_LIMIT",
    "ExactIndex",
    "FaissIndex",
    "IndexFormatError",
    "QdrantIndex",
    "RecallReport",
    "VectorIndex",
    "check_recall",
    "choose_index_spec",
    "is_exact_spec",
    "ivf_pq_spec",
    "load_index",
    "make_index",
    "nn_recall_at_k",
    "recall_at_k",
    "recall_per_query",
]
