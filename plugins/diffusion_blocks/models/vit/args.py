"""Model args and flavors of the ViT classifier (block-wise and end to end)."""

from dataclasses import dataclass

from torch import nn

from ...errors import ConfigError, origin_of
from ..vision_layers import ImageTransformerArgs


@dataclass
class ViTArgs(ImageTransformerArgs):
    mlp_dim: int = 0
    """Hidden width of every layer's MLP; 0 = int(dim * mlp_ratio)."""

    dropout: float = 0.0
    """Training-only dropout on the token embeddings (patches + positions, including the
    noisy label token / [CLS]), the attention output and the MLP output, as Hugging
    Face's hidden_dropout_prob. `[model] dropout` overrides the flavor's value."""

    attention_dropout: float = 0.0
    """Training-only dropout on the attention probabilities (Hugging Face's
    attention_probs_dropout_prob). `[model] attention_dropout` overrides it."""

    label_init_std: float = 1.0
    """Std of the label table's normal init (rows are L2-normalised when read, so this
    sets how far an AdamW step turns a row: smaller = faster)."""

    sampling_steps_per_block: int = 1
    """Filled from `[diffusion_blocks]` by update_from_config."""

    sampler: str = "euler"
    """Filled from `[diffusion_blocks]` by update_from_config: 'euler' or 'heun'."""

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def mlp_hidden_dim(self) -> int:
        return self.mlp_dim or int(self.dim * self.mlp_ratio)

    def layer_kwargs(self) -> dict:
        """MLP width and dropout rates for the layer constructors."""
        return {
            "mlp_dim": self.mlp_hidden_dim, "dropout": self.dropout,
            "attention_dropout": self.attention_dropout,
        }

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.sampling_steps_per_block = job_config.diffusion_blocks.sampling_steps_per_block
        self.sampler = job_config.diffusion_blocks.sampler
        for key in ("dropout", "attention_dropout"):
            value = getattr(job_config.model, key, None)
            if value is not None:
                setattr(self, key, value)
        ac = job_config.activation_checkpoint
        uses_dropout = max(self.dropout, self.attention_dropout) > 0
        if uses_dropout and ac.mode != "none" and not ac.preserve_rng_state:
            raise ConfigError(
                f"{origin_of(job_config, 'activation_checkpoint', 'preserve_rng_state')}: "
                "[activation_checkpoint] preserve_rng_state = false would recompute the "
                "ViT's dropout with other masks (wrong gradients); set it to true, "
                "mode = \"none\", or [model] dropout = attention_dropout = 0"
            )

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        nparams = sum(p.numel() for p in model.parameters())
        tokens = self.num_patches + 1
        return nparams, 6 * nparams * tokens


# the paper's CIFAR shape (12 layers, width 128, 4 heads, patch 4) with the official
# code's recipe: Hugging Face ViTConfig's default MLP width 3072 and dropout 0.1
# (hidden and attention), label table init std 0.02
PAPER_CIFAR = dict(
    image_size=32, in_channels=3, patch_size=4, dim=128, n_layers=12, n_heads=4,
    mlp_dim=3072, dropout=0.1, attention_dropout=0.1, label_init_std=0.02,
)


def vit_flavors() -> dict[str, ViTArgs]:
    return {
        # 8x8 grey digits, 16 patches: trains in minutes on a CPU
        "digits": ViTArgs(
            image_size=8, in_channels=1, patch_size=2, num_classes=10,
            dim=64, n_layers=4, n_heads=4,
        ),
        "cifar100": ViTArgs(num_classes=100, **PAPER_CIFAR),
        "cifar10": ViTArgs(num_classes=10, **PAPER_CIFAR),
    }
