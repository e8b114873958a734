"""Face-recognition backbones (IResNet, MobileFaceNet, ViT) behind one name registry.

``get_model(name, embedding_size)`` builds one; ``load_arcface_torch`` loads an existing
arcface_torch checkpoint into it; ``model_info`` reports parameters and FLOPs.
"""

from facescale.backbones.arcface_torch import load_arcface_torch
from facescale.backbones.base import Backbone
from facescale.backbones.info import ModelInfo, model_info
from facescale.backbones.registry import get_model, list_models

__all__ = [
    "Backbone",
    "ModelInfo",
    "get_model",
    "list_models",
    "load_arcface_torch",
    "model_info",
]
