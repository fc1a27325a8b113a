"""Sharded, resumable result stores: an extraction writes its results shard by shard beside a manifest, so
an interrupted run resumes without recomputing finished shards; under torchrun each process takes every
world_size-th shard."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from tokenret.extraction.streams import dist_info

log = logging.getLogger(__name__)

#: Seconds of extraction after which a shard's finished part is written as a piece (an interruption loses at
#: most about this much of a shard's work).
PIECE_SECONDS = 60.0
#: Images of the first piece, while the time an image takes is not known yet.
FIRST_PIECE = 8
#: The clock of the pieces (a name of its own, so that tests can run it faster).
_clock = time.monotonic


def extract_unsharded(
    n: int,
    extract_range: Callable[[Sequence[int], tqdm], tuple[Any, dict]],
    progress: bool,
    desc: str,
    bar: tqdm | None = None,
) -> tuple[Any, dict]:
    """All ``n`` images in this process, without shards (refused under torchrun: nothing to merge through).

    ``bar``: a progress bar to advance instead of a new one (a caller's, running over several calls).
    """
    if dist_info()[1] > 1:
        raise ValueError("distributed extraction needs out_dir (shards are merged through the file system)")
    if bar is not None:
        return extract_range(range(n), bar)
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        return extract_range(range(n), bar)


class ShardStore:
    """Descriptor shards in a directory: ``manifest.json``, ``shard_XXXXX.npy`` and its failures JSON.

    A shard exists only once completely written (temporary file, then rename). A shard whose extraction takes
    longer than ``PIECE_SECONDS`` is written meanwhile as pieces (``shard_XXXXX.pieces/``, each one sized
    from the pace of the last), merged into the shard at its end: an interruption loses about a minute of work
    at most, and a resumed run starts after the last piece.
    """

    piece_seconds = PIECE_SECONDS

    def __init__(self, root: Path, n: int, shard_size: int) -> None:
        self.root, self.n, self.shard_size = root, n, max(1, int(shard_size))
        self.n_shards = max(1, math.ceil(n / self.shard_size)) if n else 0

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min(self.n, (s + 1) * self.shard_size))

    def _npy(self, s: int) -> Path:
        return self.root / f"shard_{s:05d}.npy"

    def _failures(self, s: int) -> Path:
        return self.root / f"shard_{s:05d}.failures.json"

    def open(self, manifest: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "manifest.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != manifest:
                changed = sorted(k for k in manifest if old.get(k) != manifest[k])
                log.warning("%s holds descriptors made differently (%s); starting afresh", self.root, changed)
                for f in self.root.glob("shard_*"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
        atomic_write_text(path, json.dumps(manifest, indent=1))

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        on_disk = json.loads((self.root / "manifest.json").read_text())
        if on_disk != manifest:
            raise RuntimeError(f"{self.root}: processes disagree on what to extract (different image lists?)")

    def is_done(self, s: int) -> bool:
        return self._npy(s).exists()

    def fill(
        self,
        manifest: dict[str, Any],
        extract_range: Callable[[Sequence[int], tqdm], tuple[Any, dict]],
        *,
        progress: bool,
        desc: str,
    ) -> None:
        """Extract and write every unfinished shard of this process. Rank 0 records the manifest (clearing
        shards made differently); under torchrun each process takes every world_size-th shard, and all wait
        for the others at the end, so that each can then read every shard."""
        rank, world = dist_info()
        if rank == 0:
            self.open(manifest)
        if world > 1:
            dist.barrier()
            self.check_manifest(manifest)
        mine = [s for s in range(self.n_shards) if s % world == rank]
        todo = [s for s in mine if not self.is_done(s)]
        for s in set(mine) - set(todo):  # merged, then interrupted before its pieces were removed
            shutil.rmtree(self._pieces(s), ignore_errors=True)
        pieces = {s: self.finished_pieces(s) for s in todo}
        total = sum(len(self.shard_range(s)) for s in mine)
        done = (
            total
            - sum(len(self.shard_range(s)) for s in todo)
            + sum(len(p) for ps in pieces.values() for p in ps)
        )
        size = FIRST_PIECE  # images until the next piece; from then on, about piece_seconds at the last pace
        with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress or rank != 0) as bar:
            for s in todo:
                r = self.shard_range(s)
                start = pieces[s][-1].stop if pieces[s] else r.start
                while start < r.stop:
                    part = range(start, min(r.stop, start + size))
                    began = _clock()
                    result = extract_range(part, bar)
                    if part.stop == r.stop and not pieces[s]:  # the whole shard at once
                        self.write(s, *result)
                    else:
                        self.write_piece(s, part, *result)
                        pieces[s].append(part)
                    per_image = max(_clock() - began, 1e-9) / len(part)
                    size = max(1, int(self.piece_seconds / per_image))
                    start = part.stop
                if pieces[s]:
                    self.write(s, *self.merge([self.read_piece(s, p) for p in pieces[s]]))
                    shutil.rmtree(self._pieces(s))
        if world > 1:
            dist.barrier()

    # -- pieces of a shard, written while it is extracted -----------------------------------------------

    def _pieces(self, s: int) -> Path:
        return self.root / f"shard_{s:05d}.pieces"

    def _piece(self, s: int, part: range) -> Path:
        return self._pieces(s) / f"{part.start:09d}-{part.stop:09d}"

    def piece_done(self, path: Path) -> bool:
        return path.with_name(path.name + ".npy").exists()

    def finished_pieces(self, s: int) -> list[range]:
        """The pieces of shard ``s`` written so far that follow each other from its start."""
        found = {}
        if self._pieces(s).is_dir():
            for f in self._pieces(s).iterdir():
                start, sep, stop = f.name.split(".")[0].partition("-")
                if (
                    sep
                    and start.isdigit()
                    and stop.isdigit()
                    and self.piece_done(f.with_name(f.name.split(".")[0]))
                ):
                    found[int(start)] = range(int(start), int(stop))
        out, at = [], self.shard_range(s).start
        while at in found:
            out.append(found[at])
            at = found[at].stop
        return out

    def write_piece(self, s: int, part: range, result: Any, failures: dict[int, tuple[str, str]]) -> None:
        path = self._piece(s, part)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path.with_name(path.name + ".failures.json"), failures_json(failures))
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, result)
        os.replace(tmp, path.with_name(path.name + ".npy"))

    def read_piece(self, s: int, part: range) -> tuple[Any, dict[int, tuple[str, str]]]:
        path = self._piece(s, part)
        failures = read_failures_json(path.with_name(path.name + ".failures.json"))
        return np.load(path.with_name(path.name + ".npy")), failures

    def merge(self, pieces: list[tuple[Any, dict[int, tuple[str, str]]]]) -> tuple[Any, dict]:
        """One shard's result from its pieces' (in order)."""
        return np.concatenate([p[0] for p in pieces]), {k: v for p in pieces for k, v in p[1].items()}

    def write_failures(self, s: int, failures: dict[int, tuple[str, str]]) -> None:
        atomic_write_text(self._failures(s), failures_json(failures))

    def read_failures(self) -> dict[int, tuple[str, str]]:
        """Unreadable images of every shard: image index -> (path, reason)."""
        failures: dict[int, tuple[str, str]] = {}
        for s in range(self.n_shards):
            if self._failures(s).exists():
                for k, v in json.loads(self._failures(s).read_text()).items():
                    failures[int(k)] = (v[0], v[1])
        return failures

    def write(self, s: int, arr: np.ndarray, failures: dict[int, tuple[str, str]]) -> None:
        self.write_failures(s, failures)
        tmp = self._npy(s).with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, self._npy(s))

    def read_all(self, dim: int) -> tuple[np.ndarray, dict[int, tuple[str, str]]]:
        """Every shard's rows, (n, dim) float32, and every shard's failures."""
        out = np.empty((self.n, dim), dtype=np.float32)
        for s in range(self.n_shards):
            r = self.shard_range(s)
            out[r.start : r.stop] = np.load(self._npy(s))
        return out, self.read_failures()


def failures_json(failures: dict[int, tuple[str, str]]) -> str:
    """Failures (image index -> (path, reason)) as the JSON the shards keep beside their results."""
    return json.dumps({str(k): list(v) for k, v in failures.items()})


def read_failures_json(path: Path) -> dict[int, tuple[str, str]]:
    """The failures :func:`failures_json` wrote to ``path``."""
    return {int(k): (v[0], v[1]) for k, v in json.loads(path.read_text()).items()}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
