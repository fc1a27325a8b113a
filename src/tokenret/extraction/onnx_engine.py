"""The ``onnxruntime`` extraction engine: a model's exported descriptor network, made once per weights.

``ExtractionConfig(engine="onnxruntime")`` runs each scale's forward pass through
:class:`~tokenret.export.runtime.OnnxNetwork`; everything else (loading, resizing, the scales and their
combination, shards, caches) is the torch engine's code. The file is exported on first use into
``$TOKENRET_HOME/onnx/<model fingerprint>.onnx`` and reused by every later run with the same weights.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from tokenret.export import OnnxNetwork, export_onnx, require_onnxruntime
from tokenret.models.checkpoints import tokenret_home

log = logging.getLogger(__name__)

#: The extraction engines (``ExtractionConfig.engine``, ``--engine``).
ENGINES = ("torch", "onnxruntime")


def onnx_cache_path(fingerprint: str) -> Path:
    """Where the exported file of the model with ``fingerprint`` is kept."""
    return tokenret_home() / "onnx" / f"{fingerprint}.onnx"


def onnx_network(model: nn.Module, fingerprint: str, device: torch.device) -> OnnxNetwork:
    """``model``'s descriptor network in ONNX Runtime, exported into the cache when not there yet.

    Args:
        model: the model (its weights are what ``fingerprint`` identifies).
        fingerprint: :func:`~tokenret.extraction.descriptors.model_fingerprint` of ``model``.
        device: where to run (CUDA through ONNX Runtime's CUDA provider where it has one).
    """
    require_onnxruntime()
    path = onnx_cache_path(fingerprint)
    if not path.is_file():
        log.info("onnxruntime engine: exporting %s to %s", getattr(model, "model_name", "the model"), path)
        # traced and checked on the CPU in float32 (a GPU's TF32 convolutions would fail the parity check)
        source = model if device.type == "cpu" else copy.deepcopy(model).to("cpu")
        export_onnx(source, path, metadata={"model_sha256": fingerprint})
    return OnnxNetwork(path, device=device)
