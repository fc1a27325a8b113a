"""Per-step learning-rate schedule: linear warm-up, then cosine or linear decay to a final value.

The release builds its schedule as an array (``np.linspace`` warm-up, inclusive of both ends, followed by
a half cosine) and reads it after incrementing the step counter, so its step ``t`` runs at entry ``t + 1``
(one step ahead: the first step skips the warm-up's start value) and its last step indexes past the end and
crashes. Here step ``t`` runs at entry ``t`` of the same curve (the values agree with the release's array to
float rounding), given as a closed form of ``t`` (0-based, t < total_steps):

* warm-up, ``t < W``: ``start + (peak - start) * t / (W - 1)`` (``start`` when W == 1) — the release's
  inclusive ``np.linspace(start, peak, W)``, so step W - 1 already runs at the peak;
* decay, ``t >= W``, with ``u = (t - W) / (total_steps - W)`` in [0, 1):
  cosine ``final + (peak - final) * (1 + cos(pi * u)) / 2`` or linear ``peak + (final - peak) * u``.

Example:
    >>> s = WarmupDecaySchedule(peak_lr=0.1, total_steps=10, warmup_steps=2, start_lr=0.001)
    >>> [round(s(t), 4) for t in (0, 1, 2, 9)]
    [0.001, 0.1, 0.1, 0.0038]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WarmupDecaySchedule", "peak_learning_rate", "schedule_from_config"]


@dataclass(frozen=True)
class WarmupDecaySchedule:
    """Learning rate as a function of the optimizer step (see the module docstring for the formula).

    Args:
        peak_lr: learning rate at the end of the warm-up.
        total_steps: optimizer steps in the whole run.
        warmup_steps: steps of the linear warm-up (clipped to total_steps).
        start_lr: learning rate of the first warm-up step.
        final_lr: value the decay tends to (reached after the last step).
        decay: "cosine" or "linear".
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    start_lr: float = 0.0
    final_lr: float = 0.0
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {self.decay!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def __call__(self, step: int) -> float:
        w = min(self.warmup_steps, self.total_steps)
        step = min(max(int(step), 0), self.total_steps - 1)
        if step < w:
            if w == 1:  # np.linspace(start, peak, 1) == [start]
                return self.start_lr
            return self.start_lr + (self.peak_lr - self.start_lr) * step / (w - 1)
        u = (step - w) / (self.total_steps - w)
        if self.decay == "cosine":
            return self.final_lr + (self.peak_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * u))
        return self.peak_lr + (self.final_lr - self.peak_lr) * u

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_learning_rate(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule on the GLOBAL batch: ``base_lr * global_batch / reference_batch``."""
    return base_lr * global_batch / reference_batch


def schedule_from_config(
    optim: Any, global_batch: int, steps_per_epoch: int, epochs: int
) -> WarmupDecaySchedule:
    """The schedule of an :class:`~tokenret.train.config.OptimConfig` for a run of ``epochs`` epochs."""
    scale = global_batch / optim.reference_batch
    peak = optim.base_lr * scale
    return WarmupDecaySchedule(
        peak_lr=peak,
        total_steps=max(1, steps_per_epoch * epochs),
        warmup_steps=int(round(optim.warmup_epochs * steps_per_epoch)),
        start_lr=peak * optim.warmup_start_factor,
        final_lr=optim.final_lr * scale,
        decay=optim.decay,
    )
