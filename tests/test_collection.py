"""Searching your own images: index a folder of real photos, search it, keep it in sync."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import tokenret
from tokenret.cli import main
from tokenret.index import collection as col
from tokenret.index.collection import ImageIndex, IndexMismatchError
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
    from tokenret.extract import ExtractionConfig

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
        from tokenret.index.base import make_index as make_vector_index

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
        full.add_paths(col.find_images(photos), model, chunk=4, progress=False, **RUNTIME)
        full_vecs = {p: v for p, v in zip(full.paths(), _stored(full), strict=True)}
    real = col.ImageIndex._store
    calls = []

    def crash_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    with make_index(tmp_path, model, "resumed") as index:
        monkeypatch.setattr(col.ImageIndex, "_store", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            index.add_paths(col.find_images(photos), model, chunk=4, progress=False, **RUNTIME)
        assert len(index) == 8  # two chunks of four were committed
        monkeypatch.setattr(col.ImageIndex, "_store", real)
        counts = index.add_paths(col.find_images(photos), model, chunk=4, progress=False, **RUNTIME)
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
        from tokenret.extract import ExtractionConfig

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

    assert Image.open(tmp_path / "show" / "results.png").size == (6 * 200, 222)
    page = (tmp_path / "show" / "index.html").read_text()
    assert page.count('<img src="img/token') == 4  # L = 4 tokens, one attention map each
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
    assert res == {"spec": "HNSW32", "k": 5, "n_queries": 16, "recall": 1.0}
