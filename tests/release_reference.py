"""An independent, deliberately naive re-statement of the release's Token head forward (eval mode).

Written from the published description (spec/token-release.md, section 1.2) with plain tensor ops on a
state dict: per-head attention loops, explicit softmax axes. Tests compare tokenret's modules with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].t() + sd[prefix + ".bias"]


def batchnorm(x, sd, prefix, eps=1e-5):
    """Eval-mode BatchNorm over the last dim of x (..., C)."""
    mean, var = sd[prefix + ".running_mean"], sd[prefix + ".running_var"]
    return (x - mean) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def layernorm(x, sd, prefix, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def naive_attention(q_in, k_in, v_in, sd, prefix, num_heads):
    """One head at a time: softmax(q k^T * (D/h)^-0.5) v, heads concatenated, output projection."""
    q, k, v = (
        linear(q_in, sd, prefix + ".q"),
        linear(k_in, sd, prefix + ".k"),
        linear(v_in, sd, prefix + ".v"),
    )
    b, nq, d = q.shape
    hd = d // num_heads
    outs = []
    for h in range(num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) * hd**-0.5
        w = torch.exp(logits - logits.max(-1, keepdim=True).values)
        w = w / w.sum(-1, keepdim=True)
        outs.append(w @ v[..., sl])
    return linear(torch.cat(outs, dim=-1), sd, prefix + ".proj")


def token_head_reference(feat, sd, num_heads=8, prefix="tr"):
    """feat (B, C, h, w) -> un-normalised descriptor, following the release step by step."""
    p = prefix + "."
    sd = {k[len(p) :]: v.double() for k, v in sd.items() if k.startswith(p)}
    feat = feat.double()
    b = feat.shape[0]
    w = sd["conv.0.weight"][:, :, 0, 0]
    x = torch.einsum("dc,bchw->bhwd", w, feat) + sd["conv.0.bias"]
    x = batchnorm(x, sd, "conv.1").reshape(b, -1, w.shape[0])  # (B, N, D), row-major over (h, w)
    i = 0
    while f"encoder.{i}.bn.weight" in sd:
        e = f"encoder.{i}"
        x = x + naive_attention(x, x, x, sd, e + ".attn", num_heads)
        x = x + linear(batchnorm(x, sd, e + ".bn"), sd, e + ".mlp")
        i += 1
    q = sd["query"].expand(b, -1, -1)
    logits = q @ x.transpose(1, 2)  # (B, L, N), no scaling
    attn = torch.exp(logits - logits.max(1, keepdim=True).values)
    attn = attn / attn.sum(1, keepdim=True)  # softmax across the L tokens
    tokens = torch.einsum("bln,bnd->bld", attn, x)  # sum over positions
    tokens = layernorm(linear(tokens, sd, "token_norm.0"), sd, "token_norm.1")
    i = 0
    while f"decoder.{i}.bn1.weight" in sd:
        d = f"decoder.{i}"
        tn = layernorm(tokens, sd, d + ".bn1")
        tokens = tokens + naive_attention(tn, x, x, sd, d + ".cross_attn", num_heads)
        hid = linear(tokens, sd, d + ".mlp.fc1")
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
        tokens = tokens + linear(hid, sd, d + ".mlp.fc2")
        tn = layernorm(tokens, sd, d + ".bn2")
        tokens = tokens + naive_attention(tn, tn, tn, sd, d + ".self_attn", num_heads)
        i += 1
    out = linear(tokens.reshape(b, -1), sd, "proj.0")
    return batchnorm(out, sd, "proj.1")


def randomize_state(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> dict:
    """Random values for every state-dict entry (positive running variances), like a released file."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            out[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean"):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith(".weight") and v.ndim == 1:  # norm scales
            out[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            out[k] = scale * torch.randn(v.shape, generator=g)
    return out


__all__ = ["F", "naive_attention", "randomize_state", "token_head_reference"]
