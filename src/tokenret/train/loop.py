"""The training loop: a Trainer that runs optimizer steps and calls its hooks around them.

One optimizer step takes one global batch (``train.batch_size`` images over all processes and
gradient-accumulation micro-batches): for each micro-batch, margin logits of the un-normalised descriptor
and mean cross-entropy divided by ``grad_accum``; then optional clipping, the SGD step at the learning rate
of :mod:`tokenret.train.schedule` for that step. Under DDP, gradients are averaged over processes, so the
update equals one process taking the whole global batch (BatchNorm statistics included, when
``train.sync_bn``).

The rest of the engine lives beside it: :mod:`~tokenret.train.data` (images and datasets),
:mod:`~tokenret.train.build` (network, margin head, optimizer), :mod:`~tokenret.train.state` (checkpoints
that ``resume_or_load`` continues exactly, RNG states), :mod:`~tokenret.train.validation`,
:mod:`~tokenret.train.hooks` (logging, validation, checkpoints) and :mod:`~tokenret.train.metrics` (the sink
every metric goes through). Checkpoints (``last.pth``, ``epoch_XXX.pth``, ``best.pth`` in
``train.output_dir``) are tokenret checkpoints that :func:`tokenret.create_model` loads directly.

Example:
    >>> from tokenret.train import Trainer, load_config
    >>> cfg = load_config("configs/tiny_cpu.yaml", ["data.root=my_images"])   # doctest: +SKIP
    >>> trainer = Trainer(cfg)                                                # doctest: +SKIP
    >>> trainer.resume_or_load(resume=True)                                   # doctest: +SKIP
    >>> trainer.train()                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from tokenret.data.augment import LabelledImageDataset
from tokenret.data.local_sets import LocalSetDataset
from tokenret.train.build import (
    TrainingModel,
    autocast,
    build_classifier,
    build_net,
    build_optimizer,
    build_training_model,
    learn_how_whitening,
    needs_how_whitening,
)
from tokenret.train.config import ConfigError, TrainConfig, config_to_yaml
from tokenret.train.data import Inputs, TrainData, build_train_dataset, inputs_to_device, load_training_data
from tokenret.train.distributed import (
    DistributedContext,
    GlobalBatchSampler,
    all_reduce_sum,
    barrier,
    init_distributed,
)
from tokenret.train.hooks import HookBase, MetricsLogger, PeriodicCheckpointer, PeriodicValidation
from tokenret.train.metrics import MetricSink
from tokenret.train.schedule import WarmupDecaySchedule, schedule_from_config
from tokenret.train.state import load_training_state, save_training_checkpoint, seed_for, training_state
from tokenret.train.validation import Validator

__all__ = ["Trainer"]

log = logging.getLogger(__name__)


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
        metrics: the metric sink; the loop reports training metrics every ``train.log_every`` steps and at
            the end, hooks report theirs through :meth:`log_metrics`, writers subscribe to it.
        validator: the run's :class:`~tokenret.train.validation.Validator` (handed to PeriodicValidation).
        best: the best validation so far (metric, value, step, epoch), or None.
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
                "train.amp=bf16 on CPU: some PyTorch builds run bf16 convolution backward on a slow "
                "fallback, slower than fp32 (see bench/README.md; measure with bench/train.py)"
            )
        self.output_dir = Path(r.output_dir)
        self.data = data or load_training_data(cfg)

        torch.manual_seed(r.seed)  # identical initialisation in every process
        # One process per machine fetches ImageNet weights into the shared cache while the others wait.
        first_on_node = self.ctx.local_rank == 0
        if self.ctx.distributed and not first_on_node:
            barrier()
        net = build_net(cfg.model)
        if self.ctx.distributed and first_on_node:
            barrier()
        # HOW: the reduction layer is learned when training starts (step 0); build_net froze it
        self.how_whitening_pending = needs_how_whitening(net, cfg.model)
        self.num_classes = self.data.num_classes
        classifier = build_classifier(
            cfg.loss, net.descriptor_dim, self.num_classes, cfg.model.init_checkpoint
        )
        self.model: TrainingModel = build_training_model(net, classifier, r, self.ctx)
        self.net = self.model.net
        self.ddp: DistributedDataParallel | None = None
        if self.ctx.distributed:
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=r.find_unused_parameters,
            )
        self.model.train()

        self.train_dataset: LabelledImageDataset | LocalSetDataset = build_train_dataset(cfg, self.data.train)
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
        self.metrics = MetricSink()
        self.validator = Validator(cfg, self.model, self.data.val, self.ctx, self.output_dir)
        self.stopped = False  # True when the run stopped before its end (stop_after_steps, SIGTERM)
        self._stop_signal = False
        self._meters = self._zero_meters()
        self._report_time = time.perf_counter()
        self.grad_norm: float | None = None
        # Different dropout / drop-path draws in each process, reproducible from the seed.
        torch.manual_seed(seed_for(r.seed, 1, self.ctx.rank))

        self._hooks: list[HookBase] = []
        if default_hooks:
            self.register_hooks([MetricsLogger(), PeriodicValidation(self.validator), PeriodicCheckpointer()])
        self.register_hooks(hooks or [])

    # ------------------------------------------------------------------------------------------- set-up

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

    # ------------------------------------------------------------------------------------------- metrics

    def log_metrics(self, kind: str, values: dict[str, Any]) -> None:
        """Report metrics of the current step to the sink (``kind``: ``"train"``, ``"val"``, ...)."""
        self.metrics.put(
            {
                "kind": kind,
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                **values,
                "time": time.time(),
            }
        )

    @property
    def last_metrics(self) -> dict[str, float]:
        """The latest validation metrics (restored on resume)."""
        return self.metrics.latest("val")

    # --------------------------------------------------------------------------------------- checkpoints

    def state_extra(self) -> dict[str, Any]:
        """Everything but the model weights that a checkpoint holds (collective: call on every process)."""
        return training_state(self)

    def save_checkpoint(self, name: str) -> Path | None:
        """Write ``output_dir/name`` (rank 0); every process must call it. Returns the path on rank 0."""
        return save_training_checkpoint(self, self.output_dir / name)

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
        load_training_state(self, path)

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

    def report_training_metrics(self) -> None:
        """Put loss, learning rate, top-1 and images/s since the last report into the sink (collective).

        Raises:
            FloatingPointError: the loss is not finite (except under fp16, whose loss scaler skips such
                steps).
        """
        m = self.pop_meters()
        now = time.perf_counter()
        ips = m["images"] / max(now - self._report_time, 1e-9)
        self._report_time = now
        values: dict[str, Any] = {
            "loss": m["loss"],
            "lr": self.schedule(self.step - 1),
            "top1": m["top1"],
            "images_per_s": ips,
        }
        if self.grad_norm is not None:
            values["grad_norm"] = self.grad_norm
        if not math.isfinite(m["loss"]) and self.cfg.train.amp != "fp16":
            raise FloatingPointError(
                f"training loss is {m['loss']} at step {self.step}; lower optim.base_lr, set "
                "optim.clip_grad_norm, or check the data"
            )
        self.log_metrics("train", values)

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
            x = inputs_to_device(x, self.device, dtype, fmt, non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            sync = self.ddp.no_sync() if self.ddp is not None and a < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast(self.device, r.amp):
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
            generator=torch.Generator().manual_seed(seed_for(self.cfg.train.seed, 3, self.epoch)),
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
        if self.step == 0 and self.how_whitening_pending:
            paths = self.data.train.paths[: self.cfg.model.how_whitening_images]
            learn_how_whitening(
                self.net, paths, distributed=self.ctx.distributed, progress=self.is_main and r.progress
            )
            self.how_whitening_pending = False
            self.model.train()
        with contextlib.suppress(ValueError):  # only possible in the main thread
            previous = signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        try:
            for h in self._hooks:
                h.before_train()
            self._report_time = time.perf_counter()
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
                    if self.step % r.log_every == 0 or self.step == self.total_steps:
                        self.report_training_metrics()
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
