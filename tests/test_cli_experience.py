"""The command line as a person meets it: instant help, one-line errors, Ctrl-C and closed pipes, an index
that refuses another model, `info`'s load line, pictures without an extension, resumable indexing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenret
from tokenret.cli import build_parser, main
from tokenret.cli.common import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, run_parsed, set_interrupt_hint
from tokenret.models import checkpoints as ck

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss", "PIL", "numpy")


def _run(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


def _tokenret(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return _run(f"import sys; from tokenret.cli import main; sys.exit(main({list(argv)!r}))", **kwargs)


# ------------------------------------------------------------------------------------------------ help


def test_help_of_every_command_imports_no_heavy_library():
    """`tokenret --help` and `tokenret CMD --help` answer at once: torch, faiss, PIL and numpy are imported
    only where a command runs (the import graph is measured, not the time)."""
    code = f"""
import argparse, contextlib, io, sys
import tokenret
from tokenret.cli import build_parser
parser = build_parser()
sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
for argv in [["--help"]] + [[name, "--help"] for name in sub.choices]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, argv
    assert "usage: tokenret" in out.getvalue(), argv
print(len(sub.choices), sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    n, loaded = res.stdout.split(" ", 1)
    assert int(n) >= 13
    assert loaded.strip() == "[]"


def test_the_package_loads_its_registry_on_first_use():
    res = _run("import sys, tokenret; print('torch' in sys.modules)")
    assert res.stdout.strip() == "False", res.stderr
    from tokenret import create_model, get_model_config, list_models  # noqa: F401 (PEP 562 names)

    assert tokenret.create_model is create_model and "token_r50" in tokenret.list_models()
    assert {"create_model", "list_models"} <= set(dir(tokenret))
    with pytest.raises(AttributeError):
        tokenret.no_such_name  # noqa: B018


def test_the_help_text_scales_are_the_released_ones():
    from tokenret.cli.common import HELP_SCALES
    from tokenret.extraction import RELEASE_SCALES

    assert HELP_SCALES == RELEASE_SCALES


# -------------------------------------------------------------------------------------- errors, Ctrl-C


def test_a_user_error_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nothing.pth")
    res = _tokenret("info", missing)
    assert res.returncode == 2
    assert (
        res.stderr.count("\n") == 1 and res.stderr.startswith("tokenret: error: ") and missing in res.stderr
    )
    assert "Traceback" not in res.stderr
    res = _tokenret("-v", "info", missing)
    assert res.returncode == 2 and "Traceback" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith("tokenret: error: ")


def test_a_multi_line_message_is_printed_on_one_line(capsys):
    args = build_parser().parse_args(["models"])

    def fails(_):
        raise ValueError("first\n  second\n")

    args.func = fails
    assert run_parsed(args) == 2
    assert capsys.readouterr().err == "tokenret: error: first; second\n"


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["index", "PHOTOS", "--out", "I"], "run the same command again"),
        (["evaluate", "--data-root", "D", "--cache-dir", "C"], "cached in C"),
        (["extract-local", "--local", "how_r18", "--images", "P", "--out", "O"], str(Path("O") / "shards")),
    ],
)
def test_ctrl_c_stops_with_a_resume_hint(argv, hint, capsys, monkeypatch):
    """Ctrl-C while a job runs: no traceback, exit status 130, and how to go on."""
    import tokenret.benchmark
    import tokenret.collection
    import tokenret.extraction

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    for module, name in (
        (tokenret.collection.ImageIndex, "create"),
        (tokenret.benchmark, "run_benchmark"),
        (tokenret.extraction, "extract_local_sets"),
    ):
        monkeypatch.setattr(module, name, interrupted)
    monkeypatch.setattr("tokenret.cli.common.model_from_args", lambda args: None)
    monkeypatch.setattr("tokenret.cli.collection.model_from_args", lambda args: None)
    monkeypatch.setattr("tokenret.cli.evaluate.model_from_args", lambda args: None)
    monkeypatch.setattr("tokenret.cli.local.local_model_from_args", lambda args: None)
    monkeypatch.setattr("tokenret.data.files.find_images", lambda folder: [Path("a.jpg")])
    assert main(argv) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "tokenret: interrupted; " in err and hint in err and "Traceback" not in err


def test_ctrl_c_in_train_names_resume_and_the_output_folder(tmp_path, capsys, monkeypatch):
    def interrupted(cfg, resume):
        raise KeyboardInterrupt

    monkeypatch.setattr("tokenret.train.command.run_training", interrupted)
    out = tmp_path / "runs" / "x"
    argv = ["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "data.root=photos"]
    assert main([*argv, "--output-dir", str(out)]) == EXIT_INTERRUPTED
    assert f"`tokenret train --resume --output-dir {out}`" in capsys.readouterr().err


def test_verbose_ctrl_c_shows_where(capsys):
    args = build_parser().parse_args(["-v", "models"])
    set_interrupt_hint(args, "go on")

    def interrupted(_):
        raise KeyboardInterrupt

    args.func = interrupted
    assert run_parsed(args) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("tokenret: interrupted; go on")


def test_a_closed_stdout_ends_quietly():
    """`tokenret models | head -1` (the reader gone before the writer is done): no error, no traceback."""
    script = f"""
import subprocess, sys
writer = subprocess.Popen([sys.executable, "-m", "tokenret.cli", "models"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={dict(os.environ, PYTHONPATH=str(REPO / "src"))!r})
writer.stdout.close()  # the reader has gone before the first line is written
err = writer.stderr.read().decode()
print(writer.wait(), repr(err))
"""
    res = _run(script)
    rc, err = res.stdout.split(" ", 1)
    assert int(rc) in (0, EXIT_BROKEN_PIPE) and err.strip() == "''", res.stderr
    # and through a shell pipe into `head -1`
    cmd = f"{sys.executable} -m tokenret.cli models 2>&1 | head -1"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert res.stdout.startswith("model ") and res.stdout.count("\n") == 1 and res.stderr == ""


# ------------------------------------------------------------------------------- the index's own model


def _photos(folder: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(8, 12, 3), dtype=np.uint8)  # blocky: a distinct picture each
        Image.fromarray(pixels).resize((96, 64), Image.NEAREST).save(folder / f"p{i:02d}.png")
    return folder


def _tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = tokenret.create_model("token_r50", backbone="resnet18", dim=32, num_heads=4, out_dim=16)
    return ck.save_checkpoint(model, path)


RUN_FLAGS = ["--max-size", "64", "--scales", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> dict[str, Path]:
    """A 6-image index made with a tiny token_r50 saved by tokenret, indexed without --model."""
    root = tmp_path_factory.mktemp("tiny_index")
    photos = _photos(root / "photos", 6)
    ckpt = _tiny_checkpoint(root / "tiny.pth")
    index = root / "idx"
    assert (
        main(["index", str(photos), "--out", str(index), "--checkpoint", str(ckpt), *RUN_FLAGS, "--quiet"])
        == 0
    )
    return {
        "photos": photos,
        "checkpoint": ckpt,
        "index": index,
        "other": _tiny_checkpoint(root / "o.pth", 1),
    }


def test_a_checkpoint_saved_by_tokenret_names_its_own_model(tiny_index):
    from tokenret.collection import ImageIndex

    with ImageIndex(tiny_index["index"]) as index:  # indexed with --checkpoint alone
        assert index.settings["model"] == "token_r50"
        assert index.settings["model_kwargs"]["backbone"] == "resnet18" and len(index) == 6


def test_search_refuses_another_model_with_what_the_index_holds(tiny_index, capsys):
    query = str(tiny_index["photos"] / "p00.png")
    argv = ["search", str(tiny_index["index"]), query, "-k", "2", "--workers", "0"]
    for extra, flag in (
        (["--model", "token_r101"], "--model token_r101"),
        (["--model-arg", "num_tokens=3"], "--model-arg num_tokens=3"),
        (["--checkpoint", str(tiny_index["other"])], f"--checkpoint {tiny_index['other']}"),
    ):
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"tokenret: error: {flag}")
        assert "token_r50" in err and str(tiny_index["checkpoint"]) in err and "leave out --model" in err
    # the index's own file (or a copy of it) and its own name are accepted
    assert main([*argv, "--checkpoint", str(tiny_index["checkpoint"]), "--model", "token_r50", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[query]
    assert hits[0]["path"].endswith("p00.png")


def test_serve_refuses_other_weights_before_it_listens(tiny_index, capsys, monkeypatch):
    monkeypatch.setattr("tokenret.serve.serve", lambda *a, **k: pytest.fail("served"))
    assert main(["serve", str(tiny_index["index"]), "--checkpoint", str(tiny_index["other"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds other weights" in err and "token_r50" in err


def test_serve_uses_the_model_it_checked(tiny_index, monkeypatch):
    """--checkpoint is checked against the index by building the model once; the server is handed that
    model instead of building it again (start-up work done once)."""
    from tokenret.collection import ImageIndex
    from tokenret.serve import service

    got = {}

    def fake_serve(index, **kwargs):  # what the server would open, without listening
        got["service"] = service.SearchService.open(index, kwargs["checkpoint"], model=kwargs["model"])
        got["service"].close()

    monkeypatch.setattr("tokenret.serve.serve", fake_serve)
    real_load = ImageIndex.load_model
    loads = []

    def counting_load(self, *a, **k):
        loads.append(a)
        return real_load(self, *a, **k)

    monkeypatch.setattr(ImageIndex, "load_model", counting_load)
    assert main(["serve", str(tiny_index["index"]), "--checkpoint", str(tiny_index["checkpoint"])]) == 0
    assert len(loads) == 1 and got["service"].model is not None
    assert got["service"].model.model_name == "token_r50"


# -------------------------------------------------------------------------------------------------- info


@pytest.mark.parametrize("saved_by", ["tokenret", "state dict"])
def test_info_load_line_rebuilds_the_file(saved_by, tmp_path, capsys):
    """The `load with:` line, run as it is printed, rebuilds the file's model: name and arguments."""
    torch.manual_seed(0)
    model = tokenret.create_model(
        "token_r50", backbone="resnet18", num_tokens=8, dim=32, num_heads=4, out_dim=24
    )
    path = tmp_path / "r50.pth"
    if saved_by == "tokenret":
        ck.save_checkpoint(model, path)
    else:
        torch.save(model.state_dict(), path)
    assert main(["info", str(path)]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    call = lines["load with"].strip()
    assert call.startswith("tokenret.create_model('token_r50'")
    for argument in ("backbone='resnet18'", "num_tokens=8", "out_dim=24"):
        assert argument in call
    loaded = eval(call, {"tokenret": tokenret})  # the line as a user would paste it
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    flags = lines["flags"].split()
    assert flags[-2:] == ["--checkpoint", str(path)]
    if saved_by == "tokenret":
        assert flags == ["--checkpoint", str(path)]  # the file names its model
    else:
        assert flags[:2] == ["--model", "token_r50"] and "backbone=resnet18" in flags


# ------------------------------------------------------------------------------------------- pictures


def test_show_results_without_an_extension_writes_a_png(shared_data, tmp_path):
    from PIL import Image

    from tokenret.data.revisited import RevisitedDataset

    ds = RevisitedDataset.from_root(shared_data, "rparis6k_subset")
    report = {"datasets": {"rparis6k_subset": {"top_ranks": [list(range(4))] * len(ds.qimlist)}}}
    (tmp_path / "r.json").write_text(json.dumps(report))
    argv = ["show-results", "--report", str(tmp_path / "r.json"), "--data-root", str(shared_data)]
    argv += [
        "--dataset",
        "rparis6k_subset",
        "--queries",
        "0",
        "--top",
        "3",
        "--out",
        str(tmp_path / "evalshow"),
    ]
    assert main(argv) == 0
    with Image.open(tmp_path / "evalshow.png") as img:
        assert img.format == "PNG"
    assert not (tmp_path / "evalshow").exists()


# ------------------------------------------------------------------------------ progress and commits


def test_an_interrupted_index_keeps_what_it_committed_and_a_rerun_says_so(tmp_path, capsys, monkeypatch):
    """Commits every ~60 s of extraction (a fake clock: 20 s an image), so Ctrl-C loses at most the work
    since the last one; running the same command again describes only the rest and reports what it kept."""
    from tokenret.collection import ImageIndex, facade

    photos = _photos(tmp_path / "photos", 16)
    ckpt = _tiny_checkpoint(tmp_path / "tiny.pth")
    argv = ["index", str(photos), "--out", str(tmp_path / "idx"), "--checkpoint", str(ckpt), *RUN_FLAGS]
    now, described, calls = [0.0], [0], []
    real_extract = facade.extract_descriptors

    def slow_then_interrupted(model, paths, *args, **kwargs):
        calls.append(len(paths))
        if described[0] + len(paths) > 13:  # Ctrl-C during the 14th image
            raise KeyboardInterrupt
        result = real_extract(model, paths, *args, **kwargs)
        described[0] += len(paths)
        now[0] += 20.0 * len(paths)
        return result

    monkeypatch.setattr(facade, "_clock", lambda: now[0])
    monkeypatch.setattr(facade, "extract_descriptors", slow_then_interrupted)
    assert main([*argv, "--quiet"]) == EXIT_INTERRUPTED
    assert "run the same command again" in capsys.readouterr().err
    # the first commit: 8 images (the pace unknown); then 60 s / 20 s = 3 images a commit; the third is cut
    assert calls == [facade.FIRST_COMMIT, 3, 3]
    with ImageIndex(tmp_path / "idx") as index:
        assert len(index) == 11 and index.verify().ok
    monkeypatch.setattr(facade, "extract_descriptors", real_extract)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "added 5, updated 0, unchanged 11" in captured.out and "kept 11 image(s)" in captured.out
    assert "img/s" in captured.err or "s/img" in captured.err  # the bar's rate
    assert "16/16" in captured.err


def test_the_index_bar_moves_image_by_image(tmp_path, monkeypatch):
    """One bar over every commit, advanced by each batch of the extraction (batch size 1: each image)."""
    import tqdm.auto

    from tokenret.collection import ImageIndex, facade

    photos = _photos(tmp_path / "photos", 5)
    ckpt = _tiny_checkpoint(tmp_path / "tiny.pth")
    argv = ["index", str(photos), "--out", str(tmp_path / "idx"), "--checkpoint", str(ckpt), *RUN_FLAGS]
    updates = []
    real_update = tqdm.auto.tqdm.update

    def record(bar, n=1):
        updates.append((bar.desc, bar.unit, n))
        return real_update(bar, n)

    monkeypatch.setattr(tqdm.auto.tqdm, "update", record)
    monkeypatch.setattr(facade, "FIRST_COMMIT", 2)
    assert main([*argv, "--batch-size", "1", "--streams", "1"]) == 0
    assert [u for u in updates if u[2]] == [("index", "img", 1)] * 5
    with ImageIndex(tmp_path / "idx") as index:
        assert len(index) == 5


@pytest.mark.parametrize("kind", ["global", "local"])
def test_a_shard_is_written_in_pieces_so_an_interruption_loses_a_minute(kind, tmp_path, monkeypatch):
    """evaluate / extract-local: a shard is written as pieces of about a minute's work (a fake clock: 20 s an
    image); Ctrl-C loses only the piece in progress, and the resumed run starts after the last piece."""
    import numpy as np

    from tokenret.data.local_store import LocalDescriptorStore
    from tokenret.extraction import shards
    from tokenret.extraction.local_sets import LocalShardStore

    store = (shards.ShardStore if kind == "global" else LocalShardStore)(tmp_path / "s", n=30, shard_size=20)
    now, calls, interrupt_at = [0.0], [], [17]

    def extract_range(indices, bar):
        calls.append((indices.start, indices.stop))
        if indices.stop > interrupt_at[0]:
            raise KeyboardInterrupt
        now[0] += 20.0 * len(indices)
        bar.update(len(indices))
        rows = np.array([[i, -i] for i in indices], np.float32)
        failures = {i: (f"p{i}.jpg", "unreadable") for i in indices if i % 7 == 0}
        if kind == "global":
            return rows, failures
        sets = LocalDescriptorStore(2, dtype="float32")
        for row in rows:
            sets.add(np.repeat(row[None], 2, axis=0))
        return sets, failures

    monkeypatch.setattr(shards, "_clock", lambda: now[0])
    manifest = {"n": 30, "kind": kind}
    with pytest.raises(KeyboardInterrupt):
        store.fill(manifest, extract_range, progress=False, desc="x")
    assert calls == [
        (0, shards.FIRST_PIECE),
        (8, 11),
        (11, 14),
        (14, 17),
        (17, 20),
    ]  # 60 s / 20 s = 3 a piece
    assert store.finished_pieces(0) == [range(0, 8), range(8, 11), range(11, 14), range(14, 17)]
    calls.clear()
    interrupt_at[0] = 30
    store.fill(manifest, extract_range, progress=False, desc="x")
    assert calls[0] == (17, 20)  # resumed after the last piece
    assert not list((tmp_path / "s").glob("*.pieces"))  # merged into their shards
    if kind == "global":
        rows, failures = store.read_all(2)
        first = rows[:, 0]
    else:
        result = store.read_all()
        rows, failures = result.store, result.failures
        first = np.array([rows.get(i)[0, 0] for i in range(30)])
    np.testing.assert_array_equal(first, np.arange(30))
    assert sorted(failures) == [0, 7, 14, 21, 28]


def test_index_with_another_model_than_the_checkpoint_records_is_one_line(tiny_index, tmp_path, capsys):
    argv = ["index", str(tiny_index["photos"]), "--out", str(tmp_path / "idx"), "--model", "token_r101"]
    assert main([*argv, "--checkpoint", str(tiny_index["checkpoint"]), *RUN_FLAGS, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "saved by tokenret for token_r50" in err and "leave out --model" in err
    assert "create_model" not in err


# ------------------------------------------------------------------------------------------------ README


def _readme_commands() -> list[list[str]]:
    """Every `tokenret ...` command line of the README's bash blocks (continuations joined, comments cut)."""
    import re
    import shlex

    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if "tokenret" in argv:
                commands.append(argv[argv.index("tokenret") + 1 :])
            elif "tokenret.cli" in argv:  # torchrun ... -m tokenret.cli train ...
                commands.append(argv[argv.index("tokenret.cli") + 1 :])
    return commands


def test_every_readme_command_names_a_command_and_its_flags():
    """A renamed command or flag breaks the build, not the reader: each README command's subcommand answers
    --help, and each of its --flags is one of that subcommand's."""
    import argparse
    import contextlib
    import io

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    commands = _readme_commands()
    assert len(commands) >= 15
    for argv in commands:
        name = next(a for a in argv if not a.startswith("-"))
        assert name in sub, argv
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        known = set(sub[name]._option_string_actions) | set(parser._option_string_actions)
        flags = {a.split("=")[0] for a in argv if a.startswith("-") and a != "-" and not a[1:2].isdigit()}
        assert flags <= known, (argv, sorted(flags - known))
