"""The distributed training loop: backbone under DDP, the sharded margin-softmax head outside it.

One optimizer step = ``gradient_acc`` micro-batches whose losses are averaged; the LR is
set once per optimizer step; gradient clipping uses the global norm of the backbone and
the head together; a non-finite loss skips the step. The same code runs on 1 or N ranks,
CPU (gloo) or GPU (NCCL).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facescale.config import Config
from facescale.distributed import DistEnv, barrier
from facescale.train import checkpoint as ckpt
from facescale.train.logger import RunLogger, log_file
from facescale.train.schedule import lr_at

log = logging.getLogger("facescale.train")

TIMED_PHASES = (
    "data",
    "backbone_forward",
    "head_forward",
    "head_backward",
    "backbone_backward",
    "optimizer",
)


@dataclass
class Progress:
    """Counters that a checkpoint restores: optimizer steps done, the epoch, and so on."""

    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    nonfinite_in_row: int = 0
    best: dict[str, float] = field(default_factory=dict)


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """Reduced precision to compute the backbone in, if any (fp16 needs CUDA)."""
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        if device.type == "cuda":
            return torch.float16
        log.warning("fp16 needs a GPU; running in float32 (set bf16=True for bfloat16 on CPU)")
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """The optimizer the config names, over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class ReplicatedHeadUpdate:
    """The lean head's update interface (grad_norm_sq, step, zero_grad) for the replicated
    data-parallel baseline head, whose summed gradients a torch optimizer applies."""

    def __init__(self, head: nn.Module, cfg: Config, world_size: int) -> None:
        self.params = list(head.parameters())
        self.optimizer = make_optimizer(cfg, self.params)
        self.world_size = world_size

    def grad_norm_sq(self) -> torch.Tensor:
        # every rank holds the same full gradient; the trainer sums this over ranks
        grads = [p.grad.float().pow(2).sum() for p in self.params if p.grad is not None]
        return torch.stack(grads).sum() / self.world_size

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(grad_scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class Trainer:
    """Builds everything a run needs from the config and runs it to the end or ``stop_step``."""

    def __init__(
        self, cfg: Config, env: DistEnv, loader: Any = None, backbone: nn.Module | None = None
    ) -> None:
        """``loader`` and ``backbone`` replace the ones the config names (custom data, models).

        A loader has ``len`` (batches per epoch), ``set_epoch``, iteration, and a
        ``state_dict`` whose ``epoch`` and ``batch`` entries ``load_state_dict`` resumes from.
        """
        from facescale.backbones import model_from_config
        from facescale.heads import CombinedMargin, build_head

        self.cfg, self.env = cfg, env
        self.device = env.device
        self.output = Path(cfg.output)
        self.schedule = cfg.schedule(env.world_size)
        self.dtype = autocast_dtype(cfg, self.device)

        seed_everything(cfg.seed)  # identical backbone initialisation on every rank
        if backbone is None:
            backbone = model_from_config(cfg)
        self.backbone = backbone.to(self.device)
        self.model: nn.Module = self.backbone
        if env.world_size > 1:
            with warnings.catch_warnings():  # its replacement still syncs buffers at init
                warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated")
                self.model = DistributedDataParallel(
                    self.backbone,
                    device_ids=[env.local_rank] if self.device.type == "cuda" else None,
                    broadcast_buffers=False,  # BatchNorm statistics stay per rank
                )
            if self.device.type == "cuda" and self.dtype == torch.float16:
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                self.model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        lean = cfg.head == "partial_fc"
        self.head = build_head(
            cfg.head,
            cfg.num_classes,
            cfg.embedding_size,
            CombinedMargin(cfg.scale, *cfg.margin_list),
            sample_rate=cfg.sample_rate,
            lean=lean,
            interclass_filtering_threshold=cfg.interclass_filtering_threshold,
            seed=cfg.seed,
            cache_bytes=cfg.head_cache_mib * 2**20,
        ).to(self.device)
        if lean:
            self.head.configure_optimizer(
                kind=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
            self.head_update: Any = self.head
        else:
            self.head_update = ReplicatedHeadUpdate(self.head, cfg, env.world_size)
        self.optimizer = make_optimizer(cfg, self.backbone.parameters())
        use_scaler = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", growth_interval=100) if use_scaler else None

        seed_everything(cfg.seed + 1000003 * env.rank)  # per-rank streams (dropout, augmentation)
        if loader is None:
            from facescale.data import build_train_loader

            loader = build_train_loader(cfg, env.rank, env.world_size, self.device)
        self.loader = loader
        self.steps_per_epoch = min(self.schedule.steps_per_epoch, len(loader) // cfg.gradient_acc)
        if self.steps_per_epoch < self.schedule.steps_per_epoch:
            log.warning(
                "the data gives %d batches per rank per epoch, fewer than num_image=%d implies; "
                "an epoch is %d optimizer steps",
                len(loader),
                cfg.num_image,
                self.steps_per_epoch,
            )
        if self.steps_per_epoch == 0:
            raise RuntimeError(
                f"{cfg.rec}: {len(loader)} batches per rank cannot make one optimizer step of "
                f"gradient_acc={cfg.gradient_acc} micro-batches; lower batch_size or gradient_acc"
            )
        self.total_steps = self.steps_per_epoch * cfg.num_epoch
        self.warmup_steps = round(self.steps_per_epoch * cfg.warmup_epoch)
        self.progress = Progress()
        self._saved_step = -1
        self.val_sets = self._find_val_sets()
        self.timings = dict.fromkeys(TIMED_PHASES, 0.0)  # seconds on this rank

    # ---- checkpoints -------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.output / "checkpoints"

    def _identity(self) -> dict[str, Any]:
        return {name: getattr(self.cfg, name) for name in ckpt.MATCHING_FIELDS}

    def save(self) -> None:
        """Write a checkpoint of the current step (once per step); collective over ranks."""
        from facescale.heads import shard_range

        if self._saved_step == self.progress.step or not self.cfg.keep_checkpoints:
            return
        if isinstance(self.head_update, ReplicatedHeadUpdate):
            log.warning("head=data_parallel is a speed baseline; it writes no checkpoints")
            self._saved_step = self.progress.step
            return
        self._saved_step = self.progress.step

        start, count = shard_range(self.cfg.num_classes, self.env.rank, self.env.world_size)
        rank_state = {
            "world_size": self.env.world_size,
            "head_start": start,
            "head_count": count,
            "head": self.head.state_dict(),
            "rng": ckpt.rng_state(),
            "loader": self.loader.state_dict(),
        }
        common = None
        if self.env.is_main:
            common = {
                **self._identity(),
                "world_size": self.env.world_size,
                "progress": vars(self.progress),
                "backbone": self.backbone.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
            }
        path = ckpt.save_checkpoint(
            self.checkpoint_root,
            self.progress.step,
            common,
            rank_state,
            self.env.rank,
            self.cfg.keep_checkpoints,
        )
        if self.env.is_main:
            log.info("checkpoint written: %s", path)

    def resume(self) -> bool:
        """Load the newest complete checkpoint, re-partitioning the head if the world changed."""
        from facescale.heads import shard_range

        found = ckpt.list_checkpoints(self.checkpoint_root)
        if not found:
            log.warning("resume: no checkpoint in %s; starting from scratch", self.checkpoint_root)
            return False
        folder = found[-1]
        common = ckpt.safe_load(folder / "common.pt")
        ckpt.check_compatible(common, self._identity(), folder)
        self.backbone.load_state_dict(common["backbone"])
        self.optimizer.load_state_dict(common["optimizer"])
        if self.scaler is not None and common["scaler"] is not None:
            self.scaler.load_state_dict(common["scaler"])
        self.progress = Progress(**common["progress"])
        self._saved_step = self.progress.step  # that checkpoint exists already
        start, count = shard_range(self.cfg.num_classes, self.env.rank, self.env.world_size)
        self.head.load_state_dict(ckpt.load_head_shard(folder, start, count, self.env.rank))
        same_world = common["world_size"] == self.env.world_size
        if same_world:
            mine = ckpt.safe_load(folder / f"rank_{self.env.rank}.pt")
            ckpt.set_rng_state(mine["rng"])
            self.loader.set_epoch(self.progress.epoch)
            self.loader.load_state_dict(mine["loader"])
        else:
            # Another world size reads the data in another order: finish the epoch on the
            # new order from the same step (the loader starts there without reading what
            # comes before), and restart the per-rank random streams.
            seed_everything(self.cfg.seed + 1000003 * self.env.rank + self.progress.step)
            done = (self.progress.step % self.steps_per_epoch) * self.cfg.gradient_acc
            position = {"epoch": self.progress.epoch, "batch": done}
            self.loader.load_state_dict(self.loader.state_dict() | position)
            self.progress.micro_in_epoch = done
        if self.env.is_main:
            log.info(
                "resumed from %s (step %d, epoch %d, saved on %d ranks, now %d)",
                folder,
                self.progress.step,
                self.progress.epoch,
                common["world_size"],
                self.env.world_size,
            )
        return True

    # ---- one optimizer step ------------------------------------------------------------
    def _micro_batch(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; DDP all-reduces only when ``sync``."""
        clock = self.timings
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext():
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
                embeddings = self.model(images)
            embeddings = embeddings.float()
            t1 = time.perf_counter()
            loss = self.head(embeddings, labels)
            scaled = loss / self.cfg.gradient_acc
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            t2 = time.perf_counter()
            head_done = [t2]
            embeddings.register_hook(lambda grad: self._embedding_grad(grad, head_done))
            scaled.backward()
            t3 = time.perf_counter()
        clock["backbone_forward"] += t1 - t0
        clock["head_forward"] += t2 - t1
        clock["head_backward"] += head_done[0] - t2
        clock["backbone_backward"] += t3 - head_done[0]  # includes waiting for DDP's all-reduce
        return loss.detach()

    def _embedding_grad(self, grad: torch.Tensor, head_done: list[float]) -> torch.Tensor:
        """The head hands back the exact gradient of the one global loss to this rank's
        embeddings; DDP then averages over ranks, so scale by the world size to keep the sum."""
        head_done[0] = time.perf_counter()
        return grad * self.env.world_size if self.env.world_size > 1 else grad

    def _global_grad_norm(self, loss_scale: float) -> torch.Tensor:
        """L2 norm of all gradients: backbone (identical on every rank) + head (sharded)."""
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        backbone_sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        head_sq = self.head_update.grad_norm_sq()
        head_sq = torch.as_tensor(head_sq, device=self.device, dtype=torch.float32)
        head_sq = head_sq / (loss_scale * loss_scale)
        if dist.is_initialized():
            dist.all_reduce(head_sq)
        return (backbone_sq + head_sq).sqrt()

    def _optimizer_step(self, loss: torch.Tensor) -> dict[str, float] | None:
        """Clip, step and schedule; returns the logged values, or None for a skipped step."""
        t0 = time.perf_counter()
        lr = lr_at(self.progress.step, self.cfg.lr, self.total_steps, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_scale = 1.0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            loss_scale = self.scaler.get_scale()
        norm = self._global_grad_norm(loss_scale)
        loss_value = loss.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm.item())):
            self._skip_step(loss_value)
            return None
        self.progress.nonfinite_in_row = 0
        coef = 1.0
        if self.cfg.max_grad_norm > 0:
            coef = min(1.0, self.cfg.max_grad_norm / (norm.item() + 1e-6))
            if coef < 1.0:
                for p in self.backbone.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.head_update.step(lr, grad_scale=coef / loss_scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.head_update.zero_grad()
        self.progress.step += 1
        self.timings["optimizer"] += time.perf_counter() - t0
        values = {"loss": loss_value, "lr": lr, "grad_norm": norm.item()}
        if self.scaler is not None:
            values["loss_scale"] = loss_scale
        return values

    def _skip_step(self, loss_value: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.head_update.zero_grad()
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale after an overflow
        if math.isfinite(loss_value):
            return  # gradient overflow under fp16 loss scaling: routine, the scale adapts
        self.progress.nonfinite_in_row += 1
        log.warning(
            "rank %d step %d: non-finite loss %s, step skipped (%d in a row)",
            self.env.rank,
            self.progress.step,
            loss_value,
            self.progress.nonfinite_in_row,
        )
        if self.progress.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{self.progress.nonfinite_in_row} non-finite losses in a row at step "
                f"{self.progress.step}; lower lr, enable max_grad_norm, or check the data"
            )

    # ---- evaluation --------------------------------------------------------------------
    def _find_val_sets(self) -> list[Path]:
        if not self.cfg.val_targets or self.cfg.rec == "synthetic":
            return []
        found = []
        for name in self.cfg.val_targets:
            path = Path(self.cfg.rec) / f"{name}.bin"
            if path.is_file():
                found.append(path)
            elif self.env.is_main:
                log.warning("val_targets: %s not found; %s is not evaluated", path, name)
        return found

    def evaluate(self) -> dict[str, float]:
        """Verification accuracy on every val target, keeping the best per target.

        Every rank embeds its share of each set's images; rank 0 scores the gathered whole."""
        results: dict[str, float] = {}
        for path in self.val_sets:
            result = verification_on_ranks(self.backbone, path, self.env)
            if result is not None:
                results[result.name] = result.accuracy
                best = max(result.accuracy, self.progress.best.get(result.name, 0.0))
                self.progress.best[result.name] = best
        return results

    # ---- the loop ----------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until the schedule ends (or ``stop_step``); returns a summary."""
        cfg, progress = self.cfg, self.progress
        logger = RunLogger(self.output, self.env.rank, self.total_steps, progress.step)
        last_record: dict[str, Any] = {}
        stop_at = min(self.total_steps, cfg.stop_step or self.total_steps)
        acc = cfg.gradient_acc
        loss_sum = torch.zeros((), device=self.device)
        started = time.perf_counter()
        start_step = progress.step
        try:
            while progress.step < stop_at:
                if progress.micro_in_epoch == 0:
                    self.loader.set_epoch(progress.epoch)
                batches = iter(self.loader)
                end_of_epoch = self.steps_per_epoch * acc
                t_data = time.perf_counter()
                for images, labels in batches:
                    self.timings["data"] += time.perf_counter() - t_data
                    progress.micro_in_epoch += 1
                    last = progress.micro_in_epoch % acc == 0
                    loss_sum += self._micro_batch(images, labels, sync=last)
                    if last:
                        values = self._optimizer_step(loss_sum / acc)
                        loss_sum.zero_()
                        if values is not None:
                            values["epoch"] = progress.epoch
                            if progress.step % cfg.frequent == 0 or progress.step == stop_at:
                                last_record = logger.step(
                                    progress.step, self.schedule.samples_per_step, values
                                )
                            self._periodic(logger, stop_at)
                    if progress.micro_in_epoch >= end_of_epoch or progress.step >= stop_at:
                        break
                    t_data = time.perf_counter()
                if progress.step < stop_at or progress.micro_in_epoch >= end_of_epoch:
                    progress.epoch += 1
                    progress.micro_in_epoch = 0
                    if progress.step < stop_at:
                        self.save()
            if cfg.stop_step and progress.step == stop_at < self.total_steps:
                self.save()
            results = self.evaluate()
            if results:
                logger.scalars(progress.step, results, "val")
            self._save_model()
        finally:
            logger.close()
        elapsed = time.perf_counter() - started
        return {
            "steps": progress.step - start_step,
            "final_step": progress.step,
            "samples_per_s": (progress.step - start_step)
            * self.schedule.samples_per_step
            / max(elapsed, 1e-9),
            "last": last_record,
            "val": results,
            "best": dict(progress.best),
            "timings": dict(self.timings),
        }

    def _periodic(self, logger: RunLogger, stop_at: int) -> None:
        step = self.progress.step
        if step % self.cfg.verbose == 0 and step < stop_at:
            results = self.evaluate()
            if results:
                logger.scalars(step, results, "val")
        if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0 and step < stop_at:
            self.save()

    def _save_model(self) -> None:
        if self.env.is_main:
            path = self.output / "model.pt"
            ckpt.atomic_save(self.backbone.state_dict(), path)
            log.info("backbone weights for inference: %s", path)
        barrier()


def verification_on_ranks(backbone: nn.Module, path: Path, env: DistEnv) -> Any:
    """10-fold verification of ``backbone`` on the ``.bin`` set at ``path``, the embedding work
    split over ranks; the result on rank 0, None elsewhere."""
    from facescale.eval import embed_batches, l2_normalize, load_verification_set
    from facescale.eval.verification import VerificationResult, verification_metrics

    vset = load_verification_set(path)
    lo, hi = (len(vset.images) * r // env.world_size for r in (env.rank, env.rank + 1))
    images = torch.from_numpy(vset.images[lo:hi])
    batches = (images[i : i + 64] for i in range(0, len(images), 64))
    features, norm = embed_batches(backbone, batches, env.device, flip=True)
    parts = [(features, norm)]
    if dist.is_initialized():
        parts = [None] * env.world_size
        dist.all_gather_object(parts, (features, norm))
    if not env.is_main:
        return None
    features = l2_normalize(np.concatenate([f for f, _ in parts]))
    norm = sum(n * len(f) for f, n in parts) / len(features)
    metrics = verification_metrics(features[0::2], features[1::2], vset.issame)
    return VerificationResult(**dataclasses.asdict(metrics), name=vset.name, norm=norm)


def train(
    cfg: Config, env: DistEnv, loader: Any = None, backbone: nn.Module | None = None
) -> dict[str, Any]:
    """Run one training job described by ``cfg`` on this rank; resumes when asked or restarted."""
    output = Path(cfg.output)
    with log_file(output / "training.log", env.is_main):
        if env.is_main:
            cfg.save(output)
        trainer = Trainer(cfg, env, loader, backbone)
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if cfg.resume or restarted:
            trainer.resume()
        return trainer.fit()
