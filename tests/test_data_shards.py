"""WebDataset shards: the converters' output, and the shard source read from a local folder
and from a real HTTP server on the loopback address, giving the batches the same data gives as
a .rec (the same split over ranks, the same exact resume)."""

import io
import itertools
import json
import logging
import subprocess
import threading
from contextlib import contextmanager
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from data_helpers import face_jpeg, write_rec

from facescale.cli import main
from facescale.config import Config
from facescale.data import build_train_loader, remote
from facescale.data.convert import folder_to_shards, rec_to_shards
from facescale.data.recordio import RecordError
from facescale.data.shard_format import MANIFEST

N = 120
SHARD_SIZE = 13  # 120 samples: nine shards of 13 and one of 3


def config(rec, **kw) -> Config:
    values = dict(
        rec=rec,
        num_classes=N,
        num_image=N,
        batch_size=8,
        num_workers=0,
        shuffle_buffer=32,
        augment="flip",
        data_order="sequential",
        seed=3,
    )
    values.update(kw)
    return Config(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A rec whose record i has the unique label i (shuffled file order), and its shards."""
    root = tmp_path_factory.mktemp("shards")
    labels = np.random.default_rng(0).permutation(N).astype(float)
    rec = write_rec(root / "rec", labels, classes=N)
    rec_to_shards(rec, root / "shards", SHARD_SIZE, progress=False)
    return rec, root / "shards"


class RangeHandler(SimpleHTTPRequestHandler):
    """Serves a folder with HTTP ranges (as object stores do); ``fail`` maps a file name to
    the number of requests for it still to answer with 503."""

    fail: ClassVar[dict[str, int]] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE)
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        data = path.read_bytes()
        wanted = self.headers.get("Range")
        status = HTTPStatus.OK
        if wanted:
            start, end = wanted.removeprefix("bytes=").split("-")
            data, status = data[int(start) : int(end) + 1], HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()


@contextmanager
def http_server(folder: Path, fail: dict[str, int] | None = None):
    """A ThreadingHTTPServer on 127.0.0.1 serving ``folder``; its base URL; stopped on exit."""
    handler = type("Handler", (RangeHandler,), {"fail": dict(fail or {})})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same(batches, expected):
    assert len(batches) == len(expected)
    for (x, y), (ex, ey) in zip(batches, expected, strict=True):
        assert torch.equal(y, ey) and torch.equal(x, ex)


def test_shards_are_plain_tars_that_webdataset_reads(data):
    _, shards = data
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["samples"] == N and manifest["classes"] == N
    counts = [s["samples"] for s in manifest["shards"]]
    assert counts == [SHARD_SIZE] * 9 + [3]
    listing = subprocess.run(
        ["tar", "-tf", str(shards / "train-000001.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing[:2] == ["000013.jpg", "000013.cls"] and len(listing) == 2 * SHARD_SIZE
    wds = pytest.importorskip("webdataset")
    urls = [str(shards / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).to_tuple("jpg", "cls"))
    labels = np.random.default_rng(0).permutation(N)
    assert [int(c) for _, c in samples] == labels.tolist()  # the rec's file order
    assert samples[5][0] == face_jpeg(5 % 24)  # image bytes unchanged


@pytest.mark.parametrize("order, workers", [("sequential", 0), ("sequential", 2), ("random", 0)])
def test_shards_give_the_batches_of_the_rec(data, order, workers):
    rec, shards = data
    cfg = config(str(rec), data_order=order, num_workers=workers)
    expected = epoch_batches(build_train_loader(cfg, 0, 1, "cpu"), 1)
    cfg = config(str(shards), data_order=order, num_workers=workers)
    assert_same(epoch_batches(build_train_loader(cfg, 0, 1, "cpu"), 1), expected)


def test_every_way_to_name_the_shards_reads_the_same(data, tmp_path):
    rec, shards = data
    expected = epoch_batches(build_train_loader(config(str(rec)), 0, 1, "cpu"), 0)
    names = [str(shards / f"train-{i:06d}.tar") for i in range(10)]
    for spec in (str(shards / MANIFEST), str(shards / "train-{000000..000009}.tar"), names):
        assert_same(epoch_batches(build_train_loader(config(spec), 0, 1, "cpu"), 0), expected)
    bare = tmp_path / "bare"  # shards from another tool: no manifest, no index
    bare.mkdir()
    for name in names:
        (bare / Path(name).name).write_bytes(Path(name).read_bytes())
    loader = build_train_loader(config(str(bare / "train-{000000..000009}.tar")), 0, 1, "cpu")
    assert_same(epoch_batches(loader, 0), expected)


def test_shards_over_http_read_as_locally(data):
    _, shards = data
    cfg = config(str(shards), num_workers=2)
    expected = epoch_batches(build_train_loader(cfg, 0, 1, "cpu"), 2)
    with http_server(shards) as url:
        for spec in (url, url + "train-{000000..000009}.tar"):
            cfg = config(spec, num_workers=2)
            assert_same(epoch_batches(build_train_loader(cfg, 0, 1, "cpu"), 2), expected)


def test_a_server_without_ranges_still_serves_the_shards(data, caplog):
    _, shards = data
    expected = epoch_batches(build_train_loader(config(str(shards)), 0, 1, "cpu"), 0)
    handler = partial(SimpleHTTPRequestHandler, directory=str(shards))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        with caplog.at_level(logging.WARNING):
            assert_same(epoch_batches(build_train_loader(config(url), 0, 1, "cpu"), 0), expected)
    finally:
        server.shutdown()
        server.server_close()
    assert "ignores ranged requests" in caplog.text


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_equal_shares_of_uneven_shards(data, world):
    _, shards = data
    for epoch in (0, 1):
        per_rank = [
            [
                i
                for _, y in epoch_batches(
                    build_train_loader(config(str(shards)), r, world, "cpu"), epoch
                )
                for i in y.tolist()
            ]
            for r in range(world)
        ]
        assert {len(ids) for ids in per_rank} == {N // (world * 8) * 8}
        ids = [i for rank in per_rank for i in rank]
        assert len(ids) == len(set(ids)) == N - N % (world * 8)  # only the remainder is left


@pytest.mark.parametrize("workers, resume_workers, stop", [(0, 2, 4), (2, 0, 9)])
def test_resume_mid_epoch_yields_exactly_the_rest(data, workers, resume_workers, stop):
    _, shards = data
    cfg = config(str(shards), num_workers=workers)
    reference = build_train_loader(cfg, 0, 1, "cpu")
    full, following = epoch_batches(reference, 1), epoch_batches(reference, 2)
    interrupted = build_train_loader(cfg, 0, 1, "cpu")
    interrupted.set_epoch(1)
    for _ in itertools.islice(iter(interrupted), stop):
        pass
    buf = io.BytesIO()
    torch.save(interrupted.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = build_train_loader(config(str(shards), num_workers=resume_workers), 0, 1, "cpu")
    resumed.load_state_dict(state)
    assert_same(epoch_batches(resumed, 1), full[stop:])
    assert_same(epoch_batches(resumed, 2), following)


def test_resume_on_another_number_of_ranks_reads_the_rest_of_the_new_order(data):
    """As a checkpoint does when the world changed: the new order from the same batch on."""
    _, shards = data
    saved = build_train_loader(config(str(shards)), 0, 2, "cpu")
    saved.set_epoch(1)
    for _ in itertools.islice(iter(saved), 2):
        pass
    position = {k: saved.state_dict()[k] for k in ("epoch", "batch")}
    whole = epoch_batches(build_train_loader(config(str(shards)), 0, 3, "cpu"), 1)
    resumed = build_train_loader(config(str(shards)), 0, 3, "cpu")
    resumed.load_state_dict(resumed.state_dict() | position)
    assert_same(epoch_batches(resumed, 1), whole[2:])


def corrupt_image(shards: Path, shard: str, member: str) -> None:
    """Overwrite the first bytes of ``member``'s data inside the tar ``shard``."""
    import tarfile

    with tarfile.open(shards / shard) as tar:
        offset = tar.getmember(member).offset_data
    with open(shards / shard, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * 64)


def test_corrupt_sample_is_named_and_can_be_skipped(data, tmp_path, caplog):
    _, shards = data
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    corrupt_image(copy, "train-000002.tar", "000030.jpg")
    loader = build_train_loader(config(str(copy)), 0, 1, "cpu")
    with pytest.raises(RecordError, match=r"train-000002\.tar member 000030\.jpg: not a decodable"):
        epoch_batches(loader, 0)
    skipping = build_train_loader(config(str(copy), skip_bad_records=True), 0, 1, "cpu")
    with caplog.at_level(logging.WARNING):
        batches = epoch_batches(skipping, 0)
    assert skipping.skipped == 1 and "000030.jpg" in caplog.text
    assert all(len(y) == 8 for _, y in batches)


def test_failed_downloads_are_retried_then_named(data, monkeypatch, caplog):
    _, shards = data
    monkeypatch.setattr(remote, "FIRST_PAUSE_S", 0.01)
    expected = epoch_batches(build_train_loader(config(str(shards)), 0, 1, "cpu"), 0)
    flaky = {"train-000004.tar": 2, "train-000004.idx": 1}
    with caplog.at_level(logging.WARNING), http_server(shards, flaky) as url:
        assert_same(epoch_batches(build_train_loader(config(url), 0, 1, "cpu"), 0), expected)
    assert "train-000004.tar: reading bytes" in caplog.text and "trying again" in caplog.text
    broken = {"train-000007.tar": remote.ATTEMPTS}
    with http_server(shards, broken) as url:
        with pytest.raises(
            RecordError, match=r"train-000007\.tar: reading bytes .* failed 4 times"
        ):
            epoch_batches(build_train_loader(config(url), 0, 1, "cpu"), 0)
        with pytest.raises(RecordError, match=r"train-000099\.tar: not found"):
            build_train_loader(config(url + "train-000099.tar"), 0, 1, "cpu")


def test_folder_to_shards_shuffled_and_the_cli(tmp_path, capsys):
    for c in range(3):
        (tmp_path / "faces" / f"id{c}").mkdir(parents=True)
        for i in range(4):
            (tmp_path / "faces" / f"id{c}" / f"{i}.jpg").write_bytes(face_jpeg(4 * c + i))
    report = folder_to_shards(tmp_path / "faces", tmp_path / "plain", 5, progress=False)
    assert (report.images, report.classes, report.shards) == (12, 3, 3)
    argv = ["convert", "folder2shards", str(tmp_path / "faces"), str(tmp_path / "mixed")]
    with pytest.raises(SystemExit) as done:
        main([*argv, "--shard-size", "5", "--shuffle", "--seed", "1", "--json", "--no-progress"])
    assert done.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["shards"] == 3 and printed["images"] == 12
    manifest = json.loads((tmp_path / "mixed" / MANIFEST).read_text())
    assert manifest["shuffled"] and manifest["classes"] == 3

    def labels(folder):
        cfg = config(str(folder), num_classes=3, num_image=12, batch_size=4, data_order="random")
        source = build_train_loader(cfg, 0, 1, "cpu").maker.source
        return [source.parse(p, raw)[0] for p, raw in enumerate(source.fetch(np.arange(12)))]

    assert labels(tmp_path / "plain") == [0] * 4 + [1] * 4 + [2] * 4
    mixed = labels(tmp_path / "mixed")
    assert sorted(mixed) == labels(tmp_path / "plain") and mixed != sorted(mixed)


def tar_bytes(members, tar_format) -> bytes:
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


LONG = "a" * 120 + "/"  # too long for a ustar name: pax and GNU write extra headers


@pytest.mark.parametrize(
    "tar_format, folder",
    [("ustar", ""), ("ustar", "some/folder/"), ("gnu", ""), ("gnu", LONG), ("pax", LONG)],
)
def test_sample_parsing_matches_tarfile(tar_format, folder):
    """The direct header reader against tarfile, the reference, for every common tar format
    (names too long for ustar go through the reference)."""
    import tarfile

    from facescale.data.shard_format import members_by_tarfile, sample_members

    kind = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    data = tar_bytes(
        [(f"{folder}000007.jpg", face_jpeg(1)), (f"{folder}000007.cls", b"42")], kind[tar_format]
    )
    data = data[: len(data) - 1024]  # a sample inside a shard has no end-of-archive blocks
    members = sample_members(data, "x")
    assert members == members_by_tarfile(data, "x")
    assert members["cls"] == (f"{folder}000007.cls", b"42")
    damaged = bytearray(data)
    damaged[600:700] = bytes(100)  # inside the image: parsed the same, decoding fails later
    assert sample_members(bytes(damaged), "x") == members_by_tarfile(bytes(damaged), "x")
    damaged[257] ^= 0xFF  # no ustar magic: read by tarfile, whose checksum fails
    with pytest.raises(RecordError, match="x: not a readable tar sample"):
        sample_members(bytes(damaged), "x")
