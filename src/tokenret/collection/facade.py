"""A searchable index of a folder of images, the facade over its parts.

Layout of an index directory::

    meta.sqlite     settings and one row per image (:mod:`~tokenret.collection.catalogue`)
    vectors.f16     float16 descriptors, one row per stored image (append-only; ``vectors.N.f16`` after
                    N compactions, the catalogue names the current file)
    model.pth       the model's weights, only when they came from no file (e.g. random or torchvision)
    ann/            the approximate (FAISS) index, when the backend is one (:mod:`~tokenret.collection.ann`)

Adding is incremental and crash-safe: images are described in chunks; each chunk's vectors are appended
and flushed before the transaction that records them commits, so an interruption loses at most the chunk
in progress, and the next run continues. Changed files (size or mtime) are re-described, deleted ones
dropped; unreadable files are recorded with the reason (``failures()``), never skipped in silence.

How searches run is a setting, :meth:`ImageIndex.set_backend`: ``"exact"`` scans the memory-mapped
float16 vectors; ``"auto"`` (the default) does so up to :data:`~tokenret.index.EXACT_SEARCH_LIMIT`
images and uses :func:`~tokenret.index.choose_index_spec`'s IVF-PQ above; a FAISS factory string
(``"HNSW32"``, ``"IVF4096_HNSW32,PQ64"``) asks for that index. With ``refine=K`` the best K FAISS
candidates are re-scored exactly against the stored vectors. Writers (``add_paths``, ``sync``,
``set_backend``, :meth:`ImageIndex.update_ann`) bring the approximate index up to date; a search never
writes: it searches exactly while the approximate index is missing or stale.

Example:
    >>> model = tokenret.create_model("token_r101", checkpoint="R101-Token.pth")          # doctest: +SKIP
    >>> index = ImageIndex.create("photos.idx", model, checkpoint="R101-Token.pth")       # doctest: +SKIP
    >>> index.sync("photos/", model)                                                       # doctest: +SKIP
    >>> index.bind(model).search_images(["query.jpg"], k=5)[0]                             # doctest: +SKIP
    [SearchHit(path='photos/a.jpg', score=0.93, id=0), ...]
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tokenret.collection.ann import AnnCache, check_backend, resolve_backend
from tokenret.collection.binding import ModelBinding, check_config, extraction_config, load_index_model
from tokenret.collection.catalogue import FORMAT, SETTINGS_FILE, Catalogue, IndexDamagedError, StoreCheck
from tokenret.collection.lock import WriterLock
from tokenret.data.files import display_path, entry_path, scan_images, unreadable_reason
from tokenret.extraction import ExtractionConfig, extract_descriptors, model_fingerprint
from tokenret.index.base import check_k, sort_results
from tokenret.models.checkpoints import save_checkpoint, sha256sum
from tokenret.rerank import SuperGlobalRerank, superglobal_option, superglobal_rerank_candidates

log = logging.getLogger(__name__)

#: Descriptors stored per transaction by :meth:`ImageIndex.add_descriptors`.
STORE_CHUNK = 65536
#: Seconds of extraction after which :meth:`ImageIndex.add_paths` commits what it has described (as it does
#: every ``chunk`` images), so that an interruption loses about this much work at most.
COMMIT_SECONDS = 60.0
#: Images described before the first commit, while the time an image takes is not known yet.
FIRST_COMMIT = 8
#: The clock of the commits (a name of its own, so that tests can run it faster).
_clock = time.monotonic


@dataclass
class SearchHit:
    path: str
    score: float
    id: int


def writes(method: Callable) -> Callable:
    """An :class:`ImageIndex` method that writes: it runs holding the index's writer lock."""

    @functools.wraps(method)
    def locked(self: ImageIndex, *args: Any, **kwargs: Any) -> Any:
        with self.writing():
            return method(self, *args, **kwargs)

    return locked


class ImageIndex:
    """An on-disk index of images and their descriptors (see the module docstring)."""

    def __init__(self, path: str | Path, lock_timeout: float | None = None, check: bool = True) -> None:
        self.catalogue = Catalogue(path)
        if check:  # every searchable image's vector inside the file (cheap); `verify()` checks more
            found = self.catalogue.check()
            if not found.ok:
                self.catalogue.close()
                raise IndexDamagedError(found.describe(self.catalogue.path))
        self.path = self.catalogue.path
        self.dim = self.catalogue.dim
        self.ann = AnnCache(self.catalogue)
        #: Exact search over an in-memory copy of the vectors instead of the memory map: single queries then
        #: use FAISS's fused float16 scan; for long-running servers (``tokenret serve``).
        self.vectors_in_memory = False
        self._binding: ModelBinding | None = None
        #: Held by every write (``lock_timeout``: seconds to wait for another writer; None: as long as it
        #: takes, 0: refuse at once with :class:`~tokenret.collection.lock.IndexLockedError`).
        self.lock = WriterLock(self.path, lock_timeout)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock (re-entrant) for a write; on taking it, forget what was read before, since
        another writer may have changed the index meanwhile."""
        first = not self.lock.held
        with self.lock:
            if first:
                self.catalogue.changed()
                self.catalogue.settings = self.catalogue.read_settings()
                self.catalogue.remove_stray_vector_files()  # left by an interrupted compaction
            yield

    @property
    def settings(self) -> dict[str, Any]:
        return self.catalogue.settings

    @property
    def db(self) -> Any:
        """The catalogue's SQLite connection."""
        return self.catalogue.db

    # -- creation ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        model: Any,
        config: Any = None,
        checkpoint: str | Path | None = None,
        backend: str = "auto",
        refine: int | None = None,
        exist_ok: bool = False,
    ) -> ImageIndex:
        """A new empty index for descriptors of ``model`` made with extraction ``config``.

        ``backend`` and ``refine`` choose how searches run (see :meth:`set_backend`). With ``exist_ok``, an
        index already at ``path`` (made by another process meanwhile, say) is opened instead, and ``model``
        and ``config`` must be its own.
        """
        config = config or ExtractionConfig.for_model(model)
        backend, refine = check_backend(backend, refine, int(model.descriptor_dim))
        path = Path(path)
        if (path / SETTINGS_FILE).exists() and not exist_ok:
            raise FileExistsError(f"{path} already holds an index; open it with ImageIndex(path)")
        with WriterLock(path):  # two processes creating one index: the second finds the first's
            if (path / SETTINGS_FILE).exists():
                if not exist_ok:
                    raise FileExistsError(f"{path} already holds an index; open it with ImageIndex(path)")
                index = cls(path)
                try:
                    index.check_model(model, config)
                except BaseException:
                    index.close()
                    raise
                return index
            if checkpoint is None:
                # models made of several networks (local features + aggregator) save themselves in one file
                save = getattr(model, "save_checkpoint", None)
                checkpoint = (
                    save(path / "model.pth") if callable(save) else save_checkpoint(model, path / "model.pth")
                )
            checkpoint = Path(checkpoint).resolve()
            settings = {
                "format": FORMAT,
                "dim": int(model.descriptor_dim),
                "model": getattr(model, "model_name", type(model).__name__),
                "model_kwargs": getattr(model, "model_kwargs", {}),
                "model_sha256": model_fingerprint(model),
                "checkpoint": str(checkpoint),
                "checkpoint_sha256": sha256sum(checkpoint),
                "extraction": config.fingerprint(),
                "backend": backend,
                "refine": refine,
                "created": time.time(),
            }
            Catalogue.create(path, settings)
        return cls(path)

    def close(self) -> None:
        self.ann.release()
        self.catalogue.close()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- model and settings --------------------------------------------------------------------

    def extraction_config(self, **runtime: Any) -> ExtractionConfig:
        """The index's extraction settings, with run-time options (device, batch size, workers) added."""
        return extraction_config(self.settings, **runtime)

    def bind(self, model: Any) -> ModelBinding:
        """The binding of ``model`` to this index, checked once (the last one is reused while the same model
        keeps the same weights).

        Raises:
            IndexMismatchError: the model's weights are not the index's.
        """
        if self._binding is None or not self._binding.still_valid(model):
            self._binding = ModelBinding(self, model)
        return self._binding

    def check_model(self, model: Any, config: Any = None) -> None:
        """Refuse a model or extraction settings other than the ones the index was made with."""
        self.bind(model)
        if config is not None:
            check_config(self.path, self.settings, config)

    def load_binding(self, checkpoint: str | Path | None = None) -> ModelBinding:
        """Rebuild the index's model from its recorded checkpoint and bind it (checked once).

        Args:
            checkpoint: another copy of the weights (the recorded file moved or was converted); the
                model built from it must still match the index's model fingerprint.
        """
        return self.bind(load_index_model(self.settings, checkpoint))

    def load_model(self, checkpoint: str | Path | None = None) -> Any:
        """The index's model, rebuilt from its recorded checkpoint and checked (see :meth:`load_binding`)."""
        return self.load_binding(checkpoint).model

    # -- contents -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.catalogue)

    def paths(self) -> list[str]:
        return self.catalogue.paths()

    def image_path(self, image_id: int) -> str | None:
        """Path of the searchable image with this id, None when no such image is in the index."""
        return self.catalogue.image_path(image_id)

    def image_record(self, image_id: int) -> tuple[str, int | None, int | None] | None:
        """(path, size, mtime_ns) recorded for the searchable image with this id, or None."""
        return self.catalogue.image_record(image_id)

    def roots(self) -> list[str]:
        """The folders indexed with :meth:`sync` (resolved absolute paths), in the order first synced."""
        return list(self.settings.get("roots", []))

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be read."""
        return self.catalogue.failures()

    def vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(memory-mapped vector file, ids of stored images, their rows in the file)."""
        return self.catalogue.vectors()

    # -- changing ------------------------------------------------------------------------------

    @writes
    def remove_paths(self, paths: Iterable[str | Path]) -> int:
        """Drop images (their vector rows become free space, reclaimed by :meth:`compact`).

        An approximate index then no longer covers the images: searches run exactly until ``add_paths``,
        ``sync`` or :meth:`update_ann` updates or rebuilds it.
        """
        return self.catalogue.remove_paths(paths)

    @writes
    def add_paths(
        self,
        paths: Sequence[str | Path],
        model: Any,
        chunk: int = 64,
        progress: bool = True,
        skipped: Sequence[tuple[str | Path, str]] = (),
        commit_seconds: float = COMMIT_SECONDS,
        **runtime: Any,
    ) -> dict[str, int]:
        """Describe and store images that are new or changed since they were stored.

        Finished work is committed every ``chunk`` images and about every ``commit_seconds`` of extraction
        (each commit is sized from the time the last one took per image), so an interruption loses at most
        about that much; a new run skips the images committed before (counted as unchanged).

        Entries that cannot be read as image files (broken links, symlink loops, named pipes, names that
        are not UTF-8; see :func:`~tokenret.data.files.unreadable_reason`), and ``skipped`` entries (path,
        reason) found by a folder scan, are recorded as failed under their own path, never opened. At the
        end the approximate index, if the backend uses one, is brought up to date.

        Returns counts: added, updated, unchanged, failed.
        """
        config = self.extraction_config(**runtime)
        self.check_model(model, config)
        known = self.catalogue.file_stats()
        todo, counts = [], {"added": 0, "updated": 0, "unchanged": 0, "failed": 0}
        entries = [(entry_path(p), None) for p in paths] + [(entry_path(p), why) for p, why in skipped]
        for p, reason in entries:
            # an entry that cannot be read as an image file is recorded as failed and never opened (a named
            # pipe would block); unchanged since it was recorded, it is not recorded again
            reason = reason or unreadable_reason(p)
            try:
                stat = file_stat(p) if reason is None else entry_stat(p)
            except OSError as e:
                todo.append((p, None, f"cannot stat: {e.strerror}"))
                continue
            old = known.get(display_path(p))
            if old is not None and tuple(old) == stat:
                counts["unchanged"] += 1
                continue
            todo.append((p, stat, reason))
        kept = counts[
            "unchanged"
        ]  # described before (by an earlier run, or one interrupted): the bar starts there
        with tqdm(
            total=kept + len(todo), initial=kept, desc="index", unit="img", disable=not progress
        ) as bar:
            start, size = 0, min(chunk, FIRST_COMMIT)
            while start < len(todo):
                part = todo[start : start + size]
                readable = [t for t in part if t[2] is None]
                began = _clock()
                result = extract_descriptors(
                    model, [t[0] for t in readable], None, config, on_error="record", progress=False, bar=bar
                )
                self.catalogue.store(part, result.descriptors, result.failures, known, counts)
                bar.update(len(part) - len(readable))  # the entries never opened (extraction counts the rest)
                start += len(part)
                if (
                    readable
                ):  # the next commit: about commit_seconds at this commit's pace, at most chunk images
                    per_image = max(_clock() - began, 1e-9) / len(readable)
                    size = max(1, min(chunk, int(commit_seconds / per_image)))
        self.update_ann()
        return counts

    @writes
    def add_descriptors(self, paths: Sequence[str | Path], descriptors: np.ndarray) -> dict[str, int]:
        """Store descriptors made elsewhere for these image files, as if :meth:`add_paths` had made them.

        For descriptors extracted apart, e.g. by a sharded multi-GPU ``extract_descriptors`` run with the
        index's model and ``extraction_config()``: the caller vouches that they were made that way. The files
        must exist (their size and mtime let ``sync`` skip them later).

        Returns counts: added, updated (the approximate index is rebuilt as after ``add_paths``).
        """
        x = np.asarray(descriptors, dtype=np.float32)
        if x.ndim != 2 or x.shape != (len(paths), self.dim):
            raise ValueError(
                f"need one {self.dim}-d descriptor per path: {len(paths)} paths, {x.shape} array"
            )
        if not np.isfinite(x).all():
            raise ValueError("descriptors contain NaN or infinite values")
        resolved = [entry_path(p) for p in paths]
        if len(set(resolved)) != len(resolved):
            raise ValueError("paths repeat: each image can have one descriptor")
        part = []
        for p in resolved:
            try:
                part.append((p, file_stat(p), None))
            except OSError as e:
                raise FileNotFoundError(f"cannot add a descriptor for {p}: {e}") from e
        known = self.catalogue.file_stats()
        counts = {"added": 0, "updated": 0, "failed": 0}
        for start in range(0, len(part), STORE_CHUNK):
            self.catalogue.store(
                part[start : start + STORE_CHUNK], x[start : start + STORE_CHUNK], {}, known, counts
            )
        self.update_ann()
        del counts["failed"]
        return counts

    @writes
    def sync(self, folder: str | Path, model: Any, progress: bool = True, **runtime: Any) -> dict[str, int]:
        """Make the index match ``folder``: add new images, re-describe changed ones, drop deleted ones."""
        folder = Path(folder).resolve()
        scan = scan_images(folder)
        present = {display_path(p) for p in scan.images} | {display_path(p) for p, _ in scan.skipped}
        prefix = str(folder) + os.sep
        stale = [p for p in self.catalogue.all_paths() if p.startswith(prefix) and p not in present]
        removed = self.remove_paths(stale)
        if str(folder) not in self.roots():
            self.catalogue.write_settings(roots=[*self.roots(), str(folder)])
        counts = self.add_paths(scan.images, model, progress=progress, skipped=scan.skipped, **runtime)
        counts["removed"] = removed
        return counts

    def verify(self, full: bool = True) -> StoreCheck:
        """Whether the catalogue and the vector file agree (``full``: every chunk's checksum and every
        vector finite, reading the whole file); see :meth:`repair`."""
        return self.catalogue.check(full)

    @writes
    def repair(self, model: Any, progress: bool = True, **runtime: Any) -> dict[str, int]:
        """Describe again the images whose vectors are missing or damaged (:meth:`verify`), after dropping
        them and compacting the vector file to the rows that are sound.

        Returns counts: repaired (images re-described), failed (their files could not be read now).
        """
        found = self.catalogue.check(full=True)
        bad = sorted(set(found.missing) | set(found.damaged))
        if not bad:
            return {"repaired": 0, "failed": 0}
        log.warning("%s: describing %d image(s) again", self.path, len(bad))
        self.catalogue.remove_paths(bad)
        self.catalogue.compact()
        counts = self.add_paths(bad, model, progress=progress, **runtime)
        return {"repaired": counts["added"], "failed": counts["failed"]}

    @writes
    def compact(self) -> None:
        """Rewrite the vector file without the rows of removed or re-described images."""
        self.catalogue.compact()

    # -- search backend ---------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The recorded backend: ``"auto"``, ``"exact"`` or a FAISS factory string."""
        return self.settings.get("backend", "exact")

    @property
    def refine(self) -> int | None:
        """FAISS candidates re-scored exactly per query (None: FAISS scores as they are)."""
        return self.settings.get("refine")

    def backend_spec(self, n: int | None = None) -> str:
        """The spec searches use for ``n`` images (default: the current number): "exact" or a FAISS string."""
        return resolve_backend(self.backend, self.catalogue.content_state()[1] if n is None else n, self.dim)

    @writes
    def set_backend(self, spec: str = "auto", refine: int | None = None, build: bool = True) -> str:
        """Record how searches run, and build the approximate index it needs.

        Args:
            spec: ``"exact"`` (or ``"Flat"``): scan every stored vector; ``"auto"``: exact up to
                :data:`~tokenret.index.EXACT_SEARCH_LIMIT` images, then the IVF-PQ spec of
                :func:`~tokenret.index.choose_index_spec`; anything else: a FAISS factory string
                (``"HNSW32"``, ``"IVF4096,PQ64"``; ``"IDMap,Flat"`` is FAISS's own brute force).
            refine: re-score the best ``refine`` FAISS candidates of each query exactly against the stored
                vectors (needs an approximate backend); None returns FAISS's scores.
            build: build the FAISS index now (when there are images); otherwise the next
                ``add_paths`` / ``sync`` / :meth:`update_ann` does (searches run exactly until then).

        Returns:
            The spec in use at the current size.

        Raises:
            ValueError: FAISS cannot build ``spec``, or too few images to train it (the setting is then
                left as it was).

        Example:
            >>> index.set_backend("HNSW32", refine=200)   # doctest: +SKIP
            'HNSW32'
        """
        spec, refine = check_backend(spec, refine, self.dim)
        if build:  # before recording it: a failed build leaves the old backend working
            self.ann.update(self.ann.wanted(spec))
        self.catalogue.write_settings(backend=spec, refine=refine)
        if self.backend_spec() == "exact":
            self.ann.drop()
        return self.backend_spec()

    def ann_status(self) -> str:
        """``"exact"`` (no approximate index needed), ``"current"``, ``"stale"`` or ``"missing"``."""
        return self.ann.status()

    @writes
    def update_ann(self) -> bool:
        """Update (IVF, few changes) or build and save the approximate index unless the saved one covers the
        current images: the explicit step that makes a stale index searchable again (writes ``ann/``).

        Returns:
            True if it was updated or (re)built.
        """
        return self.ann.update(self.ann.wanted())

    def ann_index(self) -> Any:
        """The approximate index over the current images, loaded from ``ann/``; None for exact search, and
        None (with a warning) while it is missing or stale: searches then run exactly. Never writes."""
        return self.ann.current()

    # -- searching ------------------------------------------------------------------------------

    def vector_index(self) -> Any:
        """An exact search index over the stored vectors, read in place from the memory-mapped file."""
        return self.catalogue.exact_index(self.vectors_in_memory)

    def knn(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the ``k`` nearest stored images of each query row, by the configured backend.

        At most as many columns as images; rows padded with -inf / -1 where a backend found fewer.
        ``exact=True`` scans every vector whatever the backend.
        """
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = check_k(k)
        ann = None if exact else self.ann_index()
        if ann is None:
            index = self.vector_index()
            if index.ntotal == 0:
                return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
            return index.search(q, min(k, index.ntotal))
        k = min(k, ann.ntotal)
        if self.refine is None:
            return ann.search(q, k)
        _, ids = ann.search(q, min(ann.ntotal, max(k, self.refine)))
        return sort_results(self.vector_index().rescore(q, ids), ids, k)

    def knn_reranked(
        self, queries: np.ndarray, k: int, rerank: SuperGlobalRerank, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`knn` for ``max(k, rerank.m)`` candidates, the best ``rerank.m`` re-ordered by SuperGlobal's
        re-ranking from the stored vectors; (scores, ids) of the first ``k``, padded like :meth:`knn`."""
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        scores, ids = self.knn(q, max(check_k(k), rerank.m), exact=exact)
        scores, ids = np.array(scores, dtype=np.float32), np.array(ids, dtype=np.int64)  # written below
        head = min(rerank.m, ids.shape[1])
        # a backend that found fewer pads with -1: move the padding behind the real candidates (order kept),
        # then re-rank the queries with the same number of candidates together
        keep = np.argsort(ids[:, :head] < 0, axis=1, kind="stable")
        cand = np.take_along_axis(ids[:, :head], keep, axis=1)
        scores[:, :head] = np.take_along_axis(scores[:, :head], keep, axis=1)
        counts = (cand >= 0).sum(axis=1)
        reconstruct = self.vector_index().reconstruct
        for n in np.unique(counts[counts > 0]):  # one value unless a backend came up short
            rows = np.flatnonzero(counts == n)
            new_ids, new_scores = superglobal_rerank_candidates(
                q[rows], cand[rows, :n], reconstruct, k=rerank.k, beta=rerank.beta
            )
            cand[rows, :n], scores[rows, :n] = new_ids, new_scores
        ids[:, :head] = cand
        return scores[:, :k], ids[:, :k]

    def search(
        self,
        queries: np.ndarray,
        k: int = 20,
        exact: bool = False,
        rerank: str | None = None,
        rerank_m: int = 400,
        rerank_k: int = 9,
        rerank_beta: float = 0.15,
    ) -> list[list[SearchHit]]:
        """Nearest stored images of each query descriptor (rows of ``queries``), best first.

        Uses the configured backend (see :meth:`set_backend`) unless ``exact``; only images in the index now
        are returned.

        Args:
            rerank: ``"superglobal"``: the best ``rerank_m`` of the search are re-ordered by SuperGlobal's
                re-ranking (:func:`tokenret.rerank.superglobal_rerank`, with ``rerank_k`` and
                ``rerank_beta``), reading their vectors from the float16 store; their scores are then the
                re-ranking's, (s1 + s2) / 2, and hits past ``rerank_m`` keep the search's order and scores.
        """
        rerank_with = superglobal_option(rerank, rerank_m, rerank_k, rerank_beta)
        if rerank_with is None:
            scores, ids = self.knn(queries, k, exact=exact)
        else:
            scores, ids = self.knn_reranked(queries, k, rerank_with, exact=exact)
        path_of = self.catalogue.paths_of(np.unique(ids[ids >= 0]).tolist())
        return [
            [
                SearchHit(path_of[int(i)], float(s), int(i))
                for s, i in zip(srow, irow, strict=True)
                if int(i) in path_of
            ]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def describe_queries(
        self,
        paths: Sequence[str | Path | bytes],
        model: Any,
        boxes: Sequence[Any] | None = None,
        **runtime: Any,
    ) -> np.ndarray:
        """Descriptors of query images, made exactly like the stored ones (refuses another model)."""
        return self.bind(model).describe(paths, boxes, **runtime)

    def search_images(
        self,
        paths: Sequence[str | Path | bytes],
        model: Any,
        k: int = 20,
        boxes: Sequence[Any] | None = None,
        qe: int = 0,
        rerank: str | None = None,
        rerank_m: int = 400,
        rerank_k: int = 9,
        rerank_beta: float = 0.15,
        **runtime: Any,
    ) -> list[list[SearchHit]]:
        """Search with query images (optionally a box each); ``qe`` > 0 adds alpha-QE over that many hits;
        ``rerank="superglobal"`` re-ranks the best ``rerank_m`` (see :meth:`search`; not with ``qe``)."""
        return self.bind(model).search_images(
            paths,
            k,
            boxes,
            qe,
            rerank=rerank,
            rerank_m=rerank_m,
            rerank_k=rerank_k,
            rerank_beta=rerank_beta,
            **runtime,
        )


def file_stat(p: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file: what tells a changed file from an unchanged one."""
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def entry_stat(p: Path) -> tuple[int, int]:
    """(size, mtime_ns) of the entry itself (a link, not its target): what tells a changed unreadable entry
    from an unchanged one."""
    st = os.lstat(p)
    return st.st_size, st.st_mtime_ns
