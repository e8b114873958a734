"""MobileFaceNet (``mbf``), its half-width ``mbf_small`` and the wider, deeper ``mbf_large``.

Module and parameter names equal arcface_torch's, so its checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facescale.backbones.base import Backbone
from facescale.face import FACE_SIZE

HEAD_CHANNELS = 512
FINAL_GRID = FACE_SIZE // 16  # the face halved four times


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, then PReLU unless ``linear``: MobileFaceNet's building unit."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        linear: bool = False,
    ) -> None:
        super().__init__()
        conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False
        )
        layers: list[nn.Module] = [conv, nn.BatchNorm2d(out_channels)]
        if not linear:
            layers.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 expansion to ``hidden``, depthwise 3x3 (stride), linear 1x1 projection (+ shortcut)."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBN(in_channels, hidden),
            ConvBN(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            ConvBN(hidden, out_channels, linear=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` residual DepthWise blocks at constant width and resolution."""

    def __init__(self, channels: int, hidden: int, num_blocks: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden, 1, residual=True) for _ in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise 7x7 conv + BN, flatten, dropout, Linear (no bias), BatchNorm1d."""

    def __init__(self, embedding_size: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBN(HEAD_CHANNELS, HEAD_CHANNELS, FINAL_GRID, groups=HEAD_CHANNELS, linear=True),
            nn.Flatten(),
            nn.Linear(HEAD_CHANNELS, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, flatten, fc, bn = self.layers
        return bn(fc(self.dropout(flatten(pool(x)))))


class MobileFaceNet(Backbone):
    """Stem, four groups of DepthWise blocks (``blocks`` per group), 1x1 conv to 512, GDC head.

    ``scale`` multiplies the widths 64 and 128; mbf is blocks (1, 4, 6, 2) with scale 2,
    mbf_small the same with scale 1 (MobileFaceNet's published size, half mbf's multiply-adds)
    and mbf_large (2, 8, 12, 4) with scale 4. The 1x1 conv and the head run in full precision.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_size: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(embedding_size)
        if len(blocks) != 4 or min(blocks) < 1 or scale < 1:
            raise ValueError(
                f"MobileFaceNet needs 4 block counts >= 1 and scale >= 1, "
                f"got blocks={blocks}, scale={scale}"
            )
        narrow, wide = 64 * scale, 128 * scale
        if blocks[0] == 1:
            first: nn.Module = ConvBN(narrow, narrow, kernel=3, padding=1, groups=64)
        else:
            first = Residual(narrow, 128, blocks[0])
        self.layers = nn.ModuleList(
            [
                ConvBN(3, narrow, kernel=3, stride=2, padding=1),
                first,
                DepthWise(narrow, narrow, 128, stride=2, residual=False),
                Residual(narrow, 128, blocks[1]),
                DepthWise(narrow, wide, 256, stride=2, residual=False),
                Residual(wide, 256, blocks[2]),
                DepthWise(wide, wide, 512, stride=2, residual=False),
                Residual(wide, 256, blocks[3]),
            ]
        )
        self.conv_sep = ConvBN(wide, HEAD_CHANNELS)
        self.features = GDC(embedding_size, dropout)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(self.layers, images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.features(self.conv_sep(features))
