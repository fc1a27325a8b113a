"""SuperGlobal's re-ranking (MDescAug + RerankwMDA) against a per-query loop written from the spec.

The loop below restates ``shared/spec/superglobal.md`` ("Re-ranking") one query and one candidate at a
time, forming every augmented vector x~ explicitly, with the tie rules :func:`superglobal_rerank` documents
(first ranking and nearest neighbours: lower index / position; s1 order: first-ranking position; final
order: s1 position).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenret.evaluate import compute_revisited_map, evaluate_descriptors
from tokenret.rerank import (
    SuperGlobalRerank,
    superglobal_option,
    superglobal_rerank,
    superglobal_rerank_candidates,
)


def unit_rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_first_ranking(q, database):
    sims = [float(np.dot(q, x)) for x in database]
    return sorted(range(len(database)), key=lambda j: (-sims[j], j))


def naive_rerank_one(q, database, ranking, m, k, beta):
    """One query: re-order the first ``m`` of ``ranking`` (a list of database indices), keep the rest."""
    top = list(ranking[:m])
    n = len(top)
    k1 = min(k + 1, n)
    vecs = [np.asarray(database[j], dtype=np.float64) for j in top]
    augmented = []
    for i in range(n):  # MDescAug
        sims = [float(np.dot(vecs[i], vecs[j])) for j in range(n)]
        nearest = sorted(range(n), key=lambda j: (-sims[j], j))[:k1]
        weights = [1.0] + [beta * sims[j] for j in nearest[1:]]
        total = sum(w * vecs[j] for w, j in zip(weights, nearest, strict=True))
        augmented.append(total / sum(weights))
    s1 = [float(np.dot(q, a)) for a in augmented]  # RerankwMDA
    by_s1 = sorted(range(n), key=lambda i: (-s1[i], i))
    q_new = np.max(np.stack([augmented[i] for i in by_s1[:k1]]), axis=0)
    final = [(s1[i] + float(np.dot(q_new, augmented[i]))) / 2 for i in range(n)]
    place = {i: p for p, i in enumerate(by_s1)}
    order = sorted(range(n), key=lambda i: (-final[i], place[i]))
    return [top[i] for i in order] + list(ranking[m:]), [final[i] for i in order]


def naive_rerank(queries, database, ranks, m, k, beta):
    """(rows, n_queries) like superglobal_rerank; ``ranks`` None: exact first ranking."""
    columns = []
    for qi, q in enumerate(queries):
        first = naive_first_ranking(q, database) if ranks is None else list(ranks[:, qi])
        columns.append(naive_rerank_one(q, database, first, m, k, beta)[0])
    return np.array(columns, dtype=np.int64).T


@pytest.mark.parametrize(
    ("n_db", "d", "m", "k", "beta"),
    [
        (60, 8, 20, 3, 0.15),
        (60, 8, 400, 9, 0.15),  # m > n_db: everything is re-ranked
        (50, 16, 12, 0, 0.3),  # k = 0: each candidate stays itself, q~ is the best x~
        (40, 6, 5, 9, 0.15),  # K + 1 > M: capped
        (80, 12, 30, 5, 0.0),  # beta = 0
        (70, 10, 1, 9, 0.15),  # m = 1: nothing moves
    ],
)
def test_exact_first_ranking_matches_the_per_query_loop(n_db, d, m, k, beta):
    rng = np.random.default_rng(n_db + d + m + k)
    database = unit_rows(rng, n_db, d)
    queries = unit_rows(rng, 7, d)
    got = superglobal_rerank(queries, database, m=m, k=k, beta=beta)
    assert got.shape == (n_db, 7) and got.dtype == np.int64
    np.testing.assert_array_equal(got, naive_rerank(queries, database, None, m, k, beta))


@pytest.mark.parametrize("rows", [100, 25, 9])
def test_a_given_ranking_has_its_top_m_reordered(rows):
    """ranks from elsewhere (here: a noisy search), possibly truncated below m or the database size."""
    rng = np.random.default_rng(rows)
    database = unit_rows(rng, 100, 12)
    queries = unit_rows(rng, 6, 12)
    noisy = queries + 0.5 * rng.normal(size=queries.shape)
    first = np.argsort(-(database @ noisy.T), axis=0, kind="stable")[:rows]
    got = superglobal_rerank(queries, database, first, m=20, k=4, beta=0.2)
    assert got.shape == (rows, 6)
    np.testing.assert_array_equal(got, naive_rerank(queries, database, first, 20, 4, 0.2))


@pytest.mark.parametrize("max_elements", [1, 3000, 12_000, 10**9])
def test_chunks_of_queries_and_of_the_database_give_the_same_ranks(max_elements):
    """max_elements 1: one query and one database row at a time; larger: a few queries per chunk."""
    rng = np.random.default_rng(1)
    database = unit_rows(rng, 90, 10)
    queries = unit_rows(rng, 11, 10)
    want = naive_rerank(queries, database, None, 25, 5, 0.15)
    got = superglobal_rerank(queries, database, m=25, k=5, beta=0.15, max_elements=max_elements)
    np.testing.assert_array_equal(got, want)
    top = superglobal_rerank(queries, database, m=25, k=5, beta=0.15, top=40, max_elements=max_elements)
    np.testing.assert_array_equal(top, want[:40])
    short = superglobal_rerank(queries, database, m=25, k=5, beta=0.15, top=10, max_elements=max_elements)
    np.testing.assert_array_equal(short, want[:10])  # the top m are still re-ranked, then cut


def test_ties_are_broken_by_position_as_documented():
    """Integer vectors (exact dot products): duplicates, and neighbours tied across the K+1-th place."""
    rng = np.random.default_rng(3)
    d = 12
    base = rng.integers(-50, 51, size=(30, d)).astype(np.float64)
    star = np.zeros((8, d))
    star[:, 0] = 40.0
    star[np.arange(8), 1 + np.arange(8)] = 7.0  # every pair has the same dot product: ties everywhere
    database = np.concatenate([base, base[:6], star, star[:2]])  # exact duplicates too
    queries = np.concatenate([rng.integers(-50, 51, size=(4, d)), star[:2] + base[:2]]).astype(np.float64)
    for m, k in ((20, 3), (46, 9), (12, 5)):
        np.testing.assert_array_equal(
            superglobal_rerank(queries, database, m=m, k=k, beta=0.25),
            naive_rerank(queries, database, None, m, k, 0.25),
        )


def test_rows_beyond_m_are_untouched_and_the_top_m_are_a_permutation():
    rng = np.random.default_rng(5)
    database = unit_rows(rng, 300, 16)
    queries = unit_rows(rng, 9, 16)
    first = np.stack([rng.permutation(300) for _ in range(9)], axis=1)  # any first ranking
    for m in (1, 17, 64, 299, 300, 1000):
        got = superglobal_rerank(queries, database, first, m=m, k=9, beta=0.15)
        head = min(m, 300)
        np.testing.assert_array_equal(got[head:], first[head:])
        np.testing.assert_array_equal(np.sort(got[:head], axis=0), np.sort(first[:head], axis=0))
    assert not np.shares_memory(got, first)


def test_candidates_from_a_float16_store_or_a_reader_function():
    """The core takes candidate ids and reads their vectors: float16 rows, or a function of the ids."""
    rng = np.random.default_rng(7)
    store = unit_rows(rng, 120, 16).astype(np.float16)
    queries = unit_rows(rng, 5, 16).astype(np.float32)
    cand = np.argsort(-(store.astype(np.float32) @ queries.T), axis=0, kind="stable")[:30].T
    ids, scores = superglobal_rerank_candidates(queries, cand, store, k=9, beta=0.15)
    ids2, scores2 = superglobal_rerank_candidates(
        queries, cand, lambda i: store[i].astype(np.float32), k=9, beta=0.15
    )
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(scores, scores2)
    assert scores.dtype == np.float32 and np.all(np.diff(scores, axis=1) <= 0)
    wide = store.astype(np.float64)
    for qi in range(5):
        want_ids, want_scores = naive_rerank_one(
            queries[qi].astype(np.float64), wide, list(cand[qi]), 30, 9, 0.15
        )
        np.testing.assert_array_equal(ids[qi], want_ids)
        np.testing.assert_allclose(scores[qi], want_scores, atol=1e-5)


def test_float32_and_float64_inputs_agree():
    rng = np.random.default_rng(11)
    database = unit_rows(rng, 200, 32)
    queries = unit_rows(rng, 8, 32)
    wide = superglobal_rerank(queries, database, m=50)
    narrow = superglobal_rerank(queries.astype(np.float32), database.astype(np.float32), m=50)
    np.testing.assert_array_equal(wide, narrow)


def test_empty_inputs():
    rng = np.random.default_rng(0)
    database = unit_rows(rng, 10, 4)
    assert superglobal_rerank(np.empty((0, 4)), database).shape == (10, 0)
    assert superglobal_rerank(unit_rows(rng, 2, 4), np.empty((0, 4))).shape == (0, 2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"m": 0}, ValueError, "m .* must be an integer >= 1"),
        ({"m": 2.5}, ValueError, "m .* must be an integer"),
        ({"m": True}, ValueError, "m .* must be an integer"),
        ({"k": -1}, ValueError, "k .* must be an integer >= 0"),
        ({"beta": -0.1}, ValueError, "beta must be >= 0"),
        ({"beta": float("nan")}, ValueError, "beta must be a finite number"),
        ({"top": 0}, ValueError, "top .* must be an integer >= 1"),
        ({"ranks": np.zeros((5, 2), dtype=np.int64)}, ValueError, r"ranks must be \(rows, n_queries\)"),
        ({"ranks": np.zeros((5, 3))}, TypeError, "integer database indices"),
        ({"ranks": np.full((5, 3), 20)}, ValueError, "outside 0..19"),
        ({"ranks": np.full((5, 3), -1)}, ValueError, "padding"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(kwargs, error, match):
    rng = np.random.default_rng(0)
    with pytest.raises(error, match=match):
        superglobal_rerank(unit_rows(rng, 3, 4), unit_rows(rng, 20, 4), **kwargs)


def test_mismatched_dimensions_and_unknown_methods_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same d"):
        superglobal_rerank(unit_rows(rng, 3, 4), unit_rows(rng, 20, 5))
    with pytest.raises(ValueError, match="unknown re-ranking 'qe'"):
        superglobal_option("qe")
    assert superglobal_option(None) is None
    assert superglobal_option("superglobal", 100, 4, 0.2) == SuperGlobalRerank(100, 4, 0.2)


def test_evaluation_with_rerank_scores_the_reranked_ranking():
    rng = np.random.default_rng(2)
    database = unit_rows(rng, 150, 16).astype(np.float32)
    queries = (database[:5] + 0.4 * rng.normal(size=(5, 16))).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gnd = [{"easy": [i], "hard": [i + 50, i + 100], "junk": []} for i in range(5)]
    rerank = SuperGlobalRerank(m=40, k=4, beta=0.15)
    results, top = evaluate_descriptors(database, queries, gnd, rerank=rerank, keep_top=60, query_chunk=2)
    want = superglobal_rerank(queries, database, m=40, k=4, beta=0.15)
    np.testing.assert_array_equal(top, want[:60])
    expected = compute_revisited_map(want, gnd)
    for proto in ("easy", "medium", "hard"):
        assert results[proto]["map"] == pytest.approx(expected[proto]["map"])
    with pytest.raises(ValueError, match="does not combine with alpha-QE or DBA"):
        evaluate_descriptors(database, queries, gnd, qe=(2, 3.0), rerank=rerank)


# ------------------------------------------------------------------------------------- search path


def _vector_index(tmp_path, vectors):
    import torch

    import tokenret
    from tokenret.collection import ImageIndex
    from tokenret.extraction import ExtractionConfig

    torch.manual_seed(0)
    model = tokenret.create_model(
        "token_r50", backbone="resnet18", dim=32, num_heads=4, out_dim=vectors.shape[1]
    )
    index = ImageIndex.create(tmp_path / "idx", model, ExtractionConfig(max_size=64, scales=(1.0,)))
    folder = tmp_path / "img"
    folder.mkdir()
    paths = [folder / f"{i:05d}.jpg" for i in range(len(vectors))]
    for p in paths:
        p.touch()
    index.add_descriptors(paths, vectors)
    return index, model


def test_index_search_with_rerank_equals_the_rerank_of_the_exact_top_m(tmp_path):
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 16))
    x = centres[rng.integers(6, size=150)] + 0.5 * rng.normal(size=(150, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    queries = unit_rows(rng, 4, 16).astype(np.float32)
    index, _ = _vector_index(tmp_path, x)
    with index:
        vecs, ids, rows = index.vectors()
        stored = np.asarray(vecs[rows], dtype=np.float32)  # the float16 store, by hand
        exact_first = np.argsort(-(stored @ queries.T), axis=0, kind="stable")
        m = 30
        want = ids[superglobal_rerank(queries, stored, exact_first, m=m, k=5, beta=0.2)]
        for k in (10, 30, 45):
            hits = index.search(queries, k, rerank="superglobal", rerank_m=m, rerank_k=5, rerank_beta=0.2)
            assert [[h.id for h in row] for row in hits] == want[:k].T.tolist()
            assert all(h.path == index.image_path(h.id) for h in hits[0])
            scores = np.array([h.score for h in hits[0][:m]])
            assert np.all(np.diff(scores) <= 0)  # the re-ranking's own scores, descending
        plain = index.search(queries, 45)
        assert [h.id for h in plain[0][m:]] == [
            h.id for h in index.search(queries, 45, rerank="superglobal", rerank_m=m)[0][m:]
        ]
        with pytest.raises(ValueError, match="unknown re-ranking"):
            index.search(queries, 5, rerank="dba")
        with pytest.raises(ValueError, match="m .* must be an integer >= 1"):
            index.search(queries, 5, rerank="superglobal", rerank_m=0)


def test_index_search_with_rerank_through_a_faiss_backend(tmp_path):
    pytest.importorskip("faiss", reason="optional dependency faiss-cpu (installed by .ci/run)")
    rng = np.random.default_rng(8)
    x = unit_rows(rng, 120, 16).astype(np.float32)
    queries = unit_rows(rng, 3, 16).astype(np.float32)
    index, _ = _vector_index(tmp_path, x)
    with index:
        index.set_backend("IDMap,Flat")  # candidates from FAISS, vectors from the float16 store
        _, cand = index.knn(queries, 25)
        vecs, ids, rows = index.vectors()
        store = dict(zip(ids.tolist(), rows.tolist(), strict=True))
        want, _ = superglobal_rerank_candidates(
            queries, cand, lambda i: np.asarray(vecs[[store[j] for j in i]], np.float32), k=9, beta=0.15
        )
        hits = index.search(queries, 25, rerank="superglobal", rerank_m=25)
        assert [[h.id for h in row] for row in hits] == want.tolist()


def test_cli_search_and_evaluate_options(tmp_path, capsys, monkeypatch):
    from tokenret.cli import main
    from tokenret.collection import ImageIndex

    rng = np.random.default_rng(9)
    index, _ = _vector_index(tmp_path, unit_rows(rng, 20, 16).astype(np.float32))
    index.close()
    query = tmp_path / "img" / "00000.jpg"
    argv = ["search", str(tmp_path / "idx"), str(query), "--rerank", "superglobal"]
    assert main([*argv, "--qe", "3"]) == 2
    assert "does not combine with --qe" in capsys.readouterr().err
    assert main([*argv, "--rerank-m", "0"]) == 2
    assert "must be an integer >= 1" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "idx"), str(query), "--rerank-k", "3"]) == 2
    assert "--rerank-k set without --rerank superglobal" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(ImageIndex, "load_model", lambda self, checkpoint=None: "model")
    monkeypatch.setattr(ImageIndex, "search_images", lambda self, paths, model, **kw: seen.update(kw) or [[]])
    assert main([*argv, "--rerank-m", "50", "--rerank-beta", "0.2", "--workers", "0"]) == 0
    assert {key: seen[key] for key in ("rerank", "rerank_m", "rerank_k", "rerank_beta", "qe")} == {
        "rerank": "superglobal",
        "rerank_m": 50,
        "rerank_k": 9,
        "rerank_beta": 0.2,
        "qe": 0,
    }
    eval_argv = ["evaluate", "--data-root", str(tmp_path), "--rerank", "superglobal", "--qe", "2", "3"]
    assert main(eval_argv) == 2
    assert "does not combine with alpha-QE or DBA" in capsys.readouterr().err
    assert (
        json.dumps(SuperGlobalRerank().settings())
        == '{"method": "superglobal", "m": 400, "k": 9, "beta": 0.15}'
    )


def test_evaluate_reranks_the_mini_rpar_with_r1m_and_records_the_settings(
    shared_data, tmp_path, monkeypatch, tiny_token_model
):
    """`tokenret evaluate --rerank superglobal --r1m`: the report's ranks are superglobal_rerank of the same
    descriptors (dataset + distractors), the metrics those of that ranking, the settings recorded."""
    from tokenret import benchmark
    from tokenret.cli import main
    from tokenret.data.revisited import RevisitedDataset
    from tokenret.extraction import descriptors as ex
    from tokenret.models.checkpoints import save_checkpoint

    ds = RevisitedDataset.from_root(shared_data, "rparis6k_subset")
    rng = np.random.default_rng(0)
    table = {}  # noisy label descriptors: good enough to rank, noisy enough for re-ranking to move things

    def vector(name):
        if name not in table:
            table[name] = unit_rows(rng, 1, 24)[0].astype(np.float32)
        return table[name]

    def fake_extract(model, paths, boxes=None, config=None, out_dir=None, **kwargs):
        return ex.ExtractionResult(np.stack([vector(("q:" if boxes else "") + str(p)) for p in paths]))

    monkeypatch.setattr(benchmark, "extract_descriptors", fake_extract)
    r1m = tmp_path / "revisitop1m"
    (r1m / "jpg").mkdir(parents=True)
    (r1m / "revisitop1m.txt").write_text("".join(f"d{i}.jpg\n" for i in range(40)))
    ckpt = save_checkpoint(tiny_token_model(), tmp_path / "tiny.pth")
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", "token_r50", "--checkpoint", str(ckpt), "--data-root", str(shared_data)]
    argv += ["--datasets", "rparis6k_subset", "--r1m", str(r1m), "--quiet", "--output", str(out)]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--rerank", "superglobal", "--rerank-m", "60", "--rerank-k", "4"]) == 0
    report = json.loads(out.read_text())
    assert report["rerank"] == {"method": "superglobal", "m": 60, "k": 4, "beta": 0.15}
    entry = report["datasets"]["rparis6k_subset+R1M"]

    db = np.stack([vector(str(ds.image_path(i))) for i in range(len(ds.imlist))])
    db = np.concatenate([db, np.stack([vector(str(r1m / "jpg" / f"d{i}.jpg")) for i in range(40)])])
    q = np.stack([vector("q:" + str(ds.query_path(i))) for i in range(len(ds.qimlist))])
    want = superglobal_rerank(q, db, m=60, k=4, beta=0.15)
    assert entry["top_ranks"] == want[:100].T.tolist()
    plain = np.argsort(-(db @ q.T), axis=0, kind="stable")
    assert not np.array_equal(want[:60], plain[:60])  # the re-ranking did move something
    expected = compute_revisited_map(want, ds.gnd)
    assert entry["results"]["medium"]["map"] == pytest.approx(100 * expected["medium"]["map"], abs=0.01)

    assert main([*argv]) == 0
    assert json.loads(out.read_text())["rerank"] is None


def test_cli_search_with_rerank_on_a_small_image_index(
    tmp_path, capsys, tiny_token_model, write_random_images
):
    """`tokenret search INDEX q --rerank superglobal`: the hits are the re-ranking of the exact top m of the
    query's descriptor, computed by hand from the float16 store."""
    from tokenret.cli import main
    from tokenret.collection import ImageIndex
    from tokenret.models.checkpoints import save_checkpoint

    paths = write_random_images(tmp_path / "photos", [(48, 36)] * 9, suffix=".png")
    ckpt = save_checkpoint(tiny_token_model(), tmp_path / "tiny.pth")
    out = tmp_path / "idx"
    argv = ["index", str(tmp_path / "photos"), "--out", str(out), "--model", "token_r50", "--checkpoint"]
    argv += [str(ckpt), "--max-size", "64", "--scales", "1", "--workers", "0", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    search = ["search", str(out), str(paths[3]), "-k", "8", "--json", "--workers", "0"]
    assert main([*search, "--rerank", "superglobal", "--rerank-m", "6", "--rerank-k", "3"]) == 0
    got = json.loads(capsys.readouterr().out)[str(paths[3].resolve())]
    with ImageIndex(out) as index:
        binding = index.load_binding()
        q = binding.describe([paths[3]], num_workers=0)
        vecs, ids, rows = index.vectors()
        stored = np.asarray(vecs[rows], dtype=np.float32)
        first = np.argsort(-(stored @ q.T), axis=0, kind="stable")
        want = ids[superglobal_rerank(q, stored, first, m=6, k=3, beta=0.15)[:8, 0]]
        assert [r["path"] for r in got] == [index.image_path(int(i)) for i in want]
        hits = binding.search_images(
            [paths[3]], 8, rerank="superglobal", rerank_m=6, rerank_k=3, num_workers=0
        )
        assert [h.path for h in hits[0]] == [r["path"] for r in got]
        with pytest.raises(ValueError, match="do not combine"):
            binding.search_images([paths[3]], 5, qe=2, rerank="superglobal")
