"""The Token aggregation head: LFSA encoder, tokenizer, refinement decoders, projection.

``TokenHead`` takes a local feature map (B, C, h, w) (or a padded set of local descriptors, see
``TokenHead.forward_set``) and returns one global descriptor per image (not yet L2-normalised).
With its defaults it is the release's ``Token_Refine`` and loads the release's ``tr.*`` keys as they
are. Attention goes through ``F.scaled_dot_product_attention``; the function computed is the
release's (separate q/k/v projections, scale head_dim^-0.5, softmax over keys, dropout on the
attention probabilities, output projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Per-sample stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (the release's key names q, k, v, proj).

    The output projection starts at zero, as in the release, so a fresh branch outputs exactly 0.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        # as the release: all four drawn (so later seeded draws line up with it), then proj zeroed
        for lin in (self.q, self.k, self.v, self.proj):
            nn.init.trunc_normal_(lin.weight, std=0.02, a=-2.0, b=2.0)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """query (B, Nq, D), key/value (B, Nk, D); key_padding_mask (B, Nk) True where a key is padding."""
        q, k, v = self._heads(self.q(query)), self._heads(self.k(key)), self._heads(self.v(value))
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]  # True = take part in attention
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        b, h, n, d = out.shape
        out = out.transpose(1, 2).reshape(b, n, h * d)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _batchnorm_tokens(bn: nn.BatchNorm1d, x: Tensor, mask: Tensor | None) -> Tensor:
    """BatchNorm1d over all (image, position) rows; padded rows are left out of the batch statistics."""
    b, n, d = x.shape
    if mask is None or not bn.training:
        return bn(x.reshape(b * n, d)).reshape(b, n, d)
    keep = ~mask.reshape(-1)
    flat = x.reshape(b * n, d)
    out = torch.zeros_like(flat)
    out[keep] = bn(flat[keep])
    return out.reshape(b, n, d)


class Encoder(nn.Module):
    """Local-feature self-attention (LFSA): x + MHSA(x); then x + Linear(BatchNorm1d(x)). No pre-norm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.bn = nn.BatchNorm1d(dim)
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(x, x, x, mask))
        x = x + self.drop_path(self.mlp(_batchnorm_tokens(self.bn, x, mask)))
        return x


class Decoder(nn.Module):
    """Refinement block: tokens cross-attend to local features, MLP, then self-attention among tokens.

    Pre-LayerNorm on the token stream only (named bn1/bn2 in the release); keys/values are the raw
    encoder output; the MLP acts on the un-normalised tokens.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.cross_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.bn1 = nn.LayerNorm(dim)
        self.bn2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, tokens: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
        t = self.bn1(tokens)
        tokens = tokens + self.drop_path(self.cross_attn(t, x, x, mask))
        tokens = tokens + self.drop_path(self.mlp(tokens))
        t = self.bn2(tokens)
        tokens = tokens + self.drop_path(self.self_attn(t, t, t))
        return tokens


def _fp16_autocast(device_type: str) -> bool:
    try:
        enabled = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: only the CUDA query exists
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
        dtype = torch.get_autocast_gpu_dtype() if enabled else None
    return bool(enabled) and dtype == torch.float16


class TokenHead(nn.Module):
    """Token aggregator: local features in, one global descriptor out (the release's ``Token_Refine``).

    Steps: 1x1 conv + BatchNorm2d (C -> dim); LFSA encoder layers; tokenizer (learned queries, logits
    Q x^T without scaling, softmax across the L tokens at each position, tokens = attention-weighted SUM
    over positions); Linear + LayerNorm; decoder (refinement) layers; concatenate the L tokens; Linear
    (L*dim -> out_dim) + BatchNorm1d. The output is not normalised.

    Args:
        in_channels: channels of the local feature map (2048 for ResNet-50/101 block5).
        dim: width of the encoder/tokens (the release's mid_dim, 1024).
        num_tokens: L, number of visual tokens (4).
        num_heads: attention heads (8).
        encoder_layers: LFSA layers (1).
        decoder_layers: refinement blocks (2).
        out_dim: descriptor dimension (1024).
        mlp_ratio: decoder MLP hidden size / dim (2).
        drop, attn_drop, drop_path: dropout after projections, on attention probabilities, stochastic
            depth on every residual branch (0.1 each in the release).
    """

    def __init__(
        self,
        in_channels: int = 2048,
        dim: int = 1024,
        num_tokens: int = 4,
        num_heads: int = 8,
        encoder_layers: int = 1,
        decoder_layers: int = 2,
        out_dim: int = 1024,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop: float = 0.1,
        attn_drop: float = 0.1,
        drop_path: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels, self.dim, self.num_tokens, self.out_dim = in_channels, dim, num_tokens, out_dim
        # Construction order follows the release so that seeded initialisation draws match.
        self.query = nn.Parameter(torch.randn(1, num_tokens, dim))
        self.token_norm = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        args = (dim, num_heads, qkv_bias, drop, attn_drop, drop_path)
        self.encoder = nn.ModuleList([Encoder(*args) for _ in range(encoder_layers)])
        self.decoder = nn.ModuleList([Decoder(*args, mlp_ratio=mlp_ratio) for _ in range(decoder_layers)])
        self.conv = nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=1), nn.BatchNorm2d(dim))
        self.proj = nn.Sequential(nn.Linear(dim * num_tokens, out_dim), nn.BatchNorm1d(out_dim))

    def forward(self, features: Tensor) -> Tensor:
        """features (B, C, h, w) -> descriptor (B, out_dim)."""
        if _fp16_autocast(features.device.type):
            # The tokenizer's unscaled logits and its sum over positions overflow float16 (bf16 is fine):
            # the head is cheap next to the trunk, so it runs in float32 under fp16 autocast.
            with torch.autocast(features.device.type, enabled=False):
                return self.forward(features.float())
        x = self.conv(features).flatten(2).transpose(1, 2)  # (B, h*w, dim)
        return self.aggregate(x)

    def forward_set(self, descriptors: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """A padded set of local descriptors (B, N, C) -> (B, out_dim); padding_mask (B, N) True = padding.

        The 1x1 conv + BatchNorm2d act on each descriptor alone, so a set needs no spatial layout.
        """
        b, n, c = descriptors.shape
        if padding_mask is None:
            x = self.conv(descriptors.reshape(b * n, c, 1, 1)).reshape(b, n, self.dim)
            return self.aggregate(x)
        # Only real descriptors go through conv + BatchNorm2d (padding stays out of batch statistics).
        keep = ~padding_mask
        projected = self.conv(descriptors[keep][:, :, None, None]).flatten(1)
        x = projected.new_zeros(b, n, self.dim)  # the conv's dtype (autocast may make it bf16)
        x[keep] = projected
        return self.aggregate(x, padding_mask)

    def token_attention(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Tokenizer weights (B, L, N) for encoded features x (B, N, dim): softmax over the L tokens."""
        logits = torch.matmul(self.query, x.transpose(1, 2))  # (B, L, N)
        attn = logits.softmax(dim=1)
        if mask is not None:
            attn = attn.masked_fill(mask[:, None, :], 0.0)
        return attn

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.encoder:
            x = layer(x, mask)
        return x

    def aggregate(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Projected local features (B, N, dim) -> descriptor (B, out_dim)."""
        b = x.shape[0]
        x = self.encode(x, mask)
        tokens = torch.bmm(self.token_attention(x, mask), x)  # weighted sum over positions
        tokens = self.token_norm(tokens)
        for layer in self.decoder:
            tokens = layer(tokens, x, mask)
        return self.proj(tokens.reshape(b, -1))

    def attention_maps(self, features: Tensor) -> Tensor:
        """Where each token looks: tokenizer weights reshaped to (B, L, h, w)."""
        b, _, h, w = features.shape
        x = self.encode(self.conv(features).flatten(2).transpose(1, 2))
        return self.token_attention(x).reshape(b, self.num_tokens, h, w)


class SetTokenModel(nn.Module):
    """Token's aggregator on a set of local descriptors (HOW, DELF, ...): no trunk, sets in, one vector out.

    The head is a :class:`TokenHead` (key prefix ``tr``, as in :class:`~tokenret.models.retrieval.TokenModel`)
    whose 1x1 conv + BatchNorm2d acts on each descriptor alone, i.e. a per-descriptor Linear + BatchNorm over
    all real descriptors of the batch. Nothing in the head uses positions, so the output does not depend on
    the order of the descriptors, and padded rows (``padding_mask`` True) take no part anywhere.

    Args:
        in_channels: C, the local descriptor dimension (128 for HOW and DELF).
        input_norm: "l2" (default) L2-normalises every input descriptor before the head; "none" feeds them as
            they are. Why "l2": HOW's descriptors are whitened but not normalised, DELF's are unit vectors;
            the tokenizer's logits are unscaled dot products and its tokens are sums over descriptors, so
            their scale would otherwise change with the extractor (and its whitening), and a few descriptors
            of large norm would dominate the sum. ASMK and VLAD, the methods this replaces, also match
            unit-norm descriptors. "none" keeps the norm (for HOW, a cue of the descriptor's strength).
        **head_kwargs: :class:`TokenHead` arguments (dim, num_tokens, num_heads, encoder_layers,
            decoder_layers, out_dim, mlp_ratio, qkv_bias, drop, attn_drop, drop_path).

    Attributes:
        input_dim: C. descriptor_dim: the output dimension (``out_dim``).

    Example:
        >>> model = SetTokenModel(128, dim=64, num_heads=4, out_dim=32).eval()
        >>> x, padding = torch.randn(2, 50, 128), torch.zeros(2, 50, dtype=torch.bool)
        >>> padding[1, 30:] = True                      # the second set has 30 descriptors
        >>> model(x, padding).shape
        torch.Size([2, 32])
    """

    #: What ``forward`` takes: padded descriptor sets, not images (the trainer and configs check this).
    input_kind = "sets"

    def __init__(self, in_channels: int = 128, input_norm: str = "l2", **head_kwargs) -> None:
        super().__init__()
        if input_norm not in ("l2", "none"):
            raise ValueError(f"input_norm must be 'l2' or 'none', got {input_norm!r}")
        self.input_dim = int(in_channels)
        self.input_norm = input_norm
        self.tr = TokenHead(in_channels=self.input_dim, **head_kwargs)
        self.descriptor_dim = self.tr.out_dim

    def forward_features(self, descriptors: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Un-normalised descriptors (B, out_dim) of padded sets (B, N, C), as fed to ArcFace in training.

        Args:
            descriptors: (B, N, C); padded rows may hold anything (zeros, huge values, NaN).
            padding_mask: (B, N) bool, True = padding; None: every row is a descriptor.
        """
        if descriptors.ndim != 3 or descriptors.shape[-1] != self.input_dim:
            raise ValueError(
                f"expected padded sets (B, N, {self.input_dim}), got shape {tuple(descriptors.shape)}"
            )
        if padding_mask is not None:
            if padding_mask.shape != descriptors.shape[:2]:
                raise ValueError(
                    f"padding_mask {tuple(padding_mask.shape)} does not match the sets "
                    f"{tuple(descriptors.shape[:2])}"
                )
            padding_mask = padding_mask.to(torch.bool)
            descriptors = descriptors.masked_fill(padding_mask[..., None], 0.0)
        if _fp16_autocast(descriptors.device.type):
            # As TokenHead.forward: the unscaled tokenizer overflows float16, so the head runs in float32.
            with torch.autocast(descriptors.device.type, enabled=False):
                return self.forward_features(descriptors.float(), padding_mask)
        if self.input_norm == "l2":
            descriptors = F.normalize(descriptors, dim=-1)  # zero (padding) rows stay zero
        return self.tr.aggregate(self._project(descriptors, padding_mask), padding_mask)

    def _project(self, descriptors: Tensor, padding_mask: Tensor | None) -> Tensor:
        """The head's 1x1 conv + BatchNorm2d on each real descriptor: (B, N, C) -> (B, N, dim), 0 on padding.

        What ``TokenHead.forward_set`` does, with the output in the conv's dtype (bf16 under autocast).
        """
        b, n, c = descriptors.shape
        conv = self.tr.conv
        if padding_mask is None:
            return conv(descriptors.reshape(b * n, c, 1, 1)).reshape(b, n, self.tr.dim)
        keep = ~padding_mask
        projected = conv(descriptors[keep][:, :, None, None]).flatten(1)  # padding stays out of BN statistics
        out = projected.new_zeros(b, n, self.tr.dim)
        out[keep] = projected
        return out

    def forward(self, descriptors: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """L2-normalised descriptors (B, out_dim) of padded sets (B, N, C); padding_mask True = padding."""
        return F.normalize(self.forward_features(descriptors, padding_mask), dim=-1)
