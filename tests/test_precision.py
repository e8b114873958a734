import logging

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
