"""``tokenret train``: train a model (Token or a baseline) with a margin loss.

::

    tokenret train --config configs/token_r101_gldv2.yaml data.root=/data/gldv2 train.output_dir=runs/r101
    torchrun --nproc_per_node=4 -m tokenret.cli train --config configs/token_r101_gldv2.yaml data.root=...
    tokenret train --resume --output-dir runs/r101      # continue an interrupted run with its saved config
    tokenret train --config configs/tiny_cpu.yaml --print-config

This module parses the arguments; :mod:`tokenret.train.command` resolves the config and runs the job.
"""

from __future__ import annotations

import argparse
from typing import Any

from tokenret.cli.common import add_verbose_argument, run_parsed, set_interrupt_hint

__all__ = ["add_parser", "main", "run_train"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on an argparse subparsers object; its ``func`` is :func:`run_train`."""
    p = subparsers.add_parser(
        "train",
        help="train a model (Token or a baseline) on GLDv2 or your own labelled images",
        description="Train a registered model with a margin loss. Configuration: a YAML file plus KEY=VALUE "
        "overrides (e.g. optim.base_lr=0.005 train.amp=bf16 model.kwargs.drop_path=0). Launch with torchrun "
        "for several GPUs or nodes.",
    )
    p.add_argument(
        "--config", help="YAML config, e.g. configs/token_r101_gldv2.yaml (default: the built-in defaults)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.epochs=10")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder from its last.pth (a fresh start if there is none); "
        "without --config the run's saved config is used, with the overrides applied on top",
    )
    p.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this training checkpoint")
    p.add_argument("--output-dir", help="shortcut for train.output_dir=...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Resolve the config from the arguments, then print it (``--print-config``) or train."""
    from tokenret.train.command import resolve_config, run_training

    cfg = resolve_config(
        args.config,
        args.overrides or [],
        resume=args.resume,
        resume_from=args.resume_from,
        output_dir=args.output_dir,
    )
    set_interrupt_hint(
        args,
        "continue from the run's last saved checkpoint with "
        f"`tokenret train --resume --output-dir {cfg.train.output_dir}`",
    )
    if args.print_config:
        from tokenret.train.config import config_to_yaml

        print(config_to_yaml(cfg), end="")
        return 0
    run_training(cfg, resume=args.resume_from or args.resume)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``train`` alone (``argv`` starts with ``train``): a parser with only this subcommand.

    Example:
        >>> main(["train", "--config", "configs/tiny_cpu.yaml", "--print-config"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="tokenret")
    add_verbose_argument(parser)
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_parsed(parser.parse_args(argv))
