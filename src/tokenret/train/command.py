"""The ``tokenret train`` subcommand.

::

    tokenret train --config configs/token_r101_gldv2.yaml data.root=/data/gldv2 train.output_dir=runs/r101
    torchrun --nproc_per_node=4 -m tokenret.cli train --config configs/token_r101_gldv2.yaml data.root=...
    tokenret train --resume --output-dir runs/r101      # continue an interrupted run with its saved config
    tokenret train --config configs/tiny_cpu.yaml --print-config

``python -m tokenret.train.command train ...`` runs the same thing without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "main", "run_train"]

log = logging.getLogger(__name__)


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


def _resolve_config(args: argparse.Namespace):
    from tokenret.train.config import RunConfig, apply_overrides, load_config, parse_override
    from tokenret.train.loop import config_of_checkpoint

    overrides = list(args.overrides or [])
    if args.output_dir:
        overrides.append(f"train.output_dir={json.dumps(str(args.output_dir))}")
    if args.config or not (args.resume or args.resume_from):
        return load_config(args.config, overrides)
    # Resuming without --config: the run's own config, from its checkpoint.
    if not args.resume_from:
        out_dir = RunConfig().output_dir
        for text in overrides:
            key, value = parse_override(text)
            if key == "train.output_dir":
                out_dir = str(value)
        ckpt = Path(out_dir) / "last.pth"
    else:
        ckpt = Path(args.resume_from)
    if not ckpt.is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist (give --output-dir or --config)")
    saved = config_of_checkpoint(ckpt)
    saved.train.stop_after_steps = None  # an interruption the saved run simulated is not repeated
    cfg = apply_overrides(saved, overrides)
    cfg.validate()
    return cfg


def run_train(args: argparse.Namespace) -> int:
    """Build the config, then train (resuming if asked); prints where the checkpoints are."""
    from tokenret.train.config import config_to_yaml
    from tokenret.train.distributed import init_distributed, shutdown_distributed
    from tokenret.train.loop import Trainer

    cfg = _resolve_config(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    ctx = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    if not ctx.is_main:
        logging.getLogger("tokenret").setLevel(logging.WARNING)
    try:
        trainer = Trainer(cfg, ctx=ctx)
        trainer.resume_or_load(args.resume_from or args.resume)
        trainer.train()
        if ctx.is_main:
            out = trainer.output_dir
            state = "stopped" if trainer.stopped else "finished"
            print(f"training {state} at step {trainer.step}/{trainer.total_steps}; checkpoints in {out}")
            if trainer.best:
                best = trainer.best
                print(
                    f"best {best['metric']} = {best['value']:.4f} at step {best['step']} ({out / 'best.pth'})"
                )
    finally:
        shutdown_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenret.train.command train ...``: the ``train`` subcommand alone."""
    from tokenret.models import checkpoints as ck

    parser = argparse.ArgumentParser(prog="tokenret")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (ck.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"tokenret: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
