"""The training loop and what it needs: LR schedule, checkpoints, logging."""
