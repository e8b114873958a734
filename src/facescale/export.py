"""Inference side of a trained backbone: loading weights, ONNX export, embedding image files.

The ONNX graph takes ``input`` float32 ``[batch, 3, 112, 112]`` in [-1, 1] (RGB) and returns
``embedding`` float32 ``[batch, D]``; the batch dimension is dynamic. An fp16 export keeps that
float32 interface and stores weights and computes in float16 inside.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from facescale.errors import InputError
from facescale.eval.align import FaceCrops
from facescale.eval.embedding import embed_batches, eval_mode, l2_normalize
from facescale.face import FACE_SIZE
from facescale.precision import full_float32

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
ONNX_OPSET = 18
# ONNX keeps a model in one protobuf file only below 2 GiB; larger weights go to a side file.
SINGLE_FILE_LIMIT = 2**31 - 2**26


def load_backbone(network: str, weights: str | Path, embedding_size: int = 512) -> nn.Module:
    """Backbone ``network`` in eval mode with the weights of an arcface_torch ``model.pt`` /
    ``backbone.pth`` or of a facescale checkpoint's ``common.pt`` (checked against its
    folder's manifest)."""
    from facescale.backbones import get_model, load_arcface_torch
    from facescale.backbones.arcface_torch import fitting_networks, read_state_dict
    from facescale.train.checkpoint import backbone_weights, verify_file

    verify_file(weights)
    state = backbone_weights(read_state_dict(weights), weights, network, embedding_size)
    model = get_model(network, embedding_size)
    try:
        load_arcface_torch(model, state)
    except InputError as err:
        fitting = fitting_networks(state)
        hint = f"; it loads with {' or '.join(fitting)}" if fitting else ""
        raise InputError(
            f"{weights}: {err} (given: --network {network} --embedding-size {embedding_size}){hint}"
        ) from None
    return model.eval()


def _parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def export_onnx(
    model: nn.Module, path: str | Path, fp16: bool = False, opset: int = ONNX_OPSET
) -> Path:
    """Write ``model`` as ONNX with a dynamic batch dimension; ``fp16`` halves the weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    example = torch.rand(2, 3, FACE_SIZE, FACE_SIZE, device=device) * 2 - 1
    external = _parameter_bytes(model) >= SINGLE_FILE_LIMIT
    with eval_mode(model), _quiet_exporter():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            verbose=False,
        )
    if not fp16:
        program.save(path, external_data=external)
        return path
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():
        # The converter clamps weights of magnitude below 1e-7 to 1e-7 and says so for each.
        warnings.filterwarnings("ignore", "the float32 number", UserWarning)
        half = float16.convert_float_to_float16(
            program.model_proto, keep_io_types=True, disable_shape_infer=external
        )
    onnx.save_model(half, path, save_as_external_data=external)
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's notes that never concern a face model: torchvision's detection
    ops being absent, and a deprecation raised inside torch itself."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def onnx_session(path: str | Path) -> onnxruntime.InferenceSession:
    """An onnxruntime session for an exported model (CUDA first when onnxruntime has it)."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return onnxruntime.InferenceSession(str(path), providers=wanted)


def onnx_embeddings(session: onnxruntime.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Run an exported model on float32 images ``[B, 3, 112, 112]`` in [-1, 1]."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32)})[0]


def max_relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    """Largest ``|other - reference| / |reference|`` over rows (L2 norms)."""
    diff = np.linalg.norm(other.astype(np.float64) - reference, axis=1)
    return float((diff / np.linalg.norm(reference.astype(np.float64), axis=1)).max())


def compare_onnx(model: nn.Module, path: str | Path, batch: int = 3, seed: int = 0) -> float:
    """Max relative difference between onnxruntime and PyTorch embeddings on random images."""
    shape = (batch, 3, FACE_SIZE, FACE_SIZE)
    images = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with eval_mode(model), full_float32():  # TF32 would differ from onnxruntime by ~1e-3
        expected = model(images.to(next(model.parameters()).device)).float().cpu().numpy()
    return max_relative_error(expected, onnx_embeddings(onnx_session(path), images.numpy()))


def read_landmarks(path: str | Path) -> dict[str, np.ndarray]:
    """Five landmarks per image from a text file of rows ``name x1 y1 ... x5 y5 [score]``."""
    path = Path(path)
    landmarks = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (11, 12):
            raise InputError(
                f"{path}:{number}: {len(fields)} fields; expected `name x1 y1 ... x5 y5 [score]`"
            )
        try:
            landmarks[fields[0]] = np.array(fields[1:11], dtype=np.float64).reshape(5, 2)
        except ValueError:
            raise InputError(f"{path}:{number}: a landmark coordinate is not a number") from None
    return landmarks


def landmarks_for(
    paths: Sequence[Path], table: Mapping[str, np.ndarray], source: Path
) -> np.ndarray:
    """``[N, 5, 2]`` landmarks of ``paths``, looked up by file name, then by full path."""
    rows = []
    for path in paths:
        found = table.get(path.name, table.get(str(path)))
        if found is None:
            raise InputError(f"{source}: no landmarks for {path} (rows are keyed by file name)")
        rows.append(found)
    return np.stack(rows)


def embed_files(
    model: nn.Module,
    paths: Sequence[str | Path],
    landmarks: np.ndarray | None = None,
    batch_size: int = 64,
    device: torch.device | None = None,
    flip: bool = True,
    num_workers: int = 0,
) -> np.ndarray:
    """L2-normalised float32 embeddings ``[N, D]`` of image files, aligned when landmarks
    ``[N, 5, 2]`` are given, otherwise fitted to 112x112 (``FaceCrops``)."""
    crops = FaceCrops(paths, landmarks)
    loader = torch.utils.data.DataLoader(crops, batch_size=batch_size, num_workers=num_workers)
    features, _ = embed_batches(model, loader, device or torch.device("cpu"), flip=flip)
    return l2_normalize(features)
