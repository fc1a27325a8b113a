"""Local-feature extractors by name: HOW (``how_r18``, ``how_r50``, ``how_r101``) and DELF (``delf_r50``).

Every extractor is an ``nn.Module`` with ``extract_local(image) -> dict`` (descriptors (N, D), attention
(N,), positions (N, 2) in pixels, locations, scales, strongest first), ``runtime`` (its test-time defaults:
``scales``, ``features_num``, ``mean_std``), ``output_dim``, ``model_name`` and ``model_kwargs``. The set
engine (:func:`tokenret.extraction.local_sets.extract_local_sets`) drives any of them the same way.

Example:
    >>> from tokenret.models.local import create_local_model, list_local_models
    >>> list_local_models()
    ['delf_r50', 'how_r101', 'how_r18', 'how_r50']
    >>> model = create_local_model("how_r18")                                   # random weights
    >>> model = create_local_model("how_r50", checkpoint="how_r50-.pth")         # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

#: name prefix -> (module, its config table, its factory, its network class)
_FAMILIES = {
    "how": ("tokenret.models.how", "HOW_MODELS", "create_how", "HOWNet"),
    "delf": ("tokenret.models.delf", "DELF_MODELS", "create_delf", "DELFNet"),
}


def _family(name: str) -> tuple[Any, Any]:
    import importlib

    prefix = name.split("_", 1)[0]
    if prefix not in _FAMILIES:
        raise ValueError(f"unknown local-feature model {name!r}; choose one of {list_local_models()}")
    module_name, table, factory, _ = _FAMILIES[prefix]
    module = importlib.import_module(module_name)
    return getattr(module, table), getattr(module, factory)


def list_local_models(pattern: str = "*") -> list[str]:
    """Registered local-feature extractors matching a shell-style pattern, sorted."""
    names = []
    for prefix in _FAMILIES:
        try:
            table, _ = _family(prefix + "_")
        except ImportError:  # a family whose module is missing from this installation
            continue
        names += list(table)
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def local_model_description(name: str) -> str:
    table, _ = _family(name)
    if name not in table:
        raise ValueError(f"unknown local-feature model {name!r}; choose one of {list_local_models()}")
    return str(getattr(table[name], "description", ""))


def create_local_model(
    name: str,
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    *,
    pretrained: bool = False,
    imagenet_weights: bool = False,
    progress: bool = True,
) -> nn.Module:
    """Build a local-feature extractor by name, with random, ImageNet, released or given weights.

    Args:
        name: one of :func:`list_local_models`.
        checkpoint: weights file (HOW's formats for ``how_*``; see each family for the rest).
        pretrained: download the released weights (only HOW's ``how_r18`` and ``how_r50`` have any).
        imagenet_weights: start the trunk from torchvision's ImageNet weights (for training).
    """
    table, factory = _family(name)
    if name not in table:
        raise ValueError(f"unknown local-feature model {name!r}; choose one of {list_local_models()}")
    return factory(
        name, checkpoint, pretrained=pretrained, imagenet_weights=imagenet_weights, progress=progress
    )


def build_local_model(name: str, **model_kwargs: Any) -> nn.Module:
    """The network ``name`` with exactly these architecture arguments (``model.model_kwargs`` of a saved one),
    random weights; its registry runtime defaults."""
    import importlib

    table, _ = _family(name)
    if name not in table:
        raise ValueError(f"unknown local-feature model {name!r}; choose one of {list_local_models()}")
    module_name, _, _, cls_name = _FAMILIES[name.split("_", 1)[0]]
    cls = getattr(importlib.import_module(module_name), cls_name)
    runtime = getattr(table[name], "runtime", None) or None
    model = cls(**model_kwargs, runtime=runtime)
    model.model_name = name
    return model


def is_local_model(name: str) -> bool:
    try:
        table, _ = _family(name)
    except (ValueError, ImportError):
        return False
    return name in table


__all__ = [
    "build_local_model",
    "create_local_model",
    "is_local_model",
    "list_local_models",
    "local_model_description",
]
