import json
import logging
import textwrap

import pytest

from facescale.cli import main
from facescale.config import SHIPPED_CONFIGS, Config, ConfigError, load_config

ARCFACE_BASE = """
from easydict import EasyDict as edict
config = edict()
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = "ms1mv3_arcface_r50"
config.embedding_size = 512
config.sample_rate = 1
config.interclass_filtering_threshold = 0
config.fp16 = False
config.batch_size = 128
config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4
config.verbose = 2000
config.frequent = 10
config.dali = False
config.dali_aug = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
config.using_wandb = False
"""

ARCFACE_JOB = """
from easydict import EasyDict as edict
config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 128
config.lr = 0.1
config.verbose = 2000
config.dali = False
config.rec = "/train_tmp/glint360k"
config.num_classes = 360232
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp', "agedb_30"]
"""


@pytest.fixture
def arcface_configs(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "base.py").write_text(ARCFACE_BASE)
    (folder / "glint360k_r100.py").write_text(ARCFACE_JOB)
    return folder


def test_arcface_torch_config_runs_unchanged(arcface_configs, caplog):
    with caplog.at_level(logging.INFO):
        cfg = load_config(arcface_configs / "glint360k_r100")  # no .py, like arcface_torch
    assert cfg.network == "r100" and cfg.margin_list == (1.0, 0.0, 0.4)
    assert cfg.sample_rate == 0.2 and cfg.fp16 is True and cfg.weight_decay == 1e-4
    assert cfg.num_classes == 360232 and cfg.warmup_epoch == 2.0
    assert cfg.gradient_acc == 1 and cfg.seed == 2048  # from base.py
    # output None in the job file overrides base's, then defaults to work_dirs/<name>
    assert cfg.output == "work_dirs/glint360k_r100"
    assert "'dali' has no effect" in caplog.text
    assert "unknown config key" not in caplog.text


def test_config_importing_its_base(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "common.py").write_text("config = {'batch_size': 16, 'lr': 0.05}\n")
    (folder / "job.py").write_text(
        "from configs.common import config as _c\nconfig = dict(_c, lr=0.2)\n"
    )
    cfg = load_config(folder / "job.py")
    assert (cfg.batch_size, cfg.lr) == (16, 0.2)


def test_overrides_are_typed_from_defaults(arcface_configs):
    cfg = load_config(
        arcface_configs / "glint360k_r100.py",
        [
            "batch_size=64",
            "lr=1e-3",
            "fp16=false",
            "margin_list=1,0.5,0",
            "val_targets=lfw",
            "output=none",
            "network=r50",
        ],
    )
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    assert cfg.lr == 1e-3 and cfg.fp16 is False
    assert cfg.margin_list == (1.0, 0.5, 0.0)
    assert cfg.val_targets == ["lfw"]
    assert cfg.output == "work_dirs/default"


def test_unknown_key_in_file_warns_with_its_name(tmp_path, caplog):
    path = tmp_path / "job.py"
    path.write_text("config = {'batchsize': 3}\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert "'batchsize'" in caplog.text and str(path) in caplog.text
    assert cfg.batch_size == Config().batch_size


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("batch_size=abc", "batch_size='abc' has the wrong type; expected integer"),
        ("batch_size=0", "batch_size=0 is out of range; allowed: an integer > 0"),
        ("sample_rate=1.5", "sample_rate=1.5 is out of range; allowed: a number in (0, 1]"),
        ("lr=nan", "wrong type"),
        ("margin_list=1,2", "margin_list=(1, 2) has the wrong type; expected a list of 3 numbers"),
        ("optimizer=adam", "allowed: 'sgd' or 'adamw'"),
        ("network=r51", "network='r51' is out of range; allowed: one of r18, r34, r50, r100"),
        ("fp16=maybe", "fp16='maybe' has the wrong type; expected true/false"),
        ("batch_size=2.5", "wrong type"),
        ("lr", "expected key=value"),
        ("learning_rate=0.1", "unknown config key 'learning_rate'"),
    ],
)
def test_bad_override_names_key_value_and_form(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_bad_value_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("config = {'num_classes': -5}\n")
    with pytest.raises(ConfigError, match=r"bad\.py: num_classes=-5 is out of range"):
        load_config(path)


def test_missing_file_and_missing_config_object(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no `config`"):
        load_config(empty)


def test_fp16_with_bf16_is_refused_naming_both_keys(tmp_path):
    path = tmp_path / "mixed.py"
    path.write_text("config = {'fp16': True}\n")
    assert load_config(path).fp16 is True
    with pytest.raises(ConfigError, match="fp16 and bf16 are exclusive"):
        load_config(path, ["bf16=true"])
    assert load_config(path, ["fp16=false", "bf16=true"]).bf16 is True


def test_schedule_derivation():
    cfg = load_config(
        None,
        ["num_image=10000", "batch_size=10", "gradient_acc=2", "num_epoch=3", "warmup_epoch=0.5"],
    )
    s = cfg.schedule(world_size=4)
    assert s.global_batch == 40 and s.samples_per_step == 80
    assert s.steps_per_epoch == 125 and s.total_steps == 375 and s.warmup_steps == 62
    with pytest.raises(ConfigError, match="smaller than one optimizer step"):
        load_config(None, ["num_image=10"]).schedule(world_size=1)


@pytest.mark.parametrize("path", sorted(SHIPPED_CONFIGS.glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_without_warnings(path, caplog):
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path.stem)  # shipped configs resolve by bare name
    assert caplog.text == ""
    assert cfg.schedule(world_size=8).total_steps > 0


def test_cli_prints_json_and_saves(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main(["config", "ms1mv3_r50", "--set", f"output={tmp_path}", "--json", "--save"])
    assert code.value.code == 0
    out = capsys.readouterr().out.splitlines()
    data = json.loads(out[0])
    assert data["config"]["num_classes"] == 93431 and data["schedule"]["global_batch"] == 128
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == data["config"] | {"margin_list": list(data["config"]["margin_list"])}


def test_cli_reports_config_errors(capsys):
    with pytest.raises(SystemExit) as code:
        main(["config", "--set", "batch_size=-1"])
    assert code.value.code == 2
    assert "batch_size=-1 is out of range" in capsys.readouterr().err


def test_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "facescale", "--help"], capture_output=True, text=True, check=True
    )
    assert "config" in out.stdout
    assert textwrap.dedent("usage: facescale") in out.stdout
