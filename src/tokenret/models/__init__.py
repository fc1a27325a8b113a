"""Retrieval models: backbones, the Token head, pooling baselines, margin heads, registry, checkpoints."""

from tokenret.models.backbone import ResNetTrunk
from tokenret.models.margin import ArcFace, CosFace
from tokenret.models.registry import create_model, get_model_config, list_models
from tokenret.models.retrieval import RetrievalModel
from tokenret.models.token import TokenHead

__all__ = [
    "ArcFace",
    "CosFace",
    "ResNetTrunk",
    "RetrievalModel",
    "TokenHead",
    "create_model",
    "get_model_config",
    "list_models",
]
