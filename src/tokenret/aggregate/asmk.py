"""ASMK and ASMK* (aggregated selective match kernel) as HOW evaluates local descriptors.

Per image and visual word w, the residuals of the descriptors assigned to w are summed,
``A_w = sum (x - c_w)``, over every descriptor that has w among its m nearest words (m = 1 for database
images, 5 for queries in HOW). Non-binary ASMK keeps ``V_w = A_w / (||A_w|| + 1e-6)``; ASMK* keeps the
bits ``A_w > 0`` packed into bytes. Two images are compared word by word:

    u_w = V_q . V_d                      (non-binary)
    u_w = 1 - 2 h / d                    (binary; h = Hamming distance of the d-bit codes)
    S(q, d) = sum over shared words of idf_w * sigma(u_w) / sqrt(N_q * N_d)
    sigma(u) = sign(u) |u|^alpha if u >= tau else 0

with ``N_x = |W_x|`` (number of words of the image) without IDF, or ``sum_{w in W_x} idf_w`` with it,
``idf_w = ln(N_images / count_w)^2`` (count_w = database images holding w; a word no database image
holds keeps weight 1, as in ASMK's Python code). HOW's setting: binary, alpha 3, tau 0, no IDF.

:class:`AsmkIndex` stores one posting list per word (image rows and packed codes, contiguous numpy
arrays sorted by word) and scores a query by reading only the lists of its own words.

Example:
    >>> import numpy as np
    >>> from tokenret.aggregate import AsmkIndex, Codebook
    >>> rng = np.random.default_rng(0)
    >>> codebook = Codebook.train(rng.standard_normal((4000, 32)).astype(np.float32), size=64, seed=0)
    >>> index = AsmkIndex(codebook)                   # ASMK* as in HOW: binary, alpha 3, tau 0, m 5/1
    >>> ids = index.add([rng.standard_normal((100, 32)).astype(np.float32) for _ in range(3)])
    >>> scores, found = index.search([rng.standard_normal((100, 32)).astype(np.float32)], k=2)
    >>> found.shape
    (1, 2)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.aggregate.codebook import Codebook
from tokenret.index.base import (
    IndexFormatError,
    as_id_array,
    check_k,
    new_ids,
    read_header,
    sort_results,
    write_header,
)

#: Added to ||A_w|| before dividing, as ASMK's Python code.
NORM_EPS = 1e-6
#: Posting-list entries scored at once per query (bounds temporary memory to ~ this x code size).
SEARCH_CHUNK_ENTRIES = 1 << 22

ARRAYS_FILE = "asmk.npz"
CODEBOOK_FILE = "codebook.npy"

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def popcount_bytes(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint8 element."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _POPCOUNT[x]  # pragma: no cover - old numpy


def packed_hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between bit codes packed in uint8 along the last axis (broadcasting)."""
    return popcount_bytes(np.bitwise_xor(a, b)).sum(axis=-1, dtype=np.int64)


def binarize_and_pack(a: np.ndarray) -> np.ndarray:
    """(n, d) float -> (n, ceil(d / 8)) uint8: bit j of a row is ``a[j] > 0`` (zero maps to 0)."""
    return np.packbits(np.asarray(a) > 0, axis=-1, bitorder="little")


def selectivity(u: np.ndarray, alpha: float, tau: float) -> np.ndarray:
    """ASMK's kernel sigma(u) = sign(u) |u|^alpha for u >= tau, else 0."""
    u = np.asarray(u, dtype=np.float64)
    return np.where(u >= tau, np.sign(u) * np.abs(u) ** alpha, 0.0)


@dataclass
class AggregatedSet:
    """One image's aggregated residuals: one entry per distinct visual word.

    Attributes:
        words: (W,) int64 distinct word ids, increasing.
        vectors: (W, d) float32 unit residual sums (non-binary) or (W, ceil(d/8)) uint8 packed bits.
        dim: descriptor dimension d.
        binary: which of the two.
    """

    words: np.ndarray
    vectors: np.ndarray
    dim: int
    binary: bool

    def __len__(self) -> int:
        return len(self.words)


def aggregate_residuals(
    descriptors: np.ndarray, codebook: Codebook, m: int = 1, *, binary: bool = True
) -> AggregatedSet:
    """Aggregate one image's local descriptors per visual word (HOW / ASMK's ``aggregate_image``).

    Args:
        descriptors: (n, d) local descriptors of one image.
        codebook: the visual words.
        m: each descriptor adds its residual to each of its m nearest words.
        binary: pack the signs (ASMK*) instead of L2-normalising (ASMK).
    """
    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != codebook.dim:
        raise ValueError(f"descriptors must have shape (n, {codebook.dim}), got {x.shape}")
    d = codebook.dim
    if len(x) == 0:
        width = (d + 7) // 8 if binary else d
        return AggregatedSet(
            np.empty(0, np.int64), np.empty((0, width), np.uint8 if binary else np.float32), d, binary
        )
    words = codebook.quantize(x, m).reshape(-1)
    residuals = np.repeat(x, m, axis=0) - codebook.centroids[words]
    order = np.argsort(words, kind="stable")
    sorted_words = words[order]
    unique, starts = np.unique(sorted_words, return_index=True)
    sums = np.add.reduceat(residuals[order], starts, axis=0)
    if binary:
        vectors = binarize_and_pack(sums)
    else:
        vectors = (sums / (np.linalg.norm(sums, axis=1, keepdims=True) + NORM_EPS)).astype(np.float32)
    return AggregatedSet(unique.astype(np.int64), vectors, d, binary)


def word_similarity(q_vectors: np.ndarray, d_vectors: np.ndarray, dim: int, binary: bool) -> np.ndarray:
    """Row-wise u between aligned rows of two aggregated-vector arrays."""
    if binary:
        return 1.0 - 2.0 * packed_hamming(q_vectors, d_vectors) / dim
    return np.einsum("ij,ij->i", q_vectors.astype(np.float64), d_vectors.astype(np.float64))


def asmk_similarity(
    query: AggregatedSet,
    database: AggregatedSet,
    *,
    alpha: float = 3.0,
    tau: float = 0.0,
    idf: np.ndarray | None = None,
) -> float:
    """Direct ASMK score of two aggregated images (a reference for the inverted file).

    Args:
        query, database: outputs of :func:`aggregate_residuals` of the same kind.
        alpha, tau: the selectivity exponent and threshold.
        idf: optional (K,) word weights; the normalisers become sums of idf over each image's words.
    """
    if query.binary != database.binary or query.dim != database.dim:
        raise ValueError("both images must be aggregated the same way (binary flag and dimension)")
    shared, qi, di = np.intersect1d(query.words, database.words, assume_unique=True, return_indices=True)
    u = word_similarity(query.vectors[qi], database.vectors[di], query.dim, query.binary)
    weights = np.ones(len(shared)) if idf is None else np.asarray(idf, np.float64)[shared]
    numerator = float((weights * selectivity(u, alpha, tau)).sum())
    if idf is None:
        nq, nd = float(len(query)), float(len(database))
    else:
        idf = np.asarray(idf, np.float64)
        nq, nd = float(idf[query.words].sum()), float(idf[database.words].sum())
    if nq <= 0 or nd <= 0:
        return 0.0
    return numerator / np.sqrt(nq * nd)


class AsmkIndex:
    """Inverted file of aggregated residuals, searched with the ASMK kernel.

    The interface follows :class:`tokenret.index.VectorIndex` where it fits: ``add`` takes descriptor
    sets (one (n_i, d) array per image) instead of vectors, ``search`` takes query sets; scores are ASMK
    similarities, ranked best first with ties by increasing id, padded with -inf / -1.

    Args:
        codebook: visual words.
        binary: ASMK* (packed sign bits, HOW's choice) or ASMK (unit float residuals).
        alpha: selectivity exponent (3).
        tau: similarity threshold (0); scores below it count 0.
        use_idf: weight words by ``ln(N / count_w)^2`` (off in HOW).
        query_assignment: m for queries (5 in HOW).
        database_assignment: m for database images (1 in HOW).

    Example:
        >>> index = AsmkIndex(codebook, binary=True, alpha=3.0, tau=0.0)        # doctest: +SKIP
        >>> ids = index.add(list_of_descriptor_arrays)                          # doctest: +SKIP
        >>> scores, found = index.search(list_of_query_arrays, k=100)           # doctest: +SKIP
        >>> index.save("roxf.asmk"); index = AsmkIndex.load("roxf.asmk")        # doctest: +SKIP
    """

    kind = "asmk"

    def __init__(
        self,
        codebook: Codebook,
        *,
        binary: bool = True,
        alpha: float = 3.0,
        tau: float = 0.0,
        use_idf: bool = False,
        query_assignment: int = 5,
        database_assignment: int = 1,
    ) -> None:
        self.codebook = codebook
        self.binary = bool(binary)
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.use_idf = bool(use_idf)
        for name, m in (("query_assignment", query_assignment), ("database_assignment", database_assignment)):
            if not 1 <= int(m) <= codebook.size:
                raise ValueError(f"{name} must be in 1..{codebook.size}, got {m}")
        self.query_assignment = int(query_assignment)
        self.database_assignment = int(database_assignment)
        # per image
        self._ids = np.empty(0, np.int64)
        self._n_words = np.empty(0, np.int64)
        # posting entries, sorted by (word, image row) once finalised
        # int32: 8 bytes per posting entry beside its code instead of 16 (words < K, rows < 2^31 images)
        self._words = np.empty(0, np.int32)
        self._rows = np.empty(0, np.int32)
        self._codes = np.empty((0, self.code_width), self.code_dtype)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._offsets: np.ndarray | None = None
        self._idf: np.ndarray | None = None
        self._norms: np.ndarray | None = None

    # -- properties ---------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.codebook.dim

    @property
    def code_width(self) -> int:
        return (self.dim + 7) // 8 if self.binary else self.dim

    @property
    def code_dtype(self) -> type:
        return np.uint8 if self.binary else np.float32

    @property
    def ntotal(self) -> int:
        return len(self._ids)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> np.ndarray:
        return self._ids.copy()

    def settings(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "alpha": self.alpha,
            "tau": self.tau,
            "use_idf": self.use_idf,
            "query_assignment": self.query_assignment,
            "database_assignment": self.database_assignment,
            "codebook_size": self.codebook.size,
        }

    def __repr__(self) -> str:
        s = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"AsmkIndex(dim={self.dim}, ntotal={self.ntotal}, {s})"

    # -- aggregation --------------------------------------------------------------------------

    def aggregate(self, descriptors: np.ndarray, *, query: bool) -> AggregatedSet:
        """Aggregate one image's descriptors with the query or the database assignment."""
        m = self.query_assignment if query else self.database_assignment
        return aggregate_residuals(descriptors, self.codebook, m, binary=self.binary)

    def _as_aggregated(self, item: np.ndarray | AggregatedSet, *, query: bool) -> AggregatedSet:
        if isinstance(item, AggregatedSet):
            if item.binary != self.binary or item.dim != self.dim:
                raise ValueError(
                    f"aggregated set is {'binary' if item.binary else 'non-binary'} {item.dim}-d; this index "
                    f"is {'binary' if self.binary else 'non-binary'} {self.dim}-d"
                )
            return item
        return self.aggregate(item, query=query)

    @staticmethod
    def _as_sets(sets: Any) -> list:
        if isinstance(sets, AggregatedSet) or (isinstance(sets, np.ndarray) and sets.ndim == 2):
            return [sets]  # one image, like a single vector in VectorIndex.search
        return list(sets)

    # -- building -----------------------------------------------------------------------------

    def add(
        self, descriptor_sets: Sequence[np.ndarray | AggregatedSet], ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Add images, each a (n_i, d) descriptor array (or an already aggregated set).

        Returns:
            The int64 ids of the images (consecutive from ``max(id) + 1`` when ``ids`` is None).
        """
        sets = [self._as_aggregated(s, query=False) for s in self._as_sets(descriptor_sets)]
        next_id = int(self._ids.max()) + 1 if len(self._ids) else 0
        ids = new_ids(ids, len(sets), self._ids, next_id)
        if not sets:
            return ids
        first_row = len(self._ids)
        if first_row + len(sets) > np.iinfo(np.int32).max:
            raise ValueError("an ASMK inverted file holds at most 2^31 - 1 images")
        lengths = np.array([len(s) for s in sets], np.int64)
        words = np.concatenate([s.words for s in sets]).astype(np.int32)
        rows = np.repeat(np.arange(first_row, first_row + len(sets), dtype=np.int32), lengths)
        codes = np.concatenate([s.vectors.astype(self.code_dtype, copy=False) for s in sets])
        self._pending.append((words, rows, codes))
        self._ids = np.concatenate([self._ids, ids])
        self._n_words = np.concatenate([self._n_words, lengths])
        self._offsets = self._idf = self._norms = None
        return ids

    def _finalize(self) -> None:
        """Merge pending entries into the word-sorted posting arrays; compute idf and image norms."""
        if self._pending:
            words = np.concatenate([self._words] + [p[0] for p in self._pending])
            rows = np.concatenate([self._rows] + [p[1] for p in self._pending])
            codes = np.concatenate([self._codes] + [p[2] for p in self._pending])
            order = np.lexsort((rows, words))
            self._words, self._rows, self._codes = words[order], rows[order], codes[order]
            self._pending = []
        if self._offsets is None:
            counts = np.bincount(self._words, minlength=self.codebook.size)
            self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._idf = self._compute_idf(counts)
            if self.use_idf:
                self._norms = np.bincount(self._rows, weights=self._idf[self._words], minlength=self.ntotal)
            else:
                self._norms = self._n_words.astype(np.float64)

    def _compute_idf(self, counts: np.ndarray) -> np.ndarray:
        idf = np.ones(self.codebook.size, np.float64)
        if self.use_idf and self.ntotal:
            held = counts > 0
            idf[held] = np.log(self.ntotal / counts[held]) ** 2
        return idf

    @property
    def idf(self) -> np.ndarray:
        """(K,) word weights in use (all ones without IDF)."""
        self._finalize()
        return self._idf.copy()

    @property
    def counts(self) -> np.ndarray:
        """(K,) number of database images holding each word (the posting-list lengths)."""
        self._finalize()
        return np.diff(self._offsets)

    def posting_list(self, word: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, codes) stored for one word."""
        self._finalize()
        s = slice(self._offsets[word], self._offsets[word + 1])
        return self._ids[self._rows[s]], self._codes[s]

    def remove(self, ids: np.ndarray) -> int:
        """Remove images by id (unknown ids are ignored); returns how many were removed."""
        ids = as_id_array(ids)
        gone = np.isin(self._ids, ids)
        n_gone = int(gone.sum())
        if n_gone == 0:
            return 0
        self._finalize()
        keep_rows = ~gone
        new_row = np.cumsum(keep_rows) - 1
        keep_entries = keep_rows[self._rows]
        self._words = self._words[keep_entries]
        self._rows = new_row[self._rows[keep_entries]].astype(np.int32)
        self._codes = self._codes[keep_entries]
        self._ids = self._ids[keep_rows]
        self._n_words = self._n_words[keep_rows]
        self._offsets = self._idf = self._norms = None
        return n_gone

    # -- search -------------------------------------------------------------------------------

    def score_all(self, query: np.ndarray | AggregatedSet) -> np.ndarray:
        """ASMK scores of one query against every database image, in storage order (see :attr:`ids`).

        Only the posting lists of the query's words are read; images sharing no word score 0.
        """
        q = self._as_aggregated(query, query=True)
        self._finalize()
        scores = np.zeros(self.ntotal, np.float64)
        if len(q) == 0 or self.ntotal == 0:
            return scores.astype(np.float32)
        idf = self._idf[q.words]
        q_norm = float(idf.sum())
        starts, ends = self._offsets[q.words], self._offsets[q.words + 1]
        lengths = ends - starts
        # score the query's words in groups whose lists hold at most SEARCH_CHUNK_ENTRIES entries
        cum = np.cumsum(lengths)
        group_start = 0
        while group_start < len(q):
            budget = (cum[group_start - 1] if group_start else 0) + SEARCH_CHUNK_ENTRIES
            group_end = max(int(np.searchsorted(cum, budget, side="right")), group_start + 1)
            self._score_words(q, slice(group_start, group_end), starts, lengths, idf, scores)
            group_start = group_end
        norms = self._norms
        valid = norms > 0
        scores[valid] /= np.sqrt(norms[valid])
        scores[~valid] = 0.0
        if q_norm <= 0:
            return np.zeros(self.ntotal, np.float32)
        return (scores / np.sqrt(q_norm)).astype(np.float32)

    def _score_words(
        self,
        q: AggregatedSet,
        group: slice,
        starts: np.ndarray,
        lengths: np.ndarray,
        idf: np.ndarray,
        scores: np.ndarray,
    ) -> None:
        g_len = lengths[group]
        total = int(g_len.sum())
        if total == 0:
            return
        # entry positions of the concatenated posting lists of this group's words
        which = np.repeat(np.arange(len(g_len)), g_len)
        first = np.concatenate([[0], np.cumsum(g_len)[:-1]])
        entries = starts[group][which] + (np.arange(total) - first[which])
        u = word_similarity(q.vectors[group][which], self._codes[entries], self.dim, self.binary)
        contribution = idf[group][which] * selectivity(u, self.alpha, self.tau)
        scores += np.bincount(self._rows[entries], weights=contribution, minlength=self.ntotal)

    def search(
        self, query_sets: Sequence[np.ndarray | AggregatedSet] | np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(scores, ids)``, each (nq, k): the k best database images per query set.

        Args:
            query_sets: one (n_i, d) descriptor array (or aggregated set) per query; a single 2-D array
                is one query.
            k: results per query.
        """
        k = check_k(k)
        queries = self._as_sets(query_sets)
        out_scores = np.full((len(queries), k), -np.inf, np.float32)
        out_ids = np.full((len(queries), k), -1, np.int64)
        if self.ntotal == 0:
            return out_scores, out_ids
        for i, query in enumerate(queries):
            scores = self.score_all(query)
            s, found = sort_results(scores[None], self._ids[None], k)
            out_scores[i], out_ids[i] = s[0], found[0]
        return out_scores, out_ids

    def stats(self) -> dict[str, float]:
        """Sizes of the inverted file (images, entries, list lengths, bytes of codes)."""
        self._finalize()
        counts = np.diff(self._offsets)
        return {
            "images": self.ntotal,
            "entries": int(len(self._words)),
            "words_per_image": float(self._n_words.mean()) if self.ntotal else 0.0,
            "empty_words": int((counts == 0).sum()),
            "max_list_length": int(counts.max()) if len(counts) else 0,
            "code_bytes": int(self._codes.nbytes),
        }

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write ``index.json``, ``asmk.npz`` (posting lists) and ``codebook.npy`` into directory ``path``."""
        self._finalize()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (ARRAYS_FILE + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                ids=self._ids,
                n_words=self._n_words,
                words=self._words,
                rows=self._rows,
                codes=self._codes,
            )
        os.replace(tmp, path / ARRAYS_FILE)
        self.codebook.save(path / CODEBOOK_FILE)
        write_header(
            path,
            self.kind,
            self.dim,
            self.ntotal,
            arrays_file=ARRAYS_FILE,
            codebook_file=CODEBOOK_FILE,
            **self.settings(),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> AsmkIndex:
        """Load an index written by :meth:`save` (arrays read with ``allow_pickle=False``)."""
        path = Path(path)
        header = read_header(path)
        if header["kind"] != cls.kind:
            raise IndexFormatError(f"{path} holds a '{header['kind']}' index, not an ASMK inverted file")
        for name in (ARRAYS_FILE, CODEBOOK_FILE):
            if not (path / name).is_file():
                raise IndexFormatError(f"{path} lacks {name}: the index was not saved completely")
        codebook = Codebook.load(path / CODEBOOK_FILE)
        if codebook.size != header.get("codebook_size") or codebook.dim != header["dim"]:
            raise IndexFormatError(
                f"{path}: codebook is {codebook.size}x{codebook.dim}, header says "
                f"{header.get('codebook_size')}x{header['dim']}"
            )
        index = cls(
            codebook,
            binary=header["binary"],
            alpha=header["alpha"],
            tau=header["tau"],
            use_idf=header["use_idf"],
            query_assignment=header["query_assignment"],
            database_assignment=header["database_assignment"],
        )
        with np.load(path / ARRAYS_FILE, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in ("ids", "n_words", "words", "rows", "codes")}
        for key in ("words", "rows"):  # files written before the int32 posting entries hold int64
            values = data[key]
            if values.dtype == np.int64 and (not len(values) or values.max() <= np.iinfo(np.int32).max):
                data[key] = values.astype(np.int32)
        n, e = int(header["ntotal"]), len(data["words"])
        expected = {
            "ids": (np.int64, (n,)),
            "n_words": (np.int64, (n,)),
            "words": (np.int32, (e,)),
            "rows": (np.int32, (e,)),
            "codes": (np.dtype(index.code_dtype), (e, index.code_width)),
        }
        for key, (dtype, shape) in expected.items():
            if data[key].dtype != dtype or data[key].shape != shape:
                raise IndexFormatError(
                    f"{path / ARRAYS_FILE}: '{key}' is {data[key].dtype} {data[key].shape}, expected "
                    f"{np.dtype(dtype)} {shape}"
                )
        if e and (data["words"].max() >= codebook.size or data["rows"].max() >= n or data["words"].min() < 0):
            raise IndexFormatError(f"{path / ARRAYS_FILE}: word or image indices out of range")
        if e and (np.diff(data["words"]) < 0).any():
            raise IndexFormatError(f"{path / ARRAYS_FILE}: posting entries are not sorted by word")
        index._ids, index._n_words = data["ids"], data["n_words"]
        index._words, index._rows, index._codes = data["words"], data["rows"], data["codes"]
        return index


__all__ = [
    "AggregatedSet",
    "AsmkIndex",
    "aggregate_residuals",
    "asmk_similarity",
    "binarize_and_pack",
    "packed_hamming",
    "selectivity",
    "word_similarity",
]
