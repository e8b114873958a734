"""Resuming under faults made for real: damaged checkpoints on real ranks, the checkpoint at the
end of training, refused resumes that leave OUTPUT alone, a disk that fills during a save."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import run_ranks
from test_checkpoint_integrity import flip_bytes
from train_utils import (
    NUM_CLASSES,
    ArrayLoader,
    assert_same_model,
    make_faces,
    small_vit,
    train_config,
    train_rank,
)

import facescale
from facescale.backbones import get_model
from facescale.distributed import init_distributed
from facescale.train import checkpoint as ckpt
from facescale.train.trainer import train

SRC = Path(facescale.__file__).parents[1]


class Recorder(logging.Handler):
    """Keeps the messages of the warnings logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def resume_rank(rank, world, output, values, global_batch):
    """``train_rank`` resuming, with the warnings this rank logged."""
    recorder = Recorder()
    logging.getLogger("facescale").addHandler(recorder)
    result = train_rank(rank, world, output, values, global_batch, resume=True)
    return {**result, "warnings": recorder.messages}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Two ranks trained for the whole schedule (12 steps) without stopping."""
    return run_ranks(train_rank, 2, tmp_path_factory.mktemp("straight"), {}, 16)


@pytest.mark.parametrize("fault", ["flipped", "deleted"])
def test_resume_falls_back_past_a_damaged_checkpoint_on_every_rank(tmp_path, straight, fault):
    run_ranks(train_rank, 2, tmp_path, {"stop_step": 4, "checkpoint_every": 2}, 16)
    newest = tmp_path / "checkpoints" / "step_000000004" / "rank_1.pt"
    if fault == "flipped":
        flip_bytes(newest)
    else:
        newest.unlink()
    resumed = run_ranks(resume_rank, 2, tmp_path, {}, 16)
    assert [r["summary"]["steps"] for r in resumed] == [10, 10]  # both ranks from step 2
    assert_same_model(straight, resumed, rtol=0, atol=0)
    why = "has changed since it was written" if fault == "flipped" else "is missing"
    assert any(f"{newest} {why}" in message for message in resumed[0]["warnings"])


def test_training_ends_with_a_checkpoint_that_resumes_and_extends(tmp_path):
    done = run_ranks(train_rank, 1, tmp_path, {"num_epoch": 1}, 16)
    final = tmp_path / "checkpoints" / "step_000000006"
    assert done[0]["summary"]["final_step"] == 6 and ckpt.find_damage(final) == []
    saved = ckpt.load_head_shard(final, 0, NUM_CLASSES, rank=0)
    assert torch.equal(saved["weight"], done[0]["head"])
    # a restart after the last save (torchrun --max-restarts) finishes without training
    again = run_ranks(train_rank, 1, tmp_path, {"num_epoch": 1}, 16, True)
    assert again[0]["summary"]["steps"] == 0 and (tmp_path / "model.pt").is_file()
    longer = run_ranks(train_rank, 1, tmp_path, {"num_epoch": 2}, 16, True)
    assert longer[0]["summary"]["steps"] == 6 and longer[0]["summary"]["final_step"] == 12


def _snapshot(output: Path) -> dict[str, bytes]:
    """Every file under ``output`` but the log (which records the refusal) and its bytes."""
    return {
        str(path.relative_to(output)): path.read_bytes()
        for path in sorted(output.rglob("*"))
        if path.is_file() and path.name != "training.log"
    }


@pytest.mark.parametrize(
    ("values", "refusal"),
    [
        ({"embedding_size": 16}, "embedding_size=32 but the config has embedding_size=16"),
        ({"batch_size": 16}, r"took 8 samples \(1 ranks\) .* so set batch_size=8 to keep it"),
        (
            {"num_image": 8, "num_epoch": 1},
            r"at step 2, past the end of this run's schedule.*raise num_epoch",
        ),
    ],
)
def test_a_refused_resume_changes_nothing_in_output(tmp_path, values, refusal):
    run_ranks(train_rank, 1, tmp_path, {"stop_step": 2}, 8)
    before = _snapshot(tmp_path)
    cfg = train_config(tmp_path, **{"batch_size": 8, **values, "resume": True})
    images, labels = make_faces(NUM_CLASSES, 8)
    loader = ArrayLoader(images, labels, cfg.batch_size, 0, 1)
    model = small_vit() if cfg.embedding_size == 32 else get_model("vit_t", 16, depth=2, dim=64)
    with pytest.raises(ckpt.CheckpointError, match=refusal):
        train(cfg, init_distributed(), loader, model)
    assert _snapshot(tmp_path) == before


def _facescale(*argv: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """`facescale ARGV` in a child process whose files cannot grow past ``file_size_limit``."""

    def limit_files() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "facescale", *argv],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        preexec_fn=limit_files if file_size_limit else None,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_full_disk_names_the_file_and_the_restart_clears_the_leftover(tmp_path):
    out = tmp_path / "run"
    tiny = ["train", "cpu_tiny", "--set", f"output={out}", "--set", "num_image=32",
            "--set", "batch_size=8", "--set", "checkpoint_every=2"]  # fmt: skip
    full = _facescale(*tiny, file_size_limit=1 << 16)  # 64 KiB: less than one checkpoint file
    leftover = out / "checkpoints" / "step_000000002.partial"
    assert full.returncode == 2, full.stderr
    assert f"{leftover}/rank_0.pt: cannot be written (File too large)" in full.stderr
    assert leftover.is_dir()
    restart = _facescale(*tiny, "--set", "stop_step=1")
    assert restart.returncode == 0, restart.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["step_000000001"]
    assert f"removed {leftover}" in (out / "training.log").read_text()
