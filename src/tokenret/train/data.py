"""Training data: the labelled images (or descriptor sets) of a run, split for validation, as datasets.

:func:`load_training_data` reads ``cfg.data`` into a :class:`TrainData` (training and validation parts with
one class numbering); :func:`build_train_dataset` wraps the training part with its augmentation;
:func:`inputs_to_device` moves a batch's inputs to the training device.

Example:
    >>> from tokenret.train.config import load_config
    >>> from tokenret.train.data import load_training_data
    >>> cfg = load_config(None, ["data.format=folders", "data.root=my_images"])  # doctest: +SKIP
    >>> data = load_training_data(cfg)                                           # doctest: +SKIP
    >>> data.num_classes, len(data.train), len(data.val)                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from tokenret.data.augment import LabelledImageDataset, TrainTransform
from tokenret.data.folders import (
    LabelledImages,
    read_class_folders,
    read_csv_labels,
    read_id_list,
    split_by_list,
    split_per_class,
)
from tokenret.data.gldv2 import read_gldv2
from tokenret.data.local_sets import (
    LabelledSets,
    LocalSetDataset,
    drop_empty_sets,
    read_local_sets,
    split_sets_by_list,
)
from tokenret.train.config import ConfigError, TrainConfig

__all__ = [
    "Inputs",
    "TrainData",
    "build_train_dataset",
    "inputs_to_device",
    "load_local_sets_data",
    "load_training_data",
]

log = logging.getLogger(__name__)

#: A batch's network input: images (B, 3, H, W), or several tensors (descriptor sets and padding masks).
Inputs = Tensor | tuple[Tensor, ...]


@dataclass
class TrainData:
    """Training and validation images, or descriptor sets (same class numbering over both)."""

    train: LabelledImages | LabelledSets
    val: LabelledImages | LabelledSets | None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def load_training_data(cfg: TrainConfig) -> TrainData:
    """Read ``cfg.data``'s images, split them (validation list or seeded per-class split), drop missing files.

    The split is made on the full list before missing files are dropped, so it does not depend on which files
    happen to be present.
    """
    d = cfg.data
    if d.format == "local_sets":
        return load_local_sets_data(cfg)
    if d.format in ("gldv2", "folders") and not d.root:
        raise ConfigError(f"data.root is empty: give the {d.format} dataset folder (data.root=PATH)")
    if d.format == "csv" and not d.csv:
        raise ConfigError("data.format=csv needs data.csv=FILE (rows of path,label)")
    if d.format == "gldv2":
        images = read_gldv2(d.root, d.gldv2_list)
    elif d.format == "folders":
        images = read_class_folders(d.root)
    else:
        images = read_csv_labels(d.csv, d.root or None)
    if d.val_list:
        train_idx, val_idx = split_by_list(images, read_id_list(d.val_list))
    else:
        train_idx, val_idx = split_per_class(images.labels, d.val_fraction, d.split_seed)
    train, val = images.subset(train_idx), images.subset(val_idx) if len(val_idx) else None
    if d.check_files:
        train, missing = train.existing()
        if val is not None:
            val, missing_val = val.existing()
            missing += missing_val
        if missing:
            log.warning(
                "%d listed image(s) do not exist and are left out, e.g. %s",
                len(missing),
                ", ".join(missing[:3]),
            )
    if len(train) == 0:
        raise FileNotFoundError(f"no training images found for data.format={d.format} root={d.root!r}")
    return TrainData(train, val if val is not None and len(val) else None)


def load_local_sets_data(cfg: TrainConfig) -> TrainData:
    """Read a ``local_sets`` folder, split it like images (list or seeded per-class split), drop empty sets.

    As for missing images, the split is made on every listed item before empty ones are dropped.
    """
    d = cfg.data
    if not d.root:
        raise ConfigError(
            "data.root is empty: give the folder written by `tokenret extract-local` (data.root=PATH)"
        )
    sets = read_local_sets(d.root)
    if d.val_list:
        train_idx, val_idx = split_sets_by_list(sets, read_id_list(d.val_list))
    else:
        train_idx, val_idx = split_per_class(sets.labels, d.val_fraction, d.split_seed)
    train, dropped = drop_empty_sets(sets.subset(train_idx))
    val, dropped_val = drop_empty_sets(sets.subset(val_idx))
    if dropped or dropped_val:
        log.warning(
            "%d of %d set(s) have no descriptor (unreadable images?) and are left out (%d training, "
            "%d validation)",
            dropped + dropped_val,
            len(sets),
            dropped,
            dropped_val,
        )
    if len(train) == 0:
        raise FileNotFoundError(f"no training set with descriptors in {d.root}")
    return TrainData(train, val if len(val) else None)


def build_train_dataset(
    cfg: TrainConfig, train: LabelledImages | LabelledSets
) -> LabelledImageDataset | LocalSetDataset:
    """The training dataset: augmented image crops, or sampled descriptor sets (seed ``cfg.train.seed``)."""
    d, seed = cfg.data, cfg.train.seed
    if isinstance(train, LabelledSets):
        return LocalSetDataset(train, d.set_size, d.set_keep, seed=seed)
    transform = TrainTransform(
        d.image_size, d.crop_scale, d.crop_ratio, d.hflip, d.color_jitter, d.color_jitter_p
    )
    return LabelledImageDataset(train, transform, seed=seed)


def inputs_to_device(
    inputs: Inputs,
    device: torch.device,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    non_blocking: bool = False,
) -> Inputs:
    """Move a batch's inputs to ``device``: floating tensors to ``dtype`` (None: kept), 4-D ones to
    ``memory_format``."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs_to_device(t, device, dtype, memory_format, non_blocking) for t in inputs)
    if inputs.is_floating_point() and dtype is not None:
        inputs = inputs.to(device, dtype=dtype, non_blocking=non_blocking)
    else:
        inputs = inputs.to(device, non_blocking=non_blocking)
    return inputs.contiguous(memory_format=memory_format) if inputs.ndim == 4 else inputs
