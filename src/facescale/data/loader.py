"""The training loader: one rank's batches, made in worker processes, delivered on the device.

Workers make whole uint8 batches (batches.py); the loader normalises them to float32 in
[-1, 1] on the device (after a pinned, non-blocking copy on a side stream when the device is
CUDA). Every rank yields ``len(loader)`` batches per epoch (the remainder is dropped), and
``state_dict()`` resumes exactly mid-epoch. ``build_train_loader`` makes one from a config.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from facescale.data.augment import Augmentation
from facescale.data.batches import BatchMaker, BatchTask
from facescale.data.order import EpochPlan, ReadOrder
from facescale.data.recordio import RecordError
from facescale.data.shard_source import ShardSource, is_shard_spec
from facescale.data.sources import FolderSource, RecordSource, Source, SyntheticSource
from facescale.face import to_model_input

log = logging.getLogger(__name__)

RUNS_PER_WINDOW = 8
Batch = tuple[torch.Tensor, torch.Tensor]


class PassTasks(Sampler):
    """The tasks of the batches ``[start, stop)`` of the current pass, planned in this process."""

    def __init__(self, plan: EpochPlan) -> None:
        self.plan, self.pass_id, self.start, self.stop = plan, 0, 0, 0

    def __iter__(self) -> Iterator[BatchTask]:
        return (BatchTask.of(self.plan, self.pass_id, j) for j in range(self.start, self.stop))


class TrainLoader:
    """One rank's training batches: ``set_epoch``, ``len``, iteration and exact resume.

    Worker processes start once and stay for every epoch (persistent workers).
    """

    def __init__(
        self,
        maker: BatchMaker,
        order: ReadOrder,
        num_workers: int,
        device: torch.device,
        prefetch_factor: int = 2,
    ) -> None:
        self.maker, self.order, self.num_workers = maker, order, num_workers
        self.device, self.prefetch_factor = torch.device(device), prefetch_factor
        self.epoch = 0
        self._start = 0
        self._position = 0
        self.skipped = 0
        self._tasks = PassTasks(order.epoch(0))
        self._workers: DataLoader | None = None

    def __len__(self) -> int:
        return self.order.num_batches

    @property
    def checked_rows(self) -> int:
        """The rows of every batch on every rank; the sources check each label against
        ``num_classes`` as they parse it, so a head given these sizes skips its own checks."""
        return self.order.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch to read; a restored mid-epoch position is kept for the same epoch."""
        if epoch != self.epoch:
            self.epoch, self._start, self._position = epoch, 0, 0

    def _batches(self) -> DataLoader:
        if self._workers is None:
            workers = self.num_workers > 0
            self._workers = DataLoader(
                self.maker,
                batch_size=None,
                sampler=self._tasks,
                num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=self.prefetch_factor if workers else None,
                persistent_workers=workers,
                collate_fn=_as_is,
            )
        return self._workers

    def __iter__(self) -> Iterator[Batch]:
        batches = self._host_stream()
        if self.device.type == "cuda":
            batches = _cuda_prefetch(batches, self.device)
        else:
            batches = ((to_model_input(images), labels) for images, labels in batches)
        for batch in batches:
            self._position += 1
            yield batch

    def host_batches(self) -> Iterator[Batch]:
        """The same batches as iterating, before the device step: uint8 [B,3,112,112] images
        and int64 labels on the host. The images are valid until the next batch is asked
        for (worker processes reuse their memory): copy them to keep them."""
        for batch in self._host_stream():
            self._position += 1
            yield batch

    def _host_stream(self) -> Iterator[Batch]:
        """Batches from the workers; each one's memory is released when the next is asked for."""
        start, self._start = self._start, 0
        self._position = start
        tasks = self._tasks
        if (tasks.plan.order, tasks.plan.epoch) != (self.order, self.epoch):
            tasks.plan = self.order.epoch(self.epoch)
        tasks.pass_id, tasks.start, tasks.stop = tasks.pass_id + 1, start, len(self)
        self.maker.progress.publish(tasks.pass_id, start)
        mapped: deque[torch.Tensor] = deque(maxlen=self.maker.ring_size * self.num_workers)
        for done, (images, labels, skipped) in enumerate(self._batches(), start + 1):
            if skipped:
                self.skipped += len(skipped)
                log.warning(
                    "skipped %d bad records (%d so far): %s", len(skipped), self.skipped, skipped[0]
                )
            mapped.append(images)  # keeps the worker buffers mapped here: no remapping
            yield images, torch.from_numpy(labels)
            self.maker.progress.publish(tasks.pass_id, done)  # the consumer has moved on

    def close(self) -> None:
        """Stop the worker processes now; the next iteration starts new ones."""
        self._workers = None

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the batches already yielded in it, and what the order depends on."""
        order = {k: v for k, v in self.order.to_dict().items() if k != "rank"}
        return {"epoch": self.epoch, "batch": self._position, "order": order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position: the next iteration yields the remaining batches.

        The saved number of read streams is kept, so the rest of the run reads in the same
        order as the run that saved it, whatever ``num_workers`` is now.
        """
        saved = dict(state["order"])
        ours = {k: v for k, v in self.order.to_dict().items() if k != "rank"}
        differ = {
            k: (saved.get(k), v) for k, v in ours.items() if k != "streams" and saved.get(k) != v
        }
        if differ:
            detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in differ.items())
            raise ValueError(
                f"loader state does not match this run ({detail}); resume with the same data, "
                f"batch_size, world size, seed and shuffle_buffer, or start the epoch over"
            )
        if saved["streams"] != self.order.streams:
            log.info("resuming with the saved order of %d read streams", saved["streams"])
            self.order = dataclasses.replace(self.order, streams=saved["streams"])
        self.epoch, self._start = int(state["epoch"]), int(state["batch"])
        self._position = self._start


def _as_is(batch: Any) -> Any:
    """The collate step: batches are made whole by BatchMaker (labels stay a numpy array)."""
    return batch


def _cuda_prefetch(batches: Iterable, device: torch.device) -> Iterator:
    """Copy and normalise batch j+1 on a side stream while batch j is in use."""
    stream = torch.cuda.Stream(device)
    pending = None
    for images, labels in batches:
        with torch.cuda.stream(stream):
            images = to_model_input(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
        if pending is not None:
            yield _hand_over(pending, stream)
        pending = (images, labels)
    if pending is not None:
        yield _hand_over(pending, stream)


def _hand_over(batch: tuple, stream: torch.cuda.Stream) -> tuple:
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    batch[0].record_stream(current)
    batch[1].record_stream(current)
    return batch


def open_source(cfg: Any) -> Source:
    """The source ``cfg.rec`` names: 'synthetic', a folder with train.rec, a .rec, WebDataset
    shards (a pattern, a list, a manifest or its folder), or an image folder."""
    if cfg.rec == "synthetic":
        return SyntheticSource(cfg.num_image, cfg.num_classes, cfg.seed)
    if is_shard_spec(cfg.rec):
        return ShardSource(cfg.rec, cfg.num_classes)
    path = Path(cfg.rec)
    if path.suffix == ".rec" and path.is_file():
        return RecordSource(path, cfg.num_classes)
    if (path / "train.rec").is_file():
        return RecordSource(path / "train.rec", cfg.num_classes)
    if path.is_dir():
        return FolderSource(path, cfg.num_classes)
    raise FileNotFoundError(
        f"rec={cfg.rec!r}: not found; give a folder holding train.rec/train.idx/property, "
        f"a .rec file, shards (a .tar pattern, a list or a manifest.json), an image folder "
        f"(one sub-folder per identity) or 'synthetic'"
    )


def data_folder(rec: str | list[str]) -> Path | None:
    """The local folder of the training data, where verification ``.bin`` files are looked
    for: the dataset or image folder itself, else the folder of the (first) file named."""
    first = rec if isinstance(rec, str) else rec[0]
    if first == "synthetic" or "://" in first:
        return None
    path = Path(first)
    return path if path.is_dir() else path.parent


def check_sizes(source: Source, cfg: Any) -> None:
    """Warn when the data and the config disagree on counts; fail when labels cannot fit."""
    declared = source.declared_classes()
    if declared is not None and declared > cfg.num_classes:
        raise RecordError(
            f"{source.describe()} declares {declared} identities but num_classes="
            f"{cfg.num_classes}; labels would fall outside the classifier: set num_classes"
        )
    if declared is not None and declared < cfg.num_classes:
        log.warning(
            "%s declares %d identities, config num_classes=%d",
            source.describe(),
            declared,
            cfg.num_classes,
        )
    if len(source) != cfg.num_image:
        log.warning(
            "%s holds %d images, config num_image=%d (the step schedule uses num_image)",
            source.describe(),
            len(source),
            cfg.num_image,
        )


def read_order_kind(cfg: Any, source: Source) -> str:
    """'sequential' or 'random'; ``auto`` reads a shuffled .rec or shards sequentially, the rest
    randomly."""
    streamed = isinstance(source, (RecordSource, ShardSource))
    sorted_data = streamed and source.looks_sorted()
    if cfg.data_order == "auto":
        if sorted_data:
            log.info(
                "%s is sorted by identity: reading it in random order; `facescale convert "
                "shuffle` (or rec2shards --shuffle) makes a copy that reads sequentially (faster)",
                source.describe(),
            )
        return "sequential" if streamed and not sorted_data else "random"
    if cfg.data_order == "sequential" and sorted_data:
        log.warning(
            "%s is sorted by identity: sequential reading mixes only shuffle_buffer=%d records, "
            "so batches hold few identities; run `facescale convert shuffle` (or rec2shards "
            "--shuffle) first",
            source.describe(),
            cfg.shuffle_buffer,
        )
    return cfg.data_order


def build_train_loader(
    cfg: Any, rank: int, world_size: int, device: torch.device | str
) -> TrainLoader:
    """The training loader of ``rank`` for the data, batch size and order that ``cfg`` sets."""
    source = open_source(cfg)
    check_sizes(source, cfg)
    sequential = read_order_kind(cfg, source) == "sequential"
    window_batches = max(1, cfg.shuffle_buffer // cfg.batch_size) if sequential else 1
    window = window_batches * cfg.batch_size
    order = ReadOrder(
        num_records=len(source),
        world_size=world_size,
        rank=rank,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        block=-(-window // RUNS_PER_WINDOW) if sequential else 1,
        window_batches=window_batches,
        streams=max(1, cfg.num_workers) if sequential else 1,
    )
    prefetch = 2
    # a worker has at most `prefetch` batches in flight, plus one copied out and one on a stream
    maker = BatchMaker(source, Augmentation.of(cfg), cfg.skip_bad_records, ring_size=prefetch + 3)
    return TrainLoader(maker, order, cfg.num_workers, torch.device(device), prefetch)
