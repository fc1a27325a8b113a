"""The index interface shared by every tokenret index, its on-disk header, and the factories.

An index holds unit-length float descriptors, each with an int64 id, and answers k-nearest-neighbour
queries by inner product (cosine similarity): the same small interface as a faiss index
(``add``, ``search``, ``remove``, ``save``, ``load``), so the exact index, the FAISS wrappers and a
Qdrant collection (search over a cluster of machines) can be swapped by a short spec string.

Result conventions (all indexes):

* ``search`` returns ``(scores, ids)``, both ``(nq, k)``: float32 inner products, best first, and
  int64 ids. Rows with fewer than ``k`` results are padded with score ``-inf`` and id ``-1``.
* Equal scores are ordered by increasing id, so results do not depend on storage order.
* Ids are unique within an index; ``add`` without ids numbers vectors from ``max(id) + 1``.

On disk an index is a directory holding ``index.json`` (format tag, kind, dimension, count and the
kind's settings) next to the kind's data files; :func:`load_index` reads the header and hands the
directory to the right class. Nothing in these files is executed: the header is JSON and arrays
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import abc
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Name of the JSON header inside an index directory.
HEADER_NAME = "index.json"
#: Format tag written into every header.
INDEX_FORMAT = "tokenret-index"
#: Version of the on-disk layout; bumped when a reader could misread newer files.
INDEX_FORMAT_VERSION = 1
#: Collections up to this size get the exact index from :func:`choose_index_spec`.
EXACT_SEARCH_LIMIT = 200_000

_EXACT_SPECS = {"flat", "exact"}


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete or written by an incompatible version."""


class VectorIndex(abc.ABC):
    """Abstract k-NN index over unit vectors, scored by inner product.

    Subclasses implement :meth:`add`, :meth:`search`, :meth:`remove`, :meth:`save`,
    :meth:`_load_dir` and :attr:`ntotal`; see the module docstring for the result conventions.

    Example:
        >>> import numpy as np
        >>> from tokenret.index import make_index, load_index
        >>> x = np.eye(4, dtype=np.float32)
        >>> index = make_index("Flat", 4)
        >>> index.add(x, np.array([10, 11, 12, 13]))
        array([10, 11, 12, 13])
        >>> scores, ids = index.search(x[:1], 2)
        >>> ids.tolist(), scores.tolist()
        ([[10, 11]], [[1.0, 0.0]])
    """

    #: Value of ``kind`` in the header; also the key :func:`load_index` dispatches on.
    kind: str = ""

    def __init__(self, dim: int) -> None:
        if int(dim) <= 0:
            raise ValueError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)

    @property
    @abc.abstractmethod
    def ntotal(self) -> int:
        """Number of vectors currently searchable."""

    def __len__(self) -> int:
        return self.ntotal

    @abc.abstractmethod
    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Add ``vectors`` (n, dim) with ``ids`` (n,) int64, or consecutive new ids when None.

        Returns:
            The int64 ids given to the vectors.
        """

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)`` of the ``k`` best vectors for each query row.

        Args:
            queries: (nq, dim) float array (or one (dim,) vector, treated as nq=1).
            k: number of results per query, >= 1.

        Returns:
            scores (nq, k) float32, best first; ids (nq, k) int64; padding -inf / -1.
        """

    @abc.abstractmethod
    def remove(self, ids: np.ndarray) -> int:
        """Remove the vectors with these ids (unknown ids are ignored); return how many went."""

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        """Write the index into directory ``path`` (created if needed, files replaced)."""

    @classmethod
    @abc.abstractmethod
    def _load_dir(cls, path: Path, header: dict[str, Any]) -> VectorIndex:
        """Build an index of this class from a directory whose header has been read and checked."""

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        """Load an index saved with :meth:`save`; on a subclass, also check it is of that class."""
        index = load_index(path)
        if not isinstance(index, cls):
            raise IndexFormatError(
                f"{path} holds a {type(index).__name__} ('{index.kind}' index), not a {cls.__name__}; "
                "use tokenret.index.load_index to load any kind"
            )
        return index

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, ntotal={self.ntotal})"


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the implementations


def as_float32_matrix(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (n, dim) array, refusing wrong shapes and non-finite values."""
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {np.shape(x)}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the descriptor extraction")
    return arr


def as_id_array(ids: np.ndarray, name: str = "ids") -> np.ndarray:
    """Return ``ids`` as a 1-D int64 array, refusing non-integer input and negative ids."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0 (-1 marks padding in results), got {arr.min()}")
    return arr


def check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def new_ids(ids: np.ndarray | None, n: int, existing: np.ndarray, next_id: int) -> np.ndarray:
    """Check or create the int64 ids of ``n`` new vectors.

    Raises:
        ValueError: wrong length, or an id repeated within ``ids`` or already in ``existing``.
    """
    if ids is None:
        return np.arange(next_id, next_id + n, dtype=np.int64)
    ids = as_id_array(ids)
    if len(ids) != n:
        raise ValueError(f"got {n} vectors but {len(ids)} ids")
    merged = np.concatenate([existing, ids])
    merged.sort()
    dup = merged[1:][merged[1:] == merged[:-1]]
    if len(dup):
        raise ValueError(
            f"ids must be unique in an index: {len(np.unique(dup))} id(s) repeated or already present "
            f"(e.g. {int(dup[0])}); remove the old vectors first or let add() number them"
        )
    return ids


def sort_results(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (score descending, id ascending), keep ``k`` columns and pad to ``k``.

    Entries with id -1 or score -inf become padding (-inf, -1) and sort last.
    """
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    nq, m = scores.shape
    invalid = (ids < 0) | ~(scores > -np.inf)
    if invalid.any():
        scores = np.where(invalid, -np.inf, scores).astype(np.float32)
        ids = np.where(invalid, -1, ids)
    # padding ids -1 would sort before real ids among -inf scores; send them last
    tie_key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie_key, -scores), axis=-1)[:, :k]
    rows = np.arange(nq)[:, None]  # plain fancy indexing: take_along_axis costs ~10x more on small arrays
    scores = scores[rows, order]
    ids = ids[rows, order]
    if m < k:
        scores = np.concatenate([scores, np.full((nq, k - m), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((nq, k - m), -1, np.int64)], axis=1)
    return np.ascontiguousarray(scores), np.ascontiguousarray(ids)


# ---------------------------------------------------------------------------------------------
# Header


def write_header(path: Path, kind: str, dim: int, ntotal: int, **settings: Any) -> None:
    header = {
        "format": INDEX_FORMAT,
        "version": INDEX_FORMAT_VERSION,
        "kind": kind,
        "dim": int(dim),
        "ntotal": int(ntotal),
        **settings,
    }
    tmp = path / (HEADER_NAME + ".tmp")
    tmp.write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / HEADER_NAME)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check the JSON header of an index directory."""
    path = Path(path)
    header_path = path / HEADER_NAME
    if not header_path.is_file():
        what = "is not a directory" if not path.is_dir() else f"has no {HEADER_NAME}"
        raise IndexFormatError(f"{path} {what}: not a tokenret index (write one with index.save(path))")
    try:
        header = json.loads(header_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IndexFormatError(f"{header_path} is not valid JSON: {err}") from err
    if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{header_path} is not a tokenret index header (format != '{INDEX_FORMAT}')")
    version = header.get("version")
    if not isinstance(version, int) or version > INDEX_FORMAT_VERSION:
        raise IndexFormatError(
            f"{header_path} has layout version {version}; this tokenret reads up to "
            f"{INDEX_FORMAT_VERSION}: upgrade tokenret"
        )
    for key in ("kind", "dim", "ntotal"):
        if key not in header:
            raise IndexFormatError(f"{header_path} lacks '{key}'")
    return header


def _index_classes() -> dict[str, type[VectorIndex]]:
    # imported here: exact/faiss_index import this module, and faiss must stay optional
    from tokenret.index.exact import ExactIndex
    from tokenret.index.faiss_index import FaissIndex
    from tokenret.index.qdrant_index import QdrantIndex

    return {ExactIndex.kind: ExactIndex, FaissIndex.kind: FaissIndex, QdrantIndex.kind: QdrantIndex}


def load_index(path: str | os.PathLike) -> VectorIndex:
    """Load any index saved with ``save(path)``, choosing the class from the header's ``kind``.

    Example:
        >>> index = load_index("photos.index")   # doctest: +SKIP
        >>> scores, ids = index.search(query_descriptors, 100)   # doctest: +SKIP
    """
    header = read_header(path)
    classes = _index_classes()
    kind = header["kind"]
    if kind not in classes:
        raise IndexFormatError(f"{path}: unknown index kind '{kind}' (known: {', '.join(sorted(classes))})")
    return classes[kind]._load_dir(Path(path), header)


# ---------------------------------------------------------------------------------------------
# Factories


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
        from tokenret.index.exact import ExactIndex

        return ExactIndex(dim, **options)
    if spec.strip().lower() == "qdrant":
        from tokenret.index.qdrant_index import QdrantIndex

        return QdrantIndex(dim, **options)
    from tokenret.index.faiss_index import FaissIndex

    return FaissIndex(spec.strip(), dim, **options)


def is_exact_spec(spec: str) -> bool:
    """True for the specs :func:`make_index` maps to the exact index (``"Flat"``, ``"exact"``, any case)."""
    return spec.strip().lower() in _EXACT_SPECS


def choose_index_spec(n: int, dim: int) -> str:
    """Pick an index spec for ``n`` vectors of size ``dim``: exact up to 200k, IVF-PQ above.

    Rationale: up to ~200k descriptors an exact fp16 scan is cheap (400 MB, tens of ms per query
    for 1024-d on 2 cores) and always right; above that, :func:`ivf_pq_spec` keeps memory under
    100 B per image. ``HNSW32`` stores full fp32 vectors plus its graph (over 4 KB per 1024-d
    image) and needed efSearch > 512 for recall 0.95 at 1M, so it is not the default.
    Measurements: bench/README.md.

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

    nlist ~ 4 sqrt(n) rounded to a power of two; an HNSW graph over the centroids (a flat scan of
    4096 x 1024-d centroids alone costs ~2 ms per query); m = dim/8 four-bit codes (64 B for
    1024-d) searched with FAISS's SIMD "fast scan": the same recall as dim/16 eight-bit codes on
    clustered descriptors (0.71 at 1M) in a third of the time. PQ alone only reaches recall@100 ~0.7
    there: build with ``refine_factor`` (exact re-ranking against float16 vectors) for 0.95-0.98.

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
