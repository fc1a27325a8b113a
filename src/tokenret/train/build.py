"""Building what a run trains: the retrieval network, its margin head, the two together, and the optimizer.

Every function here takes only what it needs (a config section, a network, a path), so a script can build a
run's pieces without a :class:`~tokenret.train.loop.Trainer`. HOW's reduction layer is the one piece set
from data rather than from a checkpoint: :func:`learn_how_whitening` fits it to the first training images.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenret.data.images import load_image, to_tensor
from tokenret.models import checkpoints as ck
from tokenret.models.how import HOWNet, learn_dim_reduction
from tokenret.models.local import create_local_model, is_local_model
from tokenret.models.margin import MARGIN_HEADS
from tokenret.models.registry import create_model, get_model_config
from tokenret.train.config import ConfigError, LossConfig, ModelConfig, OptimConfig, RunConfig
from tokenret.train.data import Inputs
from tokenret.train.distributed import DistributedContext, convert_sync_batchnorm

__all__ = [
    "TrainingModel",
    "autocast",
    "build_classifier",
    "build_net",
    "build_optimizer",
    "build_training_model",
    "forward_features",
    "init_classifier",
    "learn_how_whitening",
    "needs_how_whitening",
]

log = logging.getLogger(__name__)


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


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``train.amp`` (``off``, ``bf16``, ``fp16``) on ``device``."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def needs_how_whitening(net: nn.Module, model: ModelConfig) -> bool:
    """Whether ``net`` is a HOW network whose reduction layer starts as PCA-whitening of training images."""
    return (
        isinstance(net, HOWNet)
        and not model.init_checkpoint
        and model.how_whitening_images > 0
        and net.dim_reduction is not None
    )


def build_net(model: ModelConfig) -> nn.Module:
    """The retrieval network of ``model`` (registry or local-feature factory), in train mode, frozen where
    ``model.freeze`` asks.

    HOW's reduction layer is frozen when :func:`needs_how_whitening`: it is learned when training starts, so
    neither the optimizer nor DDP ever treats it as trained.
    """
    m = model
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
    if needs_how_whitening(net, m):
        net.dim_reduction.requires_grad_(False)
    return net.train()


def build_classifier(
    loss: LossConfig, descriptor_dim: int, num_classes: int, init_checkpoint: str | None = None
) -> nn.Module:
    """The margin head of ``loss`` (ArcFace/CosFace), taken from ``init_checkpoint`` when it fits."""
    classifier = MARGIN_HEADS[loss.margin](descriptor_dim, num_classes, s=loss.s, m=loss.m)
    if init_checkpoint:
        init_classifier(classifier, init_checkpoint)
    return classifier


def init_classifier(classifier: nn.Module, path: str) -> None:
    """Take the margin head from ``path`` when it fits (same classes), e.g. a release GLDv2 file."""
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


def build_training_model(
    net: nn.Module, classifier: nn.Module, run: RunConfig, ctx: DistributedContext
) -> TrainingModel:
    """Net + head on ``ctx.device`` in train mode (SyncBatchNorm when distributed and ``train.sync_bn``)."""
    model = TrainingModel(net, classifier)
    if ctx.distributed and run.sync_bn:
        model = convert_sync_batchnorm(model, ctx.device)
    model.to(ctx.device)
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.SGD:
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


def learn_how_whitening(
    net: nn.Module, paths: Sequence[str], distributed: bool = False, progress: bool = False
) -> int:
    """HOW's initialisation of its reduction layer: PCA-whitening of the features of the images ``paths``.

    Every process computes it; under ``distributed``, rank 0's copy is broadcast so all agree to the bit.
    Extraction may leave the network in eval mode: put it back in train mode afterwards.

    Returns:
        The number of features the whitening was learned from.
    """
    mean, std = net.runtime["mean_std"]
    size = int(net.runtime.get("image_size", 1024))
    images = (to_tensor(load_image(p, size), mean, std) for p in paths)
    if progress:
        images = tqdm(images, total=len(paths), desc="HOW whitening", unit="img")
    try:  # HOW's recipe: the network without its reduction layer, top-1000 features, scale 1
        n = learn_dim_reduction(net, images, features_num=1000, scales=[1.0])
    except ValueError as e:
        raise ConfigError(
            f"HOW's reduction layer starts as PCA-whitening learned from the first {len(paths)} training "
            f"images (model.how_whitening_images), but {e}: use more or larger images, or set "
            "model.how_whitening_images=0 to train the layer from a random initialisation"
        ) from e
    if distributed:
        for t in (net.dim_reduction.weight, net.dim_reduction.bias):
            torch.distributed.broadcast(t.data, src=0)
    log.info("HOW reduction layer: PCA-whitening of %d features from %d images, frozen", n, len(paths))
    return n
