"""The stages of `facescale bench gpu`; each takes ``(device, sizes, folder)`` and returns its
figures with ``"pass"``. A stage that cannot apply to the device passes with ``"skipped"``
saying why."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facescale.launch import spawn_ranks, torchrun_command

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
# relative error (Frobenius) allowed against the float64 reference, per logits dtype
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
ADAMW_FACTOR = 10  # AdamW's first step is about lr * sign(grad): small gradients flip first
SPEED_TARGETS = {1.0: 1.5}  # step / matmul floor on a GPU; any sampled rate: 2.0
PLAN_TOLERANCE = 0.1  # the planner's predicted peak against the measured one, on a GPU


@dataclass(frozen=True)
class Sizes:
    """How large each stage runs."""

    name: str
    head_classes: int
    head_dim: int
    head_batch: int
    head_dtypes: tuple[str, ...]
    ranks: int
    train_network: str
    train_precisions: tuple[str, ...]
    train_batch: int
    train_steps: int
    speed_classes: tuple[int, ...]
    speed_rates: tuple[float, ...]
    speed_batch: int
    speed_dtypes: tuple[str, ...]
    speed_steps: int
    storage_classes: int
    storage_modes: tuple[tuple[str, str], ...]  # (center_dtype, center_state_dtype), fp32 first
    e2e_network: str
    e2e_batch: int
    e2e_classes: int
    e2e_rate: float
    e2e_steps: int
    onnx_network: str


TINY = Sizes(
    "tiny (cpu)",
    head_classes=300,
    head_dim=32,
    head_batch=12,
    head_dtypes=("fp32", "bf16"),
    ranks=3,
    train_network="mbf",
    train_precisions=("bf16",),
    train_batch=4,
    train_steps=2,
    speed_classes=(20_000,),
    speed_rates=(1.0, 0.1),
    speed_batch=64,
    speed_dtypes=("fp32",),
    speed_steps=2,
    storage_classes=20_000,
    storage_modes=(("fp32", "fp32"), ("bf16", "int8")),
    e2e_network="mbf",
    e2e_batch=8,
    e2e_classes=1000,
    e2e_rate=0.1,
    e2e_steps=2,
    onnx_network="mbf",
)
FULL = Sizes(
    "production (cuda)",
    head_classes=20_000,
    head_dim=512,
    head_batch=256,
    head_dtypes=("fp32", "fp16", "bf16"),
    ranks=3,
    train_network="r18",
    train_precisions=("fp16", "bf16"),
    train_batch=64,
    train_steps=8,
    speed_classes=(1_000_000, 8_000_000),
    speed_rates=(1.0, 0.1),
    speed_batch=1024,
    speed_dtypes=("fp16", "bf16"),
    speed_steps=3,
    storage_classes=1_000_000,
    storage_modes=(("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "int8"), ("fp16", "int8")),
    e2e_network="r50",
    e2e_batch=128,
    e2e_classes=1_400_000,
    e2e_rate=0.1,
    e2e_steps=10,
    onnx_network="r50",
)


def sizes_for(device: str) -> Sizes:
    return FULL if device == "cuda" else TINY


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (NaN anywhere gives NaN)."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def poison_free_memory(device: torch.device) -> int:
    """Fill memory the allocator will hand out next with NaN, then free it: a kernel that
    reads scratch it never wrote then yields NaN. Bytes poisoned (a best effort on CPU,
    where large freed blocks go back to the system)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = min(free // 2, 16 * 2**30)
    else:
        size = 64 * 2**20
    block = torch.full((size // 4,), float("nan"), device=device)
    del block
    return size


# ---- environment -----------------------------------------------------------------------
def environment(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Versions of torch, CUDA, cuDNN and NCCL (null where absent), and the device."""
    nccl = None
    if torch.cuda.is_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return {
        "pass": True,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": nccl,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpus": os.cpu_count(),
    }


# ---- the lean head against the CPU head and the float64 reference -----------------------
def _lean_head(classes: int, dim: int, rate: float, dtype: str, optimizer: str, cache: bool):
    from facescale.heads import ArcFace, LeanPartialFC

    head = LeanPartialFC(
        classes,
        dim,
        ArcFace(),
        rate,
        chunk_size=classes // 4 + 1,  # several chunks, the last one short
        logits_dtype=dtype,
        cache_bytes=(512 * 2**20) if cache else 0,
        seed=1,
    )
    head.configure_optimizer(optimizer, LR, MOMENTUM, WEIGHT_DECAY)
    return head


def _reference_step(x, labels, weight, sampled, optimizer: str):
    """float64: each micro-batch's loss and embedding gradient (of loss / micro-batches), and
    the centers after one optimizer step on the mean of the micro-batches' losses."""
    from facescale.heads import ArcFace
    from facescale.heads.reference import reference_loss

    w = weight.double().clone().requires_grad_()
    losses, grads = [], []
    for xk, lk, classes in zip(x, labels, sampled, strict=True):
        xk = xk.double().requires_grad_()
        loss = reference_loss(xk, lk, w, ArcFace(), classes=classes)
        (loss / len(x)).backward()
        losses.append(loss.detach())
        grads.append(xk.grad)
    kind = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    extra = {"momentum": MOMENTUM} if optimizer == "sgd" else {}
    kind([w], lr=LR, weight_decay=WEIGHT_DECAY, **extra).step()
    return torch.stack(losses), grads, w.detach()


def _run_head(head, device: torch.device, x, labels):
    """Forward, backward and step of ``head`` on ``device``: losses, embedding gradients,
    the sampled classes of each micro-batch and the centers after the step."""
    head = head.to(device)
    losses, grads, sampled = [], [], []
    for xk, lk in zip(x, labels, strict=True):
        xk = xk.to(device).requires_grad_()
        loss = head(xk, lk.to(device))
        (loss / len(x)).backward()
        losses.append(loss.detach().cpu())
        grads.append(xk.grad.cpu())
        classes = head.sampled_classes
        sampled.append(None if classes is None else classes.cpu())
    head.step()
    return torch.stack(losses), grads, sampled, head.weight.detach().cpu()


def _head_case(device, sizes: Sizes, rate, dtype, optimizer, accumulation, seed) -> dict:
    generator = torch.Generator().manual_seed(seed)
    shape = (accumulation, sizes.head_batch)
    x = torch.randn(*shape, sizes.head_dim, generator=generator)
    labels = torch.randint(0, sizes.head_classes, shape, generator=generator)
    cache = accumulation == 1  # the kept softmax once, the recomputed one once
    make = lambda: _lean_head(  # noqa: E731
        sizes.head_classes, sizes.head_dim, rate, dtype, optimizer, cache
    )
    initial = make().weight.clone()
    tolerance = TOLERANCE[dtype] * (ADAMW_FACTOR if optimizer == "adamw" else 1)
    case = {"rate": rate, "dtype": dtype, "optimizer": optimizer, "accumulation": accumulation}
    checks = []
    places = [("device", device)]
    if device.type != "cpu" and dtype != "fp16":  # fp16 matmuls on a CPU: not compared
        places.append(("cpu", torch.device("cpu")))
    for name, where in places:
        poison_free_memory(where)
        losses, grads, sampled, after = _run_head(make(), where, x, labels)
        ref_losses, ref_grads, ref_after = _reference_step(x, labels, initial, sampled, optimizer)
        computed = torch.zeros(sizes.head_classes, dtype=torch.bool)
        for classes in sampled:
            computed[slice(None) if classes is None else classes] = True
        errors = {
            "loss": relative_error(losses, ref_losses),
            "embedding_grad": max(
                relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)
            ),
            "update": relative_error(
                (after - initial)[computed], (ref_after - initial.double())[computed]
            ),
        }
        untouched = bool(torch.equal(after[~computed], initial[~computed]))
        case[name] = {k: float(f"{v:.3g}") for k, v in errors.items()}
        checks.append(untouched and all(v <= tolerance for v in errors.values()))
    case["tolerance"] = tolerance
    case["pass"] = all(checks)
    return case


def head(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Loss, embedding gradient and one update (SGD, AdamW; rates 1 and 0.5; one or two
    micro-batches; each logits dtype) of the lean head on the device and on the CPU against
    the float64 reference, with freed memory poisoned by NaN first."""
    cases = [
        _head_case(device, sizes, rate, dtype, optimizer, accumulation, seed)
        for seed, (rate, dtype, optimizer, accumulation) in enumerate(
            (r, d, o, a)
            for r in (1.0, 0.5)
            for d in sizes.head_dtypes
            for o in ("sgd", "adamw")
            for a in (1, 2)
        )
    ]
    return {
        "pass": all(case["pass"] for case in cases),
        "poisoned_mib": poison_free_memory(device) // 2**20,
        "poison_note": None if device.type == "cuda" else "best effort on CPU",
        "failed": [case for case in cases if not case["pass"]],
        "cases": len(cases),
        "worst": {
            dtype: max(max(c["device"].values()) for c in cases if c["dtype"] == dtype)
            for dtype in sizes.head_dtypes
        },
    }


# ---- ranks -----------------------------------------------------------------------------
def _spawn(device: torch.device, fn: Callable[..., Any], world: int, *args: Any, **kw: Any):
    """``spawn_ranks`` with the ranks computing on ``device`` (no GPU visible for cpu)."""
    hidden = device.type == "cpu" and torch.cuda.is_available()
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return spawn_ranks(fn, world, *args, timeout_minutes=5, **kw)
    finally:
        if hidden:
            if previous is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous


def _tar_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """24 features of 8 identities: in blocks of 12 rows, a third rank is given no block."""
    features = torch.randn(24, 8, generator=torch.Generator().manual_seed(8))
    return features, torch.arange(24) // 3


def _head_on_ranks(rank, world, sizes: Sizes, row_counts, backend) -> dict[str, Any]:
    """One lean step on this rank's rows of a shared problem; errors against float64."""
    import torch.distributed as dist

    from facescale.distributed import init_distributed
    from facescale.eval import tar_at_far_all_pairs
    from facescale.heads import ArcFace

    env = init_distributed(backend=backend)
    generator = torch.Generator().manual_seed(7)
    total = sum(row_counts)
    x = torch.randn(total, sizes.head_dim, generator=generator)
    labels = torch.randint(0, sizes.head_classes, (total,), generator=generator)
    start = sum(row_counts[:rank])
    rows = slice(start, start + row_counts[rank])
    lean = _lean_head(sizes.head_classes, sizes.head_dim, 1.0, "fp32", "sgd", True)
    full_weight = torch.zeros(sizes.head_classes, sizes.head_dim, device=env.device)
    lean = lean.to(env.device)
    full_weight[lean.class_start : lean.class_start + lean.num_local] = lean.weight
    dist.all_reduce(full_weight)
    mine = x[rows].to(env.device).requires_grad_()
    loss = lean(mine, labels[rows].to(env.device))
    loss.backward()
    lean.step()
    from facescale.heads.reference import reference_loss

    x64 = x.double().requires_grad_()
    expected = reference_loss(x64, labels, full_weight.cpu(), ArcFace())
    expected.backward()
    # the head hands DDP world x the global loss's gradient (DDP averages it back)
    grad_error = relative_error(mine.grad, x64.grad[rows] * world) if row_counts[rank] else 0.0
    features, ids = _tar_problem()
    tar = tar_at_far_all_pairs(features, ids, [0.1], block=12, device=env.device)
    return {
        "device": str(env.device),
        "backend": dist.get_backend(),
        "loss_error": relative_error(loss, expected),
        "grad_error": grad_error,
        "tar": [t.tar for t in tar],
    }


def process_group(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """One rank through the real collectives (NCCL on a GPU, gloo on CPU)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    (result,) = _spawn(device, _head_on_ranks, 1, sizes, [sizes.head_batch], backend)
    ok = result["loss_error"] <= 1e-4 and result["grad_error"] <= 1e-4
    return {"pass": ok, **result}


def gloo_ranks(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Several gloo ranks sharing the one device: uneven batches, a rank with no rows, and
    TAR@FAR where a rank is given no block, against one process."""
    from facescale.eval import tar_at_far_all_pairs

    counts = [sizes.head_batch, 0, *([3] * (sizes.ranks - 2))]
    ranks = _spawn(device, _head_on_ranks, sizes.ranks, sizes, counts, "gloo", backend="gloo")
    expected = [t.tar for t in tar_at_far_all_pairs(*_tar_problem(), [0.1])]
    ok = all(
        r["loss_error"] <= 1e-4 and r["grad_error"] <= 1e-4 and r["tar"] == expected for r in ranks
    )
    return {"pass": ok, "row_counts": counts, "ranks": ranks, "tar_one_process": expected}


# ---- a real training run ---------------------------------------------------------------
def _train_overrides(
    sizes: Sizes, precision: str, output: Path, classes: int, deterministic: bool = True
) -> list[str]:
    steps = sizes.train_steps
    return [
        f"network={sizes.train_network}",
        "embedding_size=64",
        f"num_classes={classes}",
        f"batch_size={sizes.train_batch}",
        f"num_image={sizes.train_batch * steps}",
        "num_epoch=1",
        "rec=synthetic",
        "num_workers=0",
        "sample_rate=0.5",
        "val_targets=[]",
        "frequent=1",
        f"deterministic={deterministic}",
        f"fp16={precision == 'fp16'}",
        f"bf16={precision == 'bf16'}",
        f"output={output}",
    ]


def _facescale_train(device: torch.device, overrides: list[str], log: Path) -> dict[str, Any]:
    """`facescale train --json` under torchrun (one rank); its summary."""
    env = dict(os.environ)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = torchrun_command(1, ["train", "--json", "--set", *overrides])
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"facescale train exited with {done.returncode}: {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forced_overflow(device: torch.device, sizes: Sizes, precision: str, output: Path) -> dict:
    """A step whose gradient overflows (fp16: loss scale 2^100; else a non-finite loss) is
    skipped and leaves centers, their optimizer state and the backbone bit-identical."""
    from facescale.config import load_config
    from facescale.distributed import DistEnv
    from facescale.train.trainer import Trainer

    # not deterministic: that mode is process-wide and would slow the stages after this one
    cfg = load_config(None, _train_overrides(sizes, precision, output, 100, False))
    trainer = Trainer(cfg, DistEnv(0, 1, 0, device, None))
    batches = iter(trainer.parts.loader)
    images, labels = next(batches)
    total = trainer.schedule.total_steps
    trainer._count_from(0, total)
    trainer._optimizer_step(trainer._micro_batch(images, labels, sync=True))  # momentum > 0
    trainer._look(total)
    state = {k: v.clone() for k, v in trainer.head.state_dict().items() if torch.is_tensor(v)}
    # parameters, not BatchNorm's running statistics: the forward updates those before the
    # step is known to overflow
    backbone = {k: v.detach().clone() for k, v in trainer.backbone.named_parameters()}
    scaler = trainer.parts.scaler
    remove = None
    if scaler is not None:
        scaler.update(2.0**100)
    else:
        remove = trainer.parts.model.register_forward_hook(lambda m, i, out: out * math.inf)
    images, labels = next(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer._optimizer_step(trainer._micro_batch(images, labels, sync=True))
        taken = trainer.progress.step
        trainer._look(total)
    if remove is not None:
        remove.remove()
    after = trainer.head.state_dict()
    same_head = all(torch.equal(v, after[k]) for k, v in state.items())
    weights = dict(trainer.backbone.named_parameters())
    same_backbone = all(torch.equal(v, weights[k]) for k, v in backbone.items())
    return {
        "skipped": trainer.progress.step == taken,
        "centers_and_state_identical": same_head,
        "backbone_parameters_identical": same_backbone,
        "loss_scale_after": None if scaler is None else scaler.get_scale(),
    }


def train(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """`facescale train` per precision: a run stopped half-way and resumed ends where an
    uninterrupted run ends; then a forced overflow."""
    result: dict[str, Any] = {"pass": True}
    precisions = sizes.train_precisions if device.type == "cuda" else ("bf16",)
    for precision in precisions:
        whole, halves = folder / f"{precision}_whole", folder / f"{precision}_halves"
        args = (sizes, precision)
        summary = _facescale_train(device, _train_overrides(*args, whole, 100), folder / "a.log")
        half = [*_train_overrides(*args, halves, 100), f"stop_step={sizes.train_steps // 2}"]
        _facescale_train(device, half, folder / "b.log")
        resumed = [*_train_overrides(*args, halves, 100), "resume=True"]
        _facescale_train(device, resumed, folder / "c.log")
        a = torch.load(whole / "model.pt", map_location="cpu")
        b = torch.load(halves / "model.pt", map_location="cpu")
        difference = max(
            float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()
        )
        overflow = _forced_overflow(device, sizes, precision, folder / f"{precision}_overflow")
        ok = difference == 0.0 and summary["final_step"] == sizes.train_steps
        ok = ok and overflow["skipped"] and overflow["centers_and_state_identical"]
        ok = ok and overflow["backbone_parameters_identical"]
        result[precision] = {
            "pass": ok,
            "steps": summary["final_step"],
            "last_loss": summary["last"].get("loss"),
            "resume_max_abs_difference": difference,
            "overflow": overflow,
        }
        result["pass"] = result["pass"] and ok
    return result


# ---- host synchronisation --------------------------------------------------------------
def sync(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """On a GPU, the host synchronisations of one lean head step (forward, backward,
    update) as the trainer calls it (every rank's rows given), counted by torch's sync debug
    mode; none is expected."""
    if device.type != "cuda":
        return {"pass": True, "skipped": "host synchronisation is a GPU matter"}
    lean = _lean_head(sizes.head_classes, sizes.head_dim, 0.5, "bf16", "sgd", True).to(device)
    x = torch.randn(sizes.head_batch, sizes.head_dim, device=device, requires_grad=True)
    labels = torch.randint(0, sizes.head_classes, (sizes.head_batch,), device=device)
    for _ in range(2):  # the first step allocates; the second is counted
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                lean(x, labels, sizes=[sizes.head_batch]).backward()
                lean.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    messages = [str(w.message).splitlines()[0] for w in caught]
    return {"pass": not messages, "host_syncs": len(messages), "first": messages[:5]}


# ---- speed -----------------------------------------------------------------------------
def _head_speed_run(
    device: torch.device,
    sizes: Sizes,
    classes: int,
    rate: float,
    dtype: str,
    storage: tuple[str, str] = ("fp32", "fp32"),
    lean: bool = True,
) -> dict[str, Any]:
    """One `bench head` measurement in this process: step and matmul floor (ms), and peak
    memory growth (MB); ``storage`` is (center_dtype, center_state_dtype); not ``lean``:
    the drop-in head (dense logits through autograd, torch's SGD)."""
    from facescale.benchmarking.head import Options, measure_rank, summarize
    from facescale.heads.partial_fc import chunk_size_for

    dim = 512 if device.type == "cuda" else 128
    centers, state = storage
    chunk = chunk_size_for(device, sizes.speed_batch, dim)
    options = Options(
        "partial_fc", lean, classes, 1, sizes.speed_batch, dim, rate, chunk, 512, dtype,
        sizes.speed_steps, 1, 0, LR, center_dtype=centers, center_state_dtype=state,
    )  # fmt: skip
    report = summarize(options, [measure_rank(options, device)])
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next size starts from free memory
    return {
        "classes": classes,
        "rate": rate,
        "dtype": dtype,
        "step_ms": round(report["step_s_median"] * 1e3, 2),
        "floor_ms": round(report["floor_s_median"] * 1e3, 2),
        "step_over_floor": round(report["step_over_floor_median"], 2),
        "memory_growth_mb": round(report["memory_growth_mb"][0], 1),
    }


def _against(row: dict[str, Any], base: dict[str, Any], name: str) -> dict[str, float | None]:
    """A speed run's step time and memory growth over ``base``'s (on a CPU the memory is a
    process's growth, often 0: no ratio)."""
    memory = base["memory_growth_mb"]
    return {
        f"step_over_{name}": round(row["step_ms"] / base["step_ms"], 3),
        f"memory_over_{name}": round(row["memory_growth_mb"] / memory, 3) if memory else None,
    }


def head_speed(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """`bench head`'s measurement in this process, against the same run's matmul floor; then
    the drop-in head and each narrow storage mode against it (time and peak memory, no
    target)."""
    rows = []
    for classes in sizes.speed_classes:
        for rate in sizes.speed_rates:
            for dtype in sizes.speed_dtypes:
                row = _head_speed_run(device, sizes, classes, rate, dtype)
                row["target"] = SPEED_TARGETS.get(rate, 2.0) if device.type == "cuda" else None
                row["pass"] = row["target"] is None or row["step_over_floor"] <= row["target"]
                rows.append(row)
    dropin = []  # the first size and dtype: the lean step against plain autograd's
    for rate in sizes.speed_rates:
        lean = next(r for r in rows if r["rate"] == rate)
        row = _head_speed_run(device, sizes, lean["classes"], rate, lean["dtype"], lean=False)
        dropin.append(row | _against(row, lean, "lean"))
    storage = []
    for rate in sizes.speed_rates:
        fp32 = None
        for mode in sizes.storage_modes:
            row = _head_speed_run(device, sizes, sizes.storage_classes, rate, "bf16", mode)
            fp32 = fp32 or row
            storage.append(row | {"storage": "/".join(mode)} | _against(row, fp32, "fp32"))
    return {
        "pass": all(r["pass"] for r in rows),
        "targets": "GPU only" if device.type != "cuda" else SPEED_TARGETS,
        "runs": rows,
        "dropin": dropin,
        "storage_modes": storage,
    }


def end_to_end(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Training samples/s of the backbone and a sampled head, the head's share, and on a GPU
    the planner's predicted peak against the allocator's (within 10%)."""
    import contextlib

    from facescale.config import load_config
    from facescale.distributed import DistEnv
    from facescale.memory import PeakMemory
    from facescale.plan import estimate
    from facescale.train.trainer import Trainer

    precision = "fp16" if device.type == "cuda" else "fp32"  # CPU bf16 convolutions crawl
    steps = sizes.e2e_steps
    overrides = [
        f"network={sizes.e2e_network}",
        f"num_classes={sizes.e2e_classes}",
        f"sample_rate={sizes.e2e_rate}",
        f"batch_size={sizes.e2e_batch}",
        f"num_image={sizes.e2e_batch * (steps + 2)}",
        "num_epoch=1",
        "rec=synthetic",
        "num_workers=0",
        "val_targets=[]",
        "checkpoint_every=0",
        "keep_checkpoints=0",
        f"fp16={precision == 'fp16'}",
        f"output={folder}",
    ]
    cfg = load_config(None, overrides)
    memory = PeakMemory(device)
    memory.start()
    trainer = Trainer(cfg, DistEnv(0, 1, 0, device, None))
    with contextlib.closing(trainer.open_logger()) as logger:
        trainer.fit(logger, 1)  # warm-up: allocation, cuDNN's autotuning
        trainer.reset_timings()
        summary = trainer.fit(logger, 1 + steps)
    timings = trainer.timings
    total = sum(timings.values())
    head = timings["head_forward"] + timings["head_backward"]
    # the planner against the allocator's peak; on a CPU the resident set of a process that
    # ran the other stages first says little
    planned = None
    if device.type == "cuda":
        total_memory = torch.cuda.get_device_properties(device).total_memory
        predicted = estimate(cfg, 1, "cuda", total_memory).peak
        measured = memory.peak()["peak_bytes"]
        planned = {
            "predicted_mib": round(predicted / 2**20),
            "measured_mib": round(measured / 2**20),
            "predicted_over_measured": round(predicted / measured, 3),
        }
    within = planned is None or abs(planned["predicted_over_measured"] - 1) <= PLAN_TOLERANCE
    return {
        "pass": summary["steps"] == steps and within,
        "planner": planned,
        "network": sizes.e2e_network,
        "precision": precision,
        "classes": sizes.e2e_classes,
        "sample_rate": sizes.e2e_rate,
        "batch": sizes.e2e_batch,
        "samples_per_s": round(summary["samples_per_s"], 1),
        "head_share_forward_backward": round(head / total, 3),
        "optimizer_share": round(timings["optimizer"] / total, 3),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }


def onnx(device: torch.device, sizes: Sizes, folder: Path) -> dict[str, Any]:
    """Export the backbone from the device to ONNX and check it with onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"pass": True, "skipped": "onnxruntime is not installed (pip install .[onnx])"}
    from facescale.backbones import get_model
    from facescale.export import compare_onnx, export_onnx

    torch.manual_seed(0)
    model = get_model(sizes.onnx_network).to(device).eval()
    path = export_onnx(model, folder / f"{sizes.onnx_network}.onnx")
    error = compare_onnx(model, path)
    return {"pass": error < 1e-4, "network": sizes.onnx_network, "max_relative_error": error}


STAGES: dict[str, Callable[[torch.device, Sizes, Path], dict[str, Any]]] = {
    "environment": environment,
    "head": head,
    "process_group": process_group,
    "gloo_ranks": gloo_ranks,
    "train": train,
    "sync": sync,
    "head_speed": head_speed,
    "end_to_end": end_to_end,
    "onnx": onnx,
}
