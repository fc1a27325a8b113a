"""`tokenret evaluate --model superglobal_r50 --rerank superglobal` end to end on the mini-RPar.

Random weights (seeded, so the three runs share one descriptor cache); images shrunk to 96 px to keep it
under a minute on one CPU thread; the model's own 3 scales and sGeM. The re-ranked mAP is checked against
`superglobal_rerank` and `compute_revisited_map` applied by hand to the descriptors the run cached.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenret.cli import main
from tokenret.data.revisited import RevisitedDataset
from tokenret.evaluate import compute_revisited_map
from tokenret.extraction.shards import ShardStore
from tokenret.models.convention import SUPERGLOBAL_SCALES
from tokenret.rerank import superglobal_rerank

DATASET = "rparis6k_subset"


def _evaluate(data_root: Path, tmp_path: Path, name: str, *extra: str) -> dict:
    """One `tokenret evaluate` run of random-weight superglobal_r50 (seed 0); the report it writes."""
    out = tmp_path / f"{name}.json"
    argv = ["evaluate", "--model", "superglobal_r50", "--data-root", str(data_root), "--datasets", DATASET]
    argv += ["--max-size", "96", "--workers", "0", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    argv += ["--output", str(out), *extra]
    torch.manual_seed(0)  # the same random weights each run: the later runs read the cached descriptors
    assert main(argv) == 0
    return json.loads(out.read_text())


def _cached(cache: Path, what: str) -> np.ndarray:
    """The descriptors the run cached for ``what`` ("db" or "queries"): one folder per model and settings."""
    (root,) = (cache / DATASET / what).iterdir()
    manifest = json.loads((root / "manifest.json").read_text())
    vectors, failures = ShardStore(root, manifest["n"], manifest["shard_size"]).read_all(manifest["dim"])
    assert failures == {}
    return vectors


@pytest.mark.slow
def test_superglobal_rerank_through_evaluate_on_the_mini_rpar(shared_data, tmp_path):
    plain = _evaluate(shared_data, tmp_path, "plain")
    full = _evaluate(shared_data, tmp_path, "rerank", "--rerank", "superglobal")
    m10 = _evaluate(shared_data, tmp_path, "rerank_m10", "--rerank", "superglobal", "--rerank-m", "10")

    # The settings travel with the report: the re-ranking's, and the model's protocol (its own scales,
    # 96 px as asked, its scale pooling: "scale_pool" appears in the extraction record only when overridden).
    assert plain["rerank"] is None
    assert full["rerank"] == {"method": "superglobal", "m": 400, "k": 9, "beta": 0.15}
    assert m10["rerank"] == {"method": "superglobal", "m": 10, "k": 9, "beta": 0.15}
    for report in (plain, full, m10):
        assert report["model"] == "superglobal_r50" and report["model_kwargs"]["antialias"] is False
        assert report["extraction"]["max_size"] == 96 and "scale_pool" not in report["extraction"]
        convention = report["convention"]  # the model's own input convention, recorded
        assert (convention["channel_order"], convention["scale_pool"], convention["scale_resize"]) == (
            "BGR",
            "sgem",
            "size",
        )
        assert report["extraction"]["scales"] == pytest.approx(SUPERGLOBAL_SCALES)
        assert report["model_sha256"] == plain["model_sha256"]  # same weights: one descriptor cache

    # Metrics computed, in percent.
    for report in (plain, full, m10):
        res = report["datasets"][DATASET]["results"]
        for protocol in ("easy", "medium", "hard"):
            assert 0.0 <= res[protocol]["map"] <= 100.0
        assert res["medium"]["n_queries"] == 12

    top_plain = np.array(plain["datasets"][DATASET]["top_ranks"])  # (12 queries, 100)
    top_full = np.array(full["datasets"][DATASET]["top_ranks"])
    top_m10 = np.array(m10["datasets"][DATASET]["top_ranks"])
    assert top_plain.shape == top_full.shape == top_m10.shape == (12, 100)
    # Re-ranking changes the ranks: the first 10 of some query are in another order or other images.
    assert (top_full[:, :10] != top_plain[:, :10]).any()
    # m = 10 re-orders each query's first 10 among themselves and leaves every later row where it was.
    assert (top_m10[:, :10] != top_plain[:, :10]).any()
    assert np.array_equal(np.sort(top_m10[:, :10], axis=1), np.sort(top_plain[:, :10], axis=1))
    assert np.array_equal(top_m10[:, 10:], top_plain[:, 10:])

    # The same numbers by hand from the cached descriptors: exact first ranking and re-ranking by
    # superglobal_rerank (ranks=None: its own exact ranking, not evaluate's), scored by compute_revisited_map.
    db, q = _cached(tmp_path / "cache", "db"), _cached(tmp_path / "cache", "queries")
    assert db.shape == (238, 2048) and q.shape == (12, 2048)
    gnd = RevisitedDataset.from_root(shared_data, DATASET).gnd
    for report, m in ((full, 400), (m10, 10)):
        ranks = superglobal_rerank(q, db, m=m, k=9, beta=0.15)
        assert np.array_equal(ranks[:100].T, np.array(report["datasets"][DATASET]["top_ranks"]))
        expected = compute_revisited_map(ranks, gnd)
        got = report["datasets"][DATASET]["results"]  # the report's are x100, rounded to 2 decimals
        for protocol in ("easy", "medium", "hard"):
            assert got[protocol]["map"] == pytest.approx(100 * expected[protocol]["map"], abs=0.005)
            ap = [None if np.isnan(v) else round(100 * float(v), 2) for v in expected[protocol]["ap"]]
            assert got[protocol]["ap"] == ap
    # and the re-ranking moved the score (random weights: its direction means nothing)
    assert full["datasets"][DATASET]["results"] != plain["datasets"][DATASET]["results"]
