"""How `facescale train` and the commands that write files fail: a user error is one line on
the console and in training.log with exit code 2, a bug keeps one traceback, an output that
cannot be written is refused before any work, closing the run's logs never hides the error
that ended the run, and --json prints the JSON summary alone on stdout."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import corrupt_record, write_rec

from facescale.cli import main
from facescale.errors import UserError, require_writable_folder
from facescale.train.logger import RunLogger

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = [
    "cpu_tiny",
    "--set",
    "num_image=64",
    "--set",
    "num_classes=8",
    "--set",
    "batch_size=4",
    "--set",
    "frequent=1",
    "--set",
    "data_order=sequential",
]
INJECTED_BUG = """import sys
import facescale.train.trainer

def build(*args, **kwargs):
    raise ArithmeticError("an injected bug")

facescale.train.trainer.build = build
from facescale.cli import main
main(sys.argv[1:])
"""


def facescale(*args: str, script: str | None = None) -> subprocess.CompletedProcess:
    """``facescale ARGS`` in a new interpreter (or ``script`` given ARGS), output captured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    command = ["-c", script] if script else ["-m", "facescale"]
    return subprocess.run(
        [sys.executable, *command, *args], capture_output=True, text=True, env=env, timeout=600
    )


def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def corrupt_rec(folder: Path, key: int) -> Path:
    write_rec(folder, [i % 8 for i in range(64)])
    corrupt_record(folder, key)
    return folder


def test_a_data_error_in_training_is_one_line_on_the_console_and_in_the_log(tmp_path):
    rec, out = corrupt_rec(tmp_path / "rec", 3), tmp_path / "run"
    job = facescale("train", *TINY, "--set", f"rec={rec}", "--set", f"output={out}")
    assert job.returncode == 2, job.stderr
    assert "Traceback" not in job.stderr
    errors = [line for line in job.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1
    assert errors[0].startswith(f"facescale train: error: {rec / 'train.rec'}: no record at offset")
    message = errors[0].removeprefix("facescale train: error: ")
    assert message.endswith("(key 3)")
    log = (out / "training.log").read_text()
    assert log.count(message) == 1 and "Traceback" not in log


def test_a_bug_in_training_keeps_one_traceback_on_the_console_and_in_the_log(tmp_path):
    out = tmp_path / "run"
    job = facescale("train", *TINY, "--set", f"output={out}", script=INJECTED_BUG)
    assert job.returncode == 1
    assert job.stderr.count("Traceback (most recent call last)") == 1
    assert job.stderr.rstrip().endswith("ArithmeticError: an injected bug")
    assert "error:" not in job.stderr
    log = (out / "training.log").read_text()
    assert log.count("Traceback (most recent call last)") == 1
    assert "ArithmeticError: an injected bug" in log


def test_an_unwritable_training_output_is_one_line_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    job = facescale("train", *TINY, "--set", f"output={blocker / 'run'}")
    assert job.returncode == 2
    assert "Traceback" not in job.stderr
    assert job.stderr.splitlines()[-1] == (
        f"facescale train: error: {blocker / 'run'}: cannot write there (Not a directory); "
        "choose a writable output folder"
    )


def test_json_summary_is_all_of_stdout(tmp_path):
    out = tmp_path / "run"
    job = facescale(
        "train", *TINY, "--set", "rec=synthetic", "--set", "stop_step=1", "--set", f"output={out}",
        "--json",
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    summary = json.loads(job.stdout)
    assert summary["final_step"] == 1
    assert "network" in job.stderr  # the resolved config went to stderr


@pytest.mark.parametrize("command", ["export", "embed", "config"])
def test_commands_refuse_an_unwritable_output_before_their_work(tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "out"
    missing_model = str(tmp_path / "missing.pt")
    argv = {
        "export": ["export", "onnx", missing_model, "--network", "mbf", str(out / "m.onnx")],
        "embed": ["embed", missing_model, "--network", "mbf", str(tmp_path), "-o", str(out / "e")],
        "config": ["config", "cpu_tiny", "--set", f"output={out}", "--save"],
    }[command]
    code, stdout, err = in_process(argv, capsys)
    assert (code, stdout) == (2, "")
    assert err == (
        f"facescale {command}: error: {out}: cannot write there (Not a directory); choose a "
        "writable output folder\n"
    )


def test_a_writable_folder_is_made_and_left_as_it_was(tmp_path):
    folder = tmp_path / "a" / "b"
    assert require_writable_folder(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="a_file: cannot write there \\(it is a file\\)"):
        require_writable_folder(tmp_path / "a_file")


def _logger_on_a_full_disk(output: Path) -> RunLogger:
    """A run logger whose metrics file is on a full device: every flush of it fails."""
    output.mkdir()
    (output / "metrics.jsonl").symlink_to("/dev/full")
    logger = RunLogger(output, rank=0, total_steps=4, start_step=0)
    with pytest.raises(OSError, match="No space left on device"):
        logger.step(1, 8, {"loss": 1.0, "lr": 0.1, "epoch": 0})  # the record stays unflushed
    return logger


def test_closing_the_logs_never_replaces_the_error_that_ended_the_run(tmp_path, caplog):
    logger = _logger_on_a_full_disk(tmp_path / "run")
    caplog.set_level(logging.WARNING, "facescale.train")
    with pytest.raises(KeyboardInterrupt), contextlib.closing(logger):
        raise KeyboardInterrupt  # what stopped the run; closing the metrics file fails too
    assert "could not close a training log: OSError" in caplog.text
    assert "No space left on device" in caplog.text


def test_a_log_that_cannot_be_closed_after_a_good_run_is_an_error(tmp_path):
    logger = _logger_on_a_full_disk(tmp_path / "run")
    with pytest.raises(OSError, match="No space left on device"):
        logger.close()
