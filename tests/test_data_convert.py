"""Converters: folder <-> rec, shuffled rec, pairs -> .bin, the CLI, and real face images."""

import json
import shutil
from collections import Counter

import pytest
import torch
from data_helpers import FIXTURES, SHARED_DATA, face_jpeg, write_rec
from PIL import Image

from facescale.cli import main
from facescale.config import Config
from facescale.data import build_train_loader, decode_image, load_verification_bin
from facescale.data.convert import folder_to_rec, pairs_to_bin, rec_to_folder, shuffle_rec
from facescale.data.image import fit_face
from facescale.data.recordio import IndexedRecordFile, RecordError
from facescale.data.records import read_layout, read_property, unpack_record
from facescale.face import to_model_input


def contents(folder_or_rec) -> Counter:
    """The multiset of (label, image bytes) of a rec's image records."""
    rec = IndexedRecordFile(
        folder_or_rec if folder_or_rec.suffix == ".rec" else folder_or_rec / "train.rec"
    )
    keys = read_layout(rec).image_keys
    records = (unpack_record(rec.read(int(k)), str(k)) for k in keys)
    return Counter((r.label, r.image) for r in records)


def file_order_labels(folder) -> list[float]:
    rec = IndexedRecordFile(folder / "train.rec")
    keys = read_layout(rec).image_keys
    return [unpack_record(p, "").label for _, p in rec.iter_file_order(keys)]


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "faces"
    sizes = {"ann": 3, "bo": 0, "cy": 2}
    for name, count in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i:02d}.jpg").write_bytes(face_jpeg(10 * len(name) + i))
    Image.new("L", (92, 112), 200).save(root / "cy" / "small.png")
    return root


def test_folder_to_rec_layout_and_labels(image_folder, tmp_path):
    report = folder_to_rec(image_folder, tmp_path / "rec", progress=False)
    assert (report.images, report.classes, report.skipped) == (6, 3, 0)
    rec = IndexedRecordFile(tmp_path / "rec" / "train.rec")
    layout = read_layout(rec)
    assert layout.has_header and layout.image_keys.tolist() == [1, 2, 3, 4, 5, 6]
    assert layout.num_identities == 3
    assert read_property(tmp_path / "rec") == (3, 112, 112)
    records = [unpack_record(rec.read(k), "") for k in range(1, 7)]
    assert [r.label for r in records] == [
        0,
        0,
        0,
        2,
        2,
        2,
    ]  # ann, ann, ann, cy, cy, cy ("bo" empty)
    assert records[0].image == (image_folder / "ann" / "00.jpg").read_bytes()  # kept as is
    assert decode_image(records[5].image).shape == (112, 112, 3)  # small.png fitted
    ranges = [unpack_record(rec.read(k), "").labels for k in (7, 8, 9)]
    assert ranges == [(1.0, 4.0), (0.0, 0.0), (4.0, 7.0)]


def test_bad_image_in_folder(image_folder, tmp_path):
    (image_folder / "ann" / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(RecordError, match=r"ann/broken\.jpg: not a decodable image.*--skip-bad"):
        folder_to_rec(image_folder, tmp_path / "rec", progress=False)
    report = folder_to_rec(image_folder, tmp_path / "rec2", skip_bad=True, progress=False)
    assert (report.images, report.skipped) == (6, 1)


def test_rec_folder_rec_round_trip(image_folder, tmp_path):
    folder_to_rec(image_folder, tmp_path / "a", progress=False)
    rec_to_folder(tmp_path / "a", tmp_path / "unpacked", progress=False)
    assert sorted(p.name for p in (tmp_path / "unpacked").iterdir()) == ["0", "1", "2"]
    folder_to_rec(tmp_path / "unpacked", tmp_path / "b", progress=False)
    assert contents(tmp_path / "b") == contents(tmp_path / "a")


@pytest.mark.parametrize("memory_mb", [1000.0, 0.05])  # one bucket / about 20 spill buckets
def test_shuffle_keeps_exactly_the_records(tmp_path, memory_mb):
    labels = [i // 10 for i in range(400)]  # sorted by identity, as InsightFace ships them
    source = write_rec(tmp_path / "sorted", labels)
    report = shuffle_rec(source, tmp_path / "shuffled", seed=1, memory_mb=memory_mb, progress=False)
    assert (report.images, report.classes) == (400, 40)
    assert contents(tmp_path / "shuffled") == contents(source)
    assert file_order_labels(tmp_path / "shuffled") != sorted(labels)
    assert read_property(tmp_path / "shuffled") == (40, 112, 112)
    again = shuffle_rec(source, tmp_path / "again", seed=1, memory_mb=memory_mb, progress=False)
    assert again.images == 400
    assert file_order_labels(tmp_path / "again") == file_order_labels(tmp_path / "shuffled")
    assert not [p for p in (tmp_path / "shuffled").iterdir() if p.name.startswith("facescale-")]

    cfg = Config(
        rec=str(tmp_path / "shuffled"),
        num_classes=40,
        num_image=400,
        batch_size=16,
        num_workers=0,
        data_order="auto",
        augment="none",
    )
    loader = build_train_loader(cfg, 0, 1, "cpu")
    assert loader.order.block > 1  # a shuffled rec is read sequentially
    assert sum(len(y) for _, y in loader) == 400


@pytest.mark.parametrize("name, classes", [("mxnet_insightface", 3), ("mxnet_plain", 8)])
def test_shuffle_mxnet_files(tmp_path, name, classes):
    for suffix in (".rec", ".idx", ".property"):
        if (FIXTURES / f"{name}{suffix}").exists():
            target = "property" if suffix == ".property" else f"train{suffix}"
            shutil.copy(FIXTURES / f"{name}{suffix}", tmp_path / target)
    report = shuffle_rec(tmp_path, tmp_path / "out", progress=False)
    assert report.classes == classes
    assert contents(tmp_path / "out") == contents(tmp_path / "train.rec")


def test_pairs_to_bin(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(face_jpeg(i))
    Image.new("RGB", (92, 112), (9, 9, 9)).save(tmp_path / "odd.png")
    (tmp_path / "pairs.txt").write_text("0.jpg 1.jpg 1\n\n2.jpg odd.png 0\n3.jpg 0.jpg true\n")
    pairs_to_bin(tmp_path / "pairs.txt", tmp_path / "x.bin", progress=False)
    images, issame = load_verification_bin(tmp_path / "x.bin")
    assert issame.tolist() == [True, False, True] and len(images) == 6
    assert images[0] == face_jpeg(0) and decode_image(images[3]).shape == (112, 112, 3)
    (tmp_path / "bad.txt").write_text("0.jpg 1.jpg maybe\n")
    with pytest.raises(ValueError, match=r"bad\.txt line 1: expected 'image_a image_b same'"):
        pairs_to_bin(tmp_path / "bad.txt", tmp_path / "y.bin", progress=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_cli_convert(image_folder, tmp_path, capsys):
    code, out, _ = run_cli(
        capsys,
        "convert",
        "folder2rec",
        str(image_folder),
        str(tmp_path / "r"),
        "--json",
        "--no-progress",
    )
    assert code == 0 and json.loads(out) == {
        "conversion": "folder2rec",
        "output": str(tmp_path / "r"),
        "images": 6,
        "classes": 3,
        "skipped": 0,
    }
    code, out, _ = run_cli(
        capsys,
        "convert",
        "shuffle",
        str(tmp_path / "r"),
        str(tmp_path / "s"),
        "--json",
        "--no-progress",
    )
    assert code == 0 and json.loads(out)["images"] == 6
    (tmp_path / "s" / "train.idx").write_text("1\t999999\n")
    code, _, err = run_cli(
        capsys, "convert", "rec2folder", str(tmp_path / "s"), str(tmp_path / "f")
    )
    assert code == 2 and "key 1 points at offset 999999, past the end" in err


def real_faces(folders):
    """Identity folder name -> fitted RGB images of the original files."""
    return {
        d.name: [fit_face(decode_image(f.read_bytes())) for f in sorted(d.iterdir())]
        for d in folders
    }


@pytest.mark.parametrize("dataset", ["orl_faces", "extended_yale_b"])
def test_real_faces_folder_to_rec_to_loader(tmp_path, dataset):
    source = SHARED_DATA / dataset
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    identities = sorted(d for d in source.iterdir() if d.is_dir())[:6]
    root = tmp_path / "faces"
    for d in identities:  # a few identities, linked (never copied)
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:12]:
            (root / d.name / f.name).symlink_to(f)
    report = folder_to_rec(root, tmp_path / "rec", progress=False)
    assert report.classes == 6 and report.images == sum(1 for _ in root.glob("*/*"))
    cfg = Config(
        rec=str(tmp_path / "rec"),
        num_classes=6,
        num_image=report.images,
        batch_size=8,
        num_workers=1,
        data_order="random",
        augment="none",
    )
    originals = real_faces(sorted(root.iterdir()))
    names = sorted(originals)
    flat = torch.stack(
        [
            to_model_input(torch.tensor(img.transpose(2, 0, 1))[None])[0]
            for n in names
            for img in originals[n]
        ]
    )
    owner = [i for i, n in enumerate(names) for _ in originals[n]]
    loader = build_train_loader(cfg, 0, 1, "cpu")
    seen = 0
    for images, labels in loader:
        assert images.shape == (8, 3, 112, 112)
        for image, label in zip(images, labels.tolist(), strict=True):
            distance = (flat - image).abs().mean(dim=(1, 2, 3))
            assert owner[int(distance.argmin())] == label  # the image is one of its identity's
            assert distance.min() < 0.02  # and close to it (JPEG re-encoding only)
            seen += 1
    assert seen == report.images // 8 * 8
