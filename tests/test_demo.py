"""The README's main job: `facescale demo` runs end to end and really learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facescale.cli import main
from facescale.demo import pipeline
from facescale.demo.faces import identities, render

# The default demo's held-out accuracy, measured in benchmarks/RESULTS.md, is well above this;
# chance is 0.5.
MIN_HELDOUT_ACCURACY = 0.8


def test_faces_are_deterministic_and_identity_specific():
    people = identities(6, seed=3)
    first = render(people[0], np.random.default_rng(1))
    assert np.array_equal(first, render(identities(6, seed=3)[0], np.random.default_rng(1)))
    assert first.shape == (112, 112, 3) and first.dtype == np.uint8
    images = [
        np.stack([render(p, np.random.default_rng(10 * i + k)) for k in range(2)]).astype(float)
        for i, p in enumerate(people)
    ]
    same = np.mean([np.abs(pair[0] - pair[1]).mean() for pair in images])
    other = np.mean([np.abs(images[i][0] - images[(i + 1) % 6][0]).mean() for i in range(6)])
    assert same < other  # two images of one person differ less than images of two people


def fake_training(ranks, overrides, stdout=None):
    """Stands in for the torchrun job: the metrics a short run writes, nothing else."""
    output = Path(dict(item.split("=", 1) for item in overrides)["output"])
    records = [
        {"step": 1, "loss": 9.0, "samples_per_s": 20.0},
        {"step": 2, "loss": 7.5, "samples_per_s": 30.0},
        {"step": 2, "val/heldout": 0.75},
    ]
    (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_demo_without_the_onnx_extra_skips_export_and_still_summarises(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    monkeypatch.setattr(pipeline, "run_training", fake_training)
    out = tmp_path / "demo"
    argv = ["demo", "--output", str(out), "--ranks", "1", "--identities", "4"]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--images-per-identity", "2", "--json"])
    captured = capsys.readouterr()
    assert done.value.code == 0
    lines = captured.err.strip().splitlines()
    hint = (
        "ONNX export needs onnxscript, from the optional extra 'onnx'; "
        'install it with: pip install "facescale[onnx]"'
    )
    assert lines[0] == f"note: the ONNX stage will be skipped: {hint}"  # before any work
    assert f"[3/4] ONNX export skipped: {hint}" in lines
    summary = json.loads(captured.out)  # the JSON alone on stdout
    assert summary["onnx_skipped"] == hint and summary["onnx_max_relative_error"] is None
    assert summary["heldout_accuracy"] == 0.75 and summary["steps"] == 2
    assert "onnx" not in summary["outputs"] and not (out / "model.onnx").exists()
    text = pipeline.format_summary(summary)
    assert f"ONNX not exported: {hint}" in text and "held-out verification accuracy 75.00%" in text


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a few minutes on an idle 2-core machine; far longer when shared
def test_demo_runs_end_to_end_and_learns(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "facescale", "demo", "--output", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=2300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    print(f"demo: {summary['seconds']:.0f} s, held-out accuracy {summary['heldout_accuracy']}")
    assert summary["heldout_accuracy"] >= MIN_HELDOUT_ACCURACY
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    assert summary["onnx_max_relative_error"] < 1e-4
    for path in summary["outputs"].values():
        assert Path(path).exists(), path
