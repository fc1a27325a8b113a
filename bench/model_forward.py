"""Forward time of token_r101 on one 3x1024x768 image: tokenret vs a naive reference, side by side.

The naive reference is the same network and weights run the way the release runs it: attention as an
explicit per-head loop (softmax(q k^T) v per head), default (NCHW) memory format, autograd bookkeeping
off only through torch.no_grad (no inference mode). Variants in between show where the time goes.

    python bench/model_forward.py [--repeats 5] [--threads 2] [--size 1024 768] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from machine import describe_machine  # bench/machine.py, beside this script
from torch import nn

import tokenret
from tokenret.models.token import Attention


class LoopAttention(nn.Module):
    """The release's attention computation with one explicit loop iteration per head."""

    def __init__(self, fast: Attention) -> None:
        super().__init__()
        self.fast = fast

    def forward(self, query, key, value, key_padding_mask=None):
        a = self.fast
        q, k, v = a.q(query), a.k(key), a.v(value)
        d = q.shape[-1] // a.num_heads
        outs = []
        for h in range(a.num_heads):
            s = slice(h * d, (h + 1) * d)
            attn = F.softmax((q[..., s] @ k[..., s].transpose(-2, -1)) * d**-0.5, dim=-1)
            outs.append(attn @ v[..., s])
        return a.proj(torch.cat(outs, dim=-1))


def swap_attention(model: nn.Module, naive: bool) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if naive and isinstance(child, Attention):
                setattr(module, name, LoopAttention(child))
            elif not naive and isinstance(child, LoopAttention):
                setattr(module, name, child.fast)


def run(
    model, x, naive_attn: bool, channels_last: bool, inference_mode: bool, bf16: bool = False
) -> tuple[float, torch.Tensor]:
    swap_attention(model, naive_attn)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    ctx = torch.inference_mode() if inference_mode else torch.no_grad()
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with ctx, amp:
        sync()
        t = time.perf_counter()
        out = model(x)
        sync()
        return time.perf_counter() - t, out.float().clone()


VARIANTS = {
    "naive reference (loop attention, NCHW, no_grad)": (True, False, False),
    "+ SDPA attention": (False, False, False),
    "+ channels_last": (False, True, False),
    "tokenret (SDPA, channels_last, inference_mode)": (False, True, True),
    "tokenret + bf16 autocast (other numerics)": (False, True, True, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, nargs=2, default=(1024, 768), metavar=("H", "W"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe_machine(args.threads, args.device)
    torch.manual_seed(0)
    model = tokenret.create_model("token_r101").eval().to(args.device)
    for m in model.modules():  # released weights have non-zero attention outputs; fresh ones are exactly 0
        if isinstance(m, Attention):
            nn.init.normal_(m.proj.weight, std=0.02)
    x = torch.randn(1, 3, *args.size, device=args.device)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    outputs = {}
    for flags in VARIANTS.values():  # warm-up (allocator, oneDNN primitive caches)
        run(model, x, *flags)
    for _ in range(args.repeats):  # interleaved so that machine noise hits every variant alike
        for name, flags in VARIANTS.items():
            t, out = run(model, x, *flags)
            times[name].append(t)
            outputs[name] = out
    ref_name = next(iter(VARIANTS))
    ref = statistics.median(times[ref_name])
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"token_r101, 1x3x{args.size[0]}x{args.size[1]}, {where}, median of {args.repeats}")
    rows = []
    for name in VARIANTS:
        med = statistics.median(times[name])
        diff = (outputs[name] - outputs[ref_name]).abs().max().item()
        rows.append({"variant": name, "median_s": med, "speedup": ref / med, "max_abs_diff": diff})
        print(f"  {name:<50s} {med:6.2f} s   x{ref / med:4.2f}   max|diff| {diff:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "size": args.size,
                    "threads": args.threads,
                    "repeats": args.repeats,
                    "machine": machine,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
