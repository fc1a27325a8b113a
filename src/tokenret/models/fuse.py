"""Inference copies of models with every BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` equals one convolution with
scaled weights and a shifted bias. Folding removes a full read and write of every feature map per
BatchNorm (ResNet-101 has 104 of them); on the development CPU (2 threads, channels_last, 1024x768) the
trunk ran about 1.5x faster folded (see bench/README.md, "extract"). Descriptors agree with the unfolded
model to float32 rounding (relative 1e-6).

Only pairs whose order of execution is certain are folded: consecutive ``Conv2d`` -> ``BatchNorm2d`` in an
``nn.Sequential``, and ``conv{i}`` -> ``bn{i}`` in torchvision's ResNet blocks. Anything else is left as is.

Example:
    >>> model = tokenret.create_model("token_r101").eval()                               # doctest: +SKIP
    >>> fast = fold_batchnorm(model)     # a copy: the original keeps its BatchNorms  # doctest: +SKIP
"""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

_RESNET_BLOCKS = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)


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
    return count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with BatchNorms folded into their convolutions (for inference only).

    Attributes such as ``model_name``, ``model_kwargs`` and ``descriptor_dim`` travel with the copy; the
    number of folded pairs is in ``folded_batchnorms``.
    """
    fused = copy.deepcopy(model).eval()
    fused.folded_batchnorms = _fold_in_place(fused)
    return fused


__all__ = ["fold_batchnorm", "fold_conv_bn"]
