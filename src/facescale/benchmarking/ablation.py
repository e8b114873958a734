"""The small-data ablation: every variant of a recipe trains for the same time budget on the
CFP training people and is verified on the kept pairs of the test people, so each choice is
judged by what the same minutes buy (`benchmarks/cfp_ablation.py` runs it)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from facescale.config import load_config
from facescale.data.sources import RecordSource
from facescale.demo.pipeline import read_metrics
from facescale.errors import InputError
from facescale.eval import VerificationSet, evaluate_verification, load_verification_set
from facescale.export import load_backbone
from facescale.launch import torchrun_command

# The demo recipe (configs/demo.py), the small-data recipe (configs/small_real.py: the demo's
# with mbf_small, random_crop=0.2 and ema_decay=0.999) and one change each against the demo recipe;
# `run_ablation` also takes any config with changes (:func:`variant`).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo": ("demo", ()),
    "small_real": ("small_real", ()),
    "random_crop": ("demo", ("random_crop=0.1",)),
    "arcface": ("demo", ("loss=arcface", "margin_list=(1.0,0.5,0.0)")),
    "scale64": ("demo", ("scale=64",)),
    "embedding512": ("demo", ("embedding_size=512",)),
    "strong_augment": ("demo", ("augment=strong",)),
    "no_sampling": ("demo", ("sample_rate=1.0",)),
    "batch64": ("demo", ("batch_size=64",)),
    "lr0.05": ("demo", ("lr=0.05",)),
    "adamw": ("demo", ("optimizer=adamw", "lr=0.001", "weight_decay=0.05")),
    "r18": ("demo", ("network=r18",)),
    "mbf_small": ("demo", ("network=mbf_small",)),
}
# The official protocol's pairs files hold the folds kept by `benchmarks/cfp_split.py`: 2.
OFFICIAL_FOLDS = 2


def variant(name: str) -> tuple[str, tuple[str, ...]] | None:
    """The config and overrides of variant ``name``: one of :data:`VARIANTS`, or a config
    with changes, ``CONFIG+KEY=VALUE+KEY=VALUE...`` (such as ``small_real+dropout=0.2``);
    None for neither."""
    if name in VARIANTS:
        return VARIANTS[name]
    config, *changes = name.split("+")
    return (config, tuple(changes)) if changes and all("=" in c for c in changes) else None


def train_variant(
    config: str, overrides: Sequence[str], train: Path, output: Path, budget: str, ranks: int
) -> float:
    """Train ``config`` with ``overrides`` on ``train`` for ``budget`` into ``output``; the
    seconds it took (the budget, plus start-up, the final checkpoint and evaluation)."""
    sets = [
        f"rec={train}",
        f"output={output}",
        f"time_budget={budget}",
        "val_targets=[]",  # verified afterwards, on every pairs file
        "checkpoint_every=0",
        *overrides,
    ]
    started = time.perf_counter()
    command = torchrun_command(ranks, ["train", config, "--set", *sets])
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "console.log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise InputError(f"training {output.name} failed; its output: {log.name}")
    return time.perf_counter() - started


def verify(
    model: Path, network: str, embedding_size: int, sets: Sequence[VerificationSet]
) -> dict[str, dict[str, float]]:
    """10-fold accuracy (2 folds for the official protocol's pairs) on each set."""
    backbone = load_backbone(network, str(model), embedding_size)
    results = {}
    for vset in sets:
        folds = OFFICIAL_FOLDS if "official" in vset.name else 10
        result = evaluate_verification(backbone, vset, folds=folds)
        results[vset.name] = {"accuracy": result.accuracy, "std": result.std, "folds": folds}
    return results


def training_counts(train: Path) -> tuple[int, int]:
    """The identities and images of a training set's records (its ``property`` and index)."""
    source = RecordSource(train / "train.rec", 1)
    try:
        classes, images = source.declared_classes(), len(source)
    finally:
        source.file.close()
    if classes is None:
        raise InputError(f"{train}: no property file or header record to count identities by")
    return classes, images


def run_ablation(
    names: Sequence[str],
    train: Path,
    pairs: Sequence[Path],
    budget: str,
    output: Path,
    ranks: int = 2,
    align: bool = False,
) -> list[dict[str, Any]]:
    """Train each variant in ``names`` in turn on the records in ``train`` (all their
    identities and images) and verify it; a row of figures per variant. With ``align`` the
    pairs' faces are aligned by found landmarks, as the training set's were."""
    variants = {name: variant(name) for name in names}
    unknown = [name for name, found in variants.items() if found is None]
    if unknown:
        raise InputError(
            f"unknown variants {unknown}; known: {', '.join(VARIANTS)}, or CONFIG+KEY=VALUE..."
        )
    num_classes, num_image = training_counts(train)
    sets = [load_verification_set(path, align) for path in pairs]  # decoded once, for every run
    rows = []
    for name, (config, changes) in variants.items():
        overrides = [f"num_classes={num_classes}", f"num_image={num_image}", *changes]
        cfg = load_config(config, [*overrides, f"rec={train}"])
        seconds = train_variant(config, overrides, train, output / name, budget, ranks)
        reports = [r for r in read_metrics(output / name) if "samples_per_s" in r]
        steps = reports[-1]["step"] if reports else 0
        rows.append(
            {
                "variant": name,
                "config": config,
                "overrides": list(changes),
                "seconds": seconds,
                "steps": steps,
                "epochs": steps / cfg.schedule(world_size=ranks).steps_per_epoch,
                "samples_per_s": sum(r["samples_per_s"] for r in reports) / max(len(reports), 1),
                "verification": verify(
                    output / name / "model.pt", cfg.network, cfg.embedding_size, sets
                ),
            }
        )
    return rows
