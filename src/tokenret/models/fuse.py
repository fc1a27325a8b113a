"""Inference copies of models with every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution with
scaled weights and a shifted bias. Folding removes a full read and write of every feature map per
BatchNorm (ResNet-101 has 104 of them), memory-bound passes that cost real time on CPU (measured:
bench/README.md, "extract"). Descriptors agree with the unfolded model to float32 rounding (relative 1e-6).

Only pairs whose order of execution is certain are folded: consecutive ``Conv2d`` -> ``BatchNorm2d`` in an
``nn.Sequential``, ``conv{i}`` -> ``bn{i}`` in torchvision's ResNet blocks, and ``proj`` -> ``bn`` in the
pycls blocks of SuperGlobal's trunk. Anything else is left as is.

On CPU, :func:`fuse_activations` goes one step further on a folded copy: each ReLU (or SuperGlobal's ReLU+,
a clamp at a floor) after a convolution, and each residual add at the end of a ResNet block with the
activation after it, becomes a post-op of the oneDNN convolution before it
(``torch.ops.mkldnn._convolution_pointwise``, the kernels inductor uses for the same fusion), so these
feature maps are not read and written once more. Same results (oneDNN applies the post-ops to the same
accumulators). oneDNN takes a ReLU but no clamp after a fused add: there the clamp follows in place.

With ``winograd=True``, the 3x3 stride-1 convolutions of the fused blocks (ResNet's ``conv2``) go through
NNPACK's fast-convolution kernels (``torch._nnpack_spatial_convolution``: Winograd-type transforms, fewer
multiplies than a direct convolution) whenever the calling thread runs torch with one thread, as each CPU
extraction stream does on a 2-core machine. Once oneDNN's direct convolutions run at the CPU's multiply
rate, fewer multiplies are the remaining fp32 gain (measured: bench/README.md, "extract"); the trunk's
outputs differ from oneDNN's by float32 rounding of the transforms (relative ~1e-5). NNPACK takes NCHW
images one at a time (its batched path was slower and less exact), so a channels_last feature map is
transposed there and back (a 2-D blocked copy). With more threads per caller the oneDNN kernel runs
(NNPACK's own thread pool and OpenMP's threads wait on each other).

Example:
    >>> model = tokenret.create_model("token_r101").eval()                               # doctest: +SKIP
    >>> fast = fold_batchnorm(model)     # a copy: the original keeps its BatchNorms  # doctest: +SKIP
    >>> fuse_activations(fast)           # in place, CPU inference only               # doctest: +SKIP
    >>> fuse_activations(fold_batchnorm(model), winograd=winograd_available())         # doctest: +SKIP
"""

from __future__ import annotations

import copy
import functools
import logging
import math

import torch
import torchvision
from torch import nn

from tokenret.models.superglobal import Bottleneck as PyclsBottleneck
from tokenret.models.superglobal import ReLUPlus

_RESNET_BLOCKS = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
log = logging.getLogger(__name__)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode (running statistics)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        scale = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if bn.affine
            else torch.rsqrt(bn.running_var + bn.eps)
        )
        shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype))
    fused.requires_grad_(False)
    return fused


def _fold_in_place(module: nn.Module) -> int:
    count = 0
    for child in module.children():
        count += _fold_in_place(child)
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                module._modules[a] = fold_conv_bn(conv, bn)
                module._modules[b] = nn.Identity()
                count += 1
    elif isinstance(module, _RESNET_BLOCKS):
        for i in (1, 2, 3):
            conv, bn = getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d:
                setattr(module, f"conv{i}", fold_conv_bn(conv, bn))
                setattr(module, f"bn{i}", nn.Identity())
                count += 1
    elif type(module) is PyclsBottleneck and module.has_proj:  # shortcut = bn(proj(x)); f is a Sequential
        if isinstance(module.proj, nn.Conv2d) and type(module.bn) is nn.BatchNorm2d:
            module.proj, module.bn = fold_conv_bn(module.proj, module.bn), nn.Identity()
            count += 1
    return count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorms folded into their convolutions (for inference only).

    Attributes such as ``model_name``, ``model_kwargs`` and ``descriptor_dim`` travel with the copy; the
    number of folded pairs is in ``folded_batchnorms``.
    """
    fused = copy.deepcopy(model).eval()
    fused.folded_batchnorms = _fold_in_place(fused)
    return fused


def _pointwise(
    x: torch.Tensor, conv: nn.Conv2d, attr: str, scalars: list[float] | None = None
) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(
        x,
        conv.weight,
        conv.bias,
        conv.padding,
        conv.stride,
        conv.dilation,
        conv.groups,
        attr,
        scalars or [],
        "",
    )


def _conv_act(x: torch.Tensor, conv: nn.Conv2d, floor: float) -> torch.Tensor:
    """``clamp(conv(x), min=floor)`` in one oneDNN call: a ReLU post-op at floor 0, else a clip ("hardtanh")
    to [floor, inf)."""
    if floor == 0.0:
        return _pointwise(x, conv, "relu")
    return _pointwise(x, conv, "hardtanh", [floor, math.inf])


def _pointwise_add_act(x: torch.Tensor, other: torch.Tensor, conv: nn.Conv2d, floor: float) -> torch.Tensor:
    """``clamp(conv(x) + other, min=floor)``: one oneDNN call at floor 0 (the add with a ReLU post-op);
    else the add in the call and the clamp in place after it (oneDNN refuses other activations after a
    fused add)."""
    relu = floor == 0.0
    out = torch.ops.mkldnn._convolution_pointwise.binary(
        x, other, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
        "add", 1.0, "relu" if relu else None, [], "" if relu else None,
    )  # fmt: skip
    return out if relu else out.clamp_(min=floor)


def _fused_kernels_agree(floor: float) -> bool:
    """``clamp(conv(x), min=floor)`` and ``clamp(conv(x) + other, min=floor)`` by the fused kernels equal a
    float64 eager reference on a tiny case (floor 0: the ReLU kernels)."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x = torch.randn(1, 4, 7, 5, generator=g).contiguous(memory_format=torch.channels_last)
    other = torch.randn(1, 6, 7, 5, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = conv.double()(x.double())
        conv.float()
        return torch.allclose(
            _conv_act(x, conv, floor).double(), ref.clamp(min=floor), atol=1e-4
        ) and torch.allclose(
            _pointwise_add_act(x, other, conv, floor).double(),
            (ref + other.double()).clamp(min=floor),
            atol=1e-4,
        )


@functools.cache
def pointwise_fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolutions, and they compute what eager ops compute
    (checked once on a tiny float64-referenced case; any error or mismatch turns the fusion off)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        ok = _fused_kernels_agree(0.0)
    except Exception as e:  # an op missing from this build, or refused
        log.debug("oneDNN pointwise fusion unavailable: %s", e)
        return False
    if not ok:
        log.warning("oneDNN fused convolutions disagree with eager ones on this machine: fusion turned off")
    return ok


@functools.cache
def clamp_fusion_available() -> bool:
    """Whether oneDNN's clip post-op computes ``clamp(conv(x), min=floor)`` and a fused add without an
    activation computes ``conv(x) + other`` here (checked once, like :func:`pointwise_fusion_available`;
    without them ReLU+ layers are left unfused)."""
    if not pointwise_fusion_available():
        return False
    try:
        ok = _fused_kernels_agree(0.25)
    except Exception as e:  # a build whose oneDNN lacks the clip post-op
        log.debug("oneDNN clamp fusion unavailable: %s", e)
        return False
    if not ok:
        log.warning("oneDNN's fused clamp disagrees with eager clamp on this machine: ReLU+ left unfused")
    return ok


def _winograd_eligible(conv: nn.Module) -> bool:
    return (
        _is_plain_conv(conv)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding == (1, 1)
        and conv.groups == 1
    )


def _nnpack(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(x) by NNPACK for one NCHW-contiguous image (1, C, H, W). NNPACK reads the weight as NCHW: a
    network moved to channels_last has channels_last weights, copied here (a few MB, small beside the
    convolution itself)."""
    return torch._nnpack_spatial_convolution(x, conv.weight.contiguous(), conv.bias, list(conv.padding))


def winograd_conv_relu(x: torch.Tensor, conv: nn.Conv2d, floor: float = 0.0) -> torch.Tensor:
    """``relu(conv(x))`` (``clamp(conv(x), min=floor)`` with a floor) through NNPACK, image by image; the
    result keeps ``x``'s memory format."""
    n, _, h, w = x.shape
    c = conv.out_channels
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.empty((n, c, h, w), dtype=x.dtype, memory_format=torch.channels_last if nhwc else None)
    for i in range(n):
        xi = x[i : i + 1]
        if nhwc:  # (H*W, C) rows -> (C, H*W): a 2-D blocked transpose, cheaper than .contiguous() here
            flat = torch.empty((1, x.shape[1], h, w), dtype=x.dtype)
            flat.view(x.shape[1], h * w).copy_(x[i].permute(1, 2, 0).reshape(h * w, -1).t())
            xi = flat
        y = _nnpack(xi.contiguous(), conv)
        y = y.relu_() if floor == 0.0 else y.clamp_(min=floor)
        if nhwc:
            out[i].permute(1, 2, 0).reshape(h * w, c).copy_(y.view(c, h * w).t())
        else:
            out[i : i + 1].copy_(y)
    return out


@functools.cache
def winograd_available() -> bool:
    """Whether NNPACK's fast convolutions can be used here, checked once: NNPACK initialises (this also
    creates its thread pool for one thread: the callers are 1-thread streams) and a small convolution agrees
    with a float64 reference. Any error or mismatch turns them off."""
    try:
        if not torch.backends.nnpack.is_available():  # this also initialises NNPACK (its kernels fail until)
            return False
        g = torch.Generator().manual_seed(0)
        conv = nn.Conv2d(8, 6, 3, padding=1).eval()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        x = torch.randn(2, 8, 11, 7, generator=g)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                got = winograd_conv_relu(x, conv).double()
                got_nhwc = winograd_conv_relu(x.contiguous(memory_format=torch.channels_last), conv).double()
                ref = conv.double()(x.double()).relu()
        finally:
            torch.set_num_threads(threads)
        ok = torch.allclose(got, ref, rtol=1e-4, atol=1e-4) and torch.equal(got, got_nhwc)
    except Exception as e:  # a build without NNPACK, an unsupported CPU
        log.debug("NNPACK convolutions unavailable: %s", e)
        return False
    if not ok:
        log.warning("NNPACK convolutions disagree with the reference on this machine: not used")
    return ok


class ConvReLU(nn.Module):
    """``relu(conv(x))`` as one oneDNN convolution (CPU, inference); with a ``floor`` (ReLU+),
    ``clamp(conv(x), min=floor)``."""

    def __init__(self, conv: nn.Conv2d, floor: float = 0.0) -> None:
        super().__init__()
        self.conv, self.floor = conv, float(floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_act(x, self.conv, self.floor)

    def extra_repr(self) -> str:
        return f"floor={self.floor}" if self.floor else ""


class FusedResidualBlock(nn.Module):
    """A folded residual block, ``act_out(conv_last(h) + shortcut(x))`` with ``h`` the inner convolutions,
    each followed by its activation: every convolution carries its activation, the last one also the
    residual add, as oneDNN post-ops (CPU, inference). Activations are ReLUs or clamps at a floor (ReLU+),
    given as floors (0: ReLU). With ``winograd``, the inner 3x3 stride-1 convolutions run through NNPACK
    when the calling thread has one torch thread (see the module's docstring).

    Made by :meth:`from_torchvision` (BasicBlock/Bottleneck) and :meth:`from_pycls` (SuperGlobal's trunk).
    """

    def __init__(
        self,
        convs: list[nn.Conv2d],
        shortcut: nn.Conv2d | None,
        floors: list[float],
        out_floor: float = 0.0,
        winograd: bool = False,
    ) -> None:
        super().__init__()
        if len(floors) != len(convs) - 1:
            raise ValueError("one activation floor per inner convolution")
        self.convs = nn.ModuleList(convs)
        self.downsample = shortcut
        self.floors, self.out_floor = [float(f) for f in floors], float(out_floor)
        self.winograd = [winograd and _winograd_eligible(c) for c in convs[:-1]]

    @classmethod
    def from_torchvision(cls, block: nn.Module, winograd: bool = False) -> FusedResidualBlock:
        convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        shortcut = block.downsample[0] if block.downsample is not None else None
        return cls(convs, shortcut, [0.0] * (len(convs) - 1), 0.0, winograd)

    @classmethod
    def from_pycls(cls, block: PyclsBottleneck, winograd: bool = False) -> FusedResidualBlock:
        f = block.f
        floors = [_floor(f.a_relu), _floor(f.b_relu)]
        shortcut = block.proj if block.has_proj else None
        return cls([f.a, f.b, f.c], shortcut, floors, _floor(block.relu), winograd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        one_thread = any(self.winograd) and torch.get_num_threads() == 1
        for conv, floor, fast in zip(self.convs[:-1], self.floors, self.winograd, strict=True):
            h = winograd_conv_relu(h, conv, floor) if fast and one_thread else _conv_act(h, conv, floor)
        identity = x if self.downsample is None else _pointwise(x, self.downsample, "none")
        return _pointwise_add_act(h, identity, self.convs[-1], self.out_floor)

    def extra_repr(self) -> str:
        floors = self.floors + [self.out_floor]
        return f"floors={floors}" if any(floors) else ""


def _is_plain_conv(m: nn.Module | None) -> bool:
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and m.weight.dtype == torch.float32


def _floor(act: nn.Module) -> float | None:
    """The floor of an activation the fused kernels can apply: 0 for a ReLU, alpha for ReLU+ (where the
    clip post-op works here); None for anything else."""
    if type(act) is nn.ReLU:
        return 0.0
    if type(act) is ReLUPlus and clamp_fusion_available():
        return act.alpha
    return None


_PYCLS_F = ["a", "a_bn", "a_relu", "b", "b_bn", "b_relu", "c", "c_bn"]


def _fusable_pycls_block(block: nn.Module) -> bool:
    """Exactly SuperGlobal's pycls Bottleneck, folded (``f`` in its own order, BatchNorms now Identity)."""
    if (
        type(block) is not PyclsBottleneck
        or type(block.f) is not nn.Sequential
        or list(block.f._modules) != _PYCLS_F
    ):
        return False
    f = block.f
    if not all(_is_plain_conv(f._modules[n]) for n in ("a", "b", "c")):
        return False
    if not all(type(f._modules[n]) is nn.Identity for n in ("a_bn", "b_bn", "c_bn")):
        return False
    if any(_floor(m) is None for m in (f.a_relu, f.b_relu, block.relu)):
        return False
    return not block.has_proj or (_is_plain_conv(block.proj) and type(block.bn) is nn.Identity)


def _fusable_block(block: nn.Module) -> bool:
    """Exactly a torchvision block (not a subclass with its own forward) whose BatchNorms were folded."""
    if type(block) not in _RESNET_BLOCKS or type(block.relu) is not nn.ReLU:
        return False
    n = 3 if hasattr(block, "conv3") else 2
    for i in range(1, n + 1):
        if (
            not _is_plain_conv(getattr(block, f"conv{i}"))
            or type(getattr(block, f"bn{i}")) is not nn.Identity
        ):
            return False
    ds = block.downsample
    return ds is None or (
        type(ds) is nn.Sequential and len(ds) == 2 and _is_plain_conv(ds[0]) and type(ds[1]) is nn.Identity
    )


def _fuse_in_place(module: nn.Module, winograd: bool) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if _fusable_block(child):
            setattr(module, name, FusedResidualBlock.from_torchvision(child, winograd))
            count += 1
        elif _fusable_pycls_block(child):
            setattr(module, name, FusedResidualBlock.from_pycls(child, winograd))
            count += 1
        else:
            count += _fuse_in_place(child, winograd)
    if type(module) is nn.Sequential:  # conv -> [folded BatchNorm] -> ReLU (or ReLU+), as in a ResNet stem
        names = list(module._modules)
        for i, name in enumerate(names):
            j = i + 1
            while j < len(names) and type(module._modules[names[j]]) is nn.Identity:
                j += 1
            floor = _floor(module._modules[names[j]]) if j < len(names) else None
            if _is_plain_conv(module._modules[name]) and floor is not None:
                module._modules[name] = ConvReLU(module._modules[name], floor)
                module._modules[names[j]] = nn.Identity()
                count += 1
    return count


def fuse_activations(network: nn.Module, winograd: bool = False) -> int:
    """Fuse ReLUs and residual adds into the convolutions of a folded inference copy, in place (CPU only,
    float32, no autograd). Returns how many blocks/convolutions were fused: 0 where this torch build lacks
    the fused oneDNN kernels, and the network is then left as it was. ``winograd``: the blocks' inner 3x3
    stride-1 convolutions use NNPACK in 1-thread callers (only where :func:`winograd_available`)."""
    if not pointwise_fusion_available():
        return 0
    count = _fuse_in_place(network, winograd and winograd_available())
    network.fused_activations = count
    return count


__all__ = [
    "ConvReLU",
    "FusedResidualBlock",
    "fold_batchnorm",
    "fold_conv_bn",
    "fuse_activations",
    "winograd_available",
    "winograd_conv_relu",
]
