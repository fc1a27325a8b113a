"""Seconds per image of local-feature extraction (HOW R50, its 7 scales, max_size 1024) on CPU: the
extractor as is vs the fast trunk copy (BatchNorm folded, ReLU/add fused, channels_last, NNPACK's 3x3
convolutions in one-thread streams), side by side in one process, interleaved repeats (median).

The images are synthetic 1024x768 / 768x1024 JPEGs in a temporary folder; the model has random weights
(content and weights do not change the speed). Also reports how far the two runs' sets differ.

    python bench/extract_local.py [--n 4] [--threads 2] [--repeats 3] [--model how_r50] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from extract import synthetic_jpegs  # bench/extract.py, beside this script
from machine import describe_machine  # bench/machine.py, beside this script

from tokenret.extraction.local_sets import LocalExtractionConfig, extract_local_sets
from tokenret.models.local import create_local_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="how_r50")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = describe_machine(args.threads, "cpu")
    torch.manual_seed(0)
    model = create_local_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp), args.n)
        runs = {"as is (fast_trunk=False)": False, "fast trunk (default)": True}
        cfg = {
            k: LocalExtractionConfig(num_workers=args.workers, fast_trunk=v, device="cpu")
            for k, v in runs.items()
        }
        for c in cfg.values():  # warm-up: oneDNN set-up per shape, NNPACK's first use
            extract_local_sets(model, paths[:2], config=c, progress=False)
        times: dict[str, list[float]] = {k: [] for k in runs}
        outs = {}
        for _ in range(args.repeats):
            for k, c in cfg.items():
                t = time.perf_counter()
                outs[k] = extract_local_sets(model, paths, config=c, progress=False).store
                times[k].append(time.perf_counter() - t)
    plain, fast = (outs[k] for k in runs)
    same_counts = all(len(plain.get(i)) == len(fast.get(i)) for i in range(args.n))
    strength_diff = max(
        float(np.abs(np.sort(plain.strengths(i)) - np.sort(fast.strengths(i))).max()) for i in range(args.n)
    )
    base = statistics.median(times[next(iter(runs))])
    rows = []
    print(
        f"{args.model}, {len(model.runtime['scales'])} scales, max_size 1024, {args.n} images, "
        f"{args.threads} threads"
    )
    for k, ts in times.items():
        dt = statistics.median(ts)
        rows.append({"variant": k, "seconds": dt, "all_seconds": ts, "speedup": base / dt})
        print(
            f"  {k:<28s} {dt / args.n:6.2f} s/image  x{base / dt:5.2f}  "
            f"({' / '.join(f'{t:.1f}' for t in ts)} s)"
        )
    print(f"  same set sizes: {same_counts}; max |strength difference| (sorted): {strength_diff:.2e}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "machine": machine,
                    "rows": rows,
                    "same_counts": same_counts,
                    "strength_diff": strength_diff,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
