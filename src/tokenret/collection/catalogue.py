"""The catalogue of a folder index: what is stored, where, and since when.

Two files of the index directory::

    meta.sqlite     settings (model, checkpoint, extraction settings, dim, backend) and one row per image:
                    path, size, mtime, status ('ok' / 'failed'), error, row in the vector file, updated
    vectors.f16     float16 descriptors, one row of dim values per stored image (append-only); after
                    compactions ``vectors.N.f16``, the N-th rewrite: the catalogue names the current one

A chunk's vectors are appended and flushed before the transaction that records them commits, so an
interruption loses at most the chunk in progress; rows of removed or re-described images stay in the file
as dead rows until :meth:`Catalogue.compact`. Compaction writes a new file beside the old one and switches
the rows and the file name in one transaction, so an interruption at any point leaves the old or the new
state whole (a file that no committed record names is removed by the next write); readers take the rows and
the file name from one snapshot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenret.data.files import display_path, entry_path
from tokenret.index.exact import ExactIndex

FORMAT = "tokenret-image-index-v1"
SETTINGS_FILE = "meta.sqlite"
VECTOR_FILE = "vectors.f16"
#: Tries at reading the rows and opening their file, when a compaction removes the file in between.
SNAPSHOT_TRIES = 5
log = logging.getLogger(__name__)

#: Rows copied at a time when the vector file is rewritten.
COPY_CHUNK = 65536


#: The failure recorded for an image whose descriptor has NaN or infinite values.
NOT_FINITE = (
    "its descriptor has NaN or infinite values (the model's weights may be damaged: "
    "check them with `tokenret info CHECKPOINT`)"
)


#: One row per write of the vector file: its first row, its number of rows and the sha256 of their bytes.
CHUNKS_TABLE = (
    "CREATE TABLE IF NOT EXISTS chunks (first_row INTEGER PRIMARY KEY, n INTEGER NOT NULL, sha256 TEXT)"
)


def _sync_directory(path: Path) -> None:
    """Flush a directory's entries to disk (a new file's name survives a power cut); not on Windows."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class IndexDamagedError(RuntimeError):
    """The catalogue and the vector file of an index disagree (a truncated or altered ``vectors.f16``)."""


@dataclass
class StoreCheck:
    """What :meth:`Catalogue.check` found: the rows the file holds and expects, and the searchable images
    whose vector is missing (past the end of the file) or damaged (its chunk's checksum differs, or it is not
    finite)."""

    rows_in_file: int
    rows_expected: int
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    vector_file: str = VECTOR_FILE

    @property
    def ok(self) -> bool:
        return not self.missing and not self.damaged

    def describe(self, path: Path) -> str:
        if self.ok:
            return (
                f"{path}: catalogue and vectors agree ({self.rows_expected} rows, "
                f"{self.chunks_checked} chunks checked)"
            )
        parts = []
        if self.missing:
            parts.append(
                f"{len(self.missing)} image(s) point past the end of {self.vector_file} ({self.rows_in_file} "
                f"rows, {self.rows_expected} expected: the file was truncated or replaced)"
            )
        if self.damaged:
            parts.append(f"{len(self.damaged)} image(s) have vectors that changed since they were written")
        return (
            f"{path} is damaged: " + "; ".join(parts) + f". Run `tokenret index {path} --repair` to describe "
            "them again (their files must still be readable)"
        )


class IndexMismatchError(RuntimeError):
    """A query or an addition made with another model or other extraction settings than the index's."""


class Catalogue:
    """The SQLite catalogue and the float16 vector file of one index directory.

    One SQLite connection, usable from the thread that serves a request; callers serialise access.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        db = self.path / SETTINGS_FILE
        if not db.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a tokenret index (no meta.sqlite); create one with "
                "`tokenret index PHOTOS --out INDEX`"
            )
        self.db = sqlite3.connect(db, check_same_thread=False)
        self.settings = self.read_settings()
        if self.settings.get("format") != FORMAT:
            raise IndexMismatchError(f"{db}: unknown index format {self.settings.get('format')!r}")
        self.dim = int(self.settings["dim"])
        self._state: tuple[int, str, int] | None = None  # (sqlite data_version, fingerprint, images)
        self._exact: tuple[tuple, ExactIndex] | None = None  # (content and file key, index over the file)

    @staticmethod
    def create(path: Path, settings: dict[str, Any]) -> None:
        """Write an empty catalogue with ``settings`` into the directory ``path``."""
        db = sqlite3.connect(path / SETTINGS_FILE)
        with db:
            db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INTEGER, "
                "mtime_ns INTEGER, status TEXT NOT NULL, error TEXT, row INTEGER, updated REAL)"
            )
            db.execute(CHUNKS_TABLE)
            db.executemany(
                "INSERT INTO settings VALUES (?, ?)", [(k, json.dumps(v)) for k, v in settings.items()]
            )
        db.close()
        (path / VECTOR_FILE).touch()

    def close(self) -> None:
        self.db.close()

    # -- settings -------------------------------------------------------------------------------

    def read_settings(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM settings")}

    def write_settings(self, **values: Any) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO settings VALUES (?, ?)",
                [(k, json.dumps(v)) for k, v in values.items()],
            )
        self.settings.update(values)
        self.changed()

    def changed(self) -> None:
        """Forget what was derived from the contents (this connection's own writes leave data_version)."""
        self._state = None
        self._exact = None

    def content_state(self) -> tuple[str, int]:
        """(fingerprint of the searchable image set, its size), recomputed only after a change.

        The fingerprint covers the ids and when each image was last described: any addition,
        re-description or removal changes it. SQLite's data_version tells when another connection (a
        running ``tokenret index``, say) committed something; this connection's own writes call
        :meth:`changed`.
        """
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if self._state is None or self._state[0] != version:
            self.settings = self.read_settings()  # another process may have changed the backend
            row = self.db.execute(
                "SELECT COUNT(*), MAX(id), TOTAL(id), MAX(updated), TOTAL(updated) FROM images "
                "WHERE status = 'ok'"
            ).fetchone()
            fingerprint = hashlib.sha256(json.dumps(list(row)).encode()).hexdigest()
            self._state = (version, fingerprint, int(row[0]))
        return self._state[1], self._state[2]

    # -- contents -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM images WHERE status = 'ok'").fetchone()[0]

    def paths(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM images WHERE status = 'ok' ORDER BY id")]

    def all_paths(self) -> list[str]:
        """Every recorded path, failed files included."""
        return [p for (p,) in self.db.execute("SELECT path FROM images")]

    def image_path(self, image_id: int) -> str | None:
        """Path of the searchable image with this id, None when no such image is in the index."""
        row = self.db.execute(
            "SELECT path FROM images WHERE id = ? AND status = 'ok'", (int(image_id),)
        ).fetchone()
        return row[0] if row else None

    def image_record(self, image_id: int) -> tuple[str, int | None, int | None] | None:
        """(path, size in bytes, modification time in ns) recorded for the searchable image with this id
        when it was described, None when no such image is in the index."""
        return self.db.execute(
            "SELECT path, size, mtime_ns FROM images WHERE id = ? AND status = 'ok'", (int(image_id),)
        ).fetchone()

    def paths_of(self, ids: Sequence[int]) -> dict[int, str]:
        """id -> path of the searchable images among ``ids``."""
        path_of: dict[int, str] = {}
        for start in range(0, len(ids), 500):  # SQLite limits the parameters of one statement
            part = list(ids[start : start + 500])
            marks = ",".join("?" * len(part))
            sql = f"SELECT id, path FROM images WHERE status = 'ok' AND id IN ({marks})"
            path_of.update(self.db.execute(sql, part))
        return path_of

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be read."""
        return list(self.db.execute("SELECT path, error FROM images WHERE status = 'failed' ORDER BY path"))

    def file_stats(self) -> dict[str, tuple[int, int]]:
        """path -> (size, mtime_ns) of every recorded file, as it was when stored."""
        return {p: (s, m) for p, s, m in self.db.execute("SELECT path, size, mtime_ns FROM images")}

    def vector_name(self) -> str:
        """File name of the current vector file (``vectors.f16``, or ``vectors.N.f16`` after compactions),
        as of the last settings read."""
        return str(self.settings.get("vector_file", VECTOR_FILE))

    def vector_path(self) -> Path:
        return self.path / self.vector_name()

    def vector_file(self, mode: str = "r", name: str | None = None) -> np.memmap | None:
        """The vector file ``name`` (default: the current one) memory-mapped; None while it is empty."""
        f = self.path / (name or self.vector_name())
        rows = f.stat().st_size // (2 * self.dim)
        if rows == 0:
            return None
        return np.memmap(f, dtype=np.float16, mode=mode, shape=(rows, self.dim))

    def _snapshot(self) -> tuple[str, list[tuple]]:
        """The vector file's name and (id, row, updated) of the searchable images in row order, read in one
        SQLite transaction: a compaction between the two reads cannot pair old rows with a new file."""
        own = not self.db.in_transaction
        if own:
            self.db.execute("BEGIN")
        try:
            got = self.db.execute("SELECT value FROM settings WHERE key = 'vector_file'").fetchone()
            name = json.loads(got[0]) if got else VECTOR_FILE
            rows = list(
                self.db.execute("SELECT id, row, updated FROM images WHERE status = 'ok' ORDER BY row")
            )
        finally:
            if own:
                self.db.execute("COMMIT")
        self.settings["vector_file"] = name
        return name, rows

    @staticmethod
    def _columns(got: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, rows, updated) arrays of :meth:`_snapshot`'s records."""
        ids = np.array([g[0] for g in got], dtype=np.int64)
        rows = np.array([g[1] for g in got], dtype=np.int64)
        return ids, rows, np.array([g[2] for g in got], dtype=np.float64)

    def covered(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, rows, updated) of the searchable images, in row order, read at one moment (one query)."""
        return self._columns(self._snapshot()[1])

    def snapshot(self) -> tuple[np.memmap | None, np.ndarray, np.ndarray, np.ndarray]:
        """(memory-mapped vector file, ids, rows, updated) of the searchable images, in row order, the rows
        and the file they point into read at one moment."""
        for attempt in range(SNAPSHOT_TRIES):
            name, got = self._snapshot()
            try:
                vecs = self.vector_file(name=name)
                break
            except FileNotFoundError:  # a compaction replaced that file after the read: read again
                if attempt == SNAPSHOT_TRIES - 1:
                    raise
        return (vecs, *self._columns(got))

    def vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(memory-mapped vector file, ids of stored images, their rows in the file)."""
        return self.snapshot()[:3]

    def exact_index(self, in_memory: bool = False) -> ExactIndex:
        """An exact search index over the stored vectors, read in place from the memory-mapped file (or,
        ``in_memory``, from a copy: single queries then use FAISS's fused float16 scan)."""
        fingerprint, _ = self.content_state()
        try:
            st = self.vector_path().stat()
        except FileNotFoundError:  # compacted since the settings were read
            self.settings = self.read_settings()
            st = self.vector_path().stat()
        key = (fingerprint, st.st_ino, st.st_size, st.st_mtime_ns, in_memory)
        if self._exact is not None and self._exact[0] == key:
            return self._exact[1]
        vecs, ids, rows = self.vectors()
        if vecs is None or len(ids) == 0:
            index = ExactIndex(self.dim)
        else:
            row_ids = np.full(len(vecs), -1, dtype=np.int64)
            alive = np.zeros(len(vecs), dtype=bool)
            row_ids[rows], alive[rows] = ids, True  # rows of removed or re-described images stay dead
            index = ExactIndex.from_arrays(vecs, row_ids, alive)
            if in_memory:
                index = index.in_memory()
        self._exact = (key, index)
        return index

    def check(self, full: bool = False) -> StoreCheck:
        """Whether the catalogue and the vector file agree.

        Always: every searchable image's row lies inside the file (a cheap check, made on every open).
        ``full``: also each recorded chunk's sha256 against the file's bytes, and every stored vector finite
        (reads the whole file).
        """
        name = self.vector_name()
        rows_in_file = (self.path / name).stat().st_size // (2 * self.dim)
        rows_expected = self.next_row()
        missing = [
            p
            for (p,) in self.db.execute(
                "SELECT path FROM images WHERE status = 'ok' AND row >= ? ORDER BY path", (rows_in_file,)
            )
        ]
        report = StoreCheck(rows_in_file, rows_expected, missing, vector_file=name)
        if not full or rows_in_file == 0:
            return report
        bad_rows: set[int] = set()
        has_chunks = self.db.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'chunks'"
        ).fetchone()[0]
        vecs = self.vector_file(name=name)
        if has_chunks:
            for first, n, sha in self.db.execute(
                "SELECT first_row, n, sha256 FROM chunks ORDER BY first_row"
            ):
                if first + n > rows_in_file:
                    continue  # their images are missing, reported above
                report.chunks_checked += 1
                if hashlib.sha256(np.asarray(vecs[first : first + n]).tobytes()).hexdigest() != sha:
                    bad_rows.update(range(first, first + n))
        ids, rows, _ = self.covered()
        inside = rows < rows_in_file
        for start in range(0, len(rows), COPY_CHUNK):
            part = rows[start : start + COPY_CHUNK][inside[start : start + COPY_CHUNK]]
            finite = np.isfinite(np.asarray(vecs[part], dtype=np.float32)).all(axis=1)
            bad_rows.update(part[~finite].tolist())
        if bad_rows:
            path_of_row = dict(self.db.execute("SELECT row, path FROM images WHERE status = 'ok'"))
            report.damaged = sorted(path_of_row[r] for r in bad_rows if r in path_of_row)
        return report

    # -- changing ------------------------------------------------------------------------------

    def remove_paths(self, paths: Iterable[str | Path]) -> int:
        """Drop images (their vector rows become dead rows, reclaimed by :meth:`compact`)."""
        keys = []
        for p in paths:
            keys.append((display_path(p),))  # as recorded
            try:
                keys.append((display_path(entry_path(p)),))  # as a path relative to here, or through links
            except (OSError, RuntimeError):
                pass
        with self.db:
            before = self.db.total_changes
            self.db.executemany("DELETE FROM images WHERE path = ?", keys)
            removed = self.db.total_changes - before
        self.changed()
        return removed

    def store(
        self,
        part: Sequence[tuple[Path, tuple[int, int] | None, str | None]],
        descriptors: np.ndarray,
        failures: dict[int, tuple[str, str]],
        known: dict[str, tuple[int, int]],
        counts: dict[str, int],
    ) -> None:
        """Append a chunk's vectors (flushed to disk), then record the chunk in one transaction.

        Args:
            part: (path, (size, mtime_ns) or None, error or None) of each file of the chunk; the files
                without an error went through extraction, in order, as the rows of ``descriptors``.
            descriptors: one row per file without an error.
            failures: extraction failures, by row of ``descriptors``.
            known: :meth:`file_stats` before the chunk (tells added from updated).
            counts: "added", "updated", "failed" counters, incremented here.
        """
        readable = sum(1 for t in part if t[2] is None)
        descriptors = np.asarray(descriptors)
        failures = dict(failures)
        for i in range(readable):
            if i not in failures and not np.isfinite(descriptors[i]).all():
                failures[i] = ("", NOT_FINITE)
        ok = [i for i in range(readable) if i not in failures]
        vf = self.vector_path()
        # rows past the last one a committed record may use are orphans (a write that failed before its
        # records committed) or a torn tail: overwritten here
        first_row = self.next_row()
        if ok:
            with open(vf, "r+b") as f:
                f.truncate(first_row * 2 * self.dim)
                f.seek(0, os.SEEK_END)
                data = descriptors[ok].astype(np.float16).tobytes()
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        checksum = hashlib.sha256(data).hexdigest() if ok else None
        row_of = {i: first_row + j for j, i in enumerate(ok)}
        now, records, r = time.time(), [], 0
        for p, stat, error in part:
            size, mtime = stat if stat else (None, None)
            row = None
            if error is None:  # this file went through extraction as row r
                if r in failures:
                    error = failures[r][1]
                else:
                    row = row_of[r]
                r += 1
            status = "ok" if error is None else "failed"
            name = display_path(p)
            records.append((name, size, mtime, status, error, row, now))
            counts["failed" if error else "updated" if name in known else "added"] += 1
        with self.db:
            self.db.executemany(
                "INSERT INTO images (path, size, mtime_ns, status, error, row, updated) "
                "VALUES (?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
                "mtime_ns=excluded.mtime_ns, status=excluded.status, error=excluded.error, "
                "row=excluded.row, updated=excluded.updated",
                records,
            )
            self.db.execute(
                "INSERT OR REPLACE INTO settings VALUES ('next_row', ?)", (json.dumps(first_row + len(ok)),)
            )
            self.db.execute(CHUNKS_TABLE)
            self.db.execute("DELETE FROM chunks WHERE first_row + n > ?", (first_row,))  # overwritten rows
            if ok:
                self.db.execute("INSERT INTO chunks VALUES (?, ?, ?)", (first_row, len(ok), checksum))
        self.settings["next_row"] = first_row + len(ok)
        self.changed()

    def next_row(self) -> int:
        """The first row of the vector file no committed record may use: where the next write goes.

        Recorded with every write; an index written before it was recorded takes the row after the
        highest one in use (rows of removed images at the end of the file are reused then)."""
        recorded = self.read_settings().get("next_row")
        if recorded is not None:
            return int(recorded)
        top = self.db.execute("SELECT MAX(row) FROM images").fetchone()[0]
        return 0 if top is None else int(top) + 1

    def compact(self) -> None:
        """Rewrite the vector file without the rows of removed or re-described images (writers only).

        The rows go to a new file, ``vectors.N.f16``, flushed to disk; then one transaction renumbers the
        images, records the new file's chunks and names it the current file; then the old file is removed.
        Interrupted before the commit, the index is as it was (the new file is a stray, removed by the next
        write, and overwritten if this one is written again); after it, the index is the compacted one (the
        old file is the stray).
        """
        vecs, ids, rows, _ = self.snapshot()
        old = self.vector_name()
        number = int(old.split(".")[1]) + 1 if old.count(".") == 2 else 1
        name = f"vectors.{number}.f16"
        chunks = []
        with open(self.path / name, "wb") as f:
            for start in range(0, len(rows), COPY_CHUNK):
                data = np.asarray(vecs[rows[start : start + COPY_CHUNK]], dtype=np.float16).tobytes()
                f.write(data)
                chunks.append((start, min(COPY_CHUNK, len(rows) - start), hashlib.sha256(data).hexdigest()))
            f.flush()
            os.fsync(f.fileno())
        _sync_directory(self.path)
        del vecs
        with self.db:
            self.db.execute(CHUNKS_TABLE)
            self.db.execute("DELETE FROM chunks")
            self.db.executemany("INSERT INTO chunks VALUES (?, ?, ?)", chunks)
            self.db.executemany(
                "UPDATE images SET row = ? WHERE id = ?",
                [(int(r), int(i)) for r, i in zip(range(len(ids)), ids, strict=True)],
            )
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('next_row', ?)", (json.dumps(len(ids)),))
            self.db.execute("INSERT OR REPLACE INTO settings VALUES ('vector_file', ?)", (json.dumps(name),))
        self.settings.update(next_row=len(ids), vector_file=name)
        self.changed()
        self.remove_stray_vector_files()

    def remove_stray_vector_files(self) -> list[str]:
        """Remove vector files no committed record names (left by an interrupted compaction; writers only).
        A file still open elsewhere (Windows) stays until a later write. Returns the names removed."""
        keep = self.read_settings().get("vector_file", VECTOR_FILE)
        removed = []
        for f in sorted(self.path.glob("vectors*.f16*")):
            if f.name != keep and f.is_file():
                try:
                    f.unlink()
                    removed.append(f.name)
                except OSError as err:
                    log.warning("cannot remove the unused vector file %s yet: %s", f, err)
        return removed
