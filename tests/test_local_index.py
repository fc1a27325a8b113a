"""Local features + aggregator as one image model, so a folder index can use HOW/DELF with Token or VLAD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tokenret
from tokenret.aggregate.codebook import Codebook
from tokenret.aggregate.pipeline import LocalAggregateModel
from tokenret.aggregate.vlad import vlad
from tokenret.cli import main
from tokenret.data.images import load_image, to_tensor
from tokenret.extraction import model_fingerprint
from tokenret.models.local import create_local_model


def _codebook(dim=128, k=8, seed=0):
    return Codebook(np.random.default_rng(seed).standard_normal((k, dim)).astype(np.float32))


def test_pipeline_equals_extraction_then_aggregation_and_round_trips(tmp_path, tiny_set_token_model):
    torch.manual_seed(0)
    local = create_local_model("how_r18")
    head = tiny_set_token_model().eval()
    model = LocalAggregateModel(local, head, scales=[1.0, 0.7071], topk=15).eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got = model(images)
        for i in range(2):
            s = local.extract_local(images[i], [1.0, 0.7071], 15)["descriptors"]
            torch.testing.assert_close(got[i], head(s[None])[0], rtol=1e-5, atol=1e-6)
    path = model.save_checkpoint(tmp_path / "m.pth")
    again = LocalAggregateModel.load(path)
    assert model_fingerprint(again) == model_fingerprint(model)
    with torch.no_grad():
        torch.testing.assert_close(again(images), got)


def test_pipeline_renormalises_for_a_network_with_other_input_statistics():
    torch.manual_seed(0)
    delf = create_local_model("delf_r50")
    delf.runtime["mean_std"] = [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    delf.runtime["score_threshold"] = 0.0
    cb = _codebook(delf.output_dim, 4)
    model = LocalAggregateModel(delf, cb, scales=[1.0], topk=6).eval()
    pixels = torch.rand(3, 64, 64)
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    with torch.no_grad():
        got = model(imagenet[None])[0]
        s = delf.extract_local((pixels - 0.5) / 0.5, [1.0], 6)["descriptors"]
    np.testing.assert_allclose(got.numpy(), vlad(s.numpy(), cb, intra_normalize=True), atol=1e-4)


def _photos(folder, n=5):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):  # distinct structure: stripes of different widths and colours, plus noise
        y, x = np.mgrid[0:48, 0:64]
        base = ((x // (3 + 2 * i) + y // (5 + i)) % 2)[..., None] * rng.integers(60, 255, 3)
        img = np.clip(base + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"p{i}.png")
    return sorted(folder.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["token", "vlad"])
def test_index_a_folder_with_local_features(tmp_path, capsys, aggregator, monkeypatch, tiny_set_token_model):
    from tokenret.models import local as local_models

    torch.manual_seed(0)
    how = create_local_model("how_r18")
    monkeypatch.setattr(local_models, "create_local_model", lambda *a, **k: how)  # one set of random weights
    photos = _photos(tmp_path / "photos")
    common = [
        "--local",
        "how_r18",
        "--max-size",
        "64",
        "--scales",
        "1",
        "0.7071",
        "--topk",
        "12",
        "--workers",
        "0",
    ]
    if aggregator == "token":
        head = tokenret.models.checkpoints.save_checkpoint(
            tiny_set_token_model().eval(), tmp_path / "head.pth"
        )
        extra = ["--model", "token_set_how_r50", "--checkpoint", str(head)]
    else:  # the CLI path for a codebook: sets of the photos, then k-means
        sets = tmp_path / "sets"
        assert (
            main(
                [
                    "extract-local",
                    *common,
                    "--images",
                    str(tmp_path / "photos"),
                    "--out",
                    str(sets),
                    "--quiet",
                ]
            )
            == 0
        )
        assert main(["codebook", str(sets), "--size", "6", "--out", str(tmp_path / "cb.npy")]) == 0
        extra = ["--codebook", str(tmp_path / "cb.npy")]
    idx = tmp_path / "idx"
    argv = ["index", str(tmp_path / "photos"), "--out", str(idx), *common, "--aggregator", aggregator, *extra]
    assert main([*argv, "--quiet"]) == 0
    capsys.readouterr()
    query = photos[2]
    assert main(["search", str(idx), str(query), "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[str(query)]
    # every score is the inner product of the pipeline's descriptors, computed here independently
    model = LocalAggregateModel.load(idx / "model.pth")
    assert model.kind == aggregator
    with torch.no_grad():
        vec = {p.name: model(to_tensor(load_image(p, 64))[None])[0].numpy() for p in photos}
    assert len(hits) == 5
    for h in hits:
        name = h["path"].rsplit("/", 1)[-1]
        assert h["score"] == pytest.approx(float(vec[name] @ vec[query.name]), abs=1e-3)
    if aggregator == "vlad":  # VLAD tells these photos apart even with random convolutions
        assert hits[0]["path"] == str(query) and hits[0]["score"] - hits[1]["score"] > 0.01


def test_asmk_cannot_be_a_folder_index(tmp_path, capsys):
    argv = [
        "index",
        str(tmp_path),
        "--out",
        str(tmp_path / "i"),
        "--local",
        "how_r18",
        "--aggregator",
        "asmk",
    ]
    with pytest.raises(SystemExit):  # not among the choices
        main(argv)
    assert main([*argv[:-2], "--aggregator", "vlad"]) == 2
    assert "--codebook" in capsys.readouterr().err
