"""The losses by config name, and the running state of AdaFace and CurricularFace: kept in
the head's checkpoint state, untouched by evaluation forwards."""

import pytest
import torch
from heads_cases import make_problem

from facescale.config import load_config
from facescale.errors import ConfigError
from facescale.heads import AdaFace, ArcFace, CosFace, CurricularFace, MagFace, build_head
from facescale.heads.losses import LOSS_NAMES, build_margin

DIM = 8


def test_combined_is_margin_list_as_before():
    margin = build_margin("combined", 32.0, (0.9, 0.3, 0.1))
    assert (margin.s, margin.m1, margin.m2, margin.m3) == (32.0, 0.9, 0.3, 0.1)
    assert load_config("demo").loss == "combined"


@pytest.mark.parametrize(
    ("loss", "kind"),
    [
        ("arcface", ArcFace),
        ("cosface", CosFace),
        ("adaface", AdaFace),
        ("magface", MagFace),
        ("curricularface", CurricularFace),
    ],
)
def test_each_name_builds_its_loss_at_the_config_scale(loss, kind):
    margin_list = (1.0, 0.0, 0.35) if loss == "cosface" else (1.0, 0.5, 0.0)
    margin = build_margin(loss, 48.0, margin_list)
    assert type(margin) is kind and margin.s == 48.0
    assert loss in LOSS_NAMES


def test_arcface_and_cosface_refuse_a_margin_list_of_another_shape():
    with pytest.raises(ConfigError, match="loss='cosface' takes margin_list"):
        load_config("cpu_tiny", ["loss=cosface"])
    with pytest.raises(ConfigError, match="loss='arcface' takes margin_list"):
        build_margin("arcface", 64.0, (1.0, 0.0, 0.35))


def test_data_parallel_head_refuses_losses_with_running_state():
    with pytest.raises(ConfigError, match="head='partial_fc'"):
        load_config("cpu_tiny", ["loss=adaface", "head=data_parallel"])
    with pytest.raises(ValueError, match="running state"):
        build_head("data_parallel", 10, DIM, CurricularFace())
    build_head("data_parallel", 10, DIM, MagFace())  # no running state: allowed


def _trained_head(margin):
    embeddings, labels, _ = make_problem(3, 6, 10, DIM)
    head = build_head("partial_fc", 10, DIM, margin, lean=True, chunk_size=4)
    head.configure_optimizer("sgd", lr=0.1)
    head(embeddings, labels).backward()
    head.step()
    return head, embeddings, labels


@pytest.mark.parametrize("make", [AdaFace, CurricularFace])
def test_running_state_travels_in_the_checkpoint_state(make):
    head, embeddings, labels = _trained_head(make())
    state = head.checkpoint_state()
    names = {"batch_mean", "batch_std"} if make is AdaFace else {"t"}
    assert {f"margin.{n}" for n in names} <= state.keys()
    assert all(state[f"margin.{n}"].dim() == 0 for n in names)  # per rank, not per class
    fresh = build_head("partial_fc", 10, DIM, make(), lean=True, chunk_size=4)
    fresh.configure_optimizer("sgd", lr=0.1)
    saved = {n: head.margin.get_buffer(n) for n in names}
    assert not all(torch.equal(fresh.margin.get_buffer(n), v) for n, v in saved.items())
    fresh.load_checkpoint_state(state)
    assert all(torch.equal(fresh.margin.get_buffer(n), v) for n, v in saved.items())
    assert torch.equal(fresh(embeddings, labels), head(embeddings, labels))


@pytest.mark.parametrize("make", [AdaFace, CurricularFace])
@pytest.mark.parametrize("lean", [False, True])
def test_evaluation_forwards_leave_the_running_state_alone(make, lean):
    embeddings, labels, _ = make_problem(3, 6, 10, DIM)
    head = build_head("partial_fc", 10, DIM, make(), lean=lean, chunk_size=4)
    before = {k: v.clone() for k, v in head.margin.state_dict().items()}
    with torch.no_grad():
        head(embeddings, labels)
    assert all(torch.equal(head.margin.state_dict()[k], v) for k, v in before.items())
    head(embeddings, labels)
    assert any(not torch.equal(head.margin.state_dict()[k], v) for k, v in before.items())


def test_subcenters_are_sampled_and_checkpointed_by_class():
    embeddings, labels, _ = make_problem(6, 8, 40, DIM)
    head = build_head(
        "partial_fc", 40, DIM, ArcFace(), 0.25, lean=True, chunk_size=4, num_subcenters=3
    )
    head.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    assert head.weight.shape == (120, DIM)
    before = head.weight.clone()
    head(embeddings, labels).backward()
    head.step()
    sampled = head.sampled_classes
    assert len(sampled) == 10 and set(labels.tolist()) <= set(sampled.tolist())
    changed = (head.weight != before).any(dim=1).view(40, 3).any(dim=1)
    assert changed.nonzero().squeeze(1).tolist() == sampled.tolist()
    state = head.checkpoint_state()
    assert state["weight"].shape == state["momentum_buffer"].shape == (40, 3, DIM)
    fresh = build_head("partial_fc", 40, DIM, ArcFace(), 0.25, lean=True, num_subcenters=3)
    fresh.configure_optimizer("sgd", lr=0.5, momentum=0.9)
    fresh.load_checkpoint_state(state)
    assert torch.equal(fresh.weight, head.weight)
    assert torch.equal(fresh.momentum_buffer, head.momentum_buffer)


def test_a_class_gets_the_logit_of_its_best_subcenter():
    """Two sub-centers: one along the embedding, one opposite; the class's cosine is 1."""
    x = torch.tensor([[1.0, 0.0]])
    head = build_head("partial_fc", 2, 2, CosFace(2, 0.0), num_subcenters=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    loss = head(x, torch.tensor([0]))
    # logits: class 0 max(-2, 2) = 2, class 1 max(0, 0) = 0
    assert loss.item() == pytest.approx(torch.log1p(torch.exp(torch.tensor(-2.0))).item())
