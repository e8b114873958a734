"""The memory planner: its traces against real-device steps, its head formulas against traced
head steps on 1 and 2 ranks, its planning answers, and `facescale plan`."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable

import pytest
import torch
from dist_utils import run_ranks
from torch.profiler import ProfilerActivity, profile

from facescale import plan
from facescale.config import Config
from facescale.heads import CombinedMargin, build_head
from facescale.heads.partial_fc import (
    DEFAULT_CHUNK_SIZE,
    ROUNDING_ROWS,
    chunk_size_for,
    gpu_chunk_size,
)
from facescale.optim import build_optimizer
from facescale.train.build import build_backbone

MIB = 2**20


@pytest.fixture(autouse=True)
def one_thread():
    """Real CPU steps here are small: one thread runs them fastest on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_parse_size_reads_binary_and_decimal_units():
    assert plan.parse_size("80GiB") == 80 * 2**30
    assert plan.parse_size("24GB") == 24 * 10**9
    assert plan.parse_size("512 MiB") == 512 * 2**20
    assert plan.parse_size("1.5t") == 1_500_000_000_000
    assert plan.parse_size("4096") == 4096
    for bad in ("", "GiB", "12 apples", "5iB", "-3GB"):
        with pytest.raises(ValueError, match="expected a number with a unit"):
            plan.parse_size(bad)


def test_live_tensor_bytes_counts_storages_until_freed():
    live = plan.LiveTensorBytes()
    with live:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:20]  # a view: no new storage
        b = torch.ones(500, dtype=torch.float64)  # 4000 bytes
        assert live.live == 8000
        del a
        assert live.live == 8000  # the view keeps the storage alive
        del view
        assert live.live == 4000
        c = torch.cat([b, b])  # 8000 bytes
        del b, c
    assert live.live == 0
    assert max(live.timeline) == 12000  # b and c alive together


class AllocationLog:
    """The reference: allocated CPU bytes over a sequence of parts, each run under torch's
    profiler recording memory. It sees every allocation and free without changing how
    operations run (a dispatch mode can: it keeps autograd from reusing gradient buffers)."""

    def __init__(self) -> None:
        self.level = 0  # bytes allocated since the log started

    def run(self, part: Callable[[], object]) -> int:
        """Run ``part``; the highest level during it."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            part()
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        levels = list(itertools.accumulate((size for _, size in changes), initial=self.level))
        self.level = levels[-1]
        return max(levels)


def test_meta_trace_predicts_a_real_cpu_step_at_another_batch():
    cfg = Config(network="mbf", batch_size=3)
    log, parts = AllocationLog(), {}
    log.run(lambda: parts.update(model=build_backbone(cfg).train()))
    params = parts["model"].parameters()
    optimizer = (cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
    log.run(lambda: parts.update(opt=build_optimizer(*optimizer)))
    for _ in range(2):  # the second step runs with the optimizer state the first made
        state = log.level
        forward = log.run(lambda: parts.update(e=parts["model"](torch.randn(3, 3, 112, 112))))
        activations = log.level
        backward = log.run(lambda: parts.pop("e").sum().backward())
        gradients = log.level
        step = log.run(parts["opt"].step)
        log.run(lambda: parts["opt"].zero_grad(set_to_none=True))
    trace = plan.trace_backbone(cfg)  # from meta traces at batches 2 and 4
    assert trace.state == state
    assert trace.activations == activations - state
    # CPU kernels may add small workspaces and scalars the meta device does not have
    for traced, real in (
        (trace.forward, forward),
        (trace.backward, backward),
        (trace.gradients, gradients),
        (trace.step, step),
    ):
        assert abs(traced - (real - state)) <= 0.02 * traced + 64 * 1024
    assert trace.parameters == sum(p.numel() for p in parts["model"].parameters())


def _head_step(rank: int, world: int, case: dict) -> dict[str, int]:
    """The reference: allocated bytes of a real head step as the trainer runs it (forward,
    backward, gradient norm, update), the second of two; ``state`` stays between steps."""
    torch.manual_seed(rank)
    cfg = Config(**case)
    lean = cfg.head == "partial_fc"
    x = torch.randn(cfg.batch_size, cfg.embedding_size, requires_grad=True)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,))
    log, parts = AllocationLog(), {}

    def build() -> None:
        head = build_head(
            cfg.head, cfg.num_classes, cfg.embedding_size, CombinedMargin(64, 1, 0.5, 0),
            sample_rate=cfg.sample_rate, lean=lean, cache_bytes=cfg.head_cache_mib * 2**20,
            num_subcenters=cfg.num_subcenters,
            center_dtype=cfg.center_dtype, center_state_dtype=cfg.center_state_dtype,
        )  # fmt: skip
        head.configure_optimizer(cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        parts.update(head=head)

    def update() -> None:
        parts["head"].grad_norm_sq()
        parts["head"].step(0.1)
        parts["head"].zero_grad()
        x.grad = None

    log.run(build)
    for _ in range(2):
        state = log.level
        forward = log.run(lambda: parts.update(loss=parts["head"](x, labels)))
        backward = log.run(lambda: parts.pop("loss").backward())
        retained = log.level
        step = log.run(update)
    return {
        "state": state,
        "forward": forward - state,
        "backward": backward - state,
        "retained": retained - state,
        "step": step - state,
    }


def _storage(centers: str, state: str) -> dict[str, str]:
    return {"center_dtype": centers, "center_state_dtype": state}


HEAD_CASES = [
    {"head": "data_parallel"},
    {"head": "data_parallel", "optimizer": "adamw"},
    {"head": "partial_fc"},
    {"head": "partial_fc", "sample_rate": 0.1},
    {"head": "partial_fc", "sample_rate": 0.1, "optimizer": "adamw"},
    {"head": "partial_fc", "batch_size": 256, "num_classes": 2000},
    {"head": "partial_fc", "head_cache_mib": 0},  # the softmax is recomputed, not kept
    {"head": "partial_fc", "batch_size": 256, "head_cache_mib": 8},  # over the budget
    {"head": "partial_fc", "num_subcenters": 3},
    {"head": "partial_fc", "num_subcenters": 3, "sample_rate": 0.1, "head_cache_mib": 0},
    {"head": "data_parallel", "num_subcenters": 3},
    # narrow storage of the centers and of their optimizer state
    {"head": "partial_fc", **_storage("bf16", "bf16")},
    {"head": "partial_fc", **_storage("fp16", "int8")},
    {"head": "partial_fc", "sample_rate": 0.1, **_storage("bf16", "int8")},
    {"head": "partial_fc", "sample_rate": 0.1, "optimizer": "adamw", **_storage("fp16", "bf16")},
]


def _assert_close(measured: dict[str, int], formula: plan.HeadMemory, context: str) -> None:
    for key, value in measured.items():
        expected = getattr(formula, key)
        # within 2% of the phase, and 1 MiB for the small per-batch vectors
        assert abs(expected - value) <= 0.02 * value + MIB, (context, key, value, expected)


@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_head_formula_matches_a_measured_head_step(case):
    case = {"num_classes": 40_000, "batch_size": 32, **case}
    _assert_close(_head_step(0, 1, case), plan.head_memory(Config(**case), 1), str(case))


TWO_RANK_CASES = [
    {"head": "data_parallel", "num_classes": 30_001, "batch_size": 16},
    {"head": "partial_fc", "num_classes": 60_001, "batch_size": 16, "sample_rate": 0.2},
]


def _rank_head_steps(rank: int, world: int) -> list[dict[str, int]]:
    torch.set_num_threads(1)
    return [_head_step(rank, world, case) for case in TWO_RANK_CASES]


def test_head_formula_holds_on_each_of_two_ranks():
    by_rank = run_ranks(_rank_head_steps, 2)
    for case, *ranks in zip(TWO_RANK_CASES, *by_rank, strict=True):
        # the formula is rank 0's, whose shard is the larger (30,001 of 60,001 classes);
        # rank 1's shard is one class smaller, well within the tolerance
        for rank, measured in enumerate(ranks):
            _assert_close(measured, plan.head_memory(Config(**case), 2), f"{case} rank {rank}")


def test_estimate_adds_state_and_the_largest_phase():
    cfg = Config(network="mbf", batch_size=8, num_classes=100_000, head="partial_fc")
    cpu, cuda = plan.estimate(cfg, 4, "cpu"), plan.estimate(cfg, 4, "cuda")
    # centers + momentum of one shard, and the kept scratch: two chunks of 4096 centers
    # (gradient, product), the chunk's logits for the global batch of 32 and the kept
    # softmax of the global batch over the shard
    kept = 32 * 25_000 * 4
    assert cpu.head_state == 2 * 25_000 * 512 * 4 + 2 * 4096 * 512 * 4 + 32 * 4096 * 4 + kept
    recomputing = plan.estimate(dataclasses.replace(cfg, head_cache_mib=0), 4, "cpu")
    assert recomputing.head_state == cpu.head_state - kept
    trace = plan.trace_backbone(cfg)
    assert cuda.backbone_state == trace.state + 4 * trace.parameters  # + DDP buckets
    assert plan.estimate(cfg, 1, "cuda").backbone_state == trace.state
    averaged = plan.estimate(dataclasses.replace(cfg, ema_decay=0.999), 4, "cuda")
    assert averaged.backbone_state == cuda.backbone_state + 4 * trace.parameters
    assert cuda.runtime == 0 and cpu.runtime > plan.CPU_RUNTIME_BYTES
    assert cpu.peak == cpu.backbone_state + cpu.head_state + cpu.step_transient + cpu.runtime
    assert cpu.required == cpu.peak + plan.PROCESS_BYTES["cpu"]
    dp = plan.estimate(dataclasses.replace(cfg, head="data_parallel"), 4, "cuda")
    assert dp.peak_phase == "head backward"  # five center-sized temporaries at once
    assert dp.head_state == 2 * 100_000 * 512 * 4
    fp16 = dataclasses.replace(cfg, fp16=True)
    assert plan.estimate(fp16, 4, "cuda").step_transient < cuda.step_transient
    assert plan.estimate(fp16, 4, "cpu") == cpu  # the trainer computes fp16 in fp32 on CPU


def test_the_head_is_planned_with_the_chunk_the_trainer_takes():
    # the trainer's chunk (head_chunk_size, else 4096 classes on a CPU and on a GPU as many
    # as its 1 GiB budget holds for the global batch: 149,504 at 128 rows of 512-d) sizes
    # the head's scratch
    cfg = Config(network="mbf", batch_size=128, num_classes=1_000_000, head="partial_fc")
    gpu_chunk = gpu_chunk_size(128, 512)
    assert gpu_chunk == 149_504 and chunk_size_for("cpu", 128, 512) == DEFAULT_CHUNK_SIZE
    for device, chunk in (("cpu", DEFAULT_CHUNK_SIZE), ("cuda", gpu_chunk)):
        chosen = plan.head_memory(dataclasses.replace(cfg, head_chunk_size=chunk), 1, device)
        assert plan.head_memory(cfg, 1, device) == chosen
    cpu, cuda = plan.head_memory(cfg, 1, "cpu"), plan.head_memory(cfg, 1, "cuda")
    # gradient and product rows, and the chunk's logits for the batch
    more_rows = gpu_chunk - DEFAULT_CHUNK_SIZE
    assert cuda.state - cpu.state == more_rows * (2 * 512 + 128) * 4


def test_planning_answers_are_the_largest_that_fit():
    cfg = Config(network="mbf", batch_size=16, num_classes=1_000_000, head="data_parallel")
    memory, world = 6 * 2**30, 2
    assert not plan.fits(cfg, world, "cuda", memory)
    most = plan.largest_num_classes(cfg, world, "cuda", memory)
    assert plan.fits(dataclasses.replace(cfg, num_classes=most), world, "cuda", memory)
    assert not plan.fits(dataclasses.replace(cfg, num_classes=most + 1), world, "cuda", memory)
    rate = plan.largest_sample_rate(cfg, world, "cuda", memory)
    assert rate == 1.0  # the sharded head fits where the replicated one does not
    pfc = dataclasses.replace(cfg, head="partial_fc", num_classes=2_000_000)
    batch = plan.largest_batch_size(pfc, world, "cuda", memory)
    assert plan.fits(dataclasses.replace(pfc, batch_size=batch), world, "cuda", memory)
    assert not plan.fits(dataclasses.replace(pfc, batch_size=batch + 1), world, "cuda", memory)
    assert plan.largest_batch_size(pfc, world, "cuda", 4 * 2**30) is None  # centers: 3.8 GiB


def test_plan_command_prints_one_json_object(capsys):
    from facescale.cli import main

    args = ["plan", "--set", "network=mbf", "--set", "num_classes=2000000"]
    args += ["--set", "batch_size=32", "--devices", "2", "--device-memory", "8GiB", "--json"]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cuda" and report["device_memory"] == 8 * 2**30
    assert report["fits"] is True
    kept_softmax = 64 * 1_000_000 * 4  # the global batch over the shard
    chunk = gpu_chunk_size(64, 512, 8 * 2**30)  # the trainer's on such a GPU
    assert chunk == 39_936
    centers_and_scratch = (2 * 1_000_000 * 512 + 2 * chunk * 512 + 64 * chunk) * 4
    assert report["estimate"]["head_state"] == centers_and_scratch + kept_softmax
    assert report["largest_num_classes"] > 2_000_000
    assert report["largest_batch_size"] >= 32
    by_storage = report["largest_num_classes_by_storage"]
    assert by_storage["fp32/fp32"] == report["largest_num_classes"]
    assert by_storage["fp32/fp32"] < by_storage["bf16/bf16"] < by_storage["bf16/int8"]


def test_narrow_storage_counts_its_bytes_per_identity():
    cfg = Config(network="mbf", batch_size=8, num_classes=1_000_000, head="partial_fc")
    wide = plan.head_memory(cfg, 2)
    rows = 500_000
    for centers, state, per_identity in [
        ("bf16", "bf16", 2 * 1024),
        ("fp16", "int8", 1024 + 512 + 4),  # 8-bit entries and one fp32 scale per class
        ("fp32", "int8", 2048 + 512 + 4),
    ]:
        narrow = plan.head_memory(dataclasses.replace(cfg, **_storage(centers, state)), 2)
        # the stored rows, the chunk's widened centers and rounding noise (fp32 blocks), and
        # the state widened a block of rows at a time
        chunks = (centers != "fp32") + 1
        blocks = (state != "fp32") * ROUNDING_ROWS
        extra = (chunks * 4096 + blocks) * 2048
        assert narrow.state - wide.state == rows * (per_identity - 4096) + extra
    # the most identities that fit grow as the bytes per identity shrink (4096 at fp32 with
    # momentum), the centers being most of the memory
    memory, most = 16 * 2**30, {}
    for centers, state in [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "int8")]:
        narrow = dataclasses.replace(cfg, **_storage(centers, state))
        most[centers, state] = plan.largest_num_classes(narrow, 2, "cuda", memory)
    assert most["bf16", "bf16"] == pytest.approx(2 * most["fp32", "fp32"], rel=0.1)
    assert most["bf16", "int8"] == pytest.approx(
        most["fp32", "fp32"] * 4096 / (1024 + 516), rel=0.1
    )


def test_plan_command_explains_bad_memory_sizes(capsys):
    from facescale.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "--set", "network=mbf", "--device-memory", "lots"])
    assert done.value.code == 2
    assert "memory size 'lots'" in capsys.readouterr().err
