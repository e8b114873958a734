"""Write the demo's data: a shuffled InsightFace RecordIO training set of synthetic identities
and a verification ``.bin`` of other identities, through facescale's own writers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facescale.data import IndexedRecordWriter, pack_record, write_verification_bin
from facescale.data.image import encode_jpeg
from facescale.data.records import write_header_record, write_property
from facescale.demo.faces import identities, render

HELDOUT_NAME = "heldout"


@dataclass(frozen=True)
class DemoData:
    """What was written: the dataset folder and its sizes."""

    folder: Path
    num_classes: int
    num_images: int
    num_pairs: int


def write_training_rec(
    folder: Path, num_classes: int, per_identity: int, seed: int, progress: bool = True
) -> int:
    """``train.rec``/``train.idx``/``property`` with images in random order; returns the count."""
    people = identities(num_classes, seed)
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(num_classes * per_identity)
    count = len(order)
    with IndexedRecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        write_header_record(writer, count)
        for key, item in enumerate(
            tqdm(order, "training images", disable=None if progress else True), 1
        ):
            label = int(item) // per_identity
            image = render(people[label], rng)
            writer.write(key, pack_record(float(label), encode_jpeg(image)))
    write_property(folder, num_classes)
    return count


def write_heldout_bin(
    path: Path, num_identities: int, per_identity: int, num_pairs: int, seed: int
) -> None:
    """Half genuine pairs (two images of one person), half impostor pairs, of people never
    seen in training (a different seed draws different people)."""
    people = identities(num_identities, seed)
    rng = np.random.default_rng(seed + 1)
    images = [[encode_jpeg(render(p, rng)) for _ in range(per_identity)] for p in people]
    pairs, issame = [], []
    for i in range(num_pairs):
        same = i % 2 == 0
        a = int(rng.integers(num_identities))
        b = a if same else int((a + rng.integers(1, num_identities)) % num_identities)
        first, second = rng.choice(per_identity, 2, replace=False)
        pairs += [images[a][first], images[b][second]]
        issame.append(same)
    write_verification_bin(path, pairs, issame)


def make_demo_data(
    folder: Path,
    num_classes: int = 300,
    per_identity: int = 12,
    heldout_identities: int = 100,
    num_pairs: int = 1200,
    seed: int = 0,
    progress: bool = True,
) -> DemoData:
    """Write the training set and the held-out pairs into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    count = write_training_rec(folder, num_classes, per_identity, seed, progress)
    write_heldout_bin(folder / f"{HELDOUT_NAME}.bin", heldout_identities, 8, num_pairs, seed + 7919)
    return DemoData(folder, num_classes, count, num_pairs)
