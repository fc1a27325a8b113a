"""`tokenret evaluate --local ... --aggregator asmk|vlad|token` end to end on the real mini-RPar.

Two kinds of checks: (1) descriptor sets built from the labels (an oracle) must give 100 mAP through every
stage after extraction (set order, query boxes, aggregation, ranking, metrics); (2) a real HOW network
(random weights, tiny images) through the CLI gives exactly the per-query APs that an independent
computation from the same sets gives (brute-force ASMK kernel, closed-form VLAD, one-by-one Token head).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tokenret.aggregate.asmk import aggregate_residuals, asmk_similarity
from tokenret.aggregate.codebook import Codebook
from tokenret.aggregate.vlad import vlad
from tokenret.cli import main
from tokenret.data.revisited import RevisitedDataset
from tokenret.evaluate import compute_revisited_map, ranks_from_scores
from tokenret.extraction import local_sets as lx
from tokenret.models import local as local_models

DATASET = "rparis6k_subset"
DIM = 64


def _run(shared_data, tmp_path, *extra: str, name: str = "report.json") -> dict:
    out = tmp_path / name
    argv = ["evaluate", "--data-root", str(shared_data), "--datasets", DATASET, "--workers", "0", "--quiet"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--output", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


class OracleLocal(nn.Module):
    """A 'local-feature model' whose sets come from the labels: the image list hands it a code
    (is query, image index) instead of pixels; database image i gets prototype q for every
    query q it is a positive of, plus one descriptor of its own; query q gets prototype q. (Exact copies:
    ASMK compares residuals to the visual word, which noise around a word's centre would randomise.)"""

    def __init__(self, ds: RevisitedDataset) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        nq, ndb = len(ds.qimlist), len(ds.imlist)
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        self.prototypes = unit(rng.standard_normal((nq, DIM)))
        self.own = unit(rng.standard_normal((ndb, DIM)))
        self.positive_of = [
            [q for q, g in enumerate(ds.gnd) if i in g["easy"] or i in g["hard"]] for i in range(ndb)
        ]
        self.output_dim = DIM
        self.runtime = {"scales": [1.0], "features_num": 100}
        self.model_name, self.model_kwargs = "oracle", {}

    def extract_local(self, code, scales=None, topk=None):
        is_query, i = int(code[0]), int(code[1])
        if is_query:
            d = self.prototypes[[i]]
        else:
            d = np.concatenate([self.prototypes[self.positive_of[i]], self.own[[i]]])
        d = torch.from_numpy(d.astype(np.float32))
        return {"descriptors": d, "attention": torch.ones(len(d))}


class CodedImages(lx.ImageList):
    def __getitem__(self, i):
        return i, torch.tensor([float(self.boxes[i] is not None), float(i)]), None


@pytest.mark.parametrize(
    "aggregator, extra", [("asmk", []), ("asmk", ["--no-binary"]), ("vlad", ["--vlad-power", "0.5"])]
)
def test_label_oracle_sets_give_100_map(shared_data, tmp_path, monkeypatch, aggregator, extra):
    ds = RevisitedDataset.from_root(shared_data, DATASET)
    monkeypatch.setattr(lx, "ImageList", CodedImages)
    monkeypatch.setattr(local_models, "create_local_model", lambda *a, **k: OracleLocal(ds))
    # small random words near the origin: every residual keeps its descriptor's direction (a word sitting
    # on a prototype would leave a zero residual, one far away would make every residual alike)
    words = (
        0.05 * np.random.default_rng(1).standard_normal((64 if aggregator == "asmk" else 8, DIM)) / DIM**0.5
    )
    cb = Codebook(words.astype(np.float32)).save(tmp_path / "cb.npy")
    report = _run(
        shared_data, tmp_path, "--local", "how_r18", "--aggregator", aggregator, "--codebook", str(cb), *extra
    )
    res = report["datasets"][DATASET]["results"]
    assert res["easy"]["map"] == res["medium"]["map"] == res["hard"]["map"] == 100.0
    assert report["aggregator"]["aggregator"] == aggregator


def _assert_same_ap(reported: list, expected: np.ndarray) -> None:
    got = np.array([np.nan if v is None else v for v in reported], dtype=np.float64)
    np.testing.assert_allclose(got, np.round(100 * np.asarray(expected), 2), atol=0.011, equal_nan=True)
    assert np.isfinite(got).sum() >= 10  # queries with positives in this protocol


def _independent_results(ds, db_sets, q_sets, score_fn):
    scores = np.array([[score_fn(d, q) for q in q_sets] for d in db_sets])
    return compute_revisited_map(ranks_from_scores(scores), ds.gnd)


HOW_ARGS = ["--local", "how_r18", "--max-size", "64", "--scales", "1", "0.7071", "--topk", "40"]


_SETS: dict = {}


def _sets(shared_data, ds):
    """The same sets as the CLI's, extracted independently (no cache, no shards); made once per session."""
    if shared_data not in _SETS:
        _SETS[shared_data] = _extract_sets(ds)
    return _SETS[shared_data]


def _extract_sets(ds):
    torch.manual_seed(0)
    model = local_models.create_local_model("how_r18")
    cfg = lx.LocalExtractionConfig(max_size=64, scales=(1.0, 0.7071), topk=40, num_workers=0)
    db = lx.extract_local_sets(
        model, [ds.image_path(i) for i in range(len(ds.imlist))], None, cfg, progress=False
    )
    boxes = [ds.query_box(i) for i in range(len(ds.qimlist))]
    q = lx.extract_local_sets(
        model, [ds.query_path(i) for i in range(len(ds.qimlist))], boxes, cfg, progress=False
    )
    return (
        model,
        [db.store.get(i) for i in range(len(db.store))],
        [q.store.get(i) for i in range(len(q.store))],
    )


@pytest.mark.slow
def test_how_asmk_and_vlad_through_the_cli_equal_independent_scores(shared_data, tmp_path, monkeypatch):
    ds = RevisitedDataset.from_root(shared_data, DATASET)
    model, db_sets, q_sets = _sets(shared_data, ds)
    assert all(0 < len(s) <= 40 for s in db_sets + q_sets)
    monkeypatch.setattr(local_models, "create_local_model", lambda *a, **k: model)
    codebook = Codebook.train(np.concatenate(db_sets), 32, seed=0)
    cb_path = codebook.save(tmp_path / "cb.npy")

    report = _run(shared_data, tmp_path, *HOW_ARGS, "--aggregator", "asmk", "--codebook", str(cb_path))
    got = report["datasets"][DATASET]["results"]
    # the reference kernel over aggregated pairs (itself checked against all descriptor pairs in test_asmk)
    db_agg = [aggregate_residuals(d, codebook, 1, binary=True) for d in db_sets]
    q_agg = [aggregate_residuals(q, codebook, 5, binary=True) for q in q_sets]
    want = _independent_results(ds, db_agg, q_agg, lambda d, q: asmk_similarity(q, d, alpha=3.0, tau=0.0))
    for proto in ("easy", "medium", "hard"):
        _assert_same_ap(got[proto]["ap"], want[proto]["ap"])

    # VLAD re-uses the cached sets: extraction must not run again
    monkeypatch.setattr(model, "extract_local", lambda *a, **k: pytest.fail("sets were re-extracted"))
    report = _run(
        shared_data, tmp_path, *HOW_ARGS, "--aggregator", "vlad", "--codebook", str(cb_path), name="v.json"
    )
    got = report["datasets"][DATASET]["results"]
    want = _independent_results(
        ds,
        db_sets,
        q_sets,
        lambda d, q: float(vlad(d, codebook, intra_normalize=True) @ vlad(q, codebook, intra_normalize=True)),
    )
    for proto in ("easy", "medium", "hard"):
        _assert_same_ap(got[proto]["ap"], want[proto]["ap"])


def test_aggregator_options_are_checked(shared_data, tmp_path, capsys):
    argv = ["evaluate", "--data-root", str(shared_data), "--datasets", DATASET, "--quiet"]
    assert main([*argv, "--local", "how_r18", "--aggregator", "asmk"]) == 2
    assert "--codebook" in capsys.readouterr().err
    assert main([*argv, "--aggregator", "vlad"]) == 2
    assert "--local" in capsys.readouterr().err
    assert main([*argv, "--local", "how_r18"]) == 2
    assert "--aggregator" in capsys.readouterr().err
    assert (
        main([*argv, "--local", "how_r18", "--aggregator", "asmk", "--codebook-size", "8", "--qe", "2", "3"])
        == 2
    )
    assert "global vectors" in capsys.readouterr().err


@pytest.mark.slow
def test_token_aggregator_through_the_cli_equals_the_head_applied_set_by_set(
    shared_data, tmp_path, monkeypatch, tiny_set_token_model
):
    from tokenret.models.checkpoints import save_checkpoint

    ds = RevisitedDataset.from_root(shared_data, DATASET)
    model, db_sets, q_sets = _sets(shared_data, ds)
    monkeypatch.setattr(local_models, "create_local_model", lambda *a, **k: model)
    head = tiny_set_token_model().eval()
    ckpt = save_checkpoint(head, tmp_path / "set_token.pth")
    report = _run(
        shared_data,
        tmp_path,
        *HOW_ARGS,
        "--aggregator",
        "token",
        "--model",
        "token_set_how_r50",
        "--checkpoint",
        str(ckpt),
    )
    assert report["aggregator"]["model"] == "token_set_how_r50"
    with torch.no_grad():
        describe = lambda s: head(torch.from_numpy(s)[None])[0].numpy()  # noqa: E731  one set, no padding
        db = np.stack([describe(s) for s in db_sets])
        q = np.stack([describe(s) for s in q_sets])
    want = compute_revisited_map(ranks_from_scores(db @ q.T), ds.gnd)
    got = report["datasets"][DATASET]["results"]
    for proto in ("easy", "medium", "hard"):
        _assert_same_ap(got[proto]["ap"], want[proto]["ap"])
