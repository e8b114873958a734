"""The lean head (chunked, owns its optimizer) equals the drop-in head with a torch optimizer.

Several optimizer steps with a changing learning rate, gradient accumulation over
micro-batches of unequal sizes, and global-norm clipping; on 1 rank without a process group
and on 2 spawned ranks. Tolerance: weights, gradients and optimizer state within 1e-5 of
their largest entry (both fp32; only the summation order differs); AdamW weights 5e-5.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks
from heads_cases import assert_close_scaled, center_grad, make_problem

from facescale.heads import AdaFace, ArcFace, CombinedMargin, CurricularFace, MagFace, build_head

DIM = 8
NUM_CLASSES = 13
MARGIN = CombinedMargin(64, 0.9, 0.3, 0.1)
# per optimizer step, per micro-batch: rows on each of (up to) two ranks
MICRO_SIZES = [[[5, 3], [2, 6]], [[4, 1], [3, 3]], [[6, 2], [1, 4]]]
# (optimizer, momentum, weight decay, sample rate, micro-batches, max grad norm, cache
# bytes: None the default, which keeps every probability; 0 recomputes them all; 300 keeps
# the first micro-batch of a step and recomputes the second)
CASES = [
    ("sgd", 0.9, 5e-4, 1.0, 2, 0.5, None),
    ("adamw", 0.0, 5e-4, 1.0, 1, 0.0, None),
    ("sgd", 0.0, 0.0, 0.5, 2, 0.0, None),
    ("sgd", 0.0, 0.0, 0.5, 2, 0.5, 0),
    ("sgd", 0.9, 5e-4, 1.0, 2, 0.5, 300),
]
# other losses and sub-centers, as (the case, the loss's margin, centers per class);
# sampling without momentum and weight decay, which torch applies to unsampled rows too;
# MagFace at s = 32: its norm terms make s = 64 magnify fp32 rounding past the tolerance
LOSS_CASES = [
    (("sgd", 0.0, 0.0, 0.5, 2, 0.5, 300), CurricularFace, 3),
    (("sgd", 0.9, 5e-4, 1.0, 2, 0.0, 0), lambda: MagFace(32, l_a=2.0, u_a=4.0), 1),
    (("adamw", 0.0, 5e-4, 1.0, 2, 0.0, None), AdaFace, 2),
]
CASES += [(*case, margin, k) for case, margin, k in LOSS_CASES]


def _torch_optimizer(kind, params, momentum, weight_decay):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=0.1, weight_decay=weight_decay)


def _global_norm(local_sq: torch.Tensor) -> float:
    total = local_sq.detach().double().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
    return total.sqrt().item()


def _train_both(rank, world, case):
    kind, momentum, weight_decay, rate, micro, max_norm, cache_bytes, *loss = case
    make_margin, k = loss if loss else (lambda: MARGIN, 1)
    cache = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    options = {"chunk_size": 3, "num_subcenters": k}
    heads = {
        False: build_head("partial_fc", NUM_CLASSES, DIM, make_margin(), rate, **options),
        True: build_head(
            "partial_fc", NUM_CLASSES, DIM, make_margin(), rate, lean=True, **options, **cache
        ),
    }
    optimizer = _torch_optimizer(kind, heads[False].parameters(), momentum, weight_decay)
    heads[True].configure_optimizer(kind, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    record = {"loss": [], "grad_x": [], "norm": []}
    for step, micro_sizes in enumerate(MICRO_SIZES):
        lr = 0.3 / (step + 1)
        for m in range(micro):
            sizes = micro_sizes[m][:world]
            embeddings, labels, _ = make_problem(10 * step + m, sum(sizes), NUM_CLASSES, DIM)
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            for lean, head in heads.items():
                x = embeddings[rows].clone().requires_grad_()
                loss = head(x, labels[rows]) / micro
                loss.backward()
                record["loss"].append((lean, loss.item()))
                record["grad_x"].append((lean, x.grad))
        norms = {
            False: _global_norm(heads[False].weight.grad.pow(2).sum()),
            True: _global_norm(heads[True].grad_norm_sq()),
        }
        record["norm"].append((norms[False], norms[True]))
        coef = min(1.0, max_norm / norms[False]) if max_norm else 1.0
        heads[False].weight.grad.mul_(coef)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        heads[True].step(lr, grad_scale=coef)
        heads[True].zero_grad()
    torch_state = optimizer.state[heads[False].weight]
    for name, value in heads[False].margin.state_dict().items():  # running state alike
        torch.testing.assert_close(heads[True].margin.get_buffer(name), value)
    return record, heads[False].weight.detach(), heads[True].state_dict(), torch_state


def _assert_same_training(result, kind):
    record, dropin_weight, lean_state, torch_state = result
    weight_tol = 1e-5 if kind == "sgd" else 5e-5  # Adam's 1/sqrt(v) magnifies tiny gradients
    by_mode = {mode: [v for m, v in record["loss"] if m == mode] for mode in (False, True)}
    torch.testing.assert_close(by_mode[True], by_mode[False], rtol=1e-5, atol=0)
    grads = {mode: [v for m, v in record["grad_x"] if m == mode] for mode in (False, True)}
    for lean_grad, dropin_grad in zip(grads[True], grads[False], strict=True):
        assert_close_scaled(lean_grad, dropin_grad, 1e-5, "embedding gradient")
    for dropin_norm, lean_norm in record["norm"]:
        assert lean_norm == pytest.approx(dropin_norm, rel=1e-5)
    assert_close_scaled(lean_state["weight"], dropin_weight, weight_tol, "weight")
    for name in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
        if name in torch_state:
            assert_close_scaled(lean_state[name], torch_state[name], 1e-5, name)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-rate{c[3]}-micro{c[4]}-cache{c[6]}-k{c[8:] or 1}"
)
def test_lean_equals_dropin_after_several_steps_single_process(case):
    _assert_same_training(_train_both(0, 1, case), case[0])


def _all_cases(rank, world):
    return [_train_both(rank, world, case) for case in CASES]


def test_lean_equals_dropin_after_several_steps_on_two_ranks():
    for case, per_rank in zip(CASES, zip(*run_ranks(_all_cases, 2), strict=True), strict=True):
        for result in per_rank:
            _assert_same_training(result, case[0])


def _lean_head(**kw):
    head = build_head("partial_fc", NUM_CLASSES, DIM, MARGIN, lean=True, chunk_size=5, **kw)
    head.configure_optimizer("sgd", lr=0.2)
    return head


def test_probabilities_are_kept_while_they_fit_the_budget():
    head = _lean_head(cache_bytes=6 * NUM_CLASSES * 4 + 4 * NUM_CLASSES * 4)
    for rows in (6, 4, 1):  # the third micro-batch no longer fits
        embeddings, labels, _ = make_problem(rows, rows, NUM_CLASSES, DIM)
        head(embeddings.requires_grad_(), labels).backward()
    assert [mb.probs is not None for mb in head.pending] == [True, True, False]
    embeddings, labels, _ = make_problem(6, 6, NUM_CLASSES, DIM)  # the first micro-batch
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(head.weight, dim=1).t()
    logits = MARGIN.s * cosine
    rows = torch.arange(6)
    logits[rows, labels] = MARGIN(cosine[rows, labels])
    expected = logits.softmax(dim=1).index_put_((rows, labels), torch.tensor(0.0))
    torch.testing.assert_close(head.pending[0].probs, expected, rtol=1e-5, atol=1e-7)
    head.step()
    embeddings, labels, _ = make_problem(9, 6, NUM_CLASSES, DIM)
    head(embeddings.requires_grad_(), labels).backward()
    assert head.pending[0].probs is not None  # the budget is per step


def test_kept_softmax_stays_finite_when_every_negative_is_filtered():
    """A row whose negatives are all filtered and whose target logit is far below -88 (where
    exp overflows float32) still gives the drop-in head's finite center gradient."""
    margin = ArcFace(100, 0.5)
    centers = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    x, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([2])
    grads = []
    for lean in (False, True):
        options = {"lean": lean, "interclass_filtering_threshold": 0.5}
        head = build_head("partial_fc", 3, 2, margin, chunk_size=2, **options)
        if lean:
            head.configure_optimizer("sgd", lr=0.1)
        head.weight.data.copy_(centers)
        loss = head(x.clone().requires_grad_(), labels)
        loss.backward()
        assert loss.item() == pytest.approx(0.0, abs=1e-6)  # the target is the only class
        grads.append(center_grad(head))
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_forward_without_grad_records_nothing():
    embeddings, labels, _ = make_problem(1, 6, NUM_CLASSES, DIM)
    head = _lean_head()
    with torch.no_grad():
        evaluated = head(embeddings, labels)
    head.step()
    assert head.optimizer_steps == 0
    trained = head(embeddings.requires_grad_(), labels)
    assert evaluated.item() == pytest.approx(trained.item(), rel=1e-6)


def test_zero_grad_forgets_recorded_micro_batches():
    embeddings, labels, _ = make_problem(2, 6, NUM_CLASSES, DIM)
    head = _lean_head()
    before = head.weight.clone()
    head(embeddings.requires_grad_(), labels).backward()
    head.zero_grad()
    head.step()
    assert torch.equal(head.weight, before)


def test_centers_learn_when_embeddings_need_no_gradient():
    embeddings, labels, _ = make_problem(3, 6, NUM_CLASSES, DIM)
    lean = _lean_head()
    dropin = build_head("partial_fc", NUM_CLASSES, DIM, MARGIN)
    optimizer = torch.optim.SGD(dropin.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    lean(embeddings, labels).backward()
    lean.step()
    dropin(embeddings, labels).backward()
    optimizer.step()
    torch.testing.assert_close(lean.weight, dropin.weight.detach(), rtol=1e-5, atol=1e-7)


def test_state_dict_holds_per_row_state_and_scalars():
    head = _lean_head()
    state = head.state_dict()
    assert set(state) == {"weight", "momentum_buffer", "_extra_state"}
    assert state["momentum_buffer"].shape == (NUM_CLASSES, DIM)
    assert state["_extra_state"] == {"sampler": {}, "optimizer_steps": 0}
    head.configure_optimizer("adamw", lr=1e-3, weight_decay=0.05)
    assert set(head.state_dict()) == {"weight", "exp_avg", "exp_avg_sq", "_extra_state"}


def test_lean_only_calls_are_clear_errors_elsewhere():
    # the drop-in head is another class: a torch optimizer steps it, it has no update of its own
    dropin = build_head("partial_fc", NUM_CLASSES, DIM, MARGIN)
    for name in ("step", "grad_norm_sq", "configure_optimizer", "pending"):
        assert not hasattr(dropin, name)
    unconfigured = build_head("partial_fc", NUM_CLASSES, DIM, MARGIN, lean=True)
    with pytest.raises(RuntimeError, match="configure_optimizer"):
        unconfigured.step()
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        unconfigured.configure_optimizer("lamb")
