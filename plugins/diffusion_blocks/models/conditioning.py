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


def modulate(x_BTD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor):
    return x_BTD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def sinusoidal_embedding(
    c_noise_B: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=c_noise_B.device)
        / half
    )
    # c_noise = ln(sigma)/4 lies in about [-1.6, 1.1]; scale it up so the
    # high-frequency channels see a useful range (DiT feeds timesteps 0..1000).
    angles_BH = 1000.0 * c_noise_B.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles_BH), torch.sin(angles_BH)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class SigmaEmbedder(nn.Module):
    """c_noise (B,) -> condition vector c (B, dim); dim may be narrower than the model
    (each layer's Linear(SiLU(c)) then costs 6 * dim * width instead of 6 * width^2)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )

    def forward(self, c_noise_B: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(c_noise_B, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))

    def init_weights(self):
        for linear in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)


class AdaLNModulation(nn.Module):
    """c (B, dim) -> `num_chunks` tensors of shape (B, out_dim), zero at init."""

    def __init__(self, cond_dim: int, out_dim: int, num_chunks: int):
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(cond_dim, num_chunks * out_dim)

    def forward(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(cond_BD)).chunk(self.num_chunks, dim=-1)

    def init_weights(self):
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


class FinalAdaLN(nn.Module):
    """norm (no affine) then shift/scale from c: the last step before the shared head."""

    def __init__(self, dim: int, eps: float = 1e-6, cond_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.modulation = AdaLNModulation(cond_dim or dim, dim, num_chunks=2)

    def forward(self, x_BTD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond_BD)
        return modulate(self.norm(x_BTD), shift, scale)

    def init_weights(self):
        self.modulation.init_weights()
