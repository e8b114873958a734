"""Verification during training says what it is doing: a log line per set with its size on
rank 0, and a progress bar there when stderr is a terminal; same figures either way."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch
from test_eval_verification import TinyEmbedder, png, random_set

from facescale.data.bin_format import write_verification_bin
from facescale.distributed import DistEnv
from facescale.eval import evaluate_verification, load_verification_set
from facescale.train.evaluation import verification_on_ranks


class Terminal(io.StringIO):
    """A stderr that says it is a terminal and keeps what is written to it."""

    def isatty(self) -> bool:
        return True


def env(rank: int, world_size: int) -> DistEnv:
    return DistEnv(rank, world_size, rank, torch.device("cpu"), None)


@pytest.fixture
def toy_bin(tmp_path):
    vset = random_set(70, seed=2)  # 140 images: three batches of 64
    path = tmp_path / "toy.bin"
    write_verification_bin(path, [png(im) for im in vset.images], vset.issame.tolist())
    return path


def test_rank_0_logs_each_set_and_its_size_before_embedding(toy_bin, caplog, monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    torch.manual_seed(0)
    model = TinyEmbedder()
    with caplog.at_level(logging.INFO, logger="facescale.train"):
        result = verification_on_ranks(model, toy_bin, env(0, 1))
    (line,) = [r.message for r in caplog.records]
    assert line == "verifying toy: 70 pairs, 140 distinct images over 1 ranks"
    assert sys.stderr.getvalue() == ""
    expected = evaluate_verification(model, load_verification_set(toy_bin))
    assert result.accuracy == expected.accuracy and result.far == expected.far


def test_a_terminal_gets_a_progress_bar_on_rank_0_only(toy_bin, caplog, monkeypatch):
    model = TinyEmbedder()
    monkeypatch.setattr(sys, "stderr", Terminal())
    with caplog.at_level(logging.INFO, logger="facescale.train"):
        assert verification_on_ranks(model, toy_bin, env(1, 2)) is None  # its half, silently
    assert sys.stderr.getvalue() == "" and not caplog.records
    with caplog.at_level(logging.INFO, logger="facescale.train"):
        assert verification_on_ranks(model, toy_bin, env(0, 1)) is not None
    drawn = sys.stderr.getvalue()
    assert "verifying toy" in drawn and "3/3" in drawn  # 140 images in batches of 64
    assert len(caplog.records) == 1


def _evaluated_state(rank, world):
    from facescale.train.evaluation import as_saved

    torch.manual_seed(0)  # the same weights on every rank, as DDP keeps them
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    model.train()
    model(torch.randn(8, 4) + rank)  # BatchNorm statistics of this rank's own data
    return {
        "own": {k: v.clone() for k, v in model.state_dict().items()},
        "evaluated": {k: v.clone() for k, v in as_saved(model).state_dict().items()},
    }


def test_every_rank_evaluates_the_model_rank_0_saves():
    from dist_utils import run_ranks

    zero, one = run_ranks(_evaluated_state, 2)
    assert not torch.equal(one["own"]["1.running_mean"], zero["own"]["1.running_mean"])
    for key, value in zero["own"].items():
        assert torch.equal(one["evaluated"][key], value), key
        assert torch.equal(zero["evaluated"][key], value), key
    assert not torch.equal(one["own"]["1.running_mean"], one["evaluated"]["1.running_mean"])


def test_a_rank_decodes_only_its_share_and_only_once_per_run(toy_bin, monkeypatch):
    import facescale.data
    from facescale.config import Config
    from facescale.train.evaluation import Evaluator

    decoded = []
    decode = facescale.data.decode_image
    monkeypatch.setattr(facescale.data, "decode_image", lambda b: decoded.append(1) or decode(b))
    cfg = Config(rec=str(toy_bin.parent), val_targets=["toy"])
    evaluator = Evaluator(cfg, env(1, 2))
    for _ in range(3):
        assert evaluator(TinyEmbedder(), {}) == {}  # rank 1: rank 0 has the figures
    assert len(decoded) == 70  # its half of the 140 images, decoded at the first evaluation
    assert evaluator.shares[toy_bin].images.shape[0] == 70
