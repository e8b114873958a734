"""Verification during training: the config's ``val_targets`` (names of ``.bin`` sets found
beside the records, or paths of verification sets: a ``.bin`` or a pairs file), embedded by
every rank's share and scored on rank 0, which says what it verifies (a progress bar when
stderr is a terminal). Each rank decodes only its share of a ``.bin``, once per run, and
keeps it for the run's later evaluations; a pairs file is read whole by each rank, once."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from facescale.config import Config
from facescale.data.loader import data_folder
from facescale.distributed import DistEnv, gather_objects, get_world_size
from facescale.eval.verification import VerificationResult
from facescale.train.logger import on_terminal

log = logging.getLogger("facescale.train")

# Images per forward pass when embedding a verification set.
EVAL_BATCH = 64


@dataclass(frozen=True)
class RankShare:
    """One rank's decoded part of a verification set."""

    name: str
    images: torch.Tensor  # uint8 [n, 3, 112, 112]: this rank's contiguous part of the set
    issame: np.ndarray  # the whole set's pairs
    slots: np.ndarray  # the whole set's pairs' rows of its distinct images
    total: int  # distinct images in the whole set


def decode_share(path: Path, env: DistEnv) -> RankShare:
    """Decode this rank's share of the distinct images of the set at ``path``: of a ``.bin``
    only that share (the others' stay encoded); a pairs file (small, of one's own photos) is
    read whole."""
    from facescale.eval.verification import decode_faces, load_verification_set, read_bin

    def share(total: int) -> tuple[int, int]:
        lo, hi = (total * r // env.world_size for r in (env.rank, env.rank + 1))
        return lo, hi

    if path.suffix != ".bin":
        whole = load_verification_set(path)  # a pairs file, decoded whole
        lo, hi = share(len(whole.images))
        images = torch.from_numpy(np.ascontiguousarray(whole.images[lo:hi]))
        return RankShare(whole.name, images, whole.issame, whole.slots, len(whole.images))
    unique, slots, issame = read_bin(path)
    lo, hi = share(len(unique))
    images = torch.from_numpy(decode_faces(unique, slots, path, lo, hi))
    return RankShare(path.stem, images, issame, slots, len(unique))


class Evaluator:
    """10-fold verification accuracy of each val target found; logs a warning for the others."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.env = env
        self.sets: list[Path] = []
        self.shares: dict[Path, RankShare] = {}  # decoded at the first evaluation
        folder = data_folder(cfg.rec)
        for name in cfg.val_targets:
            path = Path(name) if Path(name).suffix else folder and folder / f"{name}.bin"
            if path is None:
                continue
            if path.is_file():
                self.sets.append(path)
            elif env.is_main:
                log.warning("val_targets: %s not found; %s is not evaluated", path, name)

    def __call__(self, backbone: nn.Module, best: dict[str, float]) -> dict[str, float]:
        """Accuracy per target (on rank 0; empty elsewhere), raising ``best`` where beaten."""
        results: dict[str, float] = {}
        if not self.sets:
            return results
        model = as_saved(backbone)
        for path in self.sets:
            if path not in self.shares:
                self.shares[path] = decode_share(path, self.env)
            result = verification_on_ranks(model, self.shares[path], self.env)
            if result is not None:
                results[result.name] = result.accuracy
                best[result.name] = max(result.accuracy, best.get(result.name, 0.0))
        return results


def as_saved(backbone: nn.Module) -> nn.Module:
    """The model rank 0 saves, on every rank: training keeps BatchNorm statistics per rank, so
    a copy takes rank 0's buffers, and every rank embeds its share with the saved model."""
    if get_world_size() == 1:
        return backbone
    model = copy.deepcopy(backbone)
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def verification_on_ranks(
    backbone: nn.Module, share: RankShare | Path, env: DistEnv
) -> VerificationResult | None:
    """10-fold verification of ``backbone`` on a ``.bin`` set (this rank's decoded share, or
    the path to decode it from), the embedding work split over ranks; the result on rank 0,
    None elsewhere."""
    from tqdm import tqdm

    from facescale.eval import embed_batches
    from facescale.eval.verification import score_pairs

    if not isinstance(share, RankShare):
        share = decode_share(Path(share), env)
    if env.is_main:
        log.info(
            "verifying %s: %d pairs, %d distinct images over %d ranks",
            share.name,
            len(share.issame),
            share.total,
            env.world_size,
        )
    images = share.images
    starts = range(0, len(images), EVAL_BATCH)
    batches = tqdm(
        (images[i : i + EVAL_BATCH] for i in starts),
        desc=f"verifying {share.name}",
        total=len(starts),
        unit="batch",
        leave=False,
        mininterval=0,  # a batch is coarse enough to redraw after each
        disable=not (env.is_main and on_terminal()),
    )
    parts = gather_objects(embed_batches(backbone, batches, env.device, flip=True))
    if not env.is_main:
        return None
    features, norms = (np.concatenate(part) for part in zip(*parts, strict=True))
    return score_pairs(features, norms, share.slots, share.issame, share.name)
