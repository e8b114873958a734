"""Predict one rank's peak training memory for a config, and what would make it fit.

The peak of a step is the memory held between steps (backbone parameters and optimizer
state, DDP's gradient buckets, this rank's class centers and their optimizer state) plus
the largest of the step's phases: the backbone's forward, the head's forward and backward
(while the backbone's activations are alive), the backbone's backward, the optimizer.

* Backbone: traced on the meta device (no memory used) by counting the bytes of every
  tensor alive at each moment of two training steps (:class:`LiveTensorBytes`).
* Head: closed forms in the bytes of one copy of the rank's centers, read off the head's
  code and checked in the tests against the allocations of real steps.
* CPU only: the runtime (threads, oneDNN scratch, gloo) adds a fixed amount, and from the
  backbone's backward on glibc keeps freed blocks resident; constants fitted to
  `facescale bench train` runs (docs/benchmarks_and_planning.md).

:func:`estimate` gives the prediction; :func:`fits`, :func:`largest_num_classes`,
:func:`largest_sample_rate` and :func:`largest_batch_size` answer the planning questions.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from facescale.config import Config
from facescale.errors import InputError
from facescale.face import FACE_SIZE
from facescale.precision import device_dtype

FLOAT_BYTES = 4  # backbone parameters and every computation are float32
# CPU: resident memory above the live tensors. The runtime (threads, oneDNN scratch, gloo
# buffers) adds a fixed amount; from the backbone's backward on, glibc also keeps freed
# blocks of activations and of parameter-sized tensors (gradients, buckets) resident.
# Fitted to `facescale bench train` calibration runs (benchmarks/RESULTS.md).
CPU_RUNTIME_BYTES = 218 * 2**20
CPU_RETAINED_SHARE = 0.19  # of the activation bytes
CPU_RETAINED_PARAMETER_COPIES = 1.5  # float32 copies of the backbone's parameters
BACKWARD_PHASES = ("backbone backward", "optimizer")
# What a process holds before training starts, outside the predicted growth: Python, torch
# and the process group on CPU (measured); the CUDA context and allocator slack on a GPU.
PROCESS_BYTES = {"cpu": 230 * 2**20, "cuda": 1 * 2**30}

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """Bytes from '80GiB', '80GB', '512MiB', '1.5T' or '1000000' (B/iB units, case-free)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match or (match.group(3) and not match.group(2)):
        raise InputError(f"memory size {text!r}: expected a number with a unit, e.g. 80GiB")
    number, prefix, binary = match.groups()
    scale = 1024 ** "kmgt".index(prefix) * 1024 if binary else _UNITS[prefix]
    return int(float(number) * scale)


def format_size(count: float) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


class LiveTensorBytes(TorchDispatchMode):
    """While active, the bytes of every tensor storage that an operation created and that
    is still alive: ``live`` now, and ``timeline``, its value after each operation.

    Being a dispatch mode it holds a Python reference to each new tensor, so autograd
    copies a fresh gradient into ``.grad`` instead of taking it over: for a backbone one
    parameter's bytes at a time, within the tests' tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.timeline: list[int] = []
        self._seen: set[int] = set()

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = id(storage)
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.timeline.append(self.live)
        return out


# ---- the backbone ----------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneTrace:
    """Bytes of one training step of the backbone; phases are counted above ``state``."""

    parameters: int  # number of parameters
    state: int  # held between steps: parameters, buffers, optimizer state
    forward: int  # peak during forward
    activations: int  # alive when forward ends (saved for backward, and the output)
    backward: int  # peak during backward
    gradients: int  # alive when backward ends
    step: int  # peak during the optimizer step


STEP_PHASES = ("forward", "backward", "step")
TRACED_BATCHES = (2, 4)
# the config keys a backbone's training step depends on (the trainer's model and optimizer)
BACKBONE_KEYS = (
    "network",
    "embedding_size",
    "dropout",
    "gradient_checkpointing",
    "channels_last",
    "optimizer",
    "momentum",
)


@dataclass(frozen=True)
class StepTimeline:
    """Live tensor bytes of a backbone training step, after each operation of each phase,
    counted above ``state`` (what is held between steps)."""

    parameters: int
    state: int
    phases: dict[str, np.ndarray]


def step_timeline(cfg: Config, batch: int, device: str = "meta") -> StepTimeline:
    """Trace two training steps of ``cfg``'s backbone at ``batch`` images on ``device`` and
    return the second (the first creates the optimizer state). On the meta device nothing
    is allocated, so any backbone can be traced on any machine."""
    from facescale.optim import build_optimizer
    from facescale.train.build import build_backbone

    live = LiveTensorBytes()
    with live, torch.device(device):
        model = build_backbone(cfg).train()
        opt = build_optimizer(
            cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay
        )
        for _ in range(2):
            state, marks = live.live, [len(live.timeline)]
            embeddings = model(torch.randn(batch, 3, FACE_SIZE, FACE_SIZE))
            marks.append(len(live.timeline))
            embeddings.sum().backward()
            marks.append(len(live.timeline))
            opt.step()
            marks.append(len(live.timeline))
            opt.zero_grad(set_to_none=True)
            del embeddings
    line = np.asarray(live.timeline, dtype=np.float64) - state
    spans = itertools.pairwise(marks)
    phases = {name: line[a:b] for name, (a, b) in zip(STEP_PHASES, spans, strict=True)}
    # training uses torch's fused SGD/AdamW (facescale.optim), which update in place: its
    # step holds the gradients and nothing more (the meta device traces the unfused one)
    phases["step"] = phases["backward"][-1:]
    return StepTimeline(sum(p.numel() for p in model.parameters()), state, phases)


@functools.cache
def _meta_timeline(key: tuple[Any, ...], batch: int) -> StepTimeline:
    return step_timeline(Config(**dict(zip(BACKBONE_KEYS, key, strict=True))), batch)


def trace_backbone(cfg: Config) -> BackboneTrace:
    """``cfg``'s backbone training step at ``cfg.batch_size`` images per rank.

    Every tensor of a step has a size affine in the batch, and the sequence of operations
    does not depend on it, so the live bytes after each operation, traced at two small
    batches, give them exactly at any batch; the peaks are the maxima of those lines.
    """
    key = tuple(getattr(cfg, name) for name in BACKBONE_KEYS)
    small, large = (_meta_timeline(key, b) for b in TRACED_BATCHES)
    lo, hi = TRACED_BATCHES
    weight = (cfg.batch_size - lo) / (hi - lo)
    lines = {p: v + (large.phases[p] - v) * weight for p, v in small.phases.items()}
    return BackboneTrace(
        parameters=small.parameters,
        state=small.state,
        forward=round(lines["forward"].max()),
        activations=round(lines["forward"][-1]),
        backward=round(lines["backward"].max()),
        gradients=round(lines["backward"][-1]),
        step=round(lines["step"].max()),
    )


# ---- the head --------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadMemory:
    """Bytes of this rank's classification layer: held between steps, and the extra
    transient bytes of each phase of a step."""

    state: int
    forward: int
    backward: int
    retained: int  # kept from the head's backward through the backbone's backward
    step: int


def optimizer_states(cfg: Config) -> int:
    """Tensors of optimizer state per parameter tensor: momentum (SGD), two moments (AdamW)."""
    if cfg.optimizer == "adamw":
        return 2
    return 1 if cfg.momentum else 0


# Transient bytes per entry while a narrow table's rows are rounded and stored, a chunk at a
# time (ROUNDING_ROWS rows on a CPU; heads/storage.py): fp16: the magnitudes, the subnormal
# offset and the shifted noise; int8: the noise in fp32 and the codes.
ROUNDING_BYTES = {"fp32": 0, "bf16": 0, "fp16": 12, "int8": 5}


def head_memory(
    cfg: Config, world_size: int, device: str = "cpu", device_memory: int | None = None
) -> HeadMemory:
    """The head of rank 0 (which holds the largest shard) for ``cfg`` on ``world_size`` ranks
    of ``device``, each with ``device_memory`` bytes (None: a GPU's chunk as on 32 GiB or
    more)."""
    from facescale.heads.partial_fc import DEFAULT_CHUNK_SIZE, ROUNDING_ROWS, gpu_chunk_size
    from facescale.heads.storage import row_bytes

    d, k = cfg.embedding_size, optimizer_states(cfg)
    per_class = cfg.num_subcenters  # center rows of one class (sub-center ArcFace)
    if cfg.head == "data_parallel":
        # Every rank: all centers. Forward holds a few [batch x classes] logit tensors;
        # backward two center-sized ones at its peak (the gradient of the raw centers and
        # a term of the normalisation's) and the logits' gradient; the dense gradient lives
        # on to the update, whose fused kernel (SGD or AdamW) adds one center-sized temporary.
        copy = cfg.num_classes * per_class * d * FLOAT_BYTES
        logits = cfg.batch_size * cfg.num_classes * FLOAT_BYTES
        # sub-centers: the rows' logits and their scaled copy before each class's best, and
        # backward's gradient of the rows' logits
        rows_logits = 2 * per_class * logits if per_class > 1 else 0
        return HeadMemory(
            state=(1 + k) * copy,
            forward=4 * logits + rows_logits,
            backward=2 * copy + per_class * logits,
            retained=copy,
            step=2 * copy,
        )
    # Partial FC (lean): the shard's centers and optimizer state, and the head's scratch
    # buffers, kept from step to step: a chunk of computed classes (head_chunk_size, else
    # the trainer's default: DEFAULT_CHUNK_SIZE on a CPU, a GPU's far larger one) for
    # the gradient and its product with the centers (under sampling also the chunk's rows
    # and their optimizer state, copied), and the chunk's logits. The gradient norm reads
    # a chunk's gradient in float64 (two chunks' bytes); other transients are vectors of
    # the global batch, and the sampler's key per class. The softmax of each micro-batch
    # whose [batch x computed] probabilities fit the cache budget is kept too (the chunk of
    # logits then holds probabilities; both exist when some micro-batches are kept and
    # others recomputed). Sub-centers multiply the rows of a class and add a chunk that
    # spreads the classes' probabilities onto their rows; forward then also holds each
    # class's best logit and sub-center (fp32 and int64) and, when the softmax is kept, the
    # chunk's row logits on their way into the kept columns.
    # Narrow storage (center_dtype, center_state_dtype) keeps each row in fewer bytes; its
    # chunks are widened to fp32 copies, under sampling gathered first in their stored form,
    # and its writes take a chunk of rounding noise (int32). With a narrow table the update
    # reads the optimizer state a block of rounded rows at a time (ROUNDING_ROWS on a CPU,
    # where SGD's one-pass kernel reads none: counted all the same, at most a few MiB).
    local = math.ceil(cfg.num_classes / world_size)
    sampled = cfg.sample_rate < 1
    computed = min(local, math.ceil(cfg.sample_rate * local)) if sampled else local
    global_batch = cfg.batch_size * world_size
    default = (
        DEFAULT_CHUNK_SIZE if device == "cpu" else gpu_chunk_size(global_batch, d, device_memory)
    )
    chunk = cfg.head_chunk_size or default  # as the trainer picks it (chunk_size_for)
    rows = min(chunk, computed) * per_class
    probs = global_batch * computed * per_class * FLOAT_BYTES
    kept = min(cfg.gradient_acc, cfg.head_cache_mib * 2**20 // probs)
    kinds = {"centers": cfg.center_dtype, "state": cfg.center_state_dtype if k else "fp32"}
    narrow = {part: kind != "fp32" for part, kind in kinds.items()}
    rounded_rows = min(rows, ROUNDING_ROWS) if device == "cpu" else rows
    # the blocks of each part's copies: its rows and how many of them are read at a time
    blocks = {"centers": (1, rows), "state": (k, rounded_rows if any(narrow.values()) else rows)}
    scratch_rows = 2 * rows + any(narrow.values()) * rows  # gradient, product, rounding noise
    scratch_rows += sum(n * r for part, (n, r) in blocks.items() if sampled or narrow[part])
    logit_chunks = (2 if 0 < kept < cfg.gradient_acc else 1) + (per_class > 1)
    scratch = scratch_rows * d * FLOAT_BYTES + logit_chunks * global_batch * rows * FLOAT_BYTES
    if sampled:  # the gathered rows in their stored form
        scratch += sum(
            n * r * row_bytes(kinds[part], d) for part, (n, r) in blocks.items() if narrow[part]
        )
    scratch += kept * probs
    rounding = max(ROUNDING_BYTES[kind] for kind in kinds.values()) * rounded_rows * d
    batch = global_batch * d * FLOAT_BYTES  # one copy of the gathered embeddings
    sampler = 4 * local + 24 * computed if sampled else 0  # keys, top-k and sort buffers
    best = 0
    if per_class > 1:
        best = global_batch * rows // per_class * 12
        best += global_batch * rows * FLOAT_BYTES if kept else 0
    stored = row_bytes(kinds["centers"], d) + k * row_bytes(cfg.center_state_dtype, d)
    step = max(2 * rows * d * FLOAT_BYTES, rounding) + 3 * batch
    if cfg.max_grad_norm > 0:
        # clipping: the gradient norm keeps each chunk's gradient for the update while they
        # fit what head_cache_mib leaves after the kept softmax; past that, those kept so far
        # are dropped (and the update forms them again)
        room = cfg.head_cache_mib * 2**20 - kept * probs
        gradient = computed * per_class * d * FLOAT_BYTES
        chunk = rows * d * FLOAT_BYTES
        if gradient <= room:
            last_chunk = gradient - (math.ceil(gradient / chunk) - 1) * chunk
            step = gradient + max(last_chunk, rounding) + 3 * batch
        else:
            step += max(0, room) // chunk * chunk
    return HeadMemory(
        state=local * per_class * stored + scratch,
        forward=max(5 * batch, sampler) + best,
        backward=8 * batch,
        retained=3 * batch,
        step=step,
    )


# ---- the whole step --------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory growth of one rank over a training step, by part (bytes).

    ``peak`` is what `facescale bench train` measures (growth from before the model and
    head exist); ``required`` adds what the process holds before that.
    """

    device: str
    backbone_parameters: int
    backbone_state: int  # parameters, optimizer state, DDP buckets, weight average
    head_state: int  # this rank's centers and their optimizer state
    step_transient: int  # the largest phase of the step
    peak_phase: str
    runtime: int  # CPU: allocator retention and runtime scratch
    process: int

    @property
    def peak(self) -> int:
        return self.backbone_state + self.head_state + self.step_transient + self.runtime

    @property
    def required(self) -> int:
        return self.peak + self.process

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak": self.peak, "required": self.required}


def _reduced_precision(trace: BackboneTrace) -> BackboneTrace:
    """fp16/bf16 autocast: the body's activations take 2 bytes instead of 4, and autocast
    keeps a 16-bit copy of the weights through the step."""
    weights = 2 * trace.parameters
    return dataclasses.replace(
        trace,
        forward=trace.forward // 2 + weights,
        activations=trace.activations // 2 + weights,
        backward=(trace.backward - trace.gradients) // 2 + trace.gradients + weights,
    )


def cpu_overhead(trace: BackboneTrace, phase: str) -> int:
    """Resident bytes above the live tensors on CPU during ``phase`` (module constants)."""
    retained = 0.0
    if phase in BACKWARD_PHASES:
        retained = CPU_RETAINED_SHARE * trace.activations
        retained += CPU_RETAINED_PARAMETER_COPIES * FLOAT_BYTES * trace.parameters
    return round(CPU_RUNTIME_BYTES + retained)


def estimate(
    cfg: Config, world_size: int, device: str = "cpu", device_memory: int | None = None
) -> MemoryEstimate:
    """Peak memory of rank 0 training ``cfg`` on ``world_size`` ranks of ``device``
    ('cpu' or 'cuda'), each with ``device_memory`` bytes (a GPU's sizes its head's chunks)."""
    if device not in PROCESS_BYTES:
        raise ValueError(f"device {device!r}: choose 'cpu' or 'cuda'")
    trace = trace_backbone(cfg)
    if device_dtype(cfg.fp16, cfg.bf16, device) is not None:
        trace = _reduced_precision(trace)
    head = head_memory(cfg, world_size, device, device_memory)
    buckets = trace.parameters * FLOAT_BYTES if world_size > 1 else 0
    average = trace.parameters * FLOAT_BYTES if cfg.ema_decay else 0  # ema_decay's weights
    phases = {
        "backbone forward": trace.forward,
        "head forward": trace.activations + head.forward,
        "head backward": trace.activations + head.backward,
        "backbone backward": trace.backward + head.retained,
        "optimizer": max(trace.step + head.retained, trace.gradients + head.step),
    }
    overhead = {p: cpu_overhead(trace, p) if device == "cpu" else 0 for p in phases}
    phase = max(phases, key=lambda p: phases[p] + overhead[p])
    return MemoryEstimate(
        device=device,
        backbone_parameters=trace.parameters,
        backbone_state=trace.state + buckets + average,
        head_state=head.state,
        step_transient=phases[phase],
        peak_phase=phase,
        runtime=overhead[phase],
        process=PROCESS_BYTES[device],
    )


# ---- planning questions ----------------------------------------------------------------
def fits(cfg: Config, world_size: int, device: str, memory: int) -> bool:
    """Whether a rank with ``memory`` bytes can train ``cfg``."""
    return estimate(cfg, world_size, device, memory).required <= memory


def _largest(lo: int, hi: int, ok: Any) -> int | None:
    """The largest integer in [lo, hi] for which ``ok`` holds (``ok`` monotone: true, then
    false), or None."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def largest_num_classes(
    cfg: Config, world_size: int, device: str, memory: int, limit: int = 10**10
) -> int | None:
    """The most identities ``cfg`` can train with (None: not even one)."""

    def ok(count: int) -> bool:
        return fits(dataclasses.replace(cfg, num_classes=count), world_size, device, memory)

    return _largest(1, limit, ok)


def largest_sample_rate(
    cfg: Config, world_size: int, device: str, memory: int, step: float = 0.01
) -> float | None:
    """The largest Partial FC sample rate (a multiple of ``step``) that fits, or None."""

    def ok(units: int) -> bool:
        rate = min(1.0, units * step)
        return fits(
            dataclasses.replace(cfg, head="partial_fc", sample_rate=rate),
            world_size,
            device,
            memory,
        )

    found = _largest(1, round(1 / step), ok)
    return None if found is None else min(1.0, found * step)


def largest_batch_size(
    cfg: Config, world_size: int, device: str, memory: int, limit: int = 4096
) -> int | None:
    """The largest batch size per rank that fits, or None."""

    def ok(batch: int) -> bool:
        return fits(dataclasses.replace(cfg, batch_size=batch), world_size, device, memory)

    return _largest(1, limit, ok)
