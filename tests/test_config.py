import json
import logging
import re
import shutil
import textwrap
from pathlib import Path

import pytest

import facescale
from facescale.cli import build_parser, main
from facescale.config import (
    Config,
    ConfigError,
    load_config,
    shipped_config_names,
    shipped_configs_folder,
)

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


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45m", 2700), ("90s", 90), ("2h", 7200), ("1h30m", 5400), ("2700", 2700), ("0", 0), ("", 0)],
)
def test_time_budget_reads_seconds_and_durations(text, seconds):
    assert load_config(None, [f"time_budget={text}"]).time_budget == seconds


@pytest.mark.parametrize("text", ["45x", "m", "1m2h", "-60", "soon", "nan"])
def test_time_budget_that_is_no_duration_is_one_clear_error(text):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"time_budget={text}"])
    message = str(err.value)
    assert "\n" not in message and message.startswith("--set time_budget: time_budget=")
    assert "'45m'" in message and "0 or '' turns it off" in message


def test_time_budget_in_a_file_may_be_a_number_or_a_duration(tmp_path):
    path = tmp_path / "job.py"
    path.write_text("config = {'time_budget': 90}\n")
    assert load_config(path).time_budget == 90
    path.write_text("config = {'time_budget': '1h'}\n")
    assert load_config(path).time_budget == 3600
    path.write_text("config = {'time_budget': [45]}\n")
    with pytest.raises(ConfigError, match=r"job\.py: time_budget=\[45\] is not understood"):
        load_config(path)


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


def test_bf16_takes_auto_which_fp16_does_not_contradict(tmp_path):
    path = tmp_path / "mixed.py"
    path.write_text("config = {'fp16': True, 'bf16': 'auto'}\n")
    assert load_config(path).bf16 == "auto"
    assert load_config(None, ["bf16=auto"]).bf16 == "auto"
    assert load_config(None, ["bf16=true"]).bf16 is True
    with pytest.raises(ConfigError, match="bf16='sometimes' is out of range"):
        load_config(None, ["bf16=sometimes"])


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


@pytest.mark.parametrize(
    "path", sorted(shipped_configs_folder().glob("*.py")), ids=lambda p: p.stem
)
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


# Values the shipped files set, as they stood before the r50 configs shared one recipe.
SHIPPED_VALUES = {
    "ms1mv3_r50": {
        "network": "r50",
        "margin_list": (1.0, 0.5, 0.0),
        "embedding_size": 512,
        "sample_rate": 1.0,
        "fp16": True,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 128,
        "lr": 0.1,
        "verbose": 2000,
        "rec": "/train_tmp/ms1m-retinaface-t1",
        "num_classes": 93431,
        "num_image": 5179510,
        "num_epoch": 20,
        "warmup_epoch": 0.0,
        "val_targets": ["lfw", "cfp_fp", "agedb_30"],
        "resume": False,
        "output": "work_dirs/ms1mv3_r50",
    },
    "glint360k_r100": {
        "network": "r100",
        "margin_list": (1.0, 0.0, 0.4),
        "weight_decay": 1e-4,
        "sample_rate": 1.0,
        "rec": "/train_tmp/glint360k",
        "num_classes": 360232,
        "num_image": 17091657,
        "output": "work_dirs/glint360k_r100",
    },
    "ms1mv2_mbf": {
        "network": "mbf",
        "weight_decay": 1e-4,
        "num_epoch": 40,
        "rec": "/train_tmp/faces_emore",
        "num_classes": 85742,
        "num_image": 5822653,
    },
    "wf42m_pfc02_r50": {
        "sample_rate": 0.2,
        "margin_list": (1.0, 0.5, 0.0),
        "rec": "/train_tmp/WebFace42M",
        "num_classes": 2059906,
        "num_image": 42474557,
    },
    "wf12m_pfc03_r100": {"network": "r100", "sample_rate": 0.3, "num_classes": 617970},
    "cpu_tiny": {"network": "mbf", "embedding_size": 128, "num_classes": 200, "val_targets": []},
    "small_real": {  # the demo's recipe, then its own keys
        "network": "mbf_small",
        "embedding_size": 128,
        "lr": 0.1,
        "bf16": "auto",
        "sample_rate": 0.5,
        "augment": "flip",
        "random_crop": 0.2,
        "ema_decay": 0.999,
        "time_budget": 2700.0,
        "val_targets": [],
    },
}


@pytest.mark.parametrize("name", sorted(SHIPPED_VALUES))
def test_shipped_configs_keep_their_values(name):
    cfg = load_config(name)
    assert {key: getattr(cfg, key) for key in SHIPPED_VALUES[name]} == SHIPPED_VALUES[name]


def test_shipped_configs_are_package_files_listed_by_name():
    folder = shipped_configs_folder()
    assert folder.parent == Path(facescale.__file__).parent
    names = shipped_config_names()
    assert {"ms1mv3_r50", "cpu_tiny", "demo", "3millions"} <= set(names)
    assert not [n for n in names if n.startswith("_")]  # shared parts are not listed
    assert not (folder / "base.py").exists()  # it would be applied to every shipped config
    with pytest.raises(ConfigError, match="shipped config's name: 3millions, cpu_tiny"):
        load_config("no_such_config")


def test_a_file_at_the_given_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    (tmp_path / "ms1mv3_r50.py").write_text("config = {'num_classes': 7}\n")
    assert load_config(tmp_path / "ms1mv3_r50").num_classes == 7
    monkeypatch.chdir(tmp_path)
    assert load_config("ms1mv3_r50").num_classes == 7
    monkeypatch.chdir(tmp_path.parent)
    assert load_config("ms1mv3_r50").num_classes == 93431


def test_a_copied_shipped_config_takes_the_base_beside_it(tmp_path):
    """A user's folder with arcface_torch's base.py and copies of shipped files: base first."""
    for name in ("_r50_recipe.py", "ms1mv3_r50.py", "ms1mv3_mbf.py"):
        shutil.copy(shipped_configs_folder() / name, tmp_path)
    (tmp_path / "base.py").write_text("config = {'seed': 7, 'num_epoch': 3}\n")
    cfg = load_config(tmp_path / "ms1mv3_mbf")
    assert cfg.seed == 7  # from base.py only
    assert (cfg.network, cfg.num_epoch, cfg.num_classes) == ("mbf", 40, 93431)  # the file wins


@pytest.mark.parametrize(
    "text",
    [
        "lfw,cfp_fp",
        " lfw , cfp_fp ",
        "[lfw,cfp_fp]",
        "[lfw, cfp_fp]",
        "['lfw','cfp_fp']",
        '["lfw", "cfp_fp"]',
        "(lfw,cfp_fp)",
        "[lfw,cfp_fp,]",
    ],
)
def test_every_list_form_reads_the_same(text):
    assert load_config(None, [f"val_targets={text}"]).val_targets == ["lfw", "cfp_fp"]


@pytest.mark.parametrize("text", ["[]", "()", "", " [ ] "])
def test_an_empty_list(text):
    assert load_config(None, [f"val_targets={text}"]).val_targets == []


@pytest.mark.parametrize(
    "text", ["1,0,0.4", "[1,0,0.4]", "[1.0, 0.0, 0.4]", "(1, 0, 0.4)", "['1','0','0.4']"]
)
def test_list_items_are_typed_from_the_default(text):
    cfg = load_config(None, [f"margin_list={text}", "val_targets=[1,2]"])
    assert cfg.margin_list == (1.0, 0.0, 0.4) and all(type(m) is float for m in cfg.margin_list)
    assert cfg.val_targets == ["1", "2"]  # names of verification sets are strings


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("margin_list=[1,0.5]", "expected a list of 3 numbers"),
        ("margin_list=[1,0.5,0,0]", "expected a list of 3 numbers"),
        ("margin_list=[a,b,c]", "expected a list of 3 numbers"),
        ("margin_list=[]", "expected a list of 3 numbers"),
    ],
)
def test_bad_list_values_are_errors(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, [override])


def test_one_set_takes_several_pairs(capsys):
    argv = ["config", "ms1mv3_r50", "--set", "lr=0.05", "fp16=false"]
    argv += ["--set", "val_targets=[lfw, cfp_fp]", "--json"]
    assert build_parser().parse_args(argv).overrides == [
        "lr=0.05",
        "fp16=false",
        "val_targets=[lfw, cfp_fp]",
    ]
    with pytest.raises(SystemExit) as code:
        main(argv)
    assert code.value.code == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["lr"], config["fp16"]) == (0.05, False)
    assert config["val_targets"] == ["lfw", "cfp_fp"] and config["num_classes"] == 93431


def test_a_config_path_after_set_is_explained(capsys):
    with pytest.raises(SystemExit) as code:
        main(["config", "--set", "lr=0.05", "ms1mv3_r50"])
    assert code.value.code == 2
    assert "a config path goes before --set" in capsys.readouterr().err


def test_unknown_key_is_an_error_through_set_but_a_warning_in_a_file(tmp_path, caplog):
    path = tmp_path / "job.py"
    path.write_text("config = {'lr': 0.2, 'learning_rate': 0.3}\n")
    with caplog.at_level(logging.WARNING):
        assert load_config(path).lr == 0.2
    assert "unknown config key 'learning_rate'" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        load_config(path, ["lr=0.1", "learning_rate=0.3"])


def test_a_config_imports_its_own_neighbours_not_ones_loaded_before(tmp_path):
    assert load_config("ms1mv3_mbf").num_classes == 93431  # imports the shipped ms1mv3_r50
    shutil.copy(shipped_configs_folder() / "ms1mv3_mbf.py", tmp_path)
    (tmp_path / "ms1mv3_r50.py").write_text("config = {'num_classes': 11, 'lr': 0.3}\n")
    cfg = load_config(tmp_path / "ms1mv3_mbf")
    assert (cfg.num_classes, cfg.lr, cfg.network) == (11, 0.3, "mbf")
    assert load_config("ms1mv3_mbf").num_classes == 93431
