"""Model args and flavors of the class-conditional DiT (block-wise and end to end)."""

from dataclasses import dataclass

from torch import nn

from ..vision_layers import ImageTransformerArgs


@dataclass
class DiTArgs(ImageTransformerArgs):
    dim: int = 128
    label_dropout: float = 0.1
    """Filled from `[diffusion_blocks]` by update_from_config."""

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.label_dropout = job_config.diffusion_blocks.label_dropout

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        nparams = sum(p.numel() for p in model.parameters())
        return nparams, 6 * nparams * self.grid_size**2


def dit_flavors() -> dict[str, DiTArgs]:
    return {
        # 8x8 grey digits: trains in minutes on a CPU
        "digits": DiTArgs(
            image_size=8, in_channels=1, patch_size=2, num_classes=10,
            dim=128, n_layers=4, n_heads=4,
        ),
        # DiT paper shapes. S/2 on CIFAR-10 images (the paper's CIFAR run),
        # L/2 on ImageNet-256 SD-VAE latents (32 x 32 x 4).
        "DiT-S/2": DiTArgs(
            image_size=32, in_channels=3, patch_size=2, num_classes=10,
            dim=384, n_layers=12, n_heads=6,
        ),
        "DiT-L/2": DiTArgs(
            image_size=32, in_channels=4, patch_size=2, num_classes=1000,
            dim=1024, n_layers=24, n_heads=16,
        ),
    }
