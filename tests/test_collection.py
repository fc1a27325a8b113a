"""Searching your own images: index a folder of real photos, search it, keep it in sync."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tokenret
from tokenret.cli import main
from tokenret.collection import ImageIndex, IndexMismatchError, find_images, sampled_recall
from tokenret.collection import ann as col
from tokenret.collection.ann import AnnCache
from tokenret.collection.catalogue import Catalogue
from tokenret.models.checkpoints import save_checkpoint

TINY = {"backbone": "resnet18", "dim": 32, "num_heads": 4, "out_dim": 16}
RUNTIME = {"num_workers": 0}


def tiny_model(seed=0):
    import torch

    torch.manual_seed(seed)
    return tokenret.create_model("token_r50", **TINY)


@pytest.fixture
def photos(shared_data, tmp_path):
    """16 real Paris photos (4 landmarks) copied into a folder tree."""
    src = sorted((shared_data / "rparis6k_subset" / "jpg").glob("*.jpg"))
    chosen = []
    for lm in ("defense", "eiffel", "louvre", "moulinrouge"):
        chosen += [p for p in src if f"_{lm}_" in p.name][:4]
    root = tmp_path / "photos"
    for p in chosen:
        sub = root / p.name.split("_")[1]
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, sub / p.name)
    return root


def make_index(tmp_path, model, name="idx"):
    from tokenret.extraction import ExtractionConfig

    return ImageIndex.create(tmp_path / name, model, ExtractionConfig(max_size=64, scales=(1.0,)))


def test_each_indexed_photo_finds_itself_first(photos, tmp_path):
    model = tiny_model()
    with make_index(tmp_path, model) as index:
        counts = index.sync(photos, model, progress=False, **RUNTIME)
        assert counts == {"added": 16, "updated": 0, "unchanged": 0, "failed": 0, "removed": 0}
        paths = index.paths()
        hits = index.search_images(paths, model, k=3, **RUNTIME)
        for p, h in zip(paths, hits, strict=True):
            assert h[0].path == p and h[0].score == pytest.approx(1.0, abs=2e-3)
            assert h[0].score >= h[1].score >= h[2].score
        # Exact and FAISS-flat give the same ranking over the stored vectors.
        vecs, ids, rows = index.vectors()
        data = np.asarray(vecs[rows], dtype=np.float32)
        from tokenret.index import make_index as make_vector_index

        flat = make_vector_index("IDMap,Flat", index.dim)
        flat.add(data, ids)
        _, exact_ids = index.vector_index().search(data, 16)
        _, faiss_ids = flat.search(data, 16)
        np.testing.assert_array_equal(exact_ids[:, 0], faiss_ids[:, 0])
        assert (exact_ids == faiss_ids).mean() > 0.95  # identical up to float ties deep in the list


def test_incremental_add_change_remove(photos, tmp_path):
    model = tiny_model()
    with make_index(tmp_path, model) as index:
        index.sync(photos, model, progress=False, **RUNTIME)
        before = {h.path: h for h in index.search_images(index.paths()[:1], model, k=16, **RUNTIME)[0]}
        eiffel = sorted((photos / "eiffel").glob("*.jpg"))
        louvre = sorted((photos / "louvre").glob("*.jpg"))
        eiffel[0].unlink()  # deleted
        shutil.copy(louvre[0], eiffel[1])  # changed: now a louvre photo under an eiffel name
        import os

        os.utime(eiffel[1], ns=(1, 10**18))
        (photos / "new").mkdir()
        shutil.copy(louvre[1], photos / "new" / "copy_of_louvre.jpg")  # added
        counts = index.sync(photos, model, progress=False, **RUNTIME)
        assert counts == {"added": 1, "updated": 1, "unchanged": 14, "failed": 0, "removed": 1}
        assert len(index) == 16 and str(eiffel[0].resolve()) not in index.paths()
        hit = index.search_images([louvre[0]], model, k=2, **RUNTIME)[0]
        assert {h.path for h in hit} == {str(louvre[0].resolve()), str(eiffel[1].resolve())}
        assert hit[1].score == pytest.approx(1.0, abs=2e-3)
        again = index.sync(photos, model, progress=False, **RUNTIME)
        assert again["unchanged"] == 16 and again["added"] == again["updated"] == again["removed"] == 0
        index.compact()
        after = {h.path: h for h in index.search_images(index.paths()[:1], model, k=16, **RUNTIME)[0]}
        for p in set(before) & set(after) - {str(eiffel[1].resolve())}:
            assert after[p].score == pytest.approx(before[p].score, abs=1e-6)


def test_interrupted_indexing_resumes_to_the_same_index(photos, tmp_path, monkeypatch):
    model = tiny_model()
    with make_index(tmp_path, model, "full") as full:
        full.add_paths(find_images(photos), model, chunk=4, progress=False, **RUNTIME)
        full_vecs = {p: v for p, v in zip(full.paths(), _stored(full), strict=True)}
    real = Catalogue.store
    calls = []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with make_index(tmp_path, model, "resumed") as index:
        monkeypatch.setattr(Catalogue, "store", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            index.add_paths(find_images(photos), model, chunk=4, progress=False, **RUNTIME)
        assert len(index) == 8  # two chunks of four were committed
        monkeypatch.setattr(Catalogue, "store", real)
        counts = index.add_paths(find_images(photos), model, chunk=4, progress=False, **RUNTIME)
        assert counts["unchanged"] == 8 and counts["added"] == 8
        got = {p: v for p, v in zip(index.paths(), _stored(index), strict=True)}
    assert sorted(got) == sorted(full_vecs)
    for p in got:
        np.testing.assert_array_equal(got[p], full_vecs[p])


def _stored(index):
    vecs, ids, rows = index.vectors()
    order = {i: r for i, r in zip(ids, rows, strict=True)}
    id_of = dict(index.db.execute("SELECT path, id FROM images WHERE status='ok'"))
    return [np.asarray(vecs[order[id_of[p]]]) for p in index.paths()]


def test_unreadable_files_are_reported(photos, tmp_path, capsys):
    (photos / "broken.jpg").write_bytes((photos / "louvre").glob("*.jpg").__next__().read_bytes()[:300])
    (photos / "notes.png").write_text("not an image")
    (photos / "readme.txt").write_text("ignored: not an image extension")
    ckpt = save_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    out = tmp_path / "idx"
    argv = ["index", str(photos), "--out", str(out), "--model", "token_r50", "--checkpoint", str(ckpt)]
    assert main([*argv, "--max-size", "64", "--scales", "1", "--workers", "0", "--quiet"]) == 0
    assert "16 images searchable" in capsys.readouterr().out
    assert main(["index", str(out), "--report"]) == 0
    report = capsys.readouterr().out
    assert "16 searchable, 2 unreadable" in report
    assert f"unreadable: {(photos / 'broken.jpg').resolve()}" in report and "notes.png" in report
    assert "readme.txt" not in report


def test_cli_search_json_box_and_duplicates(photos, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    louvre = sorted((photos / "louvre").glob("*.jpg"))
    shutil.copy(louvre[0], photos / "dup.jpg")
    out = tmp_path / "idx"
    argv = ["index", str(photos), "--out", str(out), "--model", "token_r50", "--checkpoint", str(ckpt)]
    assert main([*argv, "--max-size", "64", "--scales", "1", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(out), str(louvre[0]), "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)[str(louvre[0].resolve())]
    assert {r["path"] for r in res[:2]} == {str(louvre[0].resolve()), str((photos / "dup.jpg").resolve())}
    assert (
        main(["search", str(out), str(photos / "louvre"), "-k", "2", "--csv", "--box", "10,10,200,150"]) == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "query,rank,path,score" and len(lines) == 1 + 4 * 2
    assert main(["duplicates", str(out), "--threshold", "0.999", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert groups == [sorted([str(louvre[0].resolve()), str((photos / "dup.jpg").resolve())])]


def test_queries_made_with_another_model_are_refused(photos, tmp_path):
    model = tiny_model()
    with make_index(tmp_path, model) as index:
        index.sync(photos / "eiffel", model, progress=False, **RUNTIME)
        with pytest.raises(IndexMismatchError, match="this model differs"):
            index.search_images(index.paths()[:1], tiny_model(seed=1), **RUNTIME)
        from tokenret.extraction import ExtractionConfig

        with pytest.raises(IndexMismatchError, match="extraction settings"):
            index.check_model(model, ExtractionConfig(max_size=128, scales=(1.0,)))


def test_show_writes_png_html_and_token_maps(photos, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    out = tmp_path / "idx"
    argv = ["index", str(photos), "--out", str(out), "--model", "token_r50", "--checkpoint", str(ckpt)]
    assert main([*argv, "--max-size", "64", "--scales", "1", "--workers", "0", "--quiet"]) == 0
    query = sorted((photos / "eiffel").glob("*.jpg"))[0]
    assert main(["show", str(out), str(query), "-k", "5", "--out", str(tmp_path / "show")]) == 0
    from PIL import Image

    # one row of query + 5 results, one row with the 4 token maps fitted into its cells
    png = Image.open(tmp_path / "show" / "results.png").convert("RGB")
    assert png.size == (6 * 200, 2 * 222)
    overlay = Image.open(tmp_path / "show" / "img" / "token0.jpg").convert("RGB")
    overlay.thumbnail((196, 196))
    x, y = (200 - overlay.width) // 2, 222 + (200 - overlay.height) // 2
    placed = png.crop((x, y, x + overlay.width, y + overlay.height))
    assert np.abs(np.asarray(placed, float) - np.asarray(overlay, float)).mean() < 4  # JPEG rounding
    page = (tmp_path / "show" / "index.html").read_text()
    assert page.count('<img src="img/token') == 4  # L = 4 tokens, one attention map each
    # each map is sized by its own figure, never wider than it (they overlapped their neighbours)
    assert (
        "figure img{display:block;max-width:100%;height:auto}" in page and "figure.map{width:400px}" in page
    )
    assert str(query.resolve()) in page  # the query finds itself
    assert all((tmp_path / "show" / "img" / f"token{j}.jpg").is_file() for j in range(4))


def test_attention_overlays_follow_the_tokenizer(photos):
    import torch

    from tokenret.viz import attention_overlays

    model = tiny_model()
    query = sorted((photos / "eiffel").glob("*.jpg"))[0]
    overlays = attention_overlays(model, query, max_size=128)
    assert len(overlays) == 4 and max(overlays[0].size) == 128
    from tokenret.data.images import load_image, to_tensor

    with torch.inference_mode():
        maps = model.attention_maps(to_tensor(load_image(query, 128))[None])
    torch.testing.assert_close(maps.sum(dim=1), torch.ones_like(maps[:, 0]))  # a soft assignment over tokens


def test_check_recall_compares_an_approximate_index_with_exact(photos, tmp_path, capsys):
    ckpt = save_checkpoint(tiny_model(), tmp_path / "tiny.pth")
    out = tmp_path / "idx"
    argv = ["index", str(photos), "--out", str(out), "--model", "token_r50", "--checkpoint", str(ckpt)]
    assert main([*argv, "--max-size", "64", "--scales", "1", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", str(out), "--check-recall", "--backend", "HNSW32", "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    # 16 vectors: HNSW's graph reaches all of them, so its top-5 equals exact search.
    assert res == {
        "spec": "HNSW32",
        "backend": "HNSW32",
        "refine": None,
        "k": 5,
        "n_queries": 16,
        "recall": 1.0,
    }
    with ImageIndex(out) as index:  # --backend is recorded: searches now use it
        assert index.backend == "HNSW32" and index.ann_status() == "current"


# -- approximate (FAISS) backends inside an ImageIndex ------------------------------------------------


def clustered_vectors(n, dim=16, clusters=20, spread=0.35, seed=0):
    """Unit vectors around random centres, like descriptors of photos of a few places."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vector_index(tmp_path, vectors, name="vidx", start=0):
    """An index (tiny model, 16-d) holding ``vectors`` for empty stand-in files img/00000.jpg, ..."""
    index = make_index(tmp_path, tiny_model(), name)
    add_vectors(index, tmp_path, vectors, start)
    return index


def add_vectors(index, tmp_path, vectors, start=0):
    folder = tmp_path / "img"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"{i:05d}.jpg" for i in range(start, start + len(vectors))]
    for p in paths:
        p.touch()
    return index.add_descriptors(paths, vectors)


def brute_force(index, queries, k):
    """Exact top-k ids and scores, computed independently with numpy from the stored float16 vectors."""
    vecs, ids, rows = index.vectors()
    data = np.asarray(vecs[rows], dtype=np.float64)
    scores = np.asarray(queries, np.float64) @ data.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


def test_faiss_flat_backend_ranks_like_exact(tmp_path):
    x = clustered_vectors(300)
    with vector_index(tmp_path, x) as index:
        assert index.backend == "auto" and index.backend_spec() == "exact" and index.ann_status() == "exact"
        assert index.set_backend("Flat") == "exact"  # make_index's name for exact search: no FAISS index
        assert not (index.path / col.ANN_DIR).exists()
        assert index.set_backend("IDMap,Flat") == "IDMap,Flat"  # FAISS's own brute force
        state = json.loads((index.path / col.ANN_DIR / col.ANN_STATE).read_text())
        assert state["spec"] == "IDMap,Flat" and state["n"] == 300 and state["rows"] == 300
        q = clustered_vectors(25, seed=1)
        scores, ids = index.knn(q, 10)
        want_ids, want_scores = brute_force(index, q, 10)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        hits = index.search(q[:1], 10)[0]
        assert [h.id for h in hits] == want_ids[0].tolist()
        assert hits[0].path == index.image_path(hits[0].id)


@pytest.mark.slow
def test_hnsw_backend_recall_against_exact(tmp_path):
    x = clustered_vectors(3000, clusters=30)
    with vector_index(tmp_path, x) as index:
        assert index.set_backend("HNSW32") == "HNSW32"
        ann = index.ann_index()
        assert ann.is_hnsw and ann.ntotal == 3000 and ann.efSearch == col.HNSW_EF_SEARCH
        q = clustered_vectors(200, clusters=30, seed=1)
        _, ids = index.knn(q, 10)
        want, _ = brute_force(index, q, 10)
        recall = np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), want.tolist(), strict=True)]
        )
        assert recall >= 0.9
        res = sampled_recall(index, k=10, n_queries=100)  # the configured backend, as searches run it
        assert res["spec"] == res["backend"] == "HNSW32" and res["recall"] >= 0.9


def test_stale_ann_index_is_never_searched_nor_rewritten_by_a_search(tmp_path, caplog):
    x = clustered_vectors(400)
    with vector_index(tmp_path, x) as writer, ImageIndex(writer.path) as reader:
        writer.set_backend("HNSW32")
        paths = writer.paths()
        assert [row[0].path for row in reader.search(x[:3], 1)] == paths[:3]  # reader caches the FAISS index
        built = json.loads((writer.path / "ann" / "state.json").read_text())
        # Removed by another handle (another process, as far as `reader` knows): reader must not use its
        # cached FAISS index any more, nor return the removed images.
        assert writer.remove_paths(paths[:50]) == 50
        assert writer.ann_status() == "stale"
        ann_files = {f.name: f.stat().st_mtime_ns for f in (writer.path / "ann").iterdir()}
        with caplog.at_level("WARNING", logger="tokenret.collection.ann"):
            hits = reader.search(x[:50], 5)
        assert "out of date" in caplog.text and "tokenret index" in caplog.text
        assert not {h.path for row in hits for h in row} & set(paths[:50])
        # a search never writes: it searched exactly, the saved index is as it was, still stale
        want_ids, _ = brute_force(reader, x[:50], 5)
        assert [[h.id for h in row] for row in hits] == want_ids.tolist()
        assert {f.name: f.stat().st_mtime_ns for f in (writer.path / "ann").iterdir()} == ann_files
        assert reader.ann_index() is None and writer.ann_status() == "stale"
        # the explicit step (what `tokenret index` runs) brings it up to date; the reader then uses it
        assert writer.update_ann()
        assert writer.ann_status() == "current" and reader.ann_index().ntotal == 350
        rebuilt = json.loads((writer.path / "ann" / "state.json").read_text())
        assert rebuilt["n"] == 350 and rebuilt["fingerprint"] != built["fingerprint"]
        # Additions rebuild it at their end; the reader finds the new images with no rebuild of its own.
        new = clustered_vectors(20, seed=5)
        assert add_vectors(writer, tmp_path, new, start=1000) == {"added": 20, "updated": 0}
        assert writer.ann_status() == "current"
        caplog.clear()
        with caplog.at_level("WARNING", logger="tokenret.collection.ann"):
            first = [row[0] for row in reader.search(new, 1)]
        assert caplog.text == ""
        assert [h.path for h in first] == [str(tmp_path / "img" / f"{i:05d}.jpg") for i in range(1000, 1020)]
        np.testing.assert_allclose([h.score for h in first], 1.0, atol=2e-3)


def test_backend_and_ann_index_survive_reopening(tmp_path, monkeypatch):
    x = clustered_vectors(300)
    with vector_index(tmp_path, x) as index:
        index.set_backend("HNSW16", refine=40)
        before = index.search(x[:5], 5)
    with ImageIndex(tmp_path / "vidx") as index:
        assert (index.backend, index.refine, index.ann_status()) == ("HNSW16", 40, "current")

        def no_rebuild(*args):
            raise AssertionError("the saved FAISS index should have been loaded, not rebuilt")

        monkeypatch.setattr(AnnCache, "build", no_rebuild)
        after = index.search(x[:5], 5)
        assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
        assert index.ann_index().ntotal == 300


def test_refine_rescores_candidates_exactly(tmp_path):
    x = clustered_vectors(1200, clusters=10)
    q = clustered_vectors(20, clusters=10, seed=3)
    with vector_index(tmp_path, x) as index:
        index.set_backend("IVF16,PQ4")  # 4-byte codes: approximate scores
        pq_scores, pq_ids = index.knn(q, 10)
        index.set_backend("IVF16,PQ4", refine=100)
        scores, ids = index.knn(q, 10)
        vecs, stored_ids, rows = index.vectors()
        vector_of = dict(zip(stored_ids.tolist(), np.asarray(vecs[rows], np.float64), strict=True))
        exact = np.array([[q[i] @ vector_of[j] for j in row] for i, row in enumerate(ids.tolist())])
        np.testing.assert_allclose(scores, exact, atol=1e-5)  # every returned score is the exact one
        assert np.all(np.diff(scores, axis=1) <= 0)
        pq_exact = np.array([[q[i] @ vector_of[j] for j in row] for i, row in enumerate(pq_ids.tolist())])
        assert np.abs(pq_scores - pq_exact).max() > 1e-3  # ...which PQ's own scores are not
        want, _ = brute_force(index, q, 10)
        assert np.mean([len(set(a) & set(b)) for a, b in zip(ids.tolist(), want.tolist(), strict=True)]) >= 9


def test_bad_backends_are_refused_and_leave_the_setting(tmp_path):
    with vector_index(tmp_path, clustered_vectors(100)) as index:
        index.set_backend("HNSW32")
        with pytest.raises(ValueError, match="NoSuchIndex"):
            index.set_backend("NoSuchIndex")
        with pytest.raises(ValueError, match="refine"):
            index.set_backend("exact", refine=10)
        with pytest.raises(
            ValueError, match="cannot build the approximate index 'IVF64,PQ4' over 100 images"
        ):
            index.set_backend("IVF64,PQ4")
        assert index.backend == "HNSW32" and index.ann_status() == "current"
        assert index.set_backend("exact") == "exact" and not (index.path / "ann").exists()


def test_ivf_index_is_updated_in_place_after_small_changes(tmp_path):
    """An IVF index is not retrained for a few changes: removed images leave it, new ones join it, and with
    every list probed (IVF16, nprobe 16: exact within the index) it ranks like brute force. Many changes
    rebuild it."""
    x = clustered_vectors(2000)
    with vector_index(tmp_path, x) as index:
        assert index.set_backend("IVF16,Flat") == "IVF16,Flat"
        built = json.loads((index.path / "ann" / "state.json").read_text())
        assert "updated" not in built
        paths = index.paths()
        removed = {int(i) for i in index.vectors()[1] if index.image_path(int(i)) in set(paths[:40])}
        assert len(removed) == 40 and index.remove_paths(paths[:40]) == 40
        add_vectors(index, tmp_path, clustered_vectors(60, seed=7), start=5000)  # 60 new images
        state = json.loads((index.path / "ann" / "state.json").read_text())
        assert state["built"] == built["built"] and "updated" in state  # updated, not rebuilt
        assert index.ann_status() == "current" and state["n"] == 2020
        ann = index.ann_index()
        assert ann.ntotal == 2020
        q = clustered_vectors(15, seed=8)
        scores, ids = index.knn(q, 10)
        want_ids, want_scores = brute_force(index, q, 10)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        assert not removed & set(ids.ravel().tolist())
        new = clustered_vectors(60, seed=7)
        first = [row[0].path for row in index.search(new[:5], 1)]  # the added images are found
        assert first == [str(tmp_path / "img" / f"{i:05d}.jpg") for i in range(5000, 5005)]
        # reopening finds the updated index current: no rebuild
        index.close()
    with ImageIndex(tmp_path / "vidx") as reopened:
        assert reopened.ann_status() == "current"
        # more than half of the collection changed: rebuilt (retrained) instead
        reopened.remove_paths(reopened.paths()[:1100])
        assert reopened.update_ann()
        state = json.loads((reopened.path / "ann" / "state.json").read_text())
        assert "updated" not in state and state["built"] > built["built"] and state["n"] == 920


def test_qdrant_backend_ranks_like_brute_force_and_follows_changes(tmp_path, monkeypatch):
    """A folder index searched through a Qdrant collection (local mode here; a cluster by URL elsewhere):
    the same ranking as brute force, removals and additions applied to the collection in place, a reopened
    index finds it current, and a rebuild empties the collection first."""
    pytest.importorskip("qdrant_client", reason="optional dependency qdrant-client (installed by .ci/run)")
    x = clustered_vectors(500)
    q = clustered_vectors(12, seed=4)
    target = tmp_path / "qdrant"
    with vector_index(tmp_path, x) as index:
        spec = index.set_backend(f"qdrant:{target}#photos")
        assert spec == f"qdrant:{target.resolve()}#photos" and index.ann_status() == "current"
        ids, scores = brute_force(index, q, 10)
        got_scores, got_ids = index.knn(q, 10)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_scores, scores, atol=1e-5)
        built = json.loads((index.path / "ann" / "state.json").read_text())
        paths = index.paths()
        removed = {int(i) for i in index.vectors()[1] if index.image_path(int(i)) in set(paths[:30])}
        assert len(removed) == 30 and index.remove_paths(paths[:30]) == 30
        add_vectors(index, tmp_path, clustered_vectors(25, seed=9), start=7000)
        state = json.loads((index.path / "ann" / "state.json").read_text())
        assert state["built"] == built["built"] and "updated" in state  # changed in place, not refilled
        assert index.ann_index().ntotal == 495
        ids, scores = brute_force(index, q, 10)
        got_scores, got_ids = index.knn(q, 10)
        np.testing.assert_array_equal(got_ids, ids)
        assert not removed & set(got_ids.ravel().tolist())
    with ImageIndex(tmp_path / "vidx") as reopened:
        assert reopened.backend == spec and reopened.ann_status() == "current"

        def no_rebuild(*args):
            raise AssertionError("the Qdrant collection should have been reused")

        monkeypatch.setattr(AnnCache, "build", no_rebuild)
        np.testing.assert_array_equal(reopened.knn(q, 10)[1], ids)
        monkeypatch.undo()
        (reopened.path / "ann" / "state.json").unlink()  # lost track of what it holds: refilled from scratch
    with ImageIndex(tmp_path / "vidx") as again:
        assert again.ann_status() == "missing"
        assert again.update_ann() and again.ann_index().ntotal == 495  # emptied first: no duplicates
        np.testing.assert_array_equal(again.knn(q, 10)[1], ids)
    with pytest.raises(ValueError, match="names its server or folder"):
        col.check_backend("qdrant:", None, 16)


def test_default_qdrant_collection_names_differ_per_index(tmp_path):
    a = col.default_qdrant_collection(tmp_path / "a" / "photos.idx")
    b = col.default_qdrant_collection(tmp_path / "b" / "photos.idx")
    assert a != b and a.startswith("tokenret_photos_idx_")
    assert col.qdrant_target("qdrant:https://q.example:6333#c1") == {
        "url": "https://q.example:6333",
        "path": None,
        "collection": "c1",
    }
    assert col.qdrant_target("HNSW32") is None


def test_cli_names_an_unreachable_qdrant_server_and_keeps_the_old_backend(tmp_path, capsys):
    pytest.importorskip("qdrant_client", reason="optional dependency qdrant-client (installed by .ci/run)")
    with vector_index(tmp_path, clustered_vectors(50)) as index:
        path = index.path
    rc = main(["index", str(path), "--backend", "qdrant:http://127.0.0.1:9#photos"])  # nothing listens there
    err = capsys.readouterr().err
    assert rc == 2 and "cannot use Qdrant at http://127.0.0.1:9" in err and "Traceback" not in err
    with ImageIndex(path) as index:
        assert index.backend == "auto" and index.ann_status() == "exact"
    # a local folder works, and the report names the collection in use
    assert main(["index", str(path), "--backend", f"qdrant:{tmp_path / 'qd'}"]) == 0
    capsys.readouterr()
    assert main(["index", str(path), "--report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["search"]["qdrant_collection"] == col.default_qdrant_collection(path)
    assert report["search"]["ann"] == "current"


def test_a_bound_model_is_hashed_once_and_bytes_search_like_their_file(photos, tmp_path, monkeypatch):
    from tokenret.collection import binding

    model = tiny_model()
    ckpt = save_checkpoint(model, tmp_path / "tiny.pth")
    with ImageIndex.create(tmp_path / "idx", model, _config(), checkpoint=ckpt) as index:
        index.sync(photos, model, progress=False, **RUNTIME)
    real, calls = binding.model_fingerprint, []
    monkeypatch.setattr(binding, "model_fingerprint", lambda m: calls.append(1) or real(m))
    with ImageIndex(tmp_path / "idx") as index:
        loaded = index.load_model()  # what `tokenret search` does: load, check, then search
        query = index.paths()[3]
        by_path = index.search_images([query], loaded, k=5, **RUNTIME)[0]
        by_bytes = index.search_images([open(query, "rb").read()], loaded, k=5, **RUNTIME)[0]
        assert len(calls) == 1  # one hash of the weights for the load and both searches
        assert [h.path for h in by_bytes] == [h.path for h in by_path] and by_path[0].path == query
        np.testing.assert_allclose([h.score for h in by_bytes], [h.score for h in by_path], atol=1e-6)
        # weights changed in place: the binding is checked again, and refuses the model
        with torch_no_grad():
            next(loaded.parameters()).add_(1.0)
        with pytest.raises(IndexMismatchError, match="this model differs"):
            index.search_images([query], loaded, k=5, **RUNTIME)
        assert len(calls) == 2


def _config():
    from tokenret.extraction import ExtractionConfig

    return ExtractionConfig(max_size=64, scales=(1.0,))


def torch_no_grad():
    import torch

    return torch.no_grad()


def test_the_index_command_brings_a_stale_ann_index_up_to_date(tmp_path, capsys):
    x = clustered_vectors(300)
    with vector_index(tmp_path, x) as index:
        index.set_backend("HNSW32")
        assert index.remove_paths(index.paths()[:10]) == 10  # removal alone leaves it stale
        assert index.ann_status() == "stale"
    assert main(["index", str(tmp_path / "vidx")]) == 0
    assert ">> approximate index brought up to date: HNSW32" in capsys.readouterr().out
    with ImageIndex(tmp_path / "vidx") as index:
        assert index.ann_status() == "current" and index.ann_index().ntotal == 290
