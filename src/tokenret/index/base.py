"""The index interface shared by every tokenret index and its on-disk header (factories: :mod:`.factory`).

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
kind's settings) next to the kind's data files; ``load_index`` reads the header and hands the
directory to the right class. Nothing in these files is executed: the header is JSON and arrays
are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import abc
import json
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


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete or written by an incompatible version."""


#: Index classes by their header ``kind``, filled as each class is defined.
_KINDS: dict[str, type[VectorIndex]] = {}


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

    #: Value of ``kind`` in the header; also the key :meth:`load` dispatches on.
    kind: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

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
        """Load an index saved with :meth:`save`, choosing the class from the header's ``kind`` (among the
        classes imported so far: :func:`tokenret.index.load_index` imports them all); on a subclass, also
        check it is of that class."""
        header = read_header(path)
        kind = header["kind"]
        klass = _KINDS.get(kind)
        if klass is None:
            raise IndexFormatError(
                f"{path}: unknown index kind '{kind}' (known: {', '.join(sorted(_KINDS))})"
            )
        if not issubclass(klass, cls):
            raise IndexFormatError(
                f"{path} holds a {klass.__name__} ('{kind}' index), not a {cls.__name__}; "
                "use tokenret.index.load_index to load any kind"
            )
        return klass._load_dir(Path(path), header)

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
    rows = np.arange(nq)[:, None]  # plain fancy indexing: take_along_axis has more overhead on small arrays
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
