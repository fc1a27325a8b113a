"""Multi-scale global descriptors: resizing an image tensor to a test scale, and combining the scales.

How a scale is resized and how the scales are combined are the model's
(:class:`~tokenret.models.convention.InputConvention`); the scale combination can be overridden
(``ExtractionConfig.scale_pool``, ``--scale-pool``). Combinations (:data:`SCALE_POOLS`), over the
per-scale vectors d_1..d_S of one image, the result L2-normalised:

- ``mean``: (1/S) sum_s d_s.
- ``gem`` / ``gem:P``: ((1/S) sum_s d_s^p)^(1/p), p the model's ``multiscale_power`` (cirtorch's GeM
  networks) or P (3 where the model has none); meant for non-negative descriptors.
- ``sgem``: max_s d_s / ||d_s|| element-wise (SuperGlobal's sGeM, its default "infinity" branch).
- ``sgem:P``: ((1/S) sum_s (d_s - gamma)^P)^(1/P) + gamma, gamma the minimum of the image's S x D values
  (sGeM's power form; the paper's p_s = 10 is ``sgem:10``). The official code takes gamma over its whole
  batch, which is one image there; here it is per image, so results do not depend on batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenret.extraction.streams import use_handed_threads
from tokenret.models.convention import InputConvention, input_convention, parse_scale_pool

#: Default p of ``gem`` for models without a ``multiscale_power`` (cirtorch's GeM initial p).
DEFAULT_GEM_POWER = 3.0


def resize_to_scale(images: torch.Tensor, scale: float, convention: InputConvention) -> torch.Tensor:
    """(B, C, H, W) -> the tensor at ``scale``, resized as the model's convention says (scale 1: unchanged).

    ``scale_factor``: ``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` (cirtorch);
    ``size``: ``torchvision.transforms.functional.resize(x, [int(H*s), int(W*s)])``, bilinear, with the
    convention's ``antialias`` (SuperGlobal).
    """
    if scale == 1.0:
        return images
    if convention.scale_resize == "scale_factor":
        return F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    h, w = images.shape[-2:]
    size = [int(h * scale), int(w * scale)]
    if size == [h, w]:
        return images
    return TF.resize(images, size, interpolation=InterpolationMode.BILINEAR, antialias=convention.antialias)


def combine_scales(stack: torch.Tensor, scale_pool: str, power: float | None = None) -> torch.Tensor:
    """(S, B, D) per-scale vectors -> (B, D) L2-normalised combination (see the module docstring).

    Args:
        stack: the scales' vectors, float32.
        scale_pool: one of :data:`~tokenret.models.convention.SCALE_POOLS`.
        power: p of a bare ``gem`` (the model's ``multiscale_power``); None: :data:`DEFAULT_GEM_POWER`.
    """
    kind, p = parse_scale_pool(scale_pool)
    if kind == "gem":
        p = p if p is not None else (DEFAULT_GEM_POWER if power is None else float(power))
    if kind == "mean" or (kind == "gem" and (p == 1.0 or len(stack) == 1)):
        out = _mean(stack)
    elif kind == "gem":
        out = _mean(stack.pow(p)).pow(1.0 / p)
    elif p is None:  # sGeM, "infinity" branch
        out = F.normalize(stack, dim=-1).amax(0)
    else:
        gamma = stack.amin(dim=(0, 2), keepdim=True)  # (1, B, 1): each image's minimum
        out = (stack - gamma).pow(p).mean(0).pow(1.0 / p) + gamma[0]
    return F.normalize(out, dim=-1)


def _mean(stack: torch.Tensor) -> torch.Tensor:
    # summed in scale order, then divided: the arithmetic of the Token release (same float rounding)
    total = stack[0]
    for d in stack[1:]:
        total = total + d
    return total / len(stack)


def multiscale_descriptor(
    model: nn.Module,
    images: torch.Tensor,
    scales: Sequence[float],
    scale_pool: str = "model",
    convention: InputConvention | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) images in the model's convention -> (B, D) L2-normalised multi-scale descriptors.

    Args:
        model: the network (or its inference copy).
        images: normalised image tensors.
        scales: test scales.
        scale_pool: how the scales combine; "model": the convention's.
        convention: the model's input convention (default: ``input_convention(model)``).

    Each scale is resized with :func:`resize_to_scale`; its descriptor is ``model(x)`` (L2-normalised),
    or ``model.forward_features(x)`` where the convention combines un-normalised head outputs.
    """
    convention = convention or input_convention(model)
    pool = convention.scale_pool if scale_pool == "model" else scale_pool
    forward = model.forward_features if convention.pool_unnormalised else model
    power = getattr(model, "multiscale_power", None)
    per_scale = []
    for s in scales:
        use_handed_threads()  # in a CPU stream: threads that finished streams handed on
        x = resize_to_scale(images, s, convention)
        if images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        d = forward(x).float()
        per_scale.append(d if convention.pool_unnormalised else F.normalize(d, dim=-1))
    return combine_scales(torch.stack(per_scale), pool, power)
