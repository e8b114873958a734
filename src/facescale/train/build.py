"""Everything a run needs, built from the config in one visible order.

:func:`build` makes the backbone, applies parallelism to it (:func:`parallelize`), builds the
head with its own optimizer, the backbone's optimizer, the loss scaler, the loader and the
schedule that the loader's length implies. The loop (:mod:`facescale.train.trainer`) only runs
what this returns.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from facescale.backbones import Backbone, get_model
from facescale.config import Config, Schedule
from facescale.distributed import DistEnv, get_world_size
from facescale.errors import ConfigError
from facescale.heads import TrainableHead, build_head
from facescale.heads.losses import build_margin
from facescale.heads.options import resolve_logits_dtype
from facescale.heads.partial_fc import chunk_size_for
from facescale.optim import build_optimizer
from facescale.precision import autocast_dtype, device_dtype
from facescale.seeding import configure_determinism, rank_seed, seed_everything
from facescale.train.weight_average import WeightAverage


class Loader(Protocol):
    """A training loader: batches per epoch, epochs, and a position that resumes."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...  # with "epoch" and "batch" entries

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class Components:
    """What :func:`build` makes for one rank."""

    backbone: nn.Module  # the model that is saved and evaluated
    model: nn.Module  # the backbone as the loop calls it (parallelised, compiled if asked)
    head: TrainableHead
    optimizer: torch.optim.Optimizer  # the backbone's; the head owns its own
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling
    loader: Loader
    schedule: Schedule
    dtype: torch.dtype | None  # the backbone's autocast dtype
    average: WeightAverage | None  # the backbone's weight average (``ema_decay``)

    @property
    def inference_backbone(self) -> nn.Module:
        """What a run evaluates and saves: the weight average where there is one."""
        return self.backbone if self.average is None else self.average.model


def build_backbone(cfg: Config, device: torch.device | None = None) -> Backbone:
    """The backbone the config names, with its ``dropout``, ``gradient_checkpointing`` and
    ``channels_last`` (unset: on for a ``device`` that is a CPU); precision is left to the
    caller's autocast (the head stays fp32)."""
    channels_last = cfg.channels_last
    if channels_last is None:
        channels_last = device is not None and device.type == "cpu"
    return get_model(
        cfg.network,
        cfg.embedding_size,
        dropout=cfg.dropout,
        gradient_checkpointing=cfg.gradient_checkpointing,
        channels_last=channels_last,
    )


def parallelize(backbone: nn.Module, env: DistEnv, dtype: torch.dtype | None) -> nn.Module:
    """The backbone as the loop calls it: data parallel over the ranks (fp16 gradients under
    fp16 on GPUs).

    DDP averages the backbone's gradients over ranks; the head multiplies each rank's
    embedding gradient by the world size, so that average is the global loss's gradient.
    """
    if env.world_size == 1:
        return backbone
    with warnings.catch_warnings():  # its replacement still syncs buffers at init
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
        model = DistributedDataParallel(
            backbone,
            device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            broadcast_buffers=False,  # BatchNorm statistics stay per rank
        )
    if env.device.type == "cuda" and dtype == torch.float16:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return model


def head_logits_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype of the head's logit matmuls: ``head_logits_dtype``, where 'auto' follows the
    backbone's precision on ``device`` (fp16 / bf16, else fp32)."""
    if cfg.head_logits_dtype != "auto":
        return resolve_logits_dtype(cfg.head_logits_dtype)
    return device_dtype(cfg.fp16, cfg.bf16, device) or torch.float32


def build_training_head(cfg: Config, device: torch.device) -> TrainableHead:
    """The config's head on ``device`` (its centers made there), with its optimizer; Partial
    FC runs lean, in chunks of ``head_chunk_size`` classes (0: sized for the device and the
    global batch), its centers and their state stored as ``center_dtype`` and
    ``center_state_dtype``."""
    rows = cfg.batch_size * get_world_size()
    chunk_size = cfg.head_chunk_size or chunk_size_for(device, rows, cfg.embedding_size)
    head: TrainableHead = build_head(
        cfg.head,
        cfg.num_classes,
        cfg.embedding_size,
        build_margin(cfg.loss, cfg.scale, cfg.margin_list),
        sample_rate=cfg.sample_rate,
        lean=cfg.head == "partial_fc",
        interclass_filtering_threshold=cfg.interclass_filtering_threshold,
        logits_dtype=head_logits_dtype(cfg, device),
        seed=cfg.seed,
        chunk_size=chunk_size,
        cache_bytes=cfg.head_cache_mib * 2**20,
        num_subcenters=cfg.num_subcenters,
        center_dtype=cfg.center_dtype,
        center_state_dtype=cfg.center_state_dtype,
        device=device,
    ).to(device)
    head.configure_optimizer(cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    return head


def compiles(setting: bool | str, device: torch.device) -> bool:
    """Whether the ``compile`` key compiles the training call on ``device``. On a CPU the
    kernels are C++: without a compiler, ``True`` is a :class:`ConfigError` before the run
    starts, and ``'auto'`` trains uncompiled with a warning."""
    if not setting:
        return False
    if device.type != "cpu":
        return True
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        if setting == "auto":
            warnings.warn("compile='auto': no C++ compiler (g++, clang++), so none", stacklevel=2)
            return False
        raise ConfigError(
            "compile=true on a CPU needs a C++ compiler (g++ or clang++) for torch.compile's "
            "kernels; install one, or set compile='auto' or false"
        ) from None
    return True


def build(
    cfg: Config, env: DistEnv, loader: Loader | None = None, backbone: nn.Module | None = None
) -> Components:
    """Build one rank's run; ``loader`` and ``backbone`` replace the ones the config names."""
    dtype = autocast_dtype(cfg.fp16, cfg.bf16, env.device)
    configure_determinism(cfg.deterministic)
    seed_everything(cfg.seed)  # identical backbone initialisation on every rank
    if backbone is None:
        backbone = build_backbone(cfg, env.device)
    backbone = backbone.to(env.device)
    average = WeightAverage(backbone, cfg.ema_decay) if cfg.ema_decay else None
    model = parallelize(backbone, env, dtype)
    if compiles(cfg.compile, env.device):
        # the training call only: evaluation (no_grad, other batch sizes) would compile again,
        # and `backbone` stays the plain module whose state_dict checkpoints hold
        model = torch.compile(model)
    head = build_training_head(cfg, env.device)
    optimizer = build_optimizer(
        cfg.optimizer, backbone.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay
    )
    scaler = torch.amp.GradScaler("cuda", growth_interval=100) if dtype == torch.float16 else None
    seed_everything(rank_seed(cfg.seed, env.rank))  # per-rank streams (dropout, augmentation)
    if loader is None:
        from facescale.data import build_train_loader

        loader = build_train_loader(cfg, env.rank, env.world_size, env.device)
    schedule = cfg.schedule(env.world_size, len(loader))
    return Components(backbone, model, head, optimizer, scaler, loader, schedule, dtype, average)
