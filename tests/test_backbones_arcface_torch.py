"""arcface_torch checkpoints load into facescale backbones and give the reference embeddings.

The layouts (key names and shapes) and float64 functional forwards below are written from
arcface_torch's published architecture, independently of facescale.backbones: state dicts
built here are loaded into facescale models and their embeddings compared with these plain
forwards (eval mode: BatchNorm uses its running statistics).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facescale.backbones import get_model, list_models, load_arcface_torch

Shapes = dict[str, tuple[int, ...]]

# ---------------------------------------------------------------- key names and shapes


def _batchnorm(shapes: Shapes, prefix: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{name}"] = (channels,)
    shapes[f"{prefix}.num_batches_tracked"] = ()


def iresnet_shapes(layers: tuple[int, ...], embedding_size: int = 512) -> Shapes:
    """arcface_torch IResNet: conv1/bn1/prelu, layer1..4 of IBasicBlocks, bn2, fc, features."""
    shapes: Shapes = {"conv1.weight": (64, 3, 3, 3)}
    _batchnorm(shapes, "bn1", 64)
    shapes["prelu.weight"] = (64,)
    in_channels = 64
    for stage, (channels, blocks) in enumerate(
        zip((64, 128, 256, 512), layers, strict=True), start=1
    ):
        for index in range(blocks):
            block = f"layer{stage}.{index}"
            block_in = in_channels if index == 0 else channels
            _batchnorm(shapes, f"{block}.bn1", block_in)
            shapes[f"{block}.conv1.weight"] = (channels, block_in, 3, 3)
            _batchnorm(shapes, f"{block}.bn2", channels)
            shapes[f"{block}.prelu.weight"] = (channels,)
            shapes[f"{block}.conv2.weight"] = (channels, channels, 3, 3)
            _batchnorm(shapes, f"{block}.bn3", channels)
            if index == 0:
                shapes[f"{block}.downsample.0.weight"] = (channels, block_in, 1, 1)
                _batchnorm(shapes, f"{block}.downsample.1", channels)
        in_channels = channels
    _batchnorm(shapes, "bn2", 512)
    shapes["fc.weight"] = (embedding_size, 512 * 7 * 7)
    shapes["fc.bias"] = (embedding_size,)
    _batchnorm(shapes, "features", embedding_size)
    return shapes


def mobilefacenet_shapes(blocks: tuple[int, ...], scale: int, embedding_size: int = 512) -> Shapes:
    """arcface_torch MobileFaceNet: ``layers`` list, ``conv_sep`` and the GDC ``features``."""
    shapes: Shapes = {}

    def conv_unit(prefix: str, cin: int, cout: int, kernel: int, groups: int, act: bool) -> None:
        shapes[f"{prefix}.layers.0.weight"] = (cout, cin // groups, kernel, kernel)
        _batchnorm(shapes, f"{prefix}.layers.1", cout)
        if act:
            shapes[f"{prefix}.layers.2.weight"] = (cout,)

    def depthwise(prefix: str, cin: int, cout: int, hidden: int) -> None:
        conv_unit(f"{prefix}.layers.0", cin, hidden, 1, 1, True)
        conv_unit(f"{prefix}.layers.1", hidden, hidden, 3, hidden, True)
        conv_unit(f"{prefix}.layers.2", hidden, cout, 1, 1, False)

    def residual(prefix: str, channels: int, hidden: int, count: int) -> None:
        for index in range(count):
            depthwise(f"{prefix}.layers.{index}", channels, channels, hidden)

    narrow, wide = 64 * scale, 128 * scale
    conv_unit("layers.0", 3, narrow, 3, 1, True)
    if blocks[0] == 1:
        conv_unit("layers.1", narrow, narrow, 3, 64, True)
    else:
        residual("layers.1", narrow, 128, blocks[0])
    depthwise("layers.2", narrow, narrow, 128)
    residual("layers.3", narrow, 128, blocks[1])
    depthwise("layers.4", narrow, wide, 256)
    residual("layers.5", wide, 256, blocks[2])
    depthwise("layers.6", wide, wide, 512)
    residual("layers.7", wide, 256, blocks[3])
    conv_unit("conv_sep", wide, 512, 1, 1, True)
    conv_unit("features.layers.0", 512, 512, 7, 512, False)
    shapes["features.layers.2.weight"] = (embedding_size, 512)
    _batchnorm(shapes, "features.layers.3", embedding_size)
    return shapes


def vit_shapes(dim: int, depth: int, embedding_size: int = 512, patch: int = 9) -> Shapes:
    """arcface_torch VisionTransformer (layer norm, no qkv bias, mlp ratio 4, mask token)."""
    patches = (112 // patch) ** 2
    shapes: Shapes = {
        "pos_embed": (1, patches, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for index in range(depth):
        block = f"blocks.{index}"
        for norm in ("norm1", "norm2"):
            shapes[f"{block}.{norm}.weight"] = (dim,)
            shapes[f"{block}.{norm}.bias"] = (dim,)
        shapes[f"{block}.attn.qkv.weight"] = (3 * dim, dim)
        shapes[f"{block}.attn.proj.weight"] = (dim, dim)
        shapes[f"{block}.attn.proj.bias"] = (dim,)
        shapes[f"{block}.mlp.fc1.weight"] = (4 * dim, dim)
        shapes[f"{block}.mlp.fc1.bias"] = (4 * dim,)
        shapes[f"{block}.mlp.fc2.weight"] = (dim, 4 * dim)
        shapes[f"{block}.mlp.fc2.bias"] = (dim,)
    shapes["norm.weight"] = (dim,)
    shapes["norm.bias"] = (dim,)
    shapes["feature.0.weight"] = (dim, dim * patches)
    _batchnorm(shapes, "feature.1", dim)
    shapes["feature.2.weight"] = (embedding_size, dim)
    _batchnorm(shapes, "feature.3", embedding_size)
    shapes["mask_token"] = (1, 1, dim)
    return shapes


def random_state(shapes: Shapes, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 values for every key: variance-preserving weights, positive variances."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 1000, shape, generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif len(shape) >= 2 and key.endswith("weight"):
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        elif key.endswith(("prelu.weight", ".layers.2.weight")):  # PReLU slopes
            state[key] = 0.5 * torch.rand(shape, generator=gen)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen) + (key.endswith("weight"))
    return state


# ---------------------------------------------------------------- float64 forwards


def _bn(sd: dict, prefix: str, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = sd[f"{prefix}.running_mean"].view(view), sd[f"{prefix}.running_var"].view(view)
    scale, shift = sd[f"{prefix}.weight"].view(view), sd[f"{prefix}.bias"].view(view)
    return (x - mean) / torch.sqrt(var + eps) * scale + shift


def _prelu(sd: dict, key: str, x: torch.Tensor) -> torch.Tensor:
    slope = sd[key].view(1, -1, 1, 1)
    return torch.where(x >= 0, x, slope * x)


def _conv_as_patches(
    x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int
) -> torch.Tensor:
    """Grouped convolution spelled out as patches x weights (F.conv2d is slow in float64)."""
    out_channels, per_group, kernel, _ = weight.shape
    batch, channels, size, _ = x.shape
    groups = channels // per_group
    patches = F.unfold(x, kernel, padding=padding, stride=stride)
    patches = patches.view(batch, groups, per_group * kernel * kernel, -1)
    weights = weight.reshape(groups, out_channels // groups, per_group * kernel * kernel)
    out = torch.einsum("bgkl,gok->bgol", patches, weights)
    side = (size + 2 * padding - kernel) // stride + 1
    return out.reshape(batch, out_channels, side, side)


def _double(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in state.items()}


def iresnet_forward(state: dict, layers: tuple[int, ...], images: torch.Tensor) -> torch.Tensor:
    sd = _double(state)
    x = F.conv2d(images.double(), sd["conv1.weight"], padding=1)
    x = _prelu(sd, "prelu.weight", _bn(sd, "bn1", x))
    for stage, blocks in enumerate(layers, start=1):
        for index in range(blocks):
            p = f"layer{stage}.{index}"
            stride = 2 if index == 0 else 1
            out = F.conv2d(_bn(sd, f"{p}.bn1", x), sd[f"{p}.conv1.weight"], padding=1)
            out = _prelu(sd, f"{p}.prelu.weight", _bn(sd, f"{p}.bn2", out))
            out = _bn(
                sd, f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1)
            )
            if index == 0:
                x = _bn(
                    sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2)
                )
            x = out + x
    x = _bn(sd, "bn2", x).flatten(1)
    return _bn(sd, "features", x @ sd["fc.weight"].T + sd["fc.bias"])


def mobilefacenet_forward(
    state: dict, blocks: tuple[int, ...], images: torch.Tensor
) -> torch.Tensor:
    sd = _double(state)

    def conv_unit(prefix: str, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        weight = sd[f"{prefix}.layers.0.weight"]
        padding = 1 if weight.shape[-1] == 3 else 0
        x = _bn(sd, f"{prefix}.layers.1", _conv_as_patches(x, weight, stride, padding))
        act = f"{prefix}.layers.2.weight"
        return _prelu(sd, act, x) if act in sd else x

    def depthwise(prefix: str, x: torch.Tensor, stride: int) -> torch.Tensor:
        out = conv_unit(f"{prefix}.layers.0", x)
        out = conv_unit(f"{prefix}.layers.1", out, stride)
        out = conv_unit(f"{prefix}.layers.2", out)
        return out if stride == 2 else x + out

    def residual(prefix: str, x: torch.Tensor, count: int) -> torch.Tensor:
        for index in range(count):
            x = depthwise(f"{prefix}.layers.{index}", x, 1)
        return x

    x = conv_unit("layers.0", images.double(), stride=2)
    x = conv_unit("layers.1", x) if blocks[0] == 1 else residual("layers.1", x, blocks[0])
    for stage, count in enumerate(blocks[1:]):
        x = depthwise(f"layers.{2 + 2 * stage}", x, 2)
        x = residual(f"layers.{3 + 2 * stage}", x, count)
    x = conv_unit("features.layers.0", conv_unit("conv_sep", x)).flatten(1)
    return _bn(sd, "features.layers.3", x @ sd["features.layers.2.weight"].T)


def vit_forward(
    state: dict, dim: int, depth: int, images: torch.Tensor, heads: int = 8
) -> torch.Tensor:
    sd = _double(state)
    patch = sd["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(images.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    batch, tokens, _ = x.shape
    head_dim = dim // heads
    for index in range(depth):
        p = f"blocks.{index}"
        h = F.layer_norm(x, (dim,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"])
        q, k, v = (
            (h @ sd[f"{p}.attn.qkv.weight"].T).reshape(batch, tokens, 3, heads, head_dim).unbind(2)
        )
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + attended @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
        h = F.layer_norm(x, (dim,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"])
        h = torch.clamp(h @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"], 0, 6)
        x = x + h @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"]
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"]).flatten(1)
    x = _bn(sd, "feature.1", x @ sd["feature.0.weight"].T, eps=2e-5)
    return _bn(sd, "feature.3", x @ sd["feature.2.weight"].T, eps=2e-5)


# ---------------------------------------------------------------- tests

IRESNET_LAYERS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    "r2060": (3, 128, 896, 3),
}
MOBILEFACENETS = {
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_small": ((1, 4, 6, 2), 1),
    "mbf_large": ((2, 8, 12, 4), 4),
}
VITS = {"vit_t": (256, 12), "vit_s": (512, 12), "vit_b": (512, 24), "vit_l": (768, 24)}


def arcface_shapes(name: str, embedding_size: int = 512) -> Shapes:
    if name in IRESNET_LAYERS:
        return iresnet_shapes(IRESNET_LAYERS[name], embedding_size)
    if name in MOBILEFACENETS:
        return mobilefacenet_shapes(*MOBILEFACENETS[name], embedding_size)
    return vit_shapes(*VITS[name], embedding_size)


def arcface_forward(name: str, state: dict, images: torch.Tensor) -> torch.Tensor:
    if name in IRESNET_LAYERS:
        return iresnet_forward(state, IRESNET_LAYERS[name], images)
    if name in MOBILEFACENETS:
        return mobilefacenet_forward(state, MOBILEFACENETS[name][0], images)
    return vit_forward(state, *VITS[name], images)


def images_like_faces(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 112, 112, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_embeddings_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("name", list_models())
def test_state_dict_has_arcface_torch_names_and_shapes(name):
    with torch.device("meta"):
        model = get_model(name)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == arcface_shapes(name)


# (name, images, also run the model in float64). torch's float64 depthwise convolution is
# slow on CPU, so the MobileFaceNets embed one image, and mbf_large, built of the same
# layers as mbf, is checked in float32 only.
CASES = [("r18", 2, True), ("mbf", 1, True), ("mbf_large", 1, False), ("vit_t", 2, True)]


@pytest.mark.parametrize(("name", "count", "in_float64"), CASES)
def test_arcface_torch_checkpoint_reproduces_reference_embeddings(
    name, count, in_float64, tmp_path
):
    state = random_state(arcface_shapes(name, embedding_size=128), seed=1)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = load_arcface_torch(get_model(name, embedding_size=128), path).eval()
    images = images_like_faces(count)
    expected = arcface_forward(name, state, images)
    with torch.no_grad():
        single = model(images)
    assert single.dtype == torch.float32
    assert_embeddings_close(single, expected, rel=1e-4)
    if in_float64:
        with torch.no_grad():
            double = model.double()(images.double())
        assert_embeddings_close(double, expected, rel=1e-9)


def test_training_checkpoint_saved_under_ddp_loads_the_same_weights():
    state = random_state(arcface_shapes("mbf"), seed=2)
    checkpoint = {
        "epoch": 3,
        "state_dict_backbone": {f"module.{key}": value for key, value in state.items()},
    }
    model = load_arcface_torch(get_model("mbf"), checkpoint)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_vit_built_without_masking_drops_the_checkpoint_mask_token():
    state = random_state(arcface_shapes("vit_t"), seed=3)
    model = load_arcface_torch(get_model("vit_t", mask_ratio=0.0), state)
    loaded = model.state_dict()
    assert "mask_token" not in loaded
    assert loaded.keys() == state.keys() - {"mask_token"}
    assert torch.equal(loaded["pos_embed"], state["pos_embed"])


def test_checkpoint_of_another_network_is_refused_with_the_keys_named():
    r18 = random_state(arcface_shapes("r18"), seed=4)
    with pytest.raises(ValueError, match=r"missing keys \(layer1\.2\.bn1\.weight") as err:
        load_arcface_torch(get_model("r34"), r18)
    assert "network name and embedding_size" in str(err.value)
    with pytest.raises(ValueError, match=r"unexpected keys \(layer1\.2\."):
        load_arcface_torch(get_model("r18"), random_state(arcface_shapes("r34"), seed=4))
    with pytest.raises(
        ValueError, match=r"fc\.weight \[512, 25088\] in the checkpoint vs \[128, 25088\]"
    ):
        load_arcface_torch(get_model("r18", embedding_size=128), r18)


class Opaque:
    """An arbitrary pickled object: a safe (weights-only) load must refuse it."""


def test_unreadable_checkpoint_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth: no such checkpoint"):
        load_arcface_torch(get_model("mbf"), tmp_path / "missing.pth")
    torch.save(Opaque(), tmp_path / "object.pth")
    with pytest.raises(ValueError, match=r"object\.pth: not a state dict that can be read safely"):
        load_arcface_torch(get_model("mbf"), tmp_path / "object.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: holds a list, not a state dict"):
        load_arcface_torch(get_model("mbf"), tmp_path / "list.pth")
    state = random_state(arcface_shapes("mbf"), seed=5)
    state["conv_sep.layers.0.weight"] = [1.0]
    with pytest.raises(ValueError, match=r"not tensors: conv_sep\.layers\.0\.weight"):
        load_arcface_torch(get_model("mbf"), state)
