"""The CFP split: training records of the training people only, pairs files of the test
people only, drawn reproducibly; the kept pairs files are what the split writes; the ablation
trains each variant for its budget and verifies it on those pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facescale.benchmarking.ablation import run_ablation, training_counts, variant
from facescale.benchmarking.cfp import FRONTAL, PROFILE, drawn_pairs, write_split
from facescale.data.image import decode_image
from facescale.data.pairs_file import read_pairs_file, write_pairs_file
from facescale.data.recordio import IndexedRecordFile
from facescale.data.records import read_layout, unpack_record
from facescale.errors import InputError

PEOPLE, TEST_FROM = 14, 5  # people 5-14 are the test people
KEPT = Path(__file__).parent.parent / "benchmarks" / "cfp"
SHARED_CFP = Path(__file__).parent.parent.parent / "shared" / "data" / "cfp"


def colour(person: int) -> tuple[int, int, int]:
    return (17 * person, 255 - 17 * person, 128)


def make_cfp(root: Path) -> Path:
    """A small CFP folder: every photo of a person one plain colour, the official folds cut
    by people (01: 1-4, 02: 5-9, 03: 10-14) as CFP's are."""
    numbered = {"frontal": [], "profile": []}
    for person in range(1, PEOPLE + 1):
        for view, count in (("frontal", FRONTAL), ("profile", PROFILE)):
            folder = root / "images" / f"{person:03d}" / view
            folder.mkdir(parents=True)
            for index in range(1, count + 1):
                Image.new("RGB", (60, 80), colour(person)).save(folder / f"{index:02d}.jpg")
                numbered[view].append(f"../Data/Images/{person:03d}/{view}/{index:02d}.jpg")
    protocol = root / "protocol"
    protocol.mkdir()
    for view, name in (("frontal", "F"), ("profile", "P")):
        lines = [f"{n} {path}" for n, path in enumerate(numbered[view], 1)]
        (protocol / f"Pair_list_{name}.txt").write_text("\n".join(lines) + "\n")
    for kind, per_person in (("FF", FRONTAL), ("FP", PROFILE)):
        for fold, (first, last) in enumerate([(1, 4), (5, 9), (10, 14)], 1):
            folder = protocol / "Split" / kind / f"{fold:02d}"
            folder.mkdir(parents=True)
            same = [f"{(p - 1) * 10 + 1},{(p - 1) * per_person + 2}" for p in (first, last)]
            diff = [f"{(first - 1) * 10 + 3},{(last - 1) * per_person + 1}"]
            (folder / "same.txt").write_text("\n".join(same) + "\n")
            (folder / "diff.txt").write_text("\n".join(diff) + "\n")
    return root


def person_of(path: Path) -> int:
    return int(path.parent.parent.name)


def test_training_records_hold_only_the_training_people(tmp_path):
    root = make_cfp(tmp_path / "cfp")
    report = write_split(root, tmp_path / "train", tmp_path / "pairs", test_from=TEST_FROM)
    train_people = range(1, TEST_FROM)
    assert report["train"]["classes"] == len(train_people)
    assert report["train"]["images"] == len(train_people) * (FRONTAL + PROFILE)
    rec = IndexedRecordFile(tmp_path / "train" / "train.rec")
    for key in read_layout(rec).image_keys:
        record = unpack_record(rec.read(int(key)), str(key))
        pixels = decode_image(record.image).reshape(-1, 3).mean(axis=0)
        person = int(record.labels[0]) + 1
        assert person in train_people
        np.testing.assert_allclose(pixels, colour(person), atol=3)


def test_a_training_set_of_the_first_people_counts_only_them(tmp_path):
    root = make_cfp(tmp_path / "cfp")
    write_split(root, tmp_path / "train", tmp_path / "pairs", test_from=TEST_FROM, train_people=2)
    assert training_counts(tmp_path / "train") == (2, 2 * (FRONTAL + PROFILE))
    rec = IndexedRecordFile(tmp_path / "train" / "train.rec")
    for key in read_layout(rec).image_keys:
        pixels = decode_image(unpack_record(rec.read(int(key)), str(key)).image)
        person = [p for p in (1, 2) if np.allclose(pixels.mean(axis=(0, 1)), colour(p), atol=3)]
        assert len(person) == 1
    for wrong in (0, TEST_FROM):
        with pytest.raises(InputError, match=f"train_people={wrong}: there are 4 training"):
            write_split(
                root, tmp_path / "w", tmp_path / "p", test_from=TEST_FROM, train_people=wrong
            )
    assert not (tmp_path / "w").exists()


def test_pairs_files_hold_only_test_people(tmp_path):
    root = make_cfp(tmp_path / "cfp")
    report = write_split(root, None, tmp_path / "pairs", test_from=TEST_FROM)
    assert "train" not in report
    for name in ("cfp_ff", "cfp_fp", "cfp_official_ff", "cfp_official_fp"):
        pairs = read_pairs_file(tmp_path / "pairs" / f"{name}.txt")
        assert len(pairs.paths) == report[f"{name}.txt"] > 0
        for (a, b), same in zip(pairs.paths, pairs.issame, strict=True):
            assert person_of(a) >= TEST_FROM and person_of(b) >= TEST_FROM
            assert (person_of(a) == person_of(b)) == same and a != b
            assert a.parent.name == "frontal"
            assert b.parent.name == ("profile" if name.endswith("fp") else "frontal")
    drawn = read_pairs_file(tmp_path / "pairs" / "cfp_ff.txt")
    assert drawn.issame.sum() == len(drawn.issame) // 2 == 350
    official = read_pairs_file(tmp_path / "pairs" / "cfp_official_fp.txt")
    assert official.issame.tolist() == [True, True, False] * 2  # folds 02 and 03, not 01
    assert "--folds 2" in (tmp_path / "pairs" / "cfp_official_fp.txt").read_text()


def test_the_drawn_pairs_follow_the_seed(tmp_path):
    root = make_cfp(tmp_path / "cfp")
    for folder, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_split(root, None, tmp_path / folder, seed=seed, test_from=TEST_FROM)
    text = {f: (tmp_path / f / "cfp_fp.txt").read_text() for f in "abc"}
    assert text["a"] == text["b"] != text["c"]


def test_kept_pairs_files_are_among_people_401_to_500():
    for path in sorted(KEPT.glob("cfp_*.txt")):
        pairs = read_pairs_file(path)
        people = {person_of(image) for pair in pairs.paths for image in pair}
        assert min(people) >= 401 and max(people) <= 500, path


@pytest.mark.skipif(not SHARED_CFP.is_dir(), reason="the CFP data is not beside the repository")
def test_kept_pairs_files_are_what_the_split_writes(tmp_path):
    write_split(SHARED_CFP, None, tmp_path)
    kept = sorted(p.name for p in KEPT.glob("cfp_*.txt"))
    assert kept == ["cfp_ff.txt", "cfp_fp.txt", "cfp_official_ff.txt", "cfp_official_fp.txt"]
    for name in kept:
        ours, fresh = read_pairs_file(KEPT / name), read_pairs_file(tmp_path / name)
        assert [(a.resolve(), b.resolve()) for a, b in ours.paths] == [
            (a.resolve(), b.resolve()) for a, b in fresh.paths
        ]
        assert ours.issame.tolist() == fresh.issame.tolist()


def test_the_ablation_names_an_unknown_variant_before_training_any(tmp_path):
    with pytest.raises(InputError, match=r"unknown variants \['nope', 'demo\+wd'\]; known: demo, "):
        run_ablation(["demo", "nope", "demo+wd"], tmp_path, [], "5s", tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_a_variant_is_a_named_one_or_a_config_with_changes():
    assert variant("scale64") == ("demo", ("scale=64",))
    assert variant("small_real+dropout=0.2+lr=0.05") == ("small_real", ("dropout=0.2", "lr=0.05"))
    assert variant("small_real") == ("small_real", ())
    assert variant("demo+") is None and variant("nope") is None


@pytest.mark.slow
def test_the_ablation_trains_a_variant_for_its_budget_and_verifies_it(tmp_path):
    root = make_cfp(tmp_path / "cfp")
    write_split(root, tmp_path / "train", tmp_path / "pairs", test_from=TEST_FROM, progress=False)
    drawn = drawn_pairs(root, list(range(TEST_FROM, PEOPLE + 1)), profile=True, per_fold=1)
    pairs = [
        write_pairs_file(tmp_path / "pairs" / "cfp_fp.txt", drawn, "10 folds of 2 pairs"),
        tmp_path / "pairs" / "cfp_official_ff.txt",
    ]
    runs = tmp_path / "runs"
    [row] = run_ablation(["scale64"], tmp_path / "train", pairs, "4s", runs, 1)
    trained = json.loads((runs / "scale64" / "config.json").read_text())
    assert trained["scale"] == 64 and trained["time_budget"] == 4 and trained["network"] == "mbf"
    people = TEST_FROM - 1  # the counts are the training set's own
    assert trained["num_classes"] == people and trained["num_image"] == people * (FRONTAL + PROFILE)
    log = (runs / "scale64" / "training.log").read_text()
    [(steps, epochs)] = re.findall(r"time budget of .*?, (\d+) steps, ([\d.]+) epochs", log)
    assert row["steps"] == int(steps) >= 1 and f"{row['epochs']:.2f}" == epochs  # the loop's count
    assert row["verification"].keys() == {"cfp_fp", "cfp_official_ff"}
    for name, result in row["verification"].items():
        assert 0 <= result["accuracy"] <= 1, name
    assert row["verification"]["cfp_fp"]["folds"] == 10
    assert row["verification"]["cfp_official_ff"]["folds"] == 2
