"""An exported descriptor network run by ONNX Runtime, where the extraction engine runs a PyTorch network.

:class:`OnnxNetwork` takes torch tensors and gives torch tensors, so the multi-scale extraction
(:func:`tokenret.extraction.multiscale.multiscale_descriptor`: resizing each scale, combining the scales)
is the same code for both engines; only each scale's forward pass runs in an ``InferenceSession``.

Example:
    >>> network = OnnxNetwork("token_r101.onnx")                         # doctest: +SKIP
    >>> network(torch.randn(2, 3, 224, 160)).shape                        # doctest: +SKIP
    torch.Size([2, 1024])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tokenret.export.onnx import INPUT_NAME, OUTPUT_NAMES, read_onnx_metadata, require_onnxruntime
from tokenret.models.convention import InputConvention

log = logging.getLogger(__name__)

__all__ = ["OnnxNetwork", "onnx_providers"]


def onnx_providers(device: str | torch.device | None) -> list[str]:
    """ONNX Runtime's execution providers for a torch device: CUDA first where asked for and available."""
    ort = require_onnxruntime()
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "onnxruntime engine: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu); "
            "running on CPU"
        )
    return ["CPUExecutionProvider"]


class OnnxNetwork(nn.Module):
    """An exported file (:func:`~tokenret.export.onnx.export_onnx`) behind a network's interface:
    ``network(images)`` gives the L2-normalised descriptors, ``forward_features`` the un-normalised ones,
    both as float32 torch tensors on the images' device; ``descriptor_dim``, ``input_convention``,
    ``multiscale_power`` and ``model_name`` come from the file's metadata.

    Args:
        path: the ``.onnx`` file.
        device: where to run (a CUDA device uses ONNX Runtime's CUDA provider when it has one).
        threads: ONNX Runtime's intra-op threads; None: torch's thread count (``torch.get_num_threads()``).
    """

    def __init__(
        self, path: str | Path, device: str | torch.device | None = None, threads: int | None = None
    ):
        super().__init__()
        ort = require_onnxruntime()
        self.path = Path(path)
        self.metadata: dict[str, Any] = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=onnx_providers(device))
        self.descriptor_dim = int(self.metadata["descriptor_dim"])
        self.model_name = str(self.metadata.get("model", self.path.stem))
        self.input_convention = InputConvention(**self.metadata["input_convention"])
        power = self.metadata.get("multiscale_power")
        if power is not None:
            self.multiscale_power = float(power)

    def _run(self, images: Tensor, output: str) -> Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([output], {INPUT_NAME: x})
        return torch.from_numpy(np.ascontiguousarray(out)).to(images.device)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in the model's convention -> L2-normalised descriptors (B, D)."""
        return self._run(images, OUTPUT_NAMES[0])

    def forward_features(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> the descriptors before their L2 normalisation (B, D)."""
        return self._run(images, OUTPUT_NAMES[1])

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, providers={self.session.get_providers()}"
