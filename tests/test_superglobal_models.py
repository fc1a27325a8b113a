"""SuperGlobal models, CVNet checkpoints, input conventions and scale pooling, against independent
computations: naive loops and closed forms written here from the spec (../shared/spec/superglobal.md)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import tokenret
from tokenret.cli import build_parser
from tokenret.cli.common import extraction_config_from_args
from tokenret.extraction import ExtractionConfig, ImageList, extract_descriptors
from tokenret.extraction.multiscale import combine_scales, multiscale_descriptor, resize_to_scale
from tokenret.models import checkpoints as ck
from tokenret.models.convention import CIRTORCH, SUPERGLOBAL, input_convention, parse_scale_pool
from tokenret.models.inspect import format_info, inspect_checkpoint
from tokenret.models.superglobal import GeMPlus, RegionalGeM, ReLUPlus

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics and affine terms (default ones would hide a mis-wired BatchNorm), scaled so
    that activations stay O(1) through 16 blocks; ``head.pool.p`` moved off 3."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        model.head.pool.p.fill_(3.3)
    return model.eval()


# ------------------------------------------------------------------- an independent statement of the network


def naive_rgem(x: np.ndarray, p: float = 2.5, size: int = 5) -> np.ndarray:
    """(C, H, W) float64: each position's p-power mean over its reflected size x size window, averaged
    with x."""
    c, h, w = x.shape
    r = (size - 1) // 2

    def reflect(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    out = np.empty_like(x)
    for i in range(h):
        for j in range(w):
            acc = np.zeros(c)
            for di in range(-r, r + 1):
                for dj in range(-r, r + 1):
                    acc += x[:, reflect(i + di, h), reflect(j + dj, w)] ** p
            out[:, i, j] = 0.5 * (acc / size**2) ** (1 / p) + 0.5 * x[:, i, j]
    return out


def naive_gem(x: np.ndarray, p: float, eps: float) -> np.ndarray:
    """(C, H, W) -> (C,): (mean over positions of max(x, eps)^p)^(1/p)."""
    return (np.maximum(x, eps) ** p).reshape(x.shape[0], -1).mean(1) ** (1 / p)


def reference_features(state: dict, x: torch.Tensor, depth: int, relu_plus: bool = True) -> torch.Tensor:
    """The trunk from the spec with functional ops on the state dict: stem, s1..s4 of bottlenecks (stride on
    the 3x3), ReLU+ = clamp(0.014) at block outputs of s1..s3 and inside s1's blocks."""

    def bn(t, name):
        return F.batch_norm(
            t,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            eps=1e-5,
        )

    def act(t, plus):
        return t.clamp(min=0.014) if (plus and relu_plus) else torch.relu(t)

    t = torch.relu(bn(F.conv2d(x, state["stem.conv.weight"], stride=2, padding=3), "stem.bn"))
    t = F.max_pool2d(t, 3, stride=2, padding=1)
    for s, n in enumerate(DEPTHS[depth], start=1):
        for b in range(1, n + 1):
            pre = f"s{s}.b{b}"
            stride = 2 if (b == 1 and s > 1) else 1
            h = act(bn(F.conv2d(t, state[f"{pre}.f.a.weight"]), f"{pre}.f.a_bn"), s == 1)
            h = F.conv2d(h, state[f"{pre}.f.b.weight"], stride=stride, padding=1)
            h = act(bn(h, f"{pre}.f.b_bn"), s == 1)
            h = bn(F.conv2d(h, state[f"{pre}.f.c.weight"]), f"{pre}.f.c_bn")
            short = bn(F.conv2d(t, state[f"{pre}.proj.weight"], stride=stride), f"{pre}.bn") if b == 1 else t
            t = act(short + h, s < 4)
    return t


def reference_descriptor(state, x, depth, relu_plus=True, rgem=True, gem_plus=True, raw=False):
    """Single-scale descriptor (B, 2048) from the spec: trunk -> rGeM -> GeM+ (or the learned GeM) -> L2
    -> fc -> L2 (``raw``: before the last L2)."""
    feats = reference_features(state, x, depth, relu_plus).double().numpy()
    out = []
    for f in feats:
        if rgem:
            f = naive_rgem(f)
        v = naive_gem(f, 4.6, 1e-8) if gem_plus else naive_gem(f, float(state["head.pool.p"]), 1e-6)
        v = v / np.linalg.norm(v)
        d = state["head.fc.weight"].double().numpy() @ v + state["head.fc.bias"].double().numpy()
        out.append(d if raw else d / np.linalg.norm(d))
    return torch.from_numpy(np.stack(out))


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return randomised(tokenret.create_model("superglobal_r50"))


# --------------------------------------------------------------------------------------- building blocks


def test_rgem_matches_the_naive_window_loop():
    x = torch.rand(2, 3, 6, 7) + 0.01
    got = RegionalGeM()(x)
    for b in range(2):
        np.testing.assert_allclose(got[b].double().numpy(), naive_rgem(x[b].double().numpy()), rtol=1e-5)
    # the pooled branch is the 2.5-power mean: on a constant map rGeM is the identity
    const = torch.full((1, 2, 5, 5), 0.7)
    torch.testing.assert_close(RegionalGeM()(const), const)
    # a map too small to reflect (official code: an error) is padded by replication, not refused
    assert RegionalGeM()(torch.rand(1, 4, 2, 2)).shape == (1, 4, 2, 2)


def test_gem_plus_is_the_clamped_power_mean():
    x = torch.randn(2, 5, 4, 3)  # negatives: clamped to 1e-8
    got = GeMPlus()(x)
    want = np.stack([naive_gem(v, 4.6, 1e-8) for v in x.double().numpy()])
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5)
    assert GeMPlus().p == 4.6


def test_relu_plus_sits_where_the_spec_puts_it():
    model = tokenret.create_model("superglobal_r50")
    assert ReLUPlus()(torch.tensor([-1.0, 0.0, 0.01, 0.5])).tolist() == pytest.approx(
        [0.014, 0.014, 0.014, 0.5]
    )
    for s, n in enumerate(DEPTHS[50], start=1):
        for b in range(1, n + 1):
            block = getattr(getattr(model, f"s{s}"), f"b{b}")
            inner = (block.f.a_relu, block.f.b_relu)
            assert all(isinstance(a, ReLUPlus) and a.alpha == 0.014 for a in inner) == (s == 1), (s, b)
            assert all(type(a) is torch.nn.ReLU for a in inner) == (s != 1)
            assert isinstance(block.relu, ReLUPlus if s < 4 else torch.nn.ReLU), (s, b)
    off = tokenret.create_model("superglobal_r50", relu_plus=False)
    assert not any(isinstance(m, ReLUPlus) for m in off.modules())
    assert type(model.stem.relu) is torch.nn.ReLU


def test_the_network_matches_an_independent_statement_of_the_spec(r50):
    x = torch.randn(2, 3, 100, 132)  # an s4 map of 4 x 5
    state = r50.state_dict()
    with torch.no_grad():
        got = r50(x)
        raw = r50.forward_features(x)
    torch.testing.assert_close(got.double(), reference_descriptor(state, x, 50), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        raw.double(), reference_descriptor(state, x, 50, raw=True), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    assert r50.descriptor_dim == 2048 and got.shape == (2, 2048)


@pytest.mark.parametrize(
    "switches",
    [
        {"relu_plus": False},
        {"rgem": False},
        {"gem_plus": False},
        {"relu_plus": False, "rgem": False, "gem_plus": False},
    ],
)
def test_each_switch_gives_the_ablation_row(r50, switches):
    """Off: plain ReLU / no rGeM / GeM with the checkpoint's learned head.pool.p (CVNet-Global)."""
    model = tokenret.create_model("superglobal_r50", **switches).eval()
    model.load_state_dict(r50.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        got = model(x)
        assert not torch.equal(got, r50(x))  # the switch changes something
    torch.testing.assert_close(
        got.double(), reference_descriptor(r50.state_dict(), x, 50, **switches), rtol=1e-4, atol=1e-5
    )


def test_model_args_switch_from_the_command_line():
    args = build_parser().parse_args(
        [
            "evaluate",
            "--data-root",
            "D",
            "--model",
            "superglobal_r50",
            "--model-arg",
            "rgem=False",
            "antialias=True",
        ]
    )
    from tokenret.cli.common import model_from_args

    model = model_from_args(args)
    assert model.rgem is None and model.gemp is not None and model.input_convention.antialias
    assert model.model_kwargs == {"depth": 50, "rgem": False, "antialias": True}


# ----------------------------------------------------------------------------------------- scale pooling


def test_sgem_and_the_other_scale_pools_match_loops():
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)  # S scales, B images, D dims
    S, B, D = stack.shape

    def unit(v):
        return v / math.sqrt(sum(float(t) ** 2 for t in v))

    for b in range(B):
        scales = [stack[s, b] for s in range(S)]
        normed = [unit(v) for v in scales]
        want_max = unit(
            torch.tensor([max(float(v[d]) for v in normed) for d in range(D)], dtype=torch.float64)
        )
        gamma = min(float(v[d]) for v in scales for d in range(D))  # the image's minimum over scales and dims
        want_pow = unit(
            torch.tensor(
                [(sum((float(v[d]) - gamma) ** 10 for v in scales) / S) ** 0.1 + gamma for d in range(D)],
                dtype=torch.float64,
            )
        )
        want_mean = unit(sum(scales) / S)
        torch.testing.assert_close(combine_scales(stack, "sgem")[b], want_max)
        torch.testing.assert_close(combine_scales(stack, "sgem:10")[b], want_pow)
        torch.testing.assert_close(combine_scales(stack, "mean")[b], want_mean)
    pos = stack.abs()
    want = F.normalize((pos**3).mean(0) ** (1 / 3), dim=-1)
    torch.testing.assert_close(combine_scales(pos, "gem:3"), want)
    torch.testing.assert_close(combine_scales(pos, "gem", power=3.0), want)
    # per image: one image's result does not depend on the others in its batch
    torch.testing.assert_close(combine_scales(stack[:, :1], "sgem:10"), combine_scales(stack, "sgem:10")[:1])
    for bad in ("max", "mean:2", "sgem:x", "gem:0", "gem:-1"):
        with pytest.raises(ValueError, match="scale pooling"):
            parse_scale_pool(bad)


def test_scale_pool_can_be_chosen_for_token(tiny_token_model):
    token = tiny_token_model().eval()
    assert input_convention(token) is CIRTORCH and CIRTORCH.scale_pool == "mean"
    x = torch.randn(2, 3, 64, 80)
    scales = (1.0, 2**0.5, 2**-0.5)
    with torch.no_grad():
        ds = [token(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear")) for s in scales]
        want = F.normalize(torch.stack([F.normalize(d, dim=-1) for d in ds]).amax(0), dim=-1)
        torch.testing.assert_close(multiscale_descriptor(token, x, scales, "sgem"), want)
        mean = F.normalize(sum(F.normalize(d, dim=-1) for d in ds) / 3, dim=-1)
        torch.testing.assert_close(multiscale_descriptor(token, x, scales), mean)
    with pytest.raises(ValueError, match="scale pooling"):
        ExtractionConfig(scale_pool="median")
    # recorded in the fingerprint only when chosen, so caches of the model's own pooling keep their names
    assert "scale_pool" not in ExtractionConfig().fingerprint()
    chosen = ExtractionConfig(scale_pool="sgem")
    assert chosen.fingerprint()["scale_pool"] == "sgem"
    assert ExtractionConfig.from_fingerprint(chosen.fingerprint()).fingerprint() == chosen.fingerprint()
    args = build_parser().parse_args(["evaluate", "--data-root", "D", "--scale-pool", "sgem:10"])
    assert extraction_config_from_args(args).scale_pool == "sgem:10"


# ------------------------------------------------------------------------------------ input conventions


def write_png(path, h=70, w=90, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def test_bgr_mean_std_and_truncated_boxes_reach_the_tensor(tmp_path):
    arr = write_png(tmp_path / "a.png", 70, 90)
    box = (10.7, 5.2, 60.9, 40.5)
    ds = ImageList.for_convention([tmp_path / "a.png"] * 2, [None, box], None, SUPERGLOBAL)
    mean = np.array([0.406, 0.456, 0.485], np.float32)
    std = np.array([0.225, 0.224, 0.229], np.float32)

    def official(im):  # OpenCV's BGR array, [0, 1], normalised per BGR channel, CHW
        im = im[:, :, ::-1].astype(np.float32) / 255.0
        return ((im - mean) / std).transpose(2, 0, 1)

    _, full, err = ds[0]
    assert err is None and full.shape == (3, 70, 90)  # no resizing to a maximum side
    np.testing.assert_array_equal(full.numpy(), official(arr))
    _, crop, _ = ds[1]
    np.testing.assert_array_equal(crop.numpy(), official(arr[5:40, 10:60]))  # int() of each coordinate
    # the cirtorch convention is the RGB ImageNet one ImageList has always used
    legacy = ImageList([tmp_path / "a.png"], None, 1024)[0][1]
    torch.testing.assert_close(
        ImageList.for_convention([tmp_path / "a.png"], None, 1024, CIRTORCH)[0][1], legacy
    )


def test_the_convention_reaches_extraction(tmp_path, r50):
    """extract_descriptors without a config: the file's resolution, BGR, torchvision resize to
    [int(h*s), int(w*s)] per scale, un-normalised head outputs combined by sGeM."""
    arr = write_png(tmp_path / "a.png", 100, 130)
    config = ExtractionConfig.for_model(r50, num_workers=0, batch_size=1)
    assert (config.max_size, config.scales) == (None, (0.7071, 1.0, 1.4142))
    got = extract_descriptors(r50, [tmp_path / "a.png"], config=config, progress=False).descriptors
    x = (arr[:, :, ::-1].astype(np.float32) / 255.0 - [0.406, 0.456, 0.485]) / [0.225, 0.224, 0.229]
    x = torch.from_numpy(x.astype(np.float32).transpose(2, 0, 1).copy())[None]
    per_scale = []
    with torch.no_grad():
        for s in (0.7071, 1.0, 1.4142):
            xs = TF.resize(x, [int(100 * s), int(130 * s)], antialias=False)
            per_scale.append(F.normalize(r50.forward_features(xs), dim=-1))
    want = F.normalize(torch.stack(per_scale).amax(0), dim=-1)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-5)
    # without a config the engine does the same
    again = extract_descriptors(r50, [tmp_path / "a.png"], progress=False).descriptors
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-6)


def test_antialias_is_a_model_switch_and_both_ways_resize_like_torchvision():
    x = torch.rand(1, 3, 64, 96)
    for aa in (False, True):
        conv = SUPERGLOBAL.replace(antialias=aa)
        out = resize_to_scale(x, 0.7071, conv)
        assert out.shape[-2:] == (int(64 * 0.7071), int(96 * 0.7071))
        torch.testing.assert_close(out, TF.resize(x, [45, 67], antialias=aa), rtol=0, atol=0)
        assert resize_to_scale(x, 1.0, conv) is x
    assert (
        resize_to_scale(x, 0.7071, SUPERGLOBAL.replace(antialias=True))
        - resize_to_scale(x, 0.7071, SUPERGLOBAL)
    ).abs().max() > 1e-3
    assert not tokenret.create_model("superglobal_r50").input_convention.antialias
    assert tokenret.create_model("superglobal_r50", antialias=True).input_convention.antialias


def test_the_command_line_takes_the_model_protocol_unless_told():
    parser = build_parser()

    def config(*argv):
        return extraction_config_from_args(parser.parse_args(["evaluate", "--data-root", "D", *argv]))

    sg = config("--model", "superglobal_r101")
    assert (sg.max_size, sg.scales, sg.scale_pool) == (None, (0.7071, 1.0, 1.4142), "model")
    token = config()
    assert (token.max_size, token.scales) == (1024, (1.0, 2**0.5, 2**-0.5))
    assert token.fingerprint() == ExtractionConfig().fingerprint()  # Token's protocol (and caches) unchanged
    assert config("--model", "superglobal_r101", "--max-size", "512", "--scales", "1").max_size == 512
    assert config("--max-size", "0").max_size is None  # 0: the file's own size


# ------------------------------------------------------------------------------------------- checkpoints


def cvnet_file(path, model, wrap=""):
    """A file laid out as CVNet's release: the re-ranking model's model_state, the global network under
    encoder_q, and tensors of the re-ranking branch."""
    state = {f"{wrap}encoder_q.{k}": v for k, v in model.state_dict().items()}
    state[f"{wrap}conv2ds.0.weight"] = torch.randn(256, 1024, 3, 3)
    state[f"{wrap}cv_learner.encoder_layer4to3.0.weight"] = torch.randn(4, 9, 3, 3, 3, 3)
    torch.save(
        {"epoch": 20, "model_state": state, "optimizer_state": {"state": {}, "param_groups": []}}, path
    )
    return path


def test_a_cvnet_file_loads_like_its_state_dict(tmp_path, r50, caplog):
    path = cvnet_file(tmp_path / "CVPR2022_CVNet_R50.pyth", r50, wrap="module.")
    with caplog.at_level(logging.WARNING):
        model = tokenret.create_model("superglobal_r50", checkpoint=path)
    assert "2 tensors not used" in caplog.text and "conv2ds.0.weight" in caplog.text
    direct = tokenret.create_model("superglobal_r50").eval()
    direct.load_state_dict(r50.state_dict())
    x = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(x), direct(x), rtol=0, atol=0)
    assert float(model.head.pool.p.detach()) == pytest.approx(3.3)  # loaded (used with gem_plus=False)
    loaded = ck.read_checkpoint(path)
    assert loaded.layout.startswith("CVNet") and sorted(loaded.dropped) == [
        "conv2ds.0.weight",
        "cv_learner.encoder_layer4to3.0.weight",
    ]

    info = inspect_checkpoint(path)
    assert info.best.name == "superglobal_r50" and info.best.report.ok
    assert info.to_dict()["dropped_keys"] == loaded.dropped
    text = format_info(info)
    assert "superglobal_r50 (backbone resnet50 (pycls))" in text and "re-ranking branch" in text

    # an R50 file is refused by the R101 entry, with the entry that fits named
    with pytest.raises(ck.CheckpointError, match="'superglobal_r50'"):
        tokenret.create_model("superglobal_r101", checkpoint=path)


class NotWeights:
    pass


def test_a_file_that_needs_arbitrary_objects_is_refused_with_a_message(tmp_path, r50):
    path = tmp_path / "cvnet_with_objects.pyth"
    torch.save({"model_state": {"encoder_q.x": torch.zeros(1)}, "cfg": NotWeights()}, path)
    with pytest.raises(ck.CheckpointError, match="weights_only=True.*model_state"):
        tokenret.create_model("superglobal_r50", checkpoint=path)


def test_pretrained_says_where_to_get_cvnet_weights_and_reads_them_from_the_cache(tmp_path, r50, monkeypatch):
    monkeypatch.setenv("TOKENRET_HOME", str(tmp_path / "home"))
    dest = tmp_path / "home" / "checkpoints" / "CVPR2022_CVNet_R50.pyth"
    with pytest.raises(ck.WeightsUnavailableError) as e:
        tokenret.create_model("superglobal_r50", pretrained=True)
    assert "github.com/sungonce/CVNet" in str(e.value) and str(dest) in str(e.value)
    dest.parent.mkdir(parents=True)
    cvnet_file(dest, r50)
    model = tokenret.create_model("superglobal_r50", pretrained=True)
    torch.testing.assert_close(model.head.fc.weight, r50.head.fc.weight)


@pytest.mark.slow
def test_an_r101_file_is_recognised(tmp_path):
    with torch.device("meta"):
        meta = tokenret.create_model("superglobal_r101")
    model = meta.to_empty(device="cpu")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_() if not t.is_floating_point() else t.uniform_(0.5, 1.0)
    path = cvnet_file(tmp_path / "CVPR2022_CVNet_R101.pyth", model)
    info = inspect_checkpoint(path)
    assert info.best.name == "superglobal_r101" and info.best.report.ok
    with pytest.raises(ck.CheckpointError, match="'superglobal_r101'"):
        tokenret.create_model("superglobal_r50", checkpoint=path)


def test_token_keeps_the_release_protocol(tmp_path, tiny_token_model):
    """Token's convention is the one the engine always applied: RGB ImageNet, 1024 px, the release's scales
    by F.interpolate, the plain mean; without a config, extraction gives what ExtractionConfig() gives."""
    token = tiny_token_model().eval()
    assert ExtractionConfig.for_model(token, num_workers=0) == ExtractionConfig(num_workers=0)
    conv = input_convention(token)
    assert (conv.channel_order, conv.max_size, conv.scale_resize, conv.box_rounding) == (
        "RGB",
        1024,
        "scale_factor",
        "pil",
    )
    for i in range(2):
        write_png(tmp_path / f"{i}.png", 60 + 10 * i, 80, seed=i)
    paths = [tmp_path / "0.png", tmp_path / "1.png"]
    boxes = [None, (3.6, 2.2, 50.5, 40.7)]
    legacy = extract_descriptors(token, paths, boxes, ExtractionConfig(num_workers=0), progress=False)
    default = extract_descriptors(token, paths, boxes, progress=False)
    np.testing.assert_array_equal(default.descriptors, legacy.descriptors)
