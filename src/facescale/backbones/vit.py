"""Vision Transformer for 112x112 faces (vit_t/s/b/l): 9x9 patches, no class token.

The 144 patch tokens are normalised and flattened into a Linear-BN-Linear-BN embedding head.
In training a share ``mask_ratio`` of the tokens is dropped before the transformer blocks and
replaced by a learned mask token after them (arcface_torch's recipe). Module and parameter
names equal arcface_torch's, so its checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facescale.backbones.base import Backbone, at_least_fp32, full_precision
from facescale.face import FACE_SIZE


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches projected to ``dim``; returns [B, patches, dim]."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(QK^T)V core runs in full precision."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"ViT width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = at_least_fp32(qkv).permute(2, 0, 3, 1, 4).unbind(0)
        with full_precision(x.device.type):
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Linear -> ReLU6 -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each with drop-path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """Patch embedding + learned position embedding, ``depth`` blocks, LayerNorm, embedding head.

    Drop-path rates grow linearly from 0 to ``drop_path_rate`` over the blocks.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int = 8,
        embedding_size: int = 512,
        dropout: float = 0.0,
        patch_size: int = 9,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
    ) -> None:
        super().__init__(embedding_size)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.num_patches = (FACE_SIZE // patch_size) ** 2
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        if mask_ratio > 0:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.normal_(self.mask_token, std=0.02)
        self.dropout = nn.Dropout(dropout)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),
            nn.BatchNorm1d(dim, eps=2e-5),
            nn.Linear(dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward_body(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = self.drop_tokens(x)
        x = self.norm(at_least_fp32(self.run_blocks(self.blocks, x)))
        if masking:
            x = self.restore_tokens(x, restore)
        return x.flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.feature(self.dropout(features))

    def drop_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` share of each sample's tokens; also return the
        permutation that puts the kept tokens, followed by the dropped ones, back in place."""
        batch, tokens, dim = x.shape
        kept = int(tokens * (1 - self.mask_ratio))
        order = torch.rand(batch, tokens, device=x.device).argsort(dim=1)
        index = order[:, :kept, None].expand(-1, -1, dim)
        return torch.gather(x, 1, index), order.argsort(dim=1)

    def restore_tokens(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens for the dropped positions and undo the shuffle of drop_tokens."""
        batch, kept, dim = x.shape
        fill = self.mask_token.to(x.dtype).expand(batch, restore.shape[1] - kept, dim)
        full = torch.cat([x, fill], dim=1)
        return torch.gather(full, 1, restore[:, :, None].expand(-1, -1, dim))
