"""Partial FC sampling: sample size and content, reproducibility, exactness on the sample,
and steps that leave unsampled centers (and their optimizer state) bit-identical."""

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
from host_syncs import HostSyncs

from facescale.heads import AdaFace, ArcFace, CombinedMargin, CurricularFace, MagFace, build_head
from facescale.heads.sampling import ClassSampler, select_classes

DIM = 8
MARGIN = CombinedMargin(64, 0.9, 0.3, 0.1)
# fresh margins (some keep running state) for the sampled exactness test
LOSSES = {
    "combined": lambda: MARGIN,
    "adaface": AdaFace,
    "magface": lambda: MagFace(64, l_a=2.0, u_a=4.0),
    "curricularface": CurricularFace,
    "subcenter": lambda: ArcFace(64, 0.5),
}
SUBCENTERS = {"subcenter": 3}  # centers per class; the others have one


def _head(num_classes, rate, lean, seed=0, margin=MARGIN, **kw):
    head = build_head(
        "partial_fc", num_classes, DIM, margin, rate, lean=lean, chunk_size=4, seed=seed, **kw
    )
    if lean:
        head.configure_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    return head


def test_sample_holds_every_positive_and_has_the_ceiling_size():
    sampler = ClassSampler(num_local=10, sample_rate=0.25, seed=0, rank=0)
    assert sampler.num_sample == 3  # ceil(2.5)
    assert ClassSampler(10, 0.3, 0, 0).num_sample == 3  # 0.3 * 10 is 3, not 4
    for _ in range(20):
        index = sampler.draw(torch.tensor([7, 7]))
        assert index.tolist() == sorted(set(index.tolist())) and len(index) == 3 and 7 in index
    many = torch.tensor([9, 1, 4, 6, 1])
    assert sampler.draw(many).tolist() == [1, 4, 6, 9]  # more positives than the sample size


def test_rows_outside_the_shard_mark_no_class():
    a, b = ClassSampler(10, 0.25, 0, 0), ClassSampler(10, 0.25, 0, 0)
    for _ in range(10):  # num_local (10) stands for a row outside the shard
        assert a.draw(torch.tensor([7, 10, 10])).tolist() == b.draw(torch.tensor([7])).tolist()
    many = torch.tensor([9, 10, 1, 4, 6, 1])
    assert a.draw(many).tolist() == [1, 4, 6, 9]  # more positives than the sample size


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_selection_puts_the_shards_targets_first_without_waiting(rate):
    labels = torch.tensor([55, 3, 12, 14, 55, 11, 72, 12, 49])
    start, num_local = 10, 40  # the shard holds classes 10..49; the sample, 12 > the batch
    sampler = ClassSampler(num_local, rate, 0, 0) if rate < 1 else None
    with HostSyncs() as syncs:
        sel = select_classes(labels, start, num_local, sampler)
    assert syncs.calls == []
    computed = list(range(num_local)) if sel.index is None else sel.index.tolist()
    assert sel.count == len(computed) == (40 if rate == 1 else 12)
    local = [(row, c - start) for row, c in enumerate(labels.tolist()) if 0 <= c - start < 40]
    mine = sorted((computed.index(c), row, c) for row, c in local)  # (column, row, local id)
    n = len(mine)
    assert n == 5 and sel.valid.tolist() == [True] * n + [False] * (len(labels) - n)
    found = torch.stack([sel.target_cols, sel.target_rows, sel.target_local], dim=1)
    assert [tuple(t) for t in found[:n].tolist()] == mine
    assert sorted(sel.target_rows.tolist()) == list(range(len(labels)))
    assert (sel.target_cols[n:] >= sel.count).all() and (sel.target_local[n:] == 0).all()
    values = torch.arange(1.0, len(labels) + 1)
    assert sel.masked(values).tolist() == values[:n].tolist() + [0.0] * (len(labels) - n)


def test_negatives_are_uniform():
    sampler = ClassSampler(num_local=20, sample_rate=0.25, seed=3, rank=0)
    counts = torch.zeros(20)
    draws = 2000
    for _ in range(draws):
        counts[sampler.draw(torch.tensor([0]))] += 1
    assert counts[0] == draws
    expected = draws * 4 / 19  # 4 negatives out of 19 each draw; std about 18
    assert (counts[1:] - expected).abs().max() < 90


def test_draws_are_reproducible_per_rank_and_resume_from_state():
    def draws(sampler, n):
        return [sampler.draw(torch.tensor([2])).tolist() for _ in range(n)]

    a, b, other = (ClassSampler(100, 0.1, 7, r) for r in (0, 0, 1))
    first = draws(a, 6)
    assert first == draws(b, 6)
    assert sum(x != y for x, y in zip(first, draws(other, 6), strict=True)) >= 5
    resumed = ClassSampler(100, 0.1, 7, 0)
    resumed.load_state_dict({"seed": 7, "draws": 3})
    assert draws(resumed, 3) == first[3:]


@pytest.mark.parametrize("lean", [False, True])
def test_rate_that_covers_the_shard_equals_model_parallel(lean):
    embeddings, labels, weight = make_problem(2, 6, 10, DIM)
    results = []
    for rate in (1.0, 0.95):  # ceil(0.95 * 10) = 10: every class is sampled
        head = _head(10, rate, lean)
        load_shard(head, weight)
        x, y = local_inputs(embeddings, labels, [6], 0)
        loss = head(x, y)
        loss.backward()
        results.append((loss, x.grad, center_grad(head)))
    for full, sampled in zip(*results, strict=True):
        torch.testing.assert_close(sampled, full, rtol=1e-6, atol=1e-7)


def _centers(loss_name, weight):
    """The problem's centers, or K per class for sub-centers."""
    k = SUBCENTERS.get(loss_name, 1)
    if k == 1:
        return weight
    return torch.randn(len(weight) * k, DIM, generator=torch.Generator().manual_seed(9))


def _sampled_cases(rank, world, loss_name):
    """Drop-in and lean heads at rate 0.2: loss, gradients and the classes each rank sampled."""
    sizes = [5, 3][:world]
    embeddings, labels, weight = make_problem(4, sum(sizes), 80, DIM)
    weight = _centers(loss_name, weight)
    results = {}
    for lean in (False, True):
        margin = LOSSES[loss_name]()
        head = _head(
            80,
            0.2,
            lean,
            seed=11,
            margin=margin,
            scale_embedding_grad=False,
            num_subcenters=SUBCENTERS.get(loss_name, 1),
        )
        load_shard(head, weight)
        x, y = local_inputs(embeddings, labels, sizes, rank)
        loss = head(x, y)
        loss.backward()
        results[lean] = (loss.item(), x.grad, center_grad(head), head.sampled_classes)
    return results


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("world", [1, 2])
def test_sampled_loss_equals_the_reference_restricted_to_the_sample(world, loss_name):
    sizes = [5, 3][:world]
    embeddings, labels, weight = make_problem(4, sum(sizes), 80, DIM)
    if world == 1:
        per_rank = [_sampled_cases(0, 1, loss_name)]
    else:
        per_rank = run_ranks(_sampled_cases, 2, loss_name)
    for lean in (False, True):
        results = [r[lean] for r in per_rank]
        classes = torch.cat([r[3] for r in results])
        assert len(classes) == 16 and set(labels.tolist()) <= set(classes.tolist())
        margin, k = LOSSES[loss_name](), SUBCENTERS.get(loss_name, 1)
        loss, grad_x, grad_w = reference_grads(
            embeddings, labels, _centers(loss_name, weight), margin, classes=classes, subcenters=k
        )
        for result in results:
            assert result[0] == pytest.approx(loss.item(), rel=1e-5)
        assert_close_scaled(torch.cat([r[1] for r in results]), grad_x, 1e-4, "embeddings")
        assert_close_scaled(torch.cat([r[2] for r in results]), grad_w, 1e-4, "centers")
        if world == 2:  # ranks draw their own samples
            local = [(r[3] - 40 * rank).tolist() for rank, r in enumerate(results)]
            assert local[0] != local[1]


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_lean_step_leaves_unsampled_rows_and_their_state_bit_identical(kind):
    embeddings, labels, _ = make_problem(5, 12, 60, DIM)
    head = _head(60, 0.25, lean=True)
    head.configure_optimizer(kind, lr=0.5, momentum=0.9, weight_decay=5e-4)
    state_names = head.optimizer.state_names
    for step in range(3):
        before = {k: v.clone() for k, v in head.state_dict().items() if torch.is_tensor(v)}
        rows = slice(4 * step, 4 * step + 4)
        head(embeddings[rows], labels[rows]).backward()
        sampled = head.sampled_classes
        head.step()
        untouched = torch.ones(60, dtype=torch.bool)
        untouched[sampled] = False
        for name in ("weight", *state_names):
            now = getattr(head, name)
            assert torch.equal(now[untouched], before[name][untouched]), (step, name)
            assert (now[sampled] != before[name][sampled]).any(dim=1).all(), (step, name)


def test_dropin_plain_sgd_changes_only_sampled_rows():
    embeddings, labels, _ = make_problem(6, 8, 60, DIM)
    head = _head(60, 0.25, lean=False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    before = head.weight.detach().clone()
    head(embeddings, labels).backward()
    optimizer.step()
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[head.sampled_classes] = False
    assert torch.equal(head.weight[untouched], before[untouched])
    assert (head.weight[~untouched] != before[~untouched]).any(dim=1).all()


def test_sampling_is_reproducible_from_seed_and_state_dict():
    embeddings, labels, _ = make_problem(7, 16, 60, DIM)
    run = _head(60, 0.25, lean=True, seed=5)
    saved = None
    samples = []
    for step in range(4):
        if step == 2:
            saved = {k: v.clone() if torch.is_tensor(v) else v for k, v in run.state_dict().items()}
        rows = slice(4 * step, 4 * step + 4)
        run(embeddings[rows], labels[rows]).backward()
        samples.append(run.sampled_classes)
        run.step()
    resumed = _head(60, 0.25, lean=True, seed=0)
    resumed.load_state_dict(saved)
    for step in (2, 3):
        rows = slice(4 * step, 4 * step + 4)
        resumed(embeddings[rows], labels[rows]).backward()
        assert torch.equal(resumed.sampled_classes, samples[step])
        resumed.step()
    assert torch.equal(resumed.weight, run.weight)
    assert torch.equal(resumed.momentum_buffer, run.momentum_buffer)
    fresh = _head(60, 0.25, lean=True, seed=5)
    fresh(embeddings[:4], labels[:4])
    assert torch.equal(fresh.sampled_classes, samples[0])


def test_arcface_sampled_head_learns_its_batch():
    """A few lean Partial FC steps on one batch lower its loss (sanity of the update's sign)."""
    embeddings, labels, _ = make_problem(8, 16, 200, DIM)
    head = build_head("partial_fc", 200, DIM, ArcFace(16, 0.2), 0.2, lean=True, chunk_size=16)
    head.configure_optimizer("sgd", lr=2.0, momentum=0.0, weight_decay=0.0)
    losses = []
    for _ in range(10):
        loss = head(embeddings, labels)
        loss.backward()
        head.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
