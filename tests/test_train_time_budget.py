"""Training under a time budget: the LR follows the elapsed share of it, every rank stops at
the same step with a checkpoint and a model, and a resume spends only what is left."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from dist_utils import run_ranks
from train_utils import train_rank

from facescale.train.schedule import lr_at_share

# far more epochs than the budget allows: the budget ends these runs
LONG = {"num_epoch": 10_000, "warmup_epoch": 1000}


def _records(folder):
    return [r for r in map(json.loads, (folder / "metrics.jsonl").open()) if "lr" in r]


def _checkpoint_steps(folder):
    return sorted(int(p.name.split("_")[1]) for p in (folder / "checkpoints").glob("step_*"))


def test_a_short_budget_stops_every_rank_at_one_step_with_checkpoint_and_model(tmp_path):
    results = run_ranks(train_rank, 2, tmp_path, {**LONG, "time_budget": 3}, 16)
    first, second = (r["summary"] for r in results)
    assert first["final_step"] == second["final_step"] > 0
    assert first["elapsed_s"] == second["elapsed_s"] >= 3
    assert first["final_step"] < 6 * LONG["num_epoch"]
    assert first["epochs"] == pytest.approx(first["final_step"] / 6)
    assert _checkpoint_steps(tmp_path)[-1] == first["final_step"]
    assert (tmp_path / "model.pt").is_file()
    records = _records(tmp_path)
    assert records[-1]["step"] == first["final_step"] and records[-1]["lr"] == 0.0
    assert records[-1]["time_left_s"] == 0.0
    # resuming a run whose budget is spent trains no further step
    again = run_ranks(train_rank, 2, tmp_path, {**LONG, "time_budget": 3}, 16, True)
    assert again[0]["summary"]["steps"] == 0
    assert again[0]["summary"]["final_step"] == first["final_step"]


def test_the_lr_follows_the_elapsed_share_of_the_budget(tmp_path):
    budget = 600.0
    run_ranks(train_rank, 1, tmp_path, {**LONG, "time_budget": budget, "stop_step": 8}, 16)
    records = _records(tmp_path)
    assert len(records) == 8
    warmup_share = LONG["warmup_epoch"] / LONG["num_epoch"]
    for record in records:
        share = (budget - record["time_left_s"]) / budget
        assert 0 < share < warmup_share
        assert record["lr"] == pytest.approx(lr_at_share(share, 0.02, warmup_share), rel=1e-9)
    assert all(a["lr"] < b["lr"] for a, b in itertools.pairwise(records))


def test_resume_spends_only_the_budget_left(tmp_path):
    budget = 600.0
    values = {**LONG, "time_budget": budget}
    run_ranks(train_rank, 2, tmp_path, {**values, "stop_step": 3}, 16)
    folder = tmp_path / "checkpoints" / "step_000000003"
    spent = torch.load(folder / "common.pt", weights_only=True)["progress"]["elapsed_s"]
    assert spent > 0
    run_ranks(train_rank, 2, tmp_path, {**values, "stop_step": 5}, 16, True)
    resumed = _records(tmp_path)[3:]
    assert [r["step"] for r in resumed] == [4, 5]
    assert budget - resumed[0]["time_left_s"] > spent
