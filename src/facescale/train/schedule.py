"""Learning rate: linear warm-up, then polynomial decay to zero; one value per optimizer step,
counted in steps or, under a time budget, in the elapsed share of the budget."""

from __future__ import annotations


def _decayed(base_lr: float, progress: float, power: float) -> float:
    return base_lr * (1.0 - min(1.0, progress)) ** power


def lr_at(
    step: int, base_lr: float, total_steps: int, warmup_steps: int, power: float = 2.0
) -> float:
    """LR for optimizer step ``step`` (0-based): ``base_lr * (step+1)/warmup`` while warming up,
    then ``base_lr * (1 - progress) ** power`` with progress measured over the decay steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    return _decayed(base_lr, (step - warmup_steps) / decay_steps, power)


def lr_at_share(share: float, base_lr: float, warmup_share: float, power: float = 2.0) -> float:
    """LR when ``share`` of a time budget has elapsed: linear warm-up over the first
    ``warmup_share`` of it, then the same polynomial decay, reaching zero as it runs out."""
    if share < warmup_share:
        return base_lr * share / warmup_share
    return _decayed(base_lr, (share - warmup_share) / max(1e-9, 1.0 - warmup_share), power)
