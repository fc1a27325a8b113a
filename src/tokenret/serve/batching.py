"""Micro-batching: requests that arrive together are answered by one call on a list of them.

A worker thread takes the first waiting request, collects whatever else arrives within a short window
(up to ``max_batch`` requests) and hands them to ``run`` together, so that concurrent searches share one
forward pass instead of queueing one by one behind a lock. The queue is bounded: when it is full,
:meth:`MicroBatcher.submit` raises :class:`Overloaded` at once (the server answers 503) rather than letting
requests wait until they time out.

Example:
    >>> batcher = MicroBatcher(lambda items: [x * 2 for x in items], max_batch=8, window=0.005)
    >>> batcher.submit(21).result()
    42
    >>> batcher.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class Overloaded(RuntimeError):
    """The queue of waiting requests is full."""


class MicroBatcher:
    """Answers submitted items in batches, on one worker thread.

    Args:
        run: called with a list of items; returns one result per item, in order (an exception instance
            in place of a result fails that item alone; an exception raised fails the whole batch).
        max_batch: most items per call of ``run``.
        window: seconds to wait for more items after the first of a batch arrives (only while the worker
            is idle: requests that arrive during a batch form the next one without waiting).
        max_queue: most items waiting (not counting the batch being run); more raise :class:`Overloaded`.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_batch: int = 8,
        window: float = 0.01,
        max_queue: int = 64,
        name: str = "tokenret-batcher",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or window < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window >= 0")
        self.run = run
        self.max_batch = int(max_batch)
        self.window = float(window)
        self.queue: queue.Queue = queue.Queue(maxsize=int(max_queue))
        self.batches = 0  # calls of run
        self.items = 0  # items answered
        self.largest = 0  # largest batch so far
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Future:
        """Queue ``item``; the returned future holds its result (or exception).

        Raises:
            Overloaded: ``max_queue`` items are already waiting.
            RuntimeError: the batcher is closed.
        """
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future: Future = Future()
        try:
            self.queue.put_nowait((item, future))
        except queue.Full:
            raise Overloaded(f"{self.queue.maxsize} requests are already waiting") from None
        return future

    def stats(self) -> dict[str, Any]:
        """Batches run, items answered, the largest batch and the items waiting now."""
        return {
            "batches": self.batches,
            "items": self.items,
            "largest_batch": self.largest,
            "waiting": self.queue.qsize(),
            "max_batch": self.max_batch,
            "max_queue": self.queue.maxsize,
        }

    def close(self, timeout: float | None = 30) -> None:
        """Answer what is queued, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self.queue.put((_STOP, None))  # blocks only while the queue is full, until the worker drains it
        self._thread.join(timeout)

    def _collect(self) -> tuple[list[tuple[Any, Future]], bool]:
        """The next batch (blocking for its first item) and whether a stop was seen."""
        first = self.queue.get()
        if first[0] is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:  # what is already queued joins at once; then wait out the window
                entry = self.queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    entry = self.queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if entry[0] is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch, stop = self._collect()
            # a client that went away cancelled its future: not worth a forward pass
            batch = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = list(self.run([item for item, _ in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"run returned {len(results)} results for {len(batch)} items")
            except Exception as err:  # the whole batch failed: each request gets the error
                log.exception("a batch of %d requests failed", len(batch))
                results = [err] * len(batch)
            self.batches += 1
            self.items += len(batch)
            self.largest = max(self.largest, len(batch))
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
