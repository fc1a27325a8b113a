"""Revisited mAP / mP@k: hand-computed cases, and an independent per-item loop on the real ground truth."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tokenret.evaluate import (
    compute_ap,
    compute_map,
    compute_revisited_map,
    format_results,
    ranks_from_scores,
    ranks_topk,
)

KS = (1, 5, 10)

# Written out again here (not imported) so the test does not share the code under test.
NAIVE_PROTOCOLS = {
    "easy": (["easy"], ["junk", "hard"]),
    "medium": (["easy", "hard"], ["junk"]),
    "hard": (["hard"], ["junk", "easy"]),
}


def naive_query(column, ok, junk, ks=KS):
    """AP and P@k by walking down the ranking one item at a time (spec section 3)."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk)
    found = []  # junk-adjusted 0-based positions of the positives
    junk_seen = 0
    for position, item in enumerate(column):
        item = int(item)
        if item in junk:
            junk_seen += 1
        elif item in ok:
            found.append(position - junk_seen)
    ap = 0.0
    for j, r in enumerate(found):
        before = 1.0 if r == 0 else j / r
        after = (j + 1) / (r + 1)
        ap += (before + after) / 2 / len(ok)
    p_at_k = []
    for k in ks:
        if not found:
            p_at_k.append(0.0)
            continue
        kq = min(found[-1] + 1, k)
        p_at_k.append(sum(1 for r in found if r + 1 <= kq) / kq)
    return ap, p_at_k


def naive_revisited(ranks, gnd, ks=KS):
    out = {}
    for name, (ok_keys, junk_keys) in NAIVE_PROTOCOLS.items():
        aps, pks = [], []
        for q, g in enumerate(gnd):
            ok = [i for key in ok_keys for i in g[key]]
            junk = [i for key in junk_keys for i in g[key]]
            if not ok:
                continue
            ap, pk = naive_query(ranks[:, q], ok, junk, ks)
            aps.append(ap)
            pks.append(pk)
        out[name] = (sum(aps) / len(aps), np.mean(pks, axis=0), len(aps))
    return out


def assert_matches_naive(ranks, gnd):
    res = compute_revisited_map(ranks, gnd, KS)
    naive = naive_revisited(ranks, gnd)
    for name, (m, mp, n) in naive.items():
        assert res[name]["n_queries"] == n
        assert res[name]["map"] == pytest.approx(m, abs=1e-12)
        assert [res[name]["mp_at_k"][k] for k in KS] == pytest.approx(list(mp), abs=1e-12)
    return res


@pytest.fixture(scope="module")
def real_gnd(revisitop_dir):
    out = {}
    for name in ("roxford5k", "rparis6k"):
        path = revisitop_dir / f"gnd_{name}.pkl"
        with open(path, "rb") as f:  # trusted local copy; plain pickle on purpose
            out[name] = pickle.load(f)
    return out


def ideal_ranks(cfg, order=("easy", "hard", "junk")):
    n = len(cfg["imlist"])
    cols = []
    for g in cfg["gnd"]:
        head = [i for key in order for i in g[key]]
        rest = np.setdiff1d(np.arange(n), head)
        cols.append(np.concatenate([np.asarray(head, dtype=np.int64), rest]))
    return np.stack(cols, axis=1)


def one_query(easy=(), hard=(), junk=()):
    return [{"easy": list(easy), "hard": list(hard), "junk": list(junk), "bbx": [0, 0, 1, 1]}]


# --- hand-computed cases from the spec -------------------------------------------------------------


def test_one_positive_first_gives_one():
    assert compute_ap(np.array([0]), 1) == 1.0
    res = compute_revisited_map(np.array([[3], [0], [1], [2]]), one_query(easy=[3]))
    assert res["easy"]["map"] == 1.0 and res["medium"]["map"] == 1.0


def test_one_positive_second_gives_quarter():
    # Trapezoid: (0/1 + 1/2) / 2 = 0.25 (step AP would give 0.5).
    assert compute_ap(np.array([1]), 1) == 0.25
    res = compute_revisited_map(np.array([[0], [3], [1], [2]]), one_query(hard=[3]))
    assert res["hard"]["map"] == 0.25 and res["medium"]["map"] == 0.25
    assert np.isnan(res["easy"]["map"]) and res["easy"]["n_queries"] == 0


def test_junk_first_then_positives_at_1_and_3():
    # Junk removed -> positives at 0 and 2: (1 + (1/2 + 2/3) / 2) / 2 = 19/24.
    column = np.array([[12], [10], [0], [11], [1], [2]])
    res = compute_revisited_map(column, one_query(easy=[10], hard=[11], junk=[12]))
    assert res["medium"]["map"] == pytest.approx(19 / 24)
    assert round(res["medium"]["map"], 4) == 0.7917
    # Easy: 11 (hard) is junk too -> only positive at adjusted 0.
    assert res["easy"]["map"] == 1.0
    # Hard: 12 and 10 are junk -> the positive at 3 moves to 1 -> 0.25.
    assert res["hard"]["map"] == 0.25


def test_missing_positive_counts_in_denominator():
    # Two annotated positives, one absent from the (truncated) ranking: AP = 1 / 2.
    res = compute_revisited_map(np.array([[5], [0], [1]]), one_query(easy=[5, 9]))
    assert res["easy"]["map"] == 0.5


def test_mp_at_k_is_capped_at_last_positive():
    # Positives ranked 1st and 2nd: P@5 = P@10 = 1.0 (a plain P@k would give 0.4 and 0.2).
    res = compute_revisited_map(np.arange(20)[:, None], one_query(easy=[0, 1]))
    assert res["easy"]["mp_at_k"] == {1: 1.0, 5: 1.0, 10: 1.0}
    # Positives at 1-based 2 and 4: P@1 = 0/1, P@5 = 2/4, P@10 = 2/4.
    res = compute_revisited_map(np.arange(20)[:, None], one_query(easy=[1, 3]))
    assert res["easy"]["p_at_k"][0].tolist() == [0.0, 0.5, 0.5]
    # Positives at 2, 4 and 12: the last is beyond every k, so kq = k: P@5 = 2/5, P@10 = 2/10.
    res = compute_revisited_map(np.arange(20)[:, None], one_query(easy=[1, 3, 11]))
    assert res["easy"]["p_at_k"][0].tolist() == [0.0, 0.4, 0.2]


def test_mean_skips_queries_without_positives():
    gnd = one_query(easy=[0]) + one_query(hard=[1]) + one_query(easy=[2], hard=[1])
    ranks = np.tile(np.arange(4)[:, None], (1, 3))
    res = compute_map(ranks, [(np.array(g["easy"]), np.array(g["junk"] + g["hard"])) for g in gnd], KS)
    assert res["n_queries"] == 2
    assert np.isnan(res["ap"][1]) and np.isnan(res["p_at_k"][1]).all()
    # Query 0: AP 1; query 2: 1 is junk so 2 moves to position 1 -> 0.25.
    assert res["ap"][[0, 2]].tolist() == [1.0, 0.25]
    assert res["map"] == pytest.approx(0.625)


# --- the real ground truth ---------------------------------------------------------------------------


def test_roxford_easy_excludes_two_queries(real_gnd):
    cfg = real_gnd["roxford5k"]
    res = compute_revisited_map(ideal_ranks(cfg), cfg["gnd"])
    assert res["easy"]["n_queries"] == 68
    assert res["medium"]["n_queries"] == 70 and res["hard"]["n_queries"] == 70
    assert np.flatnonzero(np.isnan(res["easy"]["ap"])).tolist() == [11, 66]
    assert np.isnan(res["easy"]["p_at_k"][[11, 66]]).all()
    assert not np.isnan(res["medium"]["ap"]).any()


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_ideal_ranking_scores_one(real_gnd, name):
    cfg = real_gnd[name]
    res = compute_revisited_map(ideal_ranks(cfg), cfg["gnd"])
    for protocol in ("easy", "medium", "hard"):
        assert res[protocol]["map"] == pytest.approx(1.0, abs=1e-12)
        assert res[protocol]["mp_at_k"] == pytest.approx({1: 1.0, 5: 1.0, 10: 1.0})
    # The same holds when the ranking is cut right after the last annotated image.
    longest = max(len(g["easy"]) + len(g["hard"]) + len(g["junk"]) for g in cfg["gnd"])
    cut = compute_revisited_map(ideal_ranks(cfg)[:longest], cfg["gnd"])
    assert cut["hard"]["map"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_junk_first_equals_ideal(real_gnd, name):
    cfg = real_gnd[name]
    ideal = compute_revisited_map(ideal_ranks(cfg), cfg["gnd"])
    junk_first = compute_revisited_map(ideal_ranks(cfg, order=("junk", "easy", "hard")), cfg["gnd"])
    for protocol in ideal:
        np.testing.assert_array_equal(junk_first[protocol]["ap"], ideal[protocol]["ap"])
        np.testing.assert_array_equal(junk_first[protocol]["p_at_k"], ideal[protocol]["p_at_k"])
        assert junk_first[protocol]["map"] == ideal[protocol]["map"]


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_reversed_ranking_matches_naive_loop(real_gnd, name):
    cfg = real_gnd[name]
    res = assert_matches_naive(ideal_ranks(cfg)[::-1], cfg["gnd"])
    assert res["medium"]["map"] < 0.1
    assert res["easy"]["mp_at_k"][10] < 0.1


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_random_ranking_matches_naive_loop(real_gnd, name):
    cfg = real_gnd[name]
    rng = np.random.default_rng(1)
    n, nq = len(cfg["imlist"]), len(cfg["qimlist"])
    ranks = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)
    res = assert_matches_naive(ranks, cfg["gnd"])
    # Per-query values too, for one protocol.
    for q in range(nq):
        g = cfg["gnd"][q]
        ap, pk = naive_query(ranks[:, q], g["easy"] + g["hard"], g["junk"])
        assert res["medium"]["ap"][q] == pytest.approx(ap, abs=1e-12)
        assert res["medium"]["p_at_k"][q].tolist() == pytest.approx(pk, abs=1e-12)


def test_truncated_ranking_matches_naive_loop(real_gnd):
    cfg = real_gnd["rparis6k"]
    scores = np.random.default_rng(2).normal(size=(len(cfg["imlist"]), len(cfg["qimlist"])))
    # Make half the positives likely to land in the top 300 so truncation matters both ways.
    for q, g in enumerate(cfg["gnd"]):
        scores[g["easy"][::2], q] += 3.0
    ranks = ranks_from_scores(scores)[:300]
    res = assert_matches_naive(ranks, cfg["gnd"])
    full = compute_revisited_map(ranks_from_scores(scores), cfg["gnd"])
    assert res["medium"]["map"] <= full["medium"]["map"]


def test_truncated_column_without_positive_scores_zero():
    gnd = one_query(easy=[7, 8]) + one_query(easy=[0])
    ranks = np.array([[0, 0], [1, 1], [2, 2]])  # query 0: no positive in its top 3
    res = compute_revisited_map(ranks, gnd)
    assert res["easy"]["ap"].tolist() == [0.0, 1.0]
    assert res["easy"]["p_at_k"][0].tolist() == [0.0, 0.0, 0.0]
    assert res["easy"]["n_queries"] == 2
    assert res["easy"]["mp_at_k"][1] == 0.5


def test_bad_inputs_are_refused():
    gnd = one_query(easy=[0])
    with pytest.raises(ValueError, match="columns"):
        compute_revisited_map(np.zeros((3, 2), dtype=int), gnd)
    with pytest.raises(TypeError, match="integer"):
        compute_revisited_map(np.zeros((3, 1)), gnd)
    with pytest.raises(ValueError, match="k must be"):
        compute_revisited_map(np.zeros((3, 1), dtype=int), gnd, ks=(0,))


# --- printing ----------------------------------------------------------------------------------------


def _result(m, mp):
    return {"map": m, "mp_at_k": dict(zip(KS, mp, strict=True))}


def test_format_results_lines():
    results = {
        "easy": _result(0.8481, [66 / 68, 0.92062, 0.86490]),
        "medium": _result(0.8228, [0.97143, 0.9067, 0.8467]),
        "hard": _result(0.6657, [0.81429, 0.63, 0.53]),
    }
    lines = format_results("roxford5k", results)
    assert lines[0] == ">> Test Dataset: roxford5k *** mAP Easy: 84.81, Medium: 82.28, Hard: 66.57"
    assert lines[1] == ">> mAP Medium: 82.28, Hard: 66.57"
    assert lines[2] == ">> mP@k[1, 5, 10] Easy: [97.06, 92.06, 86.49]"
    assert lines[3] == ">> mP@k[1, 5, 10] Medium: [97.14, 90.67, 84.67]"
    assert lines[4] == ">> mP@k[1, 5, 10] Hard: [81.43, 63.00, 53.00]"


def test_format_results_of_real_evaluation(real_gnd):
    cfg = real_gnd["roxford5k"]
    lines = format_results("roxford5k", compute_revisited_map(ideal_ranks(cfg), cfg["gnd"]))
    assert lines[1] == ">> mAP Medium: 100.00, Hard: 100.00"


# --- ranking helpers ---------------------------------------------------------------------------------


def test_ranks_from_scores_descending_ties_to_lower_index():
    scores = np.array([[0.5, 1.0], [0.9, 1.0], [0.5, 0.0], [0.1, 1.0]])
    ranks = ranks_from_scores(scores)
    assert ranks[:, 0].tolist() == [1, 0, 2, 3]
    assert ranks[:, 1].tolist() == [0, 1, 3, 2]
    distinct = np.random.default_rng(0).normal(size=(50, 4))
    np.testing.assert_array_equal(ranks_from_scores(distinct), np.argsort(-distinct, axis=0))


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_ranks_topk_equals_full_ranking(chunk_size):
    rng = np.random.default_rng(3)
    # Small integers: exact dot products and many ties.
    db = rng.integers(-2, 3, size=(60, 4)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(5, 4)).astype(np.float32)
    full = ranks_from_scores(db @ queries.T)
    np.testing.assert_array_equal(ranks_topk(db, queries, 10, chunk_size=chunk_size), full[:10])
    np.testing.assert_array_equal(ranks_topk(db, queries, 100, chunk_size=chunk_size), full)


def test_ranks_topk_reads_a_memmap(tmp_path):
    rng = np.random.default_rng(4)
    db = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(3, 8)).astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "db.npy", mode="w+", dtype=np.float32, shape=db.shape)
    mm[:] = db
    mm.flush()
    on_disk = np.load(tmp_path / "db.npy", mmap_mode="r")
    top = ranks_topk(on_disk, queries, 20, chunk_size=64)
    assert top.shape == (20, 3)
    # Chunked float32 products may differ from one big product in the last bit, so compare the scores.
    full_scores = db.astype(np.float64) @ queries.T.astype(np.float64)
    expected = ranks_from_scores(full_scores)[:20]
    np.testing.assert_allclose(
        np.take_along_axis(full_scores, top, 0), np.take_along_axis(full_scores, expected, 0), atol=1e-5
    )
