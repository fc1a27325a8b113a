"""Sharded, resumable result stores: an extraction writes its results shard by shard beside a manifest, so
an interrupted run resumes without recomputing finished shards; under torchrun each process takes every
world_size-th shard."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm.auto import tqdm

from tokenret.extraction.streams import dist_info

log = logging.getLogger(__name__)


def extract_unsharded(
    n: int, extract_range: Callable[[Sequence[int], tqdm], tuple[Any, dict]], progress: bool, desc: str
) -> tuple[Any, dict]:
    """All ``n`` images in this process, without shards (refused under torchrun: nothing to merge through)."""
    if dist_info()[1] > 1:
        raise ValueError("distributed extraction needs out_dir (shards are merged through the file system)")
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        return extract_range(range(n), bar)


class ShardStore:
    """Descriptor shards in a directory: ``manifest.json``, ``shard_XXXXX.npy`` and its failures JSON.

    A shard exists only once completely written (temporary file, then rename), so an interruption loses at
    most the shard in progress.
    """

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
        total = sum(len(self.shard_range(s)) for s in mine)
        done = total - sum(len(self.shard_range(s)) for s in todo)
        with tqdm(total=total, initial=done, desc=desc, unit="img", disable=not progress or rank != 0) as bar:
            for s in todo:
                self.write(s, *extract_range(self.shard_range(s), bar))
        if world > 1:
            dist.barrier()

    def write_failures(self, s: int, failures: dict[int, tuple[str, str]]) -> None:
        atomic_write_text(self._failures(s), json.dumps({str(k): list(v) for k, v in failures.items()}))

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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
