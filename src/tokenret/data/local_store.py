"""Variable-size sets of local descriptors on disk, and their padding into batches for the Token head.

A store holds the descriptors of many images as one flat (sum N_i, C) float16 (or float32) array plus int64
offsets (image i owns rows ``offsets[i]:offsets[i+1]``), optionally with per-feature attention strengths
(float32) — the same idea as the global-descriptor shards, one directory per shard:
``descriptors.npy``, ``offsets.npy``, [``strengths.npy``] and ``store.json``. Loading memory-maps the
descriptors, so a large shard opens instantly.

Example:
    >>> import numpy as np
    >>> store = LocalDescriptorStore(4)
    >>> store.add(np.ones((3, 4), np.float32)); store.add(np.zeros((1, 4), np.float32))
    0
    1
    >>> x, padding = store.batch([0, 1])
    >>> tuple(x.shape), padding.tolist()
    ((2, 3, 4), [[False, False, False], [False, True, True]])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

STORE_FORMAT = "tokenret-local-descriptors"
STORE_VERSION = 1
#: Descriptor precisions a store keeps.
STORE_DTYPES = ("float16", "float32")


class LocalDescriptorStore:
    """Append-only collection of per-image descriptor sets (float16 on disk and in memory by default).

    Args:
        dim: descriptor dimension C.
        with_strengths: also keep one float32 strength (attention) per descriptor.
        dtype: "float16" (half the space; relative rounding 5e-4) or "float32" (the extractors' own values,
            for bit-faithful reproductions of published aggregation numbers).
    """

    def __init__(self, dim: int, *, with_strengths: bool = False, dtype: str = "float16") -> None:
        if int(dim) <= 0:
            raise ValueError(f"descriptor dimension must be positive, got {dim}")
        if str(np.dtype(dtype)) not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        self.dim = int(dim)
        self.with_strengths = bool(with_strengths)
        self.dtype = np.dtype(dtype)
        self._chunks: list[np.ndarray] = []
        self._strength_chunks: list[np.ndarray] = []
        self._descriptors = np.empty((0, self.dim), self.dtype)
        self._strengths = np.empty(0, np.float32)
        self._offsets = [0]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def num_descriptors(self) -> int:
        return self._offsets[-1]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self._offsets, np.int64))

    def add(self, descriptors: np.ndarray, strengths: np.ndarray | None = None) -> int:
        """Append one image's (N, C) descriptors; returns its position in the store."""
        x = np.asarray(descriptors)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"descriptors must have shape (N, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("descriptors contain NaN or infinite values")
        if self.with_strengths:
            if strengths is None or np.shape(strengths) != (len(x),):
                raise ValueError(f"this store keeps strengths: pass one per descriptor ({len(x)},)")
            self._strength_chunks.append(np.asarray(strengths, np.float32))
        elif strengths is not None:
            raise ValueError("this store was created without strengths (with_strengths=False)")
        self._chunks.append(x.astype(self.dtype))
        self._offsets.append(self._offsets[-1] + len(x))
        return len(self) - 1

    def _merge(self) -> None:
        if self._chunks:
            self._descriptors = np.concatenate([np.asarray(self._descriptors)] + self._chunks)
            self._chunks = []
        if self._strength_chunks:
            self._strengths = np.concatenate([np.asarray(self._strengths)] + self._strength_chunks)
            self._strength_chunks = []

    def get(self, i: int) -> np.ndarray:
        """Descriptors of image ``i`` as (N_i, C) float32."""
        self._merge()
        return np.asarray(self._descriptors[self._offsets[i] : self._offsets[i + 1]], np.float32)

    def strengths(self, i: int) -> np.ndarray:
        if not self.with_strengths:
            raise ValueError("this store keeps no strengths")
        self._merge()
        return np.asarray(self._strengths[self._offsets[i] : self._offsets[i + 1]], np.float32)

    def descriptor_rows(self, rows: np.ndarray) -> np.ndarray:
        """Descriptors at positions ``rows`` of the flat (sum N_i, C) array (e.g. a sample for k-means)."""
        self._merge()
        return np.asarray(self._descriptors[np.asarray(rows, np.int64)], np.float32)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def batch(self, indices: Sequence[int], max_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the sets of ``indices`` into ``(B, N_max, C)`` float32 and a (B, N_max) mask, True = padding.

        Args:
            max_n: keep at most this many descriptors per image (the first ones; HOW stores them by
                decreasing attention).
        """
        return pad_sets([self.get(i) for i in indices], max_n=max_n)

    @classmethod
    def concatenate(cls, stores: Sequence[LocalDescriptorStore]) -> LocalDescriptorStore:
        """One store holding the images of ``stores`` in order (descriptors copied into memory)."""
        if not stores:
            raise ValueError("no stores to concatenate")
        dims = {s.dim for s in stores}
        kinds = {(s.with_strengths, str(s.dtype)) for s in stores}
        if len(dims) != 1 or len(kinds) != 1:
            raise ValueError(f"stores differ in dimension {sorted(dims)}, in keeping strengths or in dtype")
        with_strengths, dtype = kinds.pop()
        out = cls(dims.pop(), with_strengths=with_strengths, dtype=dtype)
        offsets = [0]
        for s in stores:
            s._merge()
            offsets += (np.asarray(s._offsets[1:], np.int64) + offsets[-1]).tolist()
        out._descriptors = np.concatenate([np.asarray(s._descriptors) for s in stores])
        if out.with_strengths:
            out._strengths = np.concatenate([np.asarray(s._strengths) for s in stores])
        out._offsets = offsets
        return out

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the store into directory ``path`` (files replaced through temporary names)."""
        self._merge()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {"descriptors": self._descriptors, "offsets": np.asarray(self._offsets, np.int64)}
        if self.with_strengths:
            arrays["strengths"] = self._strengths
        for name, arr in arrays.items():
            tmp = path / f"{name}.tmp.npy"
            np.save(tmp, np.asarray(arr), allow_pickle=False)
            os.replace(tmp, path / f"{name}.npy")
        header = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "dim": self.dim,
            "images": len(self),
            "descriptors": self.num_descriptors,
            "with_strengths": self.with_strengths,
            "dtype": str(self.dtype),
        }
        tmp = path / "store.json.tmp"
        tmp.write_text(json.dumps(header, indent=1) + "\n")
        os.replace(tmp, path / "store.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> LocalDescriptorStore:
        path = Path(path)
        header_path = path / "store.json"
        if not header_path.is_file():
            raise FileNotFoundError(f"{path} is not a local-descriptor store (no store.json)")
        header = json.loads(header_path.read_text())
        if header.get("format") != STORE_FORMAT or int(header.get("version", 0)) > STORE_VERSION:
            raise ValueError(f"{header_path}: not a {STORE_FORMAT} header of version <= {STORE_VERSION}")
        dtype = header.get("dtype", "float16")  # stores written before the option were float16
        store = cls(int(header["dim"]), with_strengths=bool(header["with_strengths"]), dtype=dtype)
        n_desc = int(header["descriptors"])
        mode = "r" if mmap and n_desc else None
        descriptors = np.load(path / "descriptors.npy", mmap_mode=mode, allow_pickle=False)
        offsets = np.load(path / "offsets.npy", allow_pickle=False)
        if descriptors.shape != (n_desc, store.dim) or descriptors.dtype != store.dtype:
            raise ValueError(f"{path}: descriptors.npy is {descriptors.dtype} {descriptors.shape}")
        if offsets.shape != (int(header["images"]) + 1,) or offsets[0] != 0 or offsets[-1] != n_desc:
            raise ValueError(f"{path}: offsets.npy does not match the header")
        if (np.diff(offsets) < 0).any():
            raise ValueError(f"{path}: offsets.npy is not non-decreasing")
        store._descriptors = descriptors
        store._offsets = offsets.tolist()
        if store.with_strengths:
            store._strengths = np.load(path / "strengths.npy", mmap_mode=mode, allow_pickle=False)
        return store


def pad_sets(
    sets: Sequence[np.ndarray | torch.Tensor], max_n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sets of different sizes into ``(B, N_max, C)`` (zeros in padding) and a mask, True = padding.

    The result feeds ``TokenHead.forward_set(descriptors, padding_mask)``.
    """
    if len(sets) == 0:
        raise ValueError("no sets to pad")
    tensors = [
        torch.as_tensor(np.asarray(s, np.float32) if not isinstance(s, torch.Tensor) else s) for s in sets
    ]
    if max_n is not None:
        tensors = [t[:max_n] for t in tensors]
    dims = {t.shape[1] for t in tensors if t.ndim == 2}
    if len(dims) != 1 or any(t.ndim != 2 for t in tensors):
        raise ValueError(
            f"every set must be (N_i, C) with one C; got shapes {[tuple(t.shape) for t in tensors]}"
        )
    c = dims.pop()
    n_max = max(1, max(len(t) for t in tensors))
    out = torch.zeros(len(tensors), n_max, c, dtype=torch.float32)
    padding = torch.ones(len(tensors), n_max, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : len(t)] = t.float()
        padding[i, : len(t)] = False
    return out, padding


__all__ = ["LocalDescriptorStore", "pad_sets"]
