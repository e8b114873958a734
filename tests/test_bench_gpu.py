"""`facescale bench gpu --device cpu`: the device check runs every stage at tiny sizes and
passes, so the command a GPU machine runs cannot rot."""

import json
import subprocess
import sys

import pytest

from facescale.benchmarking.gpu import run_stage
from facescale.benchmarking.gpu_checks import STAGES


@pytest.mark.slow
def test_the_device_check_passes_on_cpu(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "facescale", "bench", "gpu", "--device", "cpu", "--json"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {k: v for k, v in report["stages"].items() if not v["pass"]}
    assert report["pass"], failed
    assert done.returncode == 0
    assert set(report["stages"]) == set(STAGES)
    assert report["stages"]["sync"]["skipped"]
    assert report["stages"]["environment"]["torch"]


def test_a_failing_stage_is_recorded_and_names_the_error():
    def broken(value):
        raise ZeroDivisionError(f"nothing to divide {value}")

    result = run_stage(broken, 3)
    assert result["pass"] is False
    assert result["error"] == "ZeroDivisionError: nothing to divide 3"
    assert result["at"].startswith("test_bench_gpu.py:")


def test_unknown_stages_are_refused(capsys):
    from facescale.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "gpu", "--device", "cpu", "--stages", "environment,warp"])
    assert stop.value.code == 2
    assert "unknown stage warp" in capsys.readouterr().err
