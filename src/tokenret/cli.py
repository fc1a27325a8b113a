"""The ``tokenret`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path

from tokenret.extraction import ExtractionError
from tokenret.models import checkpoints as ck


def _cmd_models(args: argparse.Namespace) -> int:
    from tokenret.models.local import list_local_models, local_model_description
    from tokenret.models.registry import get_model_config, list_models

    rows = []
    for name in list_models(args.pattern):
        cfg = get_model_config(name)
        w = cfg.weights
        paper = " / ".join(f"{v:.2f}" for v in w.paper_map) if w and w.paper_map else "-"
        trunk = cfg.backbone or "- (sets)"
        rows.append((name, trunk, str(cfg.descriptor_dim), w.filename if w else "-", paper))
    header = ("model", "backbone", "dim", "released weights", "paper mAP ROxf M/H, RPar M/H")
    _print_table(header, rows)
    local = [(n, local_model_description(n).split(";")[0][:100]) for n in list_local_models(args.pattern)]
    if local:
        print("\nlocal-feature extractors (--local NAME):")
        _print_table(("name", "description"), local)
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _cmd_info(args: argparse.Namespace) -> int:
    from tokenret.models.inspect import format_info, inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    best = info.best
    return 0 if best is not None and best.report.ok else 1


def parse_key_values(items: list[str] | None) -> dict[str, object]:
    """['dim=64', 'backbone=resnet18'] -> {'dim': 64, 'backbone': 'resnet18'} (Python literals, else str)."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


DEFAULT_MODEL = "token_r101"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name (see `tokenret models`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="weights file (released or saved by tokenret)")
    g.add_argument("--pretrained", action="store_true", help="download the released weights once")
    p.add_argument("--model-arg", nargs="*", metavar="KEY=VALUE", help="architecture overrides, e.g. dim=512")


def add_extraction_arguments(p: argparse.ArgumentParser) -> None:
    from tokenret.extraction import RELEASE_SCALES

    p.add_argument("--max-size", type=int, default=1024, help="longest image side (never enlarged)")
    p.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help=f"multi-scale factors (default {', '.join(f'{s:.4g}' for s in RELEASE_SCALES)}; "
        "with --local the extractor's own pyramid)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images of equal size per forward pass")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument(
        "--streams",
        type=int,
        default=0,
        help="CPU: batches run at once, sharing torch's threads (default 0: 2 with 2+ threads; 1: off)",
    )
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast (fp16: GPU only)")
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: $TOKENRET_DEVICE, else cuda if available)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the trunk, weights frozen (a minute once, then ~1.15x faster on CPU; needs g++)",
    )
    p.add_argument(
        "--no-winograd",
        dest="winograd",
        action="store_false",
        help="CPU: keep oneDNN's direct 3x3 convolutions instead of NNPACK's fast ones (which differ by "
        "float32 rounding, relative ~1e-5 on the trunk's features)",
    )


def model_from_args(args: argparse.Namespace):
    from tokenret.models.registry import create_model

    if not args.checkpoint and not args.pretrained:
        logging.getLogger("tokenret").warning(
            "no --checkpoint or --pretrained: %s has random weights, results are meaningless", args.model
        )
    return create_model(
        args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, **parse_key_values(args.model_arg)
    )


def extraction_config_from_args(args: argparse.Namespace):
    from tokenret.extraction import RELEASE_SCALES, ExtractionConfig

    return ExtractionConfig(
        max_size=args.max_size,
        scales=tuple(args.scales) if args.scales else RELEASE_SCALES,
        batch_size=args.batch_size,
        num_workers=args.workers,
        amp=args.amp,
        device=args.device,
        compile=getattr(args, "compile", False),
        streams=getattr(args, "streams", 0),
        winograd=getattr(args, "winograd", True),
    )


def add_local_arguments(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    g = p.add_argument_group("local features (HOW, DELF)")
    g.add_argument(
        "--local",
        required=required,
        metavar="NAME",
        help="local-feature extractor: how_r18, how_r50, how_r101, delf_r50",
    )
    w = g.add_mutually_exclusive_group()
    w.add_argument("--local-checkpoint", help="its weights (HOW's .pth formats, or a tokenret file)")
    w.add_argument("--local-pretrained", action="store_true", help="download its released weights once")
    g.add_argument("--topk", type=int, default=None, help="features kept per image (default: the model's)")
    g.add_argument(
        "--sets-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="cached sets' precision (float32: published ASMK numbers to the last decimal, twice the space)",
    )
    g.add_argument(
        "--exact-trunk",
        action="store_true",
        help="CPU: run the extractor's trunk as is, not as a folded/fused copy (1.5x slower for HOW; the "
        "copy's features agree to float rounding; implied by --sets-dtype float32)",
    )


def local_model_from_args(args: argparse.Namespace):
    from tokenret.models.local import create_local_model

    if not args.local_checkpoint and not args.local_pretrained:
        logging.getLogger("tokenret").warning(
            "no --local-checkpoint or --local-pretrained: %s has random weights, results are meaningless",
            args.local,
        )
    return create_local_model(args.local, args.local_checkpoint, pretrained=args.local_pretrained)


def local_config_from_args(args: argparse.Namespace):
    from tokenret.extraction.local_sets import LocalExtractionConfig

    return LocalExtractionConfig(
        max_size=args.max_size,
        scales=tuple(args.scales) if args.scales else None,
        topk=args.topk,
        num_workers=args.workers,
        device=args.device,
        streams=getattr(args, "streams", 0),
        dtype=getattr(args, "sets_dtype", "float16"),
        fast_trunk=False if getattr(args, "exact_trunk", False) else None,
    )


def set_model_from_args(args: argparse.Namespace):
    """The Token set model for --aggregator token: --model/--checkpoint, by default token_set_<--local>."""
    if args.model == DEFAULT_MODEL:  # the default global model makes no sense here
        args.model = f"token_set_{args.local}"
    return model_from_args(args)


def aggregator_from_args(args: argparse.Namespace):
    from tokenret.aggregate.aggregators import AsmkAggregator, TokenAggregator, VladAggregator
    from tokenret.aggregate.codebook import Codebook

    if args.aggregator is None:
        raise ValueError("--local needs --aggregator asmk, vlad or token")
    if args.aggregator == "token":
        return TokenAggregator(set_model_from_args(args), max_n=args.topk, device=args.device)
    if args.codebook is None and args.codebook_size is None:
        raise ValueError(
            f"--aggregator {args.aggregator} needs --codebook FILE (made by `tokenret codebook` on other "
            "images) or --codebook-size K (learned from the evaluated database)"
        )
    codebook = Codebook.load(args.codebook) if args.codebook else None
    if args.aggregator == "asmk":
        return AsmkAggregator(
            codebook,
            codebook_size=args.codebook_size,
            binary=not args.no_binary,
            alpha=args.alpha,
            tau=args.tau,
            query_assignment=args.query_assignment,
        )
    return VladAggregator(codebook, codebook_size=args.codebook_size, power=args.vlad_power)


def local_pipeline_from_args(args: argparse.Namespace):
    """--local NAME --aggregator token|vlad as one image model (for indexes of your own photos)."""
    from tokenret.aggregate.codebook import Codebook
    from tokenret.aggregate.pipeline import LocalAggregateModel

    if args.aggregator == "token":
        aggregator = set_model_from_args(args)
    elif args.aggregator == "vlad":
        if not args.codebook:
            raise ValueError("--aggregator vlad needs --codebook FILE (made by `tokenret codebook`)")
        aggregator = Codebook.load(args.codebook)
    else:
        raise ValueError(
            "an index of local features needs --aggregator token or vlad (one vector per image); ASMK keeps "
            "an inverted file of its own: use `tokenret evaluate --local ... --aggregator asmk`"
        )
    return LocalAggregateModel(
        local_model_from_args(args),
        aggregator,
        scales=args.scales,
        topk=args.topk,
        vlad_power=args.vlad_power,
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tokenret.benchmark import run_benchmark, run_local_benchmark

    qe = tuple(args.qe) if args.qe else None
    dba = tuple(args.dba) if args.dba else None
    if args.local:
        aggregator = aggregator_from_args(args)
        report = run_local_benchmark(
            local_model_from_args(args),
            aggregator,
            args.data_root,
            args.datasets,
            local_config_from_args(args),
            r1m_root=args.r1m,
            qe=qe,
            dba=dba,
            cache_root=args.cache_dir,
            progress=not args.quiet,
        )
        report["local_checkpoint"] = args.local_checkpoint
    else:
        if args.aggregator:
            raise ValueError("--aggregator needs --local NAME (the local features to aggregate)")
        report = run_benchmark(
            model_from_args(args),
            args.data_root,
            args.datasets,
            extraction_config_from_args(args),
            r1m_root=args.r1m,
            qe=qe,
            dba=dba,
            cache_root=args.cache_dir,
            progress=not args.quiet,
        )
    report["checkpoint"] = args.checkpoint
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f">> report written to {out}")
    return 0


def _cmd_extract_local(args: argparse.Namespace) -> int:
    from tokenret.data.files import find_images
    from tokenret.data.folders import read_class_folders, read_csv_labels
    from tokenret.data.gldv2 import read_gldv2
    from tokenret.extraction.local_sets import extract_local_sets

    if bool(args.images) == bool(args.data_format):
        raise ValueError("give either --images FOLDER or --data-format FORMAT --data-root ROOT")
    if args.images:
        paths = [str(p) for p in find_images(args.images)]
        labels, ids = None, paths
    else:
        if args.data_format == "gldv2":
            images = read_gldv2(args.data_root, args.gldv2_list)
        elif args.data_format == "folders":
            images = read_class_folders(args.data_root)
        else:
            if not args.csv:
                raise ValueError("--data-format csv needs --csv FILE")
            images = read_csv_labels(args.csv, args.data_root)
        paths, ids = images.paths, images.ids
        labels = [images.class_names[c] for c in images.labels]
    if not paths:
        raise FileNotFoundError(f"no images found in {args.images or args.data_root}")
    out = Path(args.out)
    model = local_model_from_args(args)
    result = extract_local_sets(
        model,
        paths,
        None,
        local_config_from_args(args),
        out / "shards",
        on_error="record",
        progress=not args.quiet,
        desc=args.local,
    )
    result.store.save(out / "descriptors")
    (out / "images.txt").write_text("".join(f"{i}\n" for i in ids))
    if labels is not None:
        (out / "labels.txt").write_text("".join(f"{c}\n" for c in labels))
    (out / "failures.json").write_text(json.dumps({paths[i]: r for i, (_, r) in result.failures.items()}))
    print(
        f">> {len(paths) - len(result.failures)} images, {result.store.num_descriptors} descriptors "
        f"({model.output_dim}-d) written to {out / 'descriptors'}"
    )
    if result.failures:
        print(
            f">> {len(result.failures)} unreadable image(s) kept as empty sets: see {out / 'failures.json'}"
        )
    return 0


def _cmd_delf_pca(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tokenret.data.files import find_images
    from tokenret.data.images import ImageLoadError, load_image, to_tensor
    from tokenret.extraction.local_sets import normalisation
    from tokenret.models.delf import create_delf, learn_pca, save_delf

    model = create_delf("delf_r50", args.checkpoint)
    if args.score_threshold is not None:
        model.runtime["score_threshold"] = args.score_threshold
    paths = find_images(args.images)[: args.max_images]
    if not paths:
        raise FileNotFoundError(f"no images found in {args.images}")
    mean, std = normalisation(model)
    failures: list[str] = []

    def images():
        for p in tqdm(paths, desc="DELF PCA", unit="img", disable=args.quiet):
            try:
                yield to_tensor(load_image(p, args.max_size), mean, std)
            except ImageLoadError as e:
                failures.append(f"{p}: {e}")

    n = learn_pca(model, images(), args.dim)
    path = save_delf(model, args.out)
    for f in failures:
        print(f">> unreadable, left out: {f}")
    used = len(paths) - len(failures)
    print(f">> {args.dim}-d PCA learned from {n} descriptors of {used} images; saved {path}")
    return 0


def _cmd_codebook(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenret.aggregate.aggregators import CODEBOOK_SAMPLES_PER_WORD
    from tokenret.aggregate.codebook import Codebook
    from tokenret.data.local_store import LocalDescriptorStore

    root = Path(args.sets)
    store = LocalDescriptorStore.load(root / "descriptors" if (root / "descriptors").is_dir() else root)
    candidates = (root / "shards" / "manifest.json", root / "manifest.json", root.parent / "manifest.json")
    manifest = next((m for m in candidates if m.is_file()), None)
    scales = json.loads(manifest.read_text()).get("extraction", {}).get("scales") if manifest else None
    if scales is not None and scales != [1.0]:
        logging.getLogger("tokenret").warning(
            "these sets were extracted at scales %s: HOW learns its codebook from single-scale sets "
            "(extract-local --scales 1), so published ASMK numbers need those",
            scales,
        )
    rng = np.random.default_rng(args.seed)
    wanted = args.max_descriptors or CODEBOOK_SAMPLES_PER_WORD * args.size
    n = store.num_descriptors
    rows = np.sort(rng.choice(n, size=wanted, replace=False)) if n > wanted else np.arange(n)
    x = np.asarray(store.descriptor_rows(rows), np.float32)
    codebook = Codebook.train(x, args.size, seed=args.seed)
    path = codebook.save(args.out)
    print(f">> {args.size} visual words from {len(x)} of {n} descriptors written to {path}")
    return 0


def _cmd_show_results(args: argparse.Namespace) -> int:
    from tokenret.data.revisited import RevisitedDataset
    from tokenret.viz import result_grid

    report = json.loads(Path(args.report).read_text())
    entry = report["datasets"].get(args.dataset) or report["datasets"].get(args.dataset + "+R1M")
    if entry is None:
        raise ValueError(f"{args.report} has no results for {args.dataset!r}: {sorted(report['datasets'])}")
    ds = RevisitedDataset.from_root(args.data_root, args.dataset)
    queries = args.queries if args.queries else list(range(min(5, len(ds.qimlist))))
    bad = [q for q in queries if not 0 <= q < len(ds.qimlist)]
    if bad:
        raise ValueError(f"query indices {bad} out of range 0..{len(ds.qimlist) - 1}")
    grid = result_grid(ds, queries, entry["top_ranks"], args.protocol, args.top)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f">> wrote {args.out} ({len(queries)} queries x top {args.top}, {args.protocol} labels)")
    return 0


def _runtime_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": args.device,
        "streams": getattr(args, "streams", 0),
        "winograd": getattr(args, "winograd", True),
    }


def _cmd_index(args: argparse.Namespace) -> int:
    from tokenret.collection import ImageIndex

    target = Path(args.target)
    if args.out is None:  # `tokenret index INDEX --report / --check-recall / --backend`
        with ImageIndex(target) as index:
            if args.backend is not None or args.refine is not None:
                backend = args.backend or index.backend
                index.set_backend(backend, _refine_from_args(args, backend, index.refine))
                if not args.json:
                    print(f">> search: {_describe_backend(index)}")
                elif not (args.check_recall or args.report):
                    print(json.dumps(_backend_info(index), indent=1))
                if not (args.check_recall or args.report):
                    return 0
            if args.check_recall:
                from tokenret.collection import sampled_recall

                res = sampled_recall(index, k=args.k, n_queries=args.n_queries)  # the configured backend
                refine = f" (exact re-ranking of {res['refine']})" if res["refine"] else ""
                print(
                    json.dumps(res, indent=1)
                    if args.json
                    else f">> recall@{res['k']} of {res['spec']}{refine} vs exact on {res['n_queries']} "
                    f"stored images: {res['recall']:.4f}"
                )
                return 0
            failures = index.failures()
            if args.json:
                print(
                    json.dumps(
                        {
                            "images": len(index),
                            "failed": [list(f) for f in failures],
                            "settings": index.settings,
                            "search": _backend_info(index),
                        },
                        indent=1,
                    )
                )
            else:
                s = index.settings
                print(f"index:      {index.path}")
                print(f"model:      {s['model']} {s['model_kwargs']} ({s['checkpoint']})")
                print(f"extraction: {s['extraction']}")
                print(f"images:     {len(index)} searchable, {len(failures)} unreadable")
                print(f"search:     {_describe_backend(index)}")
                for path, reason in failures:
                    print(f"  unreadable: {path}: {reason}")
        return 0
    out = Path(args.out)
    if (out / "meta.sqlite").exists():
        index = ImageIndex(out)
        model = model_from_args(args) if (args.checkpoint or args.pretrained) else index.load_model()
        if args.backend is not None or args.refine is not None:
            backend = args.backend or index.backend
            # recorded now, built once at the end of the sync below
            index.set_backend(backend, _refine_from_args(args, backend, index.refine), build=False)
    else:
        config = extraction_config_from_args(args)
        if args.local:  # local features + aggregator: one model, saved inside the index
            model, checkpoint = local_pipeline_from_args(args), None
            config.scales = (1.0,)  # the local network runs its own pyramid
        else:
            model, checkpoint = model_from_args(args), args.checkpoint
        backend = args.backend or "auto"
        index = ImageIndex.create(
            out,
            model,
            config,
            checkpoint=checkpoint,
            backend=backend,
            refine=_refine_from_args(args, backend, None),
        )
    with index:
        counts = index.sync(target, model, progress=not args.quiet, **_runtime_from_args(args))
        print(">> " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {len(index)} images searchable")
        if counts["failed"]:
            print(f">> {counts['failed']} unreadable file(s): see `tokenret index {out} --report`")
        if index.backend_spec() != "exact":
            print(f">> search: {_describe_backend(index)}")
    return 0


def _refine_from_args(args: argparse.Namespace, backend: str, current: int | None) -> int | None:
    """--refine K (0: none); without it the current value stays, unless the backend becomes exact."""
    from tokenret.index import is_exact_spec

    if args.refine is not None:
        return args.refine or None
    return None if is_exact_spec(backend) else current


def _backend_info(index) -> dict[str, object]:
    from tokenret.collection import default_qdrant_collection, qdrant_target

    info = {
        "backend": index.backend,
        "spec": index.backend_spec(),
        "refine": index.refine,
        "ann": index.ann_status(),
    }
    target = qdrant_target(info["spec"])
    if target is not None:
        info["qdrant_collection"] = target["collection"] or default_qdrant_collection(index.path)
    return info


def _describe_backend(index) -> str:
    """E.g. 'HNSW32, exact re-ranking of 200 candidates; approximate index current'."""
    info = _backend_info(index)
    text = info["spec"] if info["spec"] == info["backend"] else f"{info['spec']} (backend {info['backend']})"
    if "qdrant_collection" in info:
        text += f" (collection {info['qdrant_collection']})"
    if info["refine"]:
        text += f", exact re-ranking of {info['refine']} candidates"
    if info["ann"] != "exact":
        text += f"; approximate index {info['ann']}"
    return text


def _parse_box(text: str | None):
    if text is None:
        return None
    parts = [float(v) for v in text.replace(" ", "").split(",")]
    if len(parts) != 4:
        raise ValueError(f"--box takes x0,y0,x1,y1; got {text!r}")
    return tuple(parts)


def _cmd_search(args: argparse.Namespace) -> int:
    import csv

    from tokenret.collection import ImageIndex, find_images

    queries: list[Path] = []
    for q in args.queries:
        queries.extend(find_images(q))
    if not queries:
        raise FileNotFoundError(f"no query images in {args.queries}")
    with ImageIndex(args.index) as index:
        model = index.load_model()  # descriptors must be made like the stored ones
        if args.checkpoint or args.pretrained:
            args.model = args.model or index.settings["model"]
            model = model_from_args(args)  # refused below unless it is the index's model
        box = _parse_box(args.box)
        hits = index.search_images(
            queries,
            model,
            k=args.k,
            boxes=[box] * len(queries) if box else None,
            qe=args.qe,
            **_runtime_from_args(args),
        )
    rows = [
        (str(q), rank, h.path, round(h.score, 6))
        for q, hs in zip(queries, hits, strict=True)
        for rank, h in enumerate(hs, start=1)
    ]
    if args.json:
        print(
            json.dumps(
                {
                    str(q): [{"path": h.path, "score": h.score} for h in hs]
                    for q, hs in zip(queries, hits, strict=True)
                },
                indent=1,
            )
        )
    elif args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["query", "rank", "path", "score"])
        w.writerows(rows)
    else:
        for q, hs in zip(queries, hits, strict=True):
            print(f"{q}")
            for rank, h in enumerate(hs, start=1):
                print(f"  {rank:3d}  {h.score:.4f}  {h.path}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from tokenret.collection import ImageIndex
    from tokenret.viz import search_page

    box = _parse_box(args.box)
    with ImageIndex(args.index) as index:
        model = index.load_model()
        hits = index.search_images(
            [args.query], model, k=args.k, boxes=[box] if box else None, num_workers=0, device=args.device
        )[0]
    png, page = search_page(args.query, hits, args.out, model=model, box=box)
    print(f">> wrote {png} and {page}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokenret.serve import serve

    try:
        serve(args.index, host=args.host, port=args.port, checkpoint=args.checkpoint, device=args.device)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        print(f"tokenret: error: cannot serve on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from tokenret.collection import ImageIndex, find_duplicate_groups

    with ImageIndex(args.index) as index:
        groups = find_duplicate_groups(index, args.threshold)
    if args.json:
        print(json.dumps(groups, indent=1))
    else:
        for i, g in enumerate(groups, start=1):
            print(f"group {i} ({len(g)} images)")
            for p in g:
                print(f"  {p}")
        print(f">> {len(groups)} group(s) of near-duplicates at similarity >= {args.threshold}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenret", description="Token-based image retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'token_*'")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("info", help="what a checkpoint file holds and which model it fits")
    p.add_argument("checkpoint", help="a .pth file (released or saved by tokenret)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("evaluate", help="mAP / mP@k on Revisited Oxford and Paris (+R1M)")
    add_model_arguments(p)
    p.add_argument("--data-root", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and jpg/")
    p.add_argument("--datasets", nargs="+", default=["roxford5k", "rparis6k"])
    p.add_argument(
        "--r1m", default=None, help="revisitop1m folder (revisitop1m.txt, jpg/): add 1M distractors"
    )
    p.add_argument("--qe", nargs=2, type=float, metavar=("K", "ALPHA"), help="alpha query expansion")
    p.add_argument("--dba", nargs=2, type=float, metavar=("K", "ALPHA"), help="database-side augmentation")
    add_extraction_arguments(p)
    p.add_argument("--cache-dir", default=None, help="descriptor cache (default $TOKENRET_HOME/descriptors)")
    p.add_argument("--output", default="tokenret-evaluate.json", help="JSON report path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_local_arguments(p)
    g = p.add_argument_group("aggregating local features (with --local)")
    g.add_argument(
        "--aggregator",
        choices=["asmk", "vlad", "token"],
        help="asmk: ASMK* as HOW; vlad; token: a token_set_* model (--model/--checkpoint)",
    )
    g.add_argument("--codebook", help="visual words for asmk/vlad (`tokenret codebook`)")
    g.add_argument("--codebook-size", type=int, help="learn a codebook of K words from the database instead")
    g.add_argument("--no-binary", action="store_true", help="ASMK with float residuals instead of ASMK*")
    g.add_argument("--alpha", type=float, default=3.0, help="ASMK selectivity exponent")
    g.add_argument("--tau", type=float, default=0.0, help="ASMK similarity threshold")
    g.add_argument("--query-assignment", type=int, default=5, help="ASMK visual words per query descriptor")
    g.add_argument("--vlad-power", type=float, default=None, help="VLAD signed power normalisation")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "extract-local",
        help="local descriptor sets of a training set or a folder (for `tokenret train` and `codebook`)",
    )
    add_local_arguments(p, required=True)
    p.add_argument("--images", help="a folder of images (no labels), searched recursively")
    p.add_argument("--data-format", choices=["gldv2", "folders", "csv"], help="a labelled training set")
    p.add_argument("--data-root", help="its folder (gldv2: the GLDv2 root; folders: one folder per class)")
    p.add_argument("--csv", help="for --data-format csv: rows of path,label")
    p.add_argument("--gldv2-list", default="train_clean.csv", help="for gldv2: the list file")
    p.add_argument("--out", required=True, help="output folder: descriptors/, labels.txt, images.txt")
    p.add_argument("--max-size", type=int, default=1024, help="longest image side (never enlarged)")
    p.add_argument("--scales", type=float, nargs="+", default=None, help="pyramid (default: the model's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_extract_local)

    p = sub.add_parser(
        "delf-pca", help="learn DELF's descriptor PCA (e.g. 128-d) and save it with the weights"
    )
    p.add_argument("--checkpoint", help="DELF weights (e.g. trained with configs/delf_r50_gldv2.yaml)")
    p.add_argument("--images", required=True, help="a folder of training images (not the test set)")
    p.add_argument("--dim", type=int, default=128, help="output dimension (released DELF models: 40 or 128)")
    p.add_argument("--max-images", type=int, default=5000)
    p.add_argument("--max-size", type=int, default=1024)
    p.add_argument("--score-threshold", type=float, default=None, help="override the attention threshold")
    p.add_argument("--out", required=True, help="the DELF file with its PCA (--local-checkpoint of delf_r50)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_delf_pca)

    p = sub.add_parser("codebook", help="learn visual words (k-means) for ASMK / VLAD from extracted sets")
    p.add_argument("sets", help="a folder written by `tokenret extract-local`")
    p.add_argument("--size", type=int, default=65536, help="number of words (HOW/ASMK: 65536)")
    p.add_argument(
        "--max-descriptors", type=int, default=None, help="sample at most this many (default 256/word)"
    )
    p.add_argument("--seed", type=int, default=1234, help="sampling and k-means seed (faiss's, as ASMK)")
    p.add_argument("--out", required=True, help="codebook file (.npy)")
    p.set_defaults(func=_cmd_codebook)

    p = sub.add_parser("show-results", help="PNG of the top-k per query from an evaluate report")
    p.add_argument("--report", required=True, help="JSON written by `tokenret evaluate`")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--queries", type=int, nargs="*", help="query indices (default: the first 5)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--protocol", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--out", default="results.png")
    p.set_defaults(func=_cmd_show_results)

    p = sub.add_parser("index", help="index a folder of images (incremental), or report on an index")
    p.add_argument("target", help="PHOTOS folder to index (with --out), or an INDEX to report on")
    p.add_argument("--out", help="index directory to create or update")
    p.add_argument("--report", action="store_true", help="list settings and unreadable files")
    p.add_argument(
        "--check-recall", action="store_true", help="recall@k of the index's search backend vs exact search"
    )
    p.add_argument(
        "--backend",
        default=None,
        help="search backend to record: auto (new indexes: exact up to 200k images, then IVF-PQ), exact, "
        "a FAISS factory string such as HNSW32 or IVF4096_HNSW32,PQ64, or a Qdrant collection for search "
        "beyond one machine: qdrant:http://HOST:6333[#COLLECTION] (a server or cluster) or "
        "qdrant:FOLDER[#COLLECTION] (Qdrant's local mode)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="K",
        help="re-score the best K FAISS candidates exactly against the stored vectors (0: off)",
    )
    p.add_argument("-k", "--k", type=int, default=100, help="k for --check-recall")
    p.add_argument("--n-queries", type=int, default=100, help="sampled queries for --check-recall")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_model_arguments(p)
    add_extraction_arguments(p)
    add_local_arguments(p)
    g = p.add_argument_group("aggregating local features (with --local)")
    g.add_argument(
        "--aggregator", choices=["token", "vlad"], help="token: a token_set_* model (--model/--checkpoint)"
    )
    g.add_argument("--codebook", help="visual words for vlad (`tokenret codebook`)")
    g.add_argument("--vlad-power", type=float, default=None, help="VLAD signed power normalisation")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser("search", help="search an index with query images (or folders of them)")
    p.add_argument("index")
    p.add_argument("queries", nargs="+", help="query images or folders")
    p.add_argument("--box", help="x0,y0,x1,y1: search with this region of the query")
    p.add_argument("-k", "--k", type=int, default=20)
    p.add_argument("--qe", type=int, nargs="?", const=5, default=0, help="alpha query expansion over N hits")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    add_model_arguments(p)
    p.set_defaults(model=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("show", help="PNG + HTML page of a search, with the query's token attention maps")
    p.add_argument("index")
    p.add_argument("query")
    p.add_argument("--box", help="x0,y0,x1,y1")
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--out", default="tokenret-show", help="output folder")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser("serve", help="HTTP API and web page to search an index")
    p.add_argument("index")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0: all interfaces, no authentication)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    p.add_argument("--checkpoint", help="the index's weights, if the recorded file moved")
    p.add_argument(
        "--device",
        default=None,
        help="where queries are described (default: $TOKENRET_DEVICE, else cuda if available)",
    )
    p.set_defaults(func=_cmd_serve)

    from tokenret.train.command import add_parser as add_train_parser

    add_train_parser(sub)

    p = sub.add_parser("duplicates", help="groups of near-duplicate images in an index")
    p.add_argument("index")
    p.add_argument("--threshold", type=float, default=0.9, help="cosine similarity for 'near-duplicate'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_duplicates)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (
        ck.CheckpointError,
        ck.WeightsUnavailableError,
        FileNotFoundError,
        KeyError,
        ValueError,
        ExtractionError,
        ImportError,  # an optional dependency (faiss-cpu, qdrant-client): the message names the install
        ConnectionError,  # a search server (Qdrant) that cannot be reached
    ) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tokenret: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
