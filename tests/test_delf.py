"""DELF on a torchvision ResNet-50 (spec local-features.md section 4 and section 6 item 11): trunk grid
and receptive fields, attention and training pooling, multi-scale threshold + top-k selection, PCA,
checkpoints."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from release_reference import batchnorm, randomize_state
from tokenret.models.checkpoints import CheckpointError
from tokenret.models.delf import (
    DELF_MODELS,
    DELF_SCALES,
    MEAN_STD,
    SLIM_BLOCK3_RF,
    TORCHVISION_LAYER3_RF,
    TORCHVISION_LAYER3_S2_RF,
    DELFAttention,
    DELFNet,
    create_delf,
    delf_positions,
    extract_delf,
    learn_pca,
    load_delf_weights,
    receptive_box_centres,
    save_delf,
)
from tokenret.models.how import create_how, feature_positions

HEIGHT, WIDTH = 64, 80


def resized(x: torch.Tensor, s: float) -> torch.Tensor:
    """Bilinear resize to floor(size * s), written out independently of the module."""
    size = (math.floor(x.shape[-2] * s), math.floor(x.shape[-1] * s))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def force_scores(model: DELFNet, value: float) -> None:
    """Every attention score becomes softplus(value)."""
    with torch.no_grad():
        model.attention.conv2.weight.zero_()
        model.attention.conv2.bias.fill_(value)


@pytest.fixture(scope="module")
def delf() -> DELFNet:
    """One random model per module (building ResNet-50 costs 0.3 s); tests that change it take a copy."""
    torch.manual_seed(1)
    return DELFNet().eval()


@pytest.fixture(scope="module")
def delf_classes() -> DELFNet:
    torch.manual_seed(2)
    return DELFNet(num_classes=5).eval()


# ----------------------------------------------------------------------------------------------- network


def test_keys_and_map_size_on_1024x768():
    with torch.device("meta"):
        model = DELFNet()
        how_keys = [k for k in create_how("how_r50").state_dict() if k.startswith("features.")]
        state = model.state_dict()
        assert [k for k in state if k.startswith("features.")] == how_keys  # HOW -R50's trunk layout
        assert {k: tuple(v.shape) for k, v in state.items() if not k.startswith("features.")} == {
            "attention.conv1.weight": (512, 1024, 1, 1),
            "attention.bn.weight": (512,),
            "attention.bn.bias": (512,),
            "attention.bn.running_mean": (512,),
            "attention.bn.running_var": (512,),
            "attention.bn.num_batches_tracked": (),
            "attention.conv2.weight": (1, 512, 1, 1),
            "attention.conv2.bias": (1,),
        }
        stride16 = DELFNet(block3_stride2=False)
        assert (model.stride, stride16.stride, model.output_dim) == (32, 16, 1024)
        assert len(stride16.state_dict()) == len(state)
        x = torch.empty(1, 3, 768, 1024)
        f16 = model.features(x)
        f, a = model.subsample(f16), model.attention(model.subsample(f16))
        assert tuple(f16.shape) == (1, 1024, 48, 64)  # torchvision layer3: stride 16
        assert tuple(f.shape) == (1, 1024, 24, 32) and tuple(a.shape) == (1, 24, 32)


def test_map_sizes_at_every_scale(delf):
    """A 1024x768-shaped image at 1/8 size, through the real network at the 7 scales."""
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        for s in DELF_SCALES:
            xs = resized(x, s)
            f16 = delf.features(xs)
            f, a = delf.forward_scale(xs)
            # every stride-2 step (7x7 p3, 3x3 p1, 1x1 p0) gives ceil(n / 2)
            size = [math.floor(96 * s), math.floor(128 * s)]
            assert list(f16.shape[-2:]) == [math.ceil(n / 16) for n in size]
            assert list(f.shape[-2:]) == list(a.shape[-2:]) == [math.ceil(n / 32) for n in size]
    assert tuple(f.shape[-2:]) == (6, 8)  # scale 2


def _linearised(model: DELFNet) -> DELFNet:
    """Same receptive fields, no ReLU / 3x3 max: a cell's input-gradient support is its receptive field."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d) and child.kernel_size == 3:
                setattr(module, name, nn.AvgPool2d(3, 2, 1))
    return model.eval()


def test_receptive_fields_equal_the_input_gradient_support():
    model = _linearised(DELFNet(block3_stride2=True))
    # wide enough for a whole box across; kernels are square, so the columns stand for both axes
    x = torch.randn(1, 3, 40, 304, requires_grad=True)
    f16 = model.features(x)
    f32 = model.subsample(f16)
    assert f16.shape[-2:] == (3, 19) and f32.shape[-2:] == (2, 10)
    torch.testing.assert_close(f32[0, :, 0, 5], f16[0, :, 0, 10])  # stride-32 cell 5 is stride-16 cell 10
    f32[0, :, 0, 5].sum().backward()
    cols = torch.nonzero(x.grad[0].abs().sum((0, 1)) > 0).flatten()
    for rf, cell in ((TORCHVISION_LAYER3_RF, 10), (TORCHVISION_LAYER3_S2_RF, 5)):
        box = (rf.stride * cell - rf.padding, rf.stride * cell - rf.padding + rf.size - 1)
        assert box == (27, 293)  # inside the 304-px width: not clipped
        assert (cols[0].item(), cols[-1].item()) == box and len(cols) == rf.size
    assert (TORCHVISION_LAYER3_RF.size, TORCHVISION_LAYER3_RF.stride, TORCHVISION_LAYER3_RF.padding) == (
        267,
        16,
        133,
    )
    assert TORCHVISION_LAYER3_S2_RF.stride == 32


@pytest.mark.parametrize("block3_stride2, side", [(True, 32), (False, 16)])
def test_one_cell_map_centre_is_half_rf_minus_padding(block3_stride2, side):
    model = DELFNet(block3_stride2=block3_stride2).eval()
    with torch.no_grad():
        f, a = model.forward_scale(torch.randn(1, 3, side, side))
    assert f.shape[-2:] == (1, 1) and a.shape[-2:] == (1, 1)
    rf = model.receptive_field
    centre = receptive_box_centres(torch.tensor([0]), torch.tensor([0]), rf)[0]
    assert centre.tolist() == [(rf.size - 1) / 2 - rf.padding] * 2 == [rf.centre_offset] * 2
    # all three grids centre cell i on pixel stride * i: positions do not depend on which rf is meant
    for other in (SLIM_BLOCK3_RF, TORCHVISION_LAYER3_RF, TORCHVISION_LAYER3_S2_RF):
        assert other.centre_offset == 0.0
    assert (SLIM_BLOCK3_RF.size, SLIM_BLOCK3_RF.stride, SLIM_BLOCK3_RF.padding) == (291, 32, 145)


def test_positions_are_box_centres_divided_by_the_actual_resize_ratio():
    cols, rows = torch.tensor([0, 1, 3, 2]), torch.tensor([0, 2, 1, 5])
    resized_hw, image_hw = (45, 56), (64, 80)  # scale 0.7071 of 64x80
    pos = delf_positions(cols, rows, SLIM_BLOCK3_RF, resized_hw, image_hw)
    for (x, y), c, r in zip(pos.tolist(), cols.tolist(), rows.tolist(), strict=True):
        cx, cy = 32 * c - 145 + (291 - 1) / 2, 32 * r - 145 + (291 - 1) / 2  # pixel-index box centre
        assert x == pytest.approx((cx + 0.5) * 80 / 56) and y == pytest.approx((cy + 0.5) * 64 / 45)
    # same convention as HOW's positions
    torch.testing.assert_close(pos, feature_positions(cols, rows, 32, resized_hw, image_hw))


def test_attention_is_softplus_of_conv_bn_relu_conv():
    attention = DELFAttention()
    attention.load_state_dict(randomize_state(attention, seed=3, scale=0.05))
    attention.eval()
    f = torch.randn(2, 1024, 3, 4)
    sd = attention.state_dict()
    x = f.permute(0, 2, 3, 1)  # (B, h, w, C)
    hidden = torch.relu(batchnorm(x @ sd["conv1.weight"][:, :, 0, 0].T, sd, "bn"))
    expected = F.softplus(hidden @ sd["conv2.weight"][0, :, 0, 0] + sd["conv2.bias"][0])
    with torch.no_grad():
        torch.testing.assert_close(attention(f), expected, rtol=1e-4, atol=1e-5)
        assert (attention(f) >= 0).all()


def test_attention_pool_is_the_mean_of_score_weighted_normalised_features(delf, delf_classes):
    model = delf_classes
    images = torch.randn(2, 3, HEIGHT, WIDTH)
    with torch.no_grad():
        pooled = model.attention_pool(images)
        logits = model.classify(images)
        f = model.backbone(images)
        a = model.attention(f)
    _, c, h, w = f.shape
    for b in range(2):
        acc = torch.zeros(c)
        for i in range(h):
            for j in range(w):
                v = f[b, :, i, j]
                acc += a[b, i, j] * v / v.norm()
        torch.testing.assert_close(pooled[b], acc / (h * w), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, pooled @ model.logits.weight.T + model.logits.bias)
    torch.testing.assert_close(model(images).detach(), pooled)
    with pytest.raises(ValueError, match="num_classes"):
        delf.classify(images)


def test_training_freezes_trunk_batchnorm_and_detach_stops_trunk_gradients(delf_classes):
    model = copy.deepcopy(delf_classes).train()
    trunk_bn = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training for m in trunk_bn) and model.attention.bn.training
    model.classify(torch.randn(2, 3, 32, 32), detach_features=True).sum().backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert model.attention.conv1.weight.grad is not None and model.logits.weight.grad is not None


# ------------------------------------------------------------------------------------------ extraction


def _by_hand(model: DELFNet, image: torch.Tensor, scales):
    """Per scale: resized size, features (1024, h, w) and scores (h, w), computed apart from extract_local."""
    out = []
    with torch.no_grad():
        for s in scales:
            xs = resized(image[None], s)
            f = model.backbone(xs)
            out.append((s, tuple(xs.shape[-2:]), f[0], model.attention(f)[0]))
    return out


@pytest.mark.parametrize("k_above, topk", [(25, 1000), (25, 10), (0, 5)])
def test_kept_set_is_the_top_n_above_threshold_of_all_scales(delf, k_above, topk):
    image = torch.randn(3, HEIGHT, WIDTH)
    per_scale = _by_hand(delf, image, DELF_SCALES)
    scores = torch.cat([a.reshape(-1) for *_, a in per_scale]).sort(descending=True).values
    assert len(scores) == sum(
        math.ceil(math.floor(64 * s) / 32) * math.ceil(math.floor(80 * s) / 32) for s in DELF_SCALES
    )
    threshold = float(scores[0]) + 1 if k_above == 0 else float(scores[k_above - 1] + scores[k_above]) / 2
    out = delf.extract_local(image, topk=topk, score_threshold=threshold)
    n = min(k_above, topk)
    assert set(out) == {"descriptors", "attention", "positions", "locations", "scales"}
    assert out["descriptors"].shape == (n, 1024) and out["descriptors"].dtype == torch.float32
    assert out["attention"].shape == (n,) and out["scales"].dtype == torch.float32
    assert out["locations"].dtype == torch.int64 and out["positions"].dtype == torch.float32
    torch.testing.assert_close(out["attention"], scores[:n], rtol=1e-5, atol=1e-6)
    if n:
        torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(n))
    cells = {(float(s), *loc) for s, loc in zip(out["scales"], out["locations"].tolist(), strict=True)}
    assert len(cells) == n  # n distinct cells
    assert not any(v.is_inference() for v in out.values())  # callers may modify them
    for d, att, (col, row), s, (x, y) in zip(
        out["descriptors"], out["attention"], out["locations"], out["scales"], out["positions"], strict=True
    ):
        _, hw, f, a = min(per_scale, key=lambda t: abs(t[0] - float(s)))
        assert float(att) == pytest.approx(float(a[row, col]), rel=1e-5)
        torch.testing.assert_close(d, F.normalize(f[:, row, col], dim=0), rtol=1e-4, atol=1e-5)
        # centre of the box [32 i - 133, 32 i + 133] (pixel index), continuous coordinates, actual ratio
        assert x.item() == pytest.approx((32 * col.item() + 0.5) * WIDTH / hw[1], rel=1e-6)
        assert y.item() == pytest.approx((row.item() * 32 + 0.5) * HEIGHT / hw[0], rel=1e-6)


def test_runtime_threshold_and_features_num_give_the_expected_count(delf):
    model = copy.deepcopy(delf)
    image = torch.randn(3, HEIGHT, WIDTH)
    cells = sum(math.ceil(math.floor(64 * s) / 32) * math.ceil(math.floor(80 * s) / 32) for s in DELF_SCALES)
    force_scores(model, 150.0)  # softplus(150) = 150 >= 100 everywhere
    assert len(model.extract_local(image)["attention"]) == cells  # all, fewer than features_num 1000
    model.runtime["features_num"] = 7
    out = extract_delf(model, image)
    assert len(out["attention"]) == 7 and torch.allclose(out["attention"], torch.tensor(150.0))
    force_scores(model, 99.0)  # below the default threshold 100
    empty = model.extract_local(image)
    assert {k: tuple(v.shape) for k, v in empty.items()} == {
        "descriptors": (0, 1024),
        "attention": (0,),
        "positions": (0, 2),
        "locations": (0, 2),
        "scales": (0,),
    }
    assert len(model.extract_local(image, score_threshold=98.0, topk=10**6)["attention"]) == cells


def test_vanishing_scales_are_skipped_and_bad_inputs_refused(delf):
    image = torch.randn(1, 3, 6, 7)
    out = delf.extract_local(image, scales=[0.1, 1.0], topk=10, score_threshold=0.0)
    assert out["scales"].tolist() == [1.0] and out["locations"].tolist() == [[0, 0]]
    assert out["positions"].tolist() == [[0.5, 0.5]]  # pixel 0's centre: a 1-cell map at scale 1
    with pytest.raises(ValueError, match="no usable scale"):
        delf.extract_local(image, scales=[0.1], score_threshold=0.0)
    with pytest.raises(ValueError, match="one RGB image"):
        delf.extract_local(torch.randn(2, 3, 8, 8))


def test_runtime_defaults_and_mean_std():
    model = create_delf("delf_r50")
    rt = model.runtime
    assert rt["scales"] == [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]
    assert rt["features_num"] == 1000 and rt["score_threshold"] == 100.0
    assert rt["mean_std"] == [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
    tf = DELFNet(runtime={"mean_std": "tf"}).runtime["mean_std"]
    assert tf == MEAN_STD["tf"] and tf[0][0] == pytest.approx(0.50196, abs=1e-5)
    pixels = torch.tensor([0.0, 128 / 255, 1.0])  # (pixel - 128) / 128 on 0..255
    assert ((pixels - tf[0][0]) / tf[1][0]).tolist() == pytest.approx([-1.0, 0.0, 127 / 128])
    with pytest.raises(ValueError, match="mean_std"):
        DELFNet(runtime={"mean_std": "caffe"})


# ------------------------------------------------------------------------------------------------ PCA


def test_fit_pca_equals_numpy_svd_and_projects_extracted_descriptors(delf):
    rng = np.random.default_rng(0)
    # 20 strong directions of well-separated variances, plus noise and an offset
    x = (rng.standard_normal((100, 20)) * np.geomspace(10, 1, 20)) @ rng.standard_normal((20, 1024))
    x += 0.1 * rng.standard_normal((100, 1024)) + 3.0
    model = copy.deepcopy(delf)
    model.fit_pca(torch.from_numpy(x).float(), 16)
    assert model.output_dim == 16 and model.model_kwargs["pca_dim"] == 16
    proj = model.pca_projection.double().numpy()
    np.testing.assert_allclose(proj @ proj.T, np.eye(16), atol=1e-5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = xn.mean(0)
    vt = np.linalg.svd(xn - mean, full_matrices=False)[2][:16]
    np.testing.assert_allclose(model.pca_mean.double().numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(np.abs(np.sum(proj * vt, axis=1)), np.ones(16), atol=1e-4)  # same directions
    largest = np.abs(proj).argmax(1)
    assert (proj[np.arange(16), largest] > 0).all()  # sign rule
    y = (xn - mean) @ proj.T
    expected = y / np.linalg.norm(y, axis=1, keepdims=True)
    got = model.postprocess(torch.from_numpy(x).float()).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)

    image = torch.randn(3, HEIGHT, WIDTH)
    raw = model.extract_local(image, [1.0, 0.5], topk=6, score_threshold=0.0, apply_pca=False)
    reduced = model.extract_local(image, [1.0, 0.5], topk=6, score_threshold=0.0)
    assert raw["descriptors"].shape == (6, 1024) and reduced["descriptors"].shape == (6, 16)
    r = F.normalize(raw["descriptors"].double(), dim=1).numpy() - mean
    r = r @ proj.T
    np.testing.assert_allclose(
        reduced["descriptors"].numpy(), r / np.linalg.norm(r, axis=1, keepdims=True), atol=1e-5
    )
    torch.testing.assert_close(reduced["positions"], raw["positions"])
    with pytest.raises(ValueError, match="PCA directions"):
        model.fit_pca(x[:10], 16)


def test_learn_pca_from_images(delf):
    model = copy.deepcopy(delf)
    images = [torch.randn(3, HEIGHT, WIDTH) for _ in range(2)]
    n = learn_pca(model, images, 4, scales=[1.0], score_threshold=0.0)
    assert n == 2 * 2 * 3 and model.output_dim == 4  # a 2 x 3 map per image at scale 1
    force_scores(model, -50.0)
    with pytest.raises(ValueError, match="no descriptors"):
        learn_pca(model, images, 4, scales=[1.0])


# ---------------------------------------------------------------------------------------- checkpoints


def test_save_and_create_restore_descriptors_pca_classifier_and_runtime(tmp_path, delf_classes):
    model = copy.deepcopy(delf_classes)
    model.runtime.update(mean_std=MEAN_STD["tf"], score_threshold=0.0, features_num=7, scales=[1.0, 0.5])
    model.set_pca(0.01 * torch.randn(1024), torch.linalg.qr(torch.randn(1024, 8))[0].T)  # a PCA-like map
    path = save_delf(model, tmp_path / "delf.pth")
    image = torch.randn(3, HEIGHT, WIDTH)
    before = model.extract_local(image)
    loaded = create_delf("delf_r50", checkpoint=path)
    after = loaded.extract_local(image)
    assert loaded.runtime == model.runtime and loaded.model_kwargs == model.model_kwargs
    assert loaded.model_kwargs == {"block3_stride2": True, "pca_dim": 8, "num_classes": 5}
    assert loaded.output_dim == 8 and after["descriptors"].shape == (7, 8)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert torch.equal(loaded.logits.weight, model.logits.weight)
    # a bare state dict (PCA size and classes read from the shapes; default runtime), and
    # {"state_dict", "net_params", "runtime"}
    plain = create_delf("delf_r50", checkpoint=model.state_dict())
    assert plain.output_dim == 8 and plain.runtime["score_threshold"] == 100.0
    torch.testing.assert_close(
        plain.extract_local(image, [1.0, 0.5], 7, score_threshold=0.0)["descriptors"], before["descriptors"]
    )
    nested = {
        "state_dict": model.state_dict(),
        "net_params": model.model_kwargs,
        "runtime": {"features_num": 3},
    }
    nested_model = create_delf("delf_r50", checkpoint=nested)
    assert (
        nested_model.runtime["features_num"] == 3 and nested_model.runtime["mean_std"] == MEAN_STD["imagenet"]
    )


def test_wrong_checkpoints_raise_naming_the_keys(delf):
    state = delf.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("attention.conv2")}
    with pytest.raises(
        CheckpointError, match=r"missing keys: attention\.conv2\.weight, attention\.conv2\.bias"
    ):
        create_delf("delf_r50", checkpoint=partial)
    with torch.device("meta"):
        how = create_how("how_r50").state_dict()  # same trunk keys, HOW's head
    with pytest.raises(
        CheckpointError, match=r"missing keys: attention\.conv1\.weight.*unexpected keys: dim_reduction"
    ):
        load_delf_weights(delf, how)
    bad_shape = {**state, "attention.conv1.weight": torch.zeros(256, 1024, 1, 1)}
    with pytest.raises(CheckpointError, match=r"attention\.conv1\.weight expected \(512, 1024, 1, 1\)"):
        load_delf_weights(delf, bad_shape)
    other_grid = {"state_dict": state, "net_params": {"block3_stride2": False}}
    with pytest.raises(CheckpointError, match="block3_stride2=False"):
        load_delf_weights(delf, other_grid)


def test_pretrained_raises_explaining_there_are_no_pytorch_weights():
    with pytest.raises(ValueError, match=r"no PyTorch DELF weights.*TensorFlow.*checkpoint="):
        create_delf("delf_r50", pretrained=True)
    with pytest.raises(ValueError, match="unknown DELF model"):
        create_delf("delf_r101")
    assert "TensorFlow" in DELF_MODELS["delf_r50"].description


def test_imagenet_initialisation_maps_torchvision_keys(monkeypatch):
    import torchvision

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}
    state = {k: torch.randn(shape) for k, shape in shapes.items()}  # layer4 and fc present, unused
    calls = []

    def fake_fetch(arch, name, progress=True):
        calls.append((arch, name))
        return state

    monkeypatch.setattr("tokenret.models.delf.ck.fetch_torchvision_weights", fake_fetch)
    model = create_delf("delf_r50", imagenet_weights=True)
    assert calls == [("resnet50", "IMAGENET1K_V1")]
    assert torch.equal(model.features[0].weight, state["conv1.weight"])
    assert torch.equal(model.features[1].running_var, state["bn1.running_var"])
    assert torch.equal(model.features[6][5].conv3.weight, state["layer3.5.conv3.weight"])
    model.load_imagenet_weights("IMAGENET1K_V2")
    assert calls[-1] == ("resnet50", "IMAGENET1K_V2")


def test_delf_pca_command_learns_and_saves_a_reloadable_reduction(tmp_path, capsys, write_random_images):
    from tokenret.cli import main
    from tokenret.models.local import create_local_model

    write_random_images(tmp_path / "im", [(80, 64)] * 3, high=255)
    (tmp_path / "im" / "bad.jpg").write_bytes(b"nope")
    out = tmp_path / "delf_pca8.pth"
    argv = ["delf-pca", "--images", str(tmp_path / "im"), "--dim", "8", "--max-size", "64"]
    assert main([*argv, "--score-threshold", "0", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "bad.jpg" in printed and "8-d PCA learned from" in printed
    model = create_local_model("delf_r50", checkpoint=out)
    assert model.output_dim == 8
    proj = model.pca_projection.double()
    torch.testing.assert_close(proj @ proj.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
