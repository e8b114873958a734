"""Verification on a pairs file of image paths: read as `facescale embed` reads images, scored
like a .bin set, on the command line and during training."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import run_cli, saved_model

from facescale.config import load_config
from facescale.data.pairs_file import read_pairs_file, write_pairs_file
from facescale.distributed import DistEnv
from facescale.eval import evaluate_verification, load_verification_set, verification_metrics
from facescale.export import embed_files
from facescale.train.evaluation import Evaluator

MODEL_ARGS = ["--network", "mbf", "--embedding-size", "64"]


def make_photos(folder, people=4, per_person=3, seed=0):
    """Photos of several sizes (some 112x112 crops, most not), one face pattern per person."""
    rng = np.random.default_rng(seed)
    photos = {}
    for person in range(people):
        face = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        for shot in range(per_person):
            size = [(112, 112), (150, 190), (300, 240)][shot % 3]
            image = Image.fromarray(face).resize(size, Image.Resampling.BILINEAR)
            noisy = np.asarray(image).astype(int) + rng.integers(-30, 30, (*size[::-1], 3))
            path = folder / f"person{person}" / f"{shot}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
            photos[person, shot] = path
    return photos


def make_pairs(photos):
    people = sorted({person for person, _ in photos})
    same = [(photos[p, 0], photos[p, s], True) for p in people for s in (1, 2)]
    different = [(photos[p, 0], photos[q, 1], False) for p in people for q in people if q > p]
    return same + different


def test_pairs_file_scores_the_embeddings_that_embed_gives(tmp_path, capsys):
    photos = make_photos(tmp_path / "photos")
    pairs = make_pairs(photos)
    listing = write_pairs_file(tmp_path / "lists" / "mine.txt", pairs, "my pairs\nsecond line")
    assert listing.read_text().startswith("# my pairs\n# second line\n../photos/person0/0.jpg")
    model, weights = saved_model(tmp_path, "mbf")
    argv = ["eval", "verification", str(weights), *MODEL_ARGS, str(listing), "--folds", "3"]
    code, out, _ = run_cli([*argv, "--json"], capsys)
    assert code == 0
    firsts = embed_files(model, [a for a, _, _ in pairs])
    seconds = embed_files(model, [b for _, b, _ in pairs])
    issame = np.array([same for _, _, same in pairs])
    expected = verification_metrics(firsts, seconds, issame, folds=3)
    result = json.loads(out)["verification"]["mine"]
    assert result["accuracy"] == pytest.approx(expected.accuracy)
    assert result["fold_thresholds"] == pytest.approx(list(expected.fold_thresholds))
    library = evaluate_verification(model, load_verification_set(listing), folds=3)
    assert result == {key: pytest.approx(value) for key, value in library.as_dict().items()}


def test_pairs_file_paths_are_relative_to_its_folder(tmp_path, monkeypatch):
    photos = make_photos(tmp_path / "photos", people=2)
    listing = write_pairs_file(tmp_path / "photos" / "pairs.txt", make_pairs(photos))
    monkeypatch.chdir(tmp_path)
    read = read_pairs_file("photos/pairs.txt")
    assert read.name == "pairs" and read.issame.tolist() == [True, True, True, True, False]
    assert read.paths[0] == (Path("photos/person0/0.jpg"), Path("photos/person0/1.jpg"))
    assert listing == tmp_path / "photos" / "pairs.txt"
    vset = load_verification_set("photos/pairs.txt")
    assert vset.images.shape == (6, 3, 112, 112) and vset.images.dtype == np.uint8  # distinct
    assert vset.slots.tolist() == [0, 1, 0, 2, 3, 4, 3, 5, 0, 4]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("a.jpg b.jpg yes", "expected 'image_a image_b same' with same 1/0 or true/false"),
        ("a.jpg b.jpg", "got 'a.jpg b.jpg'"),
        ("a.jpg missing.jpg 1", "image {folder}/missing.jpg not found"),
    ],
)
def test_bad_pairs_file_names_file_and_line(tmp_path, capsys, line, fragment):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (112, 112)).save(tmp_path / name)
    listing = tmp_path / "pairs.txt"
    listing.write_text(f"# header\n\na.jpg b.jpg 1\n{line}\n")
    _, weights = saved_model(tmp_path, "mbf")
    code, _, err = run_cli(
        ["eval", "verification", str(weights), *MODEL_ARGS, str(listing)], capsys
    )
    assert code == 2
    assert f"{listing} line 4: " in err and fragment.format(folder=tmp_path) in err


def test_empty_pairs_file_is_refused(tmp_path):
    (tmp_path / "pairs.txt").write_text("# nothing yet\n")
    assert read_pairs_file(tmp_path / "pairs.txt").paths == []
    with pytest.raises(ValueError, match=r"pairs\.txt: no pairs; each line is .image_a image_b"):
        load_verification_set(tmp_path / "pairs.txt")


def test_training_verifies_a_pairs_file_named_in_val_targets(tmp_path):
    listing = write_pairs_file(tmp_path / "pairs.txt", make_pairs(make_photos(tmp_path)))
    cfg = load_config(None, [f"val_targets=[{listing}, lfw]", "rec=synthetic"])
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert Evaluator(cfg, env).sets == [listing]
