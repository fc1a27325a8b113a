"""What a checkpoint file holds and which registry model it fits (behind ``tokenret info``)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenret.models import checkpoints as ck
from tokenret.models.registry import build_model, get_model_config, list_models


def infer_backbone(state: dict[str, torch.Tensor]) -> str | None:
    """ResNet depth from the number of blocks in stage 3 (``backbone.block4.*``) and the block type."""
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("backbone.block4.")}
    if not blocks:
        return None
    bottleneck = "backbone.block2.0.conv3.weight" in state
    n = max(blocks) + 1
    table = (
        {6: "resnet50", 23: "resnet101", 36: "resnet152"} if bottleneck else {2: "resnet18", 6: "resnet34"}
    )
    return table.get(n)


@dataclass
class ModelMatch:
    name: str
    kwargs: dict[str, Any]
    report: ck.KeyReport
    descriptor_dim: int

    @property
    def problems(self) -> int:
        r = self.report
        return len(r.missing) + len(r.unexpected) + len(r.mismatched)


@dataclass
class CheckpointInfo:
    path: str
    size_bytes: int
    sha256: str
    layout: str
    n_tensors: int
    n_parameters: int
    ignored: list[str]
    matches: list[ModelMatch] = field(default_factory=list)
    #: Keys of the tensors holding NaN or infinite values (a damaged file, or a diverged training run).
    non_finite: list[str] = field(default_factory=list)
    #: Keys of the file left out as belonging to no global network (CVNet's re-ranking branch).
    dropped: list[str] = field(default_factory=list)

    @property
    def best(self) -> ModelMatch | None:
        return self.matches[0] if self.matches else None

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "layout": self.layout,
            "n_tensors": self.n_tensors,
            "n_parameters": self.n_parameters,
            "ignored_keys": self.ignored,
            "dropped_keys": self.dropped,
            "non_finite_keys": self.non_finite,
            "matches": best is not None and best.report.ok,
            "model": best.name if best else None,
            "model_kwargs": best.kwargs if best else None,
            "descriptor_dim": best.descriptor_dim if best else None,
            "missing": best.report.missing if best else [],
            "unexpected": best.report.unexpected if best else [],
            "mismatched": [list(m) for m in best.report.mismatched] if best else [],
        }


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Read a file and rank registry models by how well its weights fit them (best first)."""
    path = Path(path)
    loaded = ck.read_checkpoint(path)
    state = loaded.state_dict
    layout = "tokenret checkpoint" if loaded.model_name else loaded.layout
    info = CheckpointInfo(
        path=str(path),
        size_bytes=path.stat().st_size,
        sha256=ck.sha256sum(path),
        layout=layout,
        n_tensors=len(state),
        n_parameters=sum(v.numel() for k, v in state.items() if v.is_floating_point()),
        ignored=[k for k in state if k.startswith(ck.IGNORED_PREFIXES)],
        non_finite=[
            k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ],
        dropped=list(loaded.dropped),
    )
    names = [loaded.model_name] if loaded.model_name in list_models() else list_models()
    backbone = infer_backbone(state)
    for name in names:
        cfg = get_model_config(name)
        if loaded.model_kwargs:
            kwargs = dict(loaded.model_kwargs)
        else:
            kwargs = cfg.infer_kwargs(state) if cfg.infer_kwargs else {}
            # each entry is built as itself (superglobal_r50 with depth 50), so the file's depth decides
            for key in cfg.identity_kwargs:
                kwargs.pop(key, None)
            if backbone:
                kwargs["backbone"] = backbone
        try:
            with torch.device("meta"):
                model = build_model(cfg, **kwargs)
        except (TypeError, ValueError):
            continue
        info.matches.append(ModelMatch(name, kwargs, ck.compare_keys(model, state), model.descriptor_dim))
    # Exact fits first; among them prefer the registry default backbone (e.g. token_r50 for an R50 file), then
    # the nearest one in depth (token_r50 for an R18 file: token_r101 would build the same network).
    info.matches.sort(
        key=lambda m: (
            m.problems,
            m.kwargs.get("backbone") != get_model_config(m.name).backbone,
            _depth_distance(m.kwargs.get("backbone"), get_model_config(m.name).backbone),
        )
    )
    return info


def _depth_distance(backbone: str | None, default: str | None) -> int:
    """|depth of ``backbone`` - depth of the entry's ``default``| (0 when either is unknown)."""
    depths = [int(m.group()) for m in (re.search(r"\d+", b or "") for b in (backbone, default)) if m]
    return abs(depths[0] - depths[1]) if len(depths) == 2 else 0


def load_call(name: str, path: str, kwargs: dict[str, Any]) -> str:
    """The Python call that rebuilds the model of a file: name, checkpoint and every architecture argument."""
    arguments = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"tokenret.create_model({name!r}, checkpoint={path!r}{arguments})"


def command_line_flags(name: str, path: str, kwargs: dict[str, Any], recorded: bool) -> str:
    """The ``tokenret index/evaluate`` flags that build the same model (a file saved by tokenret records its
    name and arguments, so ``--checkpoint`` alone does)."""
    if recorded:
        return f"--checkpoint {shlex.quote(path)}"
    flags = f"--model {name}"
    if kwargs:
        flags += " --model-arg " + " ".join(
            shlex.quote(f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}") for k, v in kwargs.items()
        )
    return f"{flags} --checkpoint {shlex.quote(path)}"


def format_info(info: CheckpointInfo) -> str:
    lines = [
        f"file:        {info.path}",
        f"size:        {info.size_bytes / 2**20:.1f} MiB   sha256 {info.sha256}",
        f"layout:      {info.layout}, {info.n_tensors} tensors, {info.n_parameters:,} numbers "
        "(parameters and BatchNorm statistics)",
    ]
    if info.non_finite:
        lines.append(
            f"DAMAGED:     {len(info.non_finite)} tensor(s) hold NaN or infinite values "
            f"({ck._listing(info.non_finite)}): descriptors made with these weights are meaningless"
        )
    if info.ignored:
        lines.append(f"ignored:     {ck._listing(info.ignored)} (training-only margin head)")
    if info.dropped:
        lines.append(
            f"left out:    {len(info.dropped)} tensors outside the global network "
            f"({ck._listing(sorted({k.split('.')[0] for k in info.dropped}))}: CVNet's re-ranking branch)"
        )
    best = info.best
    if best is None:
        lines.append("model:       no registry model could be built for this file")
    elif best.report.ok:
        extra = {k: v for k, v in best.kwargs.items() if k != "backbone"}
        cfg = get_model_config(best.name)
        trunk = best.kwargs.get("backbone") or cfg.backbone or cfg.trunk or "?"
        lines.append(f"model:       {best.name} (backbone {trunk}), all weights present")
        lines.append(f"descriptor:  {best.descriptor_dim}-d")
        if extra:
            lines.append(f"arguments:   {extra}")
        lines.append(f"load with:   {load_call(best.name, info.path, best.kwargs)}")
        recorded = info.layout == "tokenret checkpoint"
        lines.append(f"flags:       {command_line_flags(best.name, info.path, best.kwargs, recorded)}")
        same = [m.name for m in info.matches[1:] if m.report.ok and m.kwargs == best.kwargs]
        if same:
            lines.append(f"also fits:   {', '.join(same)} (the same network with these arguments)")
    else:
        lines.append(f"model:       no exact match; closest is {best.name} ({best.problems} problems)")
        lines.append(f"             {ck.format_report(best.report)}")
    return "\n".join(lines)
