import numpy as np
import pytest

import facescale.backbones
from facescale.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_a_user_error_is_one_line_on_stderr_and_exit_2(capsys):
    code, out, err = run(["info", "r51"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("facescale info: error: unknown backbone 'r51'; valid names: r18")


def test_a_wrong_path_is_one_line_on_stderr_and_exit_2(tmp_path, capsys):
    labels = tmp_path / "labels.npy"
    np.save(labels, np.arange(4))
    missing = tmp_path / "missing.npy"
    code, _, err = run(["eval", "tarfar", str(missing), str(labels)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("facescale eval: error: ") and str(missing) in err


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def broken(name, embedding_size):
        raise ValueError("internal inconsistency")

    monkeypatch.setattr(facescale.backbones, "model_info", broken)
    with pytest.raises(ValueError, match="internal inconsistency"):
        main(["info", "mbf"])
    assert "error:" not in capsys.readouterr().err
