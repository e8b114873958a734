"""`facescale bench head`: the report's arithmetic, and one small run on two spawned ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from facescale.benchmarking.head import Options, compare_losses, summarize
from facescale.cli import main


def _options(**kw):
    base = dict(
        kind="partial_fc",
        lean=True,
        classes=1000,
        world=2,
        batch=128,
        dim=512,
        sample_rate=1.0,
        chunk_size=256,
        cache_mib=512,
        dtype="fp32",
        steps=3,
        warmup=0,
        threads=1,
        lr=0.1,
    )
    return Options(**{**base, **kw})


def _rank(step_s, gflops, growth, state_mb=4.0):
    return {
        "steps": [{"wall": s, "cpu": s / 2} for s in step_s],
        "sgemm_gflops": [{"wall": g, "cpu": g} for g in gflops],
        "rows": 256,
        "classes_computed": 500,
        "subcenters": 1,
        "threads": 1,
        "memory_growth_mb": growth,
        "state_mb": state_mb,
        "device": "cpu",
    }


def test_report_pairs_each_step_with_its_sgemm_rate_and_checks_targets():
    floor = 6 * 256 * 500 * 512 / 100e9  # at 100 GFLOP/s
    ranks = [
        _rank([1.2 * floor, 2.0 * floor, 1.4 * floor], [100, 50, 100], 100.0),
        _rank([1.0 * floor, 1.0 * floor, 1.3 * floor], [100, 100, 100], 520.0),
    ]
    report = summarize(_options(), ranks)
    # slowest rank per step: 1.2, 2.0, 1.4 floors; step 2's floor is doubled by its rate
    assert report["step_s"] == pytest.approx([1.2 * floor, 2.0 * floor, 1.4 * floor])
    assert report["step_over_floor_median"] == pytest.approx(1.2)
    assert report["cpu_time"]["step_over_floor_median"] == pytest.approx(0.6)
    assert report["speed_ok"] is True and report["step_over_floor_target"] == 1.5
    assert report["memory_budget_mb"] == pytest.approx([1.15 * 4 + 512] * 2)
    assert report["memory_ok"] is False  # rank 1 grew 520 MB > 516.6 MB
    sampled = summarize(_options(sample_rate=0.1), ranks)
    assert sampled["step_over_floor_target"] == 2.0


def test_small_run_prints_one_json_object(capsys):
    args = ["bench", "head", "--classes", "3000", "--batch", "16", "--dim", "32"]
    args += ["--sample-rate", "0.5", "--chunk-size", "256", "--steps", "2", "--json"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world"] == 2 and report["global_batch"] == 32
    assert report["classes_computed_per_rank"] == 750  # ceil(0.5 * 1500)
    assert len(report["step_s"]) == 2 and all(s > 0 for s in report["step_s"])
    assert report["floor_s_median"] > 0 and report["sgemm_gflops_median"] > 0
    assert report["centers_and_state_mb"] == [pytest.approx(2 * 1500 * 32 * 4 / 2**20)] * 2
    assert all(0 < g < 200 for g in report["memory_growth_mb"])


def test_losses_are_compared_with_the_first():
    floor = 6 * 256 * 500 * 512 / 100e9
    arcface = summarize(_options(), [_rank([floor] * 3, [100] * 3, 100.0)] * 2)
    adaface = summarize(_options(), [_rank([1.1 * floor] * 3, [100] * 3, 100.0)] * 2)
    report = compare_losses(("arcface", "adaface"), [arcface, adaface])
    assert report["loss"] == "arcface" and report["step_s_median"] == arcface["step_s_median"]
    assert report["by_loss"]["arcface"]["step_over_first_loss"] == pytest.approx(1.0)
    assert report["by_loss"]["adaface"]["step_over_first_loss"] == pytest.approx(1.1)
    assert report["by_loss"]["adaface"]["cpu_step_over_first_loss"] == pytest.approx(1.1)
    assert "by_loss" not in compare_losses(("arcface",), [arcface])


def test_a_run_measures_each_loss_with_sub_centers(capsys):
    args = ["bench", "head", "--classes", "600", "--batch", "8", "--dim", "16", "--world", "1"]
    args += ["--chunk-size", "128", "--steps", "1", "--subcenters", "3", "--json"]
    args += ["--loss", "arcface", "curricularface"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["by_loss"]) == ["arcface", "curricularface"]
    assert report["num_subcenters"] == 3 and report["classes_computed_per_rank"] == 600
    assert report["centers_and_state_mb"] == [pytest.approx(2 * 1800 * 16 * 4 / 2**20)]
    assert report["by_loss"]["curricularface"]["step_over_first_loss"] > 0


def test_the_profile_script_names_where_a_step_goes():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_head.py"
    argv = [sys.executable, str(script), "--classes", "3000", "--batch", "16", "--dim", "32"]
    argv += ["--rates", "1,0.5", "--storage", "fp32/fp32,bf16/int8", "--steps", "1", "--top", "4"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cases = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(c["rate"], c["storage"]) for c in cases] == [
        (rate, storage) for rate in (1.0, 0.5) for storage in ("fp32/fp32", "bf16/int8")
    ]
    for case in cases:
        assert case["wall_ms_per_step"] > 0 and len(case["top"]) == 4
        assert case["top"][0]["ms_per_step"] >= case["top"][-1]["ms_per_step"] > 0
