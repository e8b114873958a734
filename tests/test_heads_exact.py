"""Every head against the float64 single-process reference: loss, embedding and center gradients.

World sizes 1 (no process group), 2 and 3 (spawned gloo ranks) with uneven class splits
(11 over 2, 10 over 3) and uneven batches (one rank may pass no rows). Tolerance: fp32
against float64, max error <= 1e-5 of the loss and 1e-4 of the largest gradient entry.
Heads storing their centers in bf16 or fp16 are held to the same tolerance against the
reference on the rounded centers.
"""

import pytest
import torch
from dist_utils import run_ranks
from heads_cases import (
    assert_close_scaled,
    center_grad,
    load_shard,
    local_inputs,
    make_problem,
    reference_grads,
)

from facescale.heads import ArcFace, CombinedMargin, CosFace, build_head

DIM = 8
NUM_CLASSES = {1: 10, 2: 11, 3: 10}
SIZES = {1: [6], 2: [4, 7], 3: [5, 3, 0]}
MARGINS = {
    "arcface": ArcFace(64, 0.5),
    "cosface": CosFace(64, 0.4),
    "combined": CombinedMargin(64, 0.9, 0.3, 0.1),
    "straight": ArcFace(64, 0.5, straight_through=True),
}
MODES = ("dropin", "lean", "lean_recompute", "data_parallel")  # recompute: no cache
CENTER_DTYPES = {"lean_bf16": torch.bfloat16, "lean_fp16": torch.float16}  # narrow storage
# (margin, mode, inter-class filtering threshold)
CASES = [(m, mode, 0.0) for m in ("arcface", "cosface", "combined") for mode in MODES]
CASES += [("arcface", mode, 0.25) for mode in MODES] + [("straight", "dropin", 0.0)]
CASES += [("straight", "lean", 0.0)]
CASES += [(m, mode, 0.0) for m in ("arcface", "combined") for mode in CENTER_DTYPES]
CASES += [("arcface", "lean_bf16", 0.25)]


def _build(mode, margin, num_classes, threshold):
    kind = "data_parallel" if mode == "data_parallel" else "partial_fc"
    head = build_head(
        kind,
        num_classes,
        DIM,
        margin,
        lean=mode.startswith("lean"),
        chunk_size=3,
        cache_bytes=0 if mode == "lean_recompute" else 2**20,
        interclass_filtering_threshold=threshold,
        **({"center_dtype": mode.removeprefix("lean_")} if mode in CENTER_DTYPES else {}),
    )
    if mode.startswith("lean"):
        head.configure_optimizer("sgd", lr=0.1)
    return head


def _run_cases(rank, world):
    sizes, num_classes = SIZES[world], NUM_CLASSES[world]
    embeddings, labels, weight = make_problem(0, sum(sizes), num_classes, DIM)
    out = {}
    for name, mode, threshold in CASES:
        head = _build(mode, MARGINS[name], num_classes, threshold)
        if mode == "data_parallel":
            with torch.no_grad():
                head.weight.copy_(weight)
        else:
            load_shard(head, weight)
        x, y = local_inputs(embeddings, labels, sizes, rank)
        loss = head(x, y)
        loss.backward()
        out[name, mode, threshold] = (loss.item(), x.grad, center_grad(head))
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_loss_and_gradients_match_the_float64_reference(world):
    results = [_run_cases(0, 1)] if world == 1 else run_ranks(_run_cases, world)
    embeddings, labels, weight = make_problem(0, sum(SIZES[world]), NUM_CLASSES[world], DIM)
    for case in CASES:
        name, mode, threshold = case
        stored = weight.to(CENTER_DTYPES[mode]).float() if mode in CENTER_DTYPES else weight
        loss, grad_x, grad_w = reference_grads(
            embeddings, labels, stored, MARGINS[name], threshold=threshold
        )
        for rank, result in enumerate(results):
            assert result[case][0] == pytest.approx(loss.item(), rel=1e-5), (case, rank)
        assert_close_scaled(torch.cat([r[case][1] for r in results]), grad_x, 1e-4, str(case))
        centers = (
            results[0][case][2]
            if mode == "data_parallel"
            else torch.cat([r[case][2] for r in results])
        )
        assert_close_scaled(centers, grad_w, 1e-4, str(case))


def test_filtering_removes_negatives_from_the_softmax():
    """The threshold changes the loss, and only by dropping the filtered negatives."""
    embeddings, labels, weight = make_problem(1, 6, 10, DIM)
    kept, _, _ = reference_grads(embeddings, labels, weight, MARGINS["arcface"])
    head = _build("lean", MARGINS["arcface"], 10, 0.25)
    load_shard(head, weight)
    filtered = head(embeddings, labels)
    cosine = (
        torch.nn.functional.normalize(embeddings, dim=1)
        @ torch.nn.functional.normalize(weight, dim=1).t()
    )
    dirty = cosine > 0.25
    dirty[torch.arange(6), labels] = False
    assert dirty.any() and filtered.item() < kept.item() - 1e-3
    logits = 64 * cosine
    rows = torch.arange(6)
    logits[rows, labels] = ArcFace(64, 0.5)(cosine[rows, labels])
    zeroed = torch.nn.functional.cross_entropy(logits.masked_fill(dirty, 0.0), labels)
    removed = torch.nn.functional.cross_entropy(logits.masked_fill(dirty, float("-inf")), labels)
    assert filtered.item() == pytest.approx(removed.item(), rel=1e-5)
    assert abs(filtered.item() - zeroed.item()) > 1e-3
