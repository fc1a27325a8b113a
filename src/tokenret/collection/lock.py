"""One writer at a time: an OS file lock on ``INDEX/write.lock``, held for a whole write.

Two processes appending to one index at once would each compute the next free row of the vector file from
its size and point records at each other's vectors; two processes creating one index would both create its
tables. The lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) serialises writers; the operating
system releases it when the holder exits or dies, so a crash never leaves an index locked. The lock file
also names its holder (pid, host, command, since when), which a waiting or refused writer reports.
Readers (search, serve) take no lock: SQLite transactions and the append-only vector file show them the
state before or after a write, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = "write.lock"
#: Seconds between attempts while waiting for the lock.
POLL_SECONDS = 0.05

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


class IndexLockedError(RuntimeError):
    """Another process is writing to the index (and the caller would not wait, or waited long enough)."""


def describe_holder(holder: dict[str, Any] | None) -> str:
    """'pid 123 on host (tokenret index ...) since 15:40:01', or 'another process' when unknown."""
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}) since {since}"


class WriterLock:
    """The writer lock of the index directory ``root``; re-entrant within one object.

    Args:
        root: the index directory (created if missing).
        timeout: seconds to wait for another writer; None waits as long as it takes, 0 refuses at once.

    Example:
        >>> with WriterLock("photos.idx"):       # doctest: +SKIP
        ...     append_vectors_and_commit()
    """

    def __init__(self, root: str | Path, timeout: float | None = None) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.timeout = timeout
        self._file: Any = None
        self._depth = 0

    @property
    def held(self) -> bool:
        return self._depth > 0

    def read_holder(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock, from the lock file; None when it names nobody."""
        try:
            text = self.path.read_text()
        except OSError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return None
        return holder if isinstance(holder, dict) else None

    def _try_lock(self) -> bool:
        fd = self._file.fileno()
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                self._file.seek(0)
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open for as long as the lock is held
        start, told = time.monotonic(), False
        while not self._try_lock():
            holder = describe_holder(self.read_holder())
            waited = time.monotonic() - start
            if self.timeout is not None and waited >= self.timeout:
                self._file.close()
                self._file = None
                raise IndexLockedError(
                    f"{self.root} is being written by {holder}; try again when it has finished "
                    "(or stop that process: the lock goes with it)"
                )
            if not told:
                log.warning("%s is being written by %s: waiting for it to finish", self.root, holder)
                told = True
            time.sleep(POLL_SECONDS)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
            "since": time.time(),
        }
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(holder))
        self._file.flush()
        self._depth = 1

    def release(self) -> None:
        if self._depth == 0:
            raise RuntimeError(f"{self.path} is not held")
        self._depth -= 1
        if self._depth:
            return
        try:
            self._file.seek(0)
            self._file.truncate()  # nobody holds it now
            self._file.flush()
            if fcntl is not None:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            else:
                self._file.seek(0)
                msvcrt.locking(self._file.fileno(), msvcrt.LK_UNLCK, 1)
        finally:
            self._file.close()
            self._file = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
