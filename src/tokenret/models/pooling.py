"""Global pooling heads of the baselines: GeM, R-MAC, SOLAR's second-order attention, NetVLAD, DELG.

Each head maps a ResNet block5 map (B, C, h, w) to an un-normalised vector (B, D). Module and parameter
names follow the release (``pooling.f.0``, ``whiten``, ``vlad.centroids``, ...) so its files load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenret.models.token import Encoder


def gem(x: Tensor, p: Tensor | float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean pooling over space: (mean(clamp(x, eps)^p))^(1/p), (B, C, h, w) -> (B, C)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """GeM pooling; ``learnable=True`` makes p a parameter (cirtorch), else p is a fixed number (release)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = False) -> None:
        super().__init__()
        self.eps = eps
        if learnable:
            self.p = nn.Parameter(torch.full((1,), float(p)))
        else:
            self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)


def l2n(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / (||x|| + eps) along the last dim (cirtorch's L2N)."""
    return x / (x.norm(p=2, dim=-1, keepdim=True) + eps)


#: The numbers of region positions :func:`rmac_regions` weighs along the longer side (R-MAC's rule).
RMAC_STEPS = (2, 3, 4, 5, 6, 7)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int]]:
    """R-MAC square regions (top, left, side) on an h x w map, without the global region.

    Follows the rule of the R-MAC reference implementations, computed in float32 as they do so that the
    rounding of region offsets is identical.
    """
    side = min(h, w)
    steps = torch.tensor(RMAC_STEPS, dtype=torch.float32)
    b = (max(h, w) - side) / (steps - 1)
    idx = int(torch.argmin(torch.abs(((side**2 - side * b) / side**2) - overlap)))
    extra_w = idx + 1 if h < w else 0
    extra_h = idx + 1 if h > w else 0
    regions = []
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)

        def starts(dim: int, extra: int, wl: int = wl, wl2: int = wl2, level: int = level) -> list[int]:
            n = level + extra
            step = 0.0 if n == 1 else (dim - wl) / (n - 1)
            pos = torch.floor(wl2 + torch.arange(n, dtype=torch.float32) * step) - wl2
            return [int(v) for v in pos.tolist()]

        for top in starts(h, extra_h):
            for left in starts(w, extra_w):
                regions.append((top, left, wl))
    return regions


class RMAC(nn.Module):
    """R-MAC: L2-normalised global MAC plus the sum of L2-normalised region MACs (not re-normalised)."""

    def __init__(self, levels: int = 3, eps: float = 1e-6) -> None:
        super().__init__()
        self.levels, self.eps = levels, eps

    def forward(self, x: Tensor) -> Tensor:
        v = l2n(x.amax(dim=(-2, -1)), self.eps)
        for top, left, side in rmac_regions(x.shape[-2], x.shape[-1], self.levels):
            r = x[..., top : top + side, left : left + side].amax(dim=(-2, -1))
            v = v + l2n(r, self.eps)
        return v


def _kaiming_conv(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight)
        nn.init.zeros_(module.bias)


class SecondOrderAttentionGeM(nn.Module):
    """SOLAR's second-order attention block on block5 followed by GeM(p=3) (the release's ``SOABlock_GeM``).

    f, g: 1x1 conv C -> C/k + BN + ReLU; h: 1x1 conv C -> C/k; softmax over keys of (C/k)^-0.5 f^T g;
    z = attention applied to h; v: 1x1 conv C/k -> C, zero-initialised; residual; GeM.
    """

    def __init__(self, in_channels: int = 2048, reduction: int = 2, p: float = 3.0) -> None:
        super().__init__()
        mid = in_channels // reduction
        self.mid = mid
        self.f = nn.Sequential(nn.Conv2d(in_channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU())
        self.g = nn.Sequential(nn.Conv2d(in_channels, mid, 1), nn.BatchNorm2d(mid), nn.ReLU())
        self.h = nn.Conv2d(in_channels, mid, 1)
        self.v = nn.Conv2d(mid, in_channels, 1)
        for m in (self.f, self.g, self.h):
            m.apply(_kaiming_conv)
        nn.init.zeros_(self.v.weight)
        nn.init.zeros_(self.v.bias)
        self.pooling = GeM(p)

    def forward(self, x: Tensor) -> Tensor:
        b, _, hh, ww = x.shape
        q = self.f(x).flatten(2).transpose(1, 2)  # (B, N, mid)
        k = self.g(x).flatten(2).transpose(1, 2)
        v = self.h(x).flatten(2).transpose(1, 2)
        z = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # scale mid^-0.5
        z = self.v(z.transpose(1, 2).reshape(b, self.mid, hh, ww))
        return self.pooling(z + x)


class VLADLayer(nn.Module):
    """The release's NetVLAD head: 1x1 conv + BN, one LFSA encoder, K learned centroids, soft assignment
    (softmax over clusters of x . c), residual aggregation, Linear(K*dim -> dim) + BatchNorm1d."""

    def __init__(
        self, in_channels: int = 2048, dim: int = 1024, num_clusters: int = 4, num_heads: int = 8
    ) -> None:
        super().__init__()
        self.dim, self.num_clusters = dim, num_clusters
        self.encoder = Encoder(dim, num_heads, True, drop=0.1, attn_drop=0.1, drop_path=0.1)
        self.centroids = nn.Parameter(torch.randn(1, dim, num_clusters))
        self.conv = nn.Sequential(nn.Conv2d(in_channels, dim, 1), nn.BatchNorm2d(dim))
        self.proj = nn.Sequential(nn.Linear(dim * num_clusters, dim), nn.BatchNorm1d(dim))

    def residuals(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> per-cluster aggregated residuals (B, K, dim)."""
        x = self.encoder(self.conv(x).flatten(2).transpose(1, 2))  # (B, N, dim)
        c = self.centroids[0]  # (dim, K)
        assign = torch.matmul(x, c).softmax(dim=-1)  # (B, N, K)
        # sum_n a_nk (x_n - c_k) = (A^T X)_k - (sum_n a_nk) c_k, without the (B, N, K, dim) tensor.
        return torch.bmm(assign.transpose(1, 2), x) - assign.sum(dim=1)[..., None] * c.t()[None]

    def forward(self, x: Tensor) -> Tensor:
        vlad = self.residuals(x)
        return self.proj(vlad.reshape(vlad.shape[0], -1))


class SpatialAttention(nn.Module):
    """DELG's local attention on block4: softplus of a bias-free 1x1 conv (xavier-initialised)."""

    def __init__(self, in_channels: int = 1024) -> None:
        super().__init__()
        self.att_conv1 = nn.Conv2d(in_channels, 1, 1, bias=False)
        nn.init.xavier_uniform_(self.att_conv1.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.att_conv1(x), beta=1, threshold=20)
