"""Block-partitioned class-conditional DiT (docs/method.md sections 4-6) and its end-to-end twin.

The network F is DiT (Peebles & Xie 2023): patchify, fixed 2-D sin-cos positions,
adaLN-Zero layers conditioned on c = sigma_embedding(c_noise) + class_embedding(y),
a final adaLN and a zero-initialised linear back to patches. The class table has one
extra row, the "null" class, used for dropped labels (classifier-free guidance).
EDM preconditioning wraps it: F sees c_in z, and D = c_skip z + c_out F.

DiffusionBlocksDiT runs only one block's layers per forward. `sample` walks Euler
over the equi-probability sigma grid from z ~ N(0, I) sigma_max, each step by the block
owning its sigma, with D = D_uncond + s (D_cond - D_uncond). EndToEndDiT is the same
network with a single block holding every layer: one denoiser for all sigma, trained
with sigma from the global truncated log-normal.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import diffusion
from ...diffusion.sampling import classifier_free_guidance, ODE_SAMPLERS
from ..conditioning import FinalAdaLN, SigmaEmbedder
from ..vision_layers import AdaLNZeroLayer, PatchEmbed, sincos_positions_2d, unpatchify
from .args import DiTArgs


class DiffusionBlocksDiT(nn.Module):
    def __init__(self, args: DiTArgs):
        assert args.partition is not None, "call update_from_config first"
        super().__init__()
        self.model_args = args
        self.partition = args.partition
        self.label_dropout = args.label_dropout
        self.null_class = args.num_classes
        self.patch_embed = PatchEmbed(args.in_channels, args.patch_size, args.dim)
        self.register_buffer(
            "pos_embed", torch.empty(1, args.grid_size**2, args.dim), persistent=False
        )
        self.sigma_embedder = SigmaEmbedder(args.dim)
        self.class_embed = nn.Embedding(args.num_classes + 1, args.dim)  # + null class
        self.layers = nn.ModuleDict(
            {str(i): AdaLNZeroLayer(args.dim, args.n_heads, args.mlp_ratio, args.norm_eps)
             for i in range(args.n_layers)}
        )
        self.final_adaln = FinalAdaLN(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.patch_size**2 * args.in_channels)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        device = buffer_device or self.pos_embed.device
        self.pos_embed = sincos_positions_2d(self.model_args.dim, self.model_args.grid_size)[
            None
        ].to(device=device, dtype=self.patch_embed.proj.weight.dtype)
        self.patch_embed.init_weights()
        self.sigma_embedder.init_weights()
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for layer in self.layers.values():
            layer.init_weights()
        self.final_adaln.init_weights()
        nn.init.zeros_(self.head.weight)  # DiT: the output starts at zero
        nn.init.zeros_(self.head.bias)

    def forward(
        self, z_BCHW: torch.Tensor, sigma_B: torch.Tensor, classes_B: torch.Tensor,
        *, block: int,
    ) -> torch.Tensor:
        """The denoised estimate D (B, C, H, W) of block `block` at noise levels sigma."""
        args = self.model_args
        sigma_data = self.partition.schedule.sigma_data
        sigma_B = sigma_B.to(z_BCHW.dtype)
        scaled_BCHW = diffusion.c_in(sigma_B[:, None, None, None], sigma_data) * z_BCHW
        x_BTD = self.patch_embed(scaled_BCHW) + self.pos_embed
        cond_BD = self.sigma_embedder(diffusion.c_noise(sigma_B)) + self.class_embed(classes_B)
        for layer_id in self.partition.layer_ranges[block]:
            x_BTD = self.layers[str(layer_id)](x_BTD, cond_BD)
        patches_BTF = self.head(self.final_adaln(x_BTD, cond_BD))
        network_BCHW = unpatchify(patches_BTF, args.in_channels, args.patch_size)
        return diffusion.denoised_estimate(z_BCHW, network_BCHW, sigma_B, sigma_data)

    def drop_labels(self, classes_B: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace a `label_dropout` share of the labels by the null class."""
        dropped_B = torch.rand(
            classes_B.shape, generator=generator, device=classes_B.device
        ) < self.label_dropout
        return torch.where(dropped_B, torch.full_like(classes_B, self.null_class), classes_B)

    def guided_denoise(
        self, z_BCHW: torch.Tensor, sigma: float, classes_B: torch.Tensor, block: int,
        cfg_scale: float,
    ) -> torch.Tensor:
        """D with classifier-free guidance: the conditional and the null-class estimate
        in one batch, combined as D_u + s (D_c - D_u). At s = 1 that is D_c: one pass."""
        batch = z_BCHW.shape[0]
        if cfg_scale == 1.0:
            sigma_B = torch.full((batch,), sigma, device=z_BCHW.device)
            return self(z_BCHW, sigma_B, classes_B, block=block)
        sigma_B = torch.full((2 * batch,), sigma, device=z_BCHW.device)
        null_B = torch.full_like(classes_B, self.null_class)
        # self(...) rather than self.forward: FSDP hooks run on the root call
        denoised = self(
            torch.cat([z_BCHW, z_BCHW]), sigma_B, torch.cat([classes_B, null_B]), block=block
        )
        denoised_cond, denoised_uncond = denoised.split(batch)
        return classifier_free_guidance(denoised_cond, denoised_uncond, cfg_scale)

    @torch.no_grad()
    def sample(
        self, classes_B: torch.Tensor, num_steps: int = 50, cfg_scale: float = 2.0,
        generator: torch.Generator | None = None, sampler: str = "euler",
    ) -> torch.Tensor:
        """Images (B, C, H, W), roughly in [-1, 1], of the given classes: `num_steps`
        steps of `sampler` ('euler' or 'heun', sampling.ODE_SAMPLERS) over the grid."""
        args = self.model_args
        sigma_max = self.partition.schedule.sigma_max
        z_BCHW = diffusion.initial_noise_scale(sigma_max, data_is_unit_norm=False) * torch.randn(
            classes_B.shape[0], args.in_channels, args.image_size, args.image_size,
            generator=generator, device=classes_B.device,
        )

        def denoise(z, sigma, block):
            return self.guided_denoise(z, sigma, classes_B, block, cfg_scale)

        return ODE_SAMPLERS[sampler](denoise, z_BCHW, self.partition.sampling_plan(num_steps))


class EndToEndDiT(DiffusionBlocksDiT):
    """The same DiT as one denoiser over all sigma: every forward runs every layer."""

    def __init__(self, args: DiTArgs):
        super().__init__(args)
        self.partition = args.partition.single_block()
