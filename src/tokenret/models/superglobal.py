"""SuperGlobal (Shao et al., ICCV 2023): CVNet's global network with ReLU+, rGeM and GeM+, no retraining.

The trunk is a ResNet-50/101 in pycls naming (``stem.{conv,bn}``, stages ``s1``..``s4`` of blocks ``bN``,
each with ``proj``/``bn`` where the shape or stride changes and ``f.{a,a_bn,b,b_bn,c,c_bn}``; the stride on
the 3x3; BatchNorm eps 1e-5), so that the global network of CVNet's released files (``encoder_q.*``) loads
under its own names. Per image and scale:

    trunk (ReLU+) -> rGeM -> GeM+ -> L2 -> head.fc (2048 -> 2048, bias) -> L2

- **ReLU+**: ``clamp(min=0.014)`` at the output of every block of s1, s2, s3, and at the two inner
  activations of the s1 blocks; plain ReLU everywhere else (s4, the other stages' inner activations, stem).
- **rGeM**: ``0.5 * LPPool(p_r=2.5, 5x5, stride 1)(ReflectionPad(2)(x / 25^(1/p_r))) + 0.5 * x``: each
  position moves halfway towards the p_r-power mean of its 5x5 neighbourhood.
- **GeM+**: ``(mean over positions of clamp(x, 1e-8)^p)^(1/p)`` with p = 4.6 fixed.

Each is a switch (``relu_plus``, ``rgem``, ``gem_plus``; ``--model-arg``) for the paper's ablation rows.
Off, they are what CVNet-Global does: plain ReLUs; no regional pooling; GeM with the checkpoint's own
learned p (``head.pool.p``, about 3; clamp 1e-6), the head CVNet was trained with.

One difference from the official code's switch: there, the s1 blocks' inner clamps stay on with
``relup=False`` (the class is passed where the flag was meant); here ``relu_plus=False`` turns every
clamp off. The published numbers have them all on, which both give.

``model(x)`` returns the single-scale, L2-normalised descriptor of a tensor already in the model's
convention (BGR, CVNet's mean/std); the test scales and sGeM are the extraction engine's
(:data:`~tokenret.models.convention.SUPERGLOBAL`). ``forward_features`` gives ``head.fc``'s output before
its L2 normalisation (what the official code combines across scales).

Example:
    >>> model = create_model("superglobal_r101", checkpoint="CVPR2022_CVNet_R101.pyth")   # doctest: +SKIP
    >>> model(torch.randn(1, 3, 224, 224)).shape                                            # doctest: +SKIP
    torch.Size([1, 2048])
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenret.models.convention import SUPERGLOBAL, InputConvention

#: Blocks per stage, by depth.
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
#: Output widths of the stages s1..s4 (bottleneck widths are a quarter).
STAGE_WIDTHS = (256, 512, 1024, 2048)
BN_EPS = 1e-5
RELU_PLUS_ALPHA = 0.014
GEM_PLUS_P = 4.6
GEM_PLUS_EPS = 1e-8
RGEM_P = 2.5
RGEM_SIZE = 5


class ReLUPlus(nn.Module):
    """``clamp(x, min=alpha)``: ReLU+ of SuperGlobal (a ReLU whose floor is alpha instead of 0)."""

    def __init__(self, alpha: float = RELU_PLUS_ALPHA) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def _activation(alpha: float | None) -> nn.Module:
    # nn.ReLU where the activation is plain, so that the extraction engine's fused copy can fold it into
    # the convolution before it (tokenret.models.fuse); clamp(min=0) gives the same values.
    return nn.ReLU() if not alpha else ReLUPlus(alpha)


class RegionalGeM(nn.Module):
    """rGeM: ``0.5 * LPPool2d(p, size, stride 1)(ReflectionPad2d((size-1)//2)(x / (size^2)^(1/p))) + 0.5 x``.

    The pooled branch is the p-power mean over each size x size window. A map too small to reflect
    (a side of at most (size-1)//2, where the official code fails) is padded by replication instead.
    """

    def __init__(self, p: float = RGEM_P, size: int = RGEM_SIZE) -> None:
        super().__init__()
        self.p, self.size = float(p), int(size)

    def forward(self, x: Tensor) -> Tensor:
        pad = (self.size - 1) // 2
        mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
        scaled = x / (self.size**2) ** (1.0 / self.p)
        pooled = F.lp_pool2d(F.pad(scaled, (pad, pad, pad, pad), mode=mode), self.p, self.size, stride=1)
        return 0.5 * pooled + 0.5 * x

    def extra_repr(self) -> str:
        return f"p={self.p}, size={self.size}"


class GeMPlus(nn.Module):
    """GeM with a fixed p: ``(mean over positions of clamp(x, eps)^p)^(1/p)``, (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = GEM_PLUS_P, eps: float = GEM_PLUS_EPS) -> None:
        super().__init__()
        self.p, self.eps = float(p), float(eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool1d(x, 1).pow(1.0 / self.p).flatten(1)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


class LearnedGeM(nn.Module):
    """CVNet's head pooling: GeM with a learned p (``head.pool.p``), clamp 1e-6, (B, C, H, W) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).clamp(min=self.eps).pow(self.p)
        return F.adaptive_avg_pool1d(x, 1).pow(1.0 / self.p).flatten(1)


class GlobalHead(nn.Module):
    """``head.fc`` (the 2048 -> dim reduction, with bias) and ``head.pool`` (CVNet's learned GeM)."""

    def __init__(self, w_in: int, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(w_in, dim, bias=True)
        self.pool = LearnedGeM()


class Bottleneck(nn.Module):
    """pycls residual block: ``act(proj/bn(x) + f(x))``, f = 1x1, BN, act, 3x3 (stride), BN, act, 1x1, BN."""

    def __init__(
        self,
        w_in: int,
        w_out: int,
        stride: int,
        inner_alpha: float | None,
        out_alpha: float | None,
    ) -> None:
        super().__init__()
        w_b = w_out // 4
        self.has_proj = w_in != w_out or stride != 1
        if self.has_proj:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out, eps=BN_EPS)
        # named children in pycls order; the engine folds each conv -> BatchNorm pair of this Sequential
        self.f = nn.Sequential(
            OrderedDict(
                a=nn.Conv2d(w_in, w_b, 1, bias=False),
                a_bn=nn.BatchNorm2d(w_b, eps=BN_EPS),
                a_relu=_activation(inner_alpha),
                b=nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False),
                b_bn=nn.BatchNorm2d(w_b, eps=BN_EPS),
                b_relu=_activation(inner_alpha),
                c=nn.Conv2d(w_b, w_out, 1, bias=False),
                c_bn=nn.BatchNorm2d(w_out, eps=BN_EPS),
            )
        )
        self.relu = _activation(out_alpha)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.bn(self.proj(x)) if self.has_proj else x
        return self.relu(shortcut + self.f(x))


class SuperGlobalModel(nn.Module):
    """CVNet's global network with SuperGlobal's pooling and activations (see the module docstring).

    Args:
        depth: 50 or 101 (152 builds, no weights are released).
        relu_plus: ReLU+ (clamp at ``relu_plus_alpha``) where SuperGlobal puts it; off: plain ReLUs.
        rgem: regional GeM (p_r ``rgem_p``, ``rgem_size`` x ``rgem_size`` windows) before the global pooling.
        gem_plus: GeM+ with fixed p ``gem_p``; off: CVNet's GeM with the learned ``head.pool.p``.
        dim: output size of ``head.fc`` (2048 in CVNet's files).
        antialias: torchvision's ``antialias`` when the engine resizes the test scales: False (default) is
            what torchvision < 0.17 did for tensors, when the published numbers were made; True is what
            the official code does under torchvision >= 0.17.
    """

    def __init__(
        self,
        depth: int = 101,
        relu_plus: bool = True,
        rgem: bool = True,
        gem_plus: bool = True,
        dim: int = 2048,
        antialias: bool = False,
        relu_plus_alpha: float = RELU_PLUS_ALPHA,
        gem_p: float = GEM_PLUS_P,
        rgem_p: float = RGEM_P,
        rgem_size: int = RGEM_SIZE,
    ) -> None:
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(STAGE_DEPTHS)}, got {depth!r}")
        for name, flag in (("relu_plus", relu_plus), ("rgem", rgem), ("gem_plus", gem_plus)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.depth, self.relu_plus, self.use_rgem, self.gem_plus = depth, relu_plus, rgem, gem_plus
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                bn=nn.BatchNorm2d(64, eps=BN_EPS),
                relu=nn.ReLU(),
                pool=nn.MaxPool2d(3, stride=2, padding=1),
            )
        )
        alpha = relu_plus_alpha if relu_plus else None
        w_in = 64
        for i, (d, w_out) in enumerate(zip(STAGE_DEPTHS[depth], STAGE_WIDTHS, strict=True)):
            stage = nn.Sequential()
            for j in range(d):
                stage.add_module(
                    f"b{j + 1}",
                    Bottleneck(
                        w_in if j == 0 else w_out,
                        w_out,
                        stride=(1 if i == 0 else 2) if j == 0 else 1,
                        inner_alpha=alpha if i == 0 else None,  # ReLU+ inside the blocks of s1 only
                        out_alpha=alpha if i < 3 else None,  # and at the outputs of s1..s3
                    ),
                )
            self.add_module(f"s{i + 1}", stage)
            w_in = w_out
        self.rgem = RegionalGeM(rgem_p, rgem_size) if rgem else None
        self.gemp = GeMPlus(gem_p) if gem_plus else None
        self.head = GlobalHead(STAGE_WIDTHS[-1], dim)
        self.descriptor_dim = dim
        self.antialias = bool(antialias)
        self.input_convention: InputConvention = SUPERGLOBAL.replace(antialias=self.antialias)

    def unused_weights(self) -> list[str]:
        """Weights loaded with the model that its descriptor does not read (``head.pool.p`` under GeM+)."""
        if self.gemp is None:
            return []
        return [f"head.pool.p (learned GeM p {float(self.head.pool.p.detach()):.3f})"]

    def features(self, images: Tensor) -> Tensor:
        """The s4 feature map (B, 2048, h, w)."""
        return self.s4(self.s3(self.s2(self.s1(self.stem(images)))))

    def pool(self, features: Tensor) -> Tensor:
        """rGeM (if on), then GeM+ or the learned GeM: (B, C, h, w) -> (B, C)."""
        if self.rgem is not None:
            features = self.rgem(features)
        return self.gemp(features) if self.gemp is not None else self.head.pool(features)

    def forward_features(self, images: Tensor) -> Tensor:
        """``head.fc`` of the L2-normalised pooled vector, before its own normalisation (B, dim)."""
        return self.head.fc(F.normalize(self.pool(self.features(images)), dim=-1))

    def forward(self, images: Tensor) -> Tensor:
        """Single-scale L2-normalised descriptors (B, dim) of images in the model's convention."""
        return F.normalize(self.forward_features(images), dim=-1)


def infer_superglobal_kwargs(state: dict[str, Tensor]) -> dict[str, object]:
    """``depth`` from the number of blocks in s3 (6: R50, 23: R101, 36: R152) and ``dim`` from head.fc."""
    out: dict[str, object] = {}
    blocks = {k.split(".")[1] for k in state if k.startswith("s3.b")}
    by_count = {d[2]: depth for depth, d in STAGE_DEPTHS.items()}
    if len(blocks) in by_count:
        out["depth"] = by_count[len(blocks)]
    w = state.get("head.fc.weight")
    if w is not None and w.ndim == 2:
        out["dim"] = int(w.shape[0])
    return out
