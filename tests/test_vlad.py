"""VLAD against its closed form, the VLAD / ASMK identity, PCA, and search through ExactIndex
(spec local-features.md section 3 and section 6 item 9)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenret.aggregate.asmk import AsmkIndex, aggregate_residuals, asmk_similarity
from tokenret.aggregate.codebook import Codebook
from tokenret.aggregate.vlad import VladEncoder, VladPCA, vlad
from tokenret.index import ExactIndex


def codebook_and_sets(k=8, d=6, n_sets=5, seed=0):
    rng = np.random.default_rng(seed)
    codebook = Codebook(rng.standard_normal((k, d)).astype(np.float32))
    sets = [rng.standard_normal((int(rng.integers(5, 30)), d)).astype(np.float32) for _ in range(n_sets)]
    return codebook, sets


def closed_form_blocks(x, centroids, m=1):
    """Block w = sum of (x - c_w) over descriptors with w among their m nearest words (loops, float64)."""
    k, d = centroids.shape
    blocks = np.zeros((k, d))
    for xi in x.astype(np.float64):
        dist = ((xi - centroids) ** 2).sum(1)
        for w in np.argsort(dist, kind="stable")[:m]:
            blocks[w] += xi - centroids[w]
    return blocks


@pytest.mark.parametrize("m", [1, 3])
def test_vlad_blocks_are_residual_sums_and_unit_length(m):
    codebook, sets = codebook_and_sets()
    x = sets[0]
    v = vlad(x, codebook, m=m)
    assert v.shape == (8 * 6,) and v.dtype == np.float32
    blocks = closed_form_blocks(x, codebook.centroids, m)
    np.testing.assert_allclose(v, blocks.ravel() / np.linalg.norm(blocks), rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-6)
    perm = np.random.default_rng(1).permutation(len(x))
    np.testing.assert_allclose(vlad(x[perm], codebook, m=m), v, rtol=1e-5, atol=1e-6)


def test_power_and_intra_normalisation_closed_form():
    codebook, sets = codebook_and_sets(seed=2)
    x = sets[1]
    blocks = closed_form_blocks(x, codebook.centroids)
    powered = np.sign(blocks) * np.abs(blocks) ** 0.5
    norms = np.linalg.norm(powered, axis=1, keepdims=True)
    intra = np.divide(powered, norms, out=np.zeros_like(powered), where=norms > 0)
    expected = intra.ravel() / np.linalg.norm(intra)
    np.testing.assert_allclose(
        vlad(x, codebook, power=0.5, intra_normalize=True), expected, rtol=1e-5, atol=1e-6
    )
    only_power = powered.ravel() / np.linalg.norm(powered)
    np.testing.assert_allclose(vlad(x, codebook, power=0.5), only_power, rtol=1e-5, atol=1e-6)
    assert not vlad(np.empty((0, 6), np.float32), codebook).any()  # empty set: zeros, no NaN


def test_intra_normalised_vlad_dot_equals_nonbinary_asmk_alpha1():
    codebook, sets = codebook_and_sets(k=12, d=8, n_sets=6, seed=3)
    encoder = VladEncoder(codebook, intra_normalize=True)
    vectors = encoder.encode_many(sets)
    index = AsmkIndex(
        codebook,
        binary=False,
        alpha=1.0,
        tau=-np.inf,
        use_idf=False,
        query_assignment=1,
        database_assignment=1,
    )
    index.add(sets[1:])
    asmk_scores = index.score_all(sets[0])
    np.testing.assert_allclose(vectors[1:] @ vectors[0], asmk_scores, rtol=1e-4, atol=1e-6)
    q = aggregate_residuals(sets[0], codebook, 1, binary=False)
    for j, x in enumerate(sets[1:]):
        d = aggregate_residuals(x, codebook, 1, binary=False)
        assert asmk_similarity(q, d, alpha=1.0, tau=-np.inf) == pytest.approx(
            float(vectors[0] @ vectors[j + 1]), rel=1e-4, abs=1e-6
        )


def test_vlad_vectors_search_through_exact_index():
    codebook, sets = codebook_and_sets(k=8, d=16, n_sets=20, seed=4)
    encoder = VladEncoder(codebook, power=0.5)
    db = encoder.encode_many(sets)
    index = ExactIndex(encoder.dim)
    index.add(db, ids=np.arange(20) + 50)
    scores, found = index.search(db[:3], k=5)
    ref = db[:3] @ db.astype(np.float16).astype(np.float32).T
    np.testing.assert_allclose(scores, np.sort(ref, axis=1)[:, ::-1][:, :5], rtol=1e-3, atol=1e-3)
    assert found[:, 0].tolist() == [50, 51, 52]


def test_pca_reduces_whitens_and_round_trips(tmp_path):
    codebook, sets = codebook_and_sets(k=4, d=8, n_sets=60, seed=5)
    encoder = VladEncoder(codebook, intra_normalize=True)
    raw = encoder.encode_many(sets)
    pca = encoder.fit_pca(sets, dim=10, whiten=True)
    assert encoder.dim == 10 and pca.input_dim == 32
    reduced = encoder.encode_many(sets)
    assert reduced.shape == (60, 10)
    np.testing.assert_allclose(np.linalg.norm(reduced, axis=1), 1.0, rtol=1e-5)
    # before the final L2 the whitened training projections have identity covariance
    projected = (raw - pca.mean) @ pca.projection.T
    np.testing.assert_allclose(np.cov(projected.T, bias=True), np.eye(10), atol=1e-3)
    np.testing.assert_allclose(encoder.encode(sets[0]), reduced[0], rtol=1e-5, atol=1e-6)
    path = pca.save(tmp_path / "pca.npz")
    loaded = VladPCA.load(path)
    np.testing.assert_array_equal(loaded.apply(raw), pca.apply(raw))
    with pytest.raises(ValueError, match="dim <= min"):
        VladPCA.fit(raw[:5], dim=10)
