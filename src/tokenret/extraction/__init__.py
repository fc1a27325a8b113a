"""The extraction engine: images in, descriptors out, for every command that reads images.

- :mod:`~tokenret.extraction.image_list`: the images of a run (loading, query crops, failures, batching);
- :mod:`~tokenret.extraction.streams`: device, CPU streams, autocast, torchrun rank;
- :mod:`~tokenret.extraction.network`: inference copies of a model and the cache of the last one;
- :mod:`~tokenret.extraction.shards`: sharded, resumable stores;
- :mod:`~tokenret.extraction.descriptors`: multi-scale global descriptors (:func:`extract_descriptors`);
- :mod:`~tokenret.extraction.multiscale`: resizing to a test scale and combining the scales;
- :mod:`~tokenret.extraction.local_sets`: local descriptor sets (:func:`extract_local_sets`).

Example:
    >>> from tokenret.extraction import ExtractionConfig, extract_descriptors
    >>> model = tokenret.create_model("token_r101", checkpoint="R101-Token.pth")      # doctest: +SKIP
    >>> extract_descriptors(model, ["a.jpg"], config=ExtractionConfig()).descriptors.shape  # doctest: +SKIP
    (1, 1024)
"""

from tokenret.extraction.descriptors import (
    RELEASE_SCALES,
    ExtractionConfig,
    ExtractionResult,
    extract_descriptors,
    inference_network,
    model_fingerprint,
)
from tokenret.extraction.image_list import Box, ExtractionError, ImageList
from tokenret.extraction.local_sets import (
    LocalExtractionConfig,
    LocalExtractionResult,
    extract_local_sets,
    normalisation,
)
from tokenret.extraction.multiscale import combine_scales, multiscale_descriptor, resize_to_scale
from tokenret.extraction.shards import ShardStore
from tokenret.extraction.streams import resolve_device

__all__ = [
    "RELEASE_SCALES",
    "Box",
    "ExtractionConfig",
    "ExtractionError",
    "ExtractionResult",
    "ImageList",
    "LocalExtractionConfig",
    "LocalExtractionResult",
    "ShardStore",
    "combine_scales",
    "extract_descriptors",
    "extract_local_sets",
    "inference_network",
    "model_fingerprint",
    "multiscale_descriptor",
    "normalisation",
    "resize_to_scale",
    "resolve_device",
]
