"""The `tokenret` command line: models and info."""

from __future__ import annotations

import json

import torch

import tokenret
from release_reference import randomize_state
from tokenret.cli import main
from tokenret.models import checkpoints as ck


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in tokenret.list_models():
        assert name in out
    assert "82.16 / 65.75 / 89.40 / 78.44" in out  # R101-Token's released numbers
    assert main(["models", "token_*"]) == 0
    assert "rmac_r101" not in capsys.readouterr().out


def test_info_recognises_a_release_style_file(tmp_path, capsys):
    model = tokenret.create_model("rmac_r101", backbone="resnet18", dim=64)
    state = randomize_state(model)
    path = tmp_path / "rmac.pth"
    torch.save(
        {"state_dict": {"module." + k: v for k, v in state.items()}, "classifier.weight": torch.zeros(2)},
        path,
    )
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["matches"] and info["model"] == "rmac_r101"
    assert info["model_kwargs"] == {"dim": 64, "backbone": "resnet18"}
    assert info["descriptor_dim"] == 64 and info["n_tensors"] == len(state)
    assert info["sha256"] == ck.sha256sum(path) and info["size_bytes"] == path.stat().st_size


def test_info_recognises_a_tokenret_checkpoint(tmp_path, capsys):
    model = tokenret.create_model("token_r50", backbone="resnet34", dim=32, num_heads=4, out_dim=16)
    path = ck.save_checkpoint(model, tmp_path / "t.pth")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "model:       token_r50 (backbone resnet34), all weights present" in out
    assert "descriptor:  16-d" in out and "tokenret checkpoint" in out


def test_info_on_a_damaged_file_names_the_problem(tmp_path, capsys):
    model = tokenret.create_model("solar_r101", backbone="resnet18", dim=32)
    state = model.state_dict()
    del state["pooling.v.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    assert main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    assert "no exact match; closest is solar_r101" in out and "missing keys: pooling.v.weight" in out


def test_info_on_a_non_checkpoint_is_an_error(tmp_path, capsys):
    path = tmp_path / "photo.pth"
    path.write_bytes(b"\xff\xd8\xff\xe0JFIF....")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "JPEG" in err and str(path) in err
