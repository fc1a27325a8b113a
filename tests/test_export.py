"""ONNX export (tokenret.export) and the onnxruntime extraction engine, against PyTorch on mini-RPar photos.

Parity bound (issue 17): max abs difference <= 1e-4 and cosine >= 0.99999 between ONNX Runtime's
descriptors and the PyTorch model's, at several sizes (landscape, portrait, a small crop), batch 1 and 3.
Models have random weights and small trunks (ResNet-18; SuperGlobal's pycls trunk at depth 50).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason="optional dependency onnx (pip install -e .[onnx]; .ci/run installs it)")
ort = pytest.importorskip(
    "onnxruntime", reason="optional dependency onnxruntime (pip install -e .[onnx]; .ci/run installs it)"
)

from tokenret.cli import main  # noqa: E402
from tokenret.data.images import load_image, to_tensor  # noqa: E402
from tokenret.export import (  # noqa: E402
    DEFAULT_OPSET,
    ExportError,
    OnnxNetwork,
    OnnxRuntimeMissingError,
    export_onnx,
    read_onnx_metadata,
    require_onnxruntime,
)
from tokenret.extraction import ExtractionConfig, extract_descriptors  # noqa: E402
from tokenret.models.convention import input_convention  # noqa: E402
from tokenret.models.registry import create_model, list_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_ABS, MIN_COS = 1e-4, 0.99999

SMALL = {"backbone": "resnet18"}
#: Small versions of every registry model that exports.
EXPORTABLE = {
    "token_r50": {**SMALL, "dim": 32, "num_heads": 4, "out_dim": 16},
    "token_r101": {**SMALL, "dim": 64, "num_heads": 4, "out_dim": 32},
    "gem_r50": SMALL,
    "gem_r101": {**SMALL, "whiten_dim": 64},
    "delg_r101": {**SMALL, "dim": 64},
    "solar_r101": {**SMALL, "dim": 64},
    "netvlad_r101": {**SMALL, "dim": 64},
    "rmac_r101": {**SMALL, "dim": 64},
    "superglobal_r50": {"depth": 50, "dim": 256},
    "superglobal_r101": {"depth": 50, "dim": 256, "rgem": False, "gem_plus": False},
}
#: Registry models that cannot be exported, and a word of the reason they give.
REFUSED = {
    "token_set_how_r50": ({}, "local descriptors"),
    "token_set_how_r101": ({}, "local descriptors"),
    "token_set_delf_r50": ({}, "local descriptors"),
}
FAST = ("gem_r50", "token_r50")


def test_every_registry_model_is_covered():
    assert set(EXPORTABLE) | set(REFUSED) == set(list_models())


@pytest.fixture(scope="module")
def photos(rparis6k_subset_dir: Path) -> dict[str, list[Path]]:
    """Landscape (1024x768) and portrait mini-RPar photos."""
    from PIL import Image

    by_shape: dict[str, list[Path]] = {"landscape": [], "portrait": []}
    for p in sorted((rparis6k_subset_dir / "jpg").glob("*.jpg")):
        w, h = Image.open(p).size
        if (w, h) == (1024, 768):
            by_shape["landscape"].append(p)
        elif h > w:
            by_shape["portrait"].append(p)
    assert len(by_shape["landscape"]) >= 3 and by_shape["portrait"]
    return by_shape


def _batches(model: torch.nn.Module, photos: dict[str, list[Path]]) -> dict[str, torch.Tensor]:
    """Real photos in the model's convention: batch 1 landscape, portrait and a small crop; batch 3."""
    conv = input_convention(model)
    mean, std = conv.rgb_mean_std

    def tensor(path: Path, max_size: int, box=None) -> torch.Tensor:
        t = to_tensor(load_image(path, max_size, box), mean, std)
        return t.flip(0) if conv.channel_order == "BGR" else t

    return {
        "landscape": tensor(photos["landscape"][0], 144)[None],
        "portrait": tensor(photos["portrait"][0], 128)[None],
        "crop": tensor(photos["landscape"][1], 160, box=(300.5, 200.2, 700.0, 560.9))[None],
        "batch3": torch.stack([tensor(p, 112) for p in photos["landscape"][:3]]),
    }


def _assert_parity(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    diff = float(np.abs(got - expected).max())
    cos = float((got * expected).sum(-1).min() / 1.0)
    assert diff <= MAX_ABS, f"{what}: max abs difference {diff:.3g}"
    assert cos >= MIN_COS, f"{what}: cosine {cos:.7f}"


@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXPORTABLE],
)
def test_onnxruntime_matches_pytorch_on_photos(name, photos, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **EXPORTABLE[name])
    path = tmp_path / f"{name}.onnx"
    meta = export_onnx(model, path, check=False)  # the comparison below is the check
    conv = input_convention(model)
    assert meta["model"] == name and meta["descriptor_dim"] == model.descriptor_dim
    assert meta["input_convention"]["channel_order"] == conv.channel_order
    assert meta["input_convention"]["scales"] == list(conv.scales)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["descriptors", "features"]
    for what, x in _batches(model, photos).items():
        with torch.no_grad():
            expected, features = model(x).numpy(), model.forward_features(x).numpy()
        got, got_features = session.run(None, {"images": x.numpy()})
        assert got.shape == (x.shape[0], model.descriptor_dim)
        _assert_parity(got, expected, f"{name} {what} {tuple(x.shape)}")
        scale = float(np.abs(features).max())
        assert float(np.abs(got_features - features).max()) <= MAX_ABS * max(scale, 1.0), what


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_models_that_cannot_export_say_why(name, tmp_path):
    kwargs, reason = REFUSED[name]
    model = create_model(name, **kwargs)
    with pytest.raises(ExportError, match=reason):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_listed_module(tmp_path, monkeypatch):
    """A module listed in _REFUSED (none at present) stops the export with its reason and where it is."""
    from tokenret.export import onnx as export_module
    from tokenret.models.pooling import RMAC

    monkeypatch.setattr(export_module, "_REFUSED", {RMAC: "R-MAC pooling: the reason"})
    model = create_model("rmac_r101", **EXPORTABLE["rmac_r101"])
    with pytest.raises(
        ExportError, match=r"rmac_r101 cannot be exported: R-MAC pooling: the reason \(module 'pooling'\)"
    ):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_python_value_taken_from_a_tensor(tmp_path, monkeypatch):
    """Without its traceable replacement, R-MAC's region grid (rmac_regions) is read from tensors while
    tracing: refused, with where."""
    from tokenret.export import onnx as export_module
    from tokenret.models.pooling import RMAC

    replacements = {k: v for k, v in export_module._REPLACEMENTS.items() if k is not RMAC}
    monkeypatch.setattr(export_module, "_REPLACEMENTS", replacements)
    model = create_model("rmac_r101", **EXPORTABLE["rmac_r101"])
    with pytest.raises(ExportError, match=r"pooling.py:\d+ turns a tensor into a Python value"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_check_catches_a_graph_that_differs_from_the_model(tmp_path):
    """The check after export (run at two other sizes) compares the file with the model: here a file of
    other weights stands for a graph whose shape arithmetic was fixed at the traced size."""
    from tokenret.export.onnx import _check_parity

    torch.manual_seed(0)
    export_onnx(create_model("gem_r50", **SMALL), tmp_path / "m.onnx", check=False)
    with pytest.raises(ExportError, match="does not reproduce the model at 96x144 pixels"):
        _check_parity(create_model("gem_r50", **SMALL), tmp_path / "m.onnx", "gem_r50")


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxRuntimeMissingError, match=r"tokenret\[onnx\]"):
        require_onnxruntime()


@pytest.fixture(scope="module")
def gem_file(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A small gem_r50 exported with its convention changed to BGR at 200 px (both branches of the deploy
    example's preprocessing)."""
    torch.manual_seed(1)
    model = create_model("gem_r50", **SMALL)
    conv = input_convention(model)
    model.input_convention = conv.replace(
        channel_order="BGR", mean=conv.mean[::-1], std=conv.std[::-1], max_size=200
    )
    path = tmp_path_factory.mktemp("onnx") / "gem.onnx"
    export_onnx(model, path)
    return model, path


def test_deploy_example_reproduces_tokenret_without_tokenret(gem_file, photos):
    model, path = gem_file
    image = photos["portrait"][0]
    # the example runs with tokenret made unimportable: it needs onnxruntime, Pillow and numpy only
    runner = (
        "import runpy, sys; sys.modules['tokenret'] = None; "
        f"sys.argv = ['deploy_example.py', {str(path)!r}, {str(image)!r}]; "
        f"runpy.run_path({str(REPO / 'docs' / 'deploy_example.py')!r}, run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, check=True)
    got = np.asarray(json.loads(out.stdout), dtype=np.float32)
    config = ExtractionConfig.for_model(model, scales=(1.0,), num_workers=0)
    expected = extract_descriptors(model, [image], config=config, progress=False).descriptors[0]
    assert config.max_size == 200
    _assert_parity(got[None], expected[None], "deploy example")


def test_cli_export_and_info(gem_file, tmp_path, capsys, monkeypatch):
    _, path = gem_file
    assert main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "gem_r50" in text and "BGR" in text and "longest side 200" in text
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_onnx_metadata(path)
    # a model that cannot be exported (here R-MAC, refused for the test): one line, exit status 2, no file
    from tokenret.export import onnx as export_module
    from tokenret.models.pooling import RMAC

    monkeypatch.setattr(export_module, "_REFUSED", {RMAC: "R-MAC pooling: the reason"})
    out = tmp_path / "rmac.onnx"
    assert main(["export", "rmac_r101", "--model-arg", "backbone='resnet18'", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenret: error: rmac_r101 cannot be exported: R-MAC") and "\n" not in err
    assert not out.exists()


def test_cli_export_writes_a_file(tmp_path, capsys):
    out = tmp_path / "token.onnx"
    args = ["export", "token_r50", "--out", str(out), "--model-arg"]
    assert main(args + [f"{k}={v!r}" for k, v in EXPORTABLE["token_r50"].items()]) == 0
    assert read_onnx_metadata(out)["model_kwargs"]["dim"] == 32
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_help_opset_is_the_default():
    from tokenret.cli.export import HELP_OPSET

    assert HELP_OPSET == DEFAULT_OPSET


# ------------------------------------------------------------------------------ the onnxruntime engine


def test_engine_is_part_of_the_fingerprint_only_when_not_torch():
    torch_config = ExtractionConfig()
    assert "engine" not in torch_config.fingerprint()  # fingerprints recorded before engines still match
    ort_config = ExtractionConfig(engine="onnxruntime")
    assert ort_config.fingerprint()["engine"] == "onnxruntime"
    assert ExtractionConfig.from_fingerprint(ort_config.fingerprint()).engine == "onnxruntime"
    # a run-time engine of None keeps the recorded one
    assert ExtractionConfig.from_fingerprint(ort_config.fingerprint(), engine=None).engine == "onnxruntime"
    assert ExtractionConfig.from_fingerprint(torch_config.fingerprint(), batch_size=2).engine == "torch"
    with pytest.raises(ValueError, match="engine"):
        ExtractionConfig(engine="tensorrt")
    with pytest.raises(ValueError, match="onnxruntime engine"):
        ExtractionConfig(engine="onnxruntime", amp="bf16")


def _engines_agree(model, paths, tmp_path, monkeypatch, **settings) -> None:
    monkeypatch.setenv("TOKENRET_HOME", str(tmp_path / "home"))
    results = {}
    for engine in ("torch", "onnxruntime"):
        config = ExtractionConfig.for_model(model, engine=engine, num_workers=0, batch_size=2, **settings)
        results[engine] = extract_descriptors(model, paths, config=config, progress=False).descriptors
    _assert_parity(results["onnxruntime"], results["torch"], "engines")
    exported = list((tmp_path / "home" / "onnx").glob("*.onnx"))
    assert len(exported) == 1
    # another copy of the same weights reuses the exported file (no export)
    from tokenret.extraction import onnx_engine

    monkeypatch.setattr(onnx_engine, "export_onnx", None)
    config = ExtractionConfig.for_model(model, engine="onnxruntime", num_workers=0, **settings)
    again = extract_descriptors(copy.deepcopy(model), paths[:1], config=config, progress=False).descriptors
    np.testing.assert_array_equal(again[0], results["onnxruntime"][0])


def test_onnxruntime_engine_matches_torch_multiscale(photos, tmp_path, monkeypatch):
    model = create_model("token_r50", **EXPORTABLE["token_r50"])
    paths = [photos["landscape"][0], photos["portrait"][0]]
    _engines_agree(model, paths, tmp_path, monkeypatch, max_size=96)


@pytest.mark.slow
def test_onnxruntime_engine_matches_torch_superglobal(photos, tmp_path, monkeypatch):
    """SuperGlobal's convention: BGR, torchvision resize per scale, sGeM of the un-normalised outputs."""
    model = create_model("superglobal_r50", **EXPORTABLE["superglobal_r50"])
    paths = [photos["landscape"][0], photos["portrait"][0]]
    _engines_agree(model, paths, tmp_path, monkeypatch, max_size=128, scale_pool="sgem:3")


def test_onnx_network_runs_where_the_model_runs(gem_file):
    model, path = gem_file
    network = OnnxNetwork(path, device="cpu", threads=1)
    assert network.descriptor_dim == model.descriptor_dim
    assert network.input_convention == input_convention(model)
    assert network.multiscale_power == pytest.approx(model.multiscale_power)
    x = torch.randn(2, 3, 64, 80).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        _assert_parity(network(x).numpy(), model(x).numpy(), "OnnxNetwork")
    assert os.path.getsize(path) > 0


@pytest.mark.slow
def test_cli_index_and_search_keep_the_engine(photos, tmp_path, monkeypatch, capsys):
    """`tokenret index --engine onnxruntime` records the engine; `search` describes queries with it, and
    refuses another."""
    monkeypatch.setenv("TOKENRET_HOME", str(tmp_path / "home"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos["landscape"][:3]:
        (folder / p.name).symlink_to(p)
    kwargs = [f"{k}={v!r}" for k, v in EXPORTABLE["token_r50"].items()]
    index = str(tmp_path / "idx")
    common = ["--max-size", "96", "--workers", "0"]
    assert (
        main(
            ["index", str(folder), "--out", index, "--model", "token_r50", "--model-arg", *kwargs]
            + common
            + ["--engine", "onnxruntime", "--quiet"]
        )
        == 0
    )
    capsys.readouterr()
    query = str(folder / photos["landscape"][0].name)
    assert main(["search", index, query, "-k", "1", "--json", "--workers", "0"]) == 0
    hits = json.loads(capsys.readouterr().out)[query]
    assert hits[0]["path"].endswith(photos["landscape"][0].name) and hits[0]["score"] > 0.9999
    assert main(["search", index, query, "--engine", "torch", "--workers", "0"]) == 2
    assert "made with the onnxruntime engine" in capsys.readouterr().err
