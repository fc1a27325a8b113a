"""``tokenret models`` and ``tokenret info``: what the registry holds and what a weights file fits."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Register ``models`` and ``info``."""
    p = subparsers.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'token_*'")
    p.set_defaults(func=_cmd_models)

    p = subparsers.add_parser(
        "info", help="what a checkpoint file holds and which model it fits, or what an exported .onnx expects"
    )
    p.add_argument(
        "checkpoint", help="a .pth file (released or saved by tokenret), or a .onnx file it exported"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_info)


def _cmd_models(args: argparse.Namespace) -> int:
    from tokenret.models.local import list_local_models, local_model_description
    from tokenret.models.registry import get_model_config, list_models

    rows = []
    for name in list_models(args.pattern):
        cfg = get_model_config(name)
        w = cfg.weights
        paper = " / ".join(f"{v:.2f}" for v in w.paper_map) if w and w.paper_map else "-"
        trunk = cfg.backbone or cfg.trunk or "- (sets)"
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
    if str(args.checkpoint).lower().endswith(".onnx"):
        return _onnx_info(args)
    from tokenret.models.inspect import format_info, inspect_checkpoint

    info = inspect_checkpoint(args.checkpoint)
    print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
    best = info.best
    return 0 if best is not None and best.report.ok and not info.non_finite else 1


def _onnx_info(args: argparse.Namespace) -> int:
    from tokenret.export import format_onnx_metadata, read_onnx_metadata

    meta = read_onnx_metadata(args.checkpoint)
    print(json.dumps(meta, indent=2) if args.json else format_onnx_metadata(args.checkpoint, meta))
    return 0
