"""The whole demo job: data -> training on N ranks -> held-out verification -> ONNX -> summary.

Without the ``onnx`` extra the ONNX stage is skipped with a note (said before training starts)
and the summary is printed all the same.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, TextIO

from facescale.config import load_config, resolve_path
from facescale.demo.dataset import HELDOUT_NAME, make_demo_data
from facescale.extras import available, install_hint
from facescale.launch import torchrun_command

DEMO_CONFIG = "demo"


def read_metrics(output: Path) -> list[dict[str, Any]]:
    """The records a training run wrote to ``metrics.jsonl``."""
    path = output / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], path: Path) -> Path:
    """Loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("facescale demo: loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def train_command(ranks: int, overrides: list[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node=RANKS -m facescale train demo --set ...``."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return torchrun_command(ranks, ["train", str(resolve_path(DEMO_CONFIG)), *sets])


def run_training(ranks: int, overrides: list[str], stdout: TextIO | None = None) -> None:
    """Train the demo config on ``ranks`` processes, their output to ``stdout`` (None: ours);
    raises if the job fails."""
    print(f"[2/4] training on {ranks} ranks: {' '.join(train_command(ranks, overrides))}")
    subprocess.run(train_command(ranks, overrides), check=True, stdout=stdout)


def export_and_check(network: str, embedding_size: int, output: Path) -> tuple[Path, float]:
    """``model.onnx`` from the trained ``model.pt``, and its largest relative difference from
    PyTorch."""
    from facescale.export import compare_onnx, export_onnx, load_backbone

    model = load_backbone(network, output / "model.pt", embedding_size)
    path = export_onnx(model, output / "model.onnx")
    return path, compare_onnx(model, path)


def run_demo(
    output: Path,
    ranks: int = 2,
    identities: int = 300,
    per_identity: int = 12,
    extra: list[str] | None = None,
    training_stdout: TextIO | None = None,
) -> dict[str, Any]:
    """Run every stage and return the summary; raises if a stage fails. The training job's
    output goes to ``training_stdout`` (None: this process's standard output)."""
    started = time.perf_counter()
    onnx_missing = "" if available("onnx") else install_hint("onnx")
    if onnx_missing:
        print(f"note: the ONNX stage will be skipped: {onnx_missing}", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] drawing {identities} synthetic identities x {per_identity} images", flush=True)
    data = make_demo_data(output / "data", identities, per_identity)
    overrides = [
        f"rec={data.folder}",
        f"num_classes={data.num_classes}",
        f"num_image={data.num_images}",
        f"output={output}",
        *(extra or []),
    ]
    run_training(ranks, overrides, training_stdout)
    cfg = load_config(DEMO_CONFIG, overrides)
    records = read_metrics(output)
    steps = [r for r in records if "loss" in r]
    accuracy = [r[f"val/{HELDOUT_NAME}"] for r in records if f"val/{HELDOUT_NAME}" in r]
    outputs = {
        "folder": str(output),
        "log": str(output / "training.log"),
        "tensorboard": str(output / "tensorboard"),
        "loss_curve": str(plot_loss(records, output / "loss_curve.png")),
        "model": str(output / "model.pt"),
        "data": str(data.folder),
    }
    onnx_error = None
    if onnx_missing:
        print(f"[3/4] ONNX export skipped: {onnx_missing}", flush=True)
    else:
        print("[3/4] exporting ONNX", flush=True)
        onnx_path, onnx_error = export_and_check(cfg.network, cfg.embedding_size, output)
        outputs["onnx"] = str(onnx_path)
    print("[4/4] summary", flush=True)
    return {
        "ranks": ranks,
        "network": cfg.network,
        "identities": data.num_classes,
        "training_images": data.num_images,
        "heldout_pairs": data.num_pairs,
        "steps": steps[-1]["step"],
        "samples_per_s": sum(r["samples_per_s"] for r in steps) / len(steps),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
        "heldout_accuracy": accuracy[-1] if accuracy else None,
        "onnx_max_relative_error": onnx_error,
        "onnx_skipped": onnx_missing or None,
        "seconds": time.perf_counter() - started,
        "outputs": outputs,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the few lines a person reads at the end."""
    acc = summary["heldout_accuracy"]
    lines = [
        f"trained {summary['network']} on {summary['ranks']} ranks: {summary['steps']} steps, "
        f"{summary['samples_per_s']:.1f} samples/s",
        f"loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f}",
        "held-out verification accuracy "
        + (f"{100 * acc:.2f}% (chance: 50%)" if acc is not None else "not measured")
        + f" on {summary['heldout_pairs']} pairs of unseen identities",
        f"ONNX matches PyTorch to {summary['onnx_max_relative_error']:.1e} (relative)"
        if summary["onnx_skipped"] is None
        else f"ONNX not exported: {summary['onnx_skipped']}",
        f"done in {summary['seconds'] / 60:.1f} min; outputs:",
        *(f"  {name:<12} {path}" for name, path in summary["outputs"].items()),
    ]
    return "\n".join(lines)
