"""Training: configuration, learning-rate schedule, distributed set-up, and the engine with its hooks.

Example:
    >>> from tokenret.train import Trainer, load_config
    >>> cfg = load_config("configs/token_r101_gldv2.yaml", ["data.root=/data/gldv2"])  # doctest: +SKIP
    >>> trainer = Trainer(cfg)                                                         # doctest: +SKIP
    >>> trainer.resume_or_load(resume=True)                                            # doctest: +SKIP
    >>> trainer.train()                                                                # doctest: +SKIP
"""

from tokenret.train.config import ConfigError, TrainConfig, apply_overrides, config_to_dict, load_config
from tokenret.train.loop import HookBase, Trainer, TrainingModel
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
