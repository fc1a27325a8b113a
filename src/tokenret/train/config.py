"""Training configuration: typed dataclasses, read from YAML and overridden by ``key=value`` arguments.

A config has six sections (``model``, ``loss``, ``data``, ``optim``, ``train``, ``val``); a key is written
``section.field`` (``optim.base_lr=0.01``) and, for the free-form ``model.kwargs`` dict,
``model.kwargs.<argument>`` (``model.kwargs.drop_path=0``). Values on the command line are parsed as YAML
(``train.amp=bf16``, ``val.retrieval_datasets=[roxford5k,rparis6k]``, ``optim.clip_grad_norm=null``) and
then checked against the field's type; an unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key, what was expected and the closest valid keys.

The resolved config is saved (as a plain dict, :func:`config_to_dict`) inside every training checkpoint.

Example:
    >>> cfg = load_config("configs/token_r101_gldv2.yaml", ["optim.base_lr=0.005", "train.amp=bf16"])
    ... # doctest: +SKIP
    >>> cfg = apply_overrides(TrainConfig(), ["train.epochs=2"])
    >>> cfg.train.epochs, cfg.optim.decay
    (2, 'cosine')
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "ValConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, or inconsistent values."""


@dataclass
class ModelConfig:
    """What network is trained.

    Args:
        name: a registered model (``tokenret models``), e.g. token_r101, token_r50, solar_r101.
        backbone_weights: torchvision ImageNet weights for the trunk ("IMAGENET1K_V1", what the paper's
            weights started from) or null for a random trunk.
        kwargs: architecture overrides passed to ``create_model`` (e.g. drop, attn_drop, drop_path,
            backbone, dim, out_dim).
        init_checkpoint: start from these weights (a released file or a tokenret checkpoint) instead of
            ImageNet; the run itself starts at step 0.
        freeze: parameter-name prefixes that are not trained (e.g. DELG's local branch).
        how_whitening_images: HOW networks (how_r*) started without ``init_checkpoint``: their 128-d
            reduction layer starts as PCA-whitening of the top-1000 backbone features at scale 1 of the first
            this-many training images, and stays frozen, as HOW trains it (5000 images, lr 0). 0 keeps a
            random initialisation and trains the layer.
    """

    name: str = "token_r101"
    backbone_weights: str | None = "IMAGENET1K_V1"
    kwargs: dict[str, Any] = field(default_factory=dict)
    init_checkpoint: str | None = None
    freeze: list[str] = field(default_factory=list)
    how_whitening_images: int = 5000


@dataclass
class LossConfig:
    """Margin head and loss: cross-entropy over margin logits of the un-normalised descriptor.

    Args:
        margin: "arcface" (the release) or "cosface".
        s: logit scale; null means sqrt(descriptor dim) as the release (32 for Token's 1024-d).
        m: margin (0.2 in the release).
    """

    margin: Literal["arcface", "cosface"] = "arcface"
    s: float | None = 32.0
    m: float = 0.2


@dataclass
class DataConfig:
    """Training images, labels, split and augmentation.

    Args:
        format: "gldv2" (``root`` holds train.csv / train_clean.csv and train/a/b/c/<id>.jpg), "folders"
            (``root/<class>/<image>``) or "csv" (``csv`` lists path,label; relative paths from ``root`` or,
            when ``root`` is empty, from the CSV's folder), or "local_sets": sets of local descriptors for a
            trunk-less model (``token_set_*``); ``root`` holds labels.txt (a class label per line),
            descriptors/ (a LocalDescriptorStore, item i = line i) and optionally images.txt (an id per
            line, for val_list; else ids are line indices), as ``tokenret extract-local`` writes them. Items
            with no descriptor are left out (with a warning giving the count).
        root: dataset folder.
        gldv2_list: for gldv2, "train_clean.csv" (GLDv2-clean, as the paper) or "train.csv" (full set).
        csv: for csv, the file of path,label rows.
        val_list: a file of image ids (gldv2, local_sets) or paths (folders/csv), one a line, that form the
            validation split; all other images train. Empty: the release's per-class split below.
        val_fraction: per class, this fraction of the images (at least one) goes to validation (0.2 as the
            release; 0 keeps every image for training and disables classification validation).
        split_seed: seed of the per-class split (0 as the release).
        image_size: training crop side (512).
        crop_scale: RandomResizedCrop area range ((0.2, 1.0)).
        crop_ratio: RandomResizedCrop aspect ratio range ((3/4, 4/3)).
        hflip: horizontal flip probability (0.5).
        color_jitter: brightness, contrast, saturation, hue of ColorJitter ((0.4, 0.4, 0.2, 0.1)).
        color_jitter_p: probability of applying ColorJitter (0.8).
        val_resize: validation images are resized (shorter side, bicubic) to this, then centre-cropped to
            image_size; null means int(image_size * 8 / 7) as the release (585 for 512).
        num_workers: DataLoader worker processes per training process.
        check_files: drop listed images that do not exist (with a warning giving the count) before training.
        set_size: local_sets: descriptors per set. Larger sets are sub-sampled at random in training and cut
            to their first (strongest) ``set_size`` in validation; smaller ones are padded and masked.
        set_keep: local_sets, training augmentation: each set keeps a random fraction, drawn uniformly from
            this range, of its descriptors (before the ``set_size`` cap).
    """

    format: Literal["gldv2", "folders", "csv", "local_sets"] = "gldv2"
    root: str = ""
    gldv2_list: str = "train_clean.csv"
    csv: str | None = None
    val_list: str | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    image_size: int = 512
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_p: float = 0.8
    val_resize: int | None = None
    num_workers: int = 8
    check_files: bool = True
    set_size: int = 1000
    set_keep: tuple[float, float] = (0.5, 1.0)


@dataclass
class OptimConfig:
    """SGD and the learning-rate schedule.

    The rule is stated in terms of the global batch (all processes, all accumulation steps):
    ``peak_lr = base_lr * train.batch_size / reference_batch``. The release multiplied by the per-GPU batch
    instead; its 4-GPU run (32 per GPU, base 0.01) thus trained with a peak of 1.25e-3, which is
    base_lr = 0.0025 here with the global batch of 128.

    Args:
        base_lr: learning rate for a global batch of ``reference_batch`` images.
        reference_batch: 256.
        momentum, nesterov: SGD momentum 0.9 with Nesterov (the release).
        weight_decay: 1e-4 on weights; biases and every 1-D parameter (norm weights, GeM p) get none.
        warmup_epochs: linear warm-up length (5), from ``warmup_start_factor * peak`` to the peak.
        warmup_start_factor: 0.01, as the release (1.25e-5 -> 1.25e-3).
        decay: "cosine" (the release's code) or "linear" (the paper's README) from the peak to final_lr.
        final_lr: end of the decay, as a learning rate (scaled like base_lr); 0.
        clip_grad_norm: clip the global gradient norm to this; null disables (the release).
    """

    base_lr: float = 0.0025
    reference_batch: int = 256
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.01
    decay: Literal["cosine", "linear"] = "cosine"
    final_lr: float = 0.0
    clip_grad_norm: float | None = None


@dataclass
class RunConfig:
    """How the run goes: length, batch, precision, devices, outputs.

    Args:
        epochs: 30.
        batch_size: the GLOBAL batch per optimizer step (128): world_size * per-process batch *
            grad_accum. Must divide evenly.
        grad_accum: micro-batches accumulated per optimizer step (per process).
        amp: "off", "bf16" (CPU or GPU, no loss scaling) or "fp16" (GPU only, with dynamic loss scaling).
        seed: seeds the model initialisation, the data order and the augmentations.
        sync_bn: synchronise BatchNorm statistics across processes (the release does).
        channels_last: NHWC memory format for the convolutions.
        device: "auto" (the local GPU under torchrun, else the first GPU, else CPU), "cpu", "cuda".
        output_dir: where checkpoints (last.pth, best.pth, epoch_XXX.pth), log.jsonl, config.yaml and
            TensorBoard events are written.
        log_every: optimizer steps between log records.
        checkpoint_every_steps: also write last.pth every N steps (0: only at epoch ends and when stopping).
        keep_epoch_checkpoints: how many epoch_XXX.pth to keep (-1 all, 0 none).
        stop_after_steps: stop (with a checkpoint) after this many optimizer steps in total, as if
            interrupted; the schedule still spans ``epochs``. null: run to the end.
        tensorboard: write TensorBoard scalars (needs the tensorboard package).
        progress: show a progress bar (rank 0).
        dist_timeout_minutes: how long processes wait for each other (retrieval validation runs on rank 0
            while the others wait).
        find_unused_parameters: DDP option for heads with branches the loss does not use.
    """

    epochs: int = 30
    batch_size: int = 128
    grad_accum: int = 1
    amp: Literal["off", "bf16", "fp16"] = "off"
    seed: int = 11
    sync_bn: bool = True
    channels_last: bool = True
    device: str = "auto"
    output_dir: str = "runs/train"
    log_every: int = 10
    checkpoint_every_steps: int = 0
    keep_epoch_checkpoints: int = 3
    stop_after_steps: int | None = None
    tensorboard: bool = True
    progress: bool = True
    dist_timeout_minutes: float = 60.0
    find_unused_parameters: bool = False


@dataclass
class ValConfig:
    """Validation: classification on the held-out split, optionally retrieval mAP on a revisited dataset.

    Metrics are named ``val/loss``, ``val/top1``, ``val/top5`` (accuracy of the margin logits, the
    release's measure), ``val/top1_cosine`` (without margin) and ``<dataset>/map_medium``,
    ``<dataset>/map_hard``, ``<dataset>/map_easy`` for each retrieval dataset.

    Args:
        every_epochs: validate after every N epochs (and at the end); 0 only at the end.
        every_steps: also validate every N optimizer steps (0: never).
        classification: run the classification validation (needs a validation split).
        max_images: validate on at most this many held-out images (a fixed, seeded subset); null all.
        batch_size: per-process validation batch.
        retrieval_root: folder holding ``<dataset>/gnd_<dataset>.pkl|json`` and ``<dataset>/jpg``.
        retrieval_datasets: e.g. [roxford5k, rparis6k]; empty: no retrieval validation.
        retrieval_max_size: image side for retrieval validation (1024 as the release's test).
        retrieval_scales: test scales ([1.0] keeps validation fast; the release tests at 1, sqrt2, 1/sqrt2).
        best_metric: the metric that picks best.pth, computed once per validation.
        best_mode: "max" or "min".
    """

    every_epochs: int = 1
    every_steps: int = 0
    classification: bool = True
    max_images: int | None = None
    batch_size: int = 64
    retrieval_root: str | None = None
    retrieval_datasets: list[str] = field(default_factory=list)
    retrieval_max_size: int = 1024
    retrieval_scales: list[float] = field(default_factory=lambda: [1.0])
    best_metric: str = "val/top1"
    best_mode: Literal["max", "min"] = "max"


@dataclass
class TrainConfig:
    """A whole training run. See each section's class for its fields and defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def validate(self) -> None:
        """Check values that types alone cannot (positive sizes, ranges); raise ConfigError."""
        checks = [
            (self.train.epochs >= 1, "train.epochs must be >= 1"),
            (self.train.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.train.grad_accum >= 1, "train.grad_accum must be >= 1"),
            (self.train.log_every >= 1, "train.log_every must be >= 1"),
            (self.optim.base_lr > 0, "optim.base_lr must be > 0"),
            (self.optim.reference_batch >= 1, "optim.reference_batch must be >= 1"),
            (self.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
            (0 < self.optim.warmup_start_factor <= 1, "optim.warmup_start_factor must be in (0, 1]"),
            (self.optim.final_lr >= 0, "optim.final_lr must be >= 0"),
            (
                self.optim.clip_grad_norm is None or self.optim.clip_grad_norm > 0,
                "optim.clip_grad_norm must be > 0 or null",
            ),
            (0 <= self.data.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
            (self.data.image_size >= 8, "data.image_size must be >= 8"),
            (
                0 < self.data.crop_scale[0] <= self.data.crop_scale[1] <= 1,
                "data.crop_scale must be (low, high) with 0 < low <= high <= 1",
            ),
            (0 <= self.data.hflip <= 1, "data.hflip must be a probability"),
            (0 <= self.data.color_jitter_p <= 1, "data.color_jitter_p must be a probability"),
            (self.data.num_workers >= 0, "data.num_workers must be >= 0"),
            (self.val.batch_size >= 1, "val.batch_size must be >= 1"),
            (self.val.every_epochs >= 0 and self.val.every_steps >= 0, "val.every_* must be >= 0"),
            (
                not self.val.retrieval_datasets or bool(self.val.retrieval_root),
                "val.retrieval_datasets needs val.retrieval_root",
            ),
        ]
        checks += [
            (self.data.set_size >= 1, "data.set_size must be >= 1"),
            (
                0 < self.data.set_keep[0] <= self.data.set_keep[1] <= 1,
                "data.set_keep must be (low, high) with 0 < low <= high <= 1",
            ),
            (
                self.data.format != "local_sets" or not self.val.retrieval_datasets,
                "val.retrieval_datasets needs a model of images (retrieval validation extracts descriptors "
                "of the benchmark's images); with data.format=local_sets set val.retrieval_datasets=[] and "
                "evaluate the trained set model with `tokenret evaluate --local ... --aggregator token`",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._check_model_input()

    def _check_model_input(self) -> None:
        """A set model (``token_set_*``) trains on data.format=local_sets, an image model on images."""
        from tokenret.models.local import is_local_model
        from tokenret.models.registry import get_model_config, list_models

        if is_local_model(self.model.name):  # HOW / DELF networks train on images
            if self.data.format == "local_sets":
                raise ConfigError(f"model {self.model.name!r} is a local-feature net: it trains on images")
            return
        if self.model.name not in list_models():
            return  # reported when the model is built, with the list of names
        sets_model = getattr(get_model_config(self.model.name).family, "input_kind", "images") == "sets"
        sets_data = self.data.format == "local_sets"
        if sets_model and not sets_data:
            raise ConfigError(
                f"model {self.model.name!r} takes sets of local descriptors: set data.format=local_sets and "
                "data.root to a folder made by `tokenret extract-local`"
            )
        if sets_data and not sets_model:
            raise ConfigError(
                "data.format=local_sets needs a model of descriptor sets (token_set_*), "
                f"not {self.model.name!r}"
            )


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


# --------------------------------------------------------------------------------------------- type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int->float, list->tuple allowed); raise ConfigError."""

    def fail() -> ConfigError:
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans
            words = ("off", "no", "false") if not value else ("on", "yes", "true")
            match = [w for w in words if w in choices]
            if match:
                return match[0]
            raise fail()
        if value in choices:
            return value
        raise fail()
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a numeric-looking path or name
        raise fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail()
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}. Valid keys: {', '.join(valid)}")


def all_keys() -> list[str]:
    """Every ``section.field`` key."""
    return [f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(_section_type(s))]


def _section_type(section: str) -> type:
    return _hints(TrainConfig)[section]


def config_from_dict(data: Mapping[str, Any] | None, source: str = "config") -> TrainConfig:
    """Build a TrainConfig from nested dicts (a parsed YAML file), checking every key and type."""
    cfg = TrainConfig()
    if data is None:
        return cfg
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {data!r}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise _unknown(str(section), list(SECTIONS))
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)
    return cfg


def _set(cfg: TrainConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise _unknown(key, all_keys())
    section_obj = getattr(cfg, parts[0])
    hints = _hints(type(section_obj))
    name = parts[1]
    if name not in hints:
        raise _unknown(key, [f"{parts[0]}.{n}" for n in hints])
    tp = hints[name]
    if len(parts) == 2:
        setattr(section_obj, name, _coerce(value, tp, key))
        return
    if typing.get_origin(tp) is not dict:
        raise ConfigError(f"{key}: {parts[0]}.{name} is {_type_name(tp)}, it has no sub-keys")
    sub = ".".join(parts[2:])
    _, vt = typing.get_args(tp)
    getattr(section_obj, name)[sub] = _coerce(value, vt, key)


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.base_lr=0.01'`` -> ``('optim.base_lr', 0.01)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.base_lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key, value


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` strings to a copy of ``cfg``."""
    out = config_from_dict(config_to_dict(cfg))
    for text in overrides:
        key, value = parse_override(text)
        _set(out, key, value)
    return out


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides."""
    data = None
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        source = str(path)
    try:
        cfg = config_from_dict(data, source)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    cfg = apply_overrides(cfg, overrides)
    cfg.validate()
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (lists for tuples), safe for YAML, JSON and ``torch.load(weights_only=True)``."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return {
        s: {f.name: plain(getattr(getattr(cfg, s), f.name)) for f in dataclasses.fields(getattr(cfg, s))}
        for s in SECTIONS
    }


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Keys whose values differ between two :func:`config_to_dict` dicts, as 'key: old -> new'."""
    out = []
    for s in SECTIONS:
        a, b = old.get(s, {}) or {}, new.get(s, {}) or {}
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{s}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out
