"""`facescale eval verification|ijb|tarfar`: one JSON object, same figures as the library."""

import json

import numpy as np
import pytest
from test_eval_ijb import make_ijb
from test_eval_verification import png, random_set
from test_export import run_cli, saved_model

from facescale.data.bin_format import write_verification_bin
from facescale.eval import (
    evaluate_verification,
    l2_normalize,
    load_verification_set,
    tar_at_far_all_pairs,
    tar_at_far_probe_gallery,
)

MODEL_ARGS = ["--network", "mbf", "--embedding-size", "64"]


def test_verification_json_equals_library(tmp_path, capsys):
    model, weights = saved_model(tmp_path, "mbf")
    vset = random_set(10, seed=4)
    path = tmp_path / "toy.bin"
    write_verification_bin(path, [png(im) for im in vset.images], vset.issame.tolist())
    argv = ["eval", "verification", str(weights), *MODEL_ARGS, str(path), "--folds", "5"]
    code, out, _ = run_cli([*argv, "--json"], capsys)
    assert code == 0
    expected = evaluate_verification(model, load_verification_set(path), folds=5).as_dict()
    approx = {key: pytest.approx(value) for key, value in expected.items()}  # lists inside
    assert json.loads(out) == {"verification": {"toy": approx}}
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and f"at achieved FAR {expected['far']:.2g}," in out


def test_tarfar_json_equals_library(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, 240)
    features = rng.normal(size=(30, 16))[labels] + rng.normal(size=(240, 16))
    np.save(tmp_path / "f.npy", features.astype(np.float32))
    np.save(tmp_path / "l.npy", labels)
    unit = l2_normalize(features.astype(np.float32))
    files = [str(tmp_path / "f.npy"), str(tmp_path / "l.npy")]
    code, out, _ = run_cli(["eval", "tarfar", *files, "--far", "1e-3", "1e-2", "--json"], capsys)
    assert code == 0
    expected = [r.as_dict() for r in tar_at_far_all_pairs(unit, labels, [1e-3, 1e-2])]
    assert json.loads(out)["tar_at_far"] == {"mode": "all_pairs", "results": expected}
    gallery = ["--gallery", *files]
    code, out, _ = run_cli(["eval", "tarfar", *files, *gallery, "--json"], capsys)
    expected = [r.as_dict() for r in tar_at_far_probe_gallery(unit, labels, unit, labels, [1e-4])]
    assert json.loads(out)["tar_at_far"]["results"] == expected
    code, out, _ = run_cli(["eval", "tarfar", *files, *gallery], capsys)
    assert code == 0 and out.startswith(f"TAR@FAR=0.0001: {100 * expected[0]['tar']:.3f} %")
    np.save(tmp_path / "short.npy", labels[:10])
    code, _, err = run_cli(["eval", "tarfar", files[0], str(tmp_path / "short.npy")], capsys)
    assert code == 2 and "expected 240 integer labels" in err


def test_ijb_json_and_roc_plot(tmp_path, capsys):
    _, weights = saved_model(tmp_path, "mbf")
    root = make_ijb(tmp_path / "IJBC", identities=3, templates_per_id=2)
    roc = tmp_path / "roc.png"
    argv = ["eval", "ijb", str(weights), *MODEL_ARGS, str(root), "--workers", "0"]
    code, out, _ = run_cli([*argv, "--roc", str(roc), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert list(report["ijb"]["tar_at_far"]) == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    assert report["roc"] == str(roc) and roc.stat().st_size > 1000


def test_hostile_bin_is_an_input_error(tmp_path, capsys):
    _, weights = saved_model(tmp_path, "mbf")
    path = tmp_path / "evil.bin"
    path.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.")
    code, _, err = run_cli(["eval", "verification", str(weights), *MODEL_ARGS, str(path)], capsys)
    assert code == 2 and "evil.bin" in err and "refusing to load os.system" in err
