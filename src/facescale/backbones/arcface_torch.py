"""Load arcface_torch backbone checkpoints (``backbone.pth``, ``model.pt``) into facescale models.

facescale's module names equal arcface_torch's, so a checkpoint's keys map one-to-one.
The only adjustments, all made in :func:`to_facescale_keys`: the ``state_dict_backbone``
entry of a full training checkpoint is unwrapped, a DistributedDataParallel ``module.``
prefix is stripped, and a ViT ``mask_token`` is dropped when the model is built without
masking (``mask_ratio=0``), where it would be an unused parameter.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from facescale.errors import InputError
from facescale.torch_files import load_refusal

DDP_PREFIX = "module."
LISTED = 8  # keys named per kind of problem in an error message


def read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint file (read with ``weights_only=True``) or a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such checkpoint; "
            "give the backbone.pth or model.pt that arcface_torch saved"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise InputError(
            f"{path}: not a state dict that can be read safely: {load_refusal(err)}"
        ) from err
    if not isinstance(state, Mapping):
        raise InputError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return dict(state)


def to_facescale_keys(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """The one place where arcface_torch checkpoint keys are adapted to ``model``."""
    state = state.get("state_dict_backbone", state)
    renamed = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}
    if "mask_token" in renamed and not hasattr(model, "mask_token"):
        del renamed["mask_token"]
    return renamed


def load_arcface_torch(
    model: nn.Module, source: str | Path | Mapping[str, torch.Tensor]
) -> nn.Module:
    """Load an arcface_torch backbone state dict (path or mapping) into ``model``, strictly.

    Raises ValueError naming the missing keys, unexpected keys and shape mismatches when
    the checkpoint was trained for another network or embedding size.
    """
    where = str(source) if isinstance(source, (str, Path)) else "state dict"
    state = to_facescale_keys(read_state_dict(source), model)
    not_tensors = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise InputError(f"{where}: entries that are not tensors: {_names(not_tensors)}")
    problems = _mismatches(model.state_dict(), state)
    if problems:
        raise InputError(
            f"{where} does not fit {type(model).__name__}"
            f"(embedding_size={getattr(model, 'embedding_size', '?')}): {'; '.join(problems)}. "
            "Build the model with the network name and embedding_size the checkpoint was "
            "trained with"
        )
    model.load_state_dict(state)
    return model


def fitting_networks(source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """``--network NAME --embedding-size N`` for each registered backbone that loads ``source``
    strictly: what to suggest when a checkpoint was given with the wrong network."""
    from facescale.backbones.registry import get_model, list_models

    state = read_state_dict(source)
    fitting = []
    for name in list_models():
        with torch.device("meta"):
            model = get_model(name)
        renamed = to_facescale_keys(state, model)
        if renamed.keys() != model.state_dict().keys():
            continue  # the names do not depend on the embedding size: not this network
        # Every family ends in a BatchNorm as wide as the embedding, so its width is among these.
        sizes = {value.shape[0] for key, value in renamed.items() if key.endswith("running_mean")}
        for size in sorted(sizes):
            with torch.device("meta"):
                candidate = get_model(name, size)
            if not _mismatches(candidate.state_dict(), renamed):
                fitting.append(f"--network {name} --embedding-size {size}")
    return fitting


def _mismatches(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> list[str]:
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    shapes = [
        f"{key} {list(given[key].shape)} in the checkpoint vs {list(value.shape)} in the model"
        for key, value in expected.items()
        if key in given and given[key].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_names(shapes)})")
    return problems


def _names(items: list[str]) -> str:
    more = f", ... {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more
