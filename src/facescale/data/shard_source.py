"""WebDataset shards as a training source: samples numbered shard after shard.

``rec`` names the shards as a brace pattern (``/data/train-{000000..000999}.tar``), a list of
shard addresses, a ``manifest.json``, or a folder (or URL ending in ``/``) holding one. Counts
and byte offsets come from the manifest and the shards' ``.idx`` files; shards without them are
indexed once by reading their headers (every byte, for a remote shard). Position ``p`` is
member ``p - start[s]`` of shard ``s``, so the loader's order, split and resume work on shards
as on a ``.rec``; a run of consecutive positions in one shard is one ranged read.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facescale.data import remote
from facescale.data.recordio import RecordError
from facescale.data.shard_format import (
    MANIFEST,
    MANIFEST_FORMAT,
    read_index,
    sample_image,
    sample_label,
    sample_members,
    scan_bounds,
)
from facescale.data.sources import SORTED_PROBE, decode_face
from facescale.errors import UserError
from facescale.extras import require

log = logging.getLogger(__name__)


@dataclass
class Shard:
    """One tar shard: where it is, its sample count, and where its index is (or its bounds)."""

    url: str
    samples: int
    index_url: str | None = None
    bounds: np.ndarray | None = None


def is_shard_spec(rec: str | list[str]) -> bool:
    """Whether ``rec`` names shards rather than a .rec, an image folder or synthetic data."""
    if isinstance(rec, list):
        return True
    if "://" in rec or rec.endswith(MANIFEST) or "{" in rec or rec.endswith(".tar"):
        return True
    return Path(rec, MANIFEST).is_file()


def expand(pattern: str) -> list[str]:
    """The addresses a brace pattern names (``{000..099}``, ``{a,b}``), in order."""
    if "{" not in pattern:
        return [pattern]
    require("shards", "braceexpand")
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def find_shards(rec: str | list[str]) -> tuple[list[Shard], int | None]:
    """The shards ``rec`` names, with counts, and the classes their manifest declares."""
    if isinstance(rec, str) and not rec.endswith(".tar") and "{" not in rec:
        manifest_url = rec if rec.endswith(MANIFEST) else posixpath.join(rec, MANIFEST)
        manifest = read_manifest(manifest_url)
        base = posixpath.dirname(manifest_url)
        return [_listed(base, entry) for entry in manifest["shards"]], manifest["classes"]
    urls = [u for item in ([rec] if isinstance(rec, str) else rec) for u in expand(item)]
    if not urls:
        raise UserError("rec names no shards: give a pattern, a list or a manifest.json")
    base = posixpath.dirname(urls[0])
    manifest_url = posixpath.join(base, MANIFEST)
    manifest = read_manifest(manifest_url) if remote.exists(manifest_url) else None
    listed = {e["name"]: e for e in manifest["shards"]} if manifest else {}
    shards = []
    for url in urls:
        name = posixpath.basename(url)
        if posixpath.dirname(url) == base and name in listed:
            shards.append(_listed(base, listed[name]))
        else:
            shards.append(scan_shard(url))
    return shards, manifest["classes"] if manifest else None


def read_manifest(url: str) -> dict[str, Any]:
    text = remote.read_all(url)
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise RecordError(f"{url}: not a JSON manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise RecordError(
            f"{url}: not a facescale shard manifest (format {MANIFEST_FORMAT!r}); name the shards "
            f"with a pattern instead, and they are indexed by reading them"
        )
    missing = {"shards", "classes"} - set(manifest)
    if missing:
        raise RecordError(f"{url}: the manifest lacks {', '.join(sorted(missing))}")
    return manifest


def _listed(base: str, entry: dict[str, Any]) -> Shard:
    return Shard(
        posixpath.join(base, entry["name"]), entry["samples"], posixpath.join(base, entry["index"])
    )


def scan_shard(url: str) -> Shard:
    """Index a shard that has no manifest entry by reading its member headers."""
    if remote.is_local(url):
        with remote.open_file(url) as file:
            bounds = scan_bounds(file, stream=False)
    else:
        log.warning("%s has no manifest entry: reading all of it to index it", url)
        bounds = scan_bounds(io.BytesIO(remote.read_all(url)), stream=True)
    return Shard(url, len(bounds) - 1, bounds=bounds)


class ShardSource:
    """The samples of tar shards in the order given: the loader's Source for shards."""

    def __init__(self, rec: str | list[str], num_classes: int) -> None:
        self.rec = rec
        self.shards, self._declared = find_shards(rec)
        counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.starts[-1])

    def describe(self) -> str:
        rec = self.rec if isinstance(self.rec, str) else f"{self.rec[0]}, ..."
        return f"{rec} ({len(self.shards)} shards)"

    def declared_classes(self) -> int | None:
        return self._declared

    def _bounds(self, number: int) -> np.ndarray:
        shard = self.shards[number]
        if shard.bounds is None:
            assert shard.index_url is not None
            data = remote.read_all(shard.index_url)
            shard.bounds = read_index(data, shard.samples, shard.index_url)
        return shard.bounds

    def locate(self, position: int) -> tuple[Shard, int]:
        """The shard of ``position`` and the sample's number inside it."""
        number = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.shards[number], position - int(self.starts[number])

    def fetch(self, positions: np.ndarray) -> list[bytes]:
        """Tar bytes of each sample of ``positions``: one ranged read per run of consecutive
        samples of one shard."""
        positions = np.asarray(positions)
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        shard_of = np.searchsorted(self.starts, ordered, side="right") - 1
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(shard_of) != 0)) + 1
        out: list[Any] = [None] * len(positions)
        for run in np.split(np.arange(len(order)), breaks):
            number = int(shard_of[run[0]])
            bounds = self._bounds(number)
            first = int(ordered[run[0]] - self.starts[number])
            edges = (bounds[first : first + len(run) + 1] - bounds[first]).tolist()
            base = int(bounds[first])
            chunk = remote.read_range(self.shards[number].url, base, base + edges[-1])
            for k, i in enumerate(order[run].tolist()):
                out[i] = chunk[edges[k] : edges[k + 1]]
        return out

    def parse(self, position: int, raw: bytes) -> tuple[int, np.ndarray]:
        shard, member = self.locate(position)
        where = f"{shard.url} sample {member}"
        members = sample_members(raw, where)
        label = sample_label(members, where, self.num_classes)
        name, image = sample_image(members, where)
        return label, decode_face(image, f"{shard.url} member {name}")

    def looks_sorted(self) -> bool:
        """True when the first samples' labels never decrease: shards sorted by identity."""
        positions = np.arange(min(SORTED_PROBE, len(self)))
        labels = []
        for raw in self.fetch(positions):
            try:
                labels.append(sample_label(sample_members(raw, ""), "", self.num_classes))
            except RecordError:
                continue
        return len(labels) > 1 and bool(np.all(np.diff(labels) >= 0))
