"""Hooks (detectron2 style): what runs around the training loop without being the loop.

A hook sees the trainer at ``before_train``, ``before_step``, ``after_step``, ``after_epoch`` and
``after_train``, and ``close`` releases what it holds whether training ended normally or not. The defaults
are :class:`MetricsLogger` (progress bar, JSON lines, TensorBoard), :class:`PeriodicValidation`
(classification and retrieval validation, best-checkpoint choice) and :class:`PeriodicCheckpointer`.

Hooks never look each other up: they share results through the trainer, whose metric sink
(``trainer.metrics``, fed by ``trainer.log_metrics``) takes every metric the loop and the hooks report, and
whose ``best`` holds the best validation so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any

from tqdm.auto import tqdm

from tokenret.train.config import ConfigError
from tokenret.train.metrics import RECORD_FIELDS
from tokenret.train.validation import Validator

__all__ = ["HookBase", "MetricsLogger", "PeriodicCheckpointer", "PeriodicValidation"]

log = logging.getLogger(__name__)


class HookBase:
    """Called by :class:`~tokenret.train.loop.Trainer` around the loop; ``self.trainer`` is set when
    registered.

    Example:
        >>> class PrintLoss(HookBase):
        ...     def after_epoch(self):
        ...         print(self.trainer.epoch, self.trainer.metrics.latest("train").get("loss"))
        >>> trainer.register_hooks([PrintLoss()])  # doctest: +SKIP
    """

    #: The :class:`~tokenret.train.loop.Trainer` that registered the hook (typed loosely: the loop imports the
    #: hooks, so the hooks cannot import the loop without an import cycle).
    trainer: Any

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_train(self) -> None: ...

    def close(self) -> None:
        """Release files and writers; called whether training ended normally or not."""


class MetricsLogger(HookBase):
    """Writes every record of the trainer's metric sink: ``log.jsonl`` lines, TensorBoard scalars (training
    ones under ``train/``) and the progress bar. Only rank 0 writes."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.writer: Any = None
        self.jsonl: Any = None

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
        t.metrics.add_writer(self.write)

    def write(self, record: dict[str, Any]) -> None:
        """Write one record of the metric sink (rank 0 only)."""
        if not self.trainer.is_main:
            return
        values = {k: v for k, v in record.items() if k not in RECORD_FIELDS}
        # NaN (e.g. the Hard mAP of a dataset without hard positives) is not JSON: written as null.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(clean) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            prefix = "train/" if clean.get("kind") == "train" else ""
            for k, v in clean.items():
                if k not in RECORD_FIELDS and isinstance(v, (int, float)):
                    self.writer.add_scalar(prefix + k, v, clean["step"])
            self.writer.flush()
        if record.get("kind") == "train" and self.bar is not None:
            self.bar.set_postfix(
                loss=f"{values['loss']:.3f}",
                lr=f"{values['lr']:.2e}",
                top1=f"{values['top1']:.3f}",
                ips=f"{values['images_per_s']:.1f}",
            )
        elif record.get("kind") == "val" and values:
            log.info(
                "validation at step %d: %s",
                record["step"],
                ", ".join(f"{k} {v:.4f}" for k, v in values.items()),
            )

    def after_step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        self.trainer.metrics.remove_writer(self.write)
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.writer = self.jsonl = None


class PeriodicValidation(HookBase):
    """Validates every ``val.every_epochs`` epochs, every ``val.every_steps`` steps and at the end; reports
    the metrics to the trainer's sink and keeps ``best.pth`` for the best ``val.best_metric`` (each
    validation computes it once, over the whole split).

    Args:
        validator: what validates (called with the step, returns the metrics), e.g. the trainer's
            :class:`~tokenret.train.validation.Validator`.
    """

    def __init__(self, validator: Validator) -> None:
        self.validator = validator
        self.last_step: int | None = None

    def before_train(self) -> None:
        best_metric = self.trainer.cfg.val.best_metric
        names = self.validator.metric_names
        if names and best_metric not in names:
            raise ConfigError(
                f"val.best_metric={best_metric!r} is not computed by this run; "
                f"choose one of {', '.join(names)}"
            )

    def is_better(self, value: float | None) -> bool:
        """Whether ``value`` of ``val.best_metric`` beats the trainer's best so far (NaN never does)."""
        t = self.trainer
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if t.best is None:
            return True
        return value > t.best["value"] if t.cfg.val.best_mode == "max" else value < t.best["value"]

    def run(self) -> dict[str, float]:
        """Validate now, report the metrics, and save ``best.pth`` if they are the best so far."""
        t = self.trainer
        if not self.validator.metric_names:
            return {}
        metrics = self.validator(t.step)
        self.last_step = t.step
        t.log_metrics("val", metrics)
        best_metric = t.cfg.val.best_metric
        value = metrics.get(best_metric)
        if value is not None and self.is_better(value):
            t.best = {"metric": best_metric, "value": value, "step": t.step, "epoch": t.epoch}
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
