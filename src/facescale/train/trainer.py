"""The training loop: it runs what :func:`facescale.train.build.build` made, top to bottom.

One optimizer step = ``gradient_acc`` micro-batches whose losses are averaged; the LR is
set once per optimizer step; gradient clipping uses the global norm of the backbone and
the head together; a non-finite loss or gradient skips the step, decided on the device and
read on the host only when the loop reports, evaluates, saves or stops (:mod:`.pending_steps`).
The same code runs on 1 or N ranks, CPU (gloo) or GPU (NCCL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facescale.config import Config
from facescale.distributed import DistEnv, barrier
from facescale.errors import require_writable_folder
from facescale.failures import user_errors_stop_the_job
from facescale.optim import set_lr, step_unless
from facescale.train import checkpoint as ckpt
from facescale.train.build import Loader, build
from facescale.train.evaluation import Evaluator
from facescale.train.logger import RunLogger, format_duration, log_file
from facescale.train.pending_steps import Outcome, PendingSteps
from facescale.train.schedule import lr_at, lr_at_share
from facescale.train.time_budget import TrainingTime
from facescale.train.timing import PhaseClock

log = logging.getLogger("facescale.train")

TIMED_PHASES = (
    "data",
    "backbone_forward",
    "head_forward",
    "head_backward",
    "backbone_backward",
    "optimizer",
)


class Trainer:
    """One rank's run: :meth:`run` resumes when asked, :meth:`fit` loops, then the final
    evaluation and the model for inference."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        loader: Loader | None = None,
        backbone: nn.Module | None = None,
    ) -> None:
        """``loader`` and ``backbone`` replace the ones the config names (custom data, models)."""
        self.cfg, self.env, self.device = cfg, env, env.device
        self.parts = build(cfg, env, loader, backbone)
        self.backbone, self.head = self.parts.backbone, self.parts.head
        self.schedule = self.parts.schedule
        self.progress = ckpt.Progress()
        self.checkpointer = ckpt.Checkpointer(cfg, env)
        self.evaluator = Evaluator(cfg, env)
        self.clock = PhaseClock(self.device, TIMED_PHASES)
        self.time = TrainingTime(cfg.time_budget, 0.0, self.device)
        schedule = self.schedule
        self.pending = PendingSteps(
            self.device,
            lambda step: lr_at(step, cfg.lr, schedule.total_steps, schedule.warmup_steps),
        )
        self._event = 0  # the next step that reports, evaluates, saves or stops
        # facescale's loader checks its labels and batch sizes: the head need not wait for that
        rows = getattr(self.parts.loader, "checked_rows", None)
        self._checked_sizes = None if rows is None else [rows] * env.world_size
        self._budget_lr = 0.0  # under a time budget: the LR of the last step tried

    def reset_timings(self) -> None:
        self.clock.reset()

    @property
    def timings(self) -> dict[str, float]:
        """Seconds of each phase on this rank since the last :meth:`reset_timings`."""
        return self.clock.totals()

    def resume(self) -> bool:
        """Continue from the newest checkpoint, if there is one."""
        progress = self.checkpointer.restore(self.parts)
        if progress is not None:
            self.progress = progress
        return progress is not None

    def open_logger(self) -> RunLogger:
        return RunLogger(
            Path(self.cfg.output),
            self.env.rank,
            None if self.cfg.time_budget else self.schedule.total_steps,
            self.progress.step,
            self.cfg,
        )

    def run(self) -> dict[str, Any]:
        """Resume if asked or restarted; once the checkpoint is accepted (OUTPUT is untouched
        until then) write ``config.json``, train to the end, evaluate, write ``model.pt``."""
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if self.cfg.resume or restarted:
            self.resume()
        if self.env.is_main:
            self.cfg.save(self.cfg.output)
            self.checkpointer.remove_unfinished()
        with contextlib.closing(self.open_logger()) as logger:
            summary = self.fit(logger)
            summary["val"] = self.evaluate(logger)
            summary["best"] = dict(self.progress.best)
            self.save_model()
            logger.save_model(Path(self.cfg.output) / "model.pt")
        return summary

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, logger: RunLogger, stop_step: int | None = None) -> dict[str, Any]:
        """Train until the schedule ends, the time budget is spent, or ``stop_step`` (default:
        the config's)."""
        cfg, progress, parts = self.cfg, self.progress, self.parts
        budgeted = cfg.time_budget > 0
        total = sys.maxsize if budgeted else self.schedule.total_steps
        stop_at = min(total, stop_step or cfg.stop_step or total)
        end_of_epoch = self.schedule.steps_per_epoch * cfg.gradient_acc
        self.time = TrainingTime(cfg.time_budget, progress.elapsed_s, self.device)
        loss_sum = torch.zeros((), device=self.device)
        last_record: dict[str, Any] = {}
        started, start_step = time.perf_counter(), progress.step

        def finished() -> bool:
            return progress.step >= stop_at or self.time.spent(progress.elapsed_s)

        self._count_from(progress.step, stop_at)
        while not finished():
            if progress.micro_in_epoch == 0:
                parts.loader.set_epoch(progress.epoch)
            t_data = time.perf_counter()
            for images, labels in parts.loader:
                self.clock.add_host_seconds("data", time.perf_counter() - t_data)
                progress.micro_in_epoch += 1
                last = progress.micro_in_epoch % cfg.gradient_acc == 0
                loss_sum += self._micro_batch(images, labels, sync=last)
                if last:
                    self._optimizer_step(loss_sum / cfg.gradient_acc)
                    loss_sum.zero_()
                    values = self._look(stop_at) if self.pending.due else None
                    step, ending = progress.step, finished()
                    if values is not None:  # None: nothing to report at this step
                        values["epoch"] = progress.epoch
                        if step % cfg.frequent == 0 or ending:
                            samples = self.schedule.samples_per_step
                            last_record = logger.step(step, samples, values)
                        if step % cfg.verbose == 0 and not ending:
                            self.evaluate(logger)
                        every = cfg.checkpoint_every
                        if every and step % every == 0 and not ending:
                            self.checkpointer.save(progress, parts)
                if progress.micro_in_epoch >= end_of_epoch or finished():
                    break
                t_data = time.perf_counter()
            self._look(stop_at)  # the exact step count, for the epoch's end and checkpoint
            if not finished() or progress.micro_in_epoch >= end_of_epoch:
                progress.epoch += 1
                progress.micro_in_epoch = 0
                self.checkpointer.save(progress, parts)
        self.checkpointer.save(progress, parts)  # at stop_step (a no-op after an epoch's end)
        steps = progress.step - start_step
        elapsed = max(time.perf_counter() - started, 1e-9)
        epochs = progress.epoch + progress.micro_in_epoch / end_of_epoch
        if budgeted and self.env.is_main:
            log.info(
                "time budget of %s: trained %s, %d steps, %.2f epochs",
                format_duration(cfg.time_budget),
                format_duration(progress.elapsed_s),
                progress.step,
                epochs,
            )
        return {
            "steps": steps,
            "final_step": progress.step,
            "epochs": epochs,
            "elapsed_s": progress.elapsed_s,
            "samples_per_s": steps * self.schedule.samples_per_step / elapsed,
            "last": last_record,
            "timings": dict(self.timings),
        }

    def _next_event(self, step: int, stop_at: int) -> int:
        """The first step after ``step`` that reports, evaluates, saves or stops."""
        periods = [self.cfg.frequent, self.cfg.verbose, self.cfg.checkpoint_every]
        return min([stop_at] + [(step // p + 1) * p for p in periods if p > 0])

    def _count_from(self, step: int, stop_at: int) -> None:
        """Let the device count the steps from ``step``: the host looks again at the next
        event, or sooner where ``max_nonfinite_steps`` non-finite losses could be reached."""
        in_row = self.progress.nonfinite_in_row
        self._event = self._next_event(step, stop_at)
        horizon = min(self._event, step + self.cfg.max_nonfinite_steps - in_row)
        if self.time.limited:  # the budget's clock is agreed at every step: look at each
            horizon = step + 1
        self.pending.start(step, in_row, horizon)

    def _look(self, stop_at: int) -> dict[str, float] | None:
        """Read the outcome of the steps tried since the last look (the loop's one host
        synchronisation); returns the step's values when it is the next event's step."""
        outcome = self.pending.look()
        progress = self.progress
        taken = outcome.step > progress.step
        progress.step, progress.nonfinite_in_row = outcome.step, outcome.nonfinite_in_row
        if outcome.nonfinite_since:
            self._report_nonfinite(outcome)
        # under a time budget any step taken may be the last, so each one reports its values
        reached = outcome.step == self._event or (self.time.limited and taken)
        self._count_from(outcome.step, stop_at)
        if not reached:
            return None
        values = {
            "loss": outcome.loss,
            "lr": self._budget_lr if self.time.limited else self.pending.lr_at(outcome.step - 1),
            "grad_norm": outcome.grad_norm,
        }
        if self.time.limited:
            values["time_left_s"] = max(0.0, self.time.budget_s - progress.elapsed_s)
        if self.parts.scaler is not None:
            values["loss_scale"] = outcome.loss_scale
        return values

    # ---- one optimizer step ------------------------------------------------------------
    def _micro_batch(self, images: torch.Tensor, labels: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; DDP all-reduces only when ``sync``."""
        clock, parts = self.clock, self.parts
        no_sync = getattr(parts.model, "no_sync", None)
        with no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext():
            t0 = clock.mark()
            with torch.autocast(self.device.type, parts.dtype, enabled=parts.dtype is not None):
                embeddings = parts.model(images)
            embeddings = embeddings.float()
            t1 = clock.mark()
            loss = parts.head(embeddings, labels, sizes=self._checked_sizes)
            scaled = loss / self.cfg.gradient_acc
            if parts.scaler is not None:
                scaled = parts.scaler.scale(scaled)
            t2 = clock.mark()
            head_done = [t2]
            embeddings.register_hook(lambda grad: head_done.__setitem__(0, clock.mark()))
            scaled.backward()
            t3 = clock.mark()
        clock.add("backbone_forward", t0, t1)
        clock.add("head_forward", t1, t2)
        clock.add("head_backward", t2, head_done[0])
        clock.add("backbone_backward", head_done[0], t3)  # includes waiting for DDP's all-reduce
        return loss.detach()

    def _global_grad_norm(self, loss_scale: Tensor | float, with_head: bool) -> Tensor:
        """L2 norm of the gradients: backbone (identical on every rank, one ``_foreach`` norm),
        plus the head (sharded) when ``with_head``; forming the head's costs a pass over its
        centers."""
        grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
        backbone = torch.nn.utils.get_total_norm(grads).float()
        if not with_head:
            return backbone
        head_sq = self.head.grad_norm_sq().to(self.device, torch.float32)
        head_sq = head_sq / (loss_scale * loss_scale)
        if dist.is_initialized():
            dist.all_reduce(head_sq)
        return (backbone.square() + head_sq).sqrt()

    def _optimizer_step(self, loss: Tensor) -> None:
        """Clip and step, or skip the step when the loss or the gradient norm is not finite;
        the device decides (no host synchronisation), :meth:`_look` reads the outcome."""
        t0 = self.clock.mark()
        optimizer, scaler = self.parts.optimizer, self.parts.scaler
        lr = self._learning_rate()
        set_lr(optimizer, lr)
        loss_scale: Tensor | float = 1.0
        if scaler is not None:
            scaler.unscale_(optimizer)
            loss_scale = scaler._get_scale_async()  # the device tensor: get_scale() would wait
        clipping = self.cfg.max_grad_norm > 0
        # Without clipping the head's norm is not formed: a finite loss gives a finite head
        # gradient (float32), and an fp16 overflow shows in the backbone's gradients.
        norm = self._global_grad_norm(loss_scale, with_head=clipping)
        skip = self.pending.record(loss.float(), norm, loss_scale)
        grad_scale = 1.0 if scaler is None else torch.reciprocal(loss_scale)
        if clipping:
            coef = (self.cfg.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            grads = [p.grad for p in self.backbone.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)
            grad_scale = coef * grad_scale
        step_unless(optimizer, skip)
        if self.parts.average is not None:
            self.parts.average.update(self.backbone, skip)
        if scaler is not None:
            scaler.update()  # lowers the scale after an overflow
        self.head.step(lr, grad_scale=grad_scale, skip=skip)
        optimizer.zero_grad(set_to_none=True)
        self.head.zero_grad()
        self.clock.add("optimizer", t0, self.clock.mark())

    def _learning_rate(self) -> Tensor | float:
        """This step's LR: from the device's table of the steps taken, or under a time budget
        from the elapsed share of it (every rank's clock agreed; warming up over the share of
        the budget that ``warmup_epoch`` is of ``num_epoch``)."""
        self.progress.elapsed_s = self.time.elapsed()  # a collective call under a budget only
        if not self.time.limited:
            return self.pending.next_lr()
        warmup_share = self.schedule.warmup_steps / self.schedule.total_steps
        share = self.time.share(self.progress.elapsed_s)
        self._budget_lr = lr_at_share(share, self.cfg.lr, warmup_share)
        return self._budget_lr

    def _report_nonfinite(self, outcome: Outcome) -> None:
        """Warn of the non-finite losses seen at a look; too many in a row stop the run."""
        count = outcome.nonfinite_since
        skipped = "step skipped" if count == 1 else f"{count} steps skipped since the last look"
        log.warning(
            "rank %d step %d: non-finite loss %s, %s (%d in a row)",
            self.env.rank,
            outcome.step,
            outcome.last_nonfinite_loss,
            skipped,
            outcome.nonfinite_in_row,
        )
        if outcome.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
            raise FloatingPointError(
                f"{outcome.nonfinite_in_row} non-finite losses in a row at step "
                f"{outcome.step}; lower lr, enable max_grad_norm, or check the data"
            )

    # ---- outside the steps -------------------------------------------------------------
    def evaluate(self, logger: RunLogger) -> dict[str, float]:
        """Verification accuracy on every val target (rank 0), logged and kept as the best;
        of the weight average where ``ema_decay`` keeps one."""
        results = self.evaluator(self.parts.inference_backbone, self.progress.best)
        if results:
            logger.scalars(self.progress.step, results, "val")
        return results

    def save_model(self) -> None:
        """The backbone's weights for inference (the weight average where ``ema_decay`` keeps
        one), ``OUTPUT/model.pt`` (rank 0 writes)."""
        if self.env.is_main:
            path = Path(self.cfg.output) / "model.pt"
            ckpt.atomic_save(self.parts.inference_backbone.state_dict(), path)
            log.info("backbone weights for inference: %s", path)
        barrier()


def train(
    cfg: Config, env: DistEnv, loader: Loader | None = None, backbone: nn.Module | None = None
) -> dict[str, Any]:
    """Run one training job described by ``cfg`` on this rank; resumes when asked or restarted.

    An output that cannot be written stops it before any work; a user error stops the whole
    torchrun job, restarts included (:mod:`facescale.failures`).
    """
    output = require_writable_folder(cfg.output)
    with log_file(output / "training.log", env.is_main), user_errors_stop_the_job():
        return Trainer(cfg, env, loader, backbone).run()
