"""A small learnable in-memory dataset with the trainer's loader interface, and the small
training run on it that the training tests drive on any number of ranks.

Global batch k of an epoch is the same set of samples whatever the number of ranks; rank r
takes its slice of it. That makes runs on 1 and N ranks comparable step by step.
"""

from __future__ import annotations

import torch

from facescale.backbones import get_model
from facescale.config import Config, load_config, set_value
from facescale.distributed import init_distributed
from facescale.train.trainer import Trainer


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


NUM_CLASSES = 12


def small_vit():
    """A two-block ViT without randomness or batch statistics (no drop-path, no patch masking,
    its BatchNorm layers removed), so every sample's embedding depends on that sample alone and
    runs on 1 and N ranks can agree; SyncBatchNorm, the alternative, needs a GPU."""
    torch.manual_seed(0)
    model = get_model("vit_t", 32, depth=2, dim=64, drop_path_rate=0.0, mask_ratio=0.0)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.BatchNorm1d):
                setattr(parent, name, torch.nn.Identity())
    return model


def train_config(output, **values) -> Config:
    """The small run's config (a tiny ViT, 12 classes of 8 images, 2 epochs); ``values`` win."""
    cfg = load_config(None)
    base = dict(
        network="vit_t",
        embedding_size=32,
        num_classes=NUM_CLASSES,
        num_image=NUM_CLASSES * 8,
        batch_size=8,
        lr=0.02,
        num_epoch=2,
        warmup_epoch=0.5,
        sample_rate=1.0,
        num_workers=0,
        frequent=1,
        verbose=10_000,
        val_targets=[],
        checkpoint_every=0,
        output=str(output),
    )
    for key, value in {**base, **values}.items():
        set_value(cfg, key, value, "test")
    return cfg


def train_rank(rank, world, output, values, global_batch, resume=False):
    """Train on this rank; return the backbone (rank 0) and this rank's head shard."""
    cfg = train_config(output, resume=resume, batch_size=global_batch // world, **values)
    images, labels = make_faces(NUM_CLASSES, cfg.num_image // NUM_CLASSES)
    loader = ArrayLoader(images, labels, cfg.batch_size, rank, world, seed=cfg.seed)
    env = init_distributed()
    trainer = Trainer(cfg, env, loader, small_vit())
    summary = trainer.run()  # resumes when cfg.resume
    backbone = {k: v.clone() for k, v in trainer.backbone.state_dict().items()}
    return {
        "summary": summary,
        "backbone": backbone if rank == 0 else None,
        "head": trainer.head.weight.detach().clone(),
        "margin": {k: v.clone() for k, v in trainer.head.margin.state_dict().items()},
    }


def full_head(results) -> torch.Tensor:
    return torch.cat([r["head"] for r in results])


def assert_same_model(a, b, rtol, atol):
    for key, value in a[0]["backbone"].items():
        torch.testing.assert_close(
            value.float(), b[0]["backbone"][key].float(), rtol=rtol, atol=atol, msg=key
        )
    torch.testing.assert_close(full_head(a), full_head(b), rtol=rtol, atol=atol)
