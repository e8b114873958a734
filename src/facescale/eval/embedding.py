"""Images to embeddings: the backbone's input scaling and the flip-sum every evaluation uses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from facescale.errors import InputError
from facescale.face import to_model_input


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode without autograd, restoring its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def embed_batches(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device,
    flip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed uint8 image batches; with ``flip`` each row is embedding(image) + embedding(mirror).

    Returns the (unnormalised) float32 embeddings ``[N, D]`` and each row's mean L2 norm over
    its single views ``[N]`` (float64), whose mean is the "XNorm" that arcface_torch logs.
    """
    features: list[torch.Tensor] = []
    norms: list[torch.Tensor] = []
    with eval_mode(model):
        for batch in batches:
            images = to_model_input(batch.to(device, non_blocking=True))
            views = [model(images).float()]
            if flip:
                views.append(model(images.flip(3)).float())
            stacked = torch.stack(views)
            norms.append(stacked.double().norm(dim=2).mean(0).cpu())
            features.append(stacked.sum(0).cpu())
    if not features:
        raise InputError("no images to embed")
    return torch.cat(features).numpy(), torch.cat(norms).numpy()


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(features.dtype).tiny)
