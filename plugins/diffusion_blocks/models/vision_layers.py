"""Transformer pieces shared by the ViT classifier and the DiT generator.

Two layer kinds with the same attention and MLP: `PreNormLayer` (the plain ViT of the
end-to-end baseline) and `AdaLNZeroLayer` (DiT-style: norms without affine parameters,
shift/scale/gate from the condition vector, zero-initialised so a fresh layer is the
identity). Both take an explicit MLP width (else dim * mlp_ratio) and dropout rates
(0 by default: the DiT uses none). Patchify / unpatchify convert between images and
token sequences.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.protocols.model import BaseModelArgs

from ..diffusion.partition import BlockPartition
from .conditioning import AdaLNModulation, modulate


class Attention(nn.Module):
    """Bidirectional multi-head self-attention (no mask: every patch sees every patch).
    Dropout (training only, as Hugging Face's ViT): `attention_dropout` on the attention
    probabilities, `dropout` on the output projection."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        batch, seq_len, dim = x_BTD.shape
        qkv = self.qkv(x_BTD).view(batch, seq_len, 3, self.n_heads, dim // self.n_heads)
        q_BHTK, k_BHTK, v_BHTK = qkv.permute(2, 0, 3, 1, 4)
        out_BHTK = F.scaled_dot_product_attention(
            q_BHTK, k_BHTK, v_BHTK,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.dropout(self.proj(out_BHTK.transpose(1, 2).reshape(batch, seq_len, dim)))


class MLP(nn.Module):
    """fc1, GELU, fc2, then `dropout` (training only) on the output."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x_BTD), approximate="tanh")))


def _init_linears(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            nn.init.zeros_(sub.bias)


class PreNormLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)): the plain ViT layer."""

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: float, eps: float = 1e-6, *,
        mlp_dim: int | None = None, dropout: float = 0.0, attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=eps)
        self.attention = Attention(dim, n_heads, dropout, attention_dropout)
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim or int(dim * mlp_ratio), dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTD = x_BTD + self.attention(self.attention_norm(x_BTD))
        return h_BTD + self.mlp(self.mlp_norm(h_BTD))

    def init_weights(self) -> None:
        _init_linears(self)
        for norm in (self.attention_norm, self.mlp_norm):
            norm.reset_parameters()


class AdaLNZeroLayer(nn.Module):
    """The same layer with DiT's adaLN-Zero: shift/scale/gate for attention and MLP
    from the condition vector (the noise level, plus the class for DiT)."""

    def __init__(
        self, dim: int, n_heads: int, mlp_ratio: float, eps: float = 1e-6, *,
        mlp_dim: int | None = None, dropout: float = 0.0, attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attention = Attention(dim, n_heads, dropout, attention_dropout)
        self.mlp_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.mlp = MLP(dim, mlp_dim or int(dim * mlp_ratio), dropout)
        self.adaln = AdaLNModulation(dim, dim, num_chunks=6)

    def forward(self, x_BTD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(cond_BD)
        attn_out = self.attention(modulate(self.attention_norm(x_BTD), shift_a, scale_a))
        h_BTD = x_BTD + gate_a.unsqueeze(1) * attn_out
        mlp_out = self.mlp(modulate(self.mlp_norm(h_BTD), shift_m, scale_m))
        return h_BTD + gate_m.unsqueeze(1) * mlp_out

    def init_weights(self) -> None:
        _init_linears(self)
        self.adaln.init_weights()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, dim) by a strided convolution."""

    def __init__(self, in_channels: int, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)

    def init_weights(self) -> None:
        # as a linear layer on flattened patches (DiT, MAE)
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


def check_patch_grid(image_size: int, patch_size: int) -> int:
    """Patches per side; raises ValueError when the patch size does not tile the image."""
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"patch_size {patch_size} does not tile image_size {image_size}: pick a "
            f"divisor of {image_size}"
        )
    return image_size // patch_size


def unpatchify(
    patches_BTF: torch.Tensor, channels: int, patch_size: int
) -> torch.Tensor:
    """(B, T, p*p*C) tokens in row-major patch order -> (B, C, H, W)."""
    batch, num_patches, _ = patches_BTF.shape
    side = math.isqrt(num_patches)
    assert side * side == num_patches, num_patches
    x = patches_BTF.view(batch, side, side, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # B, C, rows, p, cols, p
    return x.reshape(batch, channels, side * patch_size, side * patch_size)


def patchify(images_BCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The inverse of unpatchify: (B, C, H, W) -> (B, T, p*p*C)."""
    batch, channels, height, width = images_BCHW.shape
    p = patch_size
    x = images_BCHW.view(batch, channels, height // p, p, width // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # B, rows, cols, p, p, C
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def sincos_positions_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (grid_size^2, dim), as in DiT/MAE."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs dim % 4 == 0, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(positions: torch.Tensor) -> torch.Tensor:
        freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
        angles = positions.flatten()[:, None] * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()


@dataclass
class ImageTransformerArgs(BaseModelArgs):
    """What the ViT and the DiT share: image and patch shapes, transformer width and
    depth, and the block partition filled from `[diffusion_blocks]`."""

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    num_classes: int = 10
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    partition: BlockPartition | None = None
    """Filled from `[diffusion_blocks]` by update_from_config."""

    @property
    def grid_size(self) -> int:
        return check_patch_grid(self.image_size, self.patch_size)

    def update_from_config(self, job_config, **kwargs) -> None:
        check_patch_grid(self.image_size, self.patch_size)
        self.partition = BlockPartition.from_job_config(job_config, self.n_layers)
