"""Google Landmarks Dataset v2 (GLDv2) training set in its published layout.

::

    <root>/train.csv          id,url,landmark_id                 (the full 4.1M-image set)
    <root>/train_clean.csv    landmark_id,images                 (GLDv2-clean: space-separated image ids)
    <root>/train/a/b/c/<id>.jpg                                  (a, b, c = first three characters of id)

Landmark ids are numbered 0..C-1 after sorting them **as strings**, as the Token release does (its
``relabeling.pkl``); for GLDv2-clean C = 81,313. The release's train/validation split is
:func:`tokenret.data.folders.split_per_class` with fraction 0.2 and seed 0.

Example:
    >>> images = read_gldv2("data/gldv2")                                   # doctest: +SKIP
    >>> images.num_classes, len(images)                                     # doctest: +SKIP
    (81313, 1580470)
    >>> train_idx, val_idx = release_split(images)                          # doctest: +SKIP
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tokenret.data.folders import LabelledImages, split_per_class

__all__ = ["GLDV2_CLEAN_CLASSES", "gldv2_image_path", "read_gldv2", "release_split"]

#: Number of landmarks in GLDv2-clean (the release's classifier size).
GLDV2_CLEAN_CLASSES = 81313


def gldv2_image_path(root: str | Path, image_id: str) -> Path:
    """``root/train/a/b/c/<id>.jpg`` for an image id ``abc...``."""
    if len(image_id) < 3:
        raise ValueError(f"GLDv2 image id {image_id!r} is too short (ids are 16 hex characters)")
    return Path(root) / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"


def _open_csv(path: Path):
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found. GLDv2 needs train.csv / train_clean.csv beside the train/ image folder "
            "(https://github.com/cvdfoundation/google-landmark: train.csv, and train_clean.csv from "
            "https://s3.amazonaws.com/google-landmark/metadata/train_clean.csv)"
        )
    return path.open(newline="", encoding="utf-8")


def _read_clean(path: Path) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    landmarks: list[str] = []
    with _open_csv(path) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"landmark_id", "images"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns landmark_id,images; found {reader.fieldnames}")
        for row in reader:
            lm = row["landmark_id"].strip()
            for image_id in (row["images"] or "").split():
                ids.append(image_id)
                landmarks.append(lm)
    return ids, landmarks


def _read_full(path: Path) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    landmarks: list[str] = []
    with _open_csv(path) as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"id", "landmark_id"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns id,url,landmark_id; found {reader.fieldnames}")
        for row in reader:
            ids.append(row["id"].strip())
            landmarks.append(row["landmark_id"].strip())
    return ids, landmarks


def read_gldv2(root: str | Path, list_file: str = "train_clean.csv") -> LabelledImages:
    """Image paths and labels of GLDv2 from ``train_clean.csv`` (GLDv2-clean) or ``train.csv``.

    Args:
        root: folder holding the CSV files and ``train/``.
        list_file: "train_clean.csv" (columns landmark_id,images) or "train.csv" (id,url,landmark_id);
            the format is recognised by its header, so a renamed file works too.

    Returns:
        LabelledImages whose ``class_names`` are landmark ids sorted as strings and ``ids`` the image ids,
        in file order. Files are not checked here (see ``LabelledImages.existing``).
    """
    root = Path(root)
    path = root / list_file
    with _open_csv(path) as f:
        header = next(csv.reader(f), [])
    header = [h.strip() for h in header]
    if "images" in header:
        ids, landmarks = _read_clean(path)
    elif "id" in header:
        ids, landmarks = _read_full(path)
    else:
        raise ValueError(
            f"{path}: not a GLDv2 list (header {header}); expected landmark_id,images or id,url,landmark_id"
        )
    if not ids:
        raise ValueError(f"{path}: lists no images")
    classes = sorted(set(landmarks))
    number = {c: i for i, c in enumerate(classes)}
    labels = np.fromiter((number[lm] for lm in landmarks), dtype=np.int64, count=len(landmarks))
    paths = [str(gldv2_image_path(root, i)) for i in ids]
    return LabelledImages(paths, labels, classes, ids)


def release_split(
    images: LabelledImages, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The release's GLDv2-clean split: per class, 20% (at least one image) to validation, seed 0."""
    return split_per_class(images.labels, val_fraction, seed)
