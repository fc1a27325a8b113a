"""FAISS indexes (IVF-PQ, HNSW, ...) behind the tokenret :class:`VectorIndex` interface.

``FaissIndex("IVF4096,PQ64", 1024)`` builds ``faiss.index_factory(1024, "IVF4096,PQ64",
METRIC_INNER_PRODUCT)``; indexes that cannot store ids themselves (everything but IVF) are wrapped
in ``IndexIDMap2`` so results carry the caller's int64 ids. Untrained indexes train on the first
``add`` (or an explicit :meth:`FaissIndex.train`) from a seeded random sample.

With ``refine_factor=f`` the index also keeps every vector in float16 (an :class:`ExactIndex`,
memory-mapped from disk after ``load``), fetches ``ceil(f * k)`` candidates from FAISS and
re-ranks them by exact inner product: PQ's approximate scores then only have to get the right
vectors into the candidate list, which lifts recall above what the codes alone can reach, at the
cost of gathering and scoring the candidates' rows (recall and times: bench/README.md, "search").
The on-disk float16 copy (2 KB per 1024-d vector) is only paged in where candidates fall.

faiss is optional: it is imported when a FAISS index is first made or loaded, with an error
saying ``pip install faiss-cpu`` when it is missing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.index.base import (
    IndexFormatError,
    VectorIndex,
    as_float32_matrix,
    as_id_array,
    check_k,
    new_ids,
    read_header,
    sort_results,
    write_header,
)
from tokenret.index.exact import ExactIndex

#: faiss-cpu 1.15's default ``distance_compute_blas_threshold`` (128000) sends flat searches of
#: fewer queries than that through a non-BLAS loop, far slower for tens of queries; this value
#: lets BLAS handle any batch of 20 or more. It is a process-wide faiss setting.
BLAS_THRESHOLD = 20
#: Default IVF lists visited per query (faiss's own default, 1, misses most neighbours).
DEFAULT_NPROBE = 16
#: Default minimum training vectors per IVF list (faiss's k-means warns below 39).
MIN_POINTS_PER_LIST = 39
#: Default training sample per IVF list (faiss's k-means subsamples above 256 anyway).
TRAIN_POINTS_PER_LIST = 64
#: Codebook size of 8-bit PQ / k-means: fewer training vectors than this cannot train it.
_MIN_TRAIN_POINTS = 256

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
REFINE_DIR = "refine"

_METRICS = ("ip", "l2")


def import_faiss() -> Any:
    """Import faiss, or fail with the command that installs it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError(
            "FAISS indexes need the faiss package: pip install faiss-cpu (or pip install 'tokenret[faiss]'). "
            "The exact index (spec 'Flat') works without it."
        ) from err
    return faiss


def _use_blas_for_batches(faiss: Any) -> None:
    if faiss.cvar.distance_compute_blas_threshold > BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


class FaissIndex(VectorIndex):
    """A faiss index from a factory string, with int64 ids, lazy training and optional re-ranking.

    Args:
        spec: faiss ``index_factory`` string, e.g. ``"HNSW32"``, ``"IVF4096,PQ64"``, ``"Flat"``.
        dim: descriptor dimension.
        metric: ``"ip"`` (inner product, default) or ``"l2"``. Scores are always returned as inner
            products: with ``"l2"`` they are ``1 - d^2 / 2``, exact for unit vectors.
        refine_factor: if set (>= 1), keep float16 copies of the vectors and re-rank the best
            ``ceil(refine_factor * k)`` FAISS candidates by exact inner product.
        nprobe: IVF lists visited per query (IVF specs only; default :data:`DEFAULT_NPROBE`).
        efSearch: HNSW search breadth (HNSW specs, or IVF with an HNSW quantizer).
        efConstruction: HNSW build breadth (faiss default 40; higher builds a better graph, slower).
        min_points_per_list: training needs at least this many vectors per IVF list.
        train_points_per_list: at most this many per list are sampled for training (seeded).
        seed: seed of the training sample.

    Raises:
        ImportError: faiss is not installed.
        ValueError: faiss does not understand ``spec``, or a parameter does not apply to it.

    Example:
        >>> index = FaissIndex("IVF1024_HNSW32,PQ64", 1024, refine_factor=8, nprobe=16)  # doctest: +SKIP
        >>> index.add(descriptors)          # trains on the first add   # doctest: +SKIP
        >>> scores, ids = index.search(queries, 100)                    # doctest: +SKIP
    """

    kind = "faiss"

    def __init__(
        self,
        spec: str,
        dim: int,
        *,
        metric: str = "ip",
        refine_factor: float | None = None,
        nprobe: int | None = None,
        efSearch: int | None = None,  # noqa: N803 - faiss's own parameter name
        efConstruction: int | None = None,  # noqa: N803
        min_points_per_list: int = MIN_POINTS_PER_LIST,
        train_points_per_list: int = TRAIN_POINTS_PER_LIST,
        seed: int = 1234,
        _index: Any = None,
    ) -> None:
        super().__init__(dim)
        self._faiss = faiss = import_faiss()
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if refine_factor is not None and not refine_factor >= 1:
            raise ValueError(f"refine_factor must be >= 1 (or None for no re-ranking), got {refine_factor}")
        self.spec = spec
        self.metric = metric
        self._refine_factor = None if refine_factor is None else float(refine_factor)
        self.min_points_per_list = int(min_points_per_list)
        self.train_points_per_list = int(train_points_per_list)
        self.seed = int(seed)
        if _index is None:
            faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
            try:
                _index = faiss.index_factory(self.dim, spec, faiss_metric)
            except RuntimeError as err:
                reason = str(err).strip().splitlines()[-1]
                raise ValueError(f"faiss cannot build index spec {spec!r} for dim {dim}: {reason}") from err
            _skip_polysemous_training(faiss, _index)
            if efConstruction is not None:
                hnsw = _hnsw_graph(faiss, _index)
                if hnsw is None:
                    raise ValueError(f"index spec {spec!r} has no HNSW graph to set efConstruction on")
                hnsw.efConstruction = int(efConstruction)
            if not _stores_ids(faiss, _index):
                _index = faiss.IndexIDMap2(_index)
        self._index = _index
        ivf = faiss.try_extract_index_ivf(self._index)
        self.nlist = int(ivf.nlist) if ivf is not None else 0
        self._ids = np.empty(0, np.int64)
        # plain numpy rows (no FAISS scan storage): numpy's large allocations get transparent huge pages,
        # so gathering scattered candidate rows takes fewer TLB misses
        self._store = ExactIndex(self.dim, faiss_scan=False) if self._refine_factor is not None else None
        self._nprobe: int | None = None
        self._efSearch: int | None = None
        if nprobe is None and self.nlist:
            nprobe = min(DEFAULT_NPROBE, self.nlist)
        self.set_search_params(nprobe=nprobe, efSearch=efSearch)

    # -- state and parameters ------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (for faiss-level inspection)."""
        return self._index

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def ids(self) -> np.ndarray:
        """Ids of the stored vectors, in insertion order (a copy)."""
        return self._ids.copy()

    @property
    def is_hnsw(self) -> bool:
        """True when the vectors themselves sit in an HNSW graph (``efSearch`` sets the search breadth)."""
        return _is_hnsw(self._faiss, self._index)

    @property
    def min_train_points(self) -> int:
        """Fewest vectors :meth:`train` accepts for this spec."""
        return max(self.min_points_per_list * self.nlist, _MIN_TRAIN_POINTS)

    @property
    def refine_factor(self) -> float | None:
        """Candidates re-ranked per result (None: FAISS scores as they are).

        Can be changed, or set to None and back, on an index built with re-ranking vectors.
        """
        return self._refine_factor

    @refine_factor.setter
    def refine_factor(self, value: float | None) -> None:
        if value is not None:
            if not value >= 1:
                raise ValueError(f"refine_factor must be >= 1 (or None for no re-ranking), got {value}")
            if self._store is None:
                raise ValueError(
                    "this index keeps no vectors for re-ranking: build it with refine_factor set "
                    "(e.g. make_index(spec, dim, refine_factor=8)) to re-rank"
                )
            value = float(value)
        self._refine_factor = value

    @property
    def nprobe(self) -> int | None:
        return self._nprobe

    @property
    def efSearch(self) -> int | None:  # noqa: N802 - faiss's own parameter name
        return self._efSearch

    def set_search_params(self, *, nprobe: int | None = None, efSearch: int | None = None) -> None:  # noqa: N803
        """Set IVF ``nprobe`` and/or HNSW ``efSearch`` (None leaves a parameter unchanged)."""
        space = self._faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", efSearch)):
            if value is None:
                continue
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            try:
                space.set_index_parameter(self._index, name, int(value))
            except RuntimeError as err:
                kind = "IVF" if name == "nprobe" else "HNSW"
                raise ValueError(
                    f"index spec {self.spec!r} has no {name} parameter (only {kind} indexes do)"
                ) from err
            setattr(self, "_" + name, int(value))

    # -- training and adding -------------------------------------------------------------------

    def train(self, vectors: np.ndarray) -> None:
        """Train the index on a sample of ``vectors`` (no-op for indexes that need no training).

        Raises:
            ValueError: fewer than :attr:`min_train_points` vectors.
        """
        if self._index.is_trained:
            return
        x = as_float32_matrix(vectors, self.dim, "training vectors")
        need = self.min_train_points
        if len(x) < need:
            per_list = (
                f" ({self.min_points_per_list} per list x {self.nlist} IVF lists)" if self.nlist else ""
            )
            raise ValueError(
                f"index spec {self.spec!r} needs at least {need} training vectors{per_list}, got {len(x)}. "
                "Add more vectors in the first add() call, call train() with a larger sample, use a smaller "
                "nlist (choose_index_spec(n, dim) picks one for n vectors) or the exact index ('Flat')."
            )
        cap = max(self.train_points_per_list * self.nlist, 1 << 16)
        if len(x) > cap:
            rows = np.sort(np.random.default_rng(self.seed).choice(len(x), cap, replace=False))
            x = x[rows]
        _use_blas_for_batches(self._faiss)  # k-means assignment steps are batched searches too
        self._index.train(x)

    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Add vectors, training first if needed; see :meth:`VectorIndex.add`."""
        x = as_float32_matrix(vectors, self.dim, "vectors")
        next_id = int(self._ids.max()) + 1 if len(self._ids) else 0
        ids = new_ids(ids, len(x), self._ids, next_id)
        if len(x) == 0:
            return ids
        if not self._index.is_trained:
            self.train(x)
        self._index.add_with_ids(x, ids)
        if self._store is not None:
            self._store.add(x, ids)
        self._ids = np.concatenate([self._ids, ids])
        return ids

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id (unknown ids are ignored). HNSW indexes cannot remove.

        Raises:
            NotImplementedError: the faiss index type has no removal (HNSW graphs); rebuild
                the index from the vectors to keep instead.
        """
        ids = as_id_array(ids)
        if _is_hnsw(self._faiss, self._index):
            raise NotImplementedError(
                f"index spec {self.spec!r} cannot remove vectors (faiss HNSW graphs do not support removal): "
                "rebuild the index without them, or use an 'IVF...' spec or 'Flat' where photos get deleted"
            )
        present = ids[np.isin(ids, self._ids)]
        if len(present) == 0:
            return 0
        try:
            removed = int(self._index.remove_ids(self._faiss.IDSelectorBatch(present)))
        except RuntimeError as err:
            raise NotImplementedError(
                f"index spec {self.spec!r} cannot remove vectors ({str(err).strip().splitlines()[-1]}); "
                "rebuild the index without them"
            ) from err
        self._ids = self._ids[~np.isin(self._ids, present)]
        if self._store is not None:
            self._store.remove(present)
        return removed

    # -- search --------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate k-NN (exactly re-ranked when ``refine_factor`` is set)."""
        q = as_float32_matrix(queries, self.dim, "queries")
        k = check_k(k)
        if len(q) == 0 or self.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        _use_blas_for_batches(self._faiss)
        refine = self._refine_factor is not None
        n_candidates = min(self.ntotal, max(k, math.ceil(self._refine_factor * k))) if refine else k
        if len(q) == 1 and (self.nlist or _is_hnsw(self._faiss, self._index)):
            scores, ids = self._search_one_thread(q, n_candidates)
        else:
            scores, ids = self._index.search(q, n_candidates)
        if refine:
            scores = self._store.rescore(q, ids)
        elif self.metric == "l2":
            scores = 1.0 - scores / 2.0
        return sort_results(scores, ids, k)

    def _search_one_thread(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search without an OpenMP team: IVF and HNSW split work by query, so one query runs on one
        thread anyway, and the team's fork/join would be a large share of a sub-millisecond query
        (more so on a busy CPU)."""
        faiss = self._faiss
        threads = faiss.omp_get_max_threads()  # per calling thread in OpenMP
        faiss.omp_set_num_threads(1)
        try:
            return self._index.search(q, k)
        finally:
            faiss.omp_set_num_threads(threads)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write ``index.faiss``, ``ids.npy``, ``refine/`` (when re-ranking) and ``index.json``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp_index = path / (INDEX_FILE + ".tmp")
        self._faiss.write_index(self._index, str(tmp_index))
        tmp_ids = path / (IDS_FILE + ".tmp")
        with open(tmp_ids, "wb") as f:
            np.save(f, self._ids, allow_pickle=False)
        if self._store is not None:
            self._store.save(path / REFINE_DIR)
        os.replace(tmp_index, path / INDEX_FILE)
        os.replace(tmp_ids, path / IDS_FILE)
        write_header(
            path,
            self.kind,
            self.dim,
            self.ntotal,
            spec=self.spec,
            metric=self.metric,
            refine_factor=self._refine_factor,
            refine_vectors=self._store is not None,
            nprobe=self._nprobe,
            efSearch=self._efSearch,
            min_points_per_list=self.min_points_per_list,
            train_points_per_list=self.train_points_per_list,
            seed=self.seed,
        )

    @classmethod
    def _load_dir(cls, path: Path, header: dict[str, Any]) -> FaissIndex:
        faiss = import_faiss()
        index_path = path / INDEX_FILE
        if not index_path.is_file() or not (path / IDS_FILE).is_file():
            raise IndexFormatError(
                f"{path} lacks {INDEX_FILE} or {IDS_FILE}: the index was not saved completely"
            )
        raw = faiss.read_index(str(index_path))
        if raw.d != header["dim"] or raw.ntotal != header["ntotal"]:
            raise IndexFormatError(
                f"{index_path} holds {raw.ntotal} vectors of dim {raw.d}, "
                f"header says {header['ntotal']} of dim {header['dim']}"
            )
        index = cls(
            header["spec"],
            header["dim"],
            metric=header.get("metric", "ip"),
            refine_factor=None,
            nprobe=header.get("nprobe"),
            efSearch=header.get("efSearch"),
            min_points_per_list=header.get("min_points_per_list", MIN_POINTS_PER_LIST),
            train_points_per_list=header.get("train_points_per_list", TRAIN_POINTS_PER_LIST),
            seed=header.get("seed", 1234),
            _index=raw,
        )
        ids = np.load(path / IDS_FILE, allow_pickle=False)
        if ids.dtype != np.int64 or ids.shape != (raw.ntotal,):
            raise IndexFormatError(
                f"{path / IDS_FILE} holds {ids.dtype} {ids.shape}, expected int64 ({raw.ntotal},)"
            )
        index._ids = np.array(ids)
        if header.get("refine_vectors", header.get("refine_factor") is not None):
            store_dir = path / REFINE_DIR
            store = ExactIndex._load_dir(store_dir, read_header(store_dir))
            if store.ntotal != raw.ntotal or store.dim != raw.d:
                raise IndexFormatError(
                    f"{store_dir} holds {store.ntotal} vectors, the faiss index {raw.ntotal}"
                )
            index._store = store
            index.refine_factor = header.get("refine_factor")
        return index

    def __repr__(self) -> str:
        extra = f", refine_factor={self._refine_factor}" if self._refine_factor is not None else ""
        return f"FaissIndex({self.spec!r}, dim={self.dim}, ntotal={self.ntotal}{extra})"


def _stores_ids(faiss: Any, index: Any) -> bool:
    """True for indexes that keep arbitrary ids themselves (IVF, possibly behind a transform, or IDMap)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return _stores_ids(faiss, index.index)
    return isinstance(index, (faiss.IndexIVF, faiss.IndexIDMap, faiss.IndexIDMap2))


def _is_hnsw(faiss: Any, index: Any) -> bool:
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        return _is_hnsw(faiss, index.index)
    return isinstance(index, faiss.IndexHNSW)


def _skip_polysemous_training(faiss: Any, index: Any) -> None:
    """Switch off polysemous training of PQ codes, which index_factory turns on.

    It reorders each codebook by simulated annealing so that codes can be compared by Hamming
    distance (polysemous search, unused here) and makes training far slower.
    """
    index = faiss.downcast_index(index)
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False
    if isinstance(index, faiss.IndexPreTransform):
        _skip_polysemous_training(faiss, index.index)


def _hnsw_graph(faiss: Any, index: Any) -> Any:
    """The HNSW graph of an HNSW index or of an IVF index's HNSW quantizer, else None."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        return _hnsw_graph(faiss, index.index)
    if isinstance(index, faiss.IndexHNSW):
        return index.hnsw
    if isinstance(index, faiss.IndexIVF):
        return _hnsw_graph(faiss, index.quantizer)
    return None
