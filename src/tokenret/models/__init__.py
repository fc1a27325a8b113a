"""Retrieval models: backbones, the Token head, pooling baselines, SuperGlobal, margin heads, registry,
checkpoints, input conventions."""

from tokenret.models.backbone import ResNetTrunk
from tokenret.models.convention import InputConvention, input_convention
from tokenret.models.margin import ArcFace, CosFace
from tokenret.models.registry import create_model, get_model_config, list_models
from tokenret.models.retrieval import RetrievalModel
from tokenret.models.superglobal import SuperGlobalModel
from tokenret.models.token import TokenHead

__all__ = [
    "ArcFace",
    "CosFace",
    "InputConvention",
    "ResNetTrunk",
    "RetrievalModel",
    "SuperGlobalModel",
    "TokenHead",
    "create_model",
    "get_model_config",
    "input_convention",
    "list_models",
]
