"""Backbone registry, forward contract, runtime options (precision, checkpointing, layout, DDP)."""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facescale.backbones import Backbone, get_model, list_models
from facescale.backbones.iresnet import IBasicBlock, IResNet
from facescale.backbones.mobilefacenet import DepthWise, MobileFaceNet
from facescale.backbones.registry import MODELS
from facescale.backbones.vit import Block, VisionTransformer
from facescale.config import load_config
from facescale.train.build import build_backbone

ALL_NAMES = ["r18", "r34", "r50", "r100", "r200", "r2060"]
ALL_NAMES += ["mbf", "mbf_small", "mbf_large", "vit_t", "vit_s", "vit_b", "vit_l"]


def faces(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def small_models() -> dict[str, Backbone]:
    """One small model per family, with every source of randomness switched on."""
    torch.manual_seed(0)
    return {
        "iresnet": IResNet((1, 1, 4, 1), embedding_size=32, dropout=0.3),
        "mobilefacenet": MobileFaceNet((2, 2, 3, 2), scale=1, embedding_size=32, dropout=0.3),
        "vit": VisionTransformer(
            64, 5, num_heads=4, embedding_size=32, dropout=0.3, drop_path_rate=0.5, mask_ratio=0.3
        ),
    }


def train_step(model: nn.Module, images: torch.Tensor, seed: int) -> torch.Tensor:
    """Forward and backward in training mode with a fixed random stream; returns embeddings."""
    model.train()
    torch.manual_seed(seed)
    out = model(images)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach()


def test_registry_lists_every_published_name():
    assert list_models() == ALL_NAMES


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if n != "r2060"])
def test_every_backbone_embeds_a_small_batch(name):
    # Training mode: BatchNorm normalises with batch statistics. A freshly initialised deep
    # IResNet in eval mode (running statistics 0 and 1) overflows, as arcface_torch's does.
    model = get_model(name, embedding_size=64).train()
    with torch.no_grad():
        out = model(faces(2))
    assert out.shape == (2, 64)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_r2060_embeds_a_batch_with_checkpointing_on_by_default():
    model = get_model("r2060").train()
    assert model.gradient_checkpointing
    with torch.no_grad():  # no backward: checkpointing has nothing to do
        out = model(faces(2))
    assert out.shape == (2, 512) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_checkpointing_defaults_follow_arcface_torch():
    assert {name for name, spec in MODELS.items() if spec.gradient_checkpointing} == {
        "r2060",
        "vit_b",
        "vit_l",
    }
    with torch.device("meta"):
        assert get_model("vit_b").gradient_checkpointing is True
        assert get_model("vit_b", gradient_checkpointing=False).gradient_checkpointing is False
        assert get_model("r18", gradient_checkpointing=True).gradient_checkpointing is True


def test_config_keys_choose_the_backbone_options():
    overrides = ["network=vit_b", "embedding_size=128", "dropout=0.2", "channels_last=true"]
    with torch.device("meta"):
        default = build_backbone(load_config(None, overrides))
        forced = build_backbone(load_config(None, [*overrides, "gradient_checkpointing=false"]))
    assert default.embedding_size == 128 and default.dropout.p == 0.2
    assert default.channels_last and default.gradient_checkpointing
    assert not forced.gradient_checkpointing


def test_channels_last_left_unset_is_on_for_a_cpu_alone():
    cfg = load_config(None, ["network=mbf", "embedding_size=32"])
    assert cfg.channels_last is None
    off = load_config(None, ["network=mbf", "embedding_size=32", "channels_last=false"])
    with torch.device("meta"):
        assert build_backbone(cfg, torch.device("cpu")).channels_last
        assert not build_backbone(cfg, torch.device("cuda")).channels_last
        assert not build_backbone(cfg).channels_last
        assert not build_backbone(off, torch.device("cpu")).channels_last


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown backbone 'r51'") as err:
        get_model("r51")
    for name in ALL_NAMES:
        assert name in str(err.value)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"no argument depth; .*layers"):
        get_model("r18", depth=3)
    with pytest.raises(ValueError, match="fp16 and bf16 are exclusive"):
        get_model("mbf", fp16=True, bf16=True)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        get_model("mbf", dropout=1.0)
    with pytest.raises(ValueError, match="embedding_size must be a positive integer"):
        get_model("mbf", embedding_size=0)
    model = get_model("mbf")
    with pytest.raises(ValueError, match=r"shape \[B, 3, 112, 112\].*got \[2, 3, 96, 96\]"):
        model(torch.zeros(2, 3, 96, 96))
    with pytest.raises(ValueError, match=r"floating-point.*torch\.uint8"):
        model(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))


def test_iresnet_embedding_scale_is_frozen_at_one():
    model = get_model("r18")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


@pytest.mark.parametrize("family", ["iresnet", "mobilefacenet", "vit"])
def test_gradient_checkpointing_gives_the_same_outputs_gradients_and_statistics(family):
    plain = small_models()[family]
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    calls = []
    blocks = (IBasicBlock, DepthWise, Block)
    first_block = next(m for m in checkpointed.modules() if isinstance(m, blocks))
    first_block.register_forward_pre_hook(lambda *_: calls.append(1))
    images = faces(2)
    expected = train_step(plain, images, seed=7)
    actual = train_step(checkpointed, images, seed=7)
    assert len(calls) == 2  # the block ran again in backward: it was checkpointed
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    for (key, a), b in zip(checkpointed.named_parameters(), plain.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=key)
    for (key, a), b in zip(checkpointed.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def calibrated(model: nn.Module) -> nn.Module:
    """Eval mode with BatchNorm statistics of real activations, so nothing overflows in fp16."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()(faces(8, seed=1))
    return model.eval()


@pytest.mark.parametrize("family", ["iresnet", "mobilefacenet", "vit"])
@pytest.mark.parametrize(("dtype", "min_cosine"), [(torch.bfloat16, 0.99), (torch.float16, 0.999)])
def test_reduced_precision_runs_the_body_only(family, dtype, min_cosine):
    model = calibrated(small_models()[family])
    with torch.no_grad():
        reference = model(faces(2))
    model.amp_dtype = dtype
    seen = {}

    def record(key: str, tensor: torch.Tensor) -> None:
        seen.setdefault(key, tensor.dtype)

    body_layer = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    head_layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    body_layer.register_forward_hook(lambda module, inputs, out: record("body", out))
    head_layer.register_forward_hook(lambda module, inputs, out: record("head", inputs[0]))
    with torch.no_grad():
        out = model(faces(2))
    assert seen == {"body": dtype, "head": torch.float32}
    assert out.dtype == torch.float32
    cosine = nn.functional.cosine_similarity(out, reference)
    assert cosine.min() > min_cosine
    assert not torch.equal(out, reference)


def test_head_stays_fp32_under_an_outer_autocast():
    model = get_model("mbf").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(faces(2))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("family", ["iresnet", "mobilefacenet"])
def test_channels_last_gives_the_same_embeddings_and_gradients(family):
    # float64: the layouts only reorder sums, so results agree to rounding.
    plain = small_models()[family].double()
    nhwc = copy.deepcopy(plain).to_channels_last()
    conv = next(m for m in nhwc.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = faces(2).double()
    expected = train_step(plain, images, seed=3)
    torch.testing.assert_close(train_step(nhwc, images, seed=3), expected, rtol=1e-9, atol=1e-9)
    for (key, a), b in zip(nhwc.named_parameters(), plain.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-7, atol=1e-9, msg=key)


@pytest.mark.parametrize("family", ["iresnet", "mobilefacenet", "vit"])
def test_dropout_acts_in_training_only(family):
    model = small_models()[family]
    dropout = next(m for m in model.modules() if isinstance(m, nn.Dropout))
    images = faces(4)
    model.eval()
    with torch.no_grad():
        with_dropout = model(images)
        dropout.p = 0.0
        without = model(images)
    torch.testing.assert_close(with_dropout, without, rtol=0, atol=0)
    dropout.p = 0.3
    model.train()
    with torch.no_grad():
        a, b, c = (torch.manual_seed(s) and model(images) for s in (1, 2, 1))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_vit_masking_keeps_a_share_of_tokens_and_restores_their_places():
    model = get_model("vit_t", mask_ratio=0.25)
    tokens = torch.arange(2 * 144 * 256, dtype=torch.float32).view(2, 144, 256)
    kept, restore = model.drop_tokens(tokens)
    assert kept.shape == (2, 108, 256)
    restored = model.restore_tokens(kept, restore)
    is_mask = (restored == model.mask_token.detach()).all(dim=-1)
    assert is_mask.sum(dim=1).tolist() == [36, 36]
    assert torch.equal(restored[~is_mask], tokens[~is_mask])
    assert not torch.equal(is_mask[0], is_mask[1])  # each sample draws its own mask


@pytest.mark.slow  # torch.export tracing takes seconds per model
@pytest.mark.parametrize("family", ["iresnet", "mobilefacenet", "vit"])
def test_eval_model_exports_to_onnx_with_the_same_embeddings(family, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = calibrated(small_models()[family])
    path = tmp_path / f"{family}.onnx"
    batch = {"images": {0: torch.export.Dim("batch")}}
    torch.onnx.export(model, (faces(2),), path, dynamic_shapes=batch, dynamo=True)
    images = faces(3, seed=4)  # another batch size than at export
    session = onnxruntime.InferenceSession(path)
    (exported,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(torch.from_numpy(exported), expected, rtol=1e-4, atol=1e-4)


def _ddp_gradients_match_shard_average(rank: int, world: int) -> list[str]:
    """DDP gradients equal the average of single-process gradients over the rank shards."""
    mismatches = []
    for name, model in small_models().items():
        model.gradient_checkpointing = True
        reference = copy.deepcopy(model)
        ddp = DistributedDataParallel(model)
        images = faces(2 * world, seed=11)
        shards = images.chunk(world)
        for step in range(2):  # a second step fails if a parameter went unused in the first
            train_step(ddp, shards[rank], seed=100 * step + rank)
            for r in range(world):
                out = reference.train()(shards[r]) if torch.manual_seed(100 * step + r) else None
                weights = torch.linspace(-1, 1, out.numel()).view_as(out)
                ((out * weights).sum() / world).backward()
        for (key, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
            if a.requires_grad and not torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6):
                mismatches.append(f"{name}.{key}")
    return mismatches


def test_ddp_on_two_ranks_equals_the_single_process_shard_average():
    assert run_ranks(_ddp_gradients_match_shard_average, 2) == [[], []]
