"""`facescale info` sizes and FLOPs against the published figures and a hand count, and the
`facescale bench backbone` report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from facescale.backbones import get_model, model_info
from facescale.backbones.info import flop_counter
from facescale.cli import main

# arcface_torch's published fp32 parameter sizes (MiB) and GFLOPs (multiply-adds), 112x112.
PUBLISHED_MIB = {"r18": 91, "r34": 130, "r50": 166, "r100": 248, "mbf": 7.8}
PUBLISHED_GMACS = {
    "r18": 2.6,
    "r50": 6.3,
    "r100": 12.1,
    "r200": 23.5,
    "vit_t": 1.5,
    "vit_s": 5.7,
    "vit_b": 11.4,
    "vit_l": 25.3,
}


def iresnet_macs(layers: tuple[int, ...], embedding_size: int) -> int:
    """Multiply-adds of IResNet's convolutions and fc, counted by hand from the architecture."""
    macs = 112 * 112 * 64 * 3 * 9
    size, in_channels = 112, 64
    for channels, blocks in zip((64, 128, 256, 512), layers, strict=True):
        out = size // 2
        macs += size * size * channels * in_channels * 9  # first conv1, at input resolution
        macs += out * out * channels * channels * 9  # first conv2, strided
        macs += out * out * channels * in_channels  # 1x1 downsample
        macs += (blocks - 1) * 2 * out * out * channels * channels * 9
        size, in_channels = out, channels
    return macs + 512 * 7 * 7 * embedding_size


def vit_macs(dim: int, depth: int, embedding_size: int) -> int:
    """Patch projection, per-token linear layers, the two attention products, the head."""
    tokens = 144
    per_block = tokens * (3 * dim * dim + dim * dim + 8 * dim * dim) + 2 * tokens * tokens * dim
    return tokens * dim * 3 * 81 + depth * per_block + tokens * dim * dim + dim * embedding_size


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err


@pytest.mark.parametrize(("name", "mib"), PUBLISHED_MIB.items())
def test_parameter_sizes_match_the_published_ones(name, mib):
    assert model_info(name).fp32_mib == pytest.approx(mib, rel=0.01)


@pytest.mark.parametrize(("name", "gmacs"), PUBLISHED_GMACS.items())
def test_multiply_adds_match_the_published_ones(name, gmacs):
    assert model_info(name).gmacs == pytest.approx(gmacs, rel=0.01)


@pytest.mark.parametrize(("name", "layers"), [("r18", (2, 2, 2, 2)), ("r100", (3, 13, 30, 3))])
def test_iresnet_multiply_adds_equal_a_hand_count(name, layers):
    assert model_info(name, embedding_size=256).macs == iresnet_macs(layers, 256)


@pytest.mark.parametrize(("name", "dim", "depth"), [("vit_t", 256, 12), ("vit_l", 768, 24)])
def test_vit_multiply_adds_equal_a_hand_count(name, dim, depth):
    assert model_info(name).macs == vit_macs(dim, depth, 512)


def test_meta_device_count_equals_a_real_model():
    info = model_info("mbf")
    model = get_model("mbf")
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.trainable_parameters == info.parameters
    assert model_info("r18").trainable_parameters == model_info("r18").parameters - 512


@pytest.mark.parametrize("groups", [1, 64])
def test_training_count_charges_each_convolution_gradient_one_forward(groups):
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups, bias=False)
    images = torch.randn(2, 64, 28, 28, requires_grad=True)
    with flop_counter() as counter:
        conv(images).sum().backward()
    forward_flops = 2 * (2 * 64 * 28 * 28) * (64 // groups) * 9
    assert counter.get_total_flops() == 3 * forward_flops  # forward, input and weight grads


def test_info_command_prints_one_json_object(capsys):
    code, out, _ = run_cli(capsys, "info", "r50", "--json")
    report = json.loads(out)
    assert code == 0
    assert report["name"] == "r50"
    assert report["parameters"] == model_info("r50").parameters
    assert math.isclose(report["fp32_mib"], report["parameters"] * 4 / 2**20)
    assert math.isclose(report["gmacs"], report["macs"] / 1e9)


def test_info_command_table_and_unknown_name(capsys):
    code, out, _ = run_cli(capsys, "info", "mbf", "--embedding-size", "128")
    assert code == 0
    assert out.splitlines()[1].split()[:2] == ["mbf", f"{model_info('mbf', 128).parameters:,}"]
    code, _, err = run_cli(capsys, "info", "r51")
    assert code == 2
    assert "unknown backbone 'r51'; valid names: r18, r34" in err


@pytest.mark.slow  # one fresh process per variant
def test_bench_backbone_reports_every_variant_against_fp32(capsys):
    argv = ["--model", "mbf", "--batch", "2", "--steps", "1", "--variants", "checkpointing"]
    code, out, _ = run_cli(capsys, "bench", "backbone", *argv, "--json")
    report = json.loads(out)
    assert code == 0
    assert set(report["variants"]) == {"fp32", "checkpointing"}
    assert 1.0 < report["vs_fp32"]["checkpointing"]["compute"] < 1.5  # recomputed forward
    for name, figures in report["variants"].items():
        assert figures["samples_per_s"] > 0 and figures["peak_mib"] > 0
        speed = figures["samples_per_s"] / report["variants"]["fp32"]["samples_per_s"]
        assert report["vs_fp32"][name]["speed"] == pytest.approx(speed)
    assert report["vs_fp32"]["fp32"] == {"speed": 1.0, "memory": 1.0, "compute": 1.0}
    # a training step: one forward and a backward of twice its multiply-adds (less the
    # input gradient of the first conv, which images do not need)
    forward = model_info("mbf").macs / 1e9
    assert report["variants"]["fp32"]["train_gmacs_per_sample"] == pytest.approx(
        3 * forward, rel=0.02
    )


def test_bench_backbone_refuses_bad_arguments(capsys):
    with pytest.raises(ValueError, match="--variants must name fp32"):
        run_cli(capsys, "bench", "backbone", "--variants", "fp8")
    code, _, err = run_cli(capsys, "bench", "backbone", "--model", "r51")
    assert code == 2 and "unknown backbone 'r51'" in err
