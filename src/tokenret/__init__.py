"""tokenret: Token-based representation for instance-level image retrieval.

Example:
    >>> import torch, tokenret
    >>> model = tokenret.create_model("token_r50").eval()   # random weights, no network access
    >>> with torch.inference_mode():
    ...     desc = model(torch.randn(2, 3, 224, 224))
    >>> desc.shape
    torch.Size([2, 1024])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenret.models.registry import create_model, get_model_config, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "get_model_config", "list_models", "__version__"]

# The registry imports torch (seconds): it is imported on first use (PEP 562), so that `import tokenret`
# and `tokenret --help` stay instant.
_REGISTRY_NAMES = frozenset({"create_model", "get_model_config", "list_models"})


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        from tokenret.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'tokenret' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _REGISTRY_NAMES)
