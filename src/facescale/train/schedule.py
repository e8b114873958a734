"""Learning rate: linear warm-up, then polynomial decay to zero; one value per optimizer step."""

from __future__ import annotations


def lr_at(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, power: float = 2.0
) -> float:
    """LR for optimizer step ``step`` (0-based): ``base_lr * (step+1)/warmup`` while warming up,
    then ``base_lr * (1 - progress) ** power`` with progress measured over the decay steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return base_lr * (1.0 - progress) ** power
