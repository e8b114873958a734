"""`facescale bench data`: loader throughput against the floor of decoding the same bytes.

Builds a shuffled rec of 112x112 JPEG faces, then measures images/s of the training loader
on the CPU device (random access and sequential reading, with 0, 1, 2, ... workers; reading,
decoding, flip and normalisation to float all included) and of plain JPEG decoding in one
process per core. Each loader setting runs an epoch with the rec evicted from the page cache
(cold: reads hit the disk) and one with it cached. CPU seconds per image (main process and
workers together, read from /proc) are reported too: unlike images/s they move little when
other processes share the machine.

The same images are also written as WebDataset shards and read by the shard source from the
local folder (cold and cached) and over HTTP from a server on the loopback address, sequential
reading with the most workers.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import itertools
import multiprocessing as mp
import multiprocessing.pool
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from facescale.benchmarking import print_report

HELP = (
    "loader images/s: random vs sequential reading, 0/1/2 workers, rec and shards (local, "
    "HTTP), vs the JPEG decode floor"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=16384, help="images in the test rec")
    parser.add_argument("--classes", type=int, default=1000, help="identities in the test rec")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to measure")
    parser.add_argument("--cores", type=int, default=2, help="processes of the decode floor")
    parser.add_argument(
        "--shuffle-buffer", type=int, default=4096, help="records the loader shuffles among"
    )
    parser.add_argument("--shard-size", type=int, default=2048, help="images per shard")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best round counts")
    parser.add_argument("--dir", default=None, help="where to build the rec (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def face_like(rng: np.random.Generator) -> np.ndarray:
    """A smooth face-sized image with noise: JPEG sizes close to real aligned faces."""
    from facescale.face import FACE_SIZE

    y, x = np.mgrid[0:FACE_SIZE, 0:FACE_SIZE] / FACE_SIZE
    base = np.stack(
        [np.sin(x * rng.uniform(2, 9) + c) * np.cos(y * rng.uniform(2, 9)) for c in range(3)], -1
    )
    noisy = 128 + 90 * base + rng.normal(0, 3, base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def build_rec(folder: Path, images: int, classes: int) -> list[bytes]:
    """Write a shuffled InsightFace-layout rec of synthetic JPEG faces; return the JPEG bytes."""
    from facescale.data.image import encode_jpeg
    from facescale.data.recordio import IndexedRecordWriter
    from facescale.data.records import pack_record, write_header_record, write_property

    rng = np.random.default_rng(0)
    jpegs = [encode_jpeg(face_like(rng)) for _ in range(images)]
    labels = rng.integers(0, classes, images)
    with IndexedRecordWriter(folder / "train.rec") as writer:
        write_header_record(writer, images)
        for key, (jpeg, label) in enumerate(zip(jpegs, labels, strict=True), start=1):
            writer.write(key, pack_record(float(label), jpeg, id=key))
    write_property(folder, classes)
    return jpegs


_JPEGS: list[bytes] = []


def _keep_jpegs(jpegs: list[bytes]) -> None:
    _JPEGS[:] = jpegs


def _decode_share(share: tuple[int, int]) -> tuple[int, float, float]:
    """Decode images ``[start, end)``; return their count, wall seconds and CPU seconds."""
    from facescale.data.image import decode_image

    start, cpu = time.perf_counter(), time.process_time()
    for jpeg in _JPEGS[share[0] : share[1]]:
        decode_image(jpeg)
    return share[1] - share[0], time.perf_counter() - start, time.process_time() - cpu


def decode_rate(pool: mp.pool.Pool, processes: int, count: int) -> tuple[float, float]:
    """Images/s of ``processes`` pool processes decoding a share each, and CPU s/image."""
    bounds = np.linspace(0, count, processes + 1).astype(int)
    results = pool.map(_decode_share, list(itertools.pairwise(bounds)), chunksize=1)
    return sum(n / wall for n, wall, _ in results), sum(cpu for *_, cpu in results) / count


def cpu_seconds(skip: set[int]) -> float:
    """CPU time so far of this process and its live child processes but ``skip`` (Linux)."""
    total = time.process_time()
    for child in mp.active_children():
        if child.pid not in skip:
            stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def evict_from_page_cache(path: Path) -> None:
    """Drop this file's pages from the OS cache (only this file's), so reads go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def loader_epoch(
    rec: str,
    files: list[Path],
    args: argparse.Namespace,
    setting: tuple[str, int, str, str],
    skip: set[int],
) -> tuple[float, float]:
    """One epoch of a fresh loader of ``rec``, from its first batch to its last (worker
    start-up left out): images/s, and CPU s/image of the main process and the workers together.

    ``setting`` is (order, workers, cache, output): cache 'cold' evicts ``files`` from the page
    cache first; output 'host' takes the uint8 batches the workers deliver (what a GPU run
    copies to the device), 'float' the float32 batches of a CPU run.
    """
    from facescale.config import Config
    from facescale.data import build_train_loader

    order, workers, cache, output = setting
    cfg = Config(
        rec=rec,
        num_classes=args.classes,
        num_image=args.images,
        batch_size=args.batch_size,
        num_workers=workers,
        data_order=order,
        shuffle_buffer=args.shuffle_buffer,
    )
    if cache == "cold":
        for path in files:
            evict_from_page_cache(path)
    loader = build_train_loader(cfg, 0, 1, "cpu")
    first = last = cpu = 0.0
    count = 0
    for images, _ in loader.host_batches() if output == "host" else loader:
        last = time.perf_counter()
        if count == 0:
            first, cpu = last, cpu_seconds(skip)
        count += len(images)
    cpu = cpu_seconds(skip) - cpu
    loader.close()
    return (count - len(images)) / (last - first), cpu / (count - len(images))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP ranges, as object stores do, and logs nothing."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        wanted = self.headers.get("Range")
        if not wanted or not path.is_file():
            super().do_GET()
            return
        start, end = (int(v) for v in wanted.removeprefix("bytes=").split("-"))
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end + 1 - start)
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving ``folder`` while the block runs; its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def measure(
    folder: Path, jpegs: list[bytes], args: argparse.Namespace, shards_url: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Best images/s and least CPU s/image of each setting over ``repeats`` rounds; a round
    measures every setting once, so a burst of load from other processes hits one round."""
    workers = [int(w) for w in args.workers.split(",")]
    rec = (str(folder), [folder / "train.rec"])
    shards = (str(folder / "shards"), sorted((folder / "shards").glob("*.tar")))
    top = ("sequential", max(workers))
    runs = [
        ("{}_{}_workers_{}_{}", rec, (order, w, cache, "host"))
        for order in ("random", "sequential")
        for w in workers
        for cache in ("cold", "cached")
    ]
    runs.append(("{}_{}_workers_{}_{}", rec, (*top, "cached", "float")))
    runs += [
        ("shards_local_{1}_workers_{2}_{3}", shards, (*top, c, "host")) for c in ("cold", "cached")
    ]
    runs.append(("shards_http_{1}_workers_{2}_{3}", (shards_url, []), (*top, "cached", "host")))
    rates: dict[str, float] = {}
    cpus: dict[str, float] = {}

    def keep(name: str, rate: float, cpu: float) -> None:
        rates[name] = max(rate, rates.get(name, 0.0))
        cpus[name] = min(cpu, cpus.get(name, float("inf")))

    pools = {n: mp.Pool(n, _keep_jpegs, (jpegs,)) for n in sorted({1, args.cores})}
    try:
        for n, pool in pools.items():
            pool.map(_decode_share, [(0, 64)] * n)  # start and warm every process
        for _ in range(args.repeats):
            for n, pool in pools.items():
                keep(f"decode_{n}_cores", *decode_rate(pool, n, len(jpegs)))
            pool_pids = {p.pid for pool in pools.values() for p in pool._pool}
            for name, (spec, files), setting in runs:
                keep(name.format(*setting), *loader_epoch(spec, files, args, setting, pool_pids))
    finally:
        for pool in pools.values():
            pool.terminate()
    return rates, cpus


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # the loop that normalises batches: one core, like a decoder
    load_before = os.getloadavg()[0]
    from facescale.data.convert import rec_to_shards

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        jpegs = build_rec(Path(tmp), args.images, args.classes)
        rec_to_shards(tmp, Path(tmp) / "shards", args.shard_size, progress=False)
        with serve_folder(Path(tmp) / "shards") as url:
            rates, cpus = measure(Path(tmp), jpegs, args, url)
    floor = rates[f"decode_{args.cores}_cores"]
    shard_rates = {k: rates.pop(k) for k in list(rates) if k.startswith("shards_")}
    shard_cpus = {k: cpus.pop(k) for k in list(cpus) if k.startswith("shards_")}
    workers = args.workers.split(",")
    top = f"sequential_{max(workers, key=int)}_workers"
    result = {
        "images": args.images,
        "mean_jpeg_bytes": round(sum(map(len, jpegs)) / len(jpegs)),
        "batch_size": args.batch_size,
        "images_per_s": {k: round(v) for k, v in rates.items()},
        "cpu_us_per_image": {k: round(v * 1e6, 1) for k, v in cpus.items()},
        f"{top}_vs_{args.cores}_core_decode": {
            out: round(rates[f"{top}_{out}"] / floor, 3)
            for out in ("cold_host", "cached_host", "cached_float")
        },
        f"decode_cpu_vs_{top}_cpu": {
            out: round(cpus["decode_1_cores"] / cpus[f"{top}_{out}"], 3)
            for out in ("cold_host", "cached_host", "cached_float")
        },
        "random_vs_sequential_cold": {
            w: round(
                rates[f"random_{w}_workers_cold_host"] / rates[f"sequential_{w}_workers_cold_host"],
                3,
            )
            for w in workers
        },
        "shards_images_per_s": {k: round(v) for k, v in shard_rates.items()},
        "shards_cpu_us_per_image": {k: round(v * 1e6, 1) for k, v in shard_cpus.items()},
        f"shards_vs_{args.cores}_core_decode": {
            k.removeprefix("shards_"): round(v / floor, 3) for k, v in shard_rates.items()
        },
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print_report(result, args.json)
    return 0
