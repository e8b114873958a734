"""The loop decides on the device whether a step is taken; the host reads the outcome only
when it reports, so how often it reports changes nothing in the run."""

import json

import pytest
import torch
from torch import nn
from train_utils import NUM_CLASSES, ArrayLoader, make_faces, small_vit, train_config

from facescale.distributed import init_distributed
from facescale.train.trainer import Trainer


class NonFiniteAt(nn.Module):
    """The model, whose output is NaN on the forward passes numbered in ``calls`` (from 1)."""

    def __init__(self, model: nn.Module, calls: set[int]) -> None:
        super().__init__()
        self.model, self.calls, self.count = model, calls, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count += 1
        out = self.model(x)
        return out * float("nan") if self.count in self.calls else out


def _run(output, calls, **values):
    cfg = train_config(output, num_epoch=1, max_grad_norm=1.0, **values)
    images, labels = make_faces(NUM_CLASSES, 8)
    loader = ArrayLoader(images, labels, 8, 0, 1)
    trainer = Trainer(cfg, init_distributed(), loader, NonFiniteAt(small_vit(), calls))
    summary = trainer.run()
    records = {r["step"]: r for r in map(json.loads, (output / "metrics.jsonl").open())}
    return trainer, summary, records


def test_reporting_every_step_or_every_fifth_trains_the_same(tmp_path, caplog):
    every, every_fifth = [_run(tmp_path / str(f), {3}, frequent=f) for f in (1, 5)]
    # the skipped step takes the data but not the step: one more batch ends the schedule
    assert every[1]["final_step"] == every_fifth[1]["final_step"] == 12
    assert sorted(every_fifth[2]) == [5, 10, 12]
    assert len(every[2]) == 12
    for step, record in every_fifth[2].items():
        for key in ("loss", "lr", "grad_norm", "epoch"):
            assert record[key] == every[2][step][key], (step, key)
    for a, b in zip(
        every[0].backbone.parameters(), every_fifth[0].backbone.parameters(), strict=True
    ):
        assert torch.equal(a, b)
    assert torch.equal(every[0].head.weight, every_fifth[0].head.weight)
    assert caplog.text.count("non-finite loss nan, step skipped") == 2


def test_non_finite_losses_in_a_row_stop_between_reports(tmp_path):
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row at step 1"):
        _run(tmp_path, set(range(2, 100)), frequent=50, max_nonfinite_steps=3)
