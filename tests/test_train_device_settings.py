"""The settings a run takes from its device and config: the head's logits dtype and chunk
size, deterministic algorithms, and the phase clock."""

import time
from types import SimpleNamespace

import pytest
import torch

from facescale.config import load_config
from facescale.heads.partial_fc import DEFAULT_CHUNK_SIZE, GPU_CHUNK_BUDGET, chunk_size_for
from facescale.seeding import configure_determinism
from facescale.train.build import build_training_head
from facescale.train.timing import PhaseClock

CPU = torch.device("cpu")


def _head(**values):
    overrides = [f"{k}={v}" for k, v in {"num_classes": 50, "embedding_size": 8, **values}.items()]
    return build_training_head(load_config(None, overrides), CPU)


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ({}, torch.float32),
        ({"bf16": True}, torch.bfloat16),
        ({"fp16": True}, torch.float32),  # fp16 needs a GPU: the run stays float32 on CPU
        ({"bf16": True, "head_logits_dtype": "fp32"}, torch.float32),
        ({"head_logits_dtype": "fp16"}, torch.float16),
    ],
)
def test_head_logits_dtype_follows_the_backbone_unless_set(values, dtype):
    assert _head(**values).softmax.dtype == dtype


def test_head_chunk_size_is_sized_for_the_device_unless_set():
    assert _head().softmax.chunk_size == DEFAULT_CHUNK_SIZE
    assert _head(head_chunk_size=100).softmax.chunk_size == 100


@pytest.mark.parametrize("memory_gib", [8, 80, 141])
@pytest.mark.parametrize(("rows", "dim"), [(1024, 512), (8192, 512), (128, 128)])
def test_gpu_chunks_fill_the_budget(monkeypatch, memory_gib, rows, dim):
    properties = SimpleNamespace(total_memory=memory_gib * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    size = chunk_size_for("cuda:0", rows, dim)
    budget = min(GPU_CHUNK_BUDGET, properties.total_memory // 32)
    per_class = 4 * (2 * rows + 3 * dim)
    assert size >= DEFAULT_CHUNK_SIZE and size % 1024 == 0
    assert size == DEFAULT_CHUNK_SIZE or size * per_class <= budget < (size + 1024) * per_class
    assert chunk_size_for("cpu", rows, dim) == DEFAULT_CHUNK_SIZE


def test_deterministic_mode_turns_on_and_off():
    try:
        configure_determinism(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        configure_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


def test_the_phase_clock_adds_host_time_between_marks_on_cpu():
    clock = PhaseClock(CPU, ("a", "b"))
    start = clock.mark()
    time.sleep(0.02)
    clock.add("a", start, clock.mark())
    clock.add_host_seconds("b", 0.5)
    totals = clock.totals()
    assert 0.02 <= totals["a"] < 1.0 and totals["b"] == 0.5
    clock.reset()
    assert clock.totals() == {"a": 0.0, "b": 0.0}


def test_compile_on_cpu_without_a_cpp_compiler_is_a_config_error_unless_auto(monkeypatch):
    import torch._inductor.config as inductor

    from facescale.config import ConfigError
    from facescale.train.build import compiles

    assert compiles(True, CPU) and compiles("auto", CPU)  # this machine has one
    assert not compiles(False, CPU)
    monkeypatch.setattr(inductor.cpp, "cxx", (None, "no-such-c++-compiler"))
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler"):
        compiles(True, CPU)
    with pytest.warns(UserWarning, match=r"no C\+\+ compiler"):
        assert not compiles("auto", CPU)
    assert compiles(True, torch.device("meta"))  # kernels for other devices need none
