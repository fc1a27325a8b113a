"""Labelled sets of local descriptors for training Token's aggregator (``data.format: local_sets``).

Layout of a training folder (written by ``tokenret extract-local``)::

    root/labels.txt      one class label (any string) per line; line i labels item i of the store
    root/images.txt      optional: one id per line (e.g. the GLDv2 image id), used by ``data.val_list``;
                         without it an item's id is its line index ("0", "1", ...)
    root/descriptors/    a LocalDescriptorStore (store.json, descriptors.npy, offsets.npy), the
                         descriptors of each image strongest first

Items with no descriptor (unreadable images) are left out with a logged count. Class labels are sorted as
strings before numbering, as :mod:`tokenret.data.folders` does.

A dataset item is ``((descriptors (set_size, C) float32, padding_mask (set_size,) bool), label)``: every
set is padded (zeros, mask True) to ``set_size`` so the default collate stacks a batch. In training a set
keeps a random fraction (``keep``) of its descriptors, at most ``set_size``, drawn from a generator seeded
with ``SeedSequence([seed, epoch, index])`` (as :class:`~tokenret.data.augment.LabelledImageDataset`), so
draws do not depend on workers or processes and a resumed run re-draws exactly the same sets. In
validation a set is its first ``set_size`` descriptors.

Example:
    >>> sets = read_local_sets("sets/how_r101")                         # doctest: +SKIP
    >>> ds = LocalSetDataset(sets, set_size=1000, keep=(0.5, 1.0), seed=11)
    ... # doctest: +SKIP
    >>> (x, padding), label = ds[0]                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tokenret.data.augment import sample_seed
from tokenret.data.local_store import LocalDescriptorStore

__all__ = [
    "LabelledSets",
    "LocalSetDataset",
    "drop_empty_sets",
    "read_local_sets",
    "split_sets_by_list",
]

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
IDS_FILE = "images.txt"
STORE_DIR = "descriptors"


@dataclass
class LabelledSets:
    """Items of a local-descriptor store with class labels.

    Attributes:
        root: the training folder (see the module docstring).
        items: int64 array, the store position of each item.
        labels: int64 array, one label in ``0 .. len(class_names) - 1`` per item.
        class_names: the label string of each class number.
        ids: an identifier per item (``images.txt`` line, else the store position as a string).
        lengths: int64 array, the number of descriptors of each item in the store.
    """

    root: Path
    items: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids: list[str] = field(default_factory=list)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if not self.ids:
            self.ids = [str(i) for i in self.items]
        if not (len(self.items) == len(self.labels) == len(self.ids) == len(self.lengths)):
            raise ValueError(
                f"{len(self.items)} items, {len(self.labels)} labels, {len(self.ids)} ids and "
                f"{len(self.lengths)} lengths differ"
            )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def store_path(self) -> Path:
        return self.root / STORE_DIR

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledSets:
        """The items at ``indices`` (same class numbering)."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledSets(
            self.root,
            self.items[idx],
            self.labels[idx],
            self.class_names,
            [self.ids[i] for i in idx],
            self.lengths[idx],
        )


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # a final newline, or trailing blank lines
        lines.pop()
    return [line.strip() for line in lines]


def read_local_sets(root: str | Path) -> LabelledSets:
    """Read a ``local_sets`` training folder (labels, optional ids, store lengths); nothing is dropped yet.

    Raises:
        FileNotFoundError: no such folder, no labels.txt, or no store. ValueError: the files disagree on
            the number of items, or a label is empty.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"local-descriptor training folder not found: {root} (make it with `tokenret extract-local`)"
        )
    labels_path = root / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(
            f"{labels_path} not found: a local_sets folder holds {LABELS_FILE} (one class label per line) "
            f"and {STORE_DIR}/ (the descriptor store), as `tokenret extract-local` writes them"
        )
    names = _read_lines(labels_path)
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise ValueError(f"{labels_path}: empty label on line(s) {empty[:5]}")
    store = LocalDescriptorStore.load(root / STORE_DIR, mmap=True)
    if len(store) != len(names):
        raise ValueError(
            f"{labels_path} has {len(names)} labels but {root / STORE_DIR} holds {len(store)} sets; "
            "line i must label set i"
        )
    ids: list[str] = []
    ids_path = root / IDS_FILE
    if ids_path.is_file():
        ids = _read_lines(ids_path)
        if len(ids) != len(names):
            raise ValueError(f"{ids_path} has {len(ids)} lines but {labels_path} has {len(names)}")
    classes = sorted(set(names))
    number = {c: i for i, c in enumerate(classes)}
    return LabelledSets(
        root,
        np.arange(len(names), dtype=np.int64),
        np.array([number[n] for n in names], dtype=np.int64),
        classes,
        ids,
        store.lengths,
    )


def split_sets_by_list(sets: LabelledSets, val_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validation = the items whose id is in ``val_ids``; training = all others.

    Raises:
        ValueError: an id in the list matches no item (the first few are named).
    """
    wanted = set(val_ids)
    val_mask = np.array([i in wanted for i in sets.ids], dtype=bool)
    unknown = sorted(wanted - set(sets.ids))
    if unknown:
        hint = IDS_FILE + " lines" if (sets.root / IDS_FILE).is_file() else "line indices of " + LABELS_FILE
        raise ValueError(
            f"{len(unknown)} validation entries match no item of {sets.root}, e.g. {unknown[:3]}; list {hint}"
        )
    return np.flatnonzero(~val_mask).astype(np.int64), np.flatnonzero(val_mask).astype(np.int64)


def drop_empty_sets(sets: LabelledSets) -> tuple[LabelledSets, int]:
    """The items that have at least one descriptor, and how many were left out."""
    keep = np.flatnonzero(sets.lengths > 0)
    return sets.subset(keep), len(sets) - len(keep)


class LocalSetDataset(Dataset):
    """``((descriptors, padding_mask), label)`` items of :class:`LabelledSets`, padded to ``set_size``.

    Args:
        sets: the items.
        set_size: descriptors per set after sampling; shorter sets are padded (zeros, mask True).
        keep: training only: a set keeps a fraction drawn uniformly from ``keep`` of its descriptors (at least
            one), then at most ``set_size`` of them, chosen at random. None: validation (the first
            ``set_size`` descriptors, the strongest ones, no randomness).
        seed: run seed; the draws of item i in epoch e come from ``SeedSequence([seed, e, i])``.

    The store is opened (memory-mapped) in each process on first use, not pickled into DataLoader workers.
    """

    def __init__(
        self,
        sets: LabelledSets,
        set_size: int = 1000,
        keep: tuple[float, float] | None = (0.5, 1.0),
        seed: int = 0,
    ) -> None:
        if set_size < 1:
            raise ValueError(f"set_size must be >= 1, got {set_size}")
        if keep is not None and not 0 < keep[0] <= keep[1] <= 1:
            raise ValueError(f"keep must be (low, high) with 0 < low <= high <= 1, got {keep}")
        self.sets = sets
        self.set_size = int(set_size)
        self.keep = None if keep is None else (float(keep[0]), float(keep[1]))
        self.seed = seed
        self.epoch = 0
        self._store: LocalDescriptorStore | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (before the epoch's DataLoader iterator is created)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # each worker maps the files itself
        return state

    @property
    def store(self) -> LocalDescriptorStore:
        if self._store is None:
            self._store = LocalDescriptorStore.load(self.sets.store_path, mmap=True)
        return self._store

    def sample(self, i: int) -> np.ndarray:
        """Descriptors (n, C) float32 of item ``i`` for this epoch (n <= set_size), in store order."""
        x = self.store.get(int(self.sets.items[i]))
        n = len(x)
        if self.keep is None:
            return x[: self.set_size]
        rng = np.random.default_rng(sample_seed(self.seed, self.epoch, int(i)))
        fraction = rng.uniform(*self.keep)
        k = min(self.set_size, max(1, int(round(fraction * n))))
        if k >= n:
            return x
        rows = np.sort(rng.choice(n, size=k, replace=False))
        return x[rows]

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        x = self.sample(i)
        if len(x) == 0:
            raise ValueError(
                f"item {self.sets.ids[int(i)]} of {self.sets.root} has no descriptors (drop it first)"
            )
        out = torch.zeros(self.set_size, x.shape[1], dtype=torch.float32)
        out[: len(x)] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        padding = torch.ones(self.set_size, dtype=torch.bool)
        padding[: len(x)] = False
        return (out, padding), int(self.sets.labels[i])
