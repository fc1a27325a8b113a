"""DELF (Noh et al., ICCV 2017) on a torchvision ResNet-50: attentive local features for ASMK and Token.

Network, per scale s of the (normalised) image x (spec local-features.md section 4):

    x_s = bilinear resize of x by s        (HOW's ``resize``: align_corners False, floor(H s) x floor(W s))
    f   = trunk(x_s)                       torchvision ResNet-50 up to layer3 (conv4_x, 1024-d, stride 16),
                                           then, with ``block3_stride2``, a 1x1 max-pool of stride 2
                                           (TF2 DELF's ``block3_strides``) -> the stride-32 grid of TF-slim
    a   = softplus(conv(relu(bn(conv(f)))))  attention: 1x1 conv 1024->512 (no bias) + BatchNorm + ReLU,
                                           1x1 conv 512->1 (bias); a >= 0, NOT normalised by its maximum

Test time: every scale (default 0.25, 0.3536, 0.5, 0.7071, 1, 1.4142, 2), keep the positions with
``a >= score_threshold`` (100), one global sort of all scales, the ``features_num`` (1000) largest kept;
descriptors L2-normalised, then optionally PCA (subtract the mean, project, no whitening) and
L2-normalised again. Training pooling: the per-position L2-normalised map weighted by ``a``, MEAN over
positions, then an optional linear classifier.

Receptive fields (pixel-index coordinates of the resized image; box of cell i is
``[stride i - padding, stride i - padding + rf - 1]``):

    torchvision layer3                     rf 267, stride 16, padding 133
    + 1x1 max-pool stride 2 (default)      rf 267, stride 32, padding 133
    TF-slim resnet_v1_50 block3 (released) rf 291, stride 32, padding 145

torchvision puts each stage's stride in the first block's 3x3 conv, slim in the last unit, so the
receptive fields differ; every box is centred on pixel ``stride * i`` in all three cases, so the positions
are the same.

No PyTorch DELF weights are released (the official ones are TensorFlow SavedModels); train the attention
(and optionally the trunk) here, or pass a checkpoint saved by :func:`save_delf`.

Example:
    >>> import torch
    >>> from tokenret.models.delf import create_delf
    >>> model = create_delf("delf_r50")                            # random weights
    >>> out = model.extract_local(torch.randn(3, 96, 128), scales=[1.0], topk=5, score_threshold=0.0)
    >>> out["descriptors"].shape, out["positions"].shape
    (torch.Size([5, 1024]), torch.Size([5, 2]))
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
from tokenret.models.how import resize, select_local_features

log = logging.getLogger(__name__)

#: Channels of ResNet-50's layer3 (conv4_x, TF-slim's block3).
BACKBONE_DIM = 1024
#: Hidden channels of the attention's first 1x1 conv.
ATTENTION_HIDDEN = 512
#: DELF's test scales.
DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
#: Input normalisations by name, as [mean, std] on [0, 1] pixels. "tf" is the released TF models'
#: (pixel - 128) / 128 on [0, 255] pixels; "imagenet" is what a torchvision-initialised trunk expects.
MEAN_STD: dict[str, list[list[float]]] = {
    "imagenet": [list(IMAGENET_MEAN), list(IMAGENET_STD)],
    "tf": [[128 / 255] * 3, [128 / 255] * 3],
}
#: DELF's runtime defaults (delf_config_example / GLD configs). ``image_size`` is the longest side the
#: engine loads images at (DELF's own default is no resize; DELG's configs and the revisited protocol: 1024).
DEFAULT_RUNTIME: dict[str, Any] = {
    "mean_std": MEAN_STD["imagenet"],
    "image_size": 1024,
    "features_num": 1000,
    "score_threshold": 100.0,
    "scales": list(DELF_SCALES),
}
NO_PYTORCH_WEIGHTS = (
    "no PyTorch DELF weights are released: the official DELF models (delf_v1_20171026, delf_gld_20190411, "
    "TF-Hub google/delf/1) are TensorFlow SavedModels. Train one (ImageNet trunk with "
    "imagenet_weights=True, then the attention), or pass checkpoint=PATH "
    "(a file from save_delf or a state dict)"
)


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of a feature map's cells: box of cell i is [stride i - padding, .. + size - 1]."""

    size: int
    stride: int
    padding: int

    @property
    def centre_offset(self) -> float:
        """Centre of cell 0's box in pixel-index coordinates: (size - 1) / 2 - padding."""
        return (self.size - 1) / 2 - self.padding


#: torchvision ResNet-50 up to layer3 (stride in each stage's first 3x3 conv).
TORCHVISION_LAYER3_RF = ReceptiveField(267, 16, 133)
#: The same followed by the 1x1 max-pool of stride 2 (``block3_stride2=True``).
TORCHVISION_LAYER3_S2_RF = ReceptiveField(267, 32, 133)
#: TF-slim resnet_v1_50 block3, the released DELF models (not this network; same box centres).
SLIM_BLOCK3_RF = ReceptiveField(291, 32, 145)


@dataclass(frozen=True)
class DelfConfig:
    """One DELF variant: trunk grid, PCA size, runtime defaults. No PyTorch weights exist (see module doc)."""

    name: str
    block3_stride2: bool = True
    pca_dim: int | None = None
    description: str = ""
    runtime: Mapping[str, Any] = field(default_factory=dict)

    def model_kwargs(self) -> dict[str, Any]:
        return {"block3_stride2": self.block3_stride2, "pca_dim": self.pca_dim, "num_classes": None}


DELF_MODELS: dict[str, DelfConfig] = {
    "delf_r50": DelfConfig(
        "delf_r50",
        description=(
            "DELF R50: torchvision ResNet-50 up to layer3 + 1x1 max-pool stride 2 (1024-d, stride 32 like "
            "TF-slim block3), softplus attention; " + NO_PYTORCH_WEIGHTS
        ),
    ),
}


def resolve_mean_std(mean_std: str | Sequence[Sequence[float]]) -> list[list[float]]:
    """``"imagenet"``, ``"tf"`` or explicit ``[[m, m, m], [s, s, s]]`` -> ``[[3 means], [3 stds]]``."""
    if isinstance(mean_std, str):
        if mean_std not in MEAN_STD:
            raise ValueError(
                f"unknown mean_std {mean_std!r}; choose one of {sorted(MEAN_STD)} or give [mean, std]"
            )
        return [list(v) for v in MEAN_STD[mean_std]]
    values = [[float(x) for x in row] for row in mean_std]
    if len(values) != 2 or any(len(row) != 3 for row in values):
        raise ValueError(f"mean_std must be [[3 means], [3 stds]], got {mean_std!r}")
    return values


# ------------------------------------------------------------------------------------------- network


class DELFAttention(nn.Module):
    """DELF's attention: 1x1 conv 1024->512 (no bias) + BatchNorm + ReLU, 1x1 conv 512->1, softplus."""

    def __init__(self, in_channels: int = BACKBONE_DIM, hidden: int = ATTENTION_HIDDEN) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, 1, 1, bias=True)

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, h, w) -> scores (B, h, w), >= 0."""
        return F.softplus(self.conv2(F.relu(self.bn(self.conv1(features)))))[:, 0]


class DELFNet(nn.Module):
    """DELF's network on a torchvision ResNet-50 trunk: layer3 features, softplus attention, optional PCA.

    State-dict keys: ``features.<i>.*`` (torchvision children: 0 conv1, 1 bn1, 4..6 layer1..layer3, as HOW's
    -R50), ``attention.conv1.weight``, ``attention.bn.*``, ``attention.conv2.*``, with PCA ``pca_mean`` (1024)
    and ``pca_projection`` (pca_dim, 1024), with a classifier ``logits.*`` (TF's ``attention_block/logits``).

    Args:
        block3_stride2: append a 1x1 max-pool of stride 2 after layer3 (stride 32, TF-slim's grid).
        pca_dim: descriptor size after PCA, or None for none (1024-d). The PCA buffers start as a
            placeholder (zero mean, the first ``pca_dim`` coordinates) until :meth:`fit_pca` or a checkpoint.
        num_classes: classes of the linear classifier on :meth:`attention_pool` (training), or None.
        runtime: extraction defaults (``scales``, ``features_num``, ``score_threshold``, ``image_size``,
            ``mean_std`` as ``"imagenet"``, ``"tf"`` or ``[[3 means], [3 stds]]``).
    """

    def __init__(
        self,
        block3_stride2: bool = True,
        pca_dim: int | None = None,
        num_classes: int | None = None,
        runtime: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        runtime = {**DEFAULT_RUNTIME, **dict(runtime or {})}
        runtime["mean_std"] = resolve_mean_std(runtime["mean_std"])
        net = torchvision.models.resnet50(weights=None)
        self.features = nn.Sequential(*list(net.children())[:7])  # conv1 .. layer3
        self.block3_stride2 = bool(block3_stride2)
        self.subsample = nn.MaxPool2d(1, stride=2) if self.block3_stride2 else nn.Identity()
        self.receptive_field = TORCHVISION_LAYER3_S2_RF if self.block3_stride2 else TORCHVISION_LAYER3_RF
        #: Output stride of the trunk in input pixels.
        self.stride = self.receptive_field.stride
        self.backbone_dim = BACKBONE_DIM
        self.attention = DELFAttention()
        # not "classifier": tokenret's checkpoint loader skips classifier* keys (margin heads)
        self.logits = nn.Linear(BACKBONE_DIM, int(num_classes)) if num_classes else None
        self.pca_mean: Tensor | None
        self.pca_projection: Tensor | None
        self.register_buffer("pca_mean", None)
        self.register_buffer("pca_projection", None)
        self.model_kwargs: dict[str, Any] = {
            "block3_stride2": self.block3_stride2,
            "pca_dim": None,
            "num_classes": int(num_classes) if num_classes else None,
        }
        if pca_dim:
            if not 0 < int(pca_dim) <= BACKBONE_DIM:
                raise ValueError(f"pca_dim must be in 1..{BACKBONE_DIM}, got {pca_dim}")
            self.set_pca(torch.zeros(BACKBONE_DIM), torch.eye(int(pca_dim), BACKBONE_DIM))
        self.model_name: str | None = None
        self.runtime: dict[str, Any] = runtime

    @property
    def output_dim(self) -> int:
        """Descriptor size: ``pca_dim`` with PCA, else 1024."""
        return self.pca_projection.shape[0] if self.pca_projection is not None else self.backbone_dim

    def train(self, mode: bool = True) -> DELFNet:
        """The trunk's BatchNorm layers stay in eval mode (frozen statistics); the attention's BN trains."""
        super().train(mode)
        if mode:
            for m in self.features.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def load_imagenet_weights(self, weights_name: str = "IMAGENET1K_V1", progress: bool = True) -> None:
        """Initialise the trunk from torchvision's ResNet-50 ImageNet weights (``IMAGENET1K_V1`` or ``_V2``).

        The trunk then expects ImageNet normalisation (runtime ``mean_std`` ``"imagenet"``).
        """
        state = ck.fetch_torchvision_weights("resnet50", weights_name, progress=progress)
        # torchvision names -> indices of ``features`` (layer4 and fc are not used)
        prefixes = {"conv1.": "0.", "bn1.": "1.", "layer1.": "4.", "layer2.": "5.", "layer3.": "6."}
        trunk = {
            index + key[len(name) :]: value
            for key, value in state.items()
            for name, index in prefixes.items()
            if key.startswith(name)
        }
        self.features.load_state_dict(trunk, strict=True)
        if self.runtime["mean_std"] != MEAN_STD["imagenet"]:
            log.warning(
                "ImageNet trunk loaded but runtime mean_std is %s, not ImageNet's", self.runtime["mean_std"]
            )

    # -- per-scale computation ---------------------------------------------------------------

    def backbone(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1024, h, w) layer3 features on the model's grid."""
        return self.subsample(self.features(x))

    def forward_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One already-resized batch -> (features (B, 1024, h, w), attention scores (B, h, w))."""
        f = self.backbone(x)
        return f, self.attention(f)

    def attention_pool(self, images: Tensor, detach_features: bool = False) -> Tensor:
        """DELF's training descriptor (B, 1024): mean over positions of score * L2-normalised feature.

        Args:
            detach_features: stop gradients into the trunk (DELF v1 trains the attention on a frozen
                backbone; TF2 DELF stops the attention loss's gradient at block3).
        """
        f = self.backbone(images)
        if detach_features:
            f = f.detach()
        scores = self.attention(f)
        return (F.normalize(f, dim=1) * scores[:, None]).mean((-2, -1))

    def classify(self, images: Tensor, detach_features: bool = False) -> Tensor:
        """Logits (B, num_classes) of the linear classifier on :meth:`attention_pool` (for cross-entropy)."""
        if self.logits is None:
            raise ValueError("this DELFNet has no classifier; build it with num_classes=N to train")
        return self.logits(self.attention_pool(images, detach_features))

    def forward(self, images: Tensor) -> Tensor:
        """The attention-pooled descriptor (B, 1024); see :meth:`classify` for training."""
        return self.attention_pool(images)

    @property
    def descriptor_dim(self) -> int:
        """Size of :meth:`forward_features` (what ``tokenret train`` puts its margin head on)."""
        return self.backbone_dim

    def forward_features(self, images: Tensor) -> Tensor:
        """Training descriptor for ``tokenret train`` (ArcFace on the attention-pooled features)."""
        return self.attention_pool(images)

    # -- PCA ---------------------------------------------------------------------------------

    @torch.no_grad()
    def set_pca(self, mean: Tensor | np.ndarray, projection: Tensor | np.ndarray | None) -> None:
        """Set (or with ``projection=None`` remove) the PCA: descriptors become L2(P (L2(x) - mean))."""
        if projection is None:
            self.pca_mean = self.pca_projection = None
            self.model_kwargs["pca_dim"] = None
            return
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        projection = torch.as_tensor(projection, dtype=torch.float32)
        if mean.shape != (BACKBONE_DIM,) or projection.ndim != 2 or projection.shape[1] != BACKBONE_DIM:
            raise ValueError(
                f"PCA must be a ({BACKBONE_DIM},) mean and a (dim, {BACKBONE_DIM}) projection, "
                f"got {tuple(mean.shape)} and {tuple(projection.shape)}"
            )
        device = next(self.parameters()).device
        self.pca_mean = mean.to(device)
        self.pca_projection = projection.to(device)
        self.model_kwargs["pca_dim"] = int(projection.shape[0])

    def fit_pca(self, descriptors: Tensor | np.ndarray, dim: int) -> None:
        """Learn the PCA (mean, top-``dim`` principal directions, no whitening) from 1024-d descriptors.

        Descriptors are L2-normalised first (as at extraction). Each direction's sign is fixed so that its
        largest-magnitude coordinate is positive.

        Raises:
            ValueError: not (n, 1024), or ``dim`` not below the number of descriptors.
        """
        # torch, not numpy: runs where the descriptors are, with torch's thread settings
        x = torch.as_tensor(descriptors).detach().to(torch.float64)
        if x.ndim != 2 or x.shape[1] != BACKBONE_DIM:
            raise ValueError(
                f"need (n, {BACKBONE_DIM}) descriptors to learn DELF's PCA, got shape {tuple(x.shape)}"
            )
        if not 0 < int(dim) < len(x):
            raise ValueError(
                f"cannot learn {dim} PCA directions from {len(x)} descriptors (need more than dim)"
            )
        x = F.normalize(x, dim=1)
        mean = x.mean(0)
        centred = x - mean
        _, eigvec = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
        projection = eigvec[:, -int(dim) :].flip(1).T  # rows: directions by decreasing variance
        largest = projection.abs().argmax(1)
        projection = projection * projection[torch.arange(len(projection)), largest].sign()[:, None]
        self.set_pca(mean, projection)

    def postprocess(self, descriptors: Tensor, apply_pca: bool = True) -> Tensor:
        """(N, 1024) raw features -> L2-normalised descriptors, through the PCA if set and ``apply_pca``."""
        d = F.normalize(descriptors.float(), dim=1)
        if apply_pca and self.pca_projection is not None:
            mean, projection = self.pca_mean.to(d.device), self.pca_projection.to(d.device)
            d = F.normalize((d - mean) @ projection.T, dim=1)
        return d

    # -- extraction --------------------------------------------------------------------------

    def extract_local(
        self,
        image: Tensor,
        scales: Sequence[float] | None = None,
        topk: int | None = None,
        *,
        score_threshold: float | None = None,
        apply_pca: bool = True,
    ) -> dict[str, Tensor]:
        """DELF's test-time local features of one normalised image tensor (same keys as HOW's).

        Args:
            image: (3, H, W) or (1, 3, H, W), normalised with ``runtime["mean_std"]``.
            scales: default the runtime scales (0.25 .. 2).
            topk: most features kept, by score over all scales (default runtime ``features_num``, 1000).
            score_threshold: keep only scores >= this (default runtime ``score_threshold``, 100; it suits
                trained attention: with random weights scores are ~0.7 and nothing is kept).
            apply_pca: project with the PCA when the model has one (False: 1024-d, to learn a PCA).

        Returns:
            CPU tensors, best first: descriptors (N, D) float32, unit norm; attention (N,) the softplus
            scores themselves (not divided by a maximum, unlike HOW); positions (N, 2) float32 (x, y) centre
            of the receptive box in pixels of the input image, which spans [0, W] x [0, H] (pixel j covers
            [j, j + 1), as HOW; TF DELF's ``centre / scale`` pixel-index location is ``position - 0.5`` at
            scale 1); locations (N, 2) int64 (column, row) in its own map; scales (N,) float32 pyramid scale
            (TF DELF's feature scale is its inverse). N <= topk.
        """
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"expected one RGB image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        scales = self.runtime["scales"] if scales is None else scales
        topk = self.runtime["features_num"] if topk is None else topk
        threshold = self.runtime["score_threshold"] if score_threshold is None else score_threshold
        self.eval()
        param = next(self.parameters())
        image = image.to(device=param.device, dtype=param.dtype)
        image_hw = tuple(image.shape[-2:])
        feats, atts, used, resized_hw = [], [], [], []
        with torch.inference_mode():
            for s in scales:
                hw = _resized_size(image_hw, s)
                if min(hw) < 1:
                    log.debug("scale %s skipped: a %dx%d image would vanish", s, image_hw[1], image_hw[0])
                    continue
                f, a = self.forward_scale(image if s == 1 else resize(image, s))
                feats.append(f[0])
                atts.append(a[0])
                used.append(float(s))
                resized_hw.append(hw)
        if not used:
            raise ValueError(f"no usable scale among {list(scales)} for a {image_hw[1]}x{image_hw[0]} image")
        # scores >= threshold come first in the descending sort: keep that many of the top-k.
        # (outside inference mode, as HOW: the results are ordinary tensors a caller may modify)
        passing = int(sum(int((a >= threshold).sum()) for a in atts))
        keep = passing if topk is None else min(passing, int(topk))
        out = select_local_features(feats, atts, used, keep)
        with torch.no_grad():
            out["descriptors"] = self.postprocess(out["descriptors"], apply_pca=apply_pca).cpu()
        index = out.pop("scale_index")
        positions = torch.empty(len(index), 2)
        for i, hw in enumerate(resized_hw):
            mine = index == i
            loc = out["locations"][mine]
            positions[mine] = delf_positions(loc[:, 0], loc[:, 1], self.receptive_field, hw, image_hw)
        out["positions"] = positions
        return out


def extract_delf(
    model: DELFNet,
    image: Tensor,
    scales: Sequence[float] | None = None,
    topk: int | None = None,
    *,
    score_threshold: float | None = None,
    apply_pca: bool = True,
) -> dict[str, Tensor]:
    """Function form of :meth:`DELFNet.extract_local`.

    Example:
        >>> from tokenret.data.images import load_image, to_tensor
        >>> out = extract_delf(model, to_tensor(load_image("a.jpg", 1024)))  # doctest: +SKIP
    """
    return model.extract_local(image, scales, topk, score_threshold=score_threshold, apply_pca=apply_pca)


@torch.no_grad()
def learn_pca(
    model: DELFNet,
    images: Iterable[Tensor],
    dim: int,
    scales: Sequence[float] | None = None,
    topk: int | None = None,
    score_threshold: float | None = None,
) -> int:
    """Fit the model's PCA on the selected 1024-d descriptors of ``images``; returns how many were used."""
    chunks = [
        model.extract_local(img, scales, topk, score_threshold=score_threshold, apply_pca=False)[
            "descriptors"
        ]
        for img in images
    ]
    descriptors = torch.cat(chunks) if chunks else torch.empty(0, BACKBONE_DIM)
    if len(descriptors) == 0:
        raise ValueError("no descriptors to learn the PCA from (no images, or no score above the threshold)")
    model.fit_pca(descriptors, dim)
    return len(descriptors)


def receptive_box_centres(cols: Tensor, rows: Tensor, rf: ReceptiveField) -> Tensor:
    """(N, 2) (x, y) centres of the cells' receptive boxes in pixel-index coordinates of their map's input:
    ``stride * i - padding + (size - 1) / 2``."""
    x = cols.double() * rf.stride - rf.padding + (rf.size - 1) / 2
    y = rows.double() * rf.stride - rf.padding + (rf.size - 1) / 2
    return torch.stack([x, y], dim=1)


def delf_positions(
    cols: Tensor, rows: Tensor, rf: ReceptiveField, resized_hw: tuple[int, int], image_hw: tuple[int, int]
) -> Tensor:
    """Receptive-box centres in pixels of the scale-1 image: (N, 2) float32 (x, y) in [0, W] x [0, H].

    The centre pixel index c of the resized image covers [c, c + 1); the bilinear resize (align_corners
    False) maps continuous coordinates by the actual size ratio, so the position is ``(c + 0.5) * W / w_s``
    (equal to HOW's ``feature_positions`` for a centred box).
    """
    h_s, w_s = resized_hw
    height, width = image_hw
    centre = receptive_box_centres(cols, rows, rf) + 0.5
    return (centre * torch.tensor([width / w_s, height / h_s], dtype=torch.float64)).float()


def _resized_size(image_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """Size of :func:`tokenret.models.how.resize`'s output: floor(size * scale)."""
    return tuple(math.floor(float(v) * scale) for v in image_hw)


# ------------------------------------------------------------------------------------ checkpoints


@dataclass
class DelfCheckpoint:
    """Weights read from a DELF file, with the settings it records (None where it records none)."""

    state_dict: dict[str, Tensor]
    source: str
    model_kwargs: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None


def read_delf_checkpoint(checkpoint: str | Path | Mapping[str, Any]) -> DelfCheckpoint:
    """Read a DELF file or dict: :func:`save_delf`'s (tokenret format), ``{"state_dict", "net_params",
    "runtime"}``, or a bare / nested state dict. Files are read with ``torch.load(weights_only=True)``."""
    source = ck.describe_source(checkpoint)
    obj = ck._torch_load(Path(checkpoint)) if isinstance(checkpoint, (str, Path)) else checkpoint
    if not isinstance(obj, Mapping):
        raise ck.CheckpointError(f"{source}: holds a {type(obj).__name__}, not a DELF checkpoint dict")
    loaded = ck.read_checkpoint(obj)
    kwargs = loaded.model_kwargs or (
        dict(obj["net_params"]) if isinstance(obj.get("net_params"), Mapping) else None
    )
    runtime = loaded.extra.get("runtime", obj.get("runtime"))
    return DelfCheckpoint(
        dict(loaded.state_dict),
        source,
        kwargs or None,
        dict(runtime) if isinstance(runtime, Mapping) else None,
    )


def _kwargs_of_state(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """PCA size and classes as the weights show them."""
    pca = state.get("pca_projection")
    classifier = state.get("logits.weight")
    return {
        "pca_dim": int(pca.shape[0]) if pca is not None and pca.ndim == 2 else None,
        "num_classes": int(classifier.shape[0]) if classifier is not None and classifier.ndim == 2 else None,
    }


def load_delf_weights(
    model: DELFNet, checkpoint: str | Path | Mapping[str, Any] | DelfCheckpoint
) -> DelfCheckpoint:
    """Load DELF weights (and the recorded runtime) into ``model``, refusing a file for another network.

    Raises:
        CheckpointError: the file records another trunk grid (``block3_stride2``), or keys are missing,
            unexpected or mis-shaped (all named).
    """
    ckpt = checkpoint if isinstance(checkpoint, DelfCheckpoint) else read_delf_checkpoint(checkpoint)
    recorded = ckpt.model_kwargs or {}
    if "block3_stride2" in recorded and bool(recorded["block3_stride2"]) != model.block3_stride2:
        raise ck.CheckpointError(
            f"{ckpt.source} is a DELF network with block3_stride2={recorded['block3_stride2']!r} "
            f"(model: {model.block3_stride2!r}); build DELFNet(block3_stride2={recorded['block3_stride2']!r})"
        )
    ck.load_weights(model, ckpt.state_dict, name=model.model_name or "DELF", source=ckpt.source)
    if ckpt.runtime:
        runtime = {**model.runtime, **ckpt.runtime}
        runtime["mean_std"] = resolve_mean_std(runtime["mean_std"])
        model.runtime = runtime
    return ckpt


def save_delf(model: DELFNet, path: str | Path) -> Path:
    """Save weights, PCA, settings and runtime; ``create_delf(name, checkpoint=path)`` restores them."""
    return ck.save_checkpoint(model, path, runtime=dict(model.runtime))


def create_delf(
    name: str,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    *,
    pretrained: bool = False,
    imagenet_weights: bool = False,
    progress: bool = True,
) -> DELFNet:
    """Build a DELF network by name (see ``DELF_MODELS``), with random, ImageNet or given weights.

    Args:
        name: ``delf_r50``.
        checkpoint: file or dict (see :func:`read_delf_checkpoint`); its PCA size, classifier and runtime are
            taken from the file.
        pretrained: not available: no PyTorch DELF weights are released (raises ValueError).
        imagenet_weights: start the trunk from torchvision's ImageNet weights (for training).

    Example:
        >>> model = create_delf("delf_r50")
        >>> model.output_dim, model.stride
        (1024, 32)
    """
    if name not in DELF_MODELS:
        raise ValueError(f"unknown DELF model {name!r}; choose one of {sorted(DELF_MODELS)}")
    if pretrained and checkpoint is None:
        raise ValueError(f"{name}: {NO_PYTORCH_WEIGHTS}")
    cfg = DELF_MODELS[name]
    kwargs = cfg.model_kwargs()
    ckpt = None
    if checkpoint is not None:
        ckpt = read_delf_checkpoint(checkpoint)
        kwargs.update(_kwargs_of_state(ckpt.state_dict))
    model = DELFNet(**kwargs, runtime=cfg.runtime)
    model.model_name = name
    if imagenet_weights:
        model.load_imagenet_weights(progress=progress)
    if ckpt is not None:
        load_delf_weights(model, ckpt)
    return model


__all__ = [
    "DEFAULT_RUNTIME",
    "DELF_MODELS",
    "DELF_SCALES",
    "MEAN_STD",
    "SLIM_BLOCK3_RF",
    "TORCHVISION_LAYER3_RF",
    "TORCHVISION_LAYER3_S2_RF",
    "DELFAttention",
    "DELFNet",
    "DelfCheckpoint",
    "DelfConfig",
    "ReceptiveField",
    "create_delf",
    "delf_positions",
    "extract_delf",
    "learn_pca",
    "load_delf_weights",
    "read_delf_checkpoint",
    "receptive_box_centres",
    "resolve_mean_std",
    "save_delf",
]
