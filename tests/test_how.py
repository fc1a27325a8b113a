"""HOW network, test-time local features, PCA-whitening init and HOW's checkpoint formats (spec
local-features.md sections 1.1-1.3 and section 6 items 1-3); local-descriptor store into the Token head."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from release_reference import randomize_state
from tokenret.data.local_store import LocalDescriptorStore, pad_sets
from tokenret.models.checkpoints import CheckpointError
from tokenret.models.how import (
    HOW_SCALES,
    HOWNet,
    create_how,
    extract_local,
    feature_positions,
    learn_dim_reduction,
    read_how_checkpoint,
    select_local_features,
)
from tokenret.models.token import TokenHead


def small_how(dim=16):
    """ResNet-18 up to layer2: 128-d, stride 8, receptive field 99 px; fast on one core."""
    return HOWNet("resnet18", skip_layer=2, dim=dim).eval()


# ----------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize(
    "name, n_keys, channels, last_stage",
    [
        ("how_r18", 122, 512, "features.7."),
        ("how_r50", 260, 1024, "features.6."),
        ("how_r101", 566, 1024, "6.22."),
    ],
)
def test_key_layout_matches_how(name, n_keys, channels, last_stage):
    with torch.device("meta"):
        model = create_how(name)
    state = model.state_dict()
    assert len(state) == n_keys
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in state if k.startswith("features.")}
    assert prefixes == {f"features.{i}" for i in [0, 1, *range(4, 8 if channels == 512 else 7)]}
    assert any(last_stage in k for k in state)
    assert tuple(state["dim_reduction.weight"].shape) == (128, channels, 1, 1)
    assert tuple(state["dim_reduction.bias"].shape) == (128,)
    assert model.backbone_dim == channels and model.stride == (32 if channels == 512 else 16)


def test_r50_minus_map_size_on_1024x768():
    with torch.device("meta"):
        model = create_how("how_r50")
        x = torch.empty(1, 3, 768, 1024)
        backbone = model.features(x)
        feats, attention = model.forward_scale(x)
    assert tuple(backbone.shape) == (1, 1024, 48, 64)
    assert tuple(feats.shape) == (1, 128, 48, 64) and tuple(attention.shape) == (1, 48, 64)


def test_attention_is_channel_norm_before_smoothing_and_smoothing_excludes_padding():
    model = small_how()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        o = model.features(x)
        smoothed, attention = model.forward_scale(x, reduce=False)
        reduced, _ = model.forward_scale(x)
    torch.testing.assert_close(attention, (o.pow(2).sum(1) + 1e-10).sqrt())
    _, _, h, w = o.shape
    hand = torch.empty_like(o)
    for i in range(h):
        for j in range(w):  # mean over the neighbours that exist (count_include_pad=False)
            hand[0, :, i, j] = o[0, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2].mean((1, 2))
    torch.testing.assert_close(smoothed, hand, rtol=1e-5, atol=1e-6)
    weight, bias = model.dim_reduction.weight[:, :, 0, 0], model.dim_reduction.bias
    expected = torch.einsum("dc,bchw->bdhw", weight, hand) + bias[None, :, None, None]
    torch.testing.assert_close(reduced, expected, rtol=1e-4, atol=1e-5)


def test_batchnorm_stays_in_eval_mode_when_training():
    model = small_how().train()
    assert model.training and model.dim_reduction.training
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ------------------------------------------------------------------------------------ top-n selection


def test_top_n_selection_is_one_global_sort_over_all_scales():
    g = torch.Generator().manual_seed(0)
    feats, atts = [], []
    for i, s in enumerate(HOW_SCALES):
        h, w = max(1, round(12 * s)), max(1, round(9 * s))
        grid_r, grid_c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        # descriptor = (scale index, row, column, noise): each feature says where it came from
        feats.append(
            torch.stack([torch.full((h, w), float(i)), grid_r.float(), grid_c.float(), torch.randn(h, w)])
        )
        atts.append(torch.rand(h, w, generator=g))
    everything = torch.cat([a.reshape(-1) for a in atts])
    out = select_local_features(feats, atts, HOW_SCALES, topk=50)
    torch.testing.assert_close(out["attention"], everything.sort(descending=True).values[:50])
    for d, a, loc, s, si in zip(
        out["descriptors"], out["attention"], out["locations"], out["scales"], out["scale_index"], strict=True
    ):
        i, row, col = int(d[0]), int(d[1]), int(d[2])
        assert int(si) == i and float(s) == pytest.approx(HOW_SCALES[i])
        assert loc.tolist() == [col, row]
        assert float(a) == float(atts[i][row, col])
        assert float(d[3]) == float(feats[i][3, row, col])
    assert len(select_local_features(feats, atts, HOW_SCALES, topk=None)["attention"]) == len(everything)
    assert len(select_local_features(feats, atts, HOW_SCALES, topk=10**6)["attention"]) == len(everything)


def _linearised(model: HOWNet) -> HOWNet:
    """Same receptive fields, no ReLU / max: the input-gradient support of a cell is its receptive field."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(3, 2, 1))
    return model.eval()


@pytest.mark.parametrize("scale, tol", [(1.0, 0.0), (0.5, 0.0), (0.707, 1.0)])
def test_positions_are_receptive_field_centres_in_input_pixels(scale, tol):
    model = _linearised(small_how())
    height, width = 224, 288
    x = torch.randn(1, 3, height, width, requires_grad=True)
    xs = (
        x
        if scale == 1
        else F.interpolate(
            x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=True
        )
    )
    fmap = model.features(xs)
    row, col = fmap.shape[2] // 2, fmap.shape[3] // 2
    fmap[0, :, row, col].sum().backward()
    support = x.grad[0].abs().sum(0) > 0
    rows, cols = torch.nonzero(support.any(1)).flatten(), torch.nonzero(support.any(0)).flatten()
    assert rows[0] > 0 and cols[0] > 0 and rows[-1] < height - 1 and cols[-1] < width - 1  # not clipped
    # continuous pixel coordinates: pixel j spans [j, j + 1)
    centre_x = (cols[0] + cols[-1]).item() / 2 + 0.5
    centre_y = (rows[0] + rows[-1]).item() / 2 + 0.5
    pos = feature_positions(
        torch.tensor([col]), torch.tensor([row]), model.stride, tuple(xs.shape[-2:]), (height, width)
    )[0]
    assert abs(pos[0].item() - centre_x) <= tol + 1e-4
    assert abs(pos[1].item() - centre_y) <= tol + 1e-4


def test_extract_local_keeps_the_top_attentions_of_the_pyramid():
    model = small_how()
    image = torch.randn(3, 96, 128)
    out = extract_local(model, image, scales=HOW_SCALES, topk=60, l2_normalize=True)
    assert set(out) == {"descriptors", "attention", "positions", "locations", "scales"}
    assert out["descriptors"].shape == (60, 16) and out["positions"].shape == (60, 2)
    torch.testing.assert_close(out["descriptors"].norm(dim=1), torch.ones(60))
    # independent pass: each scale by hand, attention divided by the max over all scales
    with torch.no_grad():
        per_scale = {}
        for s in HOW_SCALES:
            xs = F.interpolate(
                image[None], scale_factor=s, mode="bilinear", align_corners=False, recompute_scale_factor=True
            )
            o = model.features(xs)
            per_scale[s] = (xs.shape[-2:], model.dim_reduction(model.smooth(o))[0], o.norm(dim=1)[0])
    peak = max(a.max() for _, _, a in per_scale.values())
    all_att = torch.cat([(a / peak).reshape(-1) for _, _, a in per_scale.values()])
    torch.testing.assert_close(
        out["attention"], all_att.sort(descending=True).values[:60], rtol=1e-5, atol=1e-6
    )
    assert out["attention"][0] == pytest.approx(1.0)
    for d, (col, row), s, pos in zip(
        out["descriptors"], out["locations"], out["scales"], out["positions"], strict=True
    ):
        key = min(per_scale, key=lambda k: abs(k - float(s)))
        hw, f, _ = per_scale[key]
        torch.testing.assert_close(d, F.normalize(f[:, row, col], dim=0), rtol=1e-4, atol=1e-5)
        expected_x = (col.item() * 8 + 0.5) * 128 / hw[1]
        expected_y = (row.item() * 8 + 0.5) * 96 / hw[0]
        assert pos.tolist() == pytest.approx([expected_x, expected_y], rel=1e-5)
    raw = extract_local(model, image, scales=HOW_SCALES, topk=60)  # HOW's own: not normalised
    assert not torch.allclose(raw["descriptors"].norm(dim=1), torch.ones(60), atol=1e-3)
    torch.testing.assert_close(F.normalize(raw["descriptors"], dim=1), out["descriptors"])


# ------------------------------------------------------------------------------- PCA-whitening init


def test_pca_whitening_init_gives_identity_covariance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 128)) @ rng.standard_normal((128, 128)) * 0.3 + rng.standard_normal(128)
    model = small_how(dim=16)
    model.init_dim_reduction_pca(x)
    with torch.no_grad():
        y = model.dim_reduction(torch.from_numpy(x).float()[:, :, None, None])[:, :, 0, 0].double().numpy()
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(16), atol=2e-3)
    # rows are the top-16 principal directions scaled by 1/sqrt(eigenvalue)
    eigenvalues = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1][:16]
    row_norms = model.dim_reduction.weight.detach()[:, :, 0, 0].double().norm(dim=1).numpy()
    np.testing.assert_allclose(row_norms, 1 / np.sqrt(eigenvalues), rtol=1e-3)


def test_learn_dim_reduction_whitens_the_selected_features():
    model = small_how(dim=16)
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 112)]
    n = learn_dim_reduction(model, images, features_num=100)
    assert n == 200
    y = torch.cat([extract_local(model, im, [1.0], 100, l2_normalize=False)["descriptors"] for im in images])
    np.testing.assert_allclose(np.cov(y.double().numpy().T, bias=True), np.eye(16), atol=2e-3)


# ------------------------------------------------------------------------------------- checkpoints


R18_NET_PARAMS = {
    "architecture": "resnet18",
    "pretrained": True,
    "skip_layer": 0,
    "dim_reduction": {"dim": 128},
    "smoothing": {"kernel_size": 3},
    "runtime": {
        "mean_std": [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]],
        "image_size": 1024,
        "features_num": 2000,
        "scales": [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25],
        "training_scales": [1],
    },
}


def _new_format(state, net_params=R18_NET_PARAMS):
    return {
        "_version": "how/2020",
        "state_dict": dict(state),
        "net_params": net_params,
        "meta": {"architecture": net_params["architecture"], "backbone_dim": 512, "outputdim": 128},
        "epoch": 20,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-6, "params": [0, 1]}]},
        "best_score": 0.5,
    }


def _old_format(state, architecture="resnet18", skip_layer=0):
    sd = {
        ("whiten." + k[len("dim_reduction.") :] if k.startswith("dim_reduction.") else k): v
        for k, v in state.items()
    }
    meta = {
        "architecture": architecture,
        "skip_layer": skip_layer,
        "dim": 128,
        "feat_pool_k": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    return {"meta": meta, "state_dict": sd, "epoch": 20}


@pytest.fixture(scope="module")
def r18_state():
    return randomize_state(create_how("how_r18"), seed=3)


@pytest.mark.parametrize("fmt", ["new", "old", "plain"])
def test_released_formats_load_from_file_and_dict(tmp_path, r18_state, fmt):
    obj = {"new": _new_format, "old": _old_format, "plain": dict}[fmt](r18_state)
    path = tmp_path / "how_r18.pth"
    torch.save(obj, path)
    for source in (path, str(path), obj):
        model = create_how("how_r18", checkpoint=source)
        loaded = model.state_dict()
        for k, v in r18_state.items():
            assert torch.equal(loaded[k], v), k
    assert model.runtime["features_num"] == (2000 if fmt == "new" else 1000)
    assert read_how_checkpoint(path).key_format == {"new": "how/2020", "old": "old", "plain": "plain"}[fmt]


def test_old_format_r50_minus_loads():
    model = create_how("how_r50")
    state = randomize_state(model, seed=4)
    loaded = create_how("how_r50", checkpoint=_old_format(state, "resnet50", 1))
    assert torch.equal(loaded.dim_reduction.weight, state["dim_reduction.weight"])
    with pytest.raises(CheckpointError, match=r"architecture 'resnet50' \(model: 'resnet18'\).*how_r50"):
        create_how("how_r18", checkpoint=_old_format(state, "resnet50", 1))


def test_checkpoint_errors_name_the_keys(r18_state):
    missing = {k: v for k, v in r18_state.items() if k != "features.4.0.conv1.weight"}
    with pytest.raises(CheckpointError, match="missing keys: features.4.0.conv1.weight"):
        create_how("how_r18", checkpoint=_new_format(missing))
    extra = {**r18_state, "features.8.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match="unexpected keys: features.8.weight"):
        create_how("how_r18", checkpoint=_old_format(extra))
    wrong = {**r18_state, "dim_reduction.weight": torch.zeros(64, 512, 1, 1)}
    with pytest.raises(
        CheckpointError, match=r"dim_reduction.weight expected \(128, 512, 1, 1\) found \(64, 512"
    ):
        create_how("how_r18", checkpoint=dict(wrong))
    both = {**_old_format(r18_state)["state_dict"], "dim_reduction.bias": torch.zeros(128)}
    with pytest.raises(CheckpointError, match="both whiten"):
        create_how("how_r18", checkpoint=both)
    with pytest.raises(CheckpointError, match="skip_layer 1"):
        create_how("how_r18", checkpoint=_new_format(r18_state, {**R18_NET_PARAMS, "skip_layer": 1}))
    with pytest.raises(ValueError, match="no released weights"):
        create_how("how_r101", pretrained=True)


# ------------------------------------------------------------------------- store -> Token head


def test_extracted_sets_stored_padded_and_aggregated_by_token_head(tmp_path):
    model = small_how(dim=16)
    store = LocalDescriptorStore(16, with_strengths=True)
    for size, topk in [((64, 96), 40), ((48, 48), 25), ((80, 64), 33)]:
        out = extract_local(model, torch.randn(3, *size), scales=[1.0, 0.707, 0.5], topk=topk)
        store.add(out["descriptors"].numpy(), out["attention"].numpy())
    store.save(tmp_path / "shard_00000")
    loaded = LocalDescriptorStore.load(tmp_path / "shard_00000")
    assert len(loaded) == 3 and loaded.lengths.tolist() == [40, 25, 33]
    for i in range(3):
        np.testing.assert_array_equal(loaded[i], store[i])
        np.testing.assert_array_equal(loaded.strengths(i), store.strengths(i))
    x, padding = loaded.batch([0, 1, 2])
    assert x.shape == (3, 40, 16) and padding.sum(1).tolist() == [0, 15, 7]
    head = TokenHead(
        in_channels=16, dim=16, num_tokens=2, num_heads=2, out_dim=8, drop=0, attn_drop=0, drop_path=0
    )
    head.eval()
    with torch.inference_mode():
        batched = head.forward_set(x, padding)
        single = torch.cat([head.forward_set(torch.from_numpy(loaded[i])[None]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    capped, cap_mask = pad_sets([loaded[0], loaded[1]], max_n=30)
    assert capped.shape == (2, 30, 16) and cap_mask.sum().item() == 5
    with pytest.raises(ValueError, match="one C"):
        pad_sets([np.zeros((2, 16)), np.zeros((2, 8))])
    assert not math.isnan(float(batched.sum()))


def test_imagenet_initialisation_maps_torchvision_keys(monkeypatch):
    import torchvision

    reference = torchvision.models.resnet50(weights=None)
    state = randomize_state(reference, seed=5)
    monkeypatch.setattr("tokenret.models.how.ck.fetch_torchvision_weights", lambda arch, name: state)
    model = create_how("how_r50", imagenet_weights=True)
    assert torch.equal(model.features[0].weight, state["conv1.weight"])
    assert torch.equal(model.features[1].running_var, state["bn1.running_var"])
    assert torch.equal(
        model.features[6][5].conv3.weight, state["layer3.5.conv3.weight"]
    )  # layer4 and fc unused
