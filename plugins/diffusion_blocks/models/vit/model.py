"""Block-partitioned ViT classifier (docs/method.md sections 4-6) and its end-to-end twin.

DiffusionBlocksViT denoises a LABEL EMBEDDING conditioned on the image. The clean
target y is the L2-normalised row of a learnable label table; the noisy z = y + sigma
eps, scaled by c_in, takes the [CLS] position 0 in front of the patch tokens. Each
layer is DiT-style adaLN-Zero on c_noise; after the shared final norm the output h at
position 0 gives D = c_skip z + c_out h, and logits = head(final_adaln(D, c)).

Inference (`classify`): z ~ N(0, I) sqrt(1 + sigma_max^2), Euler (or Heun: `[diffusion_blocks]
sampler`) steps over the equi-probability grid, each evaluation run by the block owning
its sigma only, with the denoised
estimate softmax(logits) @ normalised label table; the class is the argmax of the
final logits, read at sigma_min by the block owning it (as the official code does). PlainViT is the same patch embedding, layers and head with a real [CLS] token.

Both take the flavor's MLP width and dropout rates (args.py); dropout acts in training
only and reaches the tokens after positions are added, label token / [CLS] included.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import diffusion
from ...diffusion.sampling import ODE_SAMPLERS
from ..conditioning import FinalAdaLN, SigmaEmbedder
from ..vision_layers import AdaLNZeroLayer, PatchEmbed, PreNormLayer
from .args import ViTArgs


class ViTDenoised(NamedTuple):
    logits_BK: torch.Tensor       # class scores from head(final_adaln(D, c))
    label_estimate_BD: torch.Tensor  # softmax(logits) @ normalised label table


class ViTShared(nn.Module):
    """Patch embedding, learned positions (position 0 = [CLS] / label token), layers
    in `self.layers` (a ModuleDict with string keys, as torchtitan's AC/compile expect)."""

    def __init__(self, args: ViTArgs, layer_cls: type[nn.Module]):
        super().__init__()
        self.model_args = args
        self.patch_embed = PatchEmbed(args.in_channels, args.patch_size, args.dim)
        self.pos_embed = nn.Parameter(torch.empty(1, args.num_patches + 1, args.dim))
        self.embed_dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleDict(
            {str(i): layer_cls(args.dim, args.n_heads, args.mlp_ratio, args.norm_eps,
                               **args.layer_kwargs())
             for i in range(args.n_layers)}
        )
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.num_classes)

    def tokens_with_first(self, images_BCHW: torch.Tensor, first_BD: torch.Tensor):
        """dropout([first ; patches] + positions), shape (B, 1 + num_patches, D); the
        dropout (training only) reaches the first token too, as in Hugging Face's ViT."""
        patches_BND = self.patch_embed(images_BCHW)
        tokens_BTD = torch.cat([first_BD[:, None].to(patches_BND.dtype), patches_BND], 1)
        return self.embed_dropout(tokens_BTD + self.pos_embed)

    def init_shared_weights(self) -> None:
        self.patch_embed.init_weights()
        nn.init.normal_(self.pos_embed, std=0.02)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)


class DiffusionBlocksViT(ViTShared):
    """The label denoiser; a forward pass runs only `block`'s layers."""

    def __init__(self, args: ViTArgs):
        assert args.partition is not None, "call update_from_config first"
        super().__init__(args, AdaLNZeroLayer)
        self.partition = args.partition
        self.sampling_steps_per_block = args.sampling_steps_per_block
        self.sampler = args.sampler
        self.label_embed = nn.Embedding(args.num_classes, args.dim)
        self.sigma_embedder = SigmaEmbedder(args.dim)
        self.final_adaln = FinalAdaLN(args.dim, eps=args.norm_eps)

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        self.init_shared_weights()
        nn.init.normal_(self.label_embed.weight, std=self.model_args.label_init_std)
        self.sigma_embedder.init_weights()
        self.final_adaln.init_weights()

    def label_table(self) -> torch.Tensor:
        """The L2-normalised label embeddings (K, D): clean targets and inference basis."""
        return F.normalize(self.label_embed.weight, dim=-1)

    def forward(
        self, images_BCHW: torch.Tensor, *, block: int, sigma_B: torch.Tensor,
        z_BD: torch.Tensor | None = None, labels_B: torch.Tensor | None = None,
        noise_BD: torch.Tensor | None = None,
    ) -> ViTDenoised:
        """Denoise z (given, at inference) or y(labels) + sigma noise (training) with
        block `block`. Noising happens here so the label table is read inside the FSDP
        root's forward."""
        table_KD = self.label_table()
        if z_BD is None:
            assert labels_B is not None and noise_BD is not None, "need z or labels + noise"
            z_BD = table_KD[labels_B] + sigma_B.to(table_KD.dtype)[:, None] * noise_BD
        sigma_data = self.partition.schedule.sigma_data
        sigma_B = sigma_B.to(z_BD.dtype)
        label_token_BD = diffusion.c_in(sigma_B[:, None], sigma_data) * z_BD
        x_BTD = self.tokens_with_first(images_BCHW, label_token_BD)
        cond_BD = self.sigma_embedder(diffusion.c_noise(sigma_B))
        for layer_id in self.partition.layer_ranges[block]:
            x_BTD = self.layers[str(layer_id)](x_BTD, cond_BD)
        h_BD = self.norm(x_BTD[:, 0])
        denoised_BD = diffusion.denoised_estimate(z_BD, h_BD, sigma_B, sigma_data)
        logits_BK = self.head(self.final_adaln(denoised_BD[:, None], cond_BD)[:, 0])
        label_estimate_BD = diffusion.expected_clean_embedding(logits_BK, table_KD)
        return ViTDenoised(logits_BK, label_estimate_BD)

    @torch.no_grad()
    def classify(
        self, images_BCHW: torch.Tensor, generator: torch.Generator | None = None,
        steps_per_block: int | None = None, sampler: str | None = None,
    ) -> torch.Tensor:
        """Class logits after Euler or Heun sampling of the label embedding (B, K)."""
        steps = steps_per_block or self.sampling_steps_per_block
        sample = ODE_SAMPLERS[sampler or self.sampler]
        plan = self.partition.sampling_plan(self.partition.num_blocks * steps)
        schedule = self.partition.schedule
        scale = diffusion.initial_noise_scale(schedule.sigma_max, data_is_unit_norm=True)
        z_BD = scale * torch.randn(
            images_BCHW.shape[0], self.model_args.dim, generator=generator,
            device=images_BCHW.device,
        )

        def denoise(z_BD, sigma, block) -> ViTDenoised:
            sigma_B = torch.full((z_BD.shape[0],), sigma, device=z_BD.device)
            # self(...) rather than self.forward: FSDP hooks run on the root call
            return self(images_BCHW, block=block, sigma_B=sigma_B, z_BD=z_BD)

        z_BD = sample(
            lambda z, sigma, block: denoise(z, sigma, block).label_estimate_BD.to(z.dtype),
            z_BD, plan,
        )
        # the final logits: the block owning sigma_min reads the sampled label
        final_block = int(self.partition.block_of_level(torch.tensor([schedule.sigma_min])))
        return denoise(z_BD, schedule.sigma_min, final_block).logits_BK


class PlainViT(ViTShared):
    """The end-to-end baseline: a learned [CLS] token, all layers, CE on its output."""

    def __init__(self, args: ViTArgs):
        super().__init__(args, PreNormLayer)
        self.cls_token = nn.Parameter(torch.empty(1, args.dim))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        self.init_shared_weights()
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        cls_BD = self.cls_token.expand(images_BCHW.shape[0], -1)
        x_BTD = self.tokens_with_first(images_BCHW, cls_BD)
        for layer in self.layers.values():
            x_BTD = layer(x_BTD)
        return self.head(self.norm(x_BTD[:, 0]))

    @torch.no_grad()
    def classify(self, images_BCHW: torch.Tensor, generator=None, steps_per_block=None,
                 sampler=None):
        return self(images_BCHW)
