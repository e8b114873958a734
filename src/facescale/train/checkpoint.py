"""Crash-safe checkpoints that resume on any number of ranks: the one home of their format.

A checkpoint is a folder ``checkpoints/step_XXXXXXXXX`` holding ``common.pt`` (written by
rank 0, :func:`common_state`: backbone, its optimizer, scaler, weight average, counters, the
config fields that must match), one ``rank_R.pt`` per rank (:func:`rank_state`: its shard of class
centers with their optimizer state, its RNG states, its data position) and ``manifest.json``,
written last, with the size and SHA-256 of every file's bytes as written. Files are written
into ``step_XXXXXXXXX.partial`` and the folder is renamed into place only when every rank
has finished, so a crash at any moment leaves the previous checkpoints intact. A resume
checks every file against the manifest and falls back to the newest intact checkpoint.
Loading uses ``torch.load(weights_only=True)``: a checkpoint file cannot run code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from facescale.config import Config, Schedule
from facescale.distributed import DistEnv, barrier, gather_objects
from facescale.errors import InputError, UserError
from facescale.seeding import rank_seed, seed_everything
from facescale.torch_files import load_refusal
from facescale.train.weight_average import WeightAverage

if TYPE_CHECKING:
    from facescale.train.build import Components

log = logging.getLogger("facescale.train")

STEP_DIR = re.compile(r"^step_(\d{9})$")
UNFINISHED_DIR = re.compile(r"^step_(\d{9})\.partial$")
MANIFEST = "manifest.json"
# Fields that must agree between a checkpoint and the config that resumes from it.
MATCHING_FIELDS = ("network", "num_classes", "embedding_size")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file or field."""


class FileWriteError(UserError, OSError):
    """A checkpoint or model file that could not be written (a full disk, a size limit); the
    message names the file and the cause."""


class FileDigest(NamedTuple):
    """A file's size and the SHA-256 of its bytes as written, to recognise it intact later."""

    size: int
    sha256: str


@dataclass
class Progress:
    """Counters that a checkpoint restores: optimizer steps done, the epoch, the seconds
    trained (what a time budget counts), and so on."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    nonfinite_in_row: int = 0
    elapsed_s: float = 0.0
    best: dict[str, float] = field(default_factory=dict)


def common_state(
    identity: Mapping[str, Any],
    schedule: Schedule,
    progress: Progress,
    backbone: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    average: WeightAverage | None = None,
) -> dict[str, Any]:
    """What ``common.pt`` holds: ``identity`` is the config's :data:`MATCHING_FIELDS`; the
    schedule's world size and samples per optimizer step let a resume keep the schedule."""
    return {
        **identity,
        "world_size": schedule.world_size,
        "samples_per_step": schedule.samples_per_step,
        "progress": vars(progress),
        "backbone": backbone.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "weight_average": average.state_dict() if average else None,
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


def backbone_weights(
    state: Mapping[str, Any], where: str | Path, network: str, embedding_size: int
) -> Mapping[str, Any]:
    """The backbone's state dict from a loaded ``common.pt``, or ``state`` itself (a
    ``model.pt``); refuses a ``rank_R.pt`` and a checkpoint of another network or embedding
    size, naming the file to give instead or the network and size it holds."""
    if "head_start" in state and "head" in state:
        raise InputError(
            f"{where}: one rank's share of the class centers of a facescale checkpoint, with "
            "no backbone in it; give common.pt from the same folder, or OUTPUT/model.pt"
        )
    backbone = state.get("backbone")
    if not isinstance(backbone, Mapping):
        return state
    saved = (state.get("network"), state.get("embedding_size"))
    if saved != (network, embedding_size):
        raise InputError(
            f"{where}: a checkpoint of network={saved[0]} with embedding_size={saved[1]}, "
            f"not network={network} with embedding_size={embedding_size}; load it with "
            f"--network {saved[0]} --embedding-size {saved[1]}"
        )
    return backbone


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A binary file that hashes the bytes passing through it, so a digest costs no re-read;
    it keeps the OSError of a failed write, which torch.save would replace by its own."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.hash, self.size = file, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = err
            raise
        self.hash.update(data)
        self.size += memoryview(data).nbytes
        return written

    def flush(self) -> None:
        self.file.flush()


def _write_error(path: Path, err: OSError) -> FileWriteError:
    """The error for a file that could not be written: the file, the cause, what to do."""
    full = err.errno == errno.ENOSPC or "no space left" in str(err).lower()
    cause = "no space left on the device" if full else (err.strerror or str(err))
    return FileWriteError(
        f"{path}: cannot be written ({cause}); make room or set output to a disk with space, "
        "then rerun with resume=True (the checkpoints written before are intact)"
    )


def atomic_save(obj: Any, path: str | Path) -> FileDigest:
    """Write ``obj`` with torch.save via a temporary file, fsync and rename: all or nothing.

    Returns the file's size and SHA-256, computed while writing. A failed write removes the
    temporary file and raises :class:`FileWriteError` naming ``path`` and the cause.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer and writer.error else err
        if isinstance(cause, OSError):
            raise _write_error(path, cause) from err
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return FileDigest(writer.size, writer.hash.hexdigest())


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """Load a file written by :func:`atomic_save` without executing code from it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be loaded safely: {load_refusal(err)}") from err


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
    """Checkpoint folders under ``root`` (each renamed into place once written), oldest first;
    :func:`find_damage` tells whether their files are still intact."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)


def remove_unfinished(root: str | Path) -> list[Path]:
    """Delete the ``step_*.partial`` folders that an interrupted save left under ``root`` (they
    may hold most of a full disk); returns them."""
    root = Path(root)
    found = [p for p in root.iterdir() if UNFINISHED_DIR.match(p.name)] if root.is_dir() else []
    for folder in found:
        shutil.rmtree(folder)
    return found


def _write_manifest(folder: Path, files: Mapping[str, FileDigest]) -> None:
    path = folder / MANIFEST
    listing = {name: files[name]._asdict() for name in sorted(files)}
    try:
        with open(path, "w") as f:
            json.dump({"files": listing}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise _write_error(path, err) from err


def read_manifest(folder: Path) -> dict[str, FileDigest]:
    """The files of checkpoint ``folder`` with their size and SHA-256 as written."""
    path = folder / MANIFEST
    try:
        listing = json.loads(path.read_text())["files"]
        return {name: FileDigest(**entry) for name, entry in listing.items()}
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing, so the files cannot be checked") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({err!r})") from None


def file_damage(path: Path, written: FileDigest) -> str | None:
    """Why ``path`` is not the file that was written, or None when its bytes are intact."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != written.size:
        return f"{path} has {size} bytes where {written.size} were written"
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != written.sha256:
            return f"{path} has changed since it was written (its SHA-256 differs)"
    return None


def find_damage(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """What is wrong with checkpoint ``folder``'s files (empty: intact). Collective over the
    ranks: each hashes its share of the files and every rank gets the same answer. A complete
    checkpoint without a manifest (written before checkpoints carried one) has nothing to be
    checked against and is taken as it is."""
    if is_unverified(folder):
        return []
    try:
        files = read_manifest(folder)
    except CheckpointError as err:
        return [str(err)]  # every rank read the same manifest
    names = sorted(files)[rank::world_size]
    mine = [problem for name in names if (problem := file_damage(folder / name, files[name]))]
    return sorted(problem for found in gather_objects(mine) for problem in found)


def is_unverified(folder: Path) -> bool:
    """A checkpoint written before checkpoints carried a manifest (its ``common.pt`` has no
    ``samples_per_step`` either): nothing to check its files against."""
    if (folder / MANIFEST).exists() or not (folder / "common.pt").is_file():
        return False
    try:
        common = safe_load(folder / "common.pt", mmap=True)
    except CheckpointError:
        return False
    return "progress" in common and "samples_per_step" not in common


def verify_file(path: str | Path) -> None:
    """Refuse a checkpoint file whose bytes differ from those its folder's manifest records;
    a file without a manifest beside it (``model.pt``, another tool's file) is not checked."""
    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        return
    written = read_manifest(path.parent).get(path.name)
    problem = written and file_damage(path, written)
    if problem:
        raise CheckpointError(
            f"{problem}: the file is damaged; use an older checkpoint folder, or OUTPUT/model.pt"
        )


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
    written = {f"rank_{rank}.pt": atomic_save(rank_state, partial / f"rank_{rank}.pt")}
    if rank == 0:
        assert common is not None
        written["common.pt"] = atomic_save(common, partial / "common.pt")
    everyone = gather_objects(written)  # also waits until every rank has written its file
    if rank == 0:
        _write_manifest(partial, {name: d for files in everyone for name, d in files.items()})
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


def check_schedule(saved: Mapping[str, Any], schedule: Schedule, cfg: Config, where: Path) -> None:
    """Refuse a resume that would change the schedule (steps of another number of samples)
    or that starts past its end, saying how to keep it. (Checkpoints written before they
    recorded their step's samples are taken at their word.)"""
    samples, world = saved.get("samples_per_step"), saved["world_size"]
    if samples is not None and samples != schedule.samples_per_step:
        per_rank = samples / (schedule.world_size * cfg.gradient_acc)
        keep = (
            f"set batch_size={int(per_rank)} to keep it"
            if per_rank.is_integer()
            else f"choose batch_size x gradient_acc x {schedule.world_size} ranks = {samples} "
            f"to keep it, or resume on {world} ranks"
        )
        raise CheckpointError(
            f"{where}: the checkpoint's optimizer steps took {samples} samples ({world} ranks) "
            f"and this run's would take {schedule.samples_per_step} (batch_size "
            f"{cfg.batch_size} x {schedule.world_size} ranks x gradient_acc {cfg.gradient_acc}); "
            f"epochs and the learning rate are counted in steps, so {keep}"
        )
    step = saved["progress"]["step"]
    if step > schedule.total_steps and not cfg.time_budget:
        raise CheckpointError(
            f"{where}: the checkpoint is at step {step}, past the end of this run's schedule "
            f"({cfg.num_epoch} epochs of {schedule.steps_per_epoch} steps = "
            f"{schedule.total_steps}); raise num_epoch to train further, or use the finished "
            f"run's model.pt"
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
        saved_world = saved["world_size"]
        head, s0, c0 = saved["head"], saved["head_start"], saved["head_count"]
        lo, hi = max(start, s0), min(start + count, s0 + c0)
        same_rank = int(path.stem.split("_")[1]) == rank
        for key, value in head.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == c0:
                if lo < hi:
                    pieces.setdefault(key, []).append(value[lo - s0 : hi - s0].clone())
            elif same_rank or key not in scalars:
                scalars[key] = value
    found = {path.name for path in files}
    missing = [name for r in range(saved_world) if (name := f"rank_{r}.pt") not in found]
    if missing:
        raise CheckpointError(
            f"{folder}: {', '.join(missing)} missing (the checkpoint was saved on {saved_world} "
            "ranks); the checkpoint is incomplete"
        )
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
    once (collective), :meth:`restore` loads the newest intact one onto any number of ranks."""

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
                parts.schedule,
                progress,
                parts.backbone,
                parts.optimizer,
                parts.scaler,
                parts.average,
            )
        path = save_checkpoint(
            self.root, progress.step, common, mine, env.rank, self.cfg.keep_checkpoints
        )
        if env.is_main:
            log.info("checkpoint written: %s", path)

    def remove_unfinished(self) -> None:
        """Delete what interrupted saves left behind (rank 0, before the first save)."""
        for folder in remove_unfinished(self.root):
            log.warning("removed %s, left by a checkpoint save that did not finish", folder)

    def newest_intact(self) -> Path | None:
        """The newest checkpoint whose files are all as written (the same on every rank), with
        a warning for each newer one skipped; None when there is none at all."""
        found = list_checkpoints(self.root)
        if not found:
            return None
        damaged = []
        for folder in reversed(found):
            damage = find_damage(folder, self.env.rank, self.env.world_size)
            if not damage:
                if is_unverified(folder) and self.env.is_main:
                    log.warning(
                        "resume: %s has no %s; its files are not verified", folder, MANIFEST
                    )
                return folder
            damaged.append(f"{folder.name}: {'; '.join(damage)}")
            if self.env.is_main:
                log.warning("resume: skipping damaged checkpoint: %s", "; ".join(damage))
        raise CheckpointError(
            f"{self.root}: no intact checkpoint to resume from ({' | '.join(damaged)}); copy the "
            "damaged files back from a backup, or move the checkpoints folder away to start anew"
        )

    def restore(self, parts: Components) -> Progress | None:
        """Load the newest intact checkpoint into ``parts``, re-partitioning the head if the
        world changed; its progress, or None when there is none."""
        folder = self.newest_intact()
        if folder is None:
            log.warning("resume: no checkpoint in %s; starting from scratch", self.root)
            return None
        env, cfg = self.env, self.cfg
        common = read_common(folder)
        check_compatible(common, self.identity, folder)
        check_schedule(common, parts.schedule, cfg, folder)
        parts.backbone.load_state_dict(common["backbone"])
        parts.optimizer.load_state_dict(common["optimizer"])
        if parts.average is not None:
            if common.get("weight_average") is None:
                log.warning("resume: %s holds no weight average; it starts anew", folder)
                parts.average = WeightAverage(parts.backbone, cfg.ema_decay)
            else:
                parts.average.load_state_dict(common["weight_average"])
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
            # micro-batches, not steps: a skipped step (fp16 overflow) consumed data too
            position = {"epoch": progress.epoch, "batch": progress.micro_in_epoch}
            parts.loader.load_state_dict(parts.loader.state_dict() | position)
        if env.is_main:
            log.info(
                "resumed from %s (step %d, epoch %d, saved on %d ranks, now %d, %d samples per "
                "step as before)",
                folder,
                progress.step,
                progress.epoch,
                common["world_size"],
                env.world_size,
                parts.schedule.samples_per_step,
            )
        return progress
