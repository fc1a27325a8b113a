"""Training and validation image pipelines (the release's), and a dataset whose randomness is reproducible.

Training: RandomResizedCrop(size, scale=(0.2, 1), ratio=(3/4, 4/3), bilinear) -> RandomHorizontalFlip(0.5)
-> RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8) -> ToTensor -> Normalize(ImageNet).
Validation: Resize(int(size * 8 / 7), bicubic) -> CenterCrop(size) -> ToTensor -> Normalize.

The augmentation of sample ``i`` in epoch ``e`` is drawn from its own generator seeded with
``SeedSequence([seed, e, i])``, not from the DataLoader workers' streams: results do not depend on the
number of workers or processes, and a resumed run re-draws exactly what the interrupted one would have.

Example:
    >>> ds = LabelledImageDataset(images, TrainTransform(512), seed=11)   # doctest: +SKIP
    >>> ds.set_epoch(3); x, y = ds[0]                                       # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from tokenret.data.folders import LabelledImages
from tokenret.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, load_image

__all__ = ["LabelledImageDataset", "TrainTransform", "ValTransform", "sample_seed"]

log = logging.getLogger(__name__)

#: Attempts to replace an unreadable training image before giving up.
MAX_SUBSTITUTIONS = 10


class TrainTransform:
    """The release's training augmentation (see the module docstring)."""

    def __init__(
        self,
        size: int = 512,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
    ) -> None:
        steps: list[Callable] = [
            T.RandomResizedCrop(
                size, scale=tuple(scale), ratio=tuple(ratio), interpolation=T.InterpolationMode.BILINEAR
            )
        ]
        if hflip > 0:
            steps.append(T.RandomHorizontalFlip(hflip))
        if color_jitter_p > 0 and any(v > 0 for v in color_jitter):
            steps.append(T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_p))
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.pipeline = T.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.pipeline(img)

    def __repr__(self) -> str:
        return f"TrainTransform({self.pipeline})"


class ValTransform:
    """Resize the shorter side to ``resize`` (bicubic), centre-crop ``size``, normalise."""

    def __init__(self, size: int = 512, resize: int | None = None) -> None:
        resize = int(size * 8 / 7) if resize is None else resize
        self.pipeline = T.Compose(
            [
                T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(size),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.pipeline(img)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of sample ``index``'s augmentation in ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class LabelledImageDataset(Dataset):
    """(image tensor, label) pairs of a :class:`~tokenret.data.folders.LabelledImages` with a transform.

    Args:
        images: paths and labels.
        transform: PIL image -> tensor; its torch random draws are seeded per (seed, epoch, index).
        seed: run seed.
        substitute_unreadable: an image that cannot be loaded is logged (warning, with path and reason) and
            replaced by the next index; False raises instead.
    """

    def __init__(
        self,
        images: LabelledImages,
        transform: Callable[[Image.Image], torch.Tensor],
        seed: int = 0,
        substitute_unreadable: bool = True,
    ) -> None:
        self.images = images
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.substitute_unreadable = substitute_unreadable

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (before the epoch's DataLoader iterator is created)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_image(self.images.paths[i], max_size=None)
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: torch.manual_seed would also queue seeds for every accelerator backend.
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, i))
            x = self.transform(img)
        return x, int(self.images.labels[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(i)
        for _ in range(MAX_SUBSTITUTIONS):
            try:
                return self._load(j)
            except ImageLoadError as e:
                if not self.substitute_unreadable:
                    raise
                log.warning(
                    "unreadable training image %s (%s); using index %d instead", e.path, e.reason, j + 1
                )
                j = (j + 1) % len(self)
        raise ImageLoadError(
            self.images.paths[int(i)],
            f"this image and the next {MAX_SUBSTITUTIONS - 1} could not be read; check the dataset files",
        )
