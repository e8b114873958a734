"""Training progress on rank 0: console (a progress bar when interactive), log file,
TensorBoard, a JSON-lines metrics file that scripts and plots read back, and Weights & Biases
when the config asks for it (``using_wandb``)."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facescale.config import Config
from facescale.errors import is_user_error
from facescale.train.wandb_sink import WandbSink

log = logging.getLogger("facescale.train")


def on_terminal() -> bool:
    """Whether stderr is a terminal: progress bars there, log lines otherwise."""
    return sys.stderr.isatty()


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class RunLogger:
    """Writes what the trainer reports; on ranks other than 0 every method does nothing.
    ``total_steps`` None: the run ends at a time budget, whose remaining seconds the values
    carry as ``time_left_s``."""

    def __init__(
        self,
        output: Path,
        rank: int,
        total_steps: int | None,
        start_step: int,
        cfg: Config | None = None,
    ) -> None:
        self.active = rank == 0
        self.total_steps = total_steps
        self._window_start = (time.perf_counter(), start_step)
        self._bar = None
        self._writer = None
        self._wandb: WandbSink | None = None
        if not self.active:
            return
        if cfg is not None and cfg.using_wandb:
            self._wandb = WandbSink(cfg, output)
        output.mkdir(parents=True, exist_ok=True)
        self._metrics = open(output / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(output / "tensorboard"), purge_step=start_step)
        if on_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, step: int, samples_per_step: int, values: dict[str, float]) -> dict[str, Any]:
        """Report the window of steps that ends at ``step`` (1-based count of steps done)."""
        now = time.perf_counter()
        start_time, start_step = self._window_start
        self._window_start = (now, step)
        if not self.active:
            return {}
        done = step - start_step
        elapsed = max(now - start_time, 1e-9)
        eta_s = values.get("time_left_s", 0.0)
        if self.total_steps is not None:
            eta_s = (self.total_steps - step) * elapsed / max(done, 1)
        record = {
            "step": step,
            **values,
            "samples_per_s": samples_per_step * done / elapsed,
            "eta_s": eta_s,
        }
        self._write(record)
        if self._bar is not None:
            self._bar.update(done)
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.4g}")
        else:
            extra = f" scale {values['loss_scale']:.0f}" if "loss_scale" in values else ""
            log.info(
                "step %d/%s epoch %d loss %.4f lr %.5f %.1f samples/s%s eta %s",
                step,
                "-" if self.total_steps is None else self.total_steps,
                values["epoch"],
                values["loss"],
                values["lr"],
                record["samples_per_s"],
                extra,
                format_duration(record["eta_s"]),
            )
        return record

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        """Write other figures (verification accuracies) to every sink."""
        if not self.active:
            return
        self._write({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}})
        log.info(
            "step %d %s: %s", step, prefix, ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        )

    def _write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = {
            key if "/" in key else f"train/{key}": value
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float))
        }
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, scalars)
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def save_model(self, path: Path) -> None:
        """Note the inference model written at ``path`` (an artifact where W&B keeps them)."""
        if self._wandb is not None:
            self._wandb.save_model(path)

    def close(self) -> None:
        """Close every sink. A sink that fails to close while another error is already on
        its way out (a ``finally`` after a failed run) is logged, never put in its place."""
        if not self.active:
            return
        failures = []
        for sink in (self._bar, self._writer, self._metrics, self._wandb):
            if sink is None:
                continue
            try:
                sink.close()
            except Exception as err:
                failures.append(err)
        if not failures:
            return
        if sys.exc_info()[1] is None:
            raise failures[0]
        for err in failures:
            log.warning("could not close a training log: %s: %s", type(err).__name__, err)


@contextlib.contextmanager
def log_file(path: Path, active: bool) -> Iterator[None]:
    """Copy facescale's log records into ``path`` while the block runs (when ``active``).

    An error that ends the block is written there too, for the file only (the command line
    reports it on the console): a user error as its one line, anything else with its
    traceback.
    """
    if not active:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("facescale").addHandler(handler)
    try:
        yield
    except Exception as err:
        user_error = is_user_error(err)
        handler.handle(
            log.makeRecord(
                log.name,
                logging.ERROR,
                __file__,
                0,
                "error: %s" if user_error else "failed: %s",
                (err,),
                None if user_error else (type(err), err, err.__traceback__),
            )
        )
        raise
    finally:
        logging.getLogger("facescale").removeHandler(handler)
        handler.close()
