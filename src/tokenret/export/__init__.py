"""Deployment: ONNX export of a global model and ONNX Runtime as an extraction engine.

- :mod:`~tokenret.export.onnx`: :func:`export_onnx` (the single-scale descriptor network with its input
  convention in the file's metadata), :func:`read_onnx_metadata`;
- :mod:`~tokenret.export.runtime`: :class:`OnnxNetwork`, an exported file run by ONNX Runtime where the
  extraction engine runs a network.

``onnx`` and ``onnxruntime`` are optional (``pip install 'tokenret[onnx]'``); they are imported when used.

Example:
    >>> from tokenret.export import export_onnx, OnnxNetwork
    >>> export_onnx(tokenret.create_model("gem_r50", backbone="resnet18"), "gem.onnx")  # doctest: +SKIP
    >>> OnnxNetwork("gem.onnx")(torch.randn(1, 3, 224, 224)).shape                      # doctest: +SKIP
    torch.Size([1, 512])
"""

from tokenret.export.onnx import (
    DEFAULT_OPSET,
    METADATA_KEY,
    ExportError,
    OnnxRuntimeMissingError,
    export_onnx,
    format_onnx_metadata,
    read_onnx_metadata,
    require_onnxruntime,
)
from tokenret.export.runtime import OnnxNetwork

__all__ = [
    "DEFAULT_OPSET",
    "METADATA_KEY",
    "ExportError",
    "OnnxNetwork",
    "OnnxRuntimeMissingError",
    "export_onnx",
    "format_onnx_metadata",
    "read_onnx_metadata",
    "require_onnxruntime",
]
