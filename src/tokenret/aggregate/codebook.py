"""Visual-word codebook: faiss k-means on local descriptors, exact L2 assignment to the m nearest words.

Training follows ASMK's Python code as used by HOW: ``faiss.Clustering(d, K)`` with 10 iterations and
faiss's other defaults (one run, not spherical, at most 256 points per centroid, so faiss itself
sub-samples ``K * 256`` of the input with its seed). Assignment is an exact k-NN search on a flat L2
index of the centroids. Centroids are kept as a (K, d) float32 array and saved as ``.npy``.

Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    >>> codebook = Codebook.train(x, size=16, seed=0)
    >>> codebook.quantize(x[:2], m=3).shape
    (2, 3)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: HOW / ASMK's codebook size ("64k").
DEFAULT_CODEBOOK_SIZE = 65536
#: k-means iterations used by ASMK's Python code.
DEFAULT_NITER = 10
#: faiss's default k-means seed.
DEFAULT_SEED = 1234
#: faiss sub-samples the training set to this many points per centroid.
MAX_POINTS_PER_CENTROID = 256
#: Below this many points per centroid faiss warns that k-means is poorly conditioned.
MIN_POINTS_PER_CENTROID = 39


def _import_faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the visual-word codebook needs faiss: pip install faiss-cpu (or faiss-gpu)") from e
    return faiss


def _as_descriptors(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, d)"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the descriptor extraction")
    return arr


class Codebook:
    """K visual words (centroids) in R^d with exact L2 nearest-word assignment.

    Args:
        centroids: (K, d) array of visual words.
    """

    def __init__(self, centroids: np.ndarray) -> None:
        c = _as_descriptors(centroids, "centroids")
        if len(c) == 0:
            raise ValueError("a codebook needs at least one centroid")
        self.centroids = c
        self._index = None

    @property
    def size(self) -> int:
        """Number of visual words K."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Codebook(size={self.size}, dim={self.dim})"

    @classmethod
    def train(
        cls,
        descriptors: np.ndarray,
        size: int = DEFAULT_CODEBOOK_SIZE,
        *,
        niter: int = DEFAULT_NITER,
        seed: int = DEFAULT_SEED,
        max_descriptors: int | None = None,
        nredo: int = 1,
        verbose: bool = False,
    ) -> Codebook:
        """Learn ``size`` words by faiss k-means.

        Args:
            descriptors: (n, d) training descriptors, n >= size.
            size: number of visual words K (HOW / ASMK: 65536).
            niter: k-means iterations (ASMK: 10).
            seed: seeds both our optional sub-sampling and faiss (initial centroids and its own
                sub-sampling to ``size * 256`` points).
            max_descriptors: if set, first draw this many descriptors at random (without replacement).
            nredo: k-means runs from different random starts, the one of lowest error kept (ASMK: 1).
            verbose: let faiss print its progress.

        Raises:
            ValueError: fewer descriptors than words.
        """
        x = _as_descriptors(descriptors, "descriptors")
        size = int(size)
        if size < 1:
            raise ValueError(f"codebook size must be >= 1, got {size}")
        if max_descriptors is not None and len(x) > max_descriptors:
            rng = np.random.default_rng(seed)
            x = x[np.sort(rng.choice(len(x), size=int(max_descriptors), replace=False))]
        if len(x) < size:
            raise ValueError(
                f"k-means with {size} visual words needs at least {size} training descriptors, got {len(x)} "
                f"(ideally >= {MIN_POINTS_PER_CENTROID * size}); extract descriptors from more images or "
                "choose a smaller codebook"
            )
        if len(x) < MIN_POINTS_PER_CENTROID * size:
            log.warning(
                "training %d visual words on only %d descriptors (< %d per word): the codebook will be noisy",
                size,
                len(x),
                MIN_POINTS_PER_CENTROID,
            )
        faiss = _import_faiss()
        clustering = faiss.Clustering(x.shape[1], size)
        clustering.niter = int(niter)
        clustering.seed = int(seed)
        clustering.nredo = int(nredo)
        clustering.verbose = bool(verbose)
        clustering.max_points_per_centroid = MAX_POINTS_PER_CENTROID
        index = faiss.IndexFlatL2(x.shape[1])
        clustering.train(x, index)
        centroids = faiss.vector_to_array(clustering.centroids).reshape(size, x.shape[1])
        return cls(centroids)

    def _flat_index(self):
        if self._index is None:
            faiss = _import_faiss()
            self._index = faiss.IndexFlatL2(self.dim)
            self._index.add(self.centroids)
        return self._index

    def quantize(
        self, descriptors: np.ndarray, m: int = 1, *, return_distances: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Ids of the ``m`` nearest words of each descriptor (exact squared L2), nearest first.

        Args:
            descriptors: (n, d).
            m: multiple assignment (HOW / ASMK: 1 for database images, 5 for queries); at most K.
            return_distances: also return the (n, m) squared L2 distances.

        Returns:
            (n, m) int64 word ids, and the distances if asked.
        """
        x = _as_descriptors(descriptors, "descriptors", self.dim)
        m = int(m)
        if not 1 <= m <= self.size:
            raise ValueError(f"multiple assignment m must be in 1..{self.size} (codebook size), got {m}")
        if len(x) == 0:
            words, dist = np.empty((0, m), np.int64), np.empty((0, m), np.float32)
        else:
            dist, words = self._flat_index().search(x, m)
            words = words.astype(np.int64, copy=False)
        return (words, dist) if return_distances else words

    def save(self, path: str | os.PathLike) -> Path:
        """Write the centroids as a (K, d) float32 ``.npy`` file (through a temporary name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.centroids, allow_pickle=False)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Codebook:
        """Read centroids written by :meth:`save` (any (K, d) float ``.npy``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"codebook not found: {path} (train one with Codebook.train(...).save)")
        try:
            centroids = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: not a codebook .npy file ({e})") from None
        if centroids.ndim != 2 or not np.issubdtype(centroids.dtype, np.floating):
            raise ValueError(
                f"{path}: expected a (K, d) float array, found {centroids.dtype} {centroids.shape}"
            )
        return cls(centroids)


__all__ = ["Codebook", "DEFAULT_CODEBOOK_SIZE", "DEFAULT_NITER", "DEFAULT_SEED"]
