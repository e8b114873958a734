"""Shards and initialisation, reduced-precision logits, and clear errors for bad input."""

import pytest
import torch
from dist_utils import run_ranks
from heads_cases import assert_close_scaled, make_problem

from facescale.heads import ArcFace, CosFace, build_head, shard_range
from facescale.heads.shards import INIT_BLOCK, init_centers

DIM = 8


@pytest.mark.parametrize(("num_classes", "world"), [(10, 3), (11, 2), (7, 7), (3, 5), (93431, 8)])
def test_shard_range_tiles_the_classes_as_arcface_torch(num_classes, world):
    start = 0
    for rank in range(world):
        begin, count = shard_range(num_classes, rank, world)
        assert begin == start
        assert count == num_classes // world + (rank < num_classes % world)
        assert begin == num_classes // world * rank + min(rank, num_classes % world)
        start += count
    assert start == num_classes
    with pytest.raises(ValueError, match=f"rank={world}, world_size={world}"):
        shard_range(num_classes, world, world)


def test_initial_centers_do_not_depend_on_the_split():
    num_classes = 2 * INIT_BLOCK + 100
    full = init_centers(0, num_classes, 4, seed=3)
    for world in (2, 3):
        shards = [
            init_centers(*shard_range(num_classes, r, world), 4, seed=3) for r in range(world)
        ]
        assert torch.equal(torch.cat(shards), full)
    assert full.std().item() == pytest.approx(0.01, rel=0.05)
    assert not torch.equal(init_centers(0, 10, 4, seed=4), full[:10])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("lean", [False, True])
def test_reduced_precision_logits_keep_fp32_statistics(dtype, lean):
    """Loss within 1% and gradients within 5% of the largest entry, against fp32 logits."""
    embeddings, labels, _ = make_problem(0, 16, 300, 32)
    results = []
    for logits_dtype in (None, dtype):
        head = build_head(
            "partial_fc", 300, 32, ArcFace(), lean=lean, chunk_size=64, logits_dtype=logits_dtype
        )
        if lean:
            head.configure_optimizer("sgd", lr=0.1)
        x = embeddings.clone().requires_grad_()
        loss = head(x, labels)
        loss.backward()
        assert loss.dtype == torch.float32
        grad_w = head.grad_norm_sq() if lean else head.weight.grad.pow(2).sum()
        results.append((loss.detach(), x.grad, grad_w))
    (loss32, grad32, norm32), (loss16, grad16, norm16) = results
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    assert_close_scaled(grad16, grad32, 5e-2, "embedding gradient")
    assert norm16.item() == pytest.approx(norm32.item(), rel=5e-2)


@pytest.mark.parametrize("lean", [False, True])
def test_fp16_logits_do_not_overflow(lean):
    """Every class as close as possible to the embedding at s = 64: the sum of exp(64) x 2000."""
    centers = torch.randn(1, DIM).repeat(2000, 1)
    head = build_head("partial_fc", 2000, DIM, CosFace(), lean=lean, logits_dtype="fp16")
    if lean:
        head.configure_optimizer("sgd", lr=0.1)
    with torch.no_grad():
        head.weight.copy_(centers)
    x = centers[:4].clone().requires_grad_()
    loss = head(x, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2000.0)).item() + 64 * 0.4, rel=1e-2)


def _head(lean=False):
    return build_head("partial_fc", 10, DIM, ArcFace(), lean=lean)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([1, 2, 10, 3]), r"rank 0: label 10 at batch position 2 is outside \[0, 10\)"),
        (torch.tensor([-1, 2, 1, 3]), r"rank 0: label -1 at batch position 0"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), "rank 0: labels must be an integer tensor"),
        (torch.tensor([1, 2, 3]), "rank 0: 3 labels for 4 embeddings"),
        (torch.tensor([[1, 2, 3, 4]]), "rank 0: a 2-D label tensor for 4 embeddings"),
    ],
)
@pytest.mark.parametrize("lean", [False, True])
def test_bad_labels_are_clear_errors(labels, message, lean):
    with pytest.raises(ValueError, match=message):
        _head(lean)(torch.randn(4, DIM), labels)


def test_embedding_size_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"rank 0: embeddings are \[4, 6\] but this head expects"):
        _head()(torch.randn(4, 6), torch.tensor([1, 2, 3, 4]))
    with pytest.raises(ValueError, match="every rank passed 0 embeddings"):
        _head()(torch.randn(0, DIM), torch.tensor([], dtype=torch.int64))


def _bad_input_on_one_rank(rank, world):
    """The error each rank raises for a bad label on rank 1, then a bad width on rank 0."""
    messages = []
    for problem in ("label", "width"):
        embeddings, labels = torch.randn(3, DIM), torch.tensor([1, 2, 3])
        if problem == "label" and rank == 1:
            labels = torch.tensor([4, 12, 0])
        if problem == "width" and rank == 0:
            embeddings = torch.randn(3, DIM + 1)
        try:
            _head()(embeddings, labels)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank():
    (label0, width0), (label1, width1) = run_ranks(_bad_input_on_one_rank, 2)
    assert (
        label0
        == label1
        == (
            "rank 1: label 12 at batch position 1 is outside [0, 10); labels must be class ids "
            "below num_classes=10 (check num_classes against the dataset)"
        )
    )
    assert width0 == width1 and width0.startswith("rank 0: embeddings are [3, 9]")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "full_fc"}, "unknown head 'full_fc'"),
        ({"kind": "data_parallel", "sample_rate": 0.5}, "takes sample_rate=1 and lean=False"),
        ({"sample_rate": 0.0}, r"sample_rate=0.0 must be in \(0, 1\]"),
        ({"interclass_filtering_threshold": 1.0}, r"must be in \[0, 1\)"),
        ({"logits_dtype": "fp8"}, "logits_dtype='fp8'"),
        ({"num_classes": 0}, "num_classes=0"),
    ],
)
def test_bad_head_arguments_are_clear_errors(kwargs, message):
    args = {"kind": "partial_fc", "num_classes": 10, "embedding_size": DIM, "margin": ArcFace()}
    with pytest.raises(ValueError, match=message):
        build_head(**{**args, **kwargs})
