"""Weights & Biases from arcface_torch's config keys, checked in wandb's offline mode (no
network): the run holds the config (without the key), the logged figures and the model."""

import sys

import pytest

from facescale.config import Config, load_config
from facescale.errors import UserError
from facescale.train.logger import RunLogger


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    return tmp_path


def wandb_config(**kw) -> Config:
    values = dict(
        using_wandb=True,
        wandb_key=None,
        wandb_project="faces",
        suffix_run_name="r50",
        notes="a note",
        save_artifacts=True,
    )
    values.update(kw)
    return Config(**values)


def test_arcface_torch_wandb_keys_load(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(
        "from easydict import EasyDict as edict\nconfig = edict()\n"
        "config.using_wandb = True\nconfig.wandb_key = 'abc'\nconfig.wandb_entity = 'team'\n"
        "config.wandb_project = 'faces'\nconfig.wandb_log_all = True\n"
        "config.save_artifacts = True\nconfig.suffix_run_name = 'x'\nconfig.notes = 'n'\n"
    )
    cfg = load_config(path)
    assert (cfg.using_wandb, cfg.wandb_key, cfg.wandb_entity) == (True, "abc", "team")
    assert (cfg.wandb_project, cfg.save_artifacts, cfg.suffix_run_name) == ("faces", True, "x")
    assert cfg.notes == "n"


def test_the_run_gets_the_figures_the_config_and_the_model(offline):
    output = offline / "out"
    cfg = wandb_config()
    logger = RunLogger(output, 0, total_steps=10, start_step=0, cfg=cfg)
    values = {"epoch": 0, "loss": 3.5, "lr": 0.1}
    logger.step(5, 64, values)
    logger.scalars(5, {"lfw": 0.9}, "val")
    logger.step(10, 64, {**values, "loss": 2.5})
    (output / "model.pt").write_bytes(b"weights")
    logger.save_model(output / "model.pt")
    run = logger._wandb.run
    assert run.name.endswith("_r50") and run.notes == "a note"
    # a step's row is committed when a later step is logged: step 5 is, step 10 on closing
    assert run.summary["train/loss"] == 3.5 and run.summary["val/lfw"] == 0.9
    assert run.config["wandb_project"] == "faces" and "wandb_key" not in run.config
    logger.close()
    sys.modules["wandb"].teardown()  # waits until the run's file is written out

    runs = list((output / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    written = (runs[0] / f"run-{run.id}.wandb").read_bytes()  # what `wandb sync` uploads
    for expected in ("train/loss", "train/samples_per_s", "val/lfw", f"model-{run.id}", "a note"):
        assert expected.encode() in written
    assert b"wandb_key" not in written


def test_other_ranks_and_switched_off_log_nothing_to_wandb(offline):
    assert RunLogger(offline / "a", 1, 10, 0, wandb_config())._wandb is None
    logger = RunLogger(offline / "b", 0, 10, 0, wandb_config(using_wandb=False))
    assert logger._wandb is None
    logger.close()
    assert not (offline / "b" / "wandb").exists()


def test_missing_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    with pytest.raises(UserError, match=r"pip install \"facescale\[wandb\]\""):
        RunLogger(tmp_path, 0, 10, 0, wandb_config())
