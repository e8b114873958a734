"""What a user gets from `pip install .`: a non-editable install runs shipped configs by name
from any folder, with no source checkout in sight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH would put a source tree ahead of the installed copy, so it is dropped.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with facescale installed from a copy of this tree; its bin/ folder."""
    tmp = tmp_path_factory.mktemp("install")
    # Installing from a copy keeps the build (setuptools' build/ and egg-info folders, which
    # can hold files from an earlier build) out of this tree and out of the wheel.
    source = tmp / "source"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copy(ROOT / "README.md", source)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    # --system-site-packages lends the venv this interpreter's torch, numpy, setuptools and
    # pip, so nothing is downloaded (--no-deps, --no-build-isolation). That also makes an
    # editable facescale of this interpreter visible; the venv's own site-packages comes
    # first on sys.path, and pip never uninstalls a package outside the venv, so the venv's
    # `facescale` is the copy installed here (checked below by where it is imported from).
    venv = tmp / "venv"
    created = _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp
    )
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
    done = _run([*pip, "--no-index", "--quiet", str(source)], tmp)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv / "bin"


def test_installed_facescale_is_the_copy_in_the_venv(installed, tmp_path):
    where = _run(
        [
            str(installed / "python"),
            "-c",
            "import facescale, facescale.config as c; "
            "print(facescale.__file__); print(c.shipped_configs_folder())",
        ],
        tmp_path,
    )
    assert where.returncode == 0, where.stderr
    venv = installed.parent.resolve()
    for line in where.stdout.splitlines():
        assert Path(line).resolve().is_relative_to(venv), line


def test_installed_cli_runs_a_shipped_config_by_name(installed, tmp_path):
    done = _run([str(installed / "facescale"), "config", "ms1mv3_r50"], tmp_path)
    assert done.returncode == 0, done.stderr
    values = dict(
        (part.strip() for part in line.split(" : ", 1))
        for line in done.stdout.splitlines()
        if " : " in line
    )
    assert values["rec"] == "'/train_tmp/ms1m-retinaface-t1'"
    assert values["num_classes"] == "93431" and values["network"] == "'r50'"
    assert values["margin_list"] == "(1.0, 0.5, 0.0)" and values["fp16"] == "True"
    assert values["steps_per_epoch"] == str(5179510 // 128)


def test_installed_demo_command_starts(installed, tmp_path):
    done = _run([str(installed / "facescale"), "demo", "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--set" in done.stdout


def test_installed_copy_builds_the_narrow_store(installed, tmp_path):
    code = (
        "import os; from facescale.heads import native; "
        f"os.environ['XDG_CACHE_HOME'] = {str(tmp_path)!r}; "
        "print(native.narrow_store() is not None)"
    )
    done = _run([str(installed / "python"), "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert done.stdout.strip() == str(compiler is not None)
