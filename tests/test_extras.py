"""Optional extras: a command that needs a missing one says which extra to install, as one
line before it starts any work; the packages are made unimportable for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facescale.errors import UserError
from facescale.extras import EXTRAS, available, install_hint, missing, require

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def test_the_extras_list_the_packages_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra, (_, packages) in EXTRAS.items():
        names = {spec.split(">")[0].split("=")[0].split("[")[0] for spec in declared[extra]}
        assert set(packages) == names, extra


def test_a_blocked_module_is_missing_and_named_with_its_extra(monkeypatch):
    pytest.importorskip("onnxruntime")
    assert available("onnx") and install_hint("onnx") == ""
    require("onnx")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails
    assert missing("onnx") == ["onnxscript"] and not available("onnx")
    assert available("onnx", "onnx", "onnxruntime")  # a subset that does not need it
    with pytest.raises(UserError) as raised:
        require("onnx")
    assert str(raised.value) == (
        "ONNX export needs onnxscript, from the optional extra 'onnx'; "
        'install it with: pip install "facescale[onnx]"'
    )
    with pytest.raises(ValueError, match="not packages of the 'onnx' extra"):
        require("onnx", "numpy")


def refusal_without(module: str, argv: list[str]) -> str:
    """`facescale ARGV` in a fresh process where ``module`` cannot be found: it must exit 2
    with one line on stderr and nothing on stdout; that line."""
    script = (
        f"import sys; sys.modules[{module!r}] = None; "
        f"from facescale.cli import main; main({argv!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1
    return done.stderr


def test_export_without_the_extra_is_one_line_before_any_work(tmp_path):
    """The model file does not even exist: the missing extra is found before it is read."""
    out = tmp_path / "model.onnx"
    argv = ["export", "onnx", str(tmp_path / "absent.pt"), "--network", "mbf", str(out)]
    refusal = refusal_without("onnxscript", argv)
    assert refusal.startswith("facescale export: error: ONNX export needs onnxscript")
    assert 'pip install "facescale[onnx]"' in refusal
    assert not out.exists()
