"""Where and how forward passes run: the device, CPU streams (threads sharing torch's threads), autocast,
and the process's place under torchrun."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> torch.device:
    """The given device, else ``$TOKENRET_DEVICE`` (e.g. "cpu" to keep a GPU machine's GPU free), else this
    process's GPU under torchrun, else cuda when available, else cpu."""
    device = device or os.environ.get("TOKENRET_DEVICE") or None
    if device:
        return torch.device(device)
    if dist.is_available() and dist.is_initialized() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_streams(streams: int) -> None:
    """The ``streams`` setting is 0 (automatic) or a positive count."""
    if streams < 0:
        raise ValueError(f"streams must be 0 (automatic) or a positive count, got {streams}")


def resolve_streams(streams: int, device: torch.device) -> int:
    """Concurrent forward passes on ``device``: 1 off the CPU; ``streams`` if set; else 2 when torch has 2 or
    more threads (one stream's convolutions wait for their slowest thread, two streams do not; measured:
    bench/README.md, "extract"), else 1."""
    check_streams(streams)
    if device.type != "cpu":
        return 1
    if streams:
        return streams
    return 2 if torch.get_num_threads() >= 2 else 1


def cpu_has_native_bf16() -> bool:
    """True where this CPU has avx512_bf16 (or torch cannot tell)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # older torch: cannot tell
        return True


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``amp`` ("off", "bf16", "fp16") on ``device``; fp16 is refused off the GPU."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a GPU (fp16 compute is very slow on CPUs); use amp='bf16'")
    if amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "this CPU has no native bfloat16 (avx512_bf16): bf16 autocast will be far slower than fp32"
        )
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ThreadShares:
    """torch threads of each stream of one :func:`run_streams` call. A stream that runs out of items hands
    its threads to the busy stream that has the fewest, which takes them up at its next
    :func:`use_handed_threads` (so the last items of a run do not leave threads idle)."""

    def __init__(self, shares: list[int]) -> None:
        self._threads = list(shares)
        self._done = [False] * len(shares)
        self._lock = threading.Lock()

    def threads(self, k: int) -> int:
        return self._threads[k]

    def finish(self, k: int) -> None:
        with self._lock:
            self._done[k] = True
            busy = [j for j, done in enumerate(self._done) if not done]
            if busy and self._threads[k]:
                j = min(busy, key=self._threads.__getitem__)
                self._threads[j] += self._threads[k]
                self._threads[k] = 0


_stream = threading.local()


def use_handed_threads() -> None:
    """Inside a stream of :func:`run_streams`, run on the torch threads that streams which ran out of items
    have handed to this one; elsewhere nothing. Called between forward passes (each scale of a batch): a
    running operation keeps the threads it started with."""
    state = getattr(_stream, "shares", None)
    if state is None:
        return
    shares, k = state
    n = shares.threads(k)
    if n > torch.get_num_threads():
        torch.set_num_threads(n)


def run_streams(items: Iterator, fn: Callable[[Any], None], streams: int) -> None:
    """``fn(item)`` for every item under inference mode, by ``streams`` threads that share torch's threads.

    Each thread takes the next item when it is free; a thread that finds no item left hands its torch
    threads to a busy one (see :func:`use_handed_threads`). The first exception stops the others (after
    their current item) and is raised here, as is a KeyboardInterrupt, once every thread has stopped.
    torch's thread count is restored afterwards."""
    if streams <= 1:
        with torch.inference_mode():
            for item in items:
                fn(item)
        return
    total = torch.get_num_threads()
    shares = [total // streams + (k < total % streams) for k in range(streams)]
    lock, stop = threading.Lock(), threading.Event()
    errors: list[BaseException] = []
    handed = _ThreadShares(shares)

    def worker(k: int) -> None:
        # torch sets a new thread's OpenMP team from the last process-wide setting on its first parallel op:
        # trigger that first, then give this thread its share (a per-thread setting from then on)
        torch.get_num_threads()
        torch.set_num_threads(max(1, shares[k]))
        _stream.shares = (handed, k)
        try:
            with torch.inference_mode():
                while not stop.is_set():
                    with lock:
                        item = next(items, _END)
                    if item is _END:
                        return
                    fn(item)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(e)
            stop.set()
        finally:
            _stream.shares = None
            handed.finish(k)

    threads = [threading.Thread(target=worker, args=(k,), name=f"tokenret-{k}") for k in range(streams)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stop.set()  # an interrupt in join: the others finish their current item and stop
        for t in threads:
            if t.is_alive():
                t.join()
        torch.set_num_threads(total)
    if errors:
        raise errors[0]


_END = object()
