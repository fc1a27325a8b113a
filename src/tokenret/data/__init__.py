"""Datasets and image loading: Revisited Oxford/Paris and R1M (revisited.py), robust image I/O (images.py)."""

from tokenret.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    ImageTooLargeError,
    load_image,
    thumbnail,
    thumbnail_size,
    to_rgb,
    to_tensor,
)
from tokenret.data.revisited import (
    DATASET_NAMES,
    GroundTruthError,
    R1MDistractors,
    RevisitedDataset,
    load_ground_truth_pickle,
)

__all__ = [
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "GroundTruthError",
    "ImageLoadError",
    "ImageTooLargeError",
    "R1MDistractors",
    "RevisitedDataset",
    "load_ground_truth_pickle",
    "load_image",
    "thumbnail",
    "thumbnail_size",
    "to_rgb",
    "to_tensor",
]
