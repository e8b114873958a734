"""Shared pieces of the head tests: seeded problems, the float64 reference, gradient readers."""

from __future__ import annotations

import torch

from facescale.heads import PartialFC, shard_range
from facescale.heads.reference import reference_loss


def make_problem(seed: int, num_rows: int, num_classes: int, dim: int):
    """Random embeddings, labels and full class centers, the same in every process."""
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_rows, dim, generator=g)
    labels = torch.randint(0, num_classes, (num_rows,), generator=g)
    weight = torch.randn(num_classes, dim, generator=g)
    return embeddings, labels, weight


def local_inputs(embeddings, labels, sizes, rank):
    """This rank's rows (embeddings as a fresh leaf that collects its gradient)."""
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    return embeddings[rows].clone().requires_grad_(), labels[rows].clone()


def load_shard(head: PartialFC, weight: torch.Tensor) -> None:
    """Give ``head`` this rank's rows of the full ``weight`` (``num_subcenters`` per class)."""
    k = head.num_subcenters
    start, count = shard_range(weight.shape[0] // k, head.rank, head.world_size)
    with torch.no_grad():
        head.weight.copy_(weight[start * k : (start + count) * k])


def center_grad(head: PartialFC) -> torch.Tensor:
    """The head's gradient to its shard as a dense matrix (zero for rows not computed)."""
    if not head.lean:
        return head.weight.grad.clone()
    dense = torch.zeros(head.weight.shape)
    for rows, grad in head.center_grad_chunks():
        dense[rows] = grad
    return dense


def reference_grads(embeddings, labels, weight, margin, **kwargs):
    """Loss and gradients (embeddings, all centers) of the float64 reference."""
    x = embeddings.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = reference_loss(x, labels, w, margin, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def assert_close_scaled(actual, expected, rel: float, what: str = "") -> None:
    """``max |actual - expected| <= rel * max |expected|``: fp32 against the float64 reference."""
    actual, expected = actual.double(), expected.double()
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel} x {scale:.3g}"
