"""Training state: what a checkpoint holds beside the weights, RNG states, and the seeds derived from a run's.

A training checkpoint is a tokenret checkpoint (``create_model`` loads it) whose extra fields hold the margin
head, optimizer, scaler, schedule, epoch and step, sampler position, every process's RNG states, the config,
the best validation so far and the latest validation metrics. Restoring all of them makes a resumed run
continue bit for bit where it stopped.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from tokenret.models import checkpoints as ck
from tokenret.train.config import TrainConfig, config_diff, config_from_dict, config_to_dict
from tokenret.train.data import TrainData
from tokenret.train.distributed import DistributedContext, GlobalBatchSampler, all_gather_objects, barrier
from tokenret.train.metrics import MetricSink
from tokenret.train.schedule import WarmupDecaySchedule

__all__ = [
    "RUN_CONTROL_KEYS",
    "TRAINING_STATE_VERSION",
    "TrainingRun",
    "config_of_checkpoint",
    "get_rng_state",
    "load_training_state",
    "save_training_checkpoint",
    "seed_for",
    "set_rng_state",
    "training_state",
]

log = logging.getLogger(__name__)

#: Written by the trainer into every checkpoint, beside the tokenret model format.
TRAINING_STATE_VERSION = 1

#: Settings that change how a run is watched or stopped, not what it computes (no warning when they change).
RUN_CONTROL_KEYS = frozenset(
    {
        "train.stop_after_steps",
        "train.progress",
        "train.tensorboard",
        "train.log_every",
        "train.checkpoint_every_steps",
        "train.keep_epoch_checkpoints",
        "train.output_dir",
        "train.dist_timeout_minutes",
        "data.num_workers",
        "data.check_files",
    }
)


class TrainingRun(Protocol):
    """What a checkpoint saves and restores of a run (:class:`~tokenret.train.loop.Trainer` is one).

    Position (``step``, ``epoch``, ``batch_in_epoch``), ``best`` and the metric sink's latest validation are
    written back on restore; the modules are restored in place.
    """

    cfg: TrainConfig
    ctx: DistributedContext
    device: torch.device
    data: TrainData
    net: nn.Module
    model: nn.Module  # net + margin head (``model.classifier``)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: WarmupDecaySchedule
    sampler: GlobalBatchSampler
    steps_per_epoch: int
    step: int
    epoch: int
    batch_in_epoch: int
    best: dict[str, Any] | None
    metrics: MetricSink

    @property
    def is_main(self) -> bool: ...


def seed_for(seed: int, *keys: int) -> int:
    """A seed derived from the run's ``seed`` and ``keys`` (a purpose, a rank, an epoch...), independent of
    every other combination."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA, on a GPU ``device``) RNG states, as picklable tensors
    and tuples."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore RNG states saved by :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def training_state(trainer: TrainingRun) -> dict[str, Any]:
    """Everything but the model weights that a checkpoint holds (collective: call on every process)."""
    t = trainer
    rng = all_gather_objects(get_rng_state(t.device))
    return {
        "training_state": TRAINING_STATE_VERSION,
        "classifier": t.model.classifier.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict(),
        "schedule": t.schedule.state_dict(),
        "epoch": t.epoch,
        "step": t.step,
        "batch_in_epoch": t.batch_in_epoch,
        "sampler": {**t.sampler.state_dict(), "epoch": t.epoch, "start": t.batch_in_epoch},
        "rng": rng,
        "world_size": t.ctx.world_size,
        "config": config_to_dict(t.cfg),
        "best": dict(t.best) if t.best else None,
        "metrics": dict(t.metrics.latest("val")),
        "class_names": list(t.data.train.class_names),
    }


def save_training_checkpoint(trainer: TrainingRun, path: str | Path) -> Path | None:
    """Write the weights and :func:`training_state` to ``path`` (rank 0); every process must call it.

    Returns:
        The path on rank 0, None on the others.
    """
    extra = training_state(trainer)
    saved = None
    if trainer.is_main:
        saved = ck.save_checkpoint(trainer.net, path, **extra)
    barrier()
    return saved


def load_training_state(trainer: TrainingRun, path: str | Path) -> None:
    """Restore model, head, optimizer, scaler, position, metrics and RNG states from a training checkpoint.

    Raises:
        CheckpointError: ``path`` holds no training state, or was trained as another model.
    """
    t = trainer
    loaded = ck.read_checkpoint(path)
    extra = loaded.extra
    if extra.get("training_state") is None:
        raise ck.CheckpointError(
            f"{path} holds model weights but no training state; to start from it use "
            f"model.init_checkpoint={path}"
        )
    if loaded.model_name and loaded.model_name != t.cfg.model.name:
        raise ck.CheckpointError(f"{path} was trained as {loaded.model_name!r}, not {t.cfg.model.name!r}")
    old_cfg = extra.get("config") or {}
    changed = config_diff(old_cfg, config_to_dict(t.cfg))
    harmless = [c for c in changed if c.split(":")[0] in RUN_CONTROL_KEYS]
    changed = [c for c in changed if c not in harmless]
    if harmless:
        log.info("resuming with other run settings: %s", "; ".join(harmless))
    if changed:
        log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))
    t.net.load_state_dict(loaded.state_dict, strict=True)
    t.model.classifier.load_state_dict(extra["classifier"])
    t.optimizer.load_state_dict(extra["optimizer"])
    if extra.get("scaler"):
        t.scaler.load_state_dict(extra["scaler"])
    t.step = int(extra["step"])
    t.epoch = int(extra["epoch"])
    t.batch_in_epoch = int(extra["batch_in_epoch"])
    saved = extra.get("sampler") or {}
    if saved.get("n") not in (None, t.sampler.n) or saved.get("seed") not in (None, t.sampler.seed):
        log.warning(
            "training set or seed changed since the checkpoint (n %s -> %s, seed %s -> %s)",
            saved.get("n"),
            t.sampler.n,
            saved.get("seed"),
            t.sampler.seed,
        )
    if t.batch_in_epoch > t.steps_per_epoch:
        t.epoch, t.batch_in_epoch = t.epoch + 1, 0
    t.best = extra.get("best")
    t.metrics.restore_latest("val", extra.get("metrics") or {})
    rng = extra.get("rng") or []
    if len(rng) == t.ctx.world_size:
        set_rng_state(rng[t.ctx.rank], t.device)
    else:
        log.warning(
            "checkpoint was written by %d process(es), this run has %d: RNG streams are re-seeded",
            len(rng),
            t.ctx.world_size,
        )
        torch.manual_seed(seed_for(t.cfg.train.seed, 2, t.step, t.ctx.rank))
    log.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        path,
        t.step,
        t.epoch,
        t.batch_in_epoch,
    )


def config_of_checkpoint(path: str | Path) -> TrainConfig:
    """The TrainConfig saved inside a training checkpoint."""
    loaded = ck.read_checkpoint(path)
    cfg = loaded.extra.get("config")
    if not cfg:
        raise ck.CheckpointError(f"{path} holds no training config (not written by tokenret train)")
    return config_from_dict(cfg, str(path))
