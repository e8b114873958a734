"""The README's main job: `facescale demo` runs end to end and really learns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"demo: {summary['seconds']:.0f} s, held-out accuracy {summary['heldout_accuracy']}")
    assert summary["heldout_accuracy"] >= MIN_HELDOUT_ACCURACY
    assert summary["loss_last"] < 0.8 * summary["loss_first"]
    assert summary["onnx_max_relative_error"] < 1e-4
    for path in summary["outputs"].values():
        assert Path(path).exists(), path
