"""Checkpoint reading, validation, saving and downloading (against a local HTTP server)."""

from __future__ import annotations

import http.server
import os
import pickle
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
import torchvision

import tokenret
from release_reference import randomize_state
from tokenret.models import checkpoints as ck
from tokenret.models.registry import Weights, replace_weights, restore_config

SMALL = {"backbone": "resnet18", "dim": 64, "num_tokens": 2, "num_heads": 4, "out_dim": 32}


def _small_token_state(seed=0):
    model = tokenret.create_model("token_r50", **SMALL)
    return randomize_state(model, seed=seed), model


def _descriptor(model, seed=0):
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3, "optim": {}},
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
        lambda sd: {**sd, "classifier.weight": torch.randn(10, 32)},
    ],
    ids=["plain", "state_dict", "model", "ddp-prefix", "with-arcface"],
)
def test_release_layouts_load_from_file_and_dict(tmp_path, wrap):
    state, _ = _small_token_state()
    obj = wrap(state)
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    for source in (path, str(path), obj):
        model = tokenret.create_model("token_r50", checkpoint=source, **SMALL)
        for k, v in state.items():
            assert torch.equal(model.state_dict()[k], v), k


def test_tokenret_checkpoint_round_trip_rebuilds_the_architecture(tmp_path):
    state, model = _small_token_state(seed=4)
    model.load_state_dict(state)
    path = ck.save_checkpoint(model, tmp_path / "sub" / "mine.pth", epoch=2)
    loaded = tokenret.create_model("token_r50", checkpoint=path)  # no overrides needed
    assert loaded.model_kwargs["backbone"] == "resnet18" and loaded.descriptor_dim == 32
    torch.testing.assert_close(_descriptor(loaded), _descriptor(model))
    assert not (tmp_path / "sub" / "mine.pth.tmp").exists()
    with pytest.raises(ck.CheckpointError, match="saved by tokenret for model 'token_r50'"):
        tokenret.create_model("token_r101", checkpoint=path)


def test_missing_key_is_named(tmp_path):
    state, _ = _small_token_state()
    del state["tr.decoder.0.mlp.fc1.weight"]
    with pytest.raises(ck.CheckpointError) as e:
        tokenret.create_model("token_r50", checkpoint=state, **SMALL)
    msg = str(e.value)
    assert "missing keys: tr.decoder.0.mlp.fc1.weight" in msg and "token_r50" in msg and "TokenModel" in msg


def test_wrong_shape_is_named():
    state, _ = _small_token_state()
    state["tr.proj.0.weight"] = torch.zeros(32, 100)
    with pytest.raises(ck.CheckpointError, match=r"tr.proj.0.weight expected \(32, 128\) found \(32, 100\)"):
        tokenret.create_model("token_r50", checkpoint=state, **SMALL)


def test_unexpected_key_is_named():
    state, _ = _small_token_state()
    state["tr.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(ck.CheckpointError, match="unexpected keys: tr.extra_layer.weight"):
        tokenret.create_model("token_r50", checkpoint=state, **SMALL)


def test_file_of_another_model_fails_clearly():
    rmac = randomize_state(tokenret.create_model("rmac_r101", backbone="resnet18", dim=16))
    with pytest.raises(ck.CheckpointError, match="missing keys: tr.query.*unexpected keys: whiten"):
        tokenret.create_model("token_r50", checkpoint=rmac, **SMALL)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, this is text\n",
        b"\xff\xd8\xff\xe0" + os.urandom(500),
        b"<html><body>Quota exceeded</body></html>",
    ],
    ids=["empty", "text", "jpeg-ish", "html"],
)
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ck.CheckpointError, match="not a PyTorch checkpoint"):
        tokenret.create_model("token_r50", checkpoint=path)


def test_checkpoint_without_weights(tmp_path):
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ck.CheckpointError, match="no model weights found"):
        tokenret.create_model("token_r50", checkpoint=path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        tokenret.create_model("token_r50", checkpoint=tmp_path / "nope.pth")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"x": torch.zeros(1)}, "trap": _RunsCode(marker)}
    if protocol == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ck.CheckpointError, match="refused|not a PyTorch checkpoint"):
        tokenret.create_model("token_r50", checkpoint=path)
    assert not marker.exists()


def test_dimensions_are_inferred_from_baseline_files():
    delg = randomize_state(tokenret.create_model("delg_r101", backbone="resnet50", dim=512))
    model = tokenret.create_model("delg_r101", checkpoint=delg, backbone="resnet50")
    assert model.descriptor_dim == 512
    vlad = randomize_state(tokenret.create_model("netvlad_r101", backbone="resnet18", dim=64, num_clusters=3))
    model = tokenret.create_model("netvlad_r101", checkpoint=vlad, backbone="resnet18")
    assert model.descriptor_dim == 64 and model.vlad.num_clusters == 3
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the release froze its trunk


# ------------------------------------------------------------------------------------------ downloads


class _DriveLikeServer:
    """Serves one file behind a Google-Drive-style confirmation page; counts file downloads."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.file_requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                if url.path == "/uc":
                    page = (
                        '<html><form id="download-form" action="/download" method="get">'
                        f'<input type="hidden" name="id" value="{query["id"][0]}">'
                        '<input type="hidden" name="confirm" value="t">'
                        '<input type="hidden" name="uuid" value="abc-123"></form></html>'
                    ).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                elif (
                    url.path == "/download"
                    and query.get("confirm") == ["t"]
                    and query.get("uuid") == ["abc-123"]
                ):
                    outer.file_requests += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(outer.payload)))
                    self.end_headers()
                    self.wfile.write(outer.payload)
                else:
                    self.send_error(404)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def small_release(tmp_path):
    """token_r50 pointed at a small 'released' file; restores the registry afterwards."""
    state, _ = _small_token_state(seed=9)
    path = tmp_path / "release.pth"
    torch.save(state, path)
    old = tokenret.get_model_config("token_r50")
    yield state, path.read_bytes()
    restore_config(old)


def test_pretrained_downloads_once_verifies_and_reuses(small_release, monkeypatch, tmp_path):
    state, payload = small_release
    home = tmp_path / "home"
    monkeypatch.setenv("TOKENRET_HOME", str(home))
    with _DriveLikeServer(payload) as server:
        url = f"http://127.0.0.1:{server.port}/uc?export=download&id=FILEID"
        replace_weights("token_r50", Weights(url=url, filename="R50-Token.pth"))
        m1 = tokenret.create_model("token_r50", pretrained=True, **SMALL)
        m2 = tokenret.create_model("token_r50", pretrained=True, **SMALL)
        assert server.file_requests == 1
    cached = home / "checkpoints" / "R50-Token.pth"
    assert cached.read_bytes() == payload
    assert (home / "checkpoints" / "R50-Token.pth.sha256").read_text().strip() == ck.sha256sum(cached)
    for k, v in state.items():
        assert torch.equal(m1.state_dict()[k], v) and torch.equal(m2.state_dict()[k], v)
    # A cached file that changed afterwards is detected.
    cached.write_bytes(payload[:-10] + b"0123456789")
    with pytest.raises(ck.CheckpointError, match="sha256 differs"):
        tokenret.create_model("token_r50", pretrained=True, **SMALL)


def test_pretrained_checks_a_known_sha256(small_release, monkeypatch, tmp_path):
    _, payload = small_release
    monkeypatch.setenv("TOKENRET_HOME", str(tmp_path / "home"))
    with _DriveLikeServer(payload) as server:
        url = f"http://127.0.0.1:{server.port}/uc?export=download&id=X"
        replace_weights("token_r50", Weights(url=url, filename="R50-Token.pth", sha256="0" * 64))
        with pytest.raises(ck.WeightsUnavailableError, match="expected 0000"):
            tokenret.create_model("token_r50", pretrained=True, **SMALL)
    assert not (tmp_path / "home" / "checkpoints" / "R50-Token.pth").exists()
    assert not (tmp_path / "home" / "checkpoints" / "R50-Token.pth.part").exists()


def test_offline_fails_at_once_naming_url_and_destination(small_release, monkeypatch, tmp_path, free_port):
    monkeypatch.setenv("TOKENRET_HOME", str(tmp_path / "home"))
    url = f"http://127.0.0.1:{free_port}/uc?export=download&id=X"
    replace_weights("token_r50", Weights(url=url, filename="R50-Token.pth"))
    t = time.perf_counter()
    with pytest.raises(ck.WeightsUnavailableError) as e:
        tokenret.create_model("token_r50", pretrained=True)
    assert time.perf_counter() - t < 5
    assert url in str(e.value) and str(tmp_path / "home" / "checkpoints" / "R50-Token.pth") in str(e.value)


def test_imagenet_trunk_weights_come_from_the_torch_hub_cache(tmp_path):
    """The trunk loads torchvision's ImageNet file (renamed to block1..block5) from torch hub's cache."""
    tv = torchvision.models.resnet18(weights=None)
    torch.nn.init.normal_(tv.conv1.weight)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    dest = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(weights.url).path).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tv.state_dict(), dest)
    model = tokenret.create_model("gem_r50", backbone="resnet18", pretrained=True)
    torch.testing.assert_close(model.backbone.block1[0].weight, tv.conv1.weight)
    torch.testing.assert_close(model.backbone.block5[1].conv2.weight, tv.layer4[1].conv2.weight)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = torch.nn.Sequential(*list(tv.eval().children())[:-2])(x)
        torch.testing.assert_close(model.backbone(x), ref)
