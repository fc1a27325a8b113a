"""tokenret: Token-based representation for instance-level image retrieval.

Example:
    >>> import torch, tokenret
    >>> model = tokenret.create_model("token_r50").eval()   # random weights, no network access
    >>> with torch.inference_mode():
    ...     desc = model(torch.randn(2, 3, 224, 224))
    >>> desc.shape
    torch.Size([2, 1024])
"""

from tokenret.models.registry import create_model, get_model_config, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "get_model_config", "list_models", "__version__"]
