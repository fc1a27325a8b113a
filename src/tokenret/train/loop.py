"""The training engine: a Trainer that runs the loop, and hooks that log, validate and checkpoint.

One optimizer step takes one global batch (``train.batch_size`` images over all processes and
gradient-accumulation micro-batches): for each micro-batch, margin logits of the un-normalised descriptor
and mean cross-entropy divided by ``grad_accum``; then optional clipping, the SGD step at the learning rate
of :mod:`tokenret.train.schedule` for that step. Under DDP, gradients are averaged over processes, so the
update equals one process taking the whole global batch (BatchNorm statistics included, when
``train.sync_bn``).

Checkpoints (``last.pth``, ``epoch_XXX.pth``, ``best.pth`` in ``train.output_dir``) are tokenret checkpoints
that :func:`tokenret.create_model` loads directly; they also hold the margin head, optimizer, scaler,
schedule, epoch and step, sampler position, every process's RNG states and the config, so
``resume_or_load(resume=True)`` continues a run exactly where it stopped.

Hooks (detectron2 style) see the trainer at ``before_train``, ``before_step``, ``after_step``,
``after_epoch`` and ``after_train``; the defaults are :class:`MetricsLogger` (progress bar, JSON lines,
TensorBoard), :class:`PeriodicValidation` (classification top-1/top-5 and loss on the held-out split,
retrieval mAP on revisited datasets, best-checkpoint choice) and :class:`PeriodicCheckpointer`.

Example:
    >>> from tokenret.train import Trainer, load_config
    >>> cfg = load_config("configs/tiny_cpu.yaml", ["data.root=my_images"])   # doctest: +SKIP
    >>> trainer = Trainer(cfg)                                                # doctest: +SKIP
    >>> trainer.resume_or_load(resume=True)                                   # doctest: +SKIP
    >>> trainer.train()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tokenret.data.augment import LabelledImageDataset, TrainTransform, ValTransform
from tokenret.data.folders import (
    LabelledImages,
    read_class_folders,
    read_csv_labels,
    read_id_list,
    split_by_list,
    split_per_class,
)
from tokenret.data.gldv2 import read_gldv2
from tokenret.data.images import load_image, to_tensor
from tokenret.data.local_sets import (
    LabelledSets,
    LocalSetDataset,
    drop_empty_sets,
    read_local_sets,
    split_sets_by_list,
)
from tokenret.models import checkpoints as ck
from tokenret.models.how import HOWNet, learn_dim_reduction
from tokenret.models.local import create_local_model, is_local_model
from tokenret.models.margin import MARGIN_HEADS
from tokenret.models.registry import create_model, get_model_config
from tokenret.train.config import (
    ConfigError,
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
)
from tokenret.train.distributed import (
    DistributedContext,
    GlobalBatchSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    convert_sync_batchnorm,
    init_distributed,
)
from tokenret.train.schedule import WarmupDecaySchedule, schedule_from_config

__all__ = [
    "HookBase",
    "MetricsLogger",
    "PeriodicCheckpointer",
    "PeriodicValidation",
    "TrainData",
    "Trainer",
    "TrainingModel",
    "build_optimizer",
    "load_training_data",
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


#: A batch's network input: images (B, 3, H, W), or several tensors (descriptor sets and padding masks).
Inputs = Tensor | tuple[Tensor, ...]


class TrainingModel(nn.Module):
    """Retrieval network + margin head: ``(inputs, labels) -> margin logits``.

    ``inputs`` is an image batch, or a tuple passed as arguments to ``net.forward_features`` (a set model's
    descriptors and padding mask).

    Attributes:
        net: the retrieval model (what checkpoints save as the model and ``create_model`` rebuilds).
        classifier: ArcFace/CosFace head (the release's ``classifier``), used only for training.
    """

    def __init__(self, net: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.classifier = classifier

    def forward(self, inputs: Inputs, labels: Tensor) -> Tensor:
        return self.classifier(forward_features(self.net, inputs), labels)


def forward_features(net: nn.Module, inputs: Inputs) -> Tensor:
    """``net.forward_features`` of an image batch, or of a tuple of tensors given as arguments."""
    if isinstance(inputs, (tuple, list)):
        return net.forward_features(*inputs)
    return net.forward_features(inputs)


def _to_device(
    inputs: Inputs,
    device: torch.device,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    non_blocking: bool = False,
) -> Inputs:
    """Move a batch's inputs to ``device``: floating tensors to ``dtype`` (None: kept), 4-D ones to
    ``memory_format``."""
    if isinstance(inputs, (tuple, list)):
        return tuple(_to_device(t, device, dtype, memory_format, non_blocking) for t in inputs)
    if inputs.is_floating_point() and dtype is not None:
        inputs = inputs.to(device, dtype=dtype, non_blocking=non_blocking)
    else:
        inputs = inputs.to(device, non_blocking=non_blocking)
    return inputs.contiguous(memory_format=memory_format) if inputs.ndim == 4 else inputs


@dataclass
class TrainData:
    """Training and validation images, or descriptor sets (same class numbering over both)."""

    train: LabelledImages | LabelledSets
    val: LabelledImages | LabelledSets | None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def load_training_data(cfg: TrainConfig) -> TrainData:
    """Read ``cfg.data``'s images, split them (validation list or seeded per-class split), drop missing files.

    The split is made on the full list before missing files are dropped, so it does not depend on which files
    happen to be present.
    """
    d = cfg.data
    if d.format == "local_sets":
        return load_local_sets_data(cfg)
    if d.format in ("gldv2", "folders") and not d.root:
        raise ConfigError(f"data.root is empty: give the {d.format} dataset folder (data.root=PATH)")
    if d.format == "csv" and not d.csv:
        raise ConfigError("data.format=csv needs data.csv=FILE (rows of path,label)")
    if d.format == "gldv2":
        images = read_gldv2(d.root, d.gldv2_list)
    elif d.format == "folders":
        images = read_class_folders(d.root)
    else:
        images = read_csv_labels(d.csv, d.root or None)
    if d.val_list:
        train_idx, val_idx = split_by_list(images, read_id_list(d.val_list))
    else:
        train_idx, val_idx = split_per_class(images.labels, d.val_fraction, d.split_seed)
    train, val = images.subset(train_idx), images.subset(val_idx) if len(val_idx) else None
    if d.check_files:
        train, missing = train.existing()
        if val is not None:
            val, missing_val = val.existing()
            missing += missing_val
        if missing:
            log.warning(
                "%d listed image(s) do not exist and are left out, e.g. %s",
                len(missing),
                ", ".join(missing[:3]),
            )
    if len(train) == 0:
        raise FileNotFoundError(f"no training images found for data.format={d.format} root={d.root!r}")
    return TrainData(train, val if val is not None and len(val) else None)


def load_local_sets_data(cfg: TrainConfig) -> TrainData:
    """Read a ``local_sets`` folder, split it like images (list or seeded per-class split), drop empty sets.

    As for missing images, the split is made on every listed item before empty ones are dropped.
    """
    d = cfg.data
    if not d.root:
        raise ConfigError(
            "data.root is empty: give the folder written by `tokenret extract-local` (data.root=PATH)"
        )
    sets = read_local_sets(d.root)
    if d.val_list:
        train_idx, val_idx = split_sets_by_list(sets, read_id_list(d.val_list))
    else:
        train_idx, val_idx = split_per_class(sets.labels, d.val_fraction, d.split_seed)
    train, dropped = drop_empty_sets(sets.subset(train_idx))
    val, dropped_val = drop_empty_sets(sets.subset(val_idx))
    if dropped or dropped_val:
        log.warning(
            "%d of %d set(s) have no descriptor (unreadable images?) and are left out (%d training, "
            "%d validation)",
            dropped + dropped_val,
            len(sets),
            dropped,
            dropped_val,
        )
    if len(train) == 0:
        raise FileNotFoundError(f"no training set with descriptors in {d.root}")
    return TrainData(train, val if len(val) else None)


def build_optimizer(model: nn.Module, optim: Any, lr: float) -> torch.optim.SGD:
    """SGD (Nesterov momentum) with two groups: weight decay on weights; none on biases and 1-D params."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]],
        lr=lr,
        momentum=optim.momentum,
        nesterov=bool(optim.nesterov and optim.momentum > 0),
        dampening=0.0,
    )


def _seed_for(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class HookBase:
    """Called by :class:`Trainer` around the loop; ``self.trainer`` is set when registered."""

    trainer: Trainer

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_train(self) -> None: ...

    def close(self) -> None:
        """Release files and writers; called whether training ended normally or not."""


class Trainer:
    """Trains a registered retrieval model with a margin loss, on one or many processes.

    Args:
        cfg: the run's configuration.
        ctx: distributed context; default :func:`~tokenret.train.distributed.init_distributed`.
        data: training/validation images; default read from ``cfg.data``.
        hooks: extra hooks, run after the default ones.
        default_hooks: False leaves only ``hooks`` (no logging, validation or checkpoints).

    Attributes:
        step: optimizer steps done. epoch: epochs done. batch_in_epoch: global batches done in this epoch.
        net: the retrieval model (unwrapped). model: net + margin head. optimizer, scaler, schedule, sampler.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistributedContext | None = None,
        data: TrainData | None = None,
        hooks: list[HookBase] | None = None,
        default_hooks: bool = True,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.ctx = ctx or init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
        self.device = self.ctx.device
        r = cfg.train
        if r.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError(
                "train.amp=fp16 needs a GPU (fp16 compute is very slow on CPUs); use train.amp=bf16"
            )
        if r.amp == "bf16" and self.device.type == "cpu":
            log.warning(
                "train.amp=bf16 on CPU: some PyTorch builds run bf16 convolution backward on a slow fallback "
                "(10x slower than fp32 on the development machine); compare with bench/train.py"
            )
        self.output_dir = Path(r.output_dir)
        self.data = data or load_training_data(cfg)

        torch.manual_seed(r.seed)  # identical initialisation in every process
        # One process per machine fetches ImageNet weights into the shared cache while the others wait.
        first_on_node = self.ctx.local_rank == 0
        if self.ctx.distributed and not first_on_node:
            barrier()
        self.net = self._build_net()
        if self.ctx.distributed and first_on_node:
            barrier()
        self.num_classes = self.data.num_classes
        margin = MARGIN_HEADS[cfg.loss.margin]
        classifier = margin(self.net.descriptor_dim, self.num_classes, s=cfg.loss.s, m=cfg.loss.m)
        if cfg.model.init_checkpoint:
            self._init_classifier(classifier, cfg.model.init_checkpoint)
        model = TrainingModel(self.net, classifier)
        if self.ctx.distributed and r.sync_bn:
            model = convert_sync_batchnorm(model, self.device)
        model.to(self.device)
        if r.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: TrainingModel = model
        self.net = model.net
        self.ddp: DistributedDataParallel | None = None
        if self.ctx.distributed:
            self.ddp = DistributedDataParallel(
                model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=r.find_unused_parameters,
            )
        self.model.train()

        self.train_dataset: LabelledImageDataset | LocalSetDataset
        if isinstance(self.data.train, LabelledSets):
            self.train_dataset = LocalSetDataset(
                self.data.train, cfg.data.set_size, cfg.data.set_keep, seed=r.seed
            )
        else:
            self.train_dataset = LabelledImageDataset(
                self.data.train,
                TrainTransform(
                    cfg.data.image_size,
                    cfg.data.crop_scale,
                    cfg.data.crop_ratio,
                    cfg.data.hflip,
                    cfg.data.color_jitter,
                    cfg.data.color_jitter_p,
                ),
                seed=r.seed,
            )
        self.sampler = GlobalBatchSampler(
            len(self.data.train), r.batch_size, self.ctx.world_size, self.ctx.rank, r.grad_accum, r.seed
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.schedule: WarmupDecaySchedule = schedule_from_config(
            cfg.optim, r.batch_size, self.steps_per_epoch, r.epochs
        )
        self.total_steps = self.schedule.total_steps
        self.optimizer = build_optimizer(self.model, cfg.optim, self.schedule(0))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=r.amp == "fp16")

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}
        self.stopped = False  # True when the run stopped before its end (stop_after_steps, SIGTERM)
        self._stop_signal = False
        self._meters = self._zero_meters()
        self.grad_norm: float | None = None
        # Different dropout / drop-path draws in each process, reproducible from the seed.
        torch.manual_seed(_seed_for(r.seed, 1, self.ctx.rank))

        self._hooks: list[HookBase] = []
        if default_hooks:
            self.register_hooks([MetricsLogger(), PeriodicValidation(), PeriodicCheckpointer()])
        self.register_hooks(hooks or [])

    # ------------------------------------------------------------------------------------------- set-up

    def _build_net(self) -> nn.Module:
        m = self.cfg.model
        kwargs = dict(m.kwargs)
        if is_local_model(m.name):  # HOW / DELF: their own factory, their own key names
            if kwargs:
                raise ConfigError(f"model.kwargs are not supported for {m.name}; got {sorted(kwargs)}")
            net = create_local_model(
                m.name,
                checkpoint=m.init_checkpoint,
                imagenet_weights=bool(m.backbone_weights) and not m.init_checkpoint,
            )
        elif m.init_checkpoint:
            net = create_model(m.name, checkpoint=m.init_checkpoint, **kwargs)
        else:
            if m.backbone_weights and get_model_config(m.name).backbone is not None:
                kwargs["backbone_weights"] = m.backbone_weights
            net = create_model(m.name, **kwargs)
        for prefix in m.freeze:
            hit = [p for n, p in net.named_parameters() if n.startswith(prefix)]
            if not hit:
                raise ConfigError(f"model.freeze: no parameter of {m.name} starts with {prefix!r}")
            for p in hit:
                p.requires_grad_(False)
        # HOW: the reduction layer is PCA-whitening learned when training starts (step 0), frozen from here
        # on so that neither the optimizer nor DDP ever treats it as trained
        self._how_whitening_pending = (
            isinstance(net, HOWNet)
            and not m.init_checkpoint
            and m.how_whitening_images > 0
            and net.dim_reduction is not None
        )
        if self._how_whitening_pending:
            net.dim_reduction.requires_grad_(False)
        return net.train()

    def _learn_how_whitening(self) -> None:
        """HOW's initialisation of its reduction layer, from the first training images (every process
        computes it; rank 0's copy is broadcast so all agree to the bit)."""
        net = self.net
        paths = self.data.train.paths[: self.cfg.model.how_whitening_images]
        mean, std = net.runtime["mean_std"]
        size = int(net.runtime.get("image_size", 1024))
        images = (to_tensor(load_image(p, size), mean, std) for p in paths)
        if self.is_main and self.cfg.train.progress:
            images = tqdm(images, total=len(paths), desc="HOW whitening", unit="img")
        try:  # HOW's recipe: the network without its reduction layer, top-1000 features, scale 1
            n = learn_dim_reduction(net, images, features_num=1000, scales=[1.0])
        except ValueError as e:
            raise ConfigError(
                f"HOW's reduction layer starts as PCA-whitening learned from the first {len(paths)} training "
                f"images (model.how_whitening_images), but {e}: use more or larger images, or set "
                "model.how_whitening_images=0 to train the layer from a random initialisation"
            ) from e
        if self.ctx.distributed:
            for t in (net.dim_reduction.weight, net.dim_reduction.bias):
                torch.distributed.broadcast(t.data, src=0)
        self._how_whitening_pending = False
        self.model.train()
        log.info("HOW reduction layer: PCA-whitening of %d features from %d images, frozen", n, len(paths))

    def _init_classifier(self, classifier: nn.Module, path: str) -> None:
        """Also take the margin head from ``path`` when it fits (same classes), e.g. a release GLDv2 file."""
        loaded = ck.read_checkpoint(path)
        weight = (loaded.extra.get("classifier") or {}).get("weight")
        if weight is None:
            weight = loaded.state_dict.get("classifier.weight")
        if weight is not None and tuple(weight.shape) == tuple(classifier.weight.shape):
            with torch.no_grad():
                classifier.weight.copy_(weight)
            log.info("margin head initialised from %s", path)
        elif weight is not None:
            log.info(
                "%s has a margin head of shape %s; this run needs %s: starting it afresh",
                path,
                tuple(weight.shape),
                tuple(classifier.weight.shape),
            )

    def register_hooks(self, hooks: list[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
            self._hooks.append(h)

    @property
    def train_module(self) -> nn.Module:
        """What the forward pass goes through: the DDP wrapper when distributed."""
        return self.ddp if self.ddp is not None else self.model

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    # --------------------------------------------------------------------------------------- checkpoints

    def state_extra(self) -> dict[str, Any]:
        """Everything but the model weights that a checkpoint holds (collective: call on every process)."""
        rng = all_gather_objects(_rng_state(self.device))
        return {
            "training_state": TRAINING_STATE_VERSION,
            "classifier": self.model.classifier.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch, "start": self.batch_in_epoch},
            "rng": rng,
            "world_size": self.ctx.world_size,
            "config": config_to_dict(self.cfg),
            "best": dict(self.best) if self.best else None,
            "metrics": dict(self.last_metrics),
            "class_names": list(self.data.train.class_names),
        }

    def save_checkpoint(self, name: str) -> Path | None:
        """Write ``output_dir/name`` (rank 0); every process must call it. Returns the path on rank 0."""
        extra = self.state_extra()
        path = None
        if self.is_main:
            path = ck.save_checkpoint(self.net, self.output_dir / name, **extra)
        barrier()
        return path

    def resume_or_load(self, resume: bool | str | Path = True) -> bool:
        """Continue a run, or start one.

        Args:
            resume: True resumes from ``output_dir/last.pth`` if it exists (else starts fresh); a path resumes
                from that file; False starts fresh (``model.init_checkpoint``, if set, was loaded at build).

        Returns:
            True if training state was restored.
        """
        if resume is False:
            return False
        path = self.output_dir / "last.pth" if resume is True else Path(resume)
        if not path.is_file():
            if resume is True:
                log.info("no checkpoint at %s: starting a new run", path)
                return False
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        self.load_training_state(path)
        return True

    def load_training_state(self, path: str | Path) -> None:
        """Restore model, head, optimizer, scaler, position and RNG states from a training checkpoint."""
        loaded = ck.read_checkpoint(path)
        extra = loaded.extra
        if extra.get("training_state") is None:
            raise ck.CheckpointError(
                f"{path} holds model weights but no training state; to start from it use "
                f"model.init_checkpoint={path}"
            )
        if loaded.model_name and loaded.model_name != self.cfg.model.name:
            raise ck.CheckpointError(
                f"{path} was trained as {loaded.model_name!r}, not {self.cfg.model.name!r}"
            )
        old_cfg = extra.get("config") or {}
        changed = config_diff(old_cfg, config_to_dict(self.cfg))
        harmless = [c for c in changed if c.split(":")[0] in RUN_CONTROL_KEYS]
        changed = [c for c in changed if c not in harmless]
        if harmless:
            log.info("resuming with other run settings: %s", "; ".join(harmless))
        if changed:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(changed))
        self.net.load_state_dict(loaded.state_dict, strict=True)
        self.model.classifier.load_state_dict(extra["classifier"])
        self.optimizer.load_state_dict(extra["optimizer"])
        if extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])
        self.step = int(extra["step"])
        self.epoch = int(extra["epoch"])
        self.batch_in_epoch = int(extra["batch_in_epoch"])
        saved = extra.get("sampler") or {}
        if saved.get("n") not in (None, self.sampler.n) or saved.get("seed") not in (None, self.sampler.seed):
            log.warning(
                "training set or seed changed since the checkpoint (n %s -> %s, seed %s -> %s)",
                saved.get("n"),
                self.sampler.n,
                saved.get("seed"),
                self.sampler.seed,
            )
        if self.batch_in_epoch > self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.best = extra.get("best")
        self.last_metrics = dict(extra.get("metrics") or {})
        rng = extra.get("rng") or []
        if len(rng) == self.ctx.world_size:
            _set_rng_state(rng[self.ctx.rank], self.device)
        else:
            log.warning(
                "checkpoint was written by %d process(es), this run has %d: RNG streams are re-seeded",
                len(rng),
                self.ctx.world_size,
            )
            torch.manual_seed(_seed_for(self.cfg.train.seed, 2, self.step, self.ctx.rank))
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batch_in_epoch,
        )

    # ---------------------------------------------------------------------------------------------- loop

    def _zero_meters(self) -> dict[str, Tensor]:
        return {
            k: torch.zeros((), dtype=torch.float64, device=self.device) for k in ("loss", "correct", "seen")
        }

    def pop_meters(self) -> dict[str, float]:
        """Training loss and top-1 since the last call, over all processes (collective)."""
        m = torch.stack([self._meters["loss"], self._meters["correct"], self._meters["seen"]])
        all_reduce_sum(m)
        self._meters = self._zero_meters()
        loss, correct, seen = (float(v) for v in m.cpu())
        return {"loss": loss / max(seen, 1), "top1": correct / max(seen, 1), "images": seen}

    def learning_rate(self) -> float:
        return self.schedule(self.step)

    def run_step(self, micro_batches: list[tuple[Inputs, Tensor]]) -> None:
        """One optimizer step over this process's micro-batches of the current global batch."""
        r = self.cfg.train
        lr = self.schedule(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        fmt = torch.channels_last if r.channels_last else torch.contiguous_format
        accum = len(micro_batches)
        non_blocking = self.device.type == "cuda"
        dtype = next(self.net.parameters()).dtype  # float32, or float64 for numerical checks
        for a, (x, y) in enumerate(micro_batches):
            x = _to_device(x, self.device, dtype, fmt, non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            sync = self.ddp.no_sync() if self.ddp is not None and a < accum - 1 else contextlib.nullcontext()
            with sync:
                with _autocast(self.device, r.amp):
                    logits = self.train_module(x, y)
                loss = F.cross_entropy(logits.float(), y)
                self.scaler.scale(loss / accum).backward()
            with torch.no_grad():
                n = y.numel()
                self._meters["loss"] += loss.detach().double() * n
                self._meters["correct"] += (logits.detach().argmax(1) == y).sum()
                self._meters["seen"] += n
        if self.cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _loader(self) -> DataLoader:
        d = self.cfg.data
        return DataLoader(
            self.train_dataset,
            batch_sampler=self.sampler,
            num_workers=d.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if d.num_workers > 0 else None,
            # Worker seeds come from this generator, not the global RNG that drives dropout (exact resumes).
            generator=torch.Generator().manual_seed(_seed_for(self.cfg.train.seed, 3, self.epoch)),
        )

    def request_stop(self) -> None:
        """Stop after the current step with a checkpoint (e.g. from a SIGTERM handler)."""
        self._stop_signal = True

    def _should_stop(self) -> bool:
        limit = self.cfg.train.stop_after_steps
        if limit is not None and self.step >= limit:
            return True
        if self.ctx.distributed:
            # Agree on signals only at log steps (a collective per step would cost a synchronisation).
            if self.step % self.cfg.train.log_every:
                return False
            flag = torch.tensor(float(self._stop_signal), device=self.device)
            all_reduce_sum(flag)
            return bool(flag.item() > 0)
        return self._stop_signal

    def train(self) -> None:
        """Run from the current position to the end (or until stopped), calling the hooks."""
        r = self.cfg.train
        previous = None
        if self.step >= self.total_steps:
            log.warning(
                "this run already finished (step %d of %d): nothing to train", self.step, self.total_steps
            )
            return
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        if self.step == 0 and self._how_whitening_pending:
            self._learn_how_whitening()
        with contextlib.suppress(ValueError):  # only possible in the main thread
            previous = signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        try:
            for h in self._hooks:
                h.before_train()
            while self.epoch < r.epochs and not self.stopped:
                self.train_dataset.set_epoch(self.epoch)
                self.sampler.set_epoch(self.epoch)
                self.sampler.set_start(self.batch_in_epoch)
                batches = iter(self._loader())
                while self.batch_in_epoch < self.steps_per_epoch:
                    micro = [next(batches) for _ in range(r.grad_accum)]
                    for h in self._hooks:
                        h.before_step()
                    self.run_step(micro)
                    self.step += 1
                    self.batch_in_epoch += 1
                    for h in self._hooks:
                        h.after_step()
                    if self._should_stop():
                        self.stopped = self.step < self.total_steps
                        break
                del batches
                if self.batch_in_epoch >= self.steps_per_epoch:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    for h in self._hooks:
                        h.after_epoch()
            for h in self._hooks:
                h.after_train()
            # every rank returns together: none tears its process group down while another still works
            # (a rank leaving early once aborted in gloo's teardown: "terminate called without an active
            # exception"); not on the error path, where a barrier could wait for a rank that died
            barrier()
        finally:
            for h in self._hooks:
                h.close()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    # ------------------------------------------------------------------------------------------ validation

    def validation_metric_names(self) -> list[str]:
        v = self.cfg.val
        names = []
        if v.classification and self.data.val is not None:
            names += ["val/loss", "val/top1", "val/top5", "val/top1_cosine"]
        for ds in v.retrieval_datasets:
            names += [f"{ds}/map_easy", f"{ds}/map_medium", f"{ds}/map_hard"]
        return names

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Classification and retrieval validation (collective); every process gets the same metrics."""
        metrics: dict[str, float] = {}
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # Validation must not move the training RNG streams, or a resumed run would differ.
        with torch.random.fork_rng(devices=devices):
            try:
                if self.cfg.val.classification and self.data.val is not None:
                    metrics.update(self._validate_classification())
                if self.cfg.val.retrieval_datasets:
                    metrics.update(self._validate_retrieval())
            finally:
                self.model.train()
        self.last_metrics = metrics
        return metrics

    def _validate_classification(self) -> dict[str, float]:
        v, d = self.cfg.val, self.cfg.data
        images = self.data.val
        idx = np.arange(len(images))
        if v.max_images is not None and v.max_images < len(idx):
            idx = np.sort(
                np.random.default_rng(self.cfg.train.seed).choice(len(idx), v.max_images, replace=False)
            )
        idx = idx[self.ctx.rank :: self.ctx.world_size]
        if isinstance(images, LabelledSets):
            ds = LocalSetDataset(images.subset(idx), d.set_size, keep=None)
        else:
            ds = LabelledImageDataset(images.subset(idx), ValTransform(d.image_size, d.val_resize))
        loader = DataLoader(
            ds, batch_size=v.batch_size, num_workers=d.num_workers, pin_memory=self.device.type == "cuda"
        )
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, top1, top5, top1 cosine, n
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        k = min(5, self.num_classes)
        for x, y in loader:
            x = _to_device(x, self.device, None, fmt)
            y = y.to(self.device)
            with _autocast(self.device, self.cfg.train.amp):
                feats = forward_features(self.net, x)
            feats = feats.float()
            logits = self.model.classifier(feats, y)
            cos = self.model.classifier.cosine(feats)
            top = logits.topk(k, dim=1).indices
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (top[:, 0] == y).sum()
            sums[2] += (top == y[:, None]).any(1).sum()
            sums[3] += (cos.argmax(1) == y).sum()
            sums[4] += y.numel()
        all_reduce_sum(sums)
        n = max(float(sums[4]), 1.0)
        loss, top1, top5, top1c = (float(s) / n for s in sums[:4])
        return {"val/loss": loss, "val/top1": top1, "val/top5": top5, "val/top1_cosine": top1c}

    def _validate_retrieval(self) -> dict[str, float]:
        from tokenret.data.revisited import RevisitedDataset
        from tokenret.evaluate import compute_revisited_map, ranks_from_scores
        from tokenret.extraction import ExtractionConfig, extract_descriptors

        v, r = self.cfg.val, self.cfg.train
        amp = r.amp if (r.amp != "fp16" or self.device.type == "cuda") else "off"
        config = ExtractionConfig(
            max_size=v.retrieval_max_size,
            scales=tuple(v.retrieval_scales),
            batch_size=v.batch_size,
            num_workers=self.cfg.data.num_workers,
            amp=amp,
            channels_last=r.channels_last,
            device=str(self.device),
        )
        metrics: dict[str, float] = {}
        progress = r.progress and self.is_main
        for name in v.retrieval_datasets:
            ds = RevisitedDataset.from_root(v.retrieval_root, name)
            db_paths = [ds.image_path(i) for i in range(len(ds.imlist))]
            q_paths = [ds.query_path(i) for i in range(len(ds.qimlist))]
            boxes = [ds.query_box(i) if "bbx" in ds.gnd[i] else None for i in range(len(ds.qimlist))]
            cache = None
            if self.ctx.distributed:  # shards are shared through the output folder
                cache = self.output_dir / "val_descriptors" / f"step_{self.step:08d}" / name
            db = extract_descriptors(
                self.net,
                db_paths,
                None,
                config,
                None if cache is None else cache / "db",
                progress=progress,
                desc=f"{name} db",
            ).descriptors
            q = extract_descriptors(
                self.net,
                q_paths,
                boxes,
                config,
                None if cache is None else cache / "q",
                progress=progress,
                desc=f"{name} q",
            ).descriptors
            res = compute_revisited_map(ranks_from_scores(db @ q.T), ds.gnd)
            for proto in ("easy", "medium", "hard"):
                metrics[f"{name}/map_{proto}"] = float(res[proto]["map"])
        if self.ctx.distributed:
            barrier()
            if self.is_main:
                shutil.rmtree(self.output_dir / "val_descriptors", ignore_errors=True)
        return broadcast_object(metrics)

    def is_better(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.cfg.val.best_mode == "max" else value < self.best["value"]


# ------------------------------------------------------------------------------------------------- hooks


class MetricsLogger(HookBase):
    """Progress bar, ``log.jsonl`` records and TensorBoard scalars (train/loss, train/lr, train/top1,
    train/images_per_s, and every validation metric). Only rank 0 writes; all ranks join the reductions."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.writer: Any = None
        self.jsonl: Any = None
        self._t = 0.0
        self._t_step = 0

    def before_train(self) -> None:
        t = self.trainer
        r = t.cfg.train
        if t.is_main:
            t.output_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(t.output_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if r.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(t.output_dir / "tensorboard"), purge_step=t.step or None)
                except ImportError:
                    log.warning(
                        "tensorboard is not installed: no TensorBoard scalars (pip install tensorboard)"
                    )
            self.bar = tqdm(
                total=t.total_steps,
                initial=t.step,
                desc="train",
                unit="step",
                disable=not r.progress,
                dynamic_ncols=True,
            )
        self._t, self._t_step = time.perf_counter(), t.step

    def write(self, record: dict[str, Any]) -> None:
        t = self.trainer
        if not t.is_main:
            return
        # NaN (e.g. the Hard mAP of a dataset without hard positives) is not JSON: written as null.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            prefix = "train/" if record.get("kind") == "train" else ""
            for k, v in record.items():
                if k not in ("kind", "step", "epoch", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(prefix + k, v, record["step"])
            self.writer.flush()

    def after_step(self) -> None:
        t = self.trainer
        if self.bar is not None:
            self.bar.update(1)
        if t.step % t.cfg.train.log_every and t.step != t.total_steps:
            return
        m = t.pop_meters()
        now = time.perf_counter()
        ips = m["images"] / max(now - self._t, 1e-9)
        self._t, self._t_step = now, t.step
        record = {
            "kind": "train",
            "step": t.step,
            "epoch": t.step / t.steps_per_epoch,
            "loss": m["loss"],
            "lr": t.schedule(t.step - 1),
            "top1": m["top1"],
            "images_per_s": ips,
            "time": time.time(),
        }
        if t.grad_norm is not None:
            record["grad_norm"] = t.grad_norm
        if not math.isfinite(m["loss"]):
            if t.cfg.train.amp != "fp16":  # fp16 steps with inf/nan are skipped by the loss scaler
                raise FloatingPointError(
                    f"training loss is {m['loss']} at step {t.step}; lower optim.base_lr, set "
                    "optim.clip_grad_norm, or check the data"
                )
        self.write(record)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{m['loss']:.3f}", lr=f"{record['lr']:.2e}", top1=f"{m['top1']:.3f}", ips=f"{ips:.1f}"
            )

    def log_validation(self, metrics: dict[str, float]) -> None:
        t = self.trainer
        self.write(
            {
                "kind": "val",
                "step": t.step,
                "epoch": t.step / t.steps_per_epoch,
                **metrics,
                "time": time.time(),
            }
        )
        if t.is_main and metrics:
            log.info(
                "validation at step %d: %s", t.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.writer = self.jsonl = None


class PeriodicValidation(HookBase):
    """Validates every ``val.every_epochs`` epochs, every ``val.every_steps`` steps and at the end; keeps
    ``best.pth`` for the best ``val.best_metric`` (each validation computes it once, over the whole split)."""

    def __init__(self) -> None:
        self.last_step: int | None = None

    def before_train(self) -> None:
        t = self.trainer
        names = t.validation_metric_names()
        if names and t.cfg.val.best_metric not in names:
            raise ConfigError(
                f"val.best_metric={t.cfg.val.best_metric!r} is not computed by this run; "
                f"choose one of {', '.join(names)}"
            )

    def run(self) -> dict[str, float]:
        t = self.trainer
        if not t.validation_metric_names():
            return {}
        metrics = t.validate()
        self.last_step = t.step
        for h in t._hooks:
            if isinstance(h, MetricsLogger):
                h.log_validation(metrics)
        value = metrics.get(t.cfg.val.best_metric)
        if value is not None and t.is_better(value):
            t.best = {"metric": t.cfg.val.best_metric, "value": value, "step": t.step, "epoch": t.epoch}
            t.save_checkpoint("best.pth")
        return metrics

    def after_step(self) -> None:
        n = self.trainer.cfg.val.every_steps
        if n and self.trainer.step % n == 0:
            self.run()

    def after_epoch(self) -> None:
        t = self.trainer
        n = t.cfg.val.every_epochs
        if n and t.epoch % n == 0 and self.last_step != t.step:
            self.run()

    def after_train(self) -> None:
        t = self.trainer
        if not t.stopped and self.last_step != t.step:
            self.run()


class PeriodicCheckpointer(HookBase):
    """``last.pth`` every ``train.checkpoint_every_steps`` steps, at each epoch end and when stopping;
    ``epoch_XXX.pth`` at each epoch end (keeping the newest ``train.keep_epoch_checkpoints``)."""

    def __init__(self) -> None:
        self.last_saved: tuple | None = None

    def save_last(self) -> None:
        t = self.trainer
        state = (t.step, t.epoch, t.batch_in_epoch, None if t.best is None else t.best["value"])
        if self.last_saved != state:
            t.save_checkpoint("last.pth")
            self.last_saved = state

    def after_step(self) -> None:
        n = self.trainer.cfg.train.checkpoint_every_steps
        if n and self.trainer.step % n == 0:
            self.save_last()

    def after_epoch(self) -> None:
        t = self.trainer
        self.save_last()
        keep = t.cfg.train.keep_epoch_checkpoints
        if keep == 0 or not t.is_main:
            return
        src = t.output_dir / "last.pth"
        dst = t.output_dir / f"epoch_{t.epoch:03d}.pth"
        tmp = dst.with_name(dst.name + ".tmp")
        try:
            os.link(src, tmp)  # same bytes as last.pth: a hard link costs no space or time
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        if keep > 0:
            epochs = sorted(t.output_dir.glob("epoch_*.pth"))
            for old in epochs[:-keep]:
                old.unlink(missing_ok=True)

    def after_train(self) -> None:
        self.save_last()


def config_of_checkpoint(path: str | Path) -> TrainConfig:
    """The TrainConfig saved inside a training checkpoint."""
    loaded = ck.read_checkpoint(path)
    cfg = loaded.extra.get("config")
    if not cfg:
        raise ck.CheckpointError(f"{path} holds no training config (not written by tokenret train)")
    return config_from_dict(cfg, str(path))
