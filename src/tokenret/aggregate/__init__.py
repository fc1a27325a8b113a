"""Aggregation of local descriptors: visual-word codebook, ASMK / ASMK* with an inverted file, VLAD.

The Token aggregator itself lives in :mod:`tokenret.models.token` (``TokenHead.forward_set``);
:mod:`tokenret.data.local_store` keeps variable-size descriptor sets and pads them into batches for it.

Example:
    >>> import numpy as np
    >>> from tokenret.aggregate import AsmkIndex, Codebook
    >>> rng = np.random.default_rng(0)
    >>> train = rng.standard_normal((2000, 16)).astype(np.float32)
    >>> codebook = Codebook.train(train, size=32, seed=0)
    >>> index = AsmkIndex(codebook, binary=False)
    >>> sets = [rng.standard_normal((50, 16)).astype(np.float32) for _ in range(5)]
    >>> ids = index.add(sets)
    >>> scores, found = index.search(sets[:2], k=3)
    >>> found[:, 0].tolist()
    [0, 1]
"""

from tokenret.aggregate.asmk import AggregatedSet, AsmkIndex, aggregate_residuals, asmk_similarity
from tokenret.aggregate.codebook import Codebook
from tokenret.aggregate.vlad import VladEncoder, VladPCA, vlad
from tokenret.data.local_store import LocalDescriptorStore, pad_sets

__all__ = [
    "AggregatedSet",
    "AsmkIndex",
    "Codebook",
    "LocalDescriptorStore",
    "VladEncoder",
    "VladPCA",
    "aggregate_residuals",
    "asmk_similarity",
    "pad_sets",
    "vlad",
]
