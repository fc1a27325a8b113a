"""The extraction engine: multi-scale combination, batching, shards, resume, failures, torchrun."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenret
from tokenret.data.images import load_image, to_tensor
from tokenret.extraction import descriptors as ex


@pytest.fixture
def model(tiny_token_model):
    """The tiny Token model in eval mode, with non-zero attention outputs as in trained weights."""
    torch.manual_seed(0)
    model = tiny_token_model()
    for m in model.modules():
        if isinstance(m, tokenret.models.token.Attention):
            torch.nn.init.normal_(m.proj.weight, std=0.05)
    return model.eval()


@pytest.fixture
def images(tmp_path, write_random_images):
    """Seven JPEGs of random pixels in tmp_path/imgs, of the sizes `SIZES`."""
    return write_random_images(tmp_path / "imgs", SIZES, suffix=".jpg", quality=90)


def release_loop(model, paths, boxes, max_size, scales):
    """One image at a time, per-scale interpolation, mean of normalised outputs: the release's loop."""
    out = []
    with torch.no_grad():
        for p, b in zip(paths, boxes, strict=True):
            x = to_tensor(load_image(p, max_size, b))[None]
            v = torch.zeros(model.descriptor_dim)
            for s in scales:
                xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                v += model(xs)[0]
            out.append(F.normalize(v / len(scales), dim=0).numpy())
    return np.stack(out)


SIZES = [(96, 72), (72, 96), (96, 72), (80, 80), (96, 72), (100, 64), (72, 96)]


def test_batched_multiscale_extraction_equals_the_release_loop(model, images):
    paths = images
    boxes = [None] * len(paths)
    boxes[2] = (10.4, 5.5, 70.6, 60.2)
    cfg = ex.ExtractionConfig(max_size=90, batch_size=3, num_workers=0)
    ours = ex.extract_descriptors(model, paths, boxes, cfg, progress=False).descriptors
    ref = release_loop(model, paths, boxes, 90, ex.RELEASE_SCALES)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # single scale, no channels_last, workers: same numbers
    cfg1 = ex.ExtractionConfig(max_size=90, scales=(1.0,), batch_size=4, num_workers=2, channels_last=False)
    ours1 = ex.extract_descriptors(model, paths, None, cfg1, progress=False).descriptors
    np.testing.assert_allclose(ours1, release_loop(model, paths, [None] * 7, 90, (1.0,)), atol=2e-5)


def test_bf16_autocast_stays_close_to_float32(model, images):
    paths = images[:3]
    cfg = ex.ExtractionConfig(max_size=90, num_workers=0)
    f32 = ex.extract_descriptors(model, paths, config=cfg, progress=False)
    bf16 = ex.extract_descriptors(
        model, paths, config=ex.ExtractionConfig(max_size=90, num_workers=0, amp="bf16"), progress=False
    )
    cos = (f32.descriptors * bf16.descriptors).sum(1)
    assert cos.min() > 0.98
    with pytest.raises(ValueError, match="fp16 compute is very slow"):
        cfg16 = ex.ExtractionConfig(amp="fp16", device="cpu")
        ex.extract_descriptors(model, paths, config=cfg16, progress=False)


def test_unreadable_images_are_reported_never_dropped(tmp_path, model, images):
    paths = images[:4]
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(paths[0].read_bytes()[:200])
    text = tmp_path / "imgs" / "notes.jpg"
    text.write_text("not an image")
    all_paths = [paths[0], bad, paths[1], text, paths[2]]
    cfg = ex.ExtractionConfig(max_size=90, num_workers=0)
    with pytest.raises(ex.ExtractionError) as e:
        ex.extract_descriptors(model, all_paths, config=cfg, progress=False)
    assert set(e.value.failures) == {1, 3} and str(bad) in str(e.value) and str(text) in str(e.value)
    res = ex.extract_descriptors(model, all_paths, config=cfg, on_error="record", progress=False)
    assert np.isnan(res.descriptors[[1, 3]]).all() and np.isfinite(res.descriptors[[0, 2, 4]]).all()


@pytest.mark.slow
def test_interrupted_sharded_run_resumes_without_recomputing(tmp_path, monkeypatch, model, images):
    paths = images
    cfg = ex.ExtractionConfig(max_size=90, num_workers=0, shard_size=2)
    full = ex.extract_descriptors(model, paths, config=cfg, progress=False).descriptors

    calls = []
    real = ex._extract_range
    interrupted = []

    def flaky(*args, **kwargs):
        calls.append(list(args[2]))
        if len(calls) == 3 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt  # the user presses Ctrl-C during the third shard
        return real(*args, **kwargs)

    out = tmp_path / "shards"
    monkeypatch.setattr(ex, "_extract_range", flaky)
    with pytest.raises(KeyboardInterrupt):
        ex.extract_descriptors(model, paths, config=cfg, out_dir=out, progress=False)
    assert sorted(p.name for p in out.glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    calls.clear()
    resumed = ex.extract_descriptors(model, paths, config=cfg, out_dir=out, progress=False).descriptors
    assert calls == [[4, 5], [6]]  # only the unfinished shards ran
    np.testing.assert_allclose(resumed, full, atol=2e-5)  # batches differ between shardings
    # Different settings: the cache is not reused.
    calls.clear()
    cfg2 = ex.ExtractionConfig(max_size=90, num_workers=0, shard_size=2, scales=(1.0,))
    ex.extract_descriptors(model, paths, config=cfg2, out_dir=out, progress=False)
    assert len(calls) == 4


def _worker(rank, model, paths, out_dir, result_dir):
    cfg = ex.ExtractionConfig(max_size=90, num_workers=0, shard_size=2, device="cpu")
    res = ex.extract_descriptors(model, paths, config=cfg, out_dir=out_dir, progress=False)
    np.save(os.path.join(result_dir, f"rank{rank}.npy"), res.descriptors)


@pytest.mark.slow
def test_two_processes_share_the_shards_and_agree(tmp_path, model, images, run_ranks):
    paths = [str(p) for p in images]
    out, results = tmp_path / "shards", tmp_path / "results"
    results.mkdir()
    run_ranks(_worker, model, paths, str(out), str(results), world=2)
    single = ex.extract_descriptors(
        model, paths, config=ex.ExtractionConfig(max_size=90, num_workers=0), progress=False
    ).descriptors
    for r in (0, 1):
        np.testing.assert_allclose(np.load(results / f"rank{r}.npy"), single, atol=1e-5)
    assert len(list(out.glob("shard_*.npy"))) == 4


def test_gem_networks_combine_scales_by_generalised_mean_as_cirtorch(tiny_token_model):
    """cirtorch's multi-scale rule: GeM without a whitening layer -> (mean_s d_s^p)^(1/p); with whitening, or
    for Token (the release's test.py), a plain mean. Checked against a loop written from that rule."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 48)
    scales = (1.0, 2**-0.5, 0.5)

    def per_scale(model):
        with torch.no_grad():
            return [
                F.normalize(model(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear")), dim=-1)
                for s in scales
            ]

    gem = tokenret.create_model("gem_r50", backbone="resnet18").eval()
    with torch.no_grad():
        gem.pooling.p.fill_(2.5)
    assert gem.multiscale_power == 2.5
    ds = per_scale(gem)
    want = F.normalize((sum(d.pow(2.5) for d in ds) / 3).pow(1 / 2.5), dim=-1)
    with torch.no_grad():
        got = ex.multiscale_descriptor(gem, x, scales)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got - F.normalize(sum(ds) / 3, dim=-1)).abs().max() > 1e-4  # not the plain mean
        one = ex.multiscale_descriptor(gem, x, (1.0,))  # one scale: the descriptor itself
        torch.testing.assert_close(one, ds[0], rtol=1e-5, atol=1e-6)
    whitened = tokenret.create_model("gem_r50", backbone="resnet18", whiten_dim=32).eval()
    assert whitened.multiscale_power == 1.0
    token = tiny_token_model().eval()
    ds = per_scale(token)
    with torch.no_grad():
        torch.testing.assert_close(
            ex.multiscale_descriptor(token, x, scales), F.normalize(sum(ds) / 3, dim=-1), rtol=1e-5, atol=1e-6
        )


def test_tokenret_device_sets_the_default_device(monkeypatch):
    monkeypatch.setenv("TOKENRET_DEVICE", "meta")
    assert ex.resolve_device(None) == torch.device("meta")
    assert ex.ExtractionConfig().resolved_device() == torch.device("meta")
    assert ex.resolve_device("cpu") == torch.device("cpu")  # an explicit device wins
    monkeypatch.delenv("TOKENRET_DEVICE")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert ex.resolve_device(None).type == want


@pytest.mark.slow
def test_streams_give_the_single_stream_descriptors_and_failures(tmp_path, model, images):
    paths = images
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(paths[0].read_bytes()[:200])
    all_paths = [*paths[:3], bad, *paths[3:]]
    boxes = [None] * len(all_paths)
    boxes[1] = (10.4, 5.5, 70.6, 60.2)
    results = {}
    for streams in (1, 2, 3):
        cfg = ex.ExtractionConfig(max_size=90, batch_size=2, num_workers=0, streams=streams)
        res = ex.extract_descriptors(model, all_paths, boxes, cfg, on_error="record", progress=False)
        results[streams] = res
    ref = release_loop(model, paths, [boxes[0], boxes[1], boxes[2], *boxes[4:]], 90, ex.RELEASE_SCALES)
    for streams, res in results.items():
        assert set(res.failures) == {3}, streams
        assert np.isnan(res.descriptors[3]).all()
        np.testing.assert_allclose(np.delete(res.descriptors, 3, axis=0), ref, atol=2e-5)


def test_run_streams_shares_the_threads_and_takes_each_item_once():
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        seen = []

        def fn(item):
            seen.append((item, threading.current_thread().name, torch.get_num_threads()))
            assert torch.is_inference_mode_enabled()
            time.sleep(0.01)

        ex.run_streams(iter(range(30)), fn, streams=2)
        assert sorted(i for i, _, _ in seen) == list(range(30))
        assert len({name for _, name, _ in seen}) == 2  # both threads worked
        assert {n for _, _, n in seen} == {2}  # 4 threads shared out, 2 each
        assert torch.get_num_threads() == 4
        # three streams over four threads: 2 + 1 + 1
        seen.clear()
        ex.run_streams(iter(range(30)), fn, streams=3)
        per_thread = {name: n for _, name, n in seen}
        assert sorted(per_thread.values()) == [1, 1, 2] and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_a_stream_out_of_items_hands_its_threads_to_the_busy_one():
    from tokenret.extraction import streams

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}

        def fn(item):
            if item == "long":  # the last item still running when the other stream finds none left
                seen["start"] = torch.get_num_threads()
                deadline = time.monotonic() + 20
                while torch.get_num_threads() < 2 and time.monotonic() < deadline:
                    streams.use_handed_threads()
                    time.sleep(0.005)
                seen["after"] = torch.get_num_threads()

        streams.run_streams(iter(["long", "short"]), fn, streams=2)
        assert seen == {"start": 1, "after": 2}
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        streams.use_handed_threads()  # outside a stream: nothing
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_each_scale_takes_up_handed_threads(monkeypatch, tiny_token_model):
    from tokenret.extraction import multiscale

    calls = []
    model = tiny_token_model().eval()
    monkeypatch.setattr(multiscale, "use_handed_threads", lambda: calls.append("threads"))
    real = model.forward
    monkeypatch.setattr(model, "forward", lambda x: calls.append("forward") or real(x))
    with torch.inference_mode():
        multiscale.multiscale_descriptor(model, torch.randn(1, 3, 40, 48), (1.0, 0.75, 0.5), "mean")
    assert calls == ["threads", "forward"] * 3


@pytest.mark.parametrize("error", [ValueError("bad item"), KeyboardInterrupt()])
def test_run_streams_stops_at_the_first_error_and_raises_it(error):
    done = []

    def fn(item):
        if item == 5:
            raise error
        time.sleep(0.005)
        done.append(item)

    with pytest.raises(type(error)):
        ex.run_streams(iter(range(200)), fn, streams=2)
    assert 5 not in done and len(done) < 20  # the other thread stopped after its current item
    assert not [t for t in threading.enumerate() if t.name.startswith("tokenret-")]


def test_streams_setting():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert ex.ExtractionConfig(streams=3).resolved_streams(cpu) == 3
    assert ex.ExtractionConfig(streams=3).resolved_streams(gpu) == 1
    assert ex.ExtractionConfig(streams=3, compile=True).resolved_streams(cpu) == 1
    before = torch.get_num_threads()
    try:
        for threads, expected in ((1, 1), (2, 2), (8, 2)):
            torch.set_num_threads(threads)
            assert ex.ExtractionConfig().resolved_streams(cpu) == expected
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="streams"):
        ex.ExtractionConfig(streams=-1)
