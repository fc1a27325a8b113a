"""The images an extraction reads: a dataset that loads (and for queries crops) each image and reports,
rather than raises, a failure; batching of equal-size images; the fingerprint of a list."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from tokenret.data.images import (
    IMAGE_DATA_NAME,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    load_image,
    to_tensor,
)

Box = tuple[float, float, float, float]


class ExtractionError(RuntimeError):
    """Some images could not be read; ``failures`` maps image index -> (path, reason)."""

    def __init__(self, failures: dict[int, tuple[str, str]]) -> None:
        self.failures = failures
        lines = [f"  {path}: {reason}" for path, reason in list(failures.values())[:20]]
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        super().__init__(f"{len(failures)} image(s) could not be read:\n" + "\n".join(lines) + more)


class ImageList(Dataset):
    """Loads (and for queries crops) images; a failure is returned, not raised, so the loop can record it.

    Each image is a file path or the bytes of an image file (an upload, decoded in memory); ``paths`` holds
    the names failures are reported under. ``mean`` and ``std`` are in RGB order; with ``bgr`` the
    normalised tensor's channels are then reversed (OpenCV's order, as CVNet/SuperGlobal read images).
    With ``truncate_boxes`` a query box's coordinates are cut to integers before cropping.
    """

    def __init__(
        self,
        paths: Sequence[str | Path | bytes],
        boxes: Sequence[Box | None] | None,
        max_size: int | None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        bgr: bool = False,
        truncate_boxes: bool = False,
    ):
        self.sources = [bytes(p) if isinstance(p, (bytes, bytearray)) else str(p) for p in paths]
        self.paths = [IMAGE_DATA_NAME if isinstance(p, bytes) else p for p in self.sources]
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)
        if len(self.boxes) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.boxes)} boxes")
        self.max_size = max_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.bgr, self.truncate_boxes = bgr, truncate_boxes

    @classmethod
    def for_convention(
        cls,
        paths: Sequence[str | Path | bytes],
        boxes: Sequence[Box | None] | None,
        max_size: int | None,
        convention: Any,
    ) -> ImageList:
        """Images as a model's :class:`~tokenret.models.convention.InputConvention` wants them."""
        mean, std = convention.rgb_mean_std
        return cls(
            paths,
            boxes,
            max_size,
            mean,
            std,
            bgr=convention.channel_order == "BGR",
            truncate_boxes=convention.box_rounding == "truncate",
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        box = self.boxes[i]
        if box is not None and self.truncate_boxes:
            box = _truncated(box)
        try:
            image = load_image(self.sources[i], self.max_size, box)
            tensor = to_tensor(image, self.mean, self.std)
            return i, (tensor.flip(0) if self.bgr else tensor), None
        except ImageLoadError as e:
            return i, None, str(e.reason) if hasattr(e, "reason") else str(e)


def _truncated(box: Box) -> Box:
    """The box with its coordinates cut to integers (one that is not four finite numbers is left for
    ``load_image`` to refuse with its rule)."""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        return box
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        return box
    return tuple(float(math.trunc(v)) for v in values)


def equal_size_batches(
    loader: DataLoader, batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor | None, list]]:
    """Group loaded images of equal size into batches; failures pass through one by one."""
    buckets: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, tensor, error in loader:
        if tensor is None:
            yield [i], None, [error]
            continue
        bucket = buckets.setdefault(tuple(tensor.shape), [])
        bucket.append((i, tensor))
        if len(bucket) >= batch_size:
            del buckets[tuple(tensor.shape)]
            yield [j for j, _ in bucket], torch.stack([t for _, t in bucket]), []
    for bucket in buckets.values():
        yield [j for j, _ in bucket], torch.stack([t for _, t in bucket]), []


def collate_one(item):
    """A DataLoader ``collate_fn`` that passes each item through unbatched."""
    return item


def list_fingerprint(dataset: ImageList) -> str:
    """sha256 over the paths and boxes of ``dataset`` (identifies cached results)."""
    h = hashlib.sha256()
    for p, b in zip(dataset.sources, dataset.boxes, strict=True):
        name = f"bytes:{hashlib.sha256(p).hexdigest()}" if isinstance(p, bytes) else p
        h.update(f"{name}\t{b}\n".encode())
    return h.hexdigest()
