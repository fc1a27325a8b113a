"""Inference copies of a model (folded, fused, compiled) and the cache that keeps the last one, so that
consecutive extractions with the same model and weights do not copy or compile again."""

from __future__ import annotations

import os
import shutil
import weakref
from typing import Any

import torch
from torch import nn


class LastCopy:
    """The last inference copy made from a model, kept with a weak reference to that model and a key (its
    weights' state and the settings the copy depends on): consecutive extractions with the same model and
    weights (database then queries, every query of a server) reuse it instead of copying all of the
    weights, or compiling, once per call."""

    def __init__(self) -> None:
        self._made_from: Any = None
        self._key: Any = None
        self._network: nn.Module | None = None

    def get(self, model: nn.Module, key: Any) -> nn.Module | None:
        made_from = self._made_from() if self._made_from is not None else None
        return self._network if made_from is model and self._key == key else None

    def put(self, model: nn.Module, key: Any, network: nn.Module) -> nn.Module:
        """Keep ``network`` (a copy of ``model``; ``model`` itself is not kept: nothing to reuse)."""
        self._made_from, self._key, self._network = None, None, None
        if network is not model:
            self._made_from, self._key, self._network = weakref.ref(model), key, network
        return network


def weights_state(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (optimizer steps included)."""
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def check_compiler(device: torch.device) -> None:
    """torch.compile's CPU code is C++ built on the fly: fail before any work when no compiler is found."""
    if device.type != "cpu" or os.environ.get("CXX"):
        return
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError(
            "compile=True (--compile) on CPU needs a C++ compiler: torch.compile builds its kernels with "
            "it, and none was found (g++, c++ or clang++ on PATH, or $CXX). Install one (e.g. apt install "
            "g++) or run without --compile (descriptors are the same, about 1.15x slower)."
        )
