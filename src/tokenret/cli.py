"""The ``tokenret`` command: one subcommand per job."""

from __future__ import annotations

import argparse
import json
import logging
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (ck.CheckpointError, ck.WeightsUnavailableError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tokenret: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
