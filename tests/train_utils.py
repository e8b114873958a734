"""A small learnable in-memory dataset with the trainer's loader interface, for training tests.

Global batch k of an epoch is the same set of samples whatever the number of ranks; rank r
takes its slice of it. That makes runs on 1 and N ranks comparable step by step.
"""

from __future__ import annotations

import torch


def make_faces(
    num_classes: int, per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] with a fixed pattern per class plus noise: easy to learn."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, 8, 8, generator=gen) * 2 - 1
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    base = torch.nn.functional.interpolate(patterns[labels], size=112, mode="nearest")
    images = (base + 0.3 * torch.randn(base.shape, generator=gen)).clamp(-1, 1)
    return images, labels


class ArrayLoader:
    """Epoch-shuffled global batches of in-memory tensors, sliced per rank; resumable."""

    def __init__(self, images, labels, batch_size, rank, world_size, seed=0):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world = batch_size, rank, world_size
        self.seed, self.epoch, self.position = seed, 0, 0

    def __len__(self) -> int:
        return len(self.labels) // (self.batch_size * self.world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(len(self.labels), generator=gen)
        global_batch = self.batch_size * self.world
        while self.position < len(self):
            start = self.position * global_batch + self.rank * self.batch_size
            index = order[start : start + self.batch_size]
            self.position += 1
            yield self.images[index], self.labels[index]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["batch"]
