"""How a model wants its images: channel order, normalisation, sizing, test scales and how the scales combine.

Each registry model carries one (``model.input_convention``; models without one follow :data:`CIRTORCH`),
and the extraction engine applies it, so a model is evaluated under its own release's protocol without
flags: Token and the cirtorch baselines read RGB images shrunk to 1024 px and combine their scales by a
mean; SuperGlobal reads BGR images at their own resolution, resizes each scale with torchvision's tensor
resize and combines the scales by sGeM.

Example:
    >>> conv = input_convention(create_model("superglobal_r101"))                    # doctest: +SKIP
    >>> conv.channel_order, conv.max_size, conv.scale_pool                             # doctest: +SKIP
    ('BGR', None, 'sgem')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tokenret.data.images import IMAGENET_MEAN, IMAGENET_STD

#: The cirtorch / Token release test scales (in the release's order).
CIRTORCH_SCALES = (1.0, 2**0.5, 2**-0.5)
#: SuperGlobal's three test scales, as written in its code (not exactly 2**-0.5 and 2**0.5).
SUPERGLOBAL_SCALES = (0.7071, 1.0, 1.4142)

#: How the per-scale descriptors of an image become one (``--scale-pool``):
#: ``mean``: their mean; ``gem`` / ``gem:P``: the generalised mean (mean of d^p)^(1/p) with the model's
#: ``multiscale_power`` (cirtorch's GeM networks) or P (3 for models without one); ``sgem``: SuperGlobal's
#: sGeM, L2-normalise each scale's vector and take the element-wise maximum; ``sgem:P``: sGeM's power form,
#: shift by the minimum gamma of the image's values, (mean of (d - gamma)^P)^(1/P) + gamma (the paper's
#: p_s = 10 is ``sgem:10``). The result is always L2-normalised.
SCALE_POOLS = ("mean", "gem", "gem:P", "sgem", "sgem:P")
CHANNEL_ORDERS = ("RGB", "BGR")
#: ``scale_factor``: ``F.interpolate(x, scale_factor=s)`` (cirtorch); ``size``: torchvision's
#: ``resize(x, [int(h * s), int(w * s)])`` on the tensor (SuperGlobal).
SCALE_RESIZES = ("scale_factor", "size")
#: ``pil``: PIL's crop of the float box; ``truncate``: the box's coordinates cut to integers first
#: (``im[int(y0):int(y1), int(x0):int(x1)]``, SuperGlobal's OpenCV loader).
BOX_ROUNDINGS = ("pil", "truncate")


def parse_scale_pool(spec: str) -> tuple[str, float | None]:
    """``"gem:3"`` -> ("gem", 3.0); ``"sgem"`` -> ("sgem", None); ValueError naming the choices otherwise."""
    kind, sep, value = str(spec).partition(":")
    choices = ", ".join(SCALE_POOLS)
    if kind not in ("mean", "gem", "sgem") or (sep and kind == "mean"):
        raise ValueError(f"unknown scale pooling {spec!r}; choose one of {choices}")
    if not sep:
        return kind, None
    try:
        p = float(value)
    except ValueError:
        raise ValueError(f"scale pooling {spec!r}: {value!r} is not a number ({choices})") from None
    if not p > 0 or p == float("inf"):
        raise ValueError(f"scale pooling {spec!r}: the power must be a positive finite number")
    return kind, p


@dataclass(frozen=True)
class InputConvention:
    """What a model's input tensors are and how its multi-scale descriptor is made.

    Args:
        channel_order: "RGB" or "BGR" (the order of the tensor's channels).
        mean, std: per-channel normalisation in ``channel_order`` after scaling pixels to [0, 1].
        max_size: longest image side after loading (never enlarged); None: the file's own resolution.
        scales: the default test scales.
        scale_resize: how a scale s is resized, one of :data:`SCALE_RESIZES`.
        antialias: with ``scale_resize="size"``, torchvision's ``antialias`` for the bilinear resize.
        scale_pool: the default scale combination, one of :data:`SCALE_POOLS`.
        pool_unnormalised: combine the scales' head outputs before their L2 normalisation
            (``model.forward_features``, as SuperGlobal's code does) instead of the L2-normalised
            descriptors (cirtorch, Token). sGeM L2-normalises each scale itself, so it is the same there.
        box_rounding: how a query box is cut, one of :data:`BOX_ROUNDINGS`.
    """

    channel_order: str = "RGB"
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN)
    std: tuple[float, ...] = tuple(IMAGENET_STD)
    max_size: int | None = 1024
    scales: tuple[float, ...] = CIRTORCH_SCALES
    scale_resize: str = "scale_factor"
    antialias: bool = False
    scale_pool: str = "mean"
    pool_unnormalised: bool = False
    box_rounding: str = "pil"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("channel_order", self.channel_order, CHANNEL_ORDERS),
            ("scale_resize", self.scale_resize, SCALE_RESIZES),
            ("box_rounding", self.box_rounding, BOX_ROUNDINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values (std positive), got {self.mean}, {self.std}")
        parse_scale_pool(self.scale_pool)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    @property
    def rgb_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) in RGB order (what to normalise an RGB array with before any channel reversal)."""
        if self.channel_order == "BGR":
            return self.mean[::-1], self.std[::-1]
        return self.mean, self.std

    def replace(self, **changes: Any) -> InputConvention:
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The convention as plain values (for reports)."""
        return dataclasses.asdict(self)


#: Token's and the cirtorch baselines' protocol: RGB, ImageNet mean/std, 1024 px, 3 scales by
#: ``F.interpolate``, mean of the L2-normalised scale descriptors.
CIRTORCH = InputConvention()

#: SuperGlobal's protocol (its test/dataset.py and model/resnet.py): OpenCV's BGR order with the BGR
#: mean/std, no resizing to a maximum side, scales 0.7071, 1, 1.4142 by torchvision's bilinear tensor
#: resize, sGeM, query boxes truncated to integers.
SUPERGLOBAL = InputConvention(
    channel_order="BGR",
    mean=(0.406, 0.456, 0.485),
    std=(0.225, 0.224, 0.229),
    max_size=None,
    scales=SUPERGLOBAL_SCALES,
    scale_resize="size",
    antialias=False,
    scale_pool="sgem",
    pool_unnormalised=True,
    box_rounding="truncate",
)


def input_convention(model: Any) -> InputConvention:
    """The convention of ``model``: its own ``input_convention``, else :data:`CIRTORCH` (combined by the
    generalised mean for models with a ``multiscale_power``, cirtorch's GeM networks)."""
    conv = getattr(model, "input_convention", None)
    if isinstance(conv, InputConvention):
        return conv
    if hasattr(model, "multiscale_power"):
        return CIRTORCH.replace(scale_pool="gem")
    return CIRTORCH
