"""The `tokenret` command line: its parser (every subcommand, the shared argument groups), models, info,
index, search and serve."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenret
from release_reference import randomize_state
from tokenret.cli import build_parser, local_config_from_args, main, runtime_from_args
from tokenret.models import checkpoints as ck

REPO = Path(__file__).resolve().parents[1]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_has_help(capsys):
    names = list(_subcommands())
    assert {"models", "info", "evaluate", "show-results", "extract-local", "delf-pca", "codebook"} <= set(
        names
    )
    assert {"index", "search", "show", "duplicates", "serve", "train"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: tokenret {name}" in capsys.readouterr().out


# The minimal argv of each command that extracts descriptors.
EXTRACTING = {
    "evaluate": ["evaluate", "--data-root", "D"],
    "index": ["index", "PHOTOS", "--out", "I"],
    "extract-local": ["extract-local", "--local", "how_r18", "--images", "IMAGES", "--out", "OUT"],
    "search": ["search", "I", "q.jpg"],
    "show": ["show", "I", "q.jpg"],
}


def test_commands_that_extract_share_the_run_time_flags_and_defaults():
    parser = build_parser()
    for name, argv in EXTRACTING.items():
        default = runtime_from_args(parser.parse_args(argv))
        assert default == {
            "batch_size": 8,
            "num_workers": 2,
            "device": None,
            "streams": 0,
            "winograd": True,
            "engine": None,  # None: the index's own engine (or torch)
        }, name
        argv = [
            *argv,
            "--batch-size",
            "3",
            "--workers",
            "0",
            "--streams",
            "1",
            "--device",
            "cpu",
            "--no-winograd",
        ]
        given = runtime_from_args(parser.parse_args(argv))
        assert given == {
            "batch_size": 3,
            "num_workers": 0,
            "device": "cpu",
            "streams": 1,
            "winograd": False,
            "engine": None,
        }, name
    for name in ("evaluate", "index", "extract-local"):  # the commands that choose how images are sized
        args = parser.parse_args(EXTRACTING[name])
        assert (args.max_size, args.scales) == (None, None), name  # None: the model's own
    # local extraction takes the same flags as global extraction
    config = local_config_from_args(parser.parse_args([*EXTRACTING["extract-local"], "--streams", "1"]))
    assert (config.max_size, config.num_workers, config.streams, config.device) == (1024, 2, 1, None)


@pytest.mark.slow
def test_the_parser_imports_no_job():
    """`tokenret --help` stays quick: the training engine, the folder index and FAISS load with their job."""
    code = (
        "import sys, tokenret.cli; tokenret.cli.build_parser(); jobs = ('tokenret.train', "
        "'tokenret.collection', 'faiss'); print(sorted(m for m in sys.modules if m.startswith(jobs)))"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in tokenret.list_models():
        assert name in out
    assert "82.16 / 65.75 / 89.40 / 78.44" in out  # R101-Token's released numbers
    for name in ("how_r18", "how_r50", "how_r101", "delf_r50"):  # the local-feature extractors too
        assert f"\n{name} " in out
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


def test_info_flags_weights_with_nan_or_inf(tmp_path, capsys):
    model = tokenret.create_model("token_r50", backbone="resnet18", dim=32, num_heads=4, out_dim=16)
    with torch.no_grad():
        model.backbone.block1[0].weight[0, 0, 0, 0] = float("nan")
        list(model.parameters())[-1].fill_(float("inf"))
    path = ck.save_checkpoint(model, tmp_path / "diverged.pth")
    assert main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    last = [k for k, _ in model.named_parameters()][-1]
    assert "DAMAGED:     2 tensor(s) hold NaN or infinite values" in out
    assert "backbone.block1.0.weight" in out and last in out
    assert main(["info", str(path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["non_finite_keys"] == ["backbone.block1.0.weight", last]
    healthy = ck.save_checkpoint(tokenret.create_model("token_r50", backbone="resnet18", dim=32, num_heads=4,
                                                       out_dim=16), tmp_path / "ok.pth")  # fmt: skip
    assert main(["info", str(healthy)]) == 0 and "DAMAGED" not in capsys.readouterr().out


def test_info_on_a_non_checkpoint_is_an_error(tmp_path, capsys):
    path = tmp_path / "photo.pth"
    path.write_bytes(b"\xff\xd8\xff\xe0JFIF....")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "JPEG" in err and str(path) in err


def _indexed_folder(tmp_path, n=8):
    """n small generated pictures, and the argv that indexes them with a tiny random model."""
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(8, 12, 3), dtype=np.uint8)  # blocky: a distinct picture each
        Image.fromarray(pixels).resize((96, 64), Image.NEAREST).save(photos / f"p{i}.png")
    torch.manual_seed(0)
    model = tokenret.create_model("token_r50", backbone="resnet18", dim=32, num_heads=4, out_dim=16)
    ckpt = ck.save_checkpoint(model, tmp_path / "tiny.pth")
    argv = ["index", str(photos), "--out", str(tmp_path / "idx"), "--model", "token_r50"]
    argv += ["--checkpoint", str(ckpt), "--max-size", "64", "--scales", "1", "--workers", "0", "--quiet"]
    return photos, argv


def test_index_backend_and_refine_options(tmp_path, capsys):
    from tokenret.collection import ImageIndex

    photos, argv = _indexed_folder(tmp_path)
    idx = str(tmp_path / "idx")
    assert main([*argv, "--backend", "HNSW32", "--refine", "4"]) == 0
    assert (
        "search: HNSW32, exact re-ranking of 4 candidates; approximate index current"
        in capsys.readouterr().out
    )
    with ImageIndex(idx) as index:
        assert (index.backend, index.refine, index.ann_status()) == ("HNSW32", 4, "current")
    query = str(photos / "p3.png")
    assert main(["search", idx, query, "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[str((photos / "p3.png").resolve())]
    assert hits[0]["path"] == str((photos / "p3.png").resolve()) and abs(hits[0]["score"] - 1) < 2e-3
    assert main(["index", idx, "--report", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["search"] == {"backend": "HNSW32", "spec": "HNSW32", "refine": 4, "ann": "current"}
    # An IVF spec needs more training vectors than 8 images: refused, the old backend stays.
    assert main(["index", idx, "--backend", "IVF64,PQ4"]) == 2
    assert "cannot build the approximate index 'IVF64,PQ4' over 8 images" in capsys.readouterr().err
    assert main(["index", idx, "--refine", "0", "--json"]) == 0  # refine off, backend kept
    assert json.loads(capsys.readouterr().out) == {
        "backend": "HNSW32",
        "spec": "HNSW32",
        "refine": None,
        "ann": "current",
    }
    assert main(["index", idx, "--backend", "auto", "--check-recall", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        "search: exact (backend auto)" in out
        and "recall@3 of exact vs exact on 8 stored images: 1.0000" in out
    )
    assert not (tmp_path / "idx" / "ann").exists()


def test_serve_loads_the_index_and_its_model(tmp_path, capsys, monkeypatch):
    from tokenret.serve import SearchServer

    _, argv = _indexed_folder(tmp_path, n=3)
    assert main(argv) == 0
    capsys.readouterr()
    started = []

    def stop_at_once(server):
        started.append(server.service)
        raise KeyboardInterrupt

    monkeypatch.setattr(SearchServer, "serve_forever", stop_at_once)
    assert main(["serve", str(tmp_path / "idx"), "--port", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"serving {tmp_path / 'idx'} (3 images, token_r50, backend exact) at http://127.0.0.1:" in out
    assert ">> stopped" in out and started[0].model.descriptor_dim == 16
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "not a tokenret index" in capsys.readouterr().err
