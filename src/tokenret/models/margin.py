"""Margin-based classification heads for training: ArcFace and CosFace, as the release uses them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _CosineClassifier(nn.Module):
    def __init__(self, in_features: int, num_classes: int, s: float | None, m: float) -> None:
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.s = math.sqrt(in_features) if s is None else float(s)
        self.m = float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, features: Tensor) -> Tensor:
        return F.linear(F.normalize(features, dim=-1), F.normalize(self.weight, dim=-1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s:.4g}, m={self.m}"


class ArcFace(_CosineClassifier):
    """Additive angular margin logits: s * cos(theta + m) for the target class, s * cos(theta) elsewhere.

    As in the release: cos is clamped to [-1 + eps, 1 - eps] before acos; the margin is applied only to
    the target class and only where theta <= pi - m; s defaults to sqrt(in_features) (32 for 1024-d).

    Example:
        >>> head = ArcFace(1024, num_classes=10)
        >>> logits = head(torch.randn(4, 1024), torch.tensor([0, 1, 2, 3]))
        >>> loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    """

    def __init__(
        self, in_features: int, num_classes: int, s: float | None = None, m: float = 0.2, eps: float = 1e-6
    ) -> None:
        super().__init__(in_features, num_classes, s, m)
        self.eps = eps

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(features).float()
        theta = torch.acos(cos.clamp(-1.0 + self.eps, 1.0 - self.eps))
        target = F.one_hot(labels, self.num_classes).bool() & (theta <= math.pi - self.m)
        return self.s * torch.cos(torch.where(target, theta + self.m, theta))


class CosFace(_CosineClassifier):
    """Additive cosine margin logits: s * (cos - m) for the target class, s * cos elsewhere."""

    def __init__(self, in_features: int, num_classes: int, s: float | None = None, m: float = 0.2) -> None:
        super().__init__(in_features, num_classes, s, m)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(features).float()
        return self.s * (cos - self.m * F.one_hot(labels, self.num_classes).to(cos.dtype))


MARGIN_HEADS = {"arcface": ArcFace, "cosface": CosFace}
