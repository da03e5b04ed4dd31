"""The `diffusion_blocks` model converter: `[model] converters = ["diffusion_blocks"]`
turns a stock torchtitan llama3 Transformer into the block-partitioned denoiser."""

from torch import nn
from torchtitan.models.llama3 import Transformer

from .models.llama import convert_to_denoiser
from .partition import BlockPartition


class DiffusionBlocksConverter:
    def __init__(self, job_config, parallel_dims):
        if not hasattr(job_config, "diffusion_blocks"):
            raise ValueError(
                "the 'diffusion_blocks' converter needs the [diffusion_blocks] section: "
                "set [job] custom_config_module = 'diffusion_blocks.config' or launch "
                "with diffusion_blocks.train"
            )
        self.job_config = job_config

    def convert(self, model: nn.Module) -> None:
        if not isinstance(model, Transformer):
            raise ValueError(
                f"the 'diffusion_blocks' converter converts torchtitan llama3 "
                f"Transformer models, got {type(model).__name__}"
            )
        partition = BlockPartition.from_job_config(self.job_config, len(model.layers))
        convert_to_denoiser(
            model, partition, self.job_config.diffusion_blocks.adaln_cond_dim
        )

    def post_optimizer_hook(self, model) -> None:
        pass
