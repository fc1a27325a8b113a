"""`tokenret evaluate` end to end on the real mini-RPar (250 Paris6k photos, 12 real queries with boxes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tokenret import benchmark
from tokenret.cli import main
from tokenret.data.revisited import RevisitedDataset
from tokenret.extraction import descriptors as ex
from tokenret.models.checkpoints import save_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_token_model):
    """The tiny Token model saved as a tokenret checkpoint (its architecture travels in the file)."""
    return save_checkpoint(tiny_token_model(), tmp_path / "tiny.pth")


def _evaluate(data_root, tmp_path, ckpt, *extra):
    """`tokenret evaluate` of the checkpoint `ckpt` on the mini-RPar at 64 pixels; the report it writes."""
    out = tmp_path / "report.json"
    argv = ["evaluate", "--model", "token_r50", "--checkpoint", str(ckpt), "--data-root", str(data_root)]
    argv += [
        "--datasets",
        "rparis6k_subset",
        "--max-size",
        "64",
        "--scales",
        "1",
        "--workers",
        "0",
        "--quiet",
    ]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--output", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_evaluate_runs_on_the_mini_rpar_and_reuses_descriptors(
    shared_data, tmp_path, capsys, monkeypatch, tiny_checkpoint
):
    report = _evaluate(shared_data, tmp_path, tiny_checkpoint)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(">> Test Dataset: rparis6k_subset *** mAP Easy: ")
    res = report["datasets"]["rparis6k_subset"]["results"]
    medium = res["medium"]
    assert f">> mAP Medium: {medium['map']:.2f}, Hard: {res['hard']['map']:.2f}" in lines
    assert report["datasets"]["rparis6k_subset"]["n_db"] == 238 and len(medium["ap"]) == 12
    # The printed mean is the mean of the per-query APs (the 12 queries all have Medium positives).
    assert medium["n_queries"] == 12 and abs(np.mean(medium["ap"]) - medium["map"]) < 0.01
    # Hard: the last query (defense_000038) has no hard positives and is left out.
    assert res["hard"]["n_queries"] == 11 and res["hard"]["ap"][11] is None
    top = report["datasets"]["rparis6k_subset"]["top_ranks"]
    assert len(top) == 12 and len(set(top[0])) == 100

    # Only a ranking option changes: descriptors come from the cache, nothing is extracted again.
    calls = []
    real = ex._extract_range
    monkeypatch.setattr(ex, "_extract_range", lambda *a, **k: calls.append(1) or real(*a, **k))
    qe = _evaluate(shared_data, tmp_path, tiny_checkpoint, "--qe", "2", "3")
    assert calls == []
    assert (
        qe["qe"] == [2, 3]
        and qe["datasets"]["rparis6k_subset"]["results"] != report["datasets"]["rparis6k_subset"]["results"]
    )


def test_label_oracle_descriptors_give_100_map(shared_data, tmp_path, monkeypatch, capsys, tiny_checkpoint):
    """Descriptors built from the labels: every stage after extraction (order, boxes, ranks, metrics) must
    then give 100 mAP in all three protocols."""
    ds = RevisitedDataset.from_root(shared_data, "rparis6k_subset")
    nq = len(ds.qimlist)
    db_vec = {}
    for i, name in enumerate(ds.imlist):
        v = np.zeros(nq, dtype=np.float32)
        for q, g in enumerate(ds.gnd):
            if i in g["easy"] or i in g["hard"]:
                v[q] = 1.0
        db_vec[name] = v / max(np.linalg.norm(v), 1.0)
    q_vec = {name: np.eye(nq, dtype=np.float32)[q] for q, name in enumerate(ds.qimlist)}
    seen_boxes = []

    def oracle(model, paths, boxes=None, config=None, out_dir=None, **kwargs):
        seen_boxes.append(boxes)
        table = q_vec if boxes is not None else db_vec
        return ex.ExtractionResult(np.stack([table[Path(p).stem] for p in paths]))

    monkeypatch.setattr(benchmark, "extract_descriptors", oracle)
    report = _evaluate(shared_data, tmp_path, tiny_checkpoint)
    res = report["datasets"]["rparis6k_subset"]["results"]
    assert res["easy"]["map"] == res["medium"]["map"] == res["hard"]["map"] == 100.0
    assert all(v == 100.0 for v in res["medium"]["mp_at_k"].values())
    assert seen_boxes[1] == [ds.query_box(i) for i in range(nq)]  # queries are cropped to their boxes
    assert ">> mAP Medium: 100.00, Hard: 100.00" in capsys.readouterr().out


def test_missing_images_are_named(tmp_path, shared_data, capsys):
    root = tmp_path / "data" / "rparis6k_subset"
    root.mkdir(parents=True)
    (root / "gnd_rparis6k_subset.json").write_bytes(
        (shared_data / "rparis6k_subset" / "gnd_rparis6k_subset.json").read_bytes()
    )
    assert (
        main(
            [
                "evaluate",
                "--model",
                "token_r50",
                "--data-root",
                str(tmp_path / "data"),
                "--datasets",
                "rparis6k_subset",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "250 image(s) of rparis6k_subset missing" in err and str(root / "jpg") in err


def test_nan_descriptors_are_refused():
    from tokenret.evaluate import evaluate_descriptors

    db = np.eye(3, dtype=np.float32)
    db[1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_descriptors(db, np.eye(3, dtype=np.float32)[:1], [{"easy": [0], "hard": [], "junk": []}])


def test_show_results_frames_by_label(shared_data, tmp_path):
    ds = RevisitedDataset.from_root(shared_data, "rparis6k_subset")
    g = ds.gnd[2]  # eiffel_000266: easy, hard and junk images
    negative = next(i for i in range(len(ds.imlist)) if i not in g["easy"] + g["hard"] + g["junk"])
    order = [g["easy"][0], g["junk"][0], negative, g["hard"][0]]
    report = {"datasets": {"rparis6k_subset": {"top_ranks": [order] * len(ds.qimlist)}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    out = tmp_path / "grid.png"
    argv = ["show-results", "--report", str(tmp_path / "r.json"), "--data-root", str(shared_data)]
    assert (
        main([*argv, "--dataset", "rparis6k_subset", "--queries", "2", "--top", "4", "--out", str(out)]) == 0
    )
    from PIL import Image

    img = Image.open(out).convert("RGB")
    assert img.size == (5 * 160, 160)
    frames = [img.getpixel((c * 160 + 2, 80)) for c in range(5)]
    from tokenret.viz import BLUE, GREEN, GREY, RED

    assert frames == [BLUE, GREEN, GREY, RED, GREEN]
    # Under the Easy protocol the hard image is junk.
    assert (
        main(
            [
                *argv,
                "--dataset",
                "rparis6k_subset",
                "--queries",
                "2",
                "--top",
                "4",
                "--out",
                str(out),
                "--protocol",
                "easy",
            ]
        )
        == 0
    )
    assert Image.open(out).convert("RGB").getpixel((4 * 160 + 2, 80)) == GREY


@pytest.mark.slow
def test_r1m_distractors_are_extracted_once_and_appended(shared_data, tmp_path, monkeypatch, tiny_checkpoint):
    from PIL import Image

    r1m = tmp_path / "revisitop1m"
    (r1m / "jpg" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(6):
        name = f"a/d{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(r1m / "jpg" / name)
        names.append(name)
    (r1m / "revisitop1m.txt").write_text("\n".join(names) + "\n")
    plain = _evaluate(shared_data, tmp_path, tiny_checkpoint)["datasets"]["rparis6k_subset"]["results"]
    calls = []
    real = ex._extract_range
    monkeypatch.setattr(ex, "_extract_range", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    report = _evaluate(shared_data, tmp_path, tiny_checkpoint, "--r1m", str(r1m))
    assert calls == [6]  # only the distractors were new; the dataset's descriptors came from the cache
    assert report["r1m"] == 6 and "rparis6k_subset+R1M" in report["datasets"]
    with_r1m = report["datasets"]["rparis6k_subset+R1M"]["results"]
    # Distractors are negatives only: no query can gain, and the ranking depth grows by 6.
    for proto in ("easy", "medium", "hard"):
        assert with_r1m[proto]["map"] <= plain[proto]["map"] + 1e-9
    calls.clear()
    _evaluate(shared_data, tmp_path, tiny_checkpoint, "--r1m", str(r1m))
    assert calls == []  # second time everything is cached
