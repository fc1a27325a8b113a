"""Images per second of 3-scale descriptor extraction with token_r101: tokenret vs a release-style loop.

The release-style loop (written here, like the release's test code): batch size 1, one image at a time,
each scale resized with F.interpolate and run separately, default (NCHW) memory format, torch.no_grad.
tokenret: ``extract_descriptors`` (channels_last, BatchNorm folded into the convolutions, ReLU and residual
add fused into them on CPU, inference_mode, DataLoader workers, equal-size batching, on CPU two streams of
batches sharing the threads, NNPACK's fast 3x3 convolutions in 1-thread streams, optional bf16 autocast).
tokenret onnxruntime: the same extraction with ``engine="onnxruntime"`` (the model exported to ONNX once,
before the timed runs, into a temporary $TOKENRET_HOME; ONNX Runtime's own thread pool of --threads threads;
needs pip install 'tokenret[onnx]', else the row is left out with a note).
All run the same model and images in one process; the images are synthetic 1024x768 / 768x1024 JPEGs
written to a temporary folder (content does not change the speed).

    python bench/extract.py [--n 6] [--threads 2] [--repeats 3] [--compile] [--skip-bf16] [--skip-onnx]
                            [--json F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import tokenret
from tokenret.data.images import load_image, to_tensor
from tokenret.extraction import RELEASE_SCALES, ExtractionConfig, extract_descriptors


def synthetic_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` random-pixel JPEGs in ``folder``: 1024x768, every third one 768x1024 (content does not change
    the speed)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = (768, 1024) if i % 3 else (1024, 768)
        p = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=85)
        paths.append(p)
    return paths


def release_style(model, paths, device) -> np.ndarray:
    out = []
    model = model.to(device).to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        for p in paths:
            x = to_tensor(load_image(p, 1024))[None].to(device)
            v = torch.zeros(model.descriptor_dim, device=device)
            for s in RELEASE_SCALES:
                xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
                v += model(xs)[0]
            out.append(F.normalize(v / 3, dim=0).cpu().numpy())
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6, help="images (2/3 landscape, 1/3 portrait)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved (median)")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row (compiled once first)")
    ap.add_argument("--skip-bf16", action="store_true", help="no bf16 (slow without avx512_bf16)")
    ap.add_argument("--skip-onnx", action="store_true", help="no onnxruntime row")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = tokenret.create_model("token_r101").eval()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp), args.n)
        os.environ["TOKENRET_HOME"] = str(Path(tmp) / "home")  # the exported .onnx, deleted afterwards

        def config(
            amp: str = "off",
            fold: bool = True,
            compile: bool = False,
            fuse: bool = True,
            streams: int = 0,
            winograd: bool = True,
            engine: str = "torch",
        ) -> ExtractionConfig:
            return ExtractionConfig(
                batch_size=args.batch_size,
                num_workers=args.workers,
                device=args.device,
                amp=amp,
                fold_batchnorm=fold,
                fuse_activations=fuse,
                compile=compile,
                streams=streams,
                winograd=winograd,
                engine=engine,
            )

        def ours(amp: str, **kwargs):
            cfg = config(amp, **kwargs)
            return lambda: extract_descriptors(model, paths, config=cfg, progress=False).descriptors

        runs = {
            "release-style loop (bs 1, NCHW, no_grad)": lambda: release_style(model, paths, dev),
            "tokenret fp32": ours("off"),
            "tokenret fp32, no winograd": ours("off", winograd=False),
            "tokenret fp32, 1 stream": ours("off", streams=1),
            "tokenret fp32, ReLU/add not fused": ours("off", fuse=False),
            "tokenret fp32, BatchNorm not folded": ours("off", fold=False),
        }
        if args.compile:
            runs["tokenret fp32 + torch.compile (trunk)"] = ours("off", compile=True)
        if not args.skip_bf16:
            runs["tokenret bf16 autocast"] = ours("bf16")
        if dev.type == "cuda":
            runs["tokenret fp16 autocast"] = ours("fp16")
        onnx_note = None
        if args.skip_onnx:
            onnx_note = "left out (--skip-onnx)"
        elif importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            onnx_note = "left out: pip install 'tokenret[onnx]'"
        else:
            runs["tokenret onnxruntime fp32"] = ours("off", engine="onnxruntime")
        # warm-up on one image each (allocator, cuDNN/oneDNN algorithm choice)
        release_style(model, paths[:1], dev)
        extract_descriptors(  # two images: on CPU both streams set up their one-thread convolutions
            model, paths[:2], config=ExtractionConfig(device=args.device, num_workers=0), progress=False
        )
        export_seconds = None
        if "tokenret onnxruntime fp32" in runs:  # the one-off export, reported apart (later runs read it)
            t = time.perf_counter()
            extract_descriptors(model, paths[:2], config=config(engine="onnxruntime"), progress=False)
            export_seconds = time.perf_counter() - t
            print(f"ONNX export + onnxruntime warm-up (2 images): {export_seconds:.0f} s")
        compile_seconds = None
        if args.compile:  # the one-off compilation, reported apart (later calls re-use the compiled copy)
            t = time.perf_counter()
            extract_descriptors(model, paths[:2], config=config(compile=True), progress=False)
            compile_seconds = time.perf_counter() - t
            print(f"torch.compile warm-up (2 images): {compile_seconds:.0f} s")
        # the variants take turns, repeat after repeat, so a busy minute on a shared machine hits them all
        times: dict[str, list[float]] = {name: [] for name in runs}
        outs = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                sync()
                t = time.perf_counter()
                outs[name] = fn()
                sync()
                times[name].append(time.perf_counter() - t)
        rows = []
        for name, ts in times.items():
            dt = statistics.median(ts)
            rows.append({"variant": name, "seconds": dt, "all_seconds": ts, "images_per_s": args.n / dt})
        ref = next(iter(outs.values()))
        base = rows[0]["images_per_s"]
        print(
            f"token_r101, 3 scales, max_size 1024, {args.n} images, device {args.device}, "
            f"{args.threads} threads" + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else "")
        )
        for r, (name, out) in zip(rows, outs.items(), strict=True):
            r["speedup"] = r["images_per_s"] / base
            r["min_cosine_vs_release"] = float((out * ref).sum(1).min())
            print(
                f"  {name:<42s} {r['images_per_s']:7.3f} img/s  x{r['speedup']:5.2f}  "
                f"min cos vs release {r['min_cosine_vs_release']:.6f}"
            )
        if onnx_note:
            print(f"  tokenret onnxruntime fp32: {onnx_note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "rows": rows,
                    "compile_seconds": compile_seconds,
                    "onnx_export_seconds": export_seconds,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
