"""With clipping, the centers' gradient that grad_norm_sq forms is kept for step while it
fits the head's memory budget: the update is the same as forming it again."""

import pytest
import torch

from facescale.heads import ArcFace, LeanPartialFC


def _head(rate: float, optimizer: str, cache_bytes: int = 2**20) -> LeanPartialFC:
    head = LeanPartialFC(60, 16, ArcFace(64.0, 0.5), rate, chunk_size=16, cache_bytes=cache_bytes)
    head.configure_optimizer(optimizer, 0.1)
    return head


@pytest.mark.parametrize("rate", [1.0, 0.5])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_kept_gradients_give_the_update_of_recomputed_ones(rate, optimizer):
    kept, formed_again = _head(rate, optimizer), _head(rate, optimizer)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(10, 16, generator=gen)
        labels = torch.randint(0, 60, (10,), generator=gen)
        norms = []
        for head in (kept, formed_again):
            for part in (slice(0, 6), slice(6, 10)):  # two micro-batches
                head(x[part], labels[part]).backward()
            norms.append(head.grad_norm_sq())
            assert head._kept is not None
            if head is formed_again:
                head._kept = None  # step forms the gradient again
            head.step(grad_scale=0.5)
        assert torch.equal(norms[0], norms[1])
        assert torch.equal(kept.weight, formed_again.weight)


def test_gradients_beyond_the_budget_are_not_kept():
    head = _head(1.0, "sgd", cache_bytes=60 * 16 * 4 - 1)  # one byte short of the gradient
    head(torch.randn(4, 16), torch.tensor([1, 2, 3, 4])).backward()
    head.grad_norm_sq()
    assert head._kept is None
