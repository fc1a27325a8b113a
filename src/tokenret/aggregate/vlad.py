"""VLAD: one K*d vector per image from its local descriptors and a (small) visual-word codebook.

    v_w = sum over descriptors x with w among NN_m(x) of (x - c_w)        (block w, d values)
    v   = [v_1, ..., v_K]

then, each optional and in this order: signed power normalisation ``sign(v) |v|^beta`` (Jegou et al.,
TPAMI 2012; beta 0.5), intra-normalisation (each block L2-normalised; Arandjelovic and Zisserman,
CVPR 2013), and always a final global L2 normalisation. Images are compared by dot product, so the
vectors go straight into :class:`tokenret.index.ExactIndex` (or any VectorIndex); :class:`VladPCA`
reduces K*d to a smaller dimension first when wanted.

With intra-normalisation, m = 1 and no power step, ``vlad(X) . vlad(Y)`` equals non-binary ASMK with
alpha 1, no threshold and no IDF on the same codebook (both reduce to the sum over shared words of
unit residual dot products divided by sqrt(|W_X| |W_Y|)).

Example:
    >>> import numpy as np
    >>> from tokenret.aggregate import Codebook, VladEncoder
    >>> from tokenret.index import ExactIndex
    >>> rng = np.random.default_rng(0)
    >>> codebook = Codebook.train(rng.standard_normal((2000, 16)).astype(np.float32), size=8, seed=0)
    >>> encoder = VladEncoder(codebook, intra_normalize=True)
    >>> db = encoder.encode_many([rng.standard_normal((40, 16)).astype(np.float32) for _ in range(4)])
    >>> index = ExactIndex(encoder.dim)
    >>> ids = index.add(db)
    >>> index.search(db[:1], k=1)[1].tolist()
    [[0]]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tokenret.aggregate.codebook import Codebook

_EPS = 1e-12


def vlad(
    descriptors: np.ndarray,
    codebook: Codebook,
    *,
    m: int = 1,
    power: float | None = None,
    intra_normalize: bool = False,
) -> np.ndarray:
    """VLAD vector (K*d,) float32 of one image; all zeros for an empty set.

    Args:
        descriptors: (n, d) local descriptors.
        codebook: K visual words.
        m: each descriptor adds its residual to its m nearest words (1 = hard assignment).
        power: exponent of the signed power normalisation (e.g. 0.5), None for none.
        intra_normalize: L2-normalise each word's block before the global normalisation.
    """
    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != codebook.dim:
        raise ValueError(f"descriptors must have shape (n, {codebook.dim}), got {x.shape}")
    k, d = codebook.size, codebook.dim
    blocks = np.zeros((k, d), np.float64)
    if len(x):
        words = codebook.quantize(x, m).reshape(-1)
        residuals = np.repeat(x, m, axis=0).astype(np.float64) - codebook.centroids[words]
        np.add.at(blocks, words, residuals)
    if power is not None:
        blocks = np.sign(blocks) * np.abs(blocks) ** float(power)
    if intra_normalize:
        norms = np.linalg.norm(blocks, axis=1, keepdims=True)
        blocks = np.divide(blocks, norms, out=np.zeros_like(blocks), where=norms > _EPS)
    v = blocks.reshape(-1)
    norm = np.linalg.norm(v)
    if norm > _EPS:
        v = v / norm
    return v.astype(np.float32)


class VladEncoder:
    """VLAD with fixed settings over one codebook, optionally followed by a learned :class:`VladPCA`.

    Args:
        codebook: K visual words (VLAD uses small K, typically 16..256).
        assignment: m nearest words per descriptor.
        power: signed power normalisation exponent, or None.
        intra_normalize: per-word L2 normalisation.
        pca: optional reduction applied after normalisation (output re-normalised to unit length).
    """

    def __init__(
        self,
        codebook: Codebook,
        *,
        assignment: int = 1,
        power: float | None = None,
        intra_normalize: bool = False,
        pca: VladPCA | None = None,
    ) -> None:
        self.codebook = codebook
        self.assignment = int(assignment)
        self.power = power
        self.intra_normalize = bool(intra_normalize)
        if pca is not None and pca.input_dim != codebook.size * codebook.dim:
            raise ValueError(
                f"PCA expects {pca.input_dim}-d input, VLAD gives {codebook.size * codebook.dim}"
            )
        self.pca = pca

    @property
    def raw_dim(self) -> int:
        return self.codebook.size * self.codebook.dim

    @property
    def dim(self) -> int:
        """Output dimension (K*d, or the PCA's)."""
        return self.pca.dim if self.pca is not None else self.raw_dim

    def encode_raw(self, descriptors: np.ndarray) -> np.ndarray:
        return vlad(
            descriptors,
            self.codebook,
            m=self.assignment,
            power=self.power,
            intra_normalize=self.intra_normalize,
        )

    def encode(self, descriptors: np.ndarray) -> np.ndarray:
        """(n, d) descriptors of one image -> (dim,) unit vector (zeros for an empty set)."""
        v = self.encode_raw(descriptors)
        return v if self.pca is None else self.pca.apply(v[None])[0]

    def encode_many(self, descriptor_sets: Sequence[np.ndarray]) -> np.ndarray:
        """One (dim,) vector per set, stacked (len(sets), dim) float32."""
        raw = np.stack([self.encode_raw(s) for s in descriptor_sets]) if len(descriptor_sets) else None
        if raw is None:
            return np.empty((0, self.dim), np.float32)
        return raw if self.pca is None else self.pca.apply(raw)

    def fit_pca(self, descriptor_sets: Sequence[np.ndarray], dim: int, *, whiten: bool = False) -> VladPCA:
        """Learn a PCA on the VLAD vectors of these (training) sets and use it from now on."""
        self.pca = None
        self.pca = VladPCA.fit(self.encode_many(descriptor_sets), dim, whiten=whiten)
        return self.pca


class VladPCA:
    """PCA (optionally whitening) to ``dim`` dimensions, then L2 normalisation.

    ``y = l2n(P (v - mean))`` with P the top ``dim`` principal directions (rows), divided by
    sqrt(eigenvalue) when whitening.
    """

    def __init__(self, mean: np.ndarray, projection: np.ndarray) -> None:
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.projection = np.asarray(projection, np.float32)
        if self.projection.ndim != 2 or self.projection.shape[1] != len(self.mean):
            raise ValueError(f"projection must be (dim, {len(self.mean)}), got {self.projection.shape}")

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def input_dim(self) -> int:
        return int(self.projection.shape[1])

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int, *, whiten: bool = False) -> VladPCA:
        """Learn from (n, D) training vectors; ``dim`` <= min(n, D)."""
        x = np.asarray(vectors, np.float64)
        n, big_d = x.shape
        if not 1 <= dim <= min(n, big_d):
            raise ValueError(f"PCA to {dim} dimensions needs dim <= min(n={n}, D={big_d})")
        mean = x.mean(axis=0)
        # SVD of the centred data: its right singular vectors are the covariance's eigenvectors
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        projection = vt[:dim]
        if whiten:
            eigenvalues = s[:dim] ** 2 / n
            projection = projection / np.sqrt(np.maximum(eigenvalues, 1e-12))[:, None]
        return cls(mean, projection)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        x = np.asarray(vectors, np.float32)
        y = (x - self.mean) @ self.projection.T
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        return np.divide(y, norms, out=np.zeros_like(y), where=norms > _EPS).astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, mean=self.mean, projection=self.projection)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> VladPCA:
        with np.load(Path(path), allow_pickle=False) as data:
            return cls(data["mean"], data["projection"])


__all__ = ["VladEncoder", "VladPCA", "vlad"]
