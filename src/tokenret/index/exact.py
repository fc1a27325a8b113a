"""Exact (brute-force) inner-product search over float16-stored descriptors.

Vectors are kept as float16 (half the memory of float32; 2 KB per 1024-d descriptor) and scanned
in chunks of rows: each chunk is upcast to float32 into a small reused buffer (``chunk_size`` rows,
4 MB for 1024 x 1024-d, so it stays in cache between the upcast and the product) and multiplied
with the queries by torch's float32 matrix product (MKL, all of torch's threads). Scores are
therefore float32 inner products of the float16-rounded vectors, the same as a float32 brute
force on ``vectors.astype(np.float16)`` up to summation order. Products are never computed in
float16 (no fast fp16 arithmetic on common CPUs) nor in bfloat16 (too coarse for the ranking).

Chunk scores are gathered in a score buffer of at most ``2**22`` floats (16 MB); each full
buffer gives its best ``k`` per query (``torch.topk``) and those candidates are merged every
few buffers, so memory stays bounded whatever the collection size and the selection costs
little next to the products. Equal scores are ordered by increasing id, exactly: selection
takes ``k + 1`` candidates and only recomputes a row when its k-th and (k+1)-th scores tie.

On disk (``save``): ``vectors.npy`` (float16, (n, dim)), ``ids.npy`` (int64) and ``index.json``.
``load`` memory-maps ``vectors.npy`` read-only, so opening a large index is instant and only
the pages a search touches are read; adding to a memory-mapped index copies it into memory.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenret.index.base import (
    IndexFormatError,
    VectorIndex,
    as_float32_matrix,
    as_id_array,
    check_k,
    new_ids,
    sort_results,
    write_header,
)

#: Default rows upcast to float32 at a time: 1024 x 1024-d is 4 MB, which stays in the L3 cache
#: between the upcast and the product; larger chunks fall out of it (measured: bench/README.md, "search").
DEFAULT_CHUNK_SIZE = 1024
#: Default queries scored in one pass over the data (bounds the score buffer per pass).
DEFAULT_QUERY_BLOCK = 1024
#: Floats in the score buffer (rows x queries) between two top-k selections: 16 MB.
_SCORE_BUFFER_FLOATS = 1 << 22
#: At most this many rows go into one top-k selection (single queries).
_MAX_SELECT_ROWS = 1 << 16
#: Candidate lists are merged once they hold this many times k columns.
_MERGE_WIDTH_FACTOR = 16

#: Up to this many queries, a search scans the float16 rows with FAISS's scalar-quantizer kernel, which
#: converts inside its dot-product loop (one memory pass, no separate upcast pass as with chunks + BLAS);
#: it has no matrix product, so from a few queries on BLAS wins (measured: bench/README.md, "search").
FAISS_SCAN_MAX_QUERIES = 2
#: The float16 scan of a single query is split over torch's threads once each gets this many rows.
PARALLEL_SCAN_MIN_ROWS = 1 << 16

#: ``_lookup`` value meaning that row i holds id i for every row (no search needed).
_IDS_ARE_ROWS = object()

VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"


class ExactIndex(VectorIndex):
    """Exact inner-product k-NN over float16-stored vectors, with int64 ids.

    Args:
        dim: descriptor dimension.
        chunk_size: database rows upcast to float32 at a time (memory chunk_size * dim * 4 bytes,
            plus a 16 MB score buffer).
        query_block: queries searched in one pass over the data; more queries make more passes.
        compact_fraction: in-memory storage is compacted as soon as removed rows exceed this
            fraction; a memory-mapped index only marks removals until :meth:`compact` or
            :meth:`save`.
        faiss_scan: keep in-memory rows in FAISS-owned storage (a float16 scalar-quantizer index that
            numpy views without a copy) so single queries use FAISS's fused float16 scan; scores are the
            same float32 inner products of the float16 rows up to summation order (~1e-7). Without FAISS
            installed, or for memory-mapped rows, the BLAS path serves every query.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.standard_normal((1000, 64)).astype(np.float32)
        >>> x /= np.linalg.norm(x, axis=1, keepdims=True)
        >>> index = ExactIndex(64)
        >>> ids = index.add(x)
        >>> scores, found = index.search(x[:3], k=5)
        >>> found[:, 0].tolist()
        [0, 1, 2]
    """

    kind = "exact"

    def __init__(
        self,
        dim: int,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        query_block: int = DEFAULT_QUERY_BLOCK,
        compact_fraction: float = 1 / 16,
        faiss_scan: bool = True,
    ) -> None:
        super().__init__(dim)
        if chunk_size < 1 or query_block < 1:
            raise ValueError(f"chunk_size and query_block must be >= 1, got {chunk_size}, {query_block}")
        self.chunk_size = int(chunk_size)
        self.query_block = int(query_block)
        self.compact_fraction = float(compact_fraction)
        self.faiss_scan = bool(faiss_scan)
        self._sq = None  # the FAISS index owning self._vectors' memory, when faiss_scan applies
        self._vectors: np.ndarray = np.empty((0, self.dim), np.float16)  # capacity rows, first _n used
        self._ids: np.ndarray = np.empty(0, np.int64)
        self._n = 0
        self._alive: np.ndarray | None = None  # bool per used row; None while nothing is removed
        self._n_removed = 0
        self._lookup: Any = None  # (sorted live ids, their rows), or _IDS_ARE_ROWS

    # -- state ---------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return self._n - self._n_removed

    @property
    def is_memory_mapped(self) -> bool:
        """True while the vectors are read from a memory-mapped file (after :meth:`load`)."""
        return isinstance(self._vectors, np.memmap)

    @property
    def nbytes(self) -> int:
        """Bytes of stored vectors and ids (live and not yet compacted rows)."""
        return self._n * (self.dim * 2 + 8)

    @property
    def ids(self) -> np.ndarray:
        """Ids of the live vectors, in storage order (a copy)."""
        ids = self._ids[: self._n]
        return ids[self._alive].copy() if self._alive is not None else ids.copy()

    def _next_id(self) -> int:
        live = self.ids
        return int(live.max()) + 1 if len(live) else 0

    @classmethod
    def from_arrays(
        cls, vectors: np.ndarray, ids: np.ndarray, alive: np.ndarray | None = None, **options: Any
    ):
        """Search existing float16 rows (e.g. a memory-mapped file) in place, without copying them.

        Args:
            vectors: (rows, dim) float16.
            ids: (rows,) int64 id of each row; rows where ``alive`` is False are never returned.
            alive: (rows,) bool, or None when every row is live. Live ids must be unique and >= 0.
        """
        if vectors.dtype != np.float16 or vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-D float16 array, got {vectors.dtype} {vectors.shape}")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (len(vectors),):
            raise ValueError(f"need one id per row: {len(vectors)} rows, ids of shape {ids.shape}")
        live = ids if alive is None else ids[np.asarray(alive, bool)]
        if len(live) and (live.min() < 0 or len(np.unique(live)) != len(live)):
            raise ValueError("live ids must be unique and non-negative")
        index = cls(vectors.shape[1], **options)
        index._vectors, index._ids, index._n = vectors, ids.copy(), len(vectors)
        if alive is not None and not np.all(alive):
            index._alive = np.asarray(alive, bool).copy()
            index._n_removed = int((~index._alive).sum())
        return index

    def in_memory(self) -> ExactIndex:
        """A copy of the live rows in memory (FAISS-owned when faiss_scan applies, so single queries use the
        fused float16 scan); e.g. for a long-running server over a memory-mapped index."""
        live = np.flatnonzero(self._alive[: self._n]) if self._alive is not None else np.arange(self._n)
        copy = type(self)(
            self.dim,
            chunk_size=self.chunk_size,
            query_block=self.query_block,
            compact_fraction=self.compact_fraction,
            faiss_scan=self.faiss_scan,
        )
        vectors, sq = copy._new_storage(len(live))
        for start in range(0, len(live), 65536):  # bounded reads from a memory map
            rows = live[start : start + 65536]
            vectors[start : start + len(rows)] = self._vectors[rows]
        copy._vectors, copy._sq = vectors, sq
        copy._ids, copy._n = self._ids[live].copy(), len(live)
        return copy

    # -- adding and removing -------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """Add vectors (rounded to float16); see :meth:`VectorIndex.add`."""
        x = as_float32_matrix(vectors, self.dim, "vectors")
        ids = new_ids(ids, len(x), self.ids, self._next_id())
        m = len(x)
        if m == 0:
            return ids
        self._reserve(m)
        dst = self._vectors[self._n : self._n + m]
        torch.from_numpy(dst).copy_(torch.from_numpy(x))  # fp32 -> fp16, round to nearest even
        self._ids[self._n : self._n + m] = ids
        if self._alive is not None:
            self._alive[self._n : self._n + m] = True
        self._n += m
        self._lookup = None
        return ids

    def _new_storage(self, capacity: int) -> tuple[np.ndarray, Any]:
        """(capacity, dim) float16 rows for in-memory storage, and the FAISS index owning their memory when
        faiss_scan applies (else None). The array is only valid while that index lives: assign both to
        ``self._vectors`` / ``self._sq`` together, after copying out of the old storage."""
        faiss = _optional_faiss() if self.faiss_scan and capacity > 0 else None
        if faiss is None:
            return np.empty((capacity, self.dim), np.float16), None  # untouched pages cost no memory
        sq = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        nbytes = capacity * self.dim * 2
        sq.codes.resize(nbytes)  # QT_fp16 codes are the IEEE half values of the components, row by row
        array = faiss.rev_swig_ptr(sq.codes.data(), nbytes).view(np.float16).reshape(capacity, self.dim)
        return array, sq

    def _reserve(self, extra: int) -> None:
        """Make room for ``extra`` more rows, in memory (a memory-mapped index is copied in)."""
        need = self._n + extra
        if need <= len(self._vectors) and not self.is_memory_mapped:
            return
        capacity = max(need, int(len(self._vectors) * 1.5), 1024)
        vectors, sq = self._new_storage(capacity)
        vectors[: self._n] = self._vectors[: self._n]  # the old storage (and its owner) is still alive
        ids = np.empty(capacity, np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._vectors, self._sq, self._ids = vectors, sq, ids
        if self._alive is not None:
            alive = np.zeros(capacity, bool)
            alive[: self._n] = self._alive[: self._n]
            self._alive = alive

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; unknown ids are ignored. Returns the number removed."""
        rows = self._rows_of(as_id_array(ids))
        rows = np.unique(rows[rows >= 0])
        if len(rows) == 0:
            return 0
        if self._alive is None:
            self._alive = np.zeros(len(self._ids), bool)
            self._alive[: self._n] = True
        self._alive[rows] = False
        self._n_removed += len(rows)
        self._lookup = None
        if not self.is_memory_mapped and self._n_removed > self.compact_fraction * self._n:
            self.compact()
        return len(rows)

    def compact(self) -> None:
        """Drop removed rows from storage (copies a memory-mapped index into memory)."""
        if self._alive is None:
            return
        keep = self._alive[: self._n]
        kept = self._vectors[: self._n][keep]  # a copy (boolean indexing)
        if self.is_memory_mapped:
            self._vectors = np.ascontiguousarray(kept)
        else:
            vectors, sq = self._new_storage(len(kept))
            vectors[:] = kept
            self._vectors, self._sq = vectors, sq
        self._ids = self._ids[: self._n][keep].copy()
        self._n = len(self._ids)
        self._alive = None
        self._n_removed = 0
        self._lookup = None

    # -- lookups by id -------------------------------------------------------------------------

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Storage rows of ``ids`` (any shape), -1 where the id is not in the index."""
        if self._lookup is None:
            rows = np.arange(self._n) if self._alive is None else np.flatnonzero(self._alive[: self._n])
            if self._alive is None and np.array_equal(self._ids[: self._n], rows):
                self._lookup = _IDS_ARE_ROWS  # ids 0..n-1 in order (the usual case): the row is the id
            else:
                order = np.argsort(self._ids[rows], kind="stable")
                self._lookup = (self._ids[rows][order], rows[order])
        if self._lookup is _IDS_ARE_ROWS:
            ids = np.asarray(ids, dtype=np.int64)
            return np.where((ids >= 0) & (ids < self._n), ids, -1)
        sorted_ids, sorted_rows = self._lookup
        if len(sorted_ids) == 0:
            return np.full(np.shape(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
        return np.where(sorted_ids[pos] == ids, sorted_rows[pos], -1)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Return the stored (float16-rounded) vectors of ``ids`` as float32 (len(ids), dim)."""
        ids = as_id_array(ids)
        rows = self._rows_of(ids)
        if (rows < 0).any():
            missing = ids[rows < 0]
            raise KeyError(f"{len(missing)} id(s) not in the index, e.g. {int(missing[0])}")
        # torch widens float16 with the CPU's conversion instructions: 18x numpy's scalar loop here
        # (0.1 against 1.8 ms for 400 x 2048), a part of every re-ranked search's added latency
        return torch.from_numpy(np.ascontiguousarray(self._vectors[rows])).float().numpy()

    def rescore(self, queries: np.ndarray, ids: np.ndarray, *, query_block: int = 64) -> np.ndarray:
        """Exact float32 scores of each query against its own candidate ids.

        Args:
            queries: (nq, dim) float queries.
            ids: (nq, m) int64 candidate ids per query; -1 (padding) or unknown ids score -inf.
            query_block: queries gathered at once (memory ~ query_block * m * dim * 4 bytes).

        Returns:
            (nq, m) float32 inner products with the stored float16 vectors.
        """
        q = as_float32_matrix(queries, self.dim, "queries")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or len(ids) != len(q):
            raise ValueError(f"ids must have shape ({len(q)}, m), got {ids.shape}")
        rows = self._rows_of(ids)
        valid = rows >= 0
        out = np.full(ids.shape, -np.inf, np.float32)
        if not valid.any():
            return out
        rows = np.where(valid, rows, rows[valid][0])  # any stored row; masked out below
        m = ids.shape[1]
        for q0 in range(0, len(q), query_block):
            r = rows[q0 : q0 + query_block]
            vecs = torch.from_numpy(self._vectors[r.reshape(-1)]).float().view(len(r), m, self.dim)
            tq = torch.from_numpy(q[q0 : q0 + query_block]).unsqueeze(2)
            out[q0 : q0 + query_block] = torch.bmm(vecs, tq).squeeze(2).numpy()
        out[~valid] = -np.inf
        return out

    # -- search --------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN by inner product; see :meth:`VectorIndex.search`."""
        q = as_float32_matrix(queries, self.dim, "queries")
        k = check_k(k)
        nq = len(q)
        scores = np.full((nq, k), -np.inf, np.float32)
        ids = np.full((nq, k), -1, np.int64)
        if nq == 0 or self.ntotal == 0:
            return scores, ids
        if nq <= FAISS_SCAN_MAX_QUERIES and self._sq is not None:
            return self._faiss_scan(q, k)
        with warnings.catch_warnings():
            # torch warns that a read-only memory map gives a non-writable tensor; it is only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for b0 in range(0, nq, self.query_block):
                b1 = min(b0 + self.query_block, nq)
                s, i = self._search_block(q[b0:b1], k)
                scores[b0:b1], ids[b0:b1] = sort_results(s, i, k)
        return scores, ids

    def _faiss_scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A few queries by FAISS's float16 scan over the rows it owns (removed rows excluded).

        FAISS parallelises a flat scan over queries only, so one query would run on one core: with
        torch's thread count above 1 and enough rows, the rows are split into that many contiguous ranges
        scanned at once (FAISS releases the GIL) and the per-range top k are merged."""
        faiss = _optional_faiss()
        self._sq.ntotal = self._n
        alive = None
        if self._alive is not None:
            bitmap = np.packbits(self._alive[: self._n], bitorder="little")
            alive = faiss.IDSelectorBitmap(self._n, faiss.swig_ptr(bitmap))
        parts = max(1, min(torch.get_num_threads(), self._n // PARALLEL_SCAN_MIN_ROWS))
        bounds = np.linspace(0, self._n, parts + 1).astype(np.int64)

        def scan(part: int) -> tuple[np.ndarray, np.ndarray]:
            lo, hi = int(bounds[part]), int(bounds[part + 1])
            sel = alive
            if parts > 1:
                faiss.omp_set_num_threads(1)  # this thread's own setting: no OpenMP team for one query
                sel = (
                    faiss.IDSelectorRange(lo, hi)
                    if alive is None
                    else faiss.IDSelectorAnd(faiss.IDSelectorRange(lo, hi), alive)
                )
            params = None if sel is None else faiss.SearchParameters(sel=sel)
            return self._sq.search(q, min(k, hi - lo), params=params)

        if parts == 1:
            scores, rows = scan(0)
        else:
            found = list(_scan_pool(parts).map(scan, range(parts)))
            scores = np.concatenate([s for s, _ in found], axis=1)
            rows = np.concatenate([r for _, r in found], axis=1)
        ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        return sort_results(scores, ids, k)

    def _search_block(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k (unordered) for a block of queries in one pass over the stored rows."""
        nq = len(q)
        chunk_rows = min(self.chunk_size, self._n)
        # rows scored between two selections: a multiple of chunk_rows within the score buffer
        select_rows = min(_MAX_SELECT_ROWS, _SCORE_BUFFER_FLOATS // nq) // chunk_rows * chunk_rows
        select_rows = min(max(select_rows, chunk_rows), self._n)
        q_t = torch.from_numpy(q).T  # (dim, nq) view; scores come out (rows, nq)
        chunk_buffer = torch.empty((chunk_rows, self.dim), dtype=torch.float32)
        score_buffer = torch.empty((select_rows, nq), dtype=torch.float32)
        running = _RunningTopK(k)
        for block_start in range(0, self._n, select_rows):
            block_stop = min(block_start + select_rows, self._n)
            for start in range(block_start, block_stop, chunk_rows):
                stop = min(start + chunk_rows, block_stop)
                chunk = chunk_buffer[: stop - start]
                chunk.copy_(torch.from_numpy(self._vectors[start:stop]))  # fp16 -> fp32
                torch.mm(chunk, q_t, out=score_buffer[start - block_start : stop - block_start])
            block_scores = score_buffer[: block_stop - block_start]
            if self._alive is not None:
                removed = ~self._alive[block_start:block_stop]
                if removed.any():
                    block_scores[torch.from_numpy(removed)] = -torch.inf
            running.push_block(block_scores, torch.from_numpy(self._ids[block_start:block_stop]))
        return running.result()

    # -- persistence ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write ``vectors.npy``, ``ids.npy`` and ``index.json`` into directory ``path``.

        Removed rows are left out. Files are written under temporary names and renamed, so
        saving over the directory this index is memory-mapped from is safe.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        keep = None if self._alive is None else self._alive[: self._n]
        n_out = self.ntotal
        tmp_vectors = path / (VECTORS_FILE + ".tmp")
        out = np.lib.format.open_memmap(tmp_vectors, mode="w+", dtype=np.float16, shape=(n_out, self.dim))
        written = 0
        for start in range(0, self._n, 1 << 16):
            stop = min(start + (1 << 16), self._n)
            block = self._vectors[start:stop]
            if keep is not None:
                block = block[keep[start:stop]]
            out[written : written + len(block)] = block
            written += len(block)
        out.flush()
        del out
        tmp_ids = path / (IDS_FILE + ".tmp")
        with open(tmp_ids, "wb") as f:
            np.save(f, self.ids, allow_pickle=False)
        os.replace(tmp_vectors, path / VECTORS_FILE)
        os.replace(tmp_ids, path / IDS_FILE)
        write_header(
            path,
            self.kind,
            self.dim,
            n_out,
            vector_dtype="float16",
            vectors_file=VECTORS_FILE,
            ids_file=IDS_FILE,
        )

    @classmethod
    def _load_dir(cls, path: Path, header: dict[str, Any]) -> ExactIndex:
        dim, n = int(header["dim"]), int(header["ntotal"])
        index = cls(dim)
        vec_path, ids_path = path / VECTORS_FILE, path / IDS_FILE
        for p in (vec_path, ids_path):
            if not p.is_file():
                raise IndexFormatError(f"{path} lacks {p.name}: the index was not saved completely")
        # an empty array cannot be memory-mapped
        vectors = np.load(vec_path, mmap_mode="r" if n else None, allow_pickle=False)
        ids = np.load(ids_path, allow_pickle=False)
        if vectors.dtype != np.float16 or vectors.shape != (n, dim):
            raise IndexFormatError(
                f"{vec_path} holds {vectors.dtype} {vectors.shape}, header says float16 ({n}, {dim})"
            )
        if ids.dtype != np.int64 or ids.shape != (n,):
            raise IndexFormatError(f"{ids_path} holds {ids.dtype} {ids.shape}, header says int64 ({n},)")
        sorted_ids = np.sort(ids)
        if n and (sorted_ids[0] < 0 or (sorted_ids[1:] == sorted_ids[:-1]).any()):
            raise IndexFormatError(f"{ids_path} has negative or repeated ids")
        index._vectors, index._ids, index._n = vectors, np.array(ids), n
        return index


_SCAN_POOL: dict[int, ThreadPoolExecutor] = {}


def _scan_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool for the range-parallel float16 scan (threads are kept between queries)."""
    pool = _SCAN_POOL.get(workers)
    if pool is None:
        pool = _SCAN_POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="tokenret-scan")
    return pool


def _optional_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class _RunningTopK:
    """Best ``k`` (score, id) pairs per query row seen so far, merged lazily."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._scores: list[torch.Tensor] = []
        self._ids: list[torch.Tensor] = []
        self._width = 0
        #: (queries,) each query's k-th best score so far, once k have been seen: nothing below it can
        #: enter the top k, so later blocks only pass on the scores at or above it
        self._threshold: torch.Tensor | None = None

    def push_block(self, block_scores: torch.Tensor, ids: torch.Tensor) -> None:
        """Take a (rows, queries) block of scores of the rows ``ids`` (the layout the products fill).

        The first block goes through a full top-k selection; after it, a comparison with each query's
        k-th best so far keeps only the few scores that can still enter (a contiguous pass over the block
        instead of a top-k over its transposed, strided view). Same result: ties at the
        threshold are kept, and the final selection orders by (score, id) as before."""
        if self._threshold is None:
            self.push(block_scores.T, ids)
            self._merge()
            if self._width >= self.k:
                self._threshold = self._scores[0].min(dim=1).values
            return
        rows, cols = torch.nonzero(block_scores >= self._threshold, as_tuple=True)
        if len(rows) == 0:
            return
        order = torch.argsort(cols, stable=True)  # group by query, rows ascending within each
        rows, cols = rows[order], cols[order]
        nq = block_scores.shape[1]
        counts = torch.bincount(cols, minlength=nq)
        pos = torch.arange(len(cols)) - (torch.cumsum(counts, 0) - counts)[cols]
        width = int(counts.max())
        cand_scores = torch.full((nq, width), -torch.inf)
        cand_ids = torch.full((nq, width), -1, dtype=torch.int64)
        cand_scores[cols, pos] = block_scores[rows, cols]
        cand_ids[cols, pos] = ids[rows].to(torch.int64)
        # every query already holds k real entries (its threshold is finite, or -inf kept everything), so
        # padding never displaces a real score
        both_scores = torch.cat([self._scores[0], cand_scores], dim=1)
        s, i = _select_topk(both_scores, torch.cat([self._ids[0], cand_ids], dim=1), self.k)
        self._scores, self._ids, self._width = [s], [i], s.shape[1]
        self._threshold = s.min(dim=1).values

    def push(self, scores: torch.Tensor, ids: torch.Tensor) -> None:
        s, i = _select_topk(scores, ids, self.k)
        self._scores.append(s)
        self._ids.append(i)
        self._width += s.shape[1]
        if self._width >= _MERGE_WIDTH_FACTOR * self.k:
            self._merge()

    def _merge(self) -> None:
        if len(self._scores) > 1:
            s, i = _select_topk(torch.cat(self._scores, dim=1), torch.cat(self._ids, dim=1), self.k)
            self._scores, self._ids = [s], [i]
            self._width = s.shape[1]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self._scores[0].numpy(), self._ids[0].numpy()


def _select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` columns of each row by (score descending, id ascending), unordered.

    Args:
        scores: (r, m) float32 (may be a strided view).
        ids: (m,) ids shared by all rows, or (r, m).

    Returns:
        (r, min(k, m)) scores and ids (new tensors).
    """
    r, m = scores.shape
    if m <= k:
        return scores.clone(), (ids.expand(r, m) if ids.dim() == 1 else ids).clone()
    # k + 1 candidates: if the (k+1)-th best is below the k-th, the top k is unambiguous
    vals, cols = torch.topk(scores, k + 1, dim=1, largest=True, sorted=False)
    lowest, lowest_pos = torch.topk(vals, 2, dim=1, largest=False, sorted=True)
    keep = torch.ones_like(vals, dtype=torch.bool)
    keep[torch.arange(r), lowest_pos[:, 0]] = False
    vals = vals[keep].view(r, k)
    cols = cols[keep].view(r, k)
    picked = ids[cols] if ids.dim() == 1 else torch.gather(ids, 1, cols)
    # where the k-th and (k+1)-th best tie, topk chose arbitrarily among equal scores: redo those
    # (rare) rows so the smallest ids win and results never depend on threads or storage order
    for row in torch.nonzero(lowest[:, 0] == lowest[:, 1]).flatten().tolist():
        kth = lowest[row, 1]
        row_scores = scores[row]
        row_ids = ids if ids.dim() == 1 else ids[row]
        above = torch.nonzero(row_scores > kth).flatten()
        tied = torch.nonzero(row_scores == kth).flatten()
        tied = tied[torch.argsort(row_ids[tied], stable=True)[: k - len(above)]]
        chosen = torch.cat([above, tied])
        vals[row] = row_scores[chosen]
        picked[row] = row_ids[chosen]
    return vals, picked
