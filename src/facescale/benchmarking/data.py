"""`facescale bench data`: loader throughput against the floor of decoding the same bytes.

Builds a shuffled rec of 112x112 JPEG faces, then measures images/s of the training loader
on the CPU device (random access and sequential reading, with 0, 1, 2, ... workers; reading,
decoding, flip and normalisation to float all included) and of plain JPEG decoding in one
process per core. Each loader setting runs one epoch with the rec evicted from the page cache
(cold: reads hit the disk) and one with it cached.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import multiprocessing.pool
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HELP = "loader images/s: random vs sequential reading, 0/1/2 workers, vs the JPEG decode floor"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=16384, help="images in the test rec")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="0,1,2", help="worker counts to measure")
    parser.add_argument("--cores", type=int, default=2, help="processes of the decode floor")
    parser.add_argument("--shuffle-buffer", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per setting; best counts")
    parser.add_argument("--dir", default=None, help="where to build the rec (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def face_like(rng: np.random.Generator) -> np.ndarray:
    """A smooth 112x112 image with noise: JPEG sizes close to real aligned faces."""
    y, x = np.mgrid[0:112, 0:112] / 112.0
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


def _decode_share(share: tuple[int, int]) -> tuple[int, float]:
    from facescale.data.image import decode_image

    start = time.perf_counter()
    for jpeg in _JPEGS[share[0] : share[1]]:
        decode_image(jpeg)
    return share[1] - share[0], time.perf_counter() - start


def decode_rate(pool: mp.pool.Pool, processes: int, count: int) -> float:
    """Images/s of ``processes`` pool processes decoding one share of the images each."""
    bounds = np.linspace(0, count, processes + 1).astype(int)
    results = pool.map(_decode_share, list(itertools.pairwise(bounds)), chunksize=1)
    return sum(n / seconds for n, seconds in results)


def evict_from_page_cache(path: Path) -> None:
    """Drop this file's pages from the OS cache (only this file's), so reads go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def epoch_rate(loader: Any, epoch: int, cold: Path | None = None) -> float:
    """Images/s of one epoch, from the first batch to the last (worker start-up excluded);
    with ``cold``, that file is evicted from the page cache first."""
    if cold is not None:
        evict_from_page_cache(cold)
    loader.set_epoch(epoch)
    first = last = 0.0
    count = 0
    for images, _ in loader:
        last = time.perf_counter()
        if count == 0:
            first = last
        count += len(images)
    return (count - len(images)) / (last - first)


def make_loader(folder: Path, args: argparse.Namespace, order: str, workers: int) -> Any:
    from facescale.config import Config
    from facescale.data import build_train_loader

    cfg = Config(
        rec=str(folder),
        num_classes=args.classes,
        num_image=args.images,
        batch_size=args.batch_size,
        num_workers=workers,
        data_order=order,
        shuffle_buffer=args.shuffle_buffer,
    )
    return build_train_loader(cfg, 0, 1, "cpu")


def measure(folder: Path, jpegs: list[bytes], args: argparse.Namespace) -> dict[str, float]:
    """Best rate of each setting over ``repeats`` rounds; a round measures every setting once,
    so a burst of load from other processes hits one round, not one setting."""
    workers = [int(w) for w in args.workers.split(",")]
    loaders = {
        f"{order}_{w}_workers": make_loader(folder, args, order, w)
        for order in ("random", "sequential")
        for w in workers
    }
    best: dict[str, float] = {}
    pools = {n: mp.Pool(n, _keep_jpegs, (jpegs,)) for n in sorted({1, args.cores})}
    try:
        for pool in pools.values():
            pool.map(_decode_share, [(0, 64)] * len(pool._pool))  # warm every process
        for epoch in range(args.repeats):
            rates = {f"decode_{n}_cores": decode_rate(p, n, len(jpegs)) for n, p in pools.items()}
            for name, loader in loaders.items():
                rates[f"{name}_cold"] = epoch_rate(loader, 2 * epoch, folder / "train.rec")
                rates[f"{name}_cached"] = epoch_rate(loader, 2 * epoch + 1)
            best = {k: max(v, best.get(k, 0.0)) for k, v in rates.items()}
    finally:
        for pool in pools.values():
            pool.terminate()
    return best


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # the loop that normalises batches: one core, like a decoder
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        jpegs = build_rec(Path(tmp), args.images, args.classes)
        rates = measure(Path(tmp), jpegs, args)
    floor = rates[f"decode_{args.cores}_cores"]
    workers = args.workers.split(",")
    top = max(workers, key=int)
    result = {
        "images": args.images,
        "mean_jpeg_bytes": round(sum(map(len, jpegs)) / len(jpegs)),
        "batch_size": args.batch_size,
        "images_per_s": {k: round(v) for k, v in rates.items()},
        f"sequential_{top}_workers_vs_{args.cores}_core_decode": {
            cache: round(rates[f"sequential_{top}_workers_{cache}"] / floor, 3)
            for cache in ("cold", "cached")
        },
        "random_vs_sequential_cold": {
            w: round(rates[f"random_{w}_workers_cold"] / rates[f"sequential_{w}_workers_cold"], 3)
            for w in workers
        },
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
