"""HOW (Tolias, Jenicek, Chum, ECCV 2020): local descriptors for ASMK, and for Token's set aggregator.

Network, per scale s of the (normalised) image x:

    x_s = bilinear resize of x by s (align_corners False, size floor(H s) x floor(W s))
    o   = features(x_s)                      torchvision ResNet children minus avgpool/fc, minus
                                             ``skip_layer`` more stages ("-R50": no layer4, 1024-d, stride 16)
    a   = sqrt(sum_c o^2 + 1e-10)            L2 attention, on the un-smoothed map
    f   = dim_reduction(smooth(o))           3x3 average pooling (stride 1, padding 1,
                                             count_include_pad False), then a 1x1 conv with bias to 128-d

All attentions of all scales are divided by their global maximum; test-time extraction pools every
position of every scale (default scales 2, 1.414, 1, 0.707, 0.5, 0.353, 0.25) and keeps the ``topk``
(1000 or 2000) with the largest attention in ONE global sort.

State-dict keys are HOW's own: ``features.<i>.*`` (torchvision children indices: 0 conv1, 1 bn1,
4..7 layer1..layer4) and ``dim_reduction.weight`` / ``.bias``; files in HOW's old format, whose
reduction is called ``whiten.*`` and whose settings are in ``meta``, are converted on load.

Example:
    >>> import torch
    >>> from tokenret.models.how import create_how, extract_local
    >>> model = create_how("how_r50")                               # random weights
    >>> model = create_how("how_r50", checkpoint="how_r50-.pth")    # doctest: +SKIP
    >>> out = extract_local(model, torch.randn(3, 96, 128), scales=[1.0, 0.5], topk=20)
    >>> out["descriptors"].shape, out["positions"].shape
    (torch.Size([20, 128]), torch.Size([20, 2]))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from tokenret.data.images import IMAGENET_MEAN, IMAGENET_STD
from tokenret.models import checkpoints as ck

log = logging.getLogger(__name__)

#: Channels of the last stage of each torchvision ResNet (cirtorch's OUTPUT_DIM).
OUTPUT_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
#: HOW's test scales.
HOW_SCALES = (2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25)
#: Added inside the square root of the L2 attention.
ATTENTION_EPS = 1e-10
#: HOW's runtime defaults (the values its converter gives files in the old format).
DEFAULT_RUNTIME: dict[str, Any] = {
    "mean_std": [list(IMAGENET_MEAN), list(IMAGENET_STD)],
    "image_size": 1024,
    "features_num": 1000,
    "scales": list(HOW_SCALES),
    "training_scales": [1],
}
HOW_URL = "http://ptak.felk.cvut.cz/personal/toliageo/share/how/models/{}"


@dataclass(frozen=True)
class HowWeights:
    """Released HOW weights (the fields of the registry's ``Weights`` that ``fetch_release_weights`` reads).

    ``paper_map``: ASMK* mAP of the HOW README, (ROxf Medium, RPar Medium), n = 1000.
    """

    url: str
    filename: str
    sha256: str | None = None
    paper_map: tuple[float, float] | None = None
    source: str = ""


@dataclass(frozen=True)
class HowConfig:
    """One HOW variant: backbone, stages skipped, reduction and smoothing, weights."""

    name: str
    architecture: str
    skip_layer: int
    dim: int | None = 128
    smoothing_kernel: int | None = 3
    weights: HowWeights | None = None
    description: str = ""
    runtime: Mapping[str, Any] = field(default_factory=dict)

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "skip_layer": self.skip_layer,
            "dim": self.dim,
            "smoothing_kernel": self.smoothing_kernel,
        }


HOW_MODELS: dict[str, HowConfig] = {
    "how_r18": HowConfig(
        "how_r18",
        "resnet18",
        0,
        weights=HowWeights(
            HOW_URL.format("how_r18.pth"),
            "how_r18.pth",
            paper_map=(75.1, 79.4),
            source="gtolias/how, SfM-120k",
        ),
        description="HOW R18 (all 4 stages, 512-d backbone, stride 32), 128-d local descriptors",
    ),
    "how_r50": HowConfig(
        "how_r50",
        "resnet50",
        1,
        weights=HowWeights(
            HOW_URL.format("how_r50-.pth"),
            "how_r50-.pth",
            paper_map=(78.3, 80.1),
            source="gtolias/how, SfM-120k",
        ),
        description="HOW -R50 (ResNet-50 without layer4: 1024-d, stride 16), 128-d local descriptors",
    ),
    "how_r101": HowConfig(
        "how_r101",
        "resnet101",
        1,
        description=(
            "HOW -R101 built like -R50 (no layer4). No official weights: the Token README's R101-HOW is the "
            "Token authors' own GLDv2 training, in an unknown format"
        ),
    ),
}


# ------------------------------------------------------------------------------------------- network


class HOWNet(nn.Module):
    """HOW's network: ResNet trunk, L2 attention, smoothing and 1x1 dimensionality reduction.

    Args:
        architecture: torchvision ResNet name.
        skip_layer: stages dropped from the end (0 for R18, 1 for "-R50").
        dim: output dimension of the reduction conv, or None for no reduction (backbone features).
        smoothing_kernel: size of the average-pooling smoothing, or None / 0 for none.
        runtime: extraction defaults (scales, features_num, image_size, mean_std), as HOW stores them.
    """

    def __init__(
        self,
        architecture: str = "resnet50",
        skip_layer: int = 1,
        dim: int | None = 128,
        smoothing_kernel: int | None = 3,
        runtime: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if architecture not in OUTPUT_DIM:
            raise ValueError(f"unknown HOW backbone {architecture!r}; choose one of {sorted(OUTPUT_DIM)}")
        if not 0 <= int(skip_layer) <= 3:
            raise ValueError(f"skip_layer must be in 0..3 (stages dropped from the end), got {skip_layer}")
        if smoothing_kernel and smoothing_kernel % 2 == 0:
            raise ValueError(f"smoothing kernel must be odd to keep the map size, got {smoothing_kernel}")
        net = getattr(torchvision.models, architecture)(weights=None)
        children = list(net.children())[:-2]  # drop avgpool and fc
        if skip_layer:
            children = children[: -int(skip_layer)]
        self.features = nn.Sequential(*children)
        self.architecture = architecture
        self.skip_layer = int(skip_layer)
        self.backbone_dim = OUTPUT_DIM[architecture] // 2**self.skip_layer
        #: Output stride of the trunk in input pixels.
        self.stride = 32 // 2**self.skip_layer
        self.smoothing_kernel = int(smoothing_kernel) if smoothing_kernel else None
        self.dim_reduction = nn.Conv2d(self.backbone_dim, dim, 1, bias=True) if dim else None
        self.model_kwargs = {
            "architecture": architecture,
            "skip_layer": self.skip_layer,
            "dim": dim,
            "smoothing_kernel": self.smoothing_kernel,
        }
        self.model_name: str | None = None
        self.runtime: dict[str, Any] = {**DEFAULT_RUNTIME, **dict(runtime or {})}

    @property
    def output_dim(self) -> int:
        return self.dim_reduction.out_channels if self.dim_reduction is not None else self.backbone_dim

    def train(self, mode: bool = True) -> HOWNet:
        """As HOW: BatchNorm layers stay in eval mode (frozen running statistics) when training."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_imagenet_weights(self, weights_name: str = "IMAGENET1K_V1") -> None:
        """Initialise the trunk from torchvision's ImageNet weights (HOW's ``pretrained: True``)."""
        state = ck.fetch_torchvision_weights(self.architecture, weights_name)
        wanted = self.features.state_dict()
        renamed = {}
        for key, value in state.items():
            new = _torchvision_to_how_key(key)
            if new is not None and new[len("features.") :] in wanted:
                renamed[new[len("features.") :]] = value
        self.features.load_state_dict(renamed, strict=True)

    # -- per-scale computation ---------------------------------------------------------------

    @staticmethod
    def l2_attention(o: Tensor) -> Tensor:
        """(B, C, h, w) -> (B, h, w): sqrt(sum of squares over channels + 1e-10)."""
        return (o.pow(2).sum(1) + ATTENTION_EPS).sqrt()

    def smooth(self, o: Tensor) -> Tensor:
        if not self.smoothing_kernel:
            return o
        k = self.smoothing_kernel
        return F.avg_pool2d(o, k, stride=1, padding=k // 2, count_include_pad=False)

    def forward_scale(self, x: Tensor, reduce: bool = True) -> tuple[Tensor, Tensor]:
        """One already-resized image batch -> (local features (B, D, h, w), attention (B, h, w)).

        Args:
            reduce: apply the dimensionality reduction (False: smoothed backbone features, as used to
                learn the PCA-whitening that initialises it).
        """
        o = self.features(x)
        attention = self.l2_attention(o)
        f = self.smooth(o)
        if reduce and self.dim_reduction is not None:
            f = self.dim_reduction(f)
        return f, attention

    def features_attentions(
        self, x: Tensor, scales: Sequence[float], reduce: bool = True
    ) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """Run every scale; attentions are divided by each image's maximum over all scales.

        Scales that would shrink the image below one pixel are skipped.

        Returns:
            features per scale (B, D, h_s, w_s), attentions per scale (B, h_s, w_s), the scales used.
        """
        feats, atts, used = [], [], []
        height, width = x.shape[-2:]
        for s in scales:
            if min(_resized_size((height, width), s)) < 1:
                log.debug("scale %s skipped: a %dx%d image would vanish", s, width, height)
                continue
            xs = x if s == 1 else resize(x, s)
            f, a = self.forward_scale(xs, reduce=reduce)
            feats.append(f)
            atts.append(a)
            used.append(float(s))
        if not atts:
            raise ValueError(f"no usable scale among {list(scales)} for a {width}x{height} image")
        peak = torch.stack([a.flatten(1).max(1).values for a in atts]).max(0).values  # (B,)
        atts = [a / peak[:, None, None] for a in atts]
        return feats, atts, used

    def forward_global(self, x: Tensor, scales: Sequence[float] | None = None) -> Tensor:
        """HOW's training descriptor: attention-weighted sum over scales and positions, L2-normalised."""
        scales = self.runtime["training_scales"] if scales is None else scales
        feats, atts, _ = self.features_attentions(x, scales)
        desc = sum((f * a[:, None]).sum((-2, -1)) for f, a in zip(feats, atts, strict=True))
        return F.normalize(desc, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_global(x)

    @property
    def descriptor_dim(self) -> int:
        """Size of :meth:`forward_features` (what ``tokenret train`` puts its margin head on)."""
        return self.output_dim

    def forward_features(self, x: Tensor) -> Tensor:
        """Training descriptor for ``tokenret train``: HOW's attention-weighted sum (HOW itself trains it
        with a contrastive loss on SfM-120k tuples; here a margin head on GLDv2 classes)."""
        return self.forward_global(x)

    def extract_local(
        self, image: Tensor, scales: Sequence[float] | None = None, topk: int | None = None
    ) -> dict[str, Tensor]:
        """HOW's test-time descriptor set of one normalised image, exactly as HOW feeds ASMK (descriptors
        not L2-normalised); see the module-level :func:`extract_local`. The engine behind
        ``tokenret extract-local`` calls this on every local-feature model (HOW, DELF)."""
        return extract_local(self, image, scales, topk, l2_normalize=False)

    # -- PCA-whitening initialisation --------------------------------------------------------

    @torch.no_grad()
    def init_dim_reduction_pca(self, descriptors: np.ndarray | Tensor, shrinkage: float = 1.0) -> None:
        """Set the reduction conv to PCA-whitening learned on (n, backbone_dim) backbone descriptors.

        weight = top-``dim`` rows of the whitening projection P, bias = -P m (HOW's initialisation).
        """
        if self.dim_reduction is None:
            raise ValueError("this network has no dimensionality reduction layer (dim=None)")
        mean, projection = pca_whitening(descriptors, shrinkage=shrinkage)
        if projection.shape[0] != self.backbone_dim:
            raise ValueError(
                f"descriptors are {projection.shape[0]}-d, the backbone gives {self.backbone_dim}"
            )
        dim = self.dim_reduction.out_channels
        if dim > len(mean):
            raise ValueError(f"cannot learn {dim} whitened dimensions from {len(mean)}-d descriptors")
        if len(descriptors) <= dim:  # the covariance would have fewer than dim non-zero eigenvalues
            raise ValueError(
                f"the images gave only {len(descriptors)} features, too few for a {dim}-d whitening "
                f"(more than {dim} needed)"
            )
        weight = torch.from_numpy(projection[:dim]).float()
        bias = -torch.from_numpy(projection[:dim] @ mean).float()
        self.dim_reduction.weight.copy_(weight[:, :, None, None])
        self.dim_reduction.bias.copy_(bias)


def resize(x: Tensor, scale: float) -> Tensor:
    """HOW's multi-scale resize: bilinear, align_corners False, output floor(size * scale), no antialias."""
    return F.interpolate(
        x, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=True
    )


def pca_whitening(descriptors: np.ndarray | Tensor, shrinkage: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Learn PCA-whitening with shrinkage (HOW's ``pcawhitenlearn_shrinkage``).

    Centre, eigen-decompose the covariance (normalised by n), order by decreasing eigenvalue and divide
    by eigenvalue^(shrinkage/2) (eigenvalues clipped at 1e-14).

    Returns:
        mean (D,) and P (D, D) float64 whose row i is the i-th whitened direction: ``P @ (x - mean)``.
    """
    x = descriptors.detach().cpu().double().numpy() if isinstance(descriptors, Tensor) else descriptors
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need (n >= 2, D) descriptors to learn whitening, got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred
    cov = (cov + cov.T) / (2 * len(x))
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 1e-14, None)
    eigvec = eigvec[:, order]
    projection = eigvec.T / eigval[:, None] ** (0.5 * shrinkage)
    return mean, projection


# ------------------------------------------------------------------------------------- extraction


def feature_positions(
    cols: Tensor, rows: Tensor, stride: int, resized_hw: tuple[int, int], image_hw: tuple[int, int]
) -> Tensor:
    """Centres of feature cells in pixels of the scale-1 image, (N, 2) as (x, y).

    Every torchvision ResNet layer is centred (kernel k, padding (k-1)/2), so cell ``i`` of a stride-S map
    is centred on pixel index ``i * S`` of the resized image, i.e. at continuous coordinate ``i * S + 0.5``
    (pixel j spans [j, j+1)). The bilinear resize (align_corners False) maps continuous coordinates by
    the size ratio, giving ``(i * S + 0.5) * W / w_s``. The image spans [0, W] x [0, H].
    """
    h_s, w_s = resized_hw
    height, width = image_hw
    x = (cols.double() * stride + 0.5) * (width / w_s)
    y = (rows.double() * stride + 0.5) * (height / h_s)
    return torch.stack([x, y], dim=1).float()


def select_local_features(
    feats: Sequence[Tensor],
    atts: Sequence[Tensor],
    scales: Sequence[float],
    topk: int | None,
    *,
    stride: int = 1,
    resized_hw: Sequence[tuple[int, int]] | None = None,
    image_hw: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """Pool all positions of all scales of ONE image and keep the ``topk`` with the largest attention.

    Args:
        feats: per scale (D, h, w) features.
        atts: per scale (h, w) attentions.
        scales: the scale of each map.
        topk: features kept (None: all), one global sort (stable: equal attentions keep scale/raster order).
        stride, resized_hw, image_hw: to map cells to pixels (``positions``); omitted -> no positions.

    Returns:
        dict of descriptors (N, D), attention (N,), locations (N, 2) int64 (column, row) in their own
        map, scales (N,) float32, scale_index (N,) int64 and, if asked, positions (N, 2) float32 pixels.
    """
    desc, att, cols, rows, scl, sidx = [], [], [], [], [], []
    for i, (f, a, s) in enumerate(zip(feats, atts, scales, strict=True)):
        d, h, w = f.shape
        if a.shape != (h, w):
            raise ValueError(f"scale {s}: attention {tuple(a.shape)} does not match features {(h, w)}")
        desc.append(f.reshape(d, h * w).T)
        att.append(a.reshape(-1))
        grid_rows, grid_cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(grid_rows.reshape(-1))
        cols.append(grid_cols.reshape(-1))
        scl.append(torch.full((h * w,), float(s)))
        sidx.append(torch.full((h * w,), i, dtype=torch.int64))
    att_all = torch.cat(att).float()
    keep = torch.argsort(att_all, descending=True, stable=True)
    if topk is not None:
        keep = keep[: int(topk)]
    # select on the maps' device, then move only the kept features
    descriptors, attention, keep = torch.cat(desc)[keep].float().cpu(), att_all[keep].cpu(), keep.cpu()
    out = {
        "descriptors": descriptors,
        "attention": attention,
        "locations": torch.stack([torch.cat(cols), torch.cat(rows)], dim=1)[keep],
        "scales": torch.cat(scl)[keep],
        "scale_index": torch.cat(sidx)[keep],
    }
    if resized_hw is not None and image_hw is not None:
        positions = torch.empty(len(keep), 2)
        for i, hw in enumerate(resized_hw):
            mine = out["scale_index"] == i
            loc = out["locations"][mine]
            positions[mine] = feature_positions(loc[:, 0], loc[:, 1], stride, hw, image_hw)
        out["positions"] = positions
    return out


def extract_local(
    model: HOWNet,
    image: Tensor,
    scales: Sequence[float] | None = None,
    topk: int | None = None,
    *,
    l2_normalize: bool = False,
    reduce: bool = True,
) -> dict[str, Tensor]:
    """HOW's test-time local features of one normalised image tensor.

    Args:
        model: a :class:`HOWNet` (put in eval mode here).
        image: (3, H, W) or (1, 3, H, W), normalised with the model's mean/std (see ``to_tensor``).
        scales: default the model's runtime scales (HOW: 2, 1.414, 1, 0.707, 0.5, 0.353, 0.25).
        topk: features kept, by attention over all scales (default the runtime ``features_num``, 1000).
        l2_normalize: L2-normalise the descriptors (default False: HOW itself feeds them to ASMK
            un-normalised, codebook and residuals on the raw whitened 128-d vectors, and so does the
            extraction engine).
        reduce: apply the reduction conv (False gives smoothed backbone features).

    Returns:
        CPU tensors: descriptors (N, D) float32; attention (N,) divided by the image's maximum;
        positions (N, 2) float32 (x, y) centre of each feature's receptive field in pixels of the input
        image (the image spans [0, W] x [0, H]); locations (N, 2) int64 (column, row) in its own map (what
        HOW stores); scales (N,) float32.

    Example:
        >>> from tokenret.data.images import load_image, to_tensor
        >>> out = extract_local(model, to_tensor(load_image("a.jpg", 1024)), topk=1000)  # doctest: +SKIP
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"expected one RGB image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    scales = model.runtime["scales"] if scales is None else scales
    topk = model.runtime["features_num"] if topk is None else topk
    model.eval()
    param = next(model.parameters())
    image = image.to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        feats, atts, used = model.features_attentions(image, scales, reduce=reduce)
    image_hw = tuple(image.shape[-2:])
    resized_hw = [_resized_size(image_hw, s) for s in used]
    out = select_local_features(
        [f[0] for f in feats],
        [a[0] for a in atts],
        used,
        topk,
        stride=model.stride,
        resized_hw=resized_hw,
        image_hw=image_hw,
    )
    del out["scale_index"]
    if l2_normalize:
        out["descriptors"] = F.normalize(out["descriptors"], dim=1)
    return out


def _resized_size(image_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of :func:`resize`'s output: floor(size * scale), as torch with recompute_scale_factor."""
    return tuple(math.floor(float(v) * scale) for v in image_hw)


@torch.no_grad()
def learn_dim_reduction(
    model: HOWNet, images: Iterable[Tensor], features_num: int = 1000, scales: Sequence[float] = (1.0,)
) -> int:
    """Initialise the reduction as HOW: PCA-whitening of the top ``features_num`` backbone features of each
    image at scale 1 (HOW used the first 5000 SfM-120k training images). Returns the number of descriptors.
    """
    chunks = [
        extract_local(model, img, scales, features_num, l2_normalize=False, reduce=False)["descriptors"]
        for img in images
    ]
    if not chunks:
        raise ValueError("no images given to learn the dimensionality reduction from")
    descriptors = torch.cat(chunks)
    model.init_dim_reduction_pca(descriptors)
    return len(descriptors)


# ------------------------------------------------------------------------------------ checkpoints


@dataclass
class HowCheckpoint:
    """Weights read from a HOW file, with the settings the file records (``net_params`` in HOW's form)."""

    state_dict: dict[str, Tensor]
    source: str
    key_format: str  # "how/2020", "old" (whiten.* + meta) or "plain" (a bare state dict)
    net_params: dict[str, Any] | None = None


def _torchvision_to_how_key(key: str) -> str | None:
    if key.startswith("fc."):
        return None
    for prefix, index in (
        ("conv1.", 0),
        ("bn1.", 1),
        ("layer1.", 4),
        ("layer2.", 5),
        ("layer3.", 6),
        ("layer4.", 7),
    ):
        if key.startswith(prefix):
            return f"features.{index}.{key[len(prefix) :]}"
    raise KeyError(f"unexpected torchvision ResNet key {key!r}")


def _net_params_from_old_meta(meta: Mapping[str, Any], source: str) -> dict[str, Any]:
    missing = [k for k in ("architecture", "skip_layer", "dim", "feat_pool_k") if k not in meta]
    if missing:
        raise ck.CheckpointError(f"{source}: old-format HOW 'meta' lacks {missing}; cannot tell the network")
    mean_std = [list(meta.get("mean", IMAGENET_MEAN)), list(meta.get("std", IMAGENET_STD))]
    return {
        "architecture": meta["architecture"],
        "pretrained": True,
        "skip_layer": meta["skip_layer"],
        "dim_reduction": {"dim": meta["dim"]},
        "smoothing": {"kernel_size": meta["feat_pool_k"]},
        "runtime": {**DEFAULT_RUNTIME, "mean_std": mean_std},
    }


def read_how_checkpoint(checkpoint: str | Path | Mapping[str, Any]) -> HowCheckpoint:
    """Read a HOW file or dict in either of HOW's formats (or a bare state dict).

    Current format: ``_version``, ``state_dict``, ``net_params`` (architecture, skip_layer,
    dim_reduction {dim}, smoothing {kernel_size}, runtime), ...; old format: ``meta`` (architecture,
    skip_layer, dim, feat_pool_k, mean, std) and ``whiten.*`` keys, renamed to ``dim_reduction.*``.
    Files are read with ``torch.load(weights_only=True)``.
    """
    source = ck.describe_source(checkpoint)
    obj = ck._torch_load(Path(checkpoint)) if isinstance(checkpoint, (str, Path)) else checkpoint
    if not isinstance(obj, Mapping):
        raise ck.CheckpointError(f"{source}: holds a {type(obj).__name__}, not a HOW checkpoint dict")
    state = dict(ck.read_checkpoint(obj).state_dict)
    whiten = [k for k in state if k.startswith("whiten.")]
    if whiten and any(k.startswith("dim_reduction.") for k in state):
        raise ck.CheckpointError(f"{source}: has both whiten.* and dim_reduction.* keys; which one is meant?")
    for key in whiten:
        state["dim_reduction." + key[len("whiten.") :]] = state.pop(key)
    if "_version" in obj:
        params = obj.get("net_params")
        net_params = dict(params) if isinstance(params, Mapping) else None
        key_format = str(obj["_version"])
    elif isinstance(obj.get("meta"), Mapping) and "state_dict" in obj:
        net_params = _net_params_from_old_meta(obj["meta"], source)
        key_format = "old"
    else:
        net_params, key_format = None, "plain"
    return HowCheckpoint(state, source, key_format, net_params)


def _config_of_net_params(net_params: Mapping[str, Any]) -> dict[str, Any]:
    reduction = net_params.get("dim_reduction") or {}
    smoothing = net_params.get("smoothing") or {}
    return {
        "architecture": net_params.get("architecture"),
        "skip_layer": int(net_params.get("skip_layer") or 0),
        "dim": reduction.get("dim") if isinstance(reduction, Mapping) else None,
        "smoothing_kernel": (smoothing.get("kernel_size") if isinstance(smoothing, Mapping) else None)
        or None,
    }


def load_how_weights(
    model: HOWNet, checkpoint: str | Path | Mapping[str, Any] | HowCheckpoint
) -> HowCheckpoint:
    """Load HOW weights into ``model``, refusing a file built for another network.

    Raises:
        CheckpointError: the file's recorded settings differ from the model's, or keys are missing,
            unexpected or mis-shaped (all named).
    """
    ckpt = checkpoint if isinstance(checkpoint, HowCheckpoint) else read_how_checkpoint(checkpoint)
    if ckpt.net_params is not None:
        recorded = _config_of_net_params(ckpt.net_params)
        differ = {k: (v, model.model_kwargs[k]) for k, v in recorded.items() if v != model.model_kwargs[k]}
        if differ:
            fits = [n for n, c in HOW_MODELS.items() if c.model_kwargs() == recorded]
            hint = f"use create_how({fits[0]!r}, ...)" if fits else f"build HOWNet(**{recorded})"
            listing = ", ".join(f"{k} {file!r} (model: {mine!r})" for k, (file, mine) in differ.items())
            raise ck.CheckpointError(f"{ckpt.source} is a different HOW network: {listing}; {hint}")
        runtime = ckpt.net_params.get("runtime")
        if isinstance(runtime, Mapping):
            model.runtime.update(dict(runtime))
    ck.load_weights(model, ckpt.state_dict, name=model.model_name or "HOW", source=ckpt.source)
    return ckpt


def create_how(
    name: str,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    *,
    pretrained: bool = False,
    imagenet_weights: bool = False,
    progress: bool = True,
) -> HOWNet:
    """Build a HOW network by name (see ``HOW_MODELS``), with random, ImageNet, released or given weights.

    Args:
        name: ``how_r18``, ``how_r50`` ("-R50": ResNet-50 without layer4) or ``how_r101``.
        checkpoint: HOW file or dict, either of HOW's formats.
        pretrained: download the released SfM-120k weights into the tokenret cache.
        imagenet_weights: start the trunk from torchvision's ImageNet weights (for training).

    Example:
        >>> model = create_how("how_r18")
        >>> model.output_dim, model.stride
        (128, 32)
    """
    if name not in HOW_MODELS:
        raise ValueError(f"unknown HOW model {name!r}; choose one of {sorted(HOW_MODELS)}")
    cfg = HOW_MODELS[name]
    model = HOWNet(**cfg.model_kwargs(), runtime=cfg.runtime)
    model.model_name = name
    if imagenet_weights:
        model.load_imagenet_weights()
    if pretrained and checkpoint is None:
        if cfg.weights is None:
            raise ValueError(f"{name} has no released weights; pass checkpoint=PATH ({cfg.description})")
        checkpoint = ck.fetch_release_weights(cfg, progress=progress)
    if checkpoint is not None:
        load_how_weights(model, checkpoint)
    return model


__all__ = [
    "HOW_MODELS",
    "HOW_SCALES",
    "HOWNet",
    "HowCheckpoint",
    "HowConfig",
    "HowWeights",
    "create_how",
    "extract_local",
    "feature_positions",
    "learn_dim_reduction",
    "load_how_weights",
    "pca_whitening",
    "read_how_checkpoint",
    "select_local_features",
]
