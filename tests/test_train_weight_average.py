"""The weight average (``ema_decay``): its formula against a float64 reference, and a run that
evaluates and saves it and resumes it exactly."""

from __future__ import annotations

import logging

import torch
from dist_utils import run_ranks
from train_utils import train_rank

from facescale import plan
from facescale.config import Config
from facescale.train.build import build_backbone
from facescale.train.weight_average import WeightAverage


def test_average_follows_its_formula_and_skips_skipped_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    model(torch.randn(8, 5))  # BatchNorm statistics and its step counter move too
    average = WeightAverage(model, decay=0.8)
    reference = {k: v.double().clone() for k, v in model.state_dict().items()}
    taken = 0
    for skip in [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param))
        model(torch.randn(8, 5))
        average.update(model, torch.tensor(float(skip)))
        if not skip:
            taken += 1
            decay = min(0.8, (1 + taken) / (10 + taken))
            for key, value in model.state_dict().items():
                reference[key] = decay * reference[key] + (1 - decay) * value.double()
    assert average.taken.item() == taken == 12
    for key, value in average.model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert value == model.state_dict()[key] == 15
        else:
            torch.testing.assert_close(value.double(), reference[key], rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in average.model.parameters())


def test_run_saves_the_average_and_resumes_it_exactly(tmp_path):
    values = {"ema_decay": 0.9}
    straight = run_ranks(train_rank, 2, tmp_path / "straight", values, 16)
    run_ranks(train_rank, 2, tmp_path / "split", {"stop_step": 5, **values}, 16)
    run_ranks(train_rank, 2, tmp_path / "split", values, 16, True)
    saved = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    last_weights = straight[0]["backbone"]
    assert saved.keys() == resumed.keys() == last_weights.keys()
    for key, value in saved.items():
        assert torch.equal(value, resumed[key]), key
    moved = [key for key, value in saved.items() if not torch.equal(value, last_weights[key])]
    assert moved, "model.pt holds the last step's weights, not their average"


def test_resume_from_a_run_without_average_starts_one(tmp_path, caplog):
    train_rank(0, 1, tmp_path, {"stop_step": 3}, 8)
    with caplog.at_level(logging.WARNING, "facescale"):
        result = train_rank(0, 1, tmp_path, {"ema_decay": 0.5}, 8, resume=True)
    assert "holds no weight average; it starts anew" in caplog.text
    assert result["summary"]["steps"] > 0
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(not torch.equal(v, result["backbone"][k]) for k, v in saved.items())


def test_planner_counts_the_bytes_the_average_holds():
    cfg = Config(network="mbf", embedding_size=128, ema_decay=0.999)
    held = sum(
        t.numel() * t.element_size()
        for t in WeightAverage(build_backbone(cfg), cfg.ema_decay).model.state_dict().values()
    )
    counted = 4 * plan.trace_backbone(cfg).parameters  # what plan.estimate adds
    assert counted <= held <= 1.02 * counted  # BatchNorm's statistics are the difference
