"""IResNet, the ResNet variant of ArcFace: r18, r34, r50, r100, r200 and the very deep r2060.

Module and parameter names equal arcface_torch's, so its checkpoints load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from facescale.backbones.base import Backbone
from facescale.face import FACE_SIZE

STAGE_WIDTHS = (64, 128, 256, 512)
FINAL_GRID = FACE_SIZE // 16  # the face halved by each of the four stages


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus a shortcut (1x1 conv + BN if shapes differ)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def make_stage(in_channels: int, channels: int, num_blocks: int) -> nn.Sequential:
    """``num_blocks`` blocks; the first halves the resolution and changes the width."""
    blocks = [IBasicBlock(in_channels, channels, stride=2)]
    blocks += [IBasicBlock(channels, channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class IResNet(Backbone):
    """Stem conv3x3 + BN + PReLU, four stages, then BN2d-Dropout-FC-BN1d to the embedding.

    ``layers`` gives the number of blocks per stage, e.g. (3, 4, 14, 3) for r50. The final
    BatchNorm1d has its scale frozen at 1 (arcface_torch's ``features`` layer).
    """

    def __init__(
        self, layers: Sequence[int], embedding_size: int = 512, dropout: float = 0.0
    ) -> None:
        super().__init__(embedding_size)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"IResNet needs 4 stages of >= 1 block each, got layers={layers}")
        self.conv1 = conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        self.layer1 = make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], layers[0])
        self.layer2 = make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], layers[1])
        self.layer3 = make_stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], layers[2])
        self.layer4 = make_stage(STAGE_WIDTHS[2], STAGE_WIDTHS[3], layers[3])
        self.bn2 = nn.BatchNorm2d(STAGE_WIDTHS[3])
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(STAGE_WIDTHS[3] * FINAL_GRID * FINAL_GRID, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
        self.features.weight.requires_grad_(False)

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(images)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self.run_blocks(stage, x)
        return self.dropout(torch.flatten(self.bn2(x), 1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(features))
