"""Converters never lose or hide anything: overlapping paths and existing outputs are refused,
and a failure (bad source, corrupt record, unwritable place, full disk, Ctrl-C) leaves the
destination byte for byte as it was, with nothing beside it."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from data_helpers import corrupt_record, face_jpeg, write_rec

from facescale.cli import main
from facescale.data import load_verification_bin
from facescale.data.convert import (
    folder_to_rec,
    folder_to_shards,
    pairs_to_bin,
    rec_to_folder,
    rec_to_shards,
    shuffle_rec,
)
from facescale.data.recordio import IndexedRecordFile, RecordError
from facescale.data.staging import ConvertError
from facescale.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (itself included) with its bytes (None for a folder)."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): None if p.is_dir() else p.read_bytes() for p in paths}


def make_faces(root: Path, per_class: int = 3, classes: int = 3) -> Path:
    for c in range(classes):
        (root / f"id{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"id{c}" / f"{i}.jpg").write_bytes(face_jpeg(c * per_class + i))
    return root


def make_pairs(folder: Path, pairs: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2 * pairs):
        (folder / f"{i}.jpg").write_bytes(face_jpeg(i))
    lines = [f"{2 * p}.jpg {2 * p + 1}.jpg {p % 2}" for p in range(pairs)]
    (folder / "pairs.txt").write_text("\n".join(lines) + "\n")
    return folder / "pairs.txt"


@pytest.fixture
def rec(tmp_path) -> Path:
    return write_rec(tmp_path / "rec", [i // 8 for i in range(40)])


@pytest.fixture
def good(tmp_path) -> Path:
    """An existing good dataset that a failed conversion must leave alone."""
    return write_rec(tmp_path / "good", [i // 4 for i in range(20)])


def convert(kind: str, src: Path, dst: Path, **kw):
    run = {
        "shuffle": shuffle_rec,
        "rec2folder": rec_to_folder,
        "folder2rec": folder_to_rec,
        "pairs2bin": pairs_to_bin,
        "rec2shards": partial(rec_to_shards, shard_size=7),
        "folder2shards": partial(folder_to_shards, shard_size=2),
    }[kind]
    return run(src, dst, progress=False, **kw)


def sources(tmp_path: Path, rec: Path) -> dict[str, Path]:
    return {
        "shuffle": rec,
        "rec2folder": rec,
        "folder2rec": make_faces(tmp_path / "faces"),
        "pairs2bin": make_pairs(tmp_path / "pairs"),
    }


@pytest.mark.parametrize("kind", ["shuffle", "rec2folder", "folder2rec", "pairs2bin"])
@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_source_as_destination_is_refused(tmp_path, rec, monkeypatch, kind, spelling):
    src = sources(tmp_path, rec)[kind]
    before = snapshot(src)
    dst = src
    if spelling == "relative":
        monkeypatch.chdir(src.parent)
        dst = Path(".") / src.name
    elif spelling == "symlink":
        dst = tmp_path / "link"
        dst.symlink_to(src)
    with pytest.raises(ConvertError, match=r"is the source .* itself") as info:
        convert(kind, src, dst, overwrite=True)
    assert isinstance(info.value, UserError)
    assert snapshot(src) == before


def test_destination_holding_the_source_is_refused(rec):
    before = snapshot(rec)
    with pytest.raises(ConvertError, match="holds the source"):
        shuffle_rec(rec / "train.rec", rec, overwrite=True, progress=False)
    with pytest.raises(ConvertError, match="holds the source"):
        rec_to_folder(rec / "train.rec", rec.parent, overwrite=True, progress=False)
    assert snapshot(rec) == before


def test_packing_into_the_image_folder_is_refused(tmp_path):
    faces = make_faces(tmp_path / "faces")
    with pytest.raises(ConvertError, match="inside the source folder"):
        folder_to_rec(faces, faces / "rec", progress=False)
    assert not (faces / "rec").exists()


def test_shuffled_copy_may_live_inside_the_dataset_folder(rec):
    report = shuffle_rec(rec, rec / "shuffled", progress=False)
    assert report.images == 40 and (rec / "shuffled" / "train.rec").is_file()


def test_existing_destination_needs_overwrite(tmp_path, rec, good):
    before = snapshot(good)
    with pytest.raises(ConvertError, match="already exists; pass --overwrite"):
        shuffle_rec(rec, good, progress=False)
    assert snapshot(good) == before
    report = shuffle_rec(rec, good, overwrite=True, progress=False)
    assert report.images == 40 and len(IndexedRecordFile(good / "train.rec")) == 41
    assert (good / "property").read_text() == "5,112,112"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "rec"]


def test_existing_bin_needs_overwrite(tmp_path):
    pairs = make_pairs(tmp_path / "pairs", pairs=2)
    (tmp_path / "val.bin").write_bytes(b"old")
    with pytest.raises(ConvertError, match="already exists"):
        pairs_to_bin(pairs, tmp_path / "val.bin", progress=False)
    assert (tmp_path / "val.bin").read_bytes() == b"old"
    report = pairs_to_bin(pairs, tmp_path / "val.bin", overwrite=True, progress=False)
    assert (report.pairs, report.images) == (2, 4)
    assert len(load_verification_bin(tmp_path / "val.bin")[0]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "val.bin"]


def test_empty_destination_folder_is_used(tmp_path, rec):
    (tmp_path / "empty").mkdir()
    assert rec_to_folder(rec, tmp_path / "empty", progress=False).images == 40
    assert len(list((tmp_path / "empty").rglob("*.jpg"))) == 40


def bad_sources(tmp_path: Path, rec: Path) -> dict[str, Path]:
    """Sources that fail midway: a corrupt record or image after good ones, a missing image."""
    corrupt_record(rec, 20)
    faces = make_faces(tmp_path / "faces")
    (faces / "id1" / "1.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    pairs = make_pairs(tmp_path / "pairs")
    (pairs.parent / "3.jpg").unlink()
    return {
        "shuffle": rec,
        "rec2folder": rec,
        "folder2rec": faces,
        "pairs2bin": pairs,
        "rec2shards": rec,
        "folder2shards": faces,
    }


@pytest.mark.parametrize(
    "kind", ["shuffle", "rec2folder", "folder2rec", "pairs2bin", "rec2shards", "folder2shards"]
)
def test_failure_midway_leaves_the_destination_as_it_was(tmp_path, rec, good, kind):
    src = bad_sources(tmp_path, rec)[kind]
    dst = good if kind != "pairs2bin" else tmp_path / "good" / "val.bin"
    if kind == "pairs2bin":
        dst.write_bytes(b"an older set")
    listing, before = sorted(tmp_path.rglob("*")), snapshot(dst)
    with pytest.raises(RecordError):
        convert(kind, src, dst, overwrite=True)
    assert snapshot(dst) == before
    assert sorted(tmp_path.rglob("*")) == listing
    with pytest.raises(RecordError):  # a new destination is never created
        convert(kind, src, tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()


def test_missing_source_leaves_the_destination_as_it_was(tmp_path, good):
    before = snapshot(good)
    with pytest.raises(FileNotFoundError):
        shuffle_rec(tmp_path / "missing", good, overwrite=True, progress=False)
    with pytest.raises(FileNotFoundError):
        folder_to_rec(tmp_path / "missing", good, overwrite=True, progress=False)
    assert snapshot(good) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]


def test_unwritable_place_is_refused_before_reading(tmp_path, rec):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConvertError, match="cannot write in"):
        shuffle_rec(tmp_path / "missing", tmp_path / "a_file" / "out", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
def test_read_only_parent_is_refused(tmp_path, rec):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ConvertError, match="cannot write in"):
            shuffle_rec(rec, parent / "out", progress=False)
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_refuses_with_exit_code_2_and_overwrites_on_request(tmp_path, rec, good, capsys):
    before = snapshot(good)
    code, _, err = run_cli(capsys, "convert", "shuffle", str(rec), str(rec), "--no-progress")
    assert code == 2 and "is the source" in err
    code, _, err = run_cli(capsys, "convert", "shuffle", str(rec), str(good), "--no-progress")
    assert code == 2 and "--overwrite" in err and snapshot(good) == before
    argv = ["convert", "shuffle", str(rec), str(good), "--no-progress", "--overwrite", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and json.loads(out)["images"] == 40


def test_cli_pairs2bin_reports_pairs_and_images(tmp_path, capsys):
    pairs = make_pairs(tmp_path / "pairs", pairs=3)
    argv = ["convert", "pairs2bin", str(pairs), str(tmp_path / "v.bin"), "--no-progress"]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'v.bin'}: 3 pairs, 6 images"
    code, out, _ = run_cli(capsys, *argv, "--json", "--overwrite")
    assert code == 0 and json.loads(out) == {
        "conversion": "pairs2bin",
        "output": str(tmp_path / "v.bin"),
        "pairs": 3,
        "images": 6,
    }


def facescale_process(*argv: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [sys.executable, "-m", "facescale", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_full_disk_leaves_the_destination_as_it_was(tmp_path, rec, good):
    import resource

    def small_files() -> None:  # every file this process writes stops growing at 64 KiB
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))

    before = snapshot(good)
    argv = ["convert", "shuffle", str(rec), str(good), "--overwrite", "--no-progress"]
    proc = facescale_process(*argv, preexec_fn=small_files)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "File too large" in err
    assert snapshot(good) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "rec"]


def test_ctrl_c_leaves_the_destination_as_it_was(tmp_path):
    (tmp_path / "val.bin").write_bytes(b"an older set")
    os.mkfifo(tmp_path / "pairs.txt")  # reading it blocks until the test writes: a fixed point
    argv = ["convert", "pairs2bin", str(tmp_path / "pairs.txt"), str(tmp_path / "val.bin")]
    # as from a terminal: a shell that starts the tests in the background has them ignore Ctrl-C
    ctrl_c_on = partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = facescale_process(*argv, "--overwrite", "--no-progress", preexec_fn=ctrl_c_on)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("val.bin.partial-*")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert (tmp_path / "val.bin").read_bytes() == b"an older set"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.txt", "val.bin"]
