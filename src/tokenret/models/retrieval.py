"""Retrieval networks: a ResNet trunk plus a head that turns its block5 map into one global descriptor.

Every model maps normalised RGB images (B, 3, H, W) to L2-normalised descriptors (B, D) in ``forward``;
``forward_features`` gives the un-normalised head output that margin losses take during training.
Parameter names follow the Token release (``backbone.*``, ``tr.*``, ``whiten.*``, ``pooling.*``,
``vlad.*``) so that its checkpoints load unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tokenret.models.backbone import ResNetTrunk
from tokenret.models.pooling import (
    RMAC,
    GeM,
    SecondOrderAttentionGeM,
    SpatialAttention,
    VLADLayer,
)
from tokenret.models.token import TokenHead


def _conv1x1_as_linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a 1x1 Conv2d (the release's 'whiten' layers) to vectors (B, C)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class RetrievalModel(nn.Module):
    """Base class: ``backbone`` + a head; subclasses implement ``head``.

    Attributes:
        descriptor_dim: D, the length of the descriptor.
    """

    descriptor_dim: int

    def __init__(self, backbone: ResNetTrunk) -> None:
        super().__init__()
        self.backbone = backbone

    def head(self, features: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward_features(self, images: Tensor) -> Tensor:
        """Un-normalised descriptors (B, D), as fed to ArcFace during training."""
        return self.head(self.backbone(images))

    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised descriptors (B, D)."""
        return F.normalize(self.forward_features(images), dim=-1)


class TokenModel(RetrievalModel):
    """Token: ResNet trunk + :class:`~tokenret.models.token.TokenHead` (key prefix ``tr``)."""

    def __init__(self, backbone: ResNetTrunk, **head_kwargs) -> None:
        super().__init__(backbone)
        head_kwargs.setdefault("in_channels", backbone.out_channels)
        self.tr = TokenHead(**head_kwargs)
        self.descriptor_dim = self.tr.out_dim

    def head(self, features: Tensor) -> Tensor:
        return self.tr(features)

    def attention_maps(self, images: Tensor) -> Tensor:
        """Tokenizer attention (B, L, h, w) of each token over the block5 grid."""
        return self.tr.attention_maps(self.backbone(images))


class GeMModel(RetrievalModel):
    """GeM (learnable p, initialised to 3) -> L2 -> optional Linear whitening -> L2 (cirtorch style)."""

    def __init__(self, backbone: ResNetTrunk, p: float = 3.0, whiten_dim: int | None = None) -> None:
        super().__init__(backbone)
        self.pooling = GeM(p, learnable=True)
        c = backbone.out_channels
        self.whiten = nn.Linear(c, whiten_dim) if whiten_dim else None
        self.descriptor_dim = whiten_dim or c

    @property
    def multiscale_power(self) -> float:
        """How cirtorch combines this model's multi-scale descriptors: a generalised mean with the GeM p when
        there is no whitening layer, else a plain mean (1)."""
        p = self.pooling.p
        return float(p.detach() if isinstance(p, Tensor) else p) if self.whiten is None else 1.0

    def head(self, features: Tensor) -> Tensor:
        x = self.pooling(features)
        if self.whiten is not None:
            x = self.whiten(F.normalize(x, dim=-1))
        return x


class RMACModel(RetrievalModel):
    """The release's R-MAC baseline: R-MAC (3 levels) -> 1x1-conv whitening (with bias) -> L2.

    The release's class crashes as written (its pooling never stores L and eps); this is the intended
    computation of its ``forward_test``, with the same weight names (``whiten``).
    """

    def __init__(self, backbone: ResNetTrunk, dim: int = 2048, levels: int = 3) -> None:
        super().__init__(backbone)
        self.pooling = RMAC(levels)
        self.whiten = nn.Conv2d(backbone.out_channels, dim, 1)
        self.descriptor_dim = dim

    def head(self, features: Tensor) -> Tensor:
        return _conv1x1_as_linear(self.whiten, self.pooling(features))


class SOLARModel(RetrievalModel):
    """The release's simplified SOLAR: second-order attention + GeM(3) -> L2 -> 1x1-conv whitening -> L2."""

    def __init__(self, backbone: ResNetTrunk, dim: int = 2048, reduction: int = 2) -> None:
        super().__init__(backbone)
        self.pooling = SecondOrderAttentionGeM(backbone.out_channels, reduction)
        self.whiten = nn.Conv2d(backbone.out_channels, dim, 1)
        self.descriptor_dim = dim

    def head(self, features: Tensor) -> Tensor:
        return _conv1x1_as_linear(self.whiten, F.normalize(self.pooling(features), dim=-1))


class DELGModel(RetrievalModel):
    """The release's simplified DELG, global descriptor: GeM(3) on block5 -> L2 -> 1x1-conv whiten -> L2.

    The local branch (softplus attention and 128-d reduction on block4, trained with its own ArcFace) is
    kept so that released files load and training can use it; ``forward`` does not run it.
    """

    def __init__(
        self, backbone: ResNetTrunk, dim: int = 2048, reduction_dim: int = 128, p: float = 3.0
    ) -> None:
        super().__init__(backbone)
        backbone.return_block4 = False
        self.pooling = GeM(p)
        self.whiten = nn.Conv2d(backbone.out_channels, dim, 1)
        self.attention = SpatialAttention(backbone.out_channels_block4)
        self.reduction = nn.Conv2d(backbone.out_channels_block4, reduction_dim, 1)
        self.descriptor_dim = dim

    def head(self, features: Tensor) -> Tensor:
        return _conv1x1_as_linear(self.whiten, F.normalize(self.pooling(features), dim=-1))


class NetVLADModel(RetrievalModel):
    """The release's NetVLAD baseline: frozen trunk, LFSA + soft-assignment VLAD (K=4) + Linear + BN -> L2.

    The release's class crashes as written (an unknown keyword to its ResNet); this is what it meant,
    with the same weight names (``vlad.*``).
    """

    def __init__(self, backbone: ResNetTrunk, dim: int = 1024, num_clusters: int = 4) -> None:
        super().__init__(backbone)
        self.vlad = VLADLayer(backbone.out_channels, dim, num_clusters)
        self.descriptor_dim = dim

    def head(self, features: Tensor) -> Tensor:
        return self.vlad(features)
