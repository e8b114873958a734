"""The training loader: right records, same count per rank, new order per epoch, exact resume."""

import io
import itertools
import logging
import threading

import numpy as np
import pytest
import torch
from data_helpers import PATTERNS, face_jpeg, write_rec
from dist_utils import run_ranks

from facescale.config import Config
from facescale.data import build_train_loader, decode_image
from facescale.data.batches import BatchTask
from facescale.data.recordio import IndexedRecordWriter, RecordError
from facescale.data.records import pack_record, write_header_record, write_property
from facescale.data.ring import BatchRing, Progress
from facescale.face import to_model_input

N = 120


def config(folder, **kw) -> Config:
    values = dict(
        rec=str(folder),
        num_classes=N,
        num_image=N,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=32,
        augment="none",
        data_order="sequential",
        seed=3,
    )
    values.update(kw)
    return Config(**values)


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    """Record i has label i (a unique id) and image face_jpeg(i % PATTERNS); shuffled file order."""
    labels = np.random.default_rng(0).permutation(N).astype(float)
    folder = write_rec(tmp_path_factory.mktemp("rec"), labels, classes=N)
    return folder, labels


def expected_image(label: int, labels: np.ndarray) -> torch.Tensor:
    position = int(np.flatnonzero(labels == label)[0])
    image = decode_image(face_jpeg(position % PATTERNS)).transpose(2, 0, 1)
    return to_model_input(torch.tensor(image)[None])[0]


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_batches_hold_the_records_they_name(rec, order):
    folder, labels = rec
    loader = build_train_loader(config(folder, data_order=order), 0, 1, "cpu")
    batches = epoch_batches(loader, 0)
    assert len(batches) == len(loader) == N // 8
    for images, ids in batches:
        assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float32
        assert ids.dtype == torch.int64 and images.min() >= -1 and images.max() <= 1
        for image, label in zip(images, ids.tolist(), strict=True):
            torch.testing.assert_close(image, expected_image(label, labels), rtol=0, atol=0)
    seen = torch.cat([y for _, y in batches]).tolist()
    assert sorted(seen) == list(range(N))  # 120 = 15 batches of 8: nothing dropped


def test_epochs_differ_and_repeat_with_the_seed(rec):
    folder, _ = rec
    loader = build_train_loader(config(folder), 0, 1, "cpu")
    first = [y.tolist() for _, y in epoch_batches(loader, 0)]
    second = [y.tolist() for _, y in epoch_batches(loader, 1)]
    again = build_train_loader(config(folder), 0, 1, "cpu")
    assert first != second
    assert [y.tolist() for _, y in epoch_batches(again, 0)] == first


def test_worker_processes_deliver_the_in_process_batches(rec):
    folder, _ = rec
    loader = build_train_loader(
        config(folder, num_workers=2, augment="strong", random_crop=0.1), 0, 1, "cpu"
    )
    got = epoch_batches(loader, 2)
    maker, plan = loader.maker, loader.order.epoch(2)
    for j, (images, labels) in enumerate(got):
        ref_images, ref_labels, skipped = maker[BatchTask.of(plan, 0, j)]
        assert not skipped
        torch.testing.assert_close(images, to_model_input(ref_images), rtol=0, atol=0)
        assert labels.tolist() == ref_labels.tolist()


@pytest.mark.parametrize("key", [{"random_rotation": 20.0}, {"random_erase": 1.0}])
def test_rotation_and_erasing_change_the_images_of_the_same_samples(rec, key):
    folder, _ = rec
    plain, changed = (
        epoch_batches(build_train_loader(config(folder, augment="none", **k), 0, 1, "cpu"), 0)
        for k in ({}, key)
    )
    for (a, y), (b, z) in zip(plain, changed, strict=True):
        assert y.tolist() == z.tolist() and not torch.equal(a, b)


@pytest.mark.parametrize(
    "workers, resume_workers, stop", [(0, 0, 5), (2, 2, 6), (2, 0, 1), (0, 2, 15)]
)
def test_resume_mid_epoch_yields_exactly_the_rest(rec, workers, resume_workers, stop):
    folder, _ = rec
    cfg = config(folder, num_workers=workers, augment="flip")
    reference = build_train_loader(cfg, 0, 1, "cpu")
    full, next_epoch = epoch_batches(reference, 1), epoch_batches(reference, 2)

    interrupted = build_train_loader(cfg, 0, 1, "cpu")
    interrupted.set_epoch(1)
    for _ in itertools.islice(iter(interrupted), stop):
        pass
    buf = io.BytesIO()
    torch.save(interrupted.state_dict(), buf)  # what a checkpoint does with it
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    cfg.num_workers = resume_workers
    resumed = build_train_loader(cfg, 0, 1, "cpu")
    resumed.load_state_dict(state)
    for loader in (resumed, interrupted):  # a fresh loader, and the one that stopped early
        loader.load_state_dict(state)
        assert loader.state_dict() == state  # saving again before reading keeps the position
        rest = epoch_batches(loader, 1)  # the trainer calls set_epoch(1) again: position kept
        assert len(rest) == len(full) - stop
        for (x, y), (fx, fy) in zip(rest, full[stop:], strict=True):
            assert torch.equal(x, fx) and torch.equal(y, fy)
        following = epoch_batches(loader, 2)
        assert len(following) == len(next_epoch)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(following, next_epoch, strict=True))


def test_host_batches_are_the_batches_before_the_device_step(rec):
    folder, _ = rec
    cfg = config(folder, num_workers=2, augment="flip")
    expected = epoch_batches(build_train_loader(cfg, 0, 1, "cpu"), 1)
    loader = build_train_loader(cfg, 0, 1, "cpu")
    loader.set_epoch(1)
    for k, (images, labels) in enumerate(loader.host_batches(), start=1):
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 112, 112)
        assert torch.equal(to_model_input(images), expected[k - 1][0])
        assert torch.equal(labels, expected[k - 1][1])
        assert loader.state_dict()["batch"] == k
    assert k == len(expected)


def test_mismatched_state_is_refused(rec):
    folder, _ = rec
    state = build_train_loader(config(folder), 0, 1, "cpu").state_dict()
    other = build_train_loader(config(folder, batch_size=4), 0, 1, "cpu")
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        other.load_state_dict(state)


def _rank_labels(rank, world, folder, workers):
    loader = build_train_loader(config(folder, num_workers=workers), rank, world, "cpu")
    return {e: [y.tolist() for _, y in epoch_batches(loader, e)] for e in (0, 1)}


@pytest.mark.parametrize("workers", [0, 1])
def test_ranks_read_disjoint_equal_shares(rec, workers):
    folder, _ = rec
    world = 2
    results = run_ranks(_rank_labels, world, folder, workers)
    for epoch in (0, 1):
        counts = {len(r[epoch]) for r in results}
        assert counts == {N // (world * 8)}  # same number of batches on every rank
        ids = [i for r in results for batch in r[epoch] for i in batch]
        assert len(ids) == len(set(ids)) == N - 8  # disjoint; 8 = 120 mod (2 ranks x 8) dropped
    assert results[0][0] != results[0][1]


def write_bad_rec(folder, bad_image_at=None, bad_label_at=None, classes=10):
    with IndexedRecordWriter(folder / "train.rec") as writer:
        write_header_record(writer, 40)
        for i in range(40):
            image = b"\xff\xd8\xffnot a jpeg" if i == bad_image_at else face_jpeg(i % PATTERNS)
            label = classes + 2 if i == bad_label_at else i % classes
            writer.write(i + 1, pack_record(float(label), image))
    write_property(folder, classes)
    return config(folder, num_classes=classes, num_image=40, data_order="random")


@pytest.mark.parametrize("kind", ["image", "label"])
def test_bad_records_name_file_and_key(tmp_path, kind):
    cfg = write_bad_rec(tmp_path, **{f"bad_{kind}_at": 16})
    loader = build_train_loader(cfg, 0, 1, "cpu")
    message = "not a decodable image" if kind == "image" else "label 12.0 is not a class in"
    with pytest.raises(RecordError, match=rf"train.rec key 17: {message}"):
        epoch_batches(loader, 0)


def test_skip_bad_records_counts_and_keeps_batches_full(tmp_path, caplog):
    cfg = write_bad_rec(tmp_path, bad_image_at=3, bad_label_at=30)
    cfg.skip_bad_records = True
    loader = build_train_loader(cfg, 0, 1, "cpu")
    with caplog.at_level(logging.WARNING):
        batches = epoch_batches(loader, 0)
    assert loader.skipped == 2 and "skipped 1 bad records" in caplog.text
    assert all(len(y) == 8 for _, y in batches)
    assert max(int(y.max()) for _, y in batches) < 10


def test_sizes_that_disagree_with_the_config(rec, caplog):
    folder, _ = rec
    with pytest.raises(RecordError, match=f"declares {N} identities but num_classes=50"):
        build_train_loader(config(folder, num_classes=50), 0, 1, "cpu")
    with caplog.at_level(logging.WARNING):
        build_train_loader(config(folder, num_classes=200, num_image=999), 0, 1, "cpu")
    assert f"declares {N} identities, config num_classes=200" in caplog.text
    assert f"holds {N} images, config num_image=999" in caplog.text


def test_sorted_rec_is_read_randomly_unless_told(tmp_path, caplog):
    folder = write_rec(tmp_path, [i // 4 for i in range(64)])
    cfg = config(folder, num_classes=16, num_image=64, data_order="auto")
    assert build_train_loader(cfg, 0, 1, "cpu").order.block == 1
    cfg.data_order = "sequential"
    with caplog.at_level(logging.WARNING):
        assert build_train_loader(cfg, 0, 1, "cpu").order.block > 1
    assert "sorted by identity" in caplog.text


def test_image_folder_and_synthetic_sources(tmp_path):
    for name, count in (("bob", 3), ("alice", 5), ("carol", 4)):
        (tmp_path / name).mkdir()
        for i in range(count):
            (tmp_path / name / f"{i}.jpg").write_bytes(face_jpeg(i))
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    cfg = config(tmp_path, num_classes=3, num_image=12, batch_size=4)
    loader = build_train_loader(cfg, 0, 1, "cpu")
    labels = sorted(i for _, y in epoch_batches(loader, 0) for i in y.tolist())
    assert labels == [0] * 5 + [1] * 3 + [2] * 4  # alice, bob, carol

    synthetic = build_train_loader(config("synthetic", num_classes=7, num_image=64), 0, 1, "cpu")
    batches = epoch_batches(synthetic, 0)
    assert len(batches) == 8 and all(x.shape == (8, 3, 112, 112) for x, _ in batches)
    assert sorted(i for _, y in batches for i in y.tolist()) == sorted(i % 7 for i in range(64))


def test_missing_dataset_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.rec/train\.idx/property"):
        build_train_loader(config(tmp_path / "nowhere"), 0, 1, "cpu")


def test_ring_buffer_waits_until_its_batch_is_copied_out():
    progress = Progress()
    ring = BatchRing((2, 3), size=2, progress=progress)
    progress.publish(1, 0)
    first, second = ring.acquire(1, 0), ring.acquire(1, 1)
    assert first.data_ptr() != second.data_ptr()
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire(1, 2)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not got  # batch 0 still holds the first buffer
    progress.publish(1, 1)
    waiter.join(5)
    assert got and got[0].data_ptr() == first.data_ptr()
    progress.publish(2, 0)  # a new pass: whatever the old one held is free
    assert ring.acquire(2, 0).data_ptr() == second.data_ptr()
