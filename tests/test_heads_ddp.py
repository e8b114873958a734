"""Drop-in PartialFC under DistributedDataParallel trains the backbone on the global-mean loss.

A Linear backbone in DDP (gloo, spawned ranks, uneven batches, one rank with no rows at
world size 3) and one backward through the drop-in head: the backbone's parameter
gradient equals the float64 single-process gradient of the mean loss over the whole batch.
"""

import pytest
import torch
from dist_utils import run_ranks
from heads_cases import assert_close_scaled, load_shard, local_inputs, make_problem
from torch.nn.parallel import DistributedDataParallel

from facescale.heads import ArcFace, PartialFC
from facescale.heads.reference import reference_loss

IN, DIM, NUM_CLASSES = 6, 8, 11
SIZES = {1: [7], 2: [3, 6], 3: [4, 0, 5]}


def _backbone(dtype=torch.float32) -> torch.nn.Linear:
    torch.manual_seed(3)
    return torch.nn.Linear(IN, DIM).to(dtype)


def _problem(world):
    images, labels, _ = make_problem(1, sum(SIZES[world]), NUM_CLASSES, IN)
    centers = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(2))
    return images, labels, centers


def _ddp_grads(rank, world):
    images, labels, centers = _problem(world)
    backbone = _backbone()
    model = DistributedDataParallel(backbone) if world > 1 else backbone
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(64, 0.5))
    load_shard(head, centers)
    x, y = local_inputs(images, labels, SIZES[world], rank)
    head(model(x.detach()), y).backward()
    return [p.grad.clone() for p in backbone.parameters()]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_backbone_under_ddp_gets_the_global_mean_loss_gradient(world):
    ranks = [_ddp_grads(0, 1)] if world == 1 else run_ranks(_ddp_grads, world)
    images, labels, centers = _problem(world)
    backbone = _backbone(torch.float64)
    reference_loss(backbone(images.double()), labels, centers, ArcFace(64, 0.5)).backward()
    for grads in ranks:
        for got, param in zip(grads, backbone.parameters(), strict=True):
            assert_close_scaled(got, param.grad, 1e-4, f"world {world}")


def _unscaled_embedding_grad(rank, world):
    embeddings, labels, centers = make_problem(1, sum(SIZES[world]), NUM_CLASSES, DIM)
    head = PartialFC(NUM_CLASSES, DIM, ArcFace(64, 0.5), scale_embedding_grad=False)
    load_shard(head, centers)
    x, y = local_inputs(embeddings, labels, SIZES[world], rank)
    head(x, y).backward()
    return x.grad


def test_the_switch_gives_each_rank_its_share_of_the_global_gradient():
    embeddings, labels, centers = make_problem(1, sum(SIZES[2]), NUM_CLASSES, DIM)
    x = embeddings.double().requires_grad_()
    reference_loss(x, labels, centers, ArcFace(64, 0.5)).backward()
    grads = run_ranks(_unscaled_embedding_grad, 2)
    assert_close_scaled(torch.cat(grads), x.grad, 1e-4, "unscaled")
