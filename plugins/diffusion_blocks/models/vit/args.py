"""Model args and flavors of the ViT classifier (block-wise and end to end)."""

from dataclasses import dataclass

from torch import nn

from ..vision_layers import ImageTransformerArgs


@dataclass
class ViTArgs(ImageTransformerArgs):
    sampling_steps_per_block: int = 1
    """Filled from `[diffusion_blocks]` by update_from_config."""

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.sampling_steps_per_block = job_config.diffusion_blocks.sampling_steps_per_block

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        nparams = sum(p.numel() for p in model.parameters())
        tokens = self.num_patches + 1
        return nparams, 6 * nparams * tokens


def vit_flavors() -> dict[str, ViTArgs]:
    return {
        # 8x8 grey digits, 16 patches: trains in minutes on a CPU
        "digits": ViTArgs(
            image_size=8, in_channels=1, patch_size=2, num_classes=10,
            dim=64, n_layers=4, n_heads=4,
        ),
        # the paper's CIFAR shape (12 layers, width 128, 4 heads, patch 4)
        "cifar100": ViTArgs(
            image_size=32, in_channels=3, patch_size=4, num_classes=100,
            dim=128, n_layers=12, n_heads=4,
        ),
        "cifar10": ViTArgs(
            image_size=32, in_channels=3, patch_size=4, num_classes=10,
            dim=128, n_layers=12, n_heads=4,
        ),
    }
