"""The local-feature engine: sets in input order, shards that resume, failures kept in place, the model's
own input normalisation, and `tokenret extract-local` / `tokenret codebook` writing what training reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from release_reference import randomize_state
from tokenret.aggregate.codebook import Codebook
from tokenret.cli import main
from tokenret.data.images import load_image, to_tensor
from tokenret.data.local_store import LocalDescriptorStore
from tokenret.extraction import ExtractionError
from tokenret.extraction import local_sets as lx
from tokenret.models.how import create_how, extract_local


class MeanColour(nn.Module):
    """A toy extractor: one descriptor per block of 8 pixels, its mean colour (so sets are checkable)."""

    def __init__(self, mean_std=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.output_dim = 3
        self.runtime = {"scales": [1.0], "features_num": 4}
        if mean_std:
            self.runtime["mean_std"] = mean_std
        self.model_name, self.model_kwargs = "mean_colour", {}
        self.calls = 0

    def extract_local(self, image, scales, topk):
        self.calls += 1
        blocks = image.reshape(3, -1).T.reshape(-1, 8, 3).mean(1) * self.scale  # (h*w/8, 3)
        strength = blocks.norm(dim=1)
        order = torch.argsort(strength, descending=True)[:topk]
        return {"descriptors": blocks[order].detach(), "attention": strength[order].detach()}


@pytest.fixture
def images(write_random_images):
    """Factory: `n` 12x16 PNGs of random pixels in `folder`, their paths as strings (the engine's input)."""

    def write(folder, n, seed=0):
        return [str(p) for p in write_random_images(folder, [(12, 16)] * n, seed=seed, high=255)]

    return write


def _expected(model, path, box=None, max_size=16):
    mean, std = lx.normalisation(model)
    out = model.extract_local(to_tensor(load_image(path, max_size, box), mean, std), [1.0], 4)
    return out["descriptors"].numpy()


def test_sets_follow_input_order_and_use_the_models_normalisation(tmp_path, images):
    paths = images(tmp_path / "im", 5)
    model = MeanColour(mean_std=[[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    cfg = lx.LocalExtractionConfig(max_size=16, num_workers=0)
    boxes = [None, (2, 2, 10, 14), None, None, (0, 0, 8, 8)]
    res = lx.extract_local_sets(model, paths, boxes, cfg, progress=False)
    assert len(res.store) == 5 and not res.failures
    for i, p in enumerate(paths):
        want = _expected(model, p, boxes[i])
        np.testing.assert_allclose(res.store.get(i), want, atol=2e-3)  # stored as float16
    # the normalisation is the model's: ImageNet's would give other values
    raw = np.asarray(Image.open(paths[0]).convert("RGB"), np.float32) / 255
    blocks = ((raw - 0.5) / 0.25).reshape(-1, 8, 3).mean(1)
    strongest = blocks[np.argsort(-np.linalg.norm(blocks, axis=1), kind="stable")[:4]]
    np.testing.assert_allclose(res.store.get(0), strongest, atol=2e-3)


def test_interrupted_run_resumes_without_recomputing_finished_shards(tmp_path, monkeypatch, images):
    paths = images(tmp_path / "im", 7)
    cfg = lx.LocalExtractionConfig(max_size=16, num_workers=0, shard_size=3)
    reference = lx.extract_local_sets(MeanColour(), paths, None, cfg, progress=False).store

    model = MeanColour()
    original = model.extract_local

    def crash_on_fifth(*a, **k):
        if model.calls == 4:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(model, "extract_local", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        lx.extract_local_sets(model, paths, None, cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "shard_00000" / "store.json").is_file()
    assert not (tmp_path / "out" / "shard_00001").exists()

    resumed = MeanColour()
    res = lx.extract_local_sets(resumed, paths, None, cfg, tmp_path / "out", progress=False)
    assert resumed.calls == 4  # shards 1 and 2 only
    for i in range(7):
        np.testing.assert_array_equal(res.store.get(i), reference.get(i))
        np.testing.assert_array_equal(res.store.strengths(i), reference.strengths(i))
    # other settings: the shards are made again
    again = MeanColour()
    lx.extract_local_sets(
        again,
        paths,
        None,
        lx.LocalExtractionConfig(16, topk=2, num_workers=0, shard_size=3),
        tmp_path / "out",
        progress=False,
    )
    assert again.calls == 7
    # a run-time setting of the model that selects features (DELF's score threshold) remakes them too
    cfg2 = lx.LocalExtractionConfig(16, topk=2, num_workers=0, shard_size=3)
    for threshold, calls in ((0.5, 7), (0.5, 0), (0.25, 7)):
        model = MeanColour()
        model.runtime["score_threshold"] = threshold
        lx.extract_local_sets(model, paths, None, cfg2, tmp_path / "out", progress=False)
        assert model.calls == calls, threshold


def test_unreadable_images_keep_their_place_and_are_named(tmp_path, images):
    paths = images(tmp_path / "im", 3)
    bad = tmp_path / "im" / "broken.jpg"
    bad.write_bytes(b"not an image")
    paths.insert(1, str(bad))
    for streams in (1, 3):  # one image at a time, or three threads taking images as they come
        cfg = lx.LocalExtractionConfig(max_size=16, num_workers=0, streams=streams)
        with pytest.raises(ExtractionError, match="broken.jpg"):
            lx.extract_local_sets(MeanColour(), paths, None, cfg, progress=False)
        res = lx.extract_local_sets(
            MeanColour(), paths, None, cfg, tmp_path / f"o{streams}", on_error="record", progress=False
        )
        assert list(res.failures) == [1] and res.failures[1][0] == str(bad)
        assert res.store.lengths.tolist() == [4, 0, 4, 4]
        for i in (0, 2, 3):
            np.testing.assert_allclose(res.store.get(i), _expected(MeanColour(), paths[i]), atol=2e-3)


def test_how_sets_equal_how_extraction_one_by_one(tmp_path, images):
    paths = images(tmp_path / "im", 2)
    torch.manual_seed(0)
    model = create_how("how_r18")
    cfg = lx.LocalExtractionConfig(max_size=64, scales=(1.0, 0.5), topk=5, num_workers=0)
    res = lx.extract_local_sets(model, paths, None, cfg, progress=False)
    for i, p in enumerate(paths):
        want = extract_local(model, to_tensor(load_image(p, 64)), [1.0, 0.5], 5, l2_normalize=False)
        np.testing.assert_allclose(res.store.get(i), want["descriptors"].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(res.store.strengths(i), want["attention"].numpy(), rtol=1e-6)


def test_extract_local_and_codebook_commands_write_what_training_reads(tmp_path, monkeypatch, caplog, images):
    from tokenret.models import local as local_models

    for cls in ("a", "b"):
        images(tmp_path / "train" / cls, 3, seed=ord(cls))
    (tmp_path / "train" / "b" / "zz_broken.png").write_bytes(b"garbage")
    monkeypatch.setattr(local_models, "create_local_model", lambda *a, **k: MeanColour())
    out = tmp_path / "sets"
    argv = [
        "extract-local",
        "--local",
        "how_r18",
        "--data-format",
        "folders",
        "--data-root",
        str(tmp_path / "train"),
    ]
    run = [*argv, "--out", str(out), "--max-size", "16", "--scales", "1", "0.5", "--workers", "0", "--quiet"]
    assert main(run) == 0
    store = LocalDescriptorStore.load(out / "descriptors")
    labels = (out / "labels.txt").read_text().split()
    assert len(store) == len(labels) == 7 and labels.count("a") == 3 and labels.count("b") == 4
    assert store.lengths.tolist().count(0) == 1  # the broken file: an empty set, named in failures.json
    assert list(json.loads((out / "failures.json").read_text())) == [
        str(tmp_path / "train" / "b" / "zz_broken.png")
    ]

    assert main(["codebook", str(out), "--size", "4", "--out", str(tmp_path / "cb.npy")]) == 0
    assert "extracted at scales [1.0, 0.5]" in caplog.text  # HOW's codebook is learnt at scale 1 only
    cb = Codebook.load(tmp_path / "cb.npy")
    assert cb.size == 4 and cb.dim == 3
    # every centroid lies inside the data's range (k-means means of stored descriptors)
    x = np.concatenate([store.get(i) for i in range(len(store))])
    assert (cb.centroids >= x.min(0) - 1e-4).all() and (cb.centroids <= x.max(0) + 1e-4).all()


def _worker(rank, paths, out_dir, result_dir):
    cfg = lx.LocalExtractionConfig(max_size=16, num_workers=0, shard_size=2, device="cpu")
    res = lx.extract_local_sets(MeanColour(), paths, None, cfg, out_dir, progress=False)
    lengths = res.store.lengths
    flat = np.concatenate([res.store.get(i) for i in range(len(res.store))])
    np.savez(f"{result_dir}/rank{rank}.npz", lengths=lengths, flat=flat)


@pytest.mark.slow
def test_two_processes_share_the_shards_and_both_read_every_set(tmp_path, images, run_ranks):
    paths = images(tmp_path / "im", 7)
    out, results = tmp_path / "shards", tmp_path / "results"
    results.mkdir()
    run_ranks(_worker, paths, str(out), str(results), world=2)
    single = lx.extract_local_sets(
        MeanColour(), paths, None, lx.LocalExtractionConfig(16, num_workers=0), progress=False
    )
    want = np.concatenate([single.store.get(i) for i in range(7)])
    for r in (0, 1):
        got = np.load(results / f"rank{r}.npz")
        assert got["lengths"].tolist() == single.store.lengths.tolist()
        np.testing.assert_array_equal(got["flat"], want)
    assert sorted(p.name for p in out.glob("shard_*") if p.is_dir()) == [f"shard_{s:05d}" for s in range(4)]


def test_a_selection_that_keeps_nothing_is_reported(tmp_path, caplog, images):
    from tokenret.aggregate.aggregators import learn_codebook

    paths = images(tmp_path / "im", 2)
    model = MeanColour()
    model.runtime["features_num"] = 0  # keeps nothing (like DELF's threshold with untrained attention)
    res = lx.extract_local_sets(
        model, paths, None, lx.LocalExtractionConfig(16, topk=None, num_workers=0), progress=False
    )
    assert res.store.lengths.tolist() == [0, 0]
    assert "2 of 2 readable images gave no local feature" in caplog.text
    with pytest.raises(ValueError, match="every set is empty"):
        learn_codebook([res.store.get(0), res.store.get(1)], 4)


def test_store_keeps_float32_exactly_and_float16_by_default(tmp_path):
    import json

    from tokenret.data.local_store import LocalDescriptorStore

    rng = np.random.default_rng(0)
    sets = [rng.standard_normal((n, 5)).astype(np.float32) * 37.1 for n in (3, 0, 4)]
    stores = {}
    for dtype in ("float16", "float32"):
        store = LocalDescriptorStore(5, dtype=dtype)
        for x in sets:
            store.add(x)
        loaded = LocalDescriptorStore.load(store.save(tmp_path / dtype))
        assert loaded.dtype == np.dtype(dtype) and loaded.lengths.tolist() == [3, 0, 4]
        stores[dtype] = loaded
    for i, x in enumerate(sets):
        np.testing.assert_array_equal(stores["float32"].get(i), x)  # bit for bit
        np.testing.assert_array_equal(stores["float16"].get(i), x.astype(np.float16).astype(np.float32))
    assert not np.array_equal(stores["float16"].get(0), sets[0])
    # stores written before the option (no dtype in the header) are float16
    header = tmp_path / "float16" / "store.json"
    old = json.loads(header.read_text())
    del old["dtype"]
    header.write_text(json.dumps(old))
    assert LocalDescriptorStore.load(tmp_path / "float16").dtype == np.float16
    with pytest.raises(ValueError, match="dtype"):
        LocalDescriptorStore.concatenate([stores["float16"], stores["float32"]])
    with pytest.raises(ValueError, match="dtype"):
        LocalDescriptorStore(5, dtype="int8")


def test_float32_sets_are_the_extractors_own_values_and_cached_apart(tmp_path, images):
    paths = images(tmp_path / "im", 3)
    cfg16 = lx.LocalExtractionConfig(max_size=16, num_workers=0)
    cfg32 = lx.LocalExtractionConfig(max_size=16, num_workers=0, dtype="float32")
    model = MeanColour()
    half = lx.extract_local_sets(model, paths, None, cfg16, tmp_path / "out", progress=False).store
    exact = lx.extract_local_sets(model, paths, None, cfg32, tmp_path / "out", progress=False).store
    assert model.calls == 6  # float32 sets are not the cached float16 ones
    assert half.dtype == np.float16 and exact.dtype == np.float32
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(exact.get(i), _expected(MeanColour(), p))
    with pytest.raises(ValueError, match="dtype"):
        lx.LocalExtractionConfig(dtype="float64")


# --- the fast trunk copy (folded, fused, channels_last, NNPACK 3x3s in one-thread streams) ----------------


def _by_place(out: dict) -> dict:
    """Features keyed by (scale, location): the fast copy may order near-equal strengths differently."""
    keys = torch.cat(
        [out["scales"].float().reshape(-1, 1), out["locations"].float().reshape(len(out["scales"]), -1)], 1
    )
    return {
        tuple(k): (d, a) for k, d, a in zip(keys.tolist(), out["descriptors"], out["attention"], strict=True)
    }


@pytest.mark.parametrize("name", ["how_r18", "delf_r50"])
def test_fast_trunk_selects_the_same_features_with_the_same_values(name):
    from tokenret.models.local import create_local_model

    model = create_local_model(name).eval()
    model.load_state_dict(randomize_state(model))  # BatchNorm statistics that folding must carry
    if "score_threshold" in model.runtime:  # DELF: random weights score below the released threshold
        model.runtime["score_threshold"] = -1.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast = lx.local_inference_model(model, lx.LocalExtractionConfig(), torch.device("cpu"))
    assert fast is not model and isinstance(fast.features, lx.ChannelsLastTrunk)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.features.modules())  # folded
    image = torch.rand(3, 160, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = _by_place(model.extract_local(image, (1.0, 0.7071), 40))
        got = _by_place(fast.extract_local(image, (1.0, 0.7071), 40))
    assert got.keys() == want.keys() and len(want) == 40
    scale = max(d.abs().max().item() for d, _ in want.values())
    for key, (d, a) in want.items():
        torch.testing.assert_close(got[key][0], d, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(got[key][1], a, rtol=1e-4, atol=1e-6)
    # the caller's model is untouched: same modules, same keys in the same order, same values
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.features.modules())


def test_fast_trunk_is_used_only_where_asked_and_possible():
    from tokenret.models.local import create_local_model

    model = create_local_model("how_r18").eval()
    cpu = torch.device("cpu")
    assert lx.LocalExtractionConfig().uses_fast_trunk()
    assert lx.local_inference_model(model, lx.LocalExtractionConfig(dtype="float32"), cpu) is model
    assert lx.local_inference_model(model, lx.LocalExtractionConfig(fast_trunk=False), cpu) is model
    assert lx.local_inference_model(model, lx.LocalExtractionConfig(), torch.device("meta")) is model
    assert lx.local_inference_model(MeanColour(), lx.LocalExtractionConfig(), cpu).__class__ is MeanColour
    fast32 = lx.local_inference_model(model, lx.LocalExtractionConfig(dtype="float32", fast_trunk=True), cpu)
    assert fast32 is not model
    # the command line: --exact-trunk turns it off, --sets-dtype float32 implies it
    from tokenret.cli import build_parser, local_config_from_args

    argv = ["extract-local", "--local", "how_r18", "--images", "IMAGES", "--out", "OUT"]
    parser = build_parser()
    assert local_config_from_args(parser.parse_args(argv)).uses_fast_trunk()
    assert not local_config_from_args(parser.parse_args([*argv, "--exact-trunk"])).uses_fast_trunk()
    assert not local_config_from_args(parser.parse_args([*argv, "--sets-dtype", "float32"])).uses_fast_trunk()


def test_fast_trunk_copy_is_reused_until_the_model_changes():
    from tokenret.models.local import create_local_model

    model = create_local_model("delf_r50").eval()
    cfg, cpu = lx.LocalExtractionConfig(), torch.device("cpu")
    first = lx.local_inference_model(model, cfg, cpu)
    assert lx.local_inference_model(model, cfg, cpu) is first  # one query at a time: no copy each
    model.runtime["score_threshold"] = -1.0  # a run-time setting the copy carries
    second = lx.local_inference_model(model, cfg, cpu)
    assert second is not first and second.runtime["score_threshold"] == -1.0
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # new weights: a new copy
    assert lx.local_inference_model(model, cfg, cpu) is not second
