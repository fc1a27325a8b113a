"""The ``tokenret`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path

from tokenret.extract import ExtractionError
from tokenret.models import checkpoints as ck


def _cmd_models(args: argparse.Namespace) -> int:
    from tokenret.models.registry import get_model_config, list_models

    rows = []
    for name in list_models(args.pattern):
        cfg = get_model_config(name)
        w = cfg.weights
        paper = " / ".join(f"{v:.2f}" for v in w.paper_map) if w and w.paper_map else "-"
        rows.append((name, cfg.backbone, str(cfg.descriptor_dim), w.filename if w else "-", paper))
    header = ("model", "backbone", "dim", "released weights", "paper mAP ROxf M/H, RPar M/H")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


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


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="token_r101", help="registry name (see `tokenret models`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="weights file (released or saved by tokenret)")
    g.add_argument("--pretrained", action="store_true", help="download the released weights once")
    p.add_argument("--model-arg", nargs="*", metavar="KEY=VALUE", help="architecture overrides, e.g. dim=512")


def add_extraction_arguments(p: argparse.ArgumentParser) -> None:
    from tokenret.extract import RELEASE_SCALES

    p.add_argument("--max-size", type=int, default=1024, help="longest image side (never enlarged)")
    p.add_argument(
        "--scales", type=float, nargs="+", default=list(RELEASE_SCALES), help="multi-scale factors"
    )
    p.add_argument("--batch-size", type=int, default=8, help="images of equal size per forward pass")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast (fp16: GPU only)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


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
    from tokenret.extract import ExtractionConfig

    return ExtractionConfig(
        max_size=args.max_size,
        scales=tuple(args.scales),
        batch_size=args.batch_size,
        num_workers=args.workers,
        amp=args.amp,
        device=args.device,
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tokenret.benchmark import run_benchmark

    model = model_from_args(args)
    report = run_benchmark(
        model,
        args.data_root,
        args.datasets,
        extraction_config_from_args(args),
        r1m_root=args.r1m,
        qe=tuple(args.qe) if args.qe else None,
        dba=tuple(args.dba) if args.dba else None,
        cache_root=args.cache_dir,
        progress=not args.quiet,
    )
    report["checkpoint"] = args.checkpoint
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f">> report written to {out}")
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
    return {"batch_size": args.batch_size, "num_workers": args.workers, "device": args.device}


def _cmd_index(args: argparse.Namespace) -> int:
    from tokenret.index.collection import ImageIndex

    target = Path(args.target)
    if args.out is None:  # `tokenret index INDEX --report / --check-recall`
        with ImageIndex(target) as index:
            if args.check_recall:
                from tokenret.index.collection import sampled_recall

                res = sampled_recall(index, args.backend, k=args.k, n_queries=args.n_queries)
                print(
                    json.dumps(res, indent=1)
                    if args.json
                    else f">> recall@{args.k} of {res['spec']} vs exact on {res['n_queries']} stored images: "
                    f"{res['recall']:.4f}"
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
                for path, reason in failures:
                    print(f"  unreadable: {path}: {reason}")
        return 0
    out = Path(args.out)
    if (out / "meta.sqlite").exists():
        index = ImageIndex(out)
        model = model_from_args(args) if (args.checkpoint or args.pretrained) else index.load_model()
    else:
        model = model_from_args(args)
        index = ImageIndex.create(
            out, model, extraction_config_from_args(args), checkpoint=args.checkpoint, backend=args.backend
        )
    with index:
        counts = index.sync(target, model, progress=not args.quiet, **_runtime_from_args(args))
        print(">> " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {len(index)} images searchable")
        if counts["failed"]:
            print(f">> {counts['failed']} unreadable file(s): see `tokenret index {out} --report`")
    return 0


def _parse_box(text: str | None):
    if text is None:
        return None
    parts = [float(v) for v in text.replace(" ", "").split(",")]
    if len(parts) != 4:
        raise ValueError(f"--box takes x0,y0,x1,y1; got {text!r}")
    return tuple(parts)


def _cmd_search(args: argparse.Namespace) -> int:
    import csv

    from tokenret.index.collection import ImageIndex, find_images

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
    from tokenret.index.collection import ImageIndex
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


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from tokenret.index.collection import ImageIndex
    from tokenret.index.duplicates import find_duplicate_groups

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
    p.set_defaults(func=_cmd_evaluate)

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
    p.add_argument("--check-recall", action="store_true", help="recall@k of the approximate index vs exact")
    p.add_argument("--backend", default="exact", help="'exact' (default) or a FAISS factory string")
    p.add_argument("-k", "--k", type=int, default=100, help="k for --check-recall")
    p.add_argument("--n-queries", type=int, default=100, help="sampled queries for --check-recall")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    add_model_arguments(p)
    add_extraction_arguments(p)
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
    ) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tokenret: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
