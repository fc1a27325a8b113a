"""Your own labelled images: one folder per class, or a CSV of path,label; and the per-class split.

Both readers return a :class:`LabelledImages`: image paths, integer labels 0..C-1 and the original class
names (label ``i`` is ``class_names[i]``). Class names are sorted as strings before numbering, as the Token
release does for GLDv2 landmark ids, so the numbering does not depend on listing order.

Example:
    >>> images = read_class_folders("my_landmarks")        # my_landmarks/<class>/<image>.jpg
    ... # doctest: +SKIP
    >>> train, val = split_per_class(images.labels, val_fraction=0.2, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "LabelledImages",
    "read_class_folders",
    "read_csv_labels",
    "read_id_list",
    "split_by_list",
    "split_per_class",
]

log = logging.getLogger(__name__)

#: File extensions taken as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class LabelledImages:
    """Images with class labels.

    Attributes:
        paths: image files.
        labels: int64 array, one label in ``0 .. len(class_names) - 1`` per image.
        class_names: original class name (folder name, CSV label, GLDv2 landmark id) of each label.
        ids: an identifier per image (GLDv2 image id; for folders/CSV the path relative to the root), used by
            validation lists.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.ids:
            self.ids = list(self.paths)
        if not (len(self.paths) == len(self.labels) == len(self.ids)):
            raise ValueError(
                f"{len(self.paths)} paths, {len(self.labels)} labels and {len(self.ids)} ids differ"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelledImages:
        """The images at ``indices`` (same class numbering)."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            [self.paths[i] for i in idx], self.labels[idx], self.class_names, [self.ids[i] for i in idx]
        )

    def existing(self) -> tuple[LabelledImages, list[str]]:
        """The images whose files exist, and the paths of those that do not."""
        keep: list[int] = []
        missing: list[str] = []
        for i, p in enumerate(self.paths):
            if os.path.isfile(p):
                keep.append(i)
            else:
                missing.append(p)
        return self.subset(keep), missing


def _numbering(names: Sequence[str]) -> tuple[list[str], dict[str, int]]:
    classes = sorted(set(names))
    return classes, {c: i for i, c in enumerate(classes)}


def read_class_folders(root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> LabelledImages:
    """Every image under ``root/<class>/`` (sub-folders of a class folder included), labelled by class folder.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or holds no class folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root} (expected one sub-folder per class)")
    exts = {e.lower() for e in extensions}
    names: list[str] = []
    paths: list[str] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in class_dir.rglob("*") if f.is_file() and f.suffix.lower() in exts)
        for f in files:
            names.append(class_dir.name)
            paths.append(str(f))
    if not paths:
        raise FileNotFoundError(
            f"no images found in class folders under {root} (expected {root}/<class>/<image> with extensions "
            f"{', '.join(sorted(exts))})"
        )
    classes, number = _numbering(names)
    ids = [str(Path(p).relative_to(root)) for p in paths]
    return LabelledImages(paths, np.array([number[n] for n in names]), classes, ids)


def read_csv_labels(csv_path: str | Path, root: str | Path | None = None) -> LabelledImages:
    """Images listed in a CSV of ``path,label`` rows (a header row naming path and label is optional).

    Args:
        csv_path: the CSV file. Extra columns are ignored when a header names ``path`` and ``label``.
        root: folder that relative paths start from; default the CSV's folder.

    Raises:
        FileNotFoundError: no such CSV. ValueError: a malformed row (its line number is given).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"label CSV not found: {csv_path}")
    base = Path(root) if root else csv_path.parent
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    path_col, label_col, start = 0, 1, 0
    if rows and {"path", "label"} <= {c.strip().lower() for c in rows[0]}:
        header = [c.strip().lower() for c in rows[0]]
        path_col, label_col, start = header.index("path"), header.index("label"), 1
    paths, names, ids = [], [], []
    for line, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(path_col, label_col):
            raise ValueError(f"{csv_path}:{line}: expected path,label, got {row!r}")
        rel, label = row[path_col].strip(), row[label_col].strip()
        if not rel or not label:
            raise ValueError(f"{csv_path}:{line}: empty path or label in {row!r}")
        p = Path(rel)
        paths.append(str(p if p.is_absolute() else base / p))
        names.append(label)
        ids.append(rel)
    if not paths:
        raise ValueError(f"{csv_path}: no path,label rows")
    classes, number = _numbering(names)
    return LabelledImages(paths, np.array([number[n] for n in names]), classes, ids)


def split_per_class(
    labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The release's per-class train/validation split, reproducible from ``seed``.

    Classes are visited in label order; the image indices of each (in listing order) are shuffled with one
    ``numpy.random.RandomState(MT19937(SeedSequence(seed)))`` stream, the first ``max(1, int(val_fraction *
    n))`` go to validation and the rest to training (so a one-image class is only in validation). Both
    index lists are then shuffled by the same stream, train first. ``val_fraction == 0`` puts everything in
    training (in listing order).

    Returns:
        (train indices, validation indices), int64 arrays.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if val_fraction <= 0:
        return np.arange(len(labels), dtype=np.int64), np.zeros(0, dtype=np.int64)
    rs = np.random.RandomState(np.random.MT19937(np.random.SeedSequence(seed)))
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for members in np.split(order, bounds):
        if members.size == 0:
            continue
        members = members.copy()
        rs.shuffle(members)
        k = max(1, int(val_fraction * members.size))
        val.append(members[:k])
        train.append(members[k:])
    train_idx = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    val_idx = np.concatenate(val) if val else np.zeros(0, dtype=np.int64)
    rs.shuffle(train_idx)
    rs.shuffle(val_idx)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


def read_id_list(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a text file (a validation list), stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file not found: {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def split_by_list(images: LabelledImages, val_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validation = the images whose id (or path) is in ``val_ids``; training = all others.

    Raises:
        ValueError: an id in the list matches no image (the first few are named).
    """
    wanted = set(val_ids)
    val_mask = np.array([i in wanted or p in wanted for i, p in zip(images.ids, images.paths, strict=True)])
    found = {i for i, m in zip(images.ids, val_mask, strict=True) if m}
    found |= {p for p, m in zip(images.paths, val_mask, strict=True) if m}
    unknown = [v for v in val_ids if v not in found]
    if unknown:
        raise ValueError(
            f"{len(unknown)} validation entries match no training image, e.g. {unknown[:3]}; list image ids "
            "(GLDv2) or paths relative to the data root (folders/CSV)"
        )
    return np.flatnonzero(~val_mask).astype(np.int64), np.flatnonzero(val_mask).astype(np.int64)
