"""`facescale train` under real torchrun launches: a killed rank restarts, two nodes on loopback,
a corrupt record stops the job with one message instead of every restart dying on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from data_helpers import corrupt_record, write_rec

from facescale.launch import free_port, torchrun_command

TINY = [
    "train",
    "cpu_tiny",
    "--set",
    "num_image=256",
    "--set",
    "batch_size=8",
    "--set",
    "frequent=1",
]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _steps_logged(output: Path) -> list[int]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


@pytest.mark.slow
def test_killed_rank_restarts_and_the_run_completes(tmp_path):
    out = tmp_path / "run"
    cmd = torchrun_command(
        2,
        [*TINY, "--set", f"output={out}", "--set", "checkpoint_every=4"],
        torchrun_options=("--standalone", "--max-restarts=1", "--monitor-interval=1"),
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_000000004").is_dir():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    log = (out / "training.log").read_text()
    assert "resumed from" in log and "step_00000000" in log
    steps = _steps_logged(out)
    assert steps[-1] == 16  # 256 images / (8 x 2) per step, one epoch
    assert (out / "model.pt").is_file()


@pytest.mark.slow
def test_two_nodes_on_loopback_train(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    procs = [
        subprocess.Popen(
            [
                "taskset",  # each "node" gets its own core(s), as separate machines would
                "-c",
                ",".join(map(str, cores[node::2] or cores)),
                *torchrun_command(
                    1,
                    [*TINY, "--set", f"output={out}"],
                    torchrun_options=(
                        "--nnodes=2",
                        f"--node_rank={node}",
                        "--master_addr=127.0.0.1",
                        f"--master_port={port}",
                    ),
                ),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert _steps_logged(out)[-1] == 16  # two ranks of batch 8: 16 steps over 256 images
    assert (out / "model.pt").is_file()


@pytest.mark.slow
def test_a_corrupt_record_stops_the_job_with_one_message_and_no_retries(tmp_path):
    rec = write_rec(tmp_path / "rec", [i % 8 for i in range(64)])
    corrupt_record(rec, 5)
    out = tmp_path / "run"
    settings = {"num_image": 64, "num_classes": 8, "batch_size": 4, "data_order": "sequential"}
    overrides = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    cmd = torchrun_command(
        2,
        [*TINY, *overrides, "--set", f"rec={rec}", "--set", f"output={out}"],
        torchrun_options=("--standalone", "--max-restarts=2", "--monitor-interval=1"),
    )
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = job.stdout + job.stderr
    assert job.returncode != 0
    printed = [line for line in output.splitlines() if line.startswith("facescale train: error:")]
    assert len(printed) == 1, output
    message = printed[0].removeprefix("facescale train: error: ")
    assert message.startswith(f"{rec / 'train.rec'}: no record at offset")
    assert message.endswith("(key 5)")
    # no rank's traceback, and torchrun's summary shows the message instead of a pointer to docs
    assert "RecordError" not in output and "Connection closed" not in output, output
    assert "To enable traceback" not in output and f"traceback : {printed[0]}" in output
    # the first attempt trained up to the record; the restarted ones stopped before training
    steps = _steps_logged(out)
    assert steps and steps == list(range(1, len(steps) + 1))
    assert (out / "training.log").read_text().count(f"error: {message}") == 3


def test_a_config_error_on_every_rank_is_printed_once(tmp_path):
    cmd = torchrun_command(3, [*TINY, "--set", "lr=fast", "--set", f"output={tmp_path}"])
    job = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = job.stdout + job.stderr
    assert job.returncode != 0
    printed = [line for line in output.splitlines() if line.startswith("facescale train: error:")]
    assert printed == [
        "facescale train: error: --set lr: lr='fast' has the wrong type; expected number"
    ]
    assert "ConfigError" not in output  # no rank's traceback
    assert "To enable traceback" not in output  # torchrun's summary shows the message
