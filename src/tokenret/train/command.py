"""Run a training job from resolved settings: the config to use (a YAML file and overrides, or a run's
own saved config when resuming) and the launch under the distributed context the environment describes.

The command line, ``tokenret train`` (:mod:`tokenret.cli.train`), parses its arguments and calls these::

    tokenret train --config configs/token_r101_gldv2.yaml data.root=/data/gldv2 train.output_dir=runs/r101
    torchrun --nproc_per_node=4 -m tokenret.cli train --config configs/token_r101_gldv2.yaml data.root=...
    tokenret train --resume --output-dir runs/r101      # continue an interrupted run with its saved config
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenret.train.config import TrainConfig

__all__ = ["resolve_config", "run_training"]


def resolve_config(
    config: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    resume: bool = False,
    resume_from: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> TrainConfig:
    """The config a run uses.

    Args:
        config: a YAML file; None: the built-in defaults, or when resuming the run's own saved config.
        overrides: ``KEY=VALUE`` strings applied on top (e.g. ``optim.base_lr=0.005``).
        resume: continue the run in the output folder from its ``last.pth``.
        resume_from: continue from this training checkpoint.
        output_dir: shortcut for ``train.output_dir=...``.

    Raises:
        FileNotFoundError: resuming without ``config`` and there is no checkpoint to take the config from.
        tokenret.train.ConfigError: an unknown key, a wrong type or inconsistent values.
    """
    from tokenret.train.config import RunConfig, apply_overrides, load_config, parse_override
    from tokenret.train.state import config_of_checkpoint

    overrides = list(overrides)
    if output_dir:
        overrides.append(f"train.output_dir={json.dumps(str(output_dir))}")
    if config or not (resume or resume_from):
        return load_config(config, overrides)
    # Resuming without a config: the run's own config, from its checkpoint.
    if not resume_from:
        out_dir = RunConfig().output_dir
        for text in overrides:
            key, value = parse_override(text)
            if key == "train.output_dir":
                out_dir = str(value)
        ckpt = Path(out_dir) / "last.pth"
    else:
        ckpt = Path(resume_from)
    if not ckpt.is_file():
        raise FileNotFoundError(f"nothing to resume: {ckpt} does not exist (give --output-dir or --config)")
    saved = config_of_checkpoint(ckpt)
    saved.train.stop_after_steps = None  # an interruption the saved run simulated is not repeated
    cfg = apply_overrides(saved, overrides)
    cfg.validate()
    return cfg


def run_training(cfg: TrainConfig, resume: bool | str | Path = False) -> None:
    """Train (resuming if asked) in this process's rank; the main rank prints where the checkpoints are.

    Args:
        cfg: the resolved config (:func:`resolve_config`).
        resume: True: from the output folder's ``last.pth`` if there is one; a path: from that checkpoint.
    """
    from tokenret.train import Trainer
    from tokenret.train.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    if not ctx.is_main:
        logging.getLogger("tokenret").setLevel(logging.WARNING)
    try:
        trainer = Trainer(cfg, ctx=ctx)
        trainer.resume_or_load(resume)
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
