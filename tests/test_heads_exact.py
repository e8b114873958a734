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

from facescale.heads import (
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    MagFace,
    build_head,
)
from facescale.heads.reference import adaface_statistics, curricular_t

DIM = 8
NUM_CLASSES = {1: 10, 2: 11, 3: 10}
SIZES = {1: [6], 2: [4, 7], 3: [5, 3, 0]}
# a fresh margin per head: some keep running state
MARGINS = {
    "arcface": lambda: ArcFace(64, 0.5),
    "cosface": lambda: CosFace(64, 0.4),
    "combined": lambda: CombinedMargin(64, 0.9, 0.3, 0.1),
    "straight": lambda: ArcFace(64, 0.5, straight_through=True),
    "adaface": AdaFace,
    # magnitude bounds inside the spread of these embeddings' norms (about 1.5 to 4.5), so
    # both the clipped and the norm-dependent parts of the margin are exercised
    "magface": lambda: MagFace(64, l_a=2.0, u_a=4.0),
    "curricularface": CurricularFace,
}
NEW_LOSSES = ("adaface", "magface", "curricularface")
MODES = ("dropin", "lean", "lean_recompute", "data_parallel")  # recompute: no cache
CENTER_DTYPES = {"lean_bf16": torch.bfloat16, "lean_fp16": torch.float16}  # narrow storage
# (margin, mode, inter-class filtering threshold)
CASES = [(m, mode, 0.0) for m in ("arcface", "cosface", "combined") for mode in MODES]
CASES += [("arcface", mode, 0.25) for mode in MODES] + [("straight", "dropin", 0.0)]
CASES += [("straight", "lean", 0.0)]
CASES += [(m, mode, 0.0) for m in NEW_LOSSES for mode in MODES[:3]]
CASES += [("magface", "data_parallel", 0.0), ("curricularface", "lean", 0.25)]
# sub-center ArcFace: K centers per class, rows of a class on one rank
SUBCENTERS = {"subcenter": 3, "subcenter_adaface": 2}
MARGINS |= {"subcenter": MARGINS["arcface"], "subcenter_adaface": AdaFace}
CASES += [("subcenter", mode, 0.0) for mode in MODES] + [("subcenter", "lean", 0.25)]
CASES += [("subcenter_adaface", mode, 0.0) for mode in ("dropin", "lean_recompute")]
CASES += [(m, mode, 0.0) for m in ("arcface", "combined") for mode in CENTER_DTYPES]
CASES += [("arcface", "lean_bf16", 0.25)]


def _weight(name, weight, num_classes):
    """The problem's centers, or K per class for a sub-center case."""
    k = SUBCENTERS.get(name, 1)
    if k == 1:
        return weight
    return torch.randn(num_classes * k, DIM, generator=torch.Generator().manual_seed(5))


def _build(mode, margin, num_classes, threshold, num_subcenters=1):
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
        scale_embedding_grad=False,  # each rank's exact share of the global loss's gradient
        num_subcenters=num_subcenters,
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
        head = _build(mode, MARGINS[name](), num_classes, threshold, SUBCENTERS.get(name, 1))
        centers = _weight(name, weight, num_classes)
        if mode == "data_parallel":
            with torch.no_grad():
                head.weight.copy_(centers)
        else:
            load_shard(head, centers)
        x, y = local_inputs(embeddings, labels, sizes, rank)
        loss = head(x, y)
        loss.backward()
        state = {k: v.clone() for k, v in head.margin.state_dict().items()}
        out[name, mode, threshold] = (loss.item(), x.grad, center_grad(head), state)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_loss_and_gradients_match_the_float64_reference(world):
    results = [_run_cases(0, 1)] if world == 1 else run_ranks(_run_cases, world)
    embeddings, labels, weight = make_problem(0, sum(SIZES[world]), NUM_CLASSES[world], DIM)
    for case in CASES:
        name, mode, threshold = case
        margin, k = MARGINS[name](), SUBCENTERS.get(name, 1)
        centers = _weight(name, weight, NUM_CLASSES[world])
        if mode in CENTER_DTYPES:
            centers = centers.to(CENTER_DTYPES[mode]).float()
        loss, grad_x, grad_w = reference_grads(
            embeddings, labels, centers, margin, threshold=threshold, subcenters=k
        )
        state = _expected_state(margin, embeddings, labels, weight)
        for rank, result in enumerate(results):
            assert result[case][0] == pytest.approx(loss.item(), rel=1e-5), (case, rank)
            assert result[case][3].keys() == state.keys()
            for key, value in state.items():
                assert result[case][3][key].item() == pytest.approx(value, rel=1e-5), (case, key)
        assert_close_scaled(torch.cat([r[case][1] for r in results]), grad_x, 1e-4, str(case))
        centers = (
            results[0][case][2]
            if mode == "data_parallel"
            else torch.cat([r[case][2] for r in results])
        )
        assert_close_scaled(centers, grad_w, 1e-4, str(case))


def _expected_state(margin, embeddings, labels, weight):
    """The running state a margin holds after one training batch, in float64."""
    if isinstance(margin, AdaFace):
        mean, std = adaface_statistics(margin, embeddings.double().norm(dim=1))
        return {"batch_mean": mean.item(), "batch_std": std.item()}
    if isinstance(margin, CurricularFace):
        x = torch.nn.functional.normalize(embeddings.double(), dim=1)
        w = torch.nn.functional.normalize(weight.double(), dim=1)
        return {"t": curricular_t(margin, (x * w[labels]).sum(dim=1)).item()}
    return {}


def test_filtering_removes_negatives_from_the_softmax():
    """The threshold changes the loss, and only by dropping the filtered negatives."""
    embeddings, labels, weight = make_problem(1, 6, 10, DIM)
    kept, _, _ = reference_grads(embeddings, labels, weight, MARGINS["arcface"]())
    head = _build("lean", MARGINS["arcface"](), 10, 0.25)
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
