"""Crash-safe checkpoints that resume on any number of ranks: the one home of their format.

A checkpoint is a folder ``checkpoints/step_XXXXXXXXX`` holding ``common.pt`` (written by
rank 0, :func:`common_state`: backbone, its optimizer, scaler, counters, the config fields
that must match) and one ``rank_R.pt`` per rank (:func:`rank_state`: its shard of class
centers with their optimizer state, its RNG states, its data position). Files are written
into ``step_XXXXXXXXX.partial`` and the folder is renamed into place only when every rank
has finished, so a crash at any moment leaves the previous checkpoints intact. Loading uses
``torch.load(weights_only=True)``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from facescale.config import Config
from facescale.distributed import DistEnv, barrier
from facescale.errors import UserError
from facescale.seeding import rank_seed, seed_everything

if TYPE_CHECKING:
    from facescale.train.build import Components

log = logging.getLogger("facescale.train")

STEP_DIR = re.compile(r"^step_(\d{9})$")
# Fields that must agree between a checkpoint and the config that resumes from it.
MATCHING_FIELDS = ("network", "num_classes", "embedding_size")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file or field."""


@dataclass
class Progress:
    """Counters that a checkpoint restores: optimizer steps done, the epoch, and so on."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    nonfinite_in_row: int = 0
    best: dict[str, float] = field(default_factory=dict)


def common_state(
    identity: Mapping[str, Any],
    world_size: int,
    progress: Progress,
    backbone: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """What ``common.pt`` holds: ``identity`` is the config's :data:`MATCHING_FIELDS`."""
    return {
        **identity,
        "world_size": world_size,
        "progress": vars(progress),
        "backbone": backbone.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
    }


def rank_state(
    world_size: int,
    head_start: int,
    head_count: int,
    head: Mapping[str, Any],
    loader: Mapping[str, Any],
) -> dict[str, Any]:
    """What ``rank_R.pt`` holds: this rank's head shard, classes ``[head_start, head_start +
    head_count)`` (tensors of ``head_count`` rows are re-sharded on load), its random streams
    and its data position."""
    return {
        "world_size": world_size,
        "head_start": head_start,
        "head_count": head_count,
        "head": dict(head),
        "rng": rng_state(),
        "loader": dict(loader),
    }


def read_common(folder: Path) -> dict[str, Any]:
    return safe_load(folder / "common.pt")


def read_rank(folder: Path, rank: int) -> dict[str, Any]:
    return safe_load(folder / f"rank_{rank}.pt")


def backbone_weights(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The backbone's state dict from a loaded ``common.pt``, or ``state`` itself."""
    backbone = state.get("backbone")
    return backbone if isinstance(backbone, Mapping) else state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with torch.save via a temporary file, fsync and rename: all or nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """Load a file written by :func:`atomic_save` without executing code from it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot be loaded safely ({err}); it is damaged or not a facescale checkpoint"
        ) from err


def rng_state() -> dict[str, Any]:
    """Every random stream this process uses, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "common.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(
    root: str | Path,
    step: int,
    common: dict[str, Any] | None,
    rank_state: dict[str, Any],
    rank: int,
    keep: int,
) -> Path:
    """Write this rank's part of checkpoint ``step``; collective over all ranks.

    ``common`` is given on rank 0 only. The last ``keep`` checkpoints are kept.
    """
    root = Path(root)
    final = root / f"step_{step:09d}"
    partial = root / f"step_{step:09d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    barrier()
    atomic_save(rank_state, partial / f"rank_{rank}.pt")
    if rank == 0:
        assert common is not None
        atomic_save(common, partial / "common.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def check_compatible(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint whose model does not match the config, naming the field."""
    for name in MATCHING_FIELDS:
        if saved.get(name) != current.get(name):
            raise CheckpointError(
                f"{where}: checkpoint has {name}={saved.get(name)!r} but the config has "
                f"{name}={current.get(name)!r}; resume with the config it was trained with "
                f"or start a new run in another output folder"
            )


def load_head_shard(folder: Path, start: int, count: int, rank: int) -> dict[str, Any]:
    """Rebuild this rank's head state for rows [start, start+count) from any saved world size.

    Tensors whose first dimension is the saved shard's row count are per-class state
    (centers, momentum, Adam moments) and are cut and joined row-wise; other entries are
    per-rank values taken from the saved rank with the same number, or rank 0's.
    """
    files = sorted(folder.glob("rank_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise CheckpointError(f"{folder}: no rank_*.pt files; the checkpoint is incomplete")
    pieces: dict[str, list[torch.Tensor]] = {}
    scalars: dict[str, Any] = {}
    for path in files:
        saved = safe_load(path, mmap=True)
        head, s0, c0 = saved["head"], saved["head_start"], saved["head_count"]
        lo, hi = max(start, s0), min(start + count, s0 + c0)
        same_rank = int(path.stem.split("_")[1]) == rank
        for key, value in head.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == c0:
                if lo < hi:
                    pieces.setdefault(key, []).append(value[lo - s0 : hi - s0].clone())
            elif same_rank or key not in scalars:
                scalars[key] = value
    state = dict(scalars)
    for key, parts in pieces.items():
        state[key] = torch.cat(parts) if parts else parts
        if state[key].shape[0] != count:
            raise CheckpointError(
                f"{folder}: saved shards cover {state[key].shape[0]} of rows "
                f"[{start}, {start + count}) for {key!r}; the checkpoint is incomplete"
            )
    return state


class Checkpointer:
    """A run's checkpoints under ``OUTPUT/checkpoints``: :meth:`save` writes the current step
    once (collective), :meth:`restore` loads the newest onto any number of ranks."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.root = Path(cfg.output) / "checkpoints"
        self.identity = {name: getattr(cfg, name) for name in MATCHING_FIELDS}
        self.saved_step = -1

    def save(self, progress: Progress, parts: Components) -> None:
        """Write a checkpoint of ``progress.step`` unless written already or turned off."""
        if self.saved_step == progress.step or not self.cfg.keep_checkpoints:
            return
        self.saved_step = progress.step
        head_state = parts.head.checkpoint_state()
        if head_state is None:
            log.warning("head=%s writes no checkpoints", self.cfg.head)
            return
        env = self.env
        mine = rank_state(
            env.world_size,
            parts.head.class_start,
            parts.head.num_local,
            head_state,
            parts.loader.state_dict(),
        )
        common = None
        if env.is_main:
            common = common_state(
                self.identity,
                env.world_size,
                progress,
                parts.backbone,
                parts.optimizer,
                parts.scaler,
            )
        path = save_checkpoint(
            self.root, progress.step, common, mine, env.rank, self.cfg.keep_checkpoints
        )
        if env.is_main:
            log.info("checkpoint written: %s", path)

    def restore(self, parts: Components) -> Progress | None:
        """Load the newest complete checkpoint into ``parts``, re-partitioning the head if the
        world changed; its progress, or None when there is none."""
        found = list_checkpoints(self.root)
        if not found:
            log.warning("resume: no checkpoint in %s; starting from scratch", self.root)
            return None
        folder, env, cfg = found[-1], self.env, self.cfg
        common = read_common(folder)
        check_compatible(common, self.identity, folder)
        parts.backbone.load_state_dict(common["backbone"])
        parts.optimizer.load_state_dict(common["optimizer"])
        if parts.scaler is not None and common["scaler"] is not None:
            parts.scaler.load_state_dict(common["scaler"])
        progress = Progress(**common["progress"])
        self.saved_step = progress.step  # that checkpoint exists already
        head = parts.head
        head.load_checkpoint_state(
            load_head_shard(folder, head.class_start, head.num_local, env.rank)
        )
        if common["world_size"] == env.world_size:
            mine = read_rank(folder, env.rank)
            set_rng_state(mine["rng"])
            parts.loader.set_epoch(progress.epoch)
            parts.loader.load_state_dict(mine["loader"])
        else:
            # Another world size reads the data in another order: finish the epoch on the
            # new order from the same step (the loader starts there without reading what
            # comes before), and restart the per-rank random streams.
            seed_everything(rank_seed(cfg.seed, env.rank, progress.step))
            done = (progress.step % parts.schedule.steps_per_epoch) * cfg.gradient_acc
            position = {"epoch": progress.epoch, "batch": done}
            parts.loader.load_state_dict(parts.loader.state_dict() | position)
            progress.micro_in_epoch = done
        if env.is_main:
            log.info(
                "resumed from %s (step %d, epoch %d, saved on %d ranks, now %d)",
                folder,
                progress.step,
                progress.epoch,
                common["world_size"],
                env.world_size,
            )
        return progress
