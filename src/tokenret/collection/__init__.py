"""The folder index: a searchable, incrementally updated index of a folder of images.

It binds one model and its extraction settings to a catalogue (SQLite + float16 vector file) and to a
vector index from :mod:`tokenret.index` (exact, FAISS or Qdrant), and answers searches by image.

Example:
    >>> from tokenret.collection import ImageIndex
    >>> index = ImageIndex.create("photos.idx", model, checkpoint="R101-Token.pth")       # doctest: +SKIP
    >>> index.sync("photos/", model)                                                       # doctest: +SKIP
"""

from tokenret.collection.ann import default_qdrant_collection, qdrant_target
from tokenret.collection.binding import ModelBinding
from tokenret.collection.catalogue import IndexDamagedError, IndexMismatchError
from tokenret.collection.duplicates import find_duplicate_groups
from tokenret.collection.facade import ImageIndex, SearchHit
from tokenret.collection.lock import IndexLockedError
from tokenret.collection.recall import sampled_recall
from tokenret.data.files import IMAGE_EXTENSIONS, find_images

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageIndex",
    "IndexDamagedError",
    "IndexLockedError",
    "IndexMismatchError",
    "ModelBinding",
    "SearchHit",
    "default_qdrant_collection",
    "find_duplicate_groups",
    "find_images",
    "qdrant_target",
    "sampled_recall",
]
