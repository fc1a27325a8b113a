"""Model registry: a name maps to a small config (architecture, arguments, released weights).

Example:
    >>> import tokenret
    >>> tokenret.list_models()[:3]
    ['delg_r101', 'gem_r101', 'gem_r50']
    >>> model = tokenret.create_model("token_r101")          # random weights, never touches the network
    >>> model = tokenret.create_model("token_r101", checkpoint="R101-Token.pth")   # doctest: +SKIP
    >>> model = tokenret.create_model("token_r101", pretrained=True)               # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenret.models.backbone import ResNetTrunk
from tokenret.models.checkpoints import CheckpointError
from tokenret.models.convention import CIRTORCH, SUPERGLOBAL, InputConvention
from tokenret.models.retrieval import (
    DELGModel,
    GeMModel,
    NetVLADModel,
    RMACModel,
    SOLARModel,
    TokenModel,
)
from tokenret.models.superglobal import SuperGlobalModel, infer_superglobal_kwargs
from tokenret.models.token import SetTokenModel

log = logging.getLogger(__name__)

#: Backbone-level arguments every model accepts as overrides.
BACKBONE_ARGS = ("backbone", "backbone_weights", "dilation_block5")

GDRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"


@dataclass(frozen=True)
class Weights:
    """Where released weights come from and what they scored.

    ``paper_map`` holds the mAP the release's README reports for these exact weights:
    (ROxf Medium, ROxf Hard, RPar Medium, RPar Hard), single-query, 3 scales, 1024 px.
    ``url`` empty: the files cannot be fetched automatically (e.g. a Google Drive folder); ``manual`` says
    where to get them, and ``pretrained=True`` reads them from ``$TOKENRET_HOME/checkpoints/<filename>``.
    """

    url: str
    filename: str
    sha256: str | None = None
    paper_map: tuple[float, float, float, float] | None = None
    source: str = ""
    manual: str = ""


@dataclass(frozen=True)
class ModelConfig:
    """A registry entry. ``backbone`` None: a trunk-less model (e.g. Token on local-descriptor sets), built
    as ``family(**kwargs)``; otherwise ``family(ResNetTrunk(backbone), **kwargs)``."""

    name: str
    family: type[nn.Module]
    backbone: str | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: Weights | None = None
    description: str = ""
    infer_kwargs: Callable[[Mapping[str, torch.Tensor]], dict[str, Any]] | None = None
    #: The input convention of the family (what ``input_convention(model)`` gives); None: cirtorch's.
    convention: InputConvention | None = None
    #: Arguments that tell entries of one family apart (e.g. ``depth``): a checkpoint inferred to have
    #: another value belongs to another entry, and loading it here is refused with that entry's name.
    identity_kwargs: tuple[str, ...] = ()
    #: What the trunk is, for listings, where ``backbone`` is None but the family builds its own.
    trunk: str = ""

    @property
    def descriptor_dim(self) -> int:
        with torch.device("meta"):
            return build_model(self).descriptor_dim

    @property
    def input_convention(self) -> InputConvention:
        """The convention of this entry's models with their default arguments."""
        return self.convention or CIRTORCH


def _gdrive(file_id: str, filename: str, paper_map: tuple[float, float, float, float]) -> Weights:
    return Weights(
        url=GDRIVE_URL.format(id=file_id),
        filename=filename,
        paper_map=paper_map,
        source="MCC-WH/Token release (Google Drive), trained on GLDv2-clean",
    )


def _infer_whiten_dim(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    w = state.get("whiten.weight")
    return {"dim": int(w.shape[0])} if w is not None and w.ndim == 4 else {}


def _infer_vlad(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    c = state.get("vlad.centroids")
    return {"dim": int(c.shape[1]), "num_clusters": int(c.shape[2])} if c is not None and c.ndim == 3 else {}


def _infer_token(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    q = state.get("tr.query")
    if q is not None and q.ndim == 3:
        out["num_tokens"], out["dim"] = int(q.shape[1]), int(q.shape[2])
    p = state.get("tr.proj.0.weight")
    if p is not None and p.ndim == 2:
        out["out_dim"] = int(p.shape[0])
    out["encoder_layers"] = len({k.split(".")[2] for k in state if k.startswith("tr.encoder.")}) or 1
    out["decoder_layers"] = len({k.split(".")[2] for k in state if k.startswith("tr.decoder.")}) or 2
    return out


def _infer_set_token(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    out = _infer_token(state)
    w = state.get("tr.conv.0.weight")
    if w is not None and w.ndim == 4:
        out["in_channels"] = int(w.shape[1])
    return out


_REGISTRY: dict[str, ModelConfig] = {}


def register(cfg: ModelConfig) -> ModelConfig:
    if cfg.name in _REGISTRY:
        raise ValueError(f"model {cfg.name!r} is registered twice")
    _REGISTRY[cfg.name] = cfg
    return cfg


register(
    ModelConfig(
        "token_r50",
        TokenModel,
        "resnet50",
        weights=_gdrive("111CQpn38d2P82VhbawMrM5wGNMU9AlFq", "R50-Token.pth", (79.79, 62.68, 88.08, 75.49)),
        description="Token (AAAI 2022), ResNet-50 trunk, L=4 tokens, 1024-d",
        infer_kwargs=_infer_token,
    )
)
register(
    ModelConfig(
        "token_r101",
        TokenModel,
        "resnet101",
        weights=_gdrive("1g_fvpaSyYn9QmzyVnoY7cDlUL7EZWbZz", "R101-Token.pth", (82.16, 65.75, 89.40, 78.44)),
        description="Token (AAAI 2022), ResNet-101 trunk, L=4 tokens, 1024-d",
        infer_kwargs=_infer_token,
    )
)
register(
    ModelConfig(
        "rmac_r101",
        RMACModel,
        "resnet101",
        weights=_gdrive("12um3mZU2kVNto3MPrZ6FmxFca_tL3Sgi", "R101-RMAC.pth", (75.14, 53.77, 85.28, 71.28)),
        description="R-MAC + 1x1-conv whitening, the release's GLDv2 baseline, 2048-d",
        infer_kwargs=_infer_whiten_dim,
    )
)
register(
    ModelConfig(
        "solar_r101",
        SOLARModel,
        "resnet101",
        weights=_gdrive("1CJNEeE0NDlsl56jnmsZFmPfH-jx32Syh", "R101-SOLAR.pth", (79.65, 59.99, 88.63, 76.15)),
        description="SOLAR (second-order attention + GeM), the release's GLDv2 baseline, 2048-d",
        infer_kwargs=_infer_whiten_dim,
    )
)
register(
    ModelConfig(
        "delg_r101",
        DELGModel,
        "resnet101",
        weights=_gdrive("10WExWiY5cc4-hrQQpQ3yUvOV06f3wYaB", "R101-DELG.pth", (78.55, 60.89, 88.58, 76.05)),
        description="DELG global descriptor (GeM + whitening), the release's GLDv2 baseline, 2048-d",
        infer_kwargs=_infer_whiten_dim,
    )
)
register(
    ModelConfig(
        "netvlad_r101",
        NetVLADModel,
        "resnet101",
        kwargs={"trainable_backbone": False},
        weights=_gdrive(
            "1zESoQbza0c9hqasK8rGJCWoONMV43ekQ", "R101-NetVLAD.pth", (73.91, 56.45, 86.81, 73.61)
        ),
        description="NetVLAD head (K=4) on a frozen trunk, the release's GLDv2 baseline, 1024-d",
        infer_kwargs=_infer_vlad,
    )
)
for _arch in ("r50", "r101"):
    register(
        ModelConfig(
            f"gem_{_arch}",
            GeMModel,
            f"resnet{_arch[1:]}",
            description=f"GeM pooling (learnable p) on ResNet-{_arch[1:]}, 2048-d; pretrained=True loads the "
            "ImageNet trunk from torchvision",
        )
    )

# SuperGlobal on CVNet's released global networks (GLDv2-clean). The files sit in a Google Drive folder
# that cannot be fetched without a browser: pretrained=True reads them from the cache, or says where to get
# them. The published mAP is not in paper_map: the spec read only the Hard columns second-hand.
CVNET_README = "https://github.com/sungonce/CVNet"
for _arch, _depth in (("r50", 50), ("r101", 101)):
    _file = f"CVPR2022_CVNet_R{_depth}.pyth"
    register(
        ModelConfig(
            f"superglobal_{_arch}",
            SuperGlobalModel,
            None,
            kwargs={"depth": _depth, "antialias": False},  # antialias always recorded in model_kwargs
            weights=Weights(
                url="",
                filename=_file,
                source="CVNet (CVPR 2022) release, trained on GLDv2-clean; used by SuperGlobal unchanged",
                manual=(
                    f"CVNet's weights are in a Google Drive folder linked from the README of {CVNET_README} "
                    f"(the file {_file}); download it with a browser"
                ),
            ),
            description=f"SuperGlobal (ICCV 2023): CVNet-Global ResNet-{_depth} with ReLU+, rGeM, GeM+ "
            "(p 4.6) and head.fc, 2048-d; BGR input at the file's resolution, scales 0.7071/1/1.4142, sGeM; "
            "switches relu_plus/rgem/gem_plus/antialias",
            infer_kwargs=infer_superglobal_kwargs,
            convention=SUPERGLOBAL,
            identity_kwargs=("depth",),
            trunk=f"resnet{_depth} (pycls)",
        )
    )

# Token's aggregator on local descriptors (the Token README's "+Ours" rows over HOW/DELF + ASMK). The paper
# gives neither the head's sizes nor weights for this experiment: the sizes below are Token's own.
_SET_TOKEN_NOTE = (
    "in_channels 128; dim 1024, L=4 tokens, 8 heads, 1 encoder, 2 decoders, 1024-d out are our choice "
    "(Token's image-model sizes; the paper's for this experiment are unknown); no weights are released: "
    "train with `tokenret train --config configs/{name}_gldv2.yaml`"
)
for _name, _what in (
    ("token_set_how_r50", "HOW R50 local descriptors (128-d, whitened)"),
    ("token_set_how_r101", "HOW R101 local descriptors (128-d, whitened)"),
    ("token_set_delf_r50", "DELF R50 local descriptors (128-d, L2-normalised)"),
):
    register(
        ModelConfig(
            _name,
            SetTokenModel,
            None,
            kwargs={"in_channels": 128},
            description=f"Token aggregator on sets of {_what}; " + _SET_TOKEN_NOTE.format(name=_name),
            infer_kwargs=_infer_set_token,
        )
    )


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_config(name: str) -> ModelConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def replace_weights(name: str, weights: Weights | None) -> ModelConfig:
    """Point a registry entry at other weights (a mirror, a local server); returns the old config."""
    old = get_model_config(name)
    _REGISTRY[name] = dataclasses.replace(old, weights=weights)
    return old


def restore_config(cfg: ModelConfig) -> None:
    _REGISTRY[cfg.name] = cfg


def build_model(cfg: ModelConfig, **overrides: Any) -> nn.Module:
    """Instantiate ``cfg`` with overrides (backbone=..., backbone_weights=..., head arguments)."""
    kwargs = {**cfg.kwargs, **overrides}
    if cfg.backbone is None:
        return _build_trunkless(cfg, kwargs)
    arch = kwargs.pop("backbone", cfg.backbone)
    backbone_weights = kwargs.pop("backbone_weights", None)
    trainable = kwargs.pop("trainable_backbone", True)
    dilation = kwargs.pop("dilation_block5", False)
    backbone = ResNetTrunk(
        arch, imagenet_weights=backbone_weights, dilation_block5=dilation, trainable=trainable
    )
    try:
        model = cfg.family(backbone, **kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for model {cfg.name!r} ({cfg.family.__name__}): {e}") from None
    # What rebuilds this architecture; saved inside tokenret checkpoints.
    model.model_name = cfg.name
    model.model_kwargs = {k: v for k, v in {**cfg.kwargs, **overrides}.items() if k != "backbone_weights"}
    model.model_kwargs.setdefault("backbone", arch)
    return model


def _build_trunkless(cfg: ModelConfig, kwargs: dict[str, Any]) -> nn.Module:
    trunk_args = {k: kwargs.pop(k) for k in (*BACKBONE_ARGS, "trainable_backbone") if k in kwargs}
    given = {k: v for k, v in trunk_args.items() if v not in (None, False)}
    if given:
        raise TypeError(
            f"model {cfg.name!r} has no torchvision trunk "
            f"({cfg.trunk or 'it takes local descriptors'}): remove "
            f"{', '.join(f'{k}={v!r}' for k, v in given.items())}"
        )
    try:
        model = cfg.family(**kwargs)
    except TypeError as e:
        raise TypeError(f"bad arguments for model {cfg.name!r} ({cfg.family.__name__}): {e}") from None
    model.model_name = cfg.name
    model.model_kwargs = dict(kwargs)
    return model


def _check_identity(
    cfg: ModelConfig, inferred: Mapping[str, Any], overrides: Mapping[str, Any], source: str
) -> None:
    """Refuse a checkpoint of another entry of the same family (e.g. an R101 file for superglobal_r50)."""
    for key in cfg.identity_kwargs:
        if key in overrides or key not in inferred or inferred[key] == cfg.kwargs.get(key):
            continue
        fits = [
            c.name
            for c in _REGISTRY.values()
            if c.family is cfg.family and c.kwargs.get(key) == inferred[key]
        ]
        hint = f"use {fits[0]!r}" if fits else f"pass {key}={inferred[key]!r} to build it anyway"
        raise CheckpointError(
            f"{source}: the weights are for {key}={inferred[key]!r}, and {cfg.name!r} is built with "
            f"{key}={cfg.kwargs.get(key)!r}; {hint}"
        )


def create_model(
    name: str,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    pretrained: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with weights.

    Args:
        name: a name from :func:`list_models`, e.g. ``"token_r101"``.
        checkpoint: a file path or an already loaded dict: a released file (plain state dict, or nested under
            'state_dict' / 'model' / 'model_state', with or without 'module.' prefixes; CVNet's files: the
            global network under 'encoder_q.', the re-ranking branch left out with a warning) or a
            checkpoint tokenret saved.
            Read with ``torch.load(weights_only=True)``. Every weight the descriptor depends on must be there
            with the right shape; margin-head (``classifier*``) weights are ignored.
        pretrained: download the released weights once into ``$TOKENRET_HOME/checkpoints`` (default
            ``~/.cache/tokenret``) and load them. For ``gem_*`` this loads the torchvision ImageNet trunk.
            For ``superglobal_*`` (CVNet's weights, a Google Drive folder) the file must be put there by
            hand; the error says where to get it.
        **overrides: architecture arguments, e.g. ``backbone="resnet18"``, ``num_tokens=8``,
            ``backbone_weights="IMAGENET1K_V1"`` (torchvision trunk weights, for training).

    Returns:
        The model in eval mode.

    Example:
        >>> model = create_model("token_r50", backbone="resnet18", dim=256, out_dim=128)
        >>> model(torch.randn(1, 3, 128, 96)).shape
        torch.Size([1, 128])
    """
    from tokenret.models import checkpoints as ck

    cfg = get_model_config(name)
    if checkpoint is not None and pretrained:
        raise ValueError("give either checkpoint= or pretrained=True, not both")
    if pretrained and cfg.weights is None:
        if cfg.family is GeMModel:
            overrides.setdefault("backbone_weights", "IMAGENET1K_V1")
            pretrained = False
        else:
            raise ValueError(f"model {name!r} has no released weights; pass checkpoint=PATH")
    state = None
    if pretrained:
        checkpoint = ck.fetch_release_weights(cfg)
    if checkpoint is not None:
        loaded = ck.read_checkpoint(checkpoint)
        state = loaded.state_dict
        if loaded.model_name and loaded.model_name != name:
            raise ck.CheckpointError(
                f"{loaded.source}: this checkpoint was saved by tokenret for model {loaded.model_name!r}, "
                f"not {name!r}; use create_model({loaded.model_name!r}, checkpoint=...)"
            )
        inferred = dict(loaded.model_kwargs) if loaded.model_kwargs else {}
        if not inferred and cfg.infer_kwargs is not None:
            inferred = cfg.infer_kwargs(state)
        _check_identity(cfg, inferred, overrides, loaded.source)
        if loaded.dropped:
            log.warning(
                "%s: %d tensors not used by %s were left out (%s): %s",
                loaded.source,
                len(loaded.dropped),
                name,
                loaded.layout,
                ck._listing(loaded.dropped, 6),
            )
        overrides = {**inferred, **overrides}
        overrides.pop("backbone_weights", None)  # the checkpoint provides the trunk
    model = build_model(cfg, **overrides)
    if state is not None:
        ck.load_weights(model, state, name=name, source=ck.describe_source(checkpoint))
        unused = getattr(model, "unused_weights", None)
        if callable(unused) and unused():
            log.info("%s: loaded but not used with these arguments: %s", name, unused())
    return model.eval()
