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
