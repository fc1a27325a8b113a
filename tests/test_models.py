"""Model zoo: shapes, normalisation, batching, and agreement with independent reference computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

import tokenret
from release_reference import naive_attention, randomize_state, token_head_reference
from tokenret.models.margin import ArcFace, CosFace
from tokenret.models.pooling import RMAC, SecondOrderAttentionGeM, VLADLayer, rmac_regions
from tokenret.models.token import Attention, TokenHead

SIZES = [(64, 64), (64, 160), (150, 70), (97, 131)]


IMAGE_MODELS = [n for n in tokenret.list_models() if tokenret.get_model_config(n).backbone is not None]
# Full-size ResNet-101 models take seconds each on 2 cores: slow. Each of their families still runs in the
# quick loop, through its ResNet-50 entry here or test_batch_equals_one_by_one below.
ZOO = [pytest.param(n, marks=pytest.mark.slow) if n.endswith("_r101") else n for n in IMAGE_MODELS]


@pytest.mark.parametrize("name", ZOO)
def test_registry_model_shapes_and_unit_norm(name):
    model = tokenret.create_model(name)
    assert not model.training
    expected_dim = {"token": 1024, "netvlad": 1024}.get(name.split("_")[0], 2048)
    assert model.descriptor_dim == expected_dim
    with torch.inference_mode():
        for h, w in SIZES:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, expected_dim)
            assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["token_r50", "rmac_r101", "solar_r101", "netvlad_r101", "delg_r101", "gem_r50"]
)
def test_batch_equals_one_by_one(name):
    model = tokenret.create_model(name)
    x = torch.randn(3, 3, 96, 128)
    with torch.inference_mode():
        batch = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=2e-5, rtol=1e-4)


def test_attention_matches_naive_per_head_loop():
    attn = Attention(64, num_heads=8).eval()
    for lin in (attn.q, attn.k, attn.v, attn.proj):  # the release zero-initialises proj: randomise all
        torch.nn.init.normal_(lin.weight, std=0.2)
        torch.nn.init.normal_(lin.bias, std=0.2)
    sd = {"a." + k: v for k, v in attn.state_dict().items()}
    q, kv = torch.randn(2, 5, 64), torch.randn(2, 11, 64)
    ours = attn(q, kv, kv)
    ref = naive_attention(
        q.double(), kv.double(), kv.double(), {k: v.double() for k, v in sd.items()}, "a", 8
    )
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_padding_mask_equals_dropping_the_keys():
    attn = Attention(32, num_heads=4).eval()
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    q, kv = torch.randn(1, 3, 32), torch.randn(1, 9, 32)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 6:] = True
    torch.testing.assert_close(attn(q, kv, kv, mask), attn(q, kv[:, :6], kv[:, :6]), atol=1e-6, rtol=1e-5)


def test_attention_output_projection_starts_at_zero():
    attn = Attention(64, num_heads=8)
    assert attn.proj.weight.abs().sum() == 0 and attn.proj.bias.abs().sum() == 0
    assert attn(torch.randn(1, 4, 64), torch.randn(1, 4, 64), torch.randn(1, 4, 64)).abs().max() == 0


def test_attention_initialisation_draws_in_the_release_order():
    """The release builds q, k, v, proj (PyTorch's default init), then draws trunc_normal(std 0.02) for all
    four in that order, zeroes the biases and then proj; the random numbers after it must line up."""
    torch.manual_seed(7)
    attn = Attention(32, num_heads=4)
    after = torch.rand(3)
    torch.manual_seed(7)
    layers = [torch.nn.Linear(32, 32) for _ in range(4)]  # q, k, v, proj
    for lin in layers:
        torch.nn.init.trunc_normal_(lin.weight, std=0.02, a=-2.0, b=2.0)
    for name, lin in zip(("q", "k", "v"), layers, strict=False):
        torch.testing.assert_close(getattr(attn, name).weight, lin.weight, rtol=0, atol=0)
        assert getattr(attn, name).bias.abs().sum() == 0
    torch.testing.assert_close(torch.rand(3), after, rtol=0, atol=0)  # the same stream afterwards


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the release's configuration
        {
            "in_channels": 48,
            "dim": 64,
            "num_tokens": 3,
            "num_heads": 4,
            "encoder_layers": 2,
            "decoder_layers": 1,
            "out_dim": 40,
        },
    ],
)
def test_token_head_matches_release_reference(kwargs):
    head = TokenHead(**kwargs).eval()
    sd = randomize_state(head, seed=1)
    head.load_state_dict(sd)
    c = kwargs.get("in_channels", 2048)
    feat = torch.relu(torch.randn(2, c, 3, 5))
    ref = token_head_reference(
        feat, {"tr." + k: v for k, v in sd.items()}, num_heads=kwargs.get("num_heads", 8)
    )
    with torch.inference_mode():
        ours = head(feat)
        ours64 = head.double()(feat.double())
    assert ours.shape == (2, kwargs.get("out_dim", 1024))
    # Same function: in float64 the two agree to rounding; float32 within its precision at this magnitude.
    torch.testing.assert_close(ours64, ref, atol=1e-9 * ref.abs().max().item(), rtol=1e-9)
    assert (ours.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_token_tokenizer_sums_over_positions_and_softmaxes_over_tokens():
    head = TokenHead(in_channels=16, dim=16, num_tokens=3, num_heads=2).eval()
    x = torch.randn(1, 10, 16)
    attn = head.token_attention(x)
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(1, 10))  # each position spreads weight 1 over L
    maps = head.attention_maps(torch.randn(2, 16, 4, 5))
    assert maps.shape == (2, 3, 4, 5)
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(2, 4, 5))


def test_token_set_input_with_padding_equals_one_by_one():
    head = TokenHead(in_channels=24, dim=32, num_tokens=4, num_heads=4, out_dim=16).eval()
    head.load_state_dict(randomize_state(head, seed=3))
    sets = [torch.randn(n, 24) for n in (7, 3, 11)]
    n_max = max(len(s) for s in sets)
    padded = torch.full((3, n_max, 24), 123.0)  # junk values in the padding must not matter
    mask = torch.ones(3, n_max, dtype=torch.bool)
    for i, s in enumerate(sets):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = False
    with torch.inference_mode():
        batched = head.forward_set(padded, mask)
        single = torch.cat([head.forward_set(s[None]) for s in sets])
        padded[mask] = -9.0
        again = head.forward_set(padded, mask)
        # A set laid out as an N x 1 map gives the same descriptor as the set input.
        as_map = head(sets[0].t()[None, :, :, None])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(again, batched)
    torch.testing.assert_close(as_map, single[:1], atol=1e-5, rtol=1e-4)


def test_token_head_train_mode_padding_stays_out_of_batchnorm():
    head = TokenHead(
        in_channels=8, dim=16, num_tokens=2, num_heads=2, out_dim=8, drop=0, attn_drop=0, drop_path=0
    )
    s = torch.randn(1, 5, 8)
    padded = torch.cat([s, torch.full((1, 3, 8), 50.0)], dim=1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    head.train()
    a = head.forward_set(torch.cat([s, s]), None)
    b = head.forward_set(torch.cat([padded, padded]), torch.cat([mask, mask]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_arcface_matches_closed_form():
    head = ArcFace(8, num_classes=5, m=0.2)
    assert head.s == pytest.approx(math.sqrt(8))
    feats = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    # One sample nearly opposite its class centre: theta > pi - m, so no margin there.
    feats[5] = -head.weight[0].detach() * 3
    logits = head(feats, labels)
    w = head.weight.detach()
    for i in range(6):
        for j in range(5):
            cos = float(feats[i] @ w[j] / (feats[i].norm() * w[j].norm()))
            theta = math.acos(min(max(cos, -1 + 1e-6), 1 - 1e-6))
            if j == labels[i] and theta <= math.pi - 0.2:
                expected = math.sqrt(8) * math.cos(theta + 0.2)
            else:
                expected = math.sqrt(8) * math.cos(theta)
            assert logits[i, j].item() == pytest.approx(expected, abs=1e-4)
    assert logits[5, 0].item() == pytest.approx(math.sqrt(8) * (-1 + 1e-6), abs=1e-4)


def test_cosface_matches_closed_form():
    head = CosFace(8, num_classes=4, s=10.0, m=0.3)
    feats, labels = torch.randn(3, 8), torch.tensor([2, 0, 3])
    cos = F.normalize(feats, dim=1) @ F.normalize(head.weight.detach(), dim=1).t()
    expected = 10.0 * (cos - 0.3 * F.one_hot(labels, 4))
    torch.testing.assert_close(head(feats, labels), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "h,w,count", [(24, 32, 2 + 6 + 12), (32, 24, 2 + 6 + 12), (16, 16, 1 + 4 + 9), (10, 20, 3 + 8 + 15)]
)
def test_rmac_region_counts(h, w, count):
    regions = rmac_regions(h, w)
    assert len(regions) == count
    for top, left, side in regions:
        assert 0 <= top and top + side <= h and 0 <= left and left + side <= w


def test_rmac_regions_cover_the_map_evenly():
    # 4:3 map, level 1: side = floor(2*24/2) = 24, two regions along the long side at 0 and 32-24 = 8.
    regions = rmac_regions(24, 32)
    assert regions[:2] == [(0, 0, 24), (0, 8, 24)]
    # level 2: side 16; 3 columns at 0, 8, 16 (step (32-16)/2) and 2 rows at 0, 8.
    assert regions[2:8] == [(0, 0, 16), (0, 8, 16), (0, 16, 16), (8, 0, 16), (8, 8, 16), (8, 16, 16)]


def test_rmac_pooling_matches_naive_sum():
    x = torch.rand(2, 6, 7, 9)
    v = F.normalize(x.amax(dim=(2, 3)), dim=1, eps=0)
    for top, left, side in rmac_regions(7, 9):
        r = x[:, :, top : top + side, left : left + side].amax(dim=(2, 3))
        v = v + r / (r.norm(dim=1, keepdim=True) + 1e-6)
    torch.testing.assert_close(RMAC()(x), v, atol=1e-5, rtol=1e-5)


def test_second_order_attention_matches_naive():
    soa = SecondOrderAttentionGeM(in_channels=8, reduction=2).eval()
    torch.nn.init.normal_(soa.v.weight)  # released weights are not zero
    x = torch.rand(2, 8, 3, 4)
    f = soa.f(x).flatten(2)  # (B, 4, N)
    g = soa.g(x).flatten(2)
    h = soa.h(x).flatten(2)
    attn = torch.softmax(torch.einsum("bcn,bcm->bnm", f, g) * 4**-0.5, dim=-1)
    z = torch.einsum("bnm,bcm->bcn", attn, h).reshape(2, 4, 3, 4)
    z = soa.v(z) + x
    expected = z.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(soa(x), expected, atol=1e-5, rtol=1e-5)


def test_vlad_residuals_match_naive():
    layer = VLADLayer(in_channels=6, dim=16, num_clusters=3, num_heads=2).eval()
    x = torch.rand(2, 6, 3, 3)
    feats = layer.encoder(layer.conv(x).flatten(2).transpose(1, 2))
    c = layer.centroids[0]
    assign = torch.softmax(feats @ c, dim=-1)
    expected = torch.zeros(2, 3, 16)
    for b in range(2):
        for n in range(9):
            for k in range(3):
                expected[b, k] += assign[b, n, k] * (feats[b, n] - c[:, k])
    torch.testing.assert_close(layer.residuals(x), expected, atol=1e-5, rtol=1e-4)


def _release_state_from_key_file(path, drop_block4_from=None):
    """A random state dict with exactly the keys and shapes listed in the release key file."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        if drop_block4_from is not None and key.startswith("backbone.block4."):
            if int(key.split(".")[2]) >= drop_block4_from:
                continue
        dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(dims, generator=g)
        else:
            state[key] = 0.02 * torch.randn(dims, generator=g)
    return state


@pytest.fixture(scope="module")
def release_r101_state(request):
    from pathlib import Path

    return _release_state_from_key_file(Path(__file__).parent / "data" / "token_r101_state_dict_keys.txt")


@pytest.mark.slow
def test_release_r101_key_file_loads_and_matches_reference(release_r101_state):
    state = release_r101_state
    assert len(state) == 707 and state["classifier.weight"].shape == (81313, 1024)
    model = tokenret.create_model("token_r101", checkpoint=state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # Same descriptor as an independent computation: torchvision's ResNet-101 + the naive release head.
    tv = torchvision.models.resnet101(weights=None).eval()
    names = {
        "block1.0": "conv1",
        "block1.1": "bn1",
        "block2": "layer1",
        "block3": "layer2",
        "block4": "layer3",
        "block5": "layer4",
    }
    tv_state = {}
    for k, v in state.items():
        if k.startswith("backbone."):
            k = k[len("backbone.") :]
            for ours, theirs in names.items():
                if k.startswith(ours + "."):
                    k = theirs + k[len(ours) :]
            tv_state[k] = v
    tv.load_state_dict({**tv_state, "fc.weight": tv.fc.weight, "fc.bias": tv.fc.bias})
    x = torch.randn(1, 3, 96, 64)
    with torch.inference_mode():
        trunk = torch.nn.Sequential(*list(tv.children())[:-2])
        ref = F.normalize(token_head_reference(trunk(x), state).float(), dim=-1)
        ours = model(x)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_release_r50_keys_load_into_token_r50():
    from pathlib import Path

    state = _release_state_from_key_file(Path(__file__).parent / "data" / "token_r101_state_dict_keys.txt", 6)
    assert (
        len(state) == 318 + 82 + 1
    )  # R50 trunk, Token head, classifier (17 bottlenecks of 18 entries fewer)
    model = tokenret.create_model("token_r50", checkpoint=state)
    assert sum(p.numel() for p in model.backbone.parameters()) == 23_508_032
    with pytest.raises(tokenret.models.checkpoints.CheckpointError, match="missing keys: backbone.block4.6"):
        tokenret.create_model("token_r101", checkpoint=state)


def test_parameter_counts_match_the_release():
    model = tokenret.create_model("token_r101")
    assert sum(p.numel() for p in model.backbone.parameters()) == 42_500_160
    assert sum(p.numel() for p in model.tr.parameters()) == 37_799_936
    assert sum(p.numel() for p in model.tr.decoder.parameters()) == 25_196_544


def test_token_head_runs_in_float32_under_fp16_autocast():
    """fp16 autocast would overflow the tokenizer's unscaled logits and position sums; the head opts out."""
    head = TokenHead(in_channels=16, dim=32, num_tokens=2, num_heads=4, out_dim=8).eval()
    feats = torch.randn(1, 16, 3, 3) * 300  # activations whose tokenizer logits exceed float16's range
    with torch.inference_mode():
        ref = head(feats)
        with torch.autocast("cpu", dtype=torch.float16):
            out = head(feats)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
