"""BatchNorm folding: the folded copy computes what the model computes, and extraction uses it."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import tokenret
from tokenret.extraction import ExtractionConfig, extract_descriptors
from tokenret.models.fuse import fold_batchnorm, fold_conv_bn, pointwise_fusion_available


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (fresh ones are mean 0, var 1, identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_folded_conv_equals_conv_then_batchnorm(bias, affine):
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=bias).double()
    bn = nn.BatchNorm2d(7, affine=affine).double().eval()
    _randomise_bn(bn)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_folded_token_model_gives_the_same_descriptors_and_leaves_the_original_alone(tiny_token_model):
    model = tiny_token_model().double()
    _randomise_bn(model)
    model.eval()
    n_bn = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    fused = fold_batchnorm(model)
    assert fused.folded_batchnorms == n_bn == 21  # 20 in ResNet-18, 1 after the head's input conv
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == n_bn
    assert fused.model_name == model.model_name and fused.descriptor_dim == model.descriptor_dim
    x = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-10, atol=1e-10)


def test_extraction_with_and_without_folding_agree(tmp_path, tiny_token_model, write_random_images):
    paths = write_random_images(tmp_path, [(56, 40 + 8 * i) for i in range(3)], seed=0, high=255)
    model = tiny_token_model()
    _randomise_bn(model)
    runs = {}
    for fold in (True, False):
        cfg = ExtractionConfig(max_size=64, scales=(1.0, 0.75), num_workers=0, fold_batchnorm=fold)
        runs[fold] = extract_descriptors(model, paths, config=cfg, progress=False).descriptors
    np.testing.assert_allclose(runs[True], runs[False], atol=2e-5)
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == 21  # the caller's model is untouched


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_extraction_gives_the_same_descriptors_and_is_reused(
    tmp_path, tiny_token_model, write_random_images
):
    from tokenret.extraction import descriptors as ex

    paths = write_random_images(tmp_path, [(40 + 8 * i, 48) for i in range(3)], seed=1, high=255)
    model = tiny_token_model()
    _randomise_bn(model)
    plain = ExtractionConfig(max_size=48, scales=(1.0, 0.75), num_workers=0)
    compiled = ExtractionConfig(max_size=48, scales=(1.0, 0.75), num_workers=0, compile=True)
    want = extract_descriptors(model, paths, config=plain, progress=False).descriptors
    got = extract_descriptors(model, paths, config=compiled, progress=False).descriptors
    np.testing.assert_allclose(got, want, atol=2e-5)
    network = ex.inference_network(model, compiled)
    assert ex.inference_network(model, compiled) is network  # same weights: compiled once
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # new weights: a new copy
    assert ex.inference_network(model, compiled) is not network


def test_the_folded_copy_is_reused_while_model_and_weights_stay_the_same(tiny_token_model):
    import gc

    from tokenret.extraction import descriptors as ex

    cfg = ExtractionConfig(num_workers=0)
    model = tiny_token_model().eval()
    first = ex.inference_network(model, cfg)
    assert first is not model and ex.inference_network(model, cfg) is first  # no second copy
    assert ex.inference_network(model, ExtractionConfig(num_workers=0, channels_last=False)) is not first
    first = ex.inference_network(model, cfg)
    with torch.no_grad():
        model.tr.proj[0].weight.mul_(2.0)  # in place, as an optimizer step
    second = ex.inference_network(model, cfg)
    assert second is not first
    torch.testing.assert_close(second.tr.proj[0].weight, model.tr.proj[0].weight)
    # another model never gets this one's copy, even at a reused address
    del model, first, second
    gc.collect()
    other = tiny_token_model().eval()
    net = ex.inference_network(other, cfg)
    for a, b in zip(net.tr.decoder.parameters(), other.tr.decoder.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_compile_without_a_cpp_compiler_fails_before_any_work(monkeypatch, tmp_path, tiny_token_model):
    from tokenret.extraction import network as ex

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(ex.shutil, "which", lambda name: None)
    model = tiny_token_model()
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    config = ExtractionConfig(max_size=32, scales=(1.0,), num_workers=0, compile=True)
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler.*without --compile"):
        extract_descriptors(model, [path], config=config, progress=False)
    monkeypatch.setenv("CXX", "/opt/my/g++")  # an explicit compiler is trusted
    ex.check_compiler(torch.device("cpu"))
    ex.check_compiler(torch.device("cuda"))  # GPU kernels need no host compiler check here


# --- oneDNN post-op fusion (ReLU and residual add inside the convolution) ---------------------------------

needs_fusion = pytest.mark.skipif(
    not pointwise_fusion_available(),
    reason="this torch build has no oneDNN fused convolutions (torch.ops.mkldnn._convolution_pointwise)",
)


@needs_fusion
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])  # BasicBlock / Bottleneck with downsample
def test_fused_activations_compute_what_the_folded_network_computes(backbone, tiny_token_model):
    from tokenret.models.fuse import ConvReLU, FusedResidualBlock, fuse_activations

    model = tiny_token_model(backbone=backbone)
    _randomise_bn(model)
    model.eval()
    folded = fold_batchnorm(model)
    reference = fold_batchnorm(model).double()  # float64, unfused: the independent computation
    n = fuse_activations(folded)
    blocks = 8 if backbone == "resnet18" else 16
    assert sum(isinstance(m, FusedResidualBlock) for m in folded.modules()) == blocks
    assert sum(isinstance(m, ConvReLU) for m in folded.modules()) == n - blocks >= 1  # the stem at least
    trunk_relus = [m for m in folded.backbone.modules() if isinstance(m, nn.ReLU)]
    assert trunk_relus == []  # every ReLU of the trunk went into a convolution
    x = torch.randn(2, 3, 72, 56)
    with torch.inference_mode():
        want = reference(x.double())
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = folded.to(memory_format=fmt)(x.contiguous(memory_format=fmt))
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_fusion
def test_a_block_with_its_own_forward_is_left_alone():
    import torchvision

    from tokenret.models.fuse import FusedResidualBlock, fuse_activations

    class Gated(torchvision.models.resnet.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 0.5

    net = nn.Sequential(Gated(8, 8), torchvision.models.resnet.BasicBlock(8, 8)).eval()
    folded = fold_batchnorm(net)
    reference = fold_batchnorm(net)
    fuse_activations(folded)
    assert isinstance(folded[0], Gated) and isinstance(folded[1], FusedResidualBlock)
    x = torch.randn(1, 8, 10, 9)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), reference(x), rtol=1e-5, atol=1e-5)


def test_fusion_is_used_only_for_cpu_float32_eager_and_never_on_the_callers_model(
    monkeypatch, tiny_token_model
):
    from tokenret.extraction import descriptors as ex
    from tokenret.models import fuse

    model = tiny_token_model().eval()

    def fused(cfg):
        return any(isinstance(m, fuse.FusedResidualBlock) for m in ex.inference_network(model, cfg).modules())

    available = fuse.pointwise_fusion_available()
    assert fused(ExtractionConfig()) == available
    assert not fused(ExtractionConfig(amp="bf16"))  # autocast would not reach the fused kernels
    assert not fused(ExtractionConfig(fuse_activations=False))
    assert not fused(ExtractionConfig(fold_batchnorm=False))  # that network is the caller's model
    assert not any(isinstance(m, fuse.FusedResidualBlock) for m in model.modules())
    # a torch build without the kernels: nothing is fused, extraction goes on unfused
    monkeypatch.setattr(fuse, "pointwise_fusion_available", lambda: False)
    assert not fused(ExtractionConfig())


def test_pointwise_fusion_is_turned_off_when_the_kernels_fail(monkeypatch):
    from tokenret.models import fuse

    def broken(*args, **kwargs):
        raise RuntimeError("not built with oneDNN")

    fuse.pointwise_fusion_available.cache_clear()
    monkeypatch.setattr(fuse, "_pointwise", broken)
    try:
        assert fuse.pointwise_fusion_available() is False
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        assert fuse.fuse_activations(net) == 0 and type(net[1]) is nn.ReLU
    finally:
        fuse.pointwise_fusion_available.cache_clear()


@needs_fusion
def test_extraction_with_and_without_fused_activations_agree(tmp_path, tiny_token_model, write_random_images):
    paths = write_random_images(tmp_path, [(40 + 8 * i, 48) for i in range(3)], seed=2, high=255)
    model = tiny_token_model()
    _randomise_bn(model)
    runs = {}
    for fuse_ in (True, False):
        cfg = ExtractionConfig(max_size=48, scales=(1.0, 0.75), num_workers=0, fuse_activations=fuse_)
        runs[fuse_] = extract_descriptors(model, paths, config=cfg, progress=False).descriptors
    np.testing.assert_allclose(runs[True], runs[False], atol=2e-5)


# --- NNPACK's fast 3x3 convolutions in 1-thread streams ----------------------------------------------------


def _winograd_ok() -> bool:
    from tokenret.models.fuse import winograd_available

    return pointwise_fusion_available() and winograd_available()


needs_winograd = pytest.mark.skipif(
    not _winograd_ok(), reason="this torch build has no NNPACK (torch.backends.nnpack) or no oneDNN fusion"
)


class _threads:
    """torch's thread count set for a block, then restored."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@needs_winograd
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_winograd_convolution_matches_a_float64_reference_in_both_memory_formats(fmt):
    from tokenret.models.fuse import winograd_conv_relu

    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(16, 24, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    conv = conv.to(memory_format=fmt)  # a network moved to channels_last has channels_last weights
    x = torch.randn(3, 16, 13, 9, generator=g).contiguous(memory_format=fmt)
    with torch.inference_mode(), _threads(1):
        got = winograd_conv_relu(x, conv)
        want = torch.nn.functional.conv2d(
            x.double(), conv.weight.double(), conv.bias.double(), padding=1
        ).relu()
    assert got.is_contiguous(memory_format=fmt) and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert (got == 0).any() and (got > 0).any()  # the ReLU is applied, and not to everything


@needs_winograd
def test_winograd_blocks_take_nnpack_only_in_one_thread_callers(monkeypatch, tiny_token_model):
    from tokenret.models import fuse

    model = tiny_token_model(backbone="resnet50")
    _randomise_bn(model)
    model.eval()
    reference = fold_batchnorm(model).double()
    fast = fold_batchnorm(model)
    fuse.fuse_activations(fast, winograd=True)
    blocks = [m for m in fast.modules() if isinstance(m, fuse.FusedResidualBlock)]
    # resnet50: 16 bottlenecks; the first block of stages 3-5 has a stride-2 3x3, kept on oneDNN
    assert len(blocks) == 16 and sum(any(b.winograd) for b in blocks) == 13
    calls = []
    real = fuse._nnpack
    monkeypatch.setattr(fuse, "_nnpack", lambda x, conv: calls.append(x.shape) or real(x, conv))
    x = torch.randn(2, 3, 72, 56)
    with torch.inference_mode():
        want = reference(x.double())
        for fmt in (torch.contiguous_format, torch.channels_last):
            calls.clear()
            net = fast.to(memory_format=fmt)
            with _threads(1):
                got = net(x.contiguous(memory_format=fmt))
            assert len(calls) == 13 * 2  # image by image
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        calls.clear()
        with _threads(2):
            got = fast(x)
        assert calls == []  # more threads per caller: oneDNN's kernel
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_winograd
def test_extraction_with_and_without_winograd_agree_and_the_option_reaches_the_network(
    tmp_path, monkeypatch, tiny_token_model, write_random_images
):
    from tokenret.extraction import descriptors as ex
    from tokenret.models import fuse

    paths = write_random_images(tmp_path, [(40 + 8 * i, 56) for i in range(3)], seed=3, high=255)
    model = tiny_token_model(backbone="resnet50")
    _randomise_bn(model)
    calls = []
    real = fuse._nnpack
    monkeypatch.setattr(fuse, "_nnpack", lambda x, conv: calls.append(1) or real(x, conv))
    runs = {}
    for winograd in (True, False):
        calls.clear()
        cfg = ExtractionConfig(max_size=56, scales=(1.0, 0.75), num_workers=0, streams=2, winograd=winograd)
        with _threads(2):  # two streams of one thread each: the default on a 2-core CPU
            runs[winograd] = extract_descriptors(model, paths, config=cfg, progress=False).descriptors
        assert (len(calls) > 0) == winograd
        blocks = [
            m for m in ex.inference_network(model, cfg).modules() if isinstance(m, fuse.FusedResidualBlock)
        ]
        assert any(any(b.winograd) for b in blocks) == winograd
    np.testing.assert_allclose(runs[True], runs[False], atol=2e-5)
    assert np.abs(runs[True] - runs[False]).max() > 0  # another algorithm really ran


def test_winograd_is_turned_off_when_nnpack_fails(monkeypatch):
    from tokenret.models import fuse

    def broken(*args, **kwargs):
        raise RuntimeError("NNPACK SpatialConvolution_updateOutput failed")

    fuse.winograd_available.cache_clear()
    monkeypatch.setattr(fuse, "_nnpack", broken)
    try:
        assert fuse.winograd_available() is False
        net = fold_batchnorm(
            tokenret.create_model("token_r50", backbone="resnet18", dim=32, num_heads=4).eval()
        )
        fuse.fuse_activations(net, winograd=True)
        assert not any(any(m.winograd) for m in net.modules() if isinstance(m, fuse.FusedResidualBlock))
    finally:
        fuse.winograd_available.cache_clear()


def test_no_winograd_flag_reaches_the_extraction_settings_of_evaluate_and_index():
    from tokenret.cli import build_parser, extraction_config_from_args
    from tokenret.cli import runtime_from_args as _runtime_from_args

    parser = build_parser()
    for argv in (["evaluate", "--data-root", "D"], ["index", "PHOTOS", "--out", "I"]):
        default = parser.parse_args(argv)
        off = parser.parse_args([*argv, "--no-winograd"])
        assert extraction_config_from_args(default).winograd is True
        assert extraction_config_from_args(off).winograd is False
        assert _runtime_from_args(default)["winograd"] is True
        assert _runtime_from_args(off)["winograd"] is False


def _superglobal_r50():
    torch.manual_seed(0)
    model = tokenret.create_model("superglobal_r50")
    _randomise_bn(model, seed=3)
    return model.eval()


def _acts(module: nn.Module) -> list[nn.Module]:
    from tokenret.models.superglobal import ReLUPlus

    return [m for m in module.modules() if isinstance(m, (nn.ReLU, ReLUPlus))]


@needs_fusion
def test_superglobal_blocks_fold_and_fuse_with_their_relu_plus_floors():
    from tokenret.models.fuse import ConvReLU, FusedResidualBlock, fuse_activations
    from tokenret.models.superglobal import RELU_PLUS_ALPHA as A

    model = _superglobal_r50()
    reference = copy.deepcopy(model).double()  # float64, unfolded and unfused: the independent computation
    folded = fold_batchnorm(model)
    assert folded.folded_batchnorms == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # the shortcuts' too
    fuse_activations(folded, winograd=True)
    blocks = {
        stage: [m for m in getattr(folded, stage).modules() if isinstance(m, FusedResidualBlock)]
        for stage in ("s1", "s2", "s3", "s4")
    }
    assert [len(b) for b in blocks.values()] == [3, 4, 6, 3]
    # ReLU+ inside the s1 blocks and at the outputs of s1..s3; ReLUs elsewhere (the spec's placement)
    want_floors = {"s1": ([A, A], A), "s2": ([0, 0], A), "s3": ([0, 0], A), "s4": ([0, 0], 0)}
    for stage, (inner, out) in want_floors.items():
        assert all(b.floors == inner and b.out_floor == out for b in blocks[stage]), stage
    assert isinstance(folded.stem.conv, ConvReLU) and folded.stem.conv.floor == 0
    assert _acts(folded) == []  # every activation went into a convolution
    x = torch.randn(2, 3, 72, 56)
    with torch.inference_mode():
        want = reference(x.double())
        for fmt in (torch.contiguous_format, torch.channels_last):
            net = folded.to(memory_format=fmt)
            for threads in (1, 2):  # one thread: NNPACK's 3x3 where available (clamped at the floor)
                with _threads(threads):
                    got = net(x.contiguous(memory_format=fmt))
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        # the floors are real: s1's output equals the reference's, ReLUs for its clamps give zeros there
        s1 = folded.s1(folded.stem(x))
        torch.testing.assert_close(
            s1.double(), reference.s1(reference.stem(x.double())), rtol=1e-4, atol=1e-5
        )
        assert s1.min() == A
        relu_only = copy.deepcopy(folded)
        for b in relu_only.modules():
            if isinstance(b, FusedResidualBlock):
                b.floors, b.out_floor = [0.0] * len(b.floors), 0.0
        assert relu_only.s1(relu_only.stem(x)).min() == 0


@needs_fusion
def test_relu_plus_is_left_unfused_where_the_clip_post_op_fails(monkeypatch):
    from tokenret.models import fuse
    from tokenret.models.superglobal import ReLUPlus

    model = _superglobal_r50()
    want = fold_batchnorm(model)
    monkeypatch.setattr(fuse, "clamp_fusion_available", lambda: False)
    folded = fold_batchnorm(model)
    fuse.fuse_activations(folded)
    # s4's blocks have ReLUs only and fuse; every block with a ReLU+ stays as it was
    assert [type(b) for b in folded.s4] == [fuse.FusedResidualBlock] * 3
    assert not any(
        isinstance(m, fuse.FusedResidualBlock)
        for s in ("s1", "s2", "s3")
        for m in getattr(folded, s).modules()
    )
    assert sum(isinstance(m, ReLUPlus) for m in folded.modules()) == sum(
        isinstance(m, ReLUPlus) for m in model.modules()
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), want(x), rtol=1e-4, atol=1e-5)


def test_clamp_fusion_is_turned_off_when_the_kernel_fails(monkeypatch):
    from tokenret.models import fuse

    real = fuse._conv_act

    def clip_refused(x, conv, floor):  # the ReLU kernels work, the clip post-op does not
        if floor:
            raise RuntimeError("eltwise_clip unsupported")
        return real(x, conv, floor)

    fuse.clamp_fusion_available.cache_clear()
    monkeypatch.setattr(fuse, "_conv_act", clip_refused)
    try:
        assert fuse.clamp_fusion_available() is False
    finally:
        fuse.clamp_fusion_available.cache_clear()
