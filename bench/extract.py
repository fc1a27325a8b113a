"""Images per second of multi-scale descriptor extraction: a release-style loop, tokenret's PyTorch engine
and its onnxruntime engine, for any registry global model (default token_r101).

The release-style loop (written here, like the release's test code): batch size 1, one image at a time,
each scale resized as the model's input convention says (``F.interpolate`` for Token and the cirtorch
models) and run separately, default (NCHW) memory format, torch.no_grad; the scales' descriptors combined
by the convention's scale pooling with tokenret's ``combine_scales`` (the mean for Token and cirtorch, the
generalised mean for GeM networks, sGeM for SuperGlobal, which pools its un-normalised head outputs).
tokenret: ``extract_descriptors`` (channels_last, BatchNorm folded into the convolutions, ReLU and residual
add fused into them on CPU, inference_mode, DataLoader workers, equal-size batching, on CPU two streams of
batches sharing the threads, NNPACK's fast 3x3 convolutions in 1-thread streams, optional bf16 autocast).
tokenret onnxruntime: the same extraction with ``engine="onnxruntime"`` (the model exported to ONNX once,
before the timed runs, into a temporary $TOKENRET_HOME; ONNX Runtime's own thread pool of --threads threads;
needs pip install 'tokenret[onnx]', else the row is left out with a note; a model whose export raises
``ExportError`` gets the row "not exportable: <reason>").
Every model runs with its own input convention's settings, as ``extract_descriptors`` does without a config
(``ExtractionConfig.for_model``: channel order, mean/std, max_size, scales, scale pooling), with random
weights (``torch.manual_seed(0)``; no weights are downloaded: speed only, the descriptors mean nothing).
The inference copy of each tokenret variant (folded copy, or ONNX Runtime session) is made just before its
timed run and timed apart ("setup_seconds"); ``--include-setup`` times it inside the run, as before.
All run the same images in one process; the images are synthetic --size x 3/4 --size JPEGs (1024x768 /
768x1024 by default) written to a temporary folder (content does not change the speed).

    python bench/extract.py [--model token_r101 | --models gem_r50,token_r50,... | --models all]
                            [--n 6] [--size 1024] [--threads 2] [--repeats 3] [--compile] [--skip-bf16]
                            [--skip-onnx] [--ablations | --no-ablations] [--json F]

With one model every ablation row runs (each turns one tokenret default off); with several (``--models``)
only the engine rows (release-style, tokenret fp32, onnxruntime fp32, bf16 unless --skip-bf16), and one line
per model says which engine is the faster on this machine.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import describe_machine  # bench/machine.py, beside this script
from PIL import Image

import tokenret
from tokenret.data.images import load_image, to_tensor
from tokenret.export import ExportError
from tokenret.extraction import (
    ExtractionConfig,
    combine_scales,
    extract_descriptors,
    inference_network,
    resize_to_scale,
)
from tokenret.models.convention import input_convention
from tokenret.models.registry import get_model_config
from tokenret.models.token import SetTokenModel

RELEASE = "release-style loop (bs 1, NCHW, no_grad)"
TORCH_FP32 = "tokenret fp32"
ONNX_FP32 = "tokenret onnxruntime fp32"
WEIGHTS_NOTE = "random weights (torch.manual_seed(0)); no weights downloaded: speed only"
#: a variant: (what is made before its timed run, untimed, or None; the timed run)
Variant = tuple[Callable[[], Any] | None, Callable[[], np.ndarray]]


def synthetic_jpegs(folder: Path, n: int, seed: int = 0, size: int = 1024) -> list[Path]:
    """``n`` random-pixel JPEGs in ``folder``: ``size`` x 3/4 ``size`` (1024x768), every third one portrait
    (content does not change the speed)."""
    rng = np.random.default_rng(seed)
    short = round(size * 3 / 4)
    paths = []
    for i in range(n):
        h, w = (short, size) if i % 3 else (size, short)
        p = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p, quality=85)
        paths.append(p)
    return paths


def release_style(model, paths, device) -> np.ndarray:
    """One image at a time, each of the model's scales resized and run on its own, NCHW, no_grad.

    Images load as the model's convention says (max_size, channel order, mean/std); ``model(x)`` is the
    single-scale L2-normalised descriptor (``model.forward_features(x)``, the head's output before its
    normalisation, where the convention pools those, SuperGlobal); the scales combine with the convention's
    pooling (``combine_scales``; for the mean: summed in scale order, divided by their number,
    L2-normalised, the Token release's arithmetic).
    """
    conv = input_convention(model)
    mean, std = conv.rgb_mean_std
    power = getattr(model, "multiscale_power", None)
    model = model.to(device).to(memory_format=torch.contiguous_format)
    forward = model.forward_features if conv.pool_unnormalised else model
    out = []
    with torch.no_grad():
        for p in paths:
            x = to_tensor(load_image(p, conv.max_size), mean, std)
            x = (x.flip(0) if conv.channel_order == "BGR" else x)[None].to(device)
            per_scale = [forward(resize_to_scale(x, s, conv)).float() for s in conv.scales]
            out.append(combine_scales(torch.stack(per_scale), conv.scale_pool, power)[0].cpu().numpy())
    return np.stack(out)


def global_models() -> list[str]:
    """The registry's global image models (``token_set_*`` aggregate local-descriptor sets: left out)."""
    return [n for n in tokenret.list_models() if not issubclass(get_model_config(n).family, SetTokenModel)]


def model_names(args, ap: argparse.ArgumentParser) -> list[str]:
    if args.models is None:
        names = [args.model]
    elif args.models.strip() == "all":
        names = global_models()
    else:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
    known = tokenret.list_models()
    for n in names:
        if n not in known:
            ap.error(f"unknown model {n!r}; registry models: {', '.join(known)}")
        if issubclass(get_model_config(n).family, SetTokenModel):
            ap.error(
                f"{n} aggregates local-descriptor sets: not a global image model (bench/extract_local.py)"
            )
    if not names:
        ap.error("--models: no model named")
    return names


def bench_model(name: str, args, paths: list[Path], ablations: bool) -> dict[str, Any]:
    """Every variant of one model, interleaved over ``args.repeats``; its rows and engine comparison."""
    torch.manual_seed(0)
    model = tokenret.create_model(name).eval()
    conv = input_convention(model)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def config(
        amp: str = "off",
        fold: bool = True,
        compile: bool = False,
        fuse: bool = True,
        streams: int = 0,
        winograd: bool = True,
        engine: str = "torch",
    ) -> ExtractionConfig:
        return ExtractionConfig.for_model(  # the model's max_size and scales (pooling: "model")
            model,
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

    def ours(amp: str, **kwargs) -> Variant:
        cfg = config(amp, **kwargs)

        def setup():  # the inference copy / ONNX Runtime session, kept for the run right after
            return inference_network(model.eval().to(cfg.resolved_device()), cfg)

        def run() -> np.ndarray:
            return extract_descriptors(model, paths, config=cfg, progress=False).descriptors

        return (None if args.include_setup else setup), run

    runs: dict[str, Variant] = {
        RELEASE: (None, lambda: release_style(model, paths, dev)),
        TORCH_FP32: ours("off"),
    }
    if ablations:
        runs["tokenret fp32, no winograd"] = ours("off", winograd=False)
        runs["tokenret fp32, 1 stream"] = ours("off", streams=1)
        runs["tokenret fp32, ReLU/add not fused"] = ours("off", fuse=False)
        runs["tokenret fp32, BatchNorm not folded"] = ours("off", fold=False)
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
        runs[ONNX_FP32] = ours("off", engine="onnxruntime")
    # warm-up on one image each (allocator, cuDNN/oneDNN algorithm choice)
    release_style(model, paths[:1], dev)
    extract_descriptors(  # two images: on CPU both streams set up their one-thread convolutions
        model,
        paths[:2],
        config=ExtractionConfig.for_model(model, device=args.device, num_workers=0),
        progress=False,
    )
    export_seconds = None
    if ONNX_FP32 in runs:  # the one-off export, reported apart (later runs read it)
        t = time.perf_counter()
        try:
            extract_descriptors(model, paths[:2], config=config(engine="onnxruntime"), progress=False)
        except ExportError as e:
            onnx_note = f"not exportable: {e}"
            del runs[ONNX_FP32]
        else:
            export_seconds = time.perf_counter() - t
            print(f"{name}: ONNX export + onnxruntime warm-up (2 images): {export_seconds:.0f} s")
    compile_seconds = None
    if args.compile:  # the one-off compilation, reported apart (later calls re-use the compiled copy)
        t = time.perf_counter()
        extract_descriptors(model, paths[:2], config=config(compile=True), progress=False)
        compile_seconds = time.perf_counter() - t
        print(f"{name}: torch.compile warm-up (2 images): {compile_seconds:.0f} s")
    # the variants take turns, repeat after repeat, so a busy minute on a shared machine hits them all
    times: dict[str, list[float]] = {v: [] for v in runs}
    setup_times: dict[str, list[float]] = {v: [] for v in runs}
    outs = {}
    for _ in range(args.repeats):
        for variant, (setup, fn) in runs.items():
            if setup is not None:
                t = time.perf_counter()
                setup()
                setup_times[variant].append(time.perf_counter() - t)
            sync()
            t = time.perf_counter()
            outs[variant] = fn()
            sync()
            times[variant].append(time.perf_counter() - t)
    rows = []
    for variant, ts in times.items():
        dt = statistics.median(ts)
        row = {"variant": variant, "seconds": dt, "all_seconds": ts, "images_per_s": len(paths) / dt}
        if setup_times[variant]:
            row["setup_seconds"] = setup_times[variant]
        rows.append(row)
    ref = outs[RELEASE]
    base = rows[0]["images_per_s"]
    cfg = config()
    size = "file size" if cfg.max_size is None else f"max_size {cfg.max_size}"
    print(
        f"{name}, {len(cfg.scales)} scales, {size}, {conv.channel_order}, scales by {conv.scale_pool}, "
        f"{len(paths)} images, device {args.device}, {args.threads} threads"
        + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else "")
        + f"; {WEIGHTS_NOTE}"
    )
    for r, (variant, out) in zip(rows, outs.items(), strict=True):
        r["speedup"] = r["images_per_s"] / base
        r["min_cosine_vs_release"] = float((out * ref).sum(1).min())
        setup = f"  (setup {statistics.median(r['setup_seconds']):.1f} s)" if "setup_seconds" in r else ""
        print(
            f"  {variant:<42s} {r['images_per_s']:7.3f} img/s  x{r['speedup']:5.2f}  "
            f"min cos vs release {r['min_cosine_vs_release']:.6f}{setup}"
        )
    if onnx_note:
        print(f"  {ONNX_FP32}: {onnx_note}")
    engines = engine_comparison(rows, onnx_note)
    print(engine_line(name, engines))
    return {
        "model": name,
        "weights": "random",
        "descriptor_dim": int(model.descriptor_dim),
        "convention": conv.describe(),
        "max_size": cfg.max_size,
        "scales": list(cfg.scales),
        "images": len(paths),
        "rows": rows,
        "compile_seconds": compile_seconds,
        "onnx_export_seconds": export_seconds,
        "onnx_note": onnx_note,
        "engines": engines,
    }


def engine_comparison(rows: list[dict], onnx_note: str | None) -> dict[str, Any]:
    """img/s of the release loop and of both engines (fp32), and which engine is the faster, by how much."""
    by = {r["variant"]: r["images_per_s"] for r in rows}
    out: dict[str, Any] = {
        "release_images_per_s": by.get(RELEASE),
        "torch_images_per_s": by.get(TORCH_FP32),
        "onnxruntime_images_per_s": by.get(ONNX_FP32),
        "onnxruntime_note": onnx_note,
        "faster": None,
        "ratio": None,
    }
    t, o = out["torch_images_per_s"], out["onnxruntime_images_per_s"]
    if t and o:
        out["faster"] = "torch" if t >= o else "onnxruntime"
        out["ratio"] = max(t, o) / min(t, o)
    return out


def engine_line(name: str, e: dict[str, Any]) -> str:
    def rate(v):
        return "-" if v is None else f"{v:.3f} img/s"

    if e["faster"]:
        verdict = f"{e['faster']} faster, x{e['ratio']:.2f}"
        onnx = rate(e["onnxruntime_images_per_s"])
    else:
        verdict = "no comparison"
        onnx = e["onnxruntime_note"] or "-"
    return (
        f"{name}: release-style {rate(e['release_images_per_s'])}, torch {rate(e['torch_images_per_s'])}, "
        f"onnxruntime {onnx} -> {verdict}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default="token_r101", help="registry global model (default token_r101)")
    which.add_argument(
        "--models", default=None, help="comma-separated registry global models run in turn, or 'all'"
    )
    ap.add_argument("--n", type=int, default=6, help="images (2/3 landscape, 1/3 portrait), at least 2")
    ap.add_argument("--size", type=int, default=1024, help="long side of the synthetic JPEGs (short: 3/4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved (median)")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row (compiled once first)")
    ap.add_argument("--skip-bf16", action="store_true", help="no bf16 (slow without avx512_bf16)")
    ap.add_argument("--skip-onnx", action="store_true", help="no onnxruntime row")
    ap.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the rows that turn one tokenret default off (default: with one model only)",
    )
    ap.add_argument(
        "--include-setup",
        action="store_true",
        help="time each tokenret variant's inference copy / ONNX Runtime session inside its run",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.n < 2:
        ap.error("--n: at least 2 images (the warm-ups use two)")
    names = model_names(args, ap)
    ablations = len(names) == 1 if args.ablations is None else args.ablations
    torch.set_num_threads(args.threads)
    machine = describe_machine(args.threads, args.device)
    print(f"{len(names)} model(s): {', '.join(names)}; {WEIGHTS_NOTE}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = synthetic_jpegs(Path(tmp), args.n, size=args.size)
        home = Path(tmp) / "home"
        os.environ["TOKENRET_HOME"] = str(home)  # the exported .onnx files, deleted afterwards
        for name in names:
            try:
                results.append(bench_model(name, args, paths, ablations))
            except Exception as e:  # several models: record the failure, go on
                if len(names) == 1:
                    raise
                traceback.print_exc()
                print(f"{name}: failed: {type(e).__name__}: {e}")
                results.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            shutil.rmtree(home / "onnx", ignore_errors=True)
            gc.collect()
    if len(names) > 1:
        print(f"\nengines, {args.n} images of {args.size} px, {args.threads} threads, {WEIGHTS_NOTE}:")
        for r in results:
            print(
                "  "
                + (engine_line(r["model"], r["engines"]) if "engines" in r else f"{r['model']}: {r['error']}")
            )
    if args.json:
        out: dict[str, Any] = {
            "args": vars(args),
            "machine": machine,
            "weights": WEIGHTS_NOTE,
            "models": results,
        }
        if len(results) == 1 and "rows" in results[0]:  # the fields of the single-model runs, as before
            r = results[0]
            out |= {k: r[k] for k in ("model", "rows", "compile_seconds", "onnx_export_seconds")}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
