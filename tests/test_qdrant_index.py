"""QdrantIndex: tokenret's index interface over a Qdrant collection, tested in Qdrant's local mode (the same
client API as a cluster, run in-process: no server is needed, none is reachable from CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenret.index import ExactIndex, IndexFormatError, load_index, make_index

pytest.importorskip("qdrant_client", reason="optional dependency qdrant-client (installed by .ci/run)")

from tokenret.index.qdrant_index import QdrantIndex  # noqa: E402


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, dim))
    x = centres[rng.integers(0, 8, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_same_ranking_as_exact_search_and_brute_force():
    x = _clustered(300, 24)
    ids = np.arange(1000, 1300, dtype=np.int64)[::-1].copy()  # ids unrelated to storage order
    q = _clustered(7, 24, seed=1)
    qd = QdrantIndex(24, location=":memory:")
    assert qd.add(x, ids).tolist() == ids.tolist() and qd.ntotal == 300
    s, i = qd.search(q, 20)
    brute = q.astype(np.float64) @ x.T.astype(np.float64)  # the independent computation: every score
    order = np.argsort(-brute, axis=1, kind="stable")[:, :20]
    np.testing.assert_array_equal(i, ids[order])
    np.testing.assert_allclose(s, np.take_along_axis(brute, order, 1), atol=1e-5)
    exact = ExactIndex(24)  # float16 storage: the same neighbours, scores to float16 rounding
    exact.add(x, ids)
    es, ei = exact.search(q, 5)
    np.testing.assert_array_equal(i[:, :5], ei)
    s1, i1 = qd.search(q[3], 5)  # one (dim,) query is a batch of one
    np.testing.assert_array_equal(i1, i[3:4, :5])


def test_padding_ids_removal_and_numbering():
    x = _clustered(10, 8)
    index = make_index("qdrant", 8, location=":memory:", collection="photos")
    assert isinstance(index, QdrantIndex)
    assert index.add(x[:4]).tolist() == [0, 1, 2, 3]  # numbered from max(id) + 1
    index.add(x[4:6], np.array([40, 41]))
    assert index.add(x[6:8]).tolist() == [42, 43]
    with pytest.raises(ValueError, match="unique"):
        index.add(x[8:9], np.array([41]))  # already in the collection
    with pytest.raises(ValueError, match="unique"):
        index.add(x[8:10], np.array([7, 7]))
    with pytest.raises(ValueError, match=">= 0"):
        index.add(x[8:9], np.array([-3]))
    assert index.remove(np.array([1, 41, 41, 999])) == 2  # unknown ids ignored, repeats counted once
    assert index.ntotal == 6
    s, i = index.search(x[1], 10)
    assert 1 not in i and 41 not in i
    assert i[0, 6:].tolist() == [-1] * 4 and np.isneginf(s[0, 6:]).all()  # padded past the 6 left
    assert (np.diff(s[0, :6]) <= 0).all()
    with pytest.raises(ValueError, match="dimension|shape|columns"):
        index.search(np.zeros((1, 9), np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(x[:1], 0)


def test_save_and_load_reconnect_to_the_local_folder(tmp_path, monkeypatch):
    x = _clustered(50, 16)
    monkeypatch.setenv("QDRANT_API_KEY", "secret-key-123")
    index = QdrantIndex(16, "landmarks", path=tmp_path / "qdrant", exact=True)
    index.add(x[:40], np.arange(100, 140))
    want = index.search(x[40:], 5)
    index.save(tmp_path / "saved")
    index.close()  # local mode: one client per folder at a time
    header = json.loads((tmp_path / "saved" / "index.json").read_text())
    assert header["kind"] == "qdrant" and header["collection"] == "landmarks" and header["ntotal"] == 40
    assert "secret-key-123" not in json.dumps(header)  # keys come from the environment, never from disk
    loaded = load_index(tmp_path / "saved")
    assert isinstance(loaded, QdrantIndex) and loaded.exact and loaded.ntotal == 40
    got = loaded.search(x[40:], 5)
    np.testing.assert_array_equal(got[1], want[1])
    assert loaded.add(x[40:41]).tolist() == [140]  # numbering continues after reopening
    loaded.close()


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="exactly one of url"):
        QdrantIndex(8)
    with pytest.raises(ValueError, match="exactly one of url"):
        QdrantIndex(8, location=":memory:", path=tmp_path)
    memory = QdrantIndex(8, location=":memory:")
    with pytest.raises(ValueError, match="cannot be saved"):
        memory.save(tmp_path / "x")
    first = QdrantIndex(8, "shared", path=tmp_path / "q")
    first.close()
    with pytest.raises(IndexFormatError, match="holds 8-d vectors.*needs 12-d"):
        QdrantIndex(12, "shared", path=tmp_path / "q")


def test_an_unreachable_server_is_named():
    with pytest.raises(ConnectionError, match=r"cannot use Qdrant at http://127\.0\.0\.1:9 .*server running"):
        QdrantIndex(8, url="http://127.0.0.1:9", timeout=2)  # nothing listens on the discard port


def test_a_local_folder_in_use_is_named(tmp_path):
    first = QdrantIndex(8, path=tmp_path / "q")
    try:
        with pytest.raises(ConnectionError, match=r"local folder .* is in use by another client.*server"):
            QdrantIndex(8, path=tmp_path / "q")
    finally:
        first.close()
    QdrantIndex(8, path=tmp_path / "q").close()  # free again once the first lets go


def test_missing_client_gives_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_qdrant(name, *args, **kwargs):
        if name.startswith("qdrant_client"):
            raise ImportError("No module named 'qdrant_client'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_qdrant)
    with pytest.raises(ImportError, match="pip install qdrant-client"):
        QdrantIndex(8, location=":memory:")
