"""The CFP benchmark split: train on identities 001-400, verify on pairs among 401-500.

CFP (Celebrities in Frontal-Profile) holds ``images/NNN/frontal/01..10.jpg`` and
``images/NNN/profile/01..04.jpg`` per person and the official protocol in ``protocol/``. The
split writes the training identities as a record dataset (``facescale train`` reads it), and
pairs files (:mod:`facescale.data.pairs_file`) over the test identities alone: pairs drawn with
a fixed seed, frontal-frontal and frontal-profile, and the official protocol's folds whose
pairs are all of test identities (its folds are 50 people each: 09 and 10 are 401-500). No
image of a test identity enters the training set.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from pathlib import Path

from facescale.data.convert import Report, folder_to_rec
from facescale.data.pairs_file import write_pairs_file
from facescale.errors import InputError
from facescale.landmarks import FaceAligner

FRONTAL, PROFILE = 10, 4
TEST_FROM = 401  # the first test identity
FOLDS = 10
PAIRS_PER_FOLD = 35  # same pairs, and as many different pairs, in each fold
SEED = 19
Pair = tuple[Path, Path, bool]


def image(root: Path, person: int, view: str, index: int) -> Path:
    """Photo ``index`` (1-based) of ``person`` seen ``view`` ('frontal' or 'profile')."""
    return root / "images" / f"{person:03d}" / view / f"{index:02d}.jpg"


def people(root: Path) -> list[int]:
    """The numbers of the people in a CFP folder."""
    folder = root / "images"
    if not folder.is_dir():
        raise InputError(f"{root}: no images/ folder; give the CFP folder (images/, protocol/)")
    return sorted(int(d.name) for d in folder.iterdir() if d.is_dir() and d.name.isdigit())


def write_training_set(
    root: Path,
    dst: Path,
    test_from: int = TEST_FROM,
    progress: bool = True,
    align: bool = False,
    train_people: int | None = None,
) -> Report:
    """The photos of the people before ``test_from`` (the first ``train_people`` of them, if
    given) as a record dataset in ``dst``, one label per person in number order, aligned by
    found landmarks with ``align``."""
    train = [p for p in people(root) if p < test_from]
    if train_people is not None:
        if not 1 <= train_people <= len(train):
            raise InputError(f"train_people={train_people}: there are {len(train)} training people")
        train = train[:train_people]
    with tempfile.TemporaryDirectory() as staging:
        for person in train:
            folder = Path(staging) / f"{person:03d}"
            folder.mkdir()
            views = [("frontal", FRONTAL), ("profile", PROFILE)]
            for view, count in views:
                for index in range(1, count + 1):
                    source = image(root, person, view, index).resolve()
                    (folder / f"{view}_{index:02d}.jpg").symlink_to(source)
        if not align:
            return folder_to_rec(staging, dst, progress=progress)
        aligner = FaceAligner()
        report = folder_to_rec(staging, dst, progress=progress, align=aligner)
        aligner.finder.report("the CFP training photos")
        return report


def drawn_pairs(
    root: Path,
    test: list[int],
    profile: bool,
    seed: int = SEED,
    folds: int = FOLDS,
    per_fold: int = PAIRS_PER_FOLD,
) -> list[Pair]:
    """``folds`` folds of ``per_fold`` same and ``per_fold`` different pairs of the ``test``
    people: a frontal photo against a frontal one, or against a profile one when ``profile``.
    Fold f's first photos are of the f-th tenth of the people; the draw is fixed by ``seed``."""
    rng = random.Random(f"{seed}-{'fp' if profile else 'ff'}")
    second_view, second_count = ("profile", PROFILE) if profile else ("frontal", FRONTAL)
    chunk = -(-len(test) // folds)
    pairs: list[Pair] = []
    for fold in range(folds):
        own = test[fold * chunk : (fold + 1) * chunk]
        if not own:
            raise InputError(f"{len(test)} test people cannot fill {folds} folds")
        for same in (True, False):
            drawn: set[tuple[int, int, int, int]] = set()
            while len(drawn) < per_fold:
                a = rng.choice(own)
                b = a if same else rng.choice([p for p in test if p != a])
                i, j = rng.randint(1, FRONTAL), rng.randint(1, second_count)
                if same and not profile:
                    i, j = sorted((i, j))
                if not (same and not profile and i == j):  # never a photo against itself
                    drawn.add((a, i, b, j))
            pairs += [
                (image(root, a, "frontal", i), image(root, b, second_view, j), same)
                for a, i, b, j in sorted(drawn)
            ]
    return pairs


def official_pairs(root: Path, test: list[int], profile: bool) -> tuple[list[Pair], list[str]]:
    """The official protocol's folds (``Split/FF`` or ``Split/FP``) whose pairs are all of
    ``test`` people, fold by fold, same pairs then different ones; and those folds' names."""
    protocol = root / "protocol"
    frontal = _numbered(protocol / "Pair_list_F.txt", root)
    second = _numbered(protocol / "Pair_list_P.txt", root) if profile else frontal
    wanted = {f"{p:03d}" for p in test}
    pairs: list[Pair] = []
    kept: list[str] = []
    split = protocol / "Split" / ("FP" if profile else "FF")
    for fold in sorted(d for d in split.iterdir() if d.is_dir()):
        in_fold = [
            (frontal[int(first)], second[int(other)], same)
            for name, same in (("same.txt", True), ("diff.txt", False))
            for first, other in (line.split(",") for line in (fold / name).read_text().split())
        ]
        if all({a.parent.parent.name, b.parent.parent.name} <= wanted for a, b, _ in in_fold):
            pairs += in_fold
            kept.append(fold.name)
    return pairs, kept


def _numbered(listing: Path, root: Path) -> dict[int, Path]:
    """A ``Pair_list`` file's numbers to image paths (its ``../Data/Images/`` is ``images/``)."""
    numbered = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            number, path = line.split()
            numbered[int(number)] = root / "images" / path.split("Images/", 1)[1]
    return numbered


def write_split(
    root: str | Path,
    train_dst: str | Path | None,
    pairs_dst: str | Path,
    seed: int = SEED,
    test_from: int = TEST_FROM,
    progress: bool = True,
    align: bool = False,
    train_people: int | None = None,
) -> dict[str, object]:
    """The training set (unless ``train_dst`` is None; aligned with ``align``; of the first
    ``train_people`` training people, if given) and the four
    pairs files (``cfp_ff.txt``, ``cfp_fp.txt`` drawn, ``cfp_official_ff.txt``,
    ``cfp_official_fp.txt``) in ``pairs_dst``; what was written, with its counts."""
    root, pairs_dst = Path(root), Path(pairs_dst)
    test = [p for p in people(root) if p >= test_from]
    test_names = f"people {test[0]:03d}-{test[-1]:03d}" if test else "no people"
    report: dict[str, object] = {}
    for profile, kind in ((False, "ff"), (True, "fp")):
        views = "frontal-profile" if profile else "frontal-frontal"
        drawn = drawn_pairs(root, test, profile, seed)
        header = (
            f"CFP {views} pairs among the test {test_names}, drawn with seed {seed}: "
            f"{FOLDS} folds of {PAIRS_PER_FOLD} same then {PAIRS_PER_FOLD} different pairs"
        )
        path = write_pairs_file(pairs_dst / f"cfp_{kind}.txt", drawn, header)
        report[path.name] = len(drawn)
        official, folds = official_pairs(root, test, profile)
        header = (
            f"CFP official {views} protocol: its folds {', '.join(folds)}, whose pairs are all "
            f"among the test {test_names}, each same then different pairs; evaluate with "
            f"--folds {len(folds)} to keep its folds"
        )
        path = write_pairs_file(pairs_dst / f"cfp_official_{kind}.txt", official, header)
        report[path.name] = len(official)
    if train_dst is not None:
        written = write_training_set(
            root, Path(train_dst), test_from, progress, align, train_people
        )
        report["train"] = dataclasses.asdict(written)
    return report
