"""Weights & Biases as one more place the run logger writes to, set by arcface_torch's keys.

The run is named by its start time (and ``suffix_run_name``), carries the resolved config
(the API key left out) and ``notes``, receives the figures TensorBoard receives, and with
``save_artifacts`` the final ``model.pt`` as a model artifact. ``WANDB_MODE=offline`` keeps
everything in ``OUTPUT/wandb`` for a later ``wandb sync``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from facescale.config import Config
from facescale.extras import require


class WandbSink:
    """One W&B run of rank 0."""

    def __init__(self, cfg: Config, output: Path) -> None:
        require("wandb")
        import wandb

        self._wandb = wandb
        if cfg.wandb_key:
            wandb.login(key=cfg.wandb_key)
        name = time.strftime("%y%m%d_%H%M")
        if cfg.suffix_run_name:
            name += f"_{cfg.suffix_run_name}"
        self.save_artifacts = cfg.save_artifacts
        self.run = wandb.init(
            entity=cfg.wandb_entity,
            project=cfg.wandb_project,
            name=name,
            notes=cfg.notes or None,
            resume=cfg.wandb_resume or None,
            dir=str(output),
            config={k: v for k, v in cfg.to_dict().items() if k != "wandb_key"},
        )

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.run.log(values, step=step)

    def save_model(self, path: Path) -> None:
        """Upload ``path`` as a model artifact when ``save_artifacts`` asks for it."""
        if self.save_artifacts:
            artifact = self._wandb.Artifact(f"model-{self.run.id}", type="model")
            artifact.add_file(str(path))
            self.run.log_artifact(artifact)

    def close(self) -> None:
        self.run.finish()
