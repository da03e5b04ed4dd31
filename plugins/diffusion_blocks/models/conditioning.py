"""Noise-level conditioning shared by every block-partitioned architecture.

DiT-style: a sinusoidal embedding of c_noise followed by an MLP gives the condition
vector c; each layer reads shift/scale/gate from `Linear(SiLU(c))` (AdaLN-Zero, zero
initialised so the layer starts as the identity); a final AdaLN modulates the denoised
estimate before the shared head.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def per_row(modulation: torch.Tensor) -> torch.Tensor:
    """A modulation tensor ready to broadcast over the rows of x (B, S, D): one per
    sequence (B, D) becomes (B, 1, D); one per row (B, S, D) is used as is."""
    return modulation.unsqueeze(1) if modulation.dim() == 2 else modulation


def modulate(x_BTD: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """x * (1 + scale) + shift; shift and scale (B, D) per sequence or (B, T, D) per row."""
    return x_BTD * (1 + per_row(scale)) + per_row(shift)


def sinusoidal_embedding(
    c_noise: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """c_noise of any shape (...) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=c_noise.device)
        / half
    )
    # c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]; scale it up so the
    # high-frequency channels see a useful range (DiT feeds timesteps 0..1000).
    angles = 1000.0 * c_noise.float()[..., None] * freqs
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class SigmaEmbedder(nn.Module):
    """c_noise (B,) -> condition vector c (B, dim) (or (B, T) -> (B, T, dim), one per
    row); dim may be narrower than the model (each layer's Linear(SiLU(c)) then costs
    6 * dim * width instead of 6 * width^2)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(c_noise, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    def init_weights(self):
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)


class AdaLNModulation(nn.Module):
    """c (B, dim) -> `num_chunks` tensors of shape (B, out_dim), zero at init (or per
    row: (B, S, dim) -> (B, S, out_dim))."""

    def __init__(self, cond_dim: int, out_dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(cond_dim, num_chunks * out_dim)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond)).chunk(self.num_chunks, dim=-1)

    def init_weights(self):
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


class FinalAdaLN(nn.Module):
    """norm (no affine) then shift/scale from c: the last step before the shared head."""

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.modulation = AdaLNModulation(cond_dim or dim, dim, num_chunks=2)

    def forward(self, x_BTD: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """cond: (B, dim) per sequence or (B, T, dim) per row."""
        shift, scale = self.modulation(cond)
        return modulate(self.norm(x_BTD), shift, scale)

    def init_weights(self):
        self.modulation.init_weights()
