import logging
from pathlib import Path

import pytest
import torch

from facescale.config import ConfigError
from facescale.precision import autocast_dtype, device_dtype, requested_dtype


@pytest.mark.parametrize("device", ["cpu", "cuda", torch.device("meta")])
def test_bf16_and_float32_are_the_same_on_every_device(device, caplog):
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype(False, True, device) == torch.bfloat16
        assert autocast_dtype(False, False, device) is None
    assert not caplog.records


def test_fp16_runs_on_cuda_and_falls_back_to_float32_elsewhere_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype(True, False, "cuda") == torch.float16
        assert autocast_dtype(True, False, torch.device("cuda", 1)) == torch.float16
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        assert autocast_dtype(True, False, "cpu") is None
    assert "fp16 needs a GPU" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert device_dtype(True, False, "cpu") is None
    assert not caplog.records
    assert requested_dtype(True, False) == torch.float16


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp16_with_bf16_is_a_config_error_on_every_device(device):
    with pytest.raises(ConfigError, match="fp16 and bf16 are exclusive"):
        autocast_dtype(True, True, device)
    with pytest.raises(ConfigError, match="fp16 and bf16 are exclusive"):
        requested_dtype(True, True)


def test_full_float32_turns_tf32_off_inside_and_restores_it():
    from facescale.precision import full_float32

    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with full_float32():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision("highest")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's CPU flags")
def test_native_bf16_on_cpu_is_what_the_cpu_flags_say():
    from facescale.precision import native_bf16

    flags = _cpu_flags()
    assert native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert not native_bf16("meta")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_hardware_and_yields_to_fp16(monkeypatch, native):
    from facescale.precision import resolve_bf16

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_bf16(False, "auto", "cpu") is native
    assert device_dtype(False, "auto", "cpu") == (torch.bfloat16 if native else None)
    assert autocast_dtype(True, "auto", "cpu") is None  # fp16 asked: no bf16, float32 on CPU
    assert requested_dtype(True, resolve_bf16(True, "auto", "cpu")) == torch.float16
    assert resolve_bf16(False, True, "cpu") and not resolve_bf16(False, False, "cpu")
