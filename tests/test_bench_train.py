"""`facescale bench train`: argument parsing, the report's arithmetic, the memory cap, and
real torchrun jobs on a record file: one that measures, one that runs out of memory."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from facescale.benchmarking.train import (
    markdown_table,
    parse_count,
    parse_mode,
    read_outcome,
    summarize_ranks,
)
from facescale.benchmarking.train_worker import communication_seconds, is_out_of_memory


def test_modes_and_counts_parse_with_clear_errors():
    assert parse_mode("data").head == "data_parallel"
    assert parse_mode("model").label == "model parallel"
    sampled = parse_mode("partial:0.1")
    assert (sampled.head, sampled.sample_rate, sampled.label) == (
        "partial_fc",
        0.1,
        "Partial FC 0.1",
    )
    for bad in ("partial", "partial:0", "partial:1.5", "partial:x", "pipeline"):
        with pytest.raises(argparse.ArgumentTypeError, match="'partial:RATE'"):
            parse_mode(bad)
    narrow = parse_mode("partial:0.1/bf16/int8")
    assert (narrow.center_dtype, narrow.center_state_dtype) == ("bf16", "int8")
    assert narrow.label == "Partial FC 0.1, bf16 centers, int8 state"
    assert "center_state_dtype=int8" in narrow.overrides()
    assert parse_mode("model/fp16").center_state_dtype == "fp32"
    for bad in ("data/bf16", "model/int8", "partial:0.1/bf16/fp16", "model/bf16/bf16/bf16"):
        with pytest.raises(argparse.ArgumentTypeError, match="/CENTERS/STATE"):
            parse_mode(bad)
    counts = [parse_count(t) for t in ("10k", "1.1M", "93431")]
    assert counts == [10_000, 1_100_000, 93_431]
    for bad in ("0", "1.5", "ten", "-3k", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole count"):
            parse_count(bad)


def _rank(data, backbone, head, optimizer, peak_mib):
    half = {"forward": backbone / 2, "backward": backbone / 2}
    return {
        "timings": {
            "data": data,
            "backbone_forward": half["forward"],
            "backbone_backward": half["backward"],
            "head_forward": head,
            "head_backward": 0.0,
            "optimizer": optimizer,
        },
        "threads": 1,
        "peak_bytes": peak_mib * 2**20,
        "baseline_bytes": 400 * 2**20,
        "comm_s": 0.5,
        "profiled_s": 2.0,
    }


def test_report_uses_the_slowest_rank_and_sums_phases_over_ranks():
    ranks = [_rank(1.0, 6.0, 2.0, 1.0, 900), _rank(0.0, 8.0, 1.0, 1.0, 1000)]
    summary = summarize_ranks(ranks, global_batch=64, steps=2)
    assert summary["step_s"] == pytest.approx(5.0)  # rank 0: 10 s over 2 steps
    assert summary["samples_per_s"] == pytest.approx(64 / 5.0)
    assert summary["peak_mib"] == 1000 and summary["peak_mib_per_rank"] == [900, 1000]
    assert summary["baseline_mib"] == 400
    assert summary["phase_share"] == pytest.approx(
        {"data": 1 / 20, "backbone": 14 / 20, "head": 3 / 20, "optimizer": 2 / 20}
    )
    assert summary["comm_share"] == pytest.approx(0.25)


def test_table_marks_out_of_memory_and_skipped_runs_with_a_dash():
    model, data = parse_mode("model"), parse_mode("data")
    rows = [
        {"mode": "model", "classes": 10, "status": "ok", "samples_per_s": 12.34, "peak_mib": 99.6},
        {"mode": "data", "classes": 10, "status": "oom"},
        {"mode": "model", "classes": 20, "status": "timeout"},
        {"mode": "data", "classes": 20, "status": "skipped"},
    ]
    lines = markdown_table(rows, [model, data], [10, 20]).splitlines()
    assert lines[0] == "| identities | model parallel | data parallel |"
    assert lines[2] == "| 10 | 12.3 (100) | - |"
    assert lines[3] == "| 20 | timeout | - |"


def test_communication_time_is_the_union_of_collective_intervals():
    def event(name, start, end):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))

    events = [
        event("gloo:all_reduce", 0, 1_000_000),
        event("gloo:all_reduce", 500_000, 1_500_000),  # overlaps the first on another thread
        event("aten::mm", 0, 9_000_000),
        event("ncclDevKernel_AllGather_RING_LL", 3_000_000, 3_250_000),
        event("gloo:broadcast", 3_100_000, 3_200_000),  # inside the previous one
    ]
    assert communication_seconds(events) == pytest.approx(1.75)
    assert communication_seconds([]) == 0.0


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


_CAPPED_ALLOCATION = """
import torch
from facescale.benchmarking.train_worker import cap_memory, is_out_of_memory
cap_memory(256 * 2**20)
try:
    torch.empty(2**28)  # 1 GiB
except RuntimeError as err:
    assert is_out_of_memory(err), err
    torch.empty(2**20)  # 4 MiB is still fine
    print("refused")
else:
    print("allocated")
"""


def test_memory_cap_turns_an_oversized_allocation_into_an_error():
    # A fresh process, as the benchmark worker is: in a long-lived one the allocator may
    # serve the request from memory an earlier test freed without growing the process.
    done = subprocess.run(
        [sys.executable, "-c", _CAPPED_ALLOCATION], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "refused"


@pytest.fixture(scope="module")
def small_rec(tmp_path_factory):
    from facescale.demo.dataset import write_training_rec

    folder = tmp_path_factory.mktemp("rec")
    write_training_rec(folder, num_classes=16, per_identity=5, seed=0, progress=False)
    return folder


def test_runs_measure_on_a_rec_file_and_running_out_of_memory_is_a_dash(small_rec, capsys):
    from facescale.cli import main

    args = ["bench", "train", "--network", "mbf", "--classes", "1000", "4M", "8M"]
    args += ["--parallel", "model", "--batch", "4", "--steps", "1", "--rec", str(small_rec)]
    args += ["--workers", "1", "--memory-limit", "1GiB", "--comm", "--json"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    ok, oom, skipped = report["runs"]
    assert ok["status"] == "ok", ok.get("error")
    assert ok["samples_per_s"] > 0 and ok["threads_per_rank"] >= 1
    assert sum(ok["phase_share"].values()) == pytest.approx(1.0)
    assert 0 < ok["comm_share"] < 1
    assert len(ok["peak_mib_per_rank"]) == 2 and ok["memory_limit_mib"] == 1024
    # the planner, checked properly in benchmarks/RESULTS.md, is in the right range here too
    assert 0.7 < ok["predicted_over_measured"] < 1.3
    # 4M classes: 2M centers + momentum per rank (8 GB) cannot fit under the 1 GiB cap
    assert oom["status"] == "oom" and "rank" in oom["error"]
    assert skipped["status"] == "skipped" and "4,000,000" in skipped["error"]
    assert report["markdown"].splitlines()[3:] == ["| 4,000,000 | - |", "| 8,000,000 | - |"]
    assert report["plan_max_error"] == pytest.approx(abs(ok["predicted_over_measured"] - 1))


def test_outcome_reads_results_out_of_memory_and_failures(tmp_path):
    (tmp_path / "log.txt").write_text("Traceback ...\nValueError: the reason")
    assert read_outcome(tmp_path, None) == {
        "status": "failed",
        "error": "Traceback ...\nValueError: the reason",
    }
    stopped = read_outcome(tmp_path, "timeout")
    assert stopped["status"] == "timeout" and "the reason" in stopped["error"]
    failed = {"rank": 0, "time": 2.0, "oom": False, "error": "gloo: connection closed"}
    (tmp_path / "failed_rank0.json").write_text(json.dumps(failed))
    failed = {"rank": 1, "time": 1.0, "oom": False, "error": "ValueError: the reason"}
    (tmp_path / "failed_rank1.json").write_text(json.dumps(failed))
    assert read_outcome(tmp_path, None) == {
        "status": "failed",
        "error": "rank 1: ValueError: the reason",  # the earliest failure
    }
    oom = {"rank": 2, "time": 3.0, "oom": True, "error": "can't allocate"}
    (tmp_path / "failed_rank2.json").write_text(json.dumps(oom))
    assert read_outcome(tmp_path, None) == {"status": "oom", "error": "rank 2: can't allocate"}
    (tmp_path / "result.json").write_text(json.dumps({"ranks": [{"rank": 0}]}))
    assert read_outcome(tmp_path, None) == {"status": "ok", "ranks": [{"rank": 0}]}


def test_a_record_file_too_small_for_the_steps_is_a_clear_failure(small_rec, capsys):
    from facescale.cli import main

    args = ["bench", "train", "--network", "mbf", "--classes", "100", "--parallel", "model"]
    args += ["--batch", "16", "--steps", "3", "--rec", str(small_rec), "--json"]
    with pytest.raises(SystemExit):
        main(args)
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["status"] == "failed"
    assert "rank" in run["error"]
    assert "needs 5 without an epoch end; use a larger record file" in run["error"]
