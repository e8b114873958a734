"""Backbone names -> constructors with their published settings; ``get_model`` builds one.

Building is cheap and offline: weights are freshly initialised (load a checkpoint with
:func:`facescale.backbones.load_arcface_torch`). Under ``with torch.device("meta"):`` a
model is built without memory, which is how ``facescale info`` sizes even r2060.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from facescale.backbones.base import Backbone
from facescale.backbones.iresnet import IResNet
from facescale.backbones.mobilefacenet import MobileFaceNet
from facescale.backbones.vit import VisionTransformer
from facescale.errors import InputError
from facescale.precision import requested_dtype


@dataclass(frozen=True)
class ModelSpec:
    """A named architecture: its constructor, fixed arguments and runtime defaults."""

    build: Callable[..., Backbone]
    arguments: Mapping[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False


MODELS: dict[str, ModelSpec] = {
    "r18": ModelSpec(IResNet, {"layers": (2, 2, 2, 2)}),
    "r34": ModelSpec(IResNet, {"layers": (3, 4, 6, 3)}),
    "r50": ModelSpec(IResNet, {"layers": (3, 4, 14, 3)}),
    "r100": ModelSpec(IResNet, {"layers": (3, 13, 30, 3)}),
    "r200": ModelSpec(IResNet, {"layers": (6, 26, 60, 6)}),
    # 1030 blocks of two 3x3 convs: 2060 conv layers.
    "r2060": ModelSpec(IResNet, {"layers": (3, 128, 896, 3)}, gradient_checkpointing=True),
    "mbf": ModelSpec(MobileFaceNet, {"blocks": (1, 4, 6, 2), "scale": 2}),
    "mbf_small": ModelSpec(MobileFaceNet, {"blocks": (1, 4, 6, 2), "scale": 1}),
    "mbf_large": ModelSpec(MobileFaceNet, {"blocks": (2, 8, 12, 4), "scale": 4}),
    "vit_t": ModelSpec(VisionTransformer, {"dim": 256, "depth": 12}),
    "vit_s": ModelSpec(VisionTransformer, {"dim": 512, "depth": 12}),
    "vit_b": ModelSpec(VisionTransformer, {"dim": 512, "depth": 24}, gradient_checkpointing=True),
    "vit_l": ModelSpec(
        VisionTransformer,
        {"dim": 768, "depth": 24, "drop_path_rate": 0.05, "mask_ratio": 0.05},
        gradient_checkpointing=True,
    ),
}


def list_models() -> list[str]:
    """The backbone names ``get_model`` accepts."""
    return list(MODELS)


def model_spec(name: str) -> ModelSpec:
    """The spec registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown backbone {name!r}; valid names: {', '.join(list_models())}"
        ) from None


def get_model(
    name: str,
    embedding_size: int = 512,
    *,
    dropout: float = 0.0,
    fp16: bool = False,
    bf16: bool = False,
    gradient_checkpointing: bool | None = None,
    channels_last: bool = False,
    **kwargs: Any,
) -> Backbone:
    """Build backbone ``name`` producing ``embedding_size``-d float32 embeddings.

    ``fp16``/``bf16`` run the body under autocast (the head stays fp32);
    ``gradient_checkpointing=None`` takes the model's default (on for r2060, vit_b, vit_l);
    ``kwargs`` override architecture arguments, e.g. ``mask_ratio=0.0`` for a ViT.
    """
    spec = model_spec(name)
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {dropout}")
    _check_arguments(name, spec, kwargs)
    body_dtype = requested_dtype(fp16, bf16)
    model = spec.build(
        embedding_size=embedding_size, dropout=dropout, **{**spec.arguments, **kwargs}
    )
    model.amp_dtype = body_dtype
    model.gradient_checkpointing = (
        spec.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    )
    return model.to_channels_last() if channels_last else model


def _check_arguments(name: str, spec: ModelSpec, kwargs: Mapping[str, Any]) -> None:
    accepted = set(inspect.signature(spec.build).parameters) - {"embedding_size", "dropout"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise InputError(
            f"backbone {name!r} takes no argument {', '.join(unknown)}; "
            f"its architecture arguments are: {', '.join(sorted(accepted))}"
        )
