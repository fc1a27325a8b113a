"""Training throughput of token_r101 (images/s): tokenret's step vs a loop written like the release's.

Both run the same network, weights, ArcFace head (81,313 classes), SGD with Nesterov momentum and the same
synthetic batches (already in memory: this measures the step, not image decoding).

* release-like: what MCC-WH/Token's train.py does per step: fp32, default (NCHW) memory format, attention as
  explicit matmul + softmax (no fused kernel), ``zero_grad``, backward, step, then ``loss.item()`` and a
  top-1 computation synchronised every step (its MetricLogger).
* tokenret: :meth:`tokenret.train.loop.Trainer.run_step` — channels_last, SDPA attention, metrics kept on the
  device and read every ``log_every`` steps; on GPUs also with bf16 autocast (``--amp bf16``, the default
  there; ``--amp fp16`` uses loss scaling).

    python bench/train.py                                   # GPU if available: 512 px, batch 32 (per GPU)
    python bench/train.py --size 256 --batch 4 --steps 3    # a CPU-sized run
    python bench/train.py --json bench/results/train_gpu.json     # + the JSON results

Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model, describe_machine  # bench/machine.py, beside this script
from torch import nn

import tokenret
from tokenret.data.folders import LabelledImages
from tokenret.models.token import Attention
from tokenret.train.config import load_config
from tokenret.train.data import TrainData
from tokenret.train.loop import Trainer


class ReleaseAttention(nn.Module):
    """The release's attention: q/k/v projections, explicit (q k^T) * scale, softmax, dropout, @ v."""

    def __init__(self, fast: Attention, attn_drop: float) -> None:
        super().__init__()
        self.fast = fast
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, query, key, value, key_padding_mask=None):
        a = self.fast
        b, nq, d = query.shape
        h = a.num_heads
        q = a.q(query).reshape(b, nq, h, d // h).transpose(1, 2)
        k = a.k(key).reshape(b, key.shape[1], h, d // h).transpose(1, 2)
        v = a.v(value).reshape(b, value.shape[1], h, d // h).transpose(1, 2)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, nq, d)
        return a.proj_drop(a.proj(out))


def to_release_attention(model: nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Attention):
                setattr(module, name, ReleaseAttention(child, child.attn_drop))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_trainer(args, amp: str, release: bool) -> Trainer:
    overrides = [
        f"model.name={args.model}",
        "model.backbone_weights=null",  # speed does not depend on the weights; nothing to download
        f"train.batch_size={args.batch}",
        f"train.amp={amp}",
        f"train.channels_last={'false' if release else 'true'}",
        f"train.device={args.device}",
        "train.progress=false",
        "train.tensorboard=false",
        f"data.image_size={args.size}",
        "data.num_workers=0",
    ]
    n = args.batch * 2
    labels = np.arange(n) % args.classes
    images = LabelledImages(["unused"] * n, labels, [str(i) for i in range(args.classes)])
    torch.manual_seed(0)
    return Trainer(load_config(args.config, overrides), data=TrainData(images, None), default_hooks=False)


def make_variant(args, amp: str, release: bool):
    """A step function (one optimizer step on a batch) and its device."""
    trainer = make_trainer(args, amp, release)
    device = trainer.device
    model = trainer.model
    if release:
        to_release_attention(model)
    opt = trainer.optimizer
    log_every = 10

    def release_step(x, y):
        for g in opt.param_groups:
            g["lr"] = trainer.schedule(trainer.step)
        x, y = x.to(device), y.to(device)
        logits = model(x, y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = loss.item()  # MetricLogger.update, every step
        (logits.argmax(1) == y).float().mean().item()  # its top-1 error, every step
        if not math.isfinite(loss_value):
            raise FloatingPointError("loss is not finite")
        trainer.step += 1

    def ours_step(x, y):
        trainer.run_step([(x, y)])
        trainer.step += 1
        if trainer.step % log_every == 0:
            trainer.pop_meters()

    return (release_step if release else ours_step), device


def time_steps(step, device, batches, n: int) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for i in range(n):
        step(*batches[i % len(batches)])
    synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="token_r101")
    ap.add_argument("--config", default="configs/token_r101_gldv2.yaml")
    ap.add_argument("--size", type=int, default=512, help="square training crop (512 in the recipe)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default 32 on GPU, 4 on CPU)")
    ap.add_argument("--classes", type=int, default=81313, help="ArcFace classes (GLDv2-clean: 81313)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 3 on CPU)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 2 on CPU)"
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed rounds of --steps steps per variant (median)"
    )
    ap.add_argument(
        "--amp",
        default=None,
        choices=["off", "bf16", "fp16"],
        help="precision of the extra tokenret row (default bf16 on GPU; off on CPU, where this PyTorch build "
        "runs bf16 convolution backward on a slow fallback, ~10x slower than fp32)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (32 if gpu else 4)
    args.steps = args.steps or (20 if gpu else 3)
    args.amp = args.amp or ("bf16" if gpu else "off")
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    torch.set_num_threads(args.threads)
    machine = describe_machine(args.threads, args.device)
    if gpu:
        torch.backends.cudnn.benchmark = True  # for every variant alike

    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch, 3, args.size, args.size, generator=g),
            torch.randint(0, args.classes, (args.batch,), generator=g),
        )
        for _ in range(2)
    ]
    variants = [
        ("release-like loop (fp32, NCHW, explicit attention)", "off", True),
        ("tokenret (fp32)", "off", False),
    ]
    if args.amp != "off":
        variants.append((f"tokenret ({args.amp} autocast)", args.amp, False))
    steps = [make_variant(args, amp, release) for _, amp, release in variants]
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    for step, device in steps:
        time_steps(step, device, batches, args.warmup)
    # Rounds interleave the variants, so that a noisy machine slows each of them alike; medians are reported.
    seconds: list[list[float]] = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, (step, device) in enumerate(steps):
            seconds[i].append(time_steps(step, device, batches, args.steps) / args.steps)
    rows = []
    for (name, amp, _), per_step in zip(variants, seconds, strict=True):
        med = statistics.median(per_step)
        rows.append(
            {
                "variant": name,
                "amp": amp,
                "images_per_s": args.batch / med,
                "s_per_step": med,
                "rounds_s_per_step": per_step,
            }
        )
    base = rows[0]["images_per_s"]
    where = torch.cuda.get_device_name(args.device) if gpu else f"CPU ({cpu_model()}), {args.threads} threads"
    print(
        f"{args.model} training step, {args.batch}x3x{args.size}x{args.size}, {args.classes} classes, "
        f"{where}, median of {args.rounds} rounds of {args.steps} steps"
    )
    print(f"  {'variant':<52s} {'img/s':>8s} {'s/step':>8s} {'speed-up':>9s}")
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        print(f"  {r['variant']:<52s} {r['images_per_s']:8.2f} {r['s_per_step']:8.3f} {r['speedup']:8.2f}x")
    if gpu:
        print(
            f"  peak GPU memory, all variants together: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "size": args.size,
                    "batch": args.batch,
                    "classes": args.classes,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "rounds": args.rounds,
                    "threads": None if gpu else args.threads,
                    "device": where,
                    "torch": torch.__version__,
                    "tokenret": tokenret.__version__,
                    "machine": machine,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
