"""Training: configuration, learning-rate schedule, distributed set-up, and the engine with its hooks.

The engine, detectron2 style: :mod:`.data` (training images, datasets), :mod:`.build` (network, margin
head, optimizer), :mod:`.state` (checkpointed training state, RNG), :mod:`.validation`, :mod:`.hooks`,
:mod:`.metrics` (the metric sink) and :mod:`.loop` (the Trainer).

Example:
    >>> from tokenret.train import Trainer, load_config
    >>> cfg = load_config("configs/token_r101_gldv2.yaml", ["data.root=/data/gldv2"])  # doctest: +SKIP
    >>> trainer = Trainer(cfg)                                                         # doctest: +SKIP
    >>> trainer.resume_or_load(resume=True)                                            # doctest: +SKIP
    >>> trainer.train()                                                                # doctest: +SKIP
"""

from tokenret.train.build import TrainingModel
from tokenret.train.config import ConfigError, TrainConfig, apply_overrides, config_to_dict, load_config
from tokenret.train.hooks import HookBase
from tokenret.train.loop import Trainer
from tokenret.train.schedule import WarmupDecaySchedule, peak_learning_rate

__all__ = [
    "ConfigError",
    "HookBase",
    "TrainConfig",
    "Trainer",
    "TrainingModel",
    "WarmupDecaySchedule",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "peak_learning_rate",
]
