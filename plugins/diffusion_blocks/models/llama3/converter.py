"""The `diffusion_blocks` model converter: `[model] converters = ["diffusion_blocks"]`
turns a stock torchtitan llama3 Transformer into the block-partitioned denoiser, in
place, on the meta model (torchtitan converts before parallelising)."""

from torch import nn
from torchtitan.models.llama3 import Transformer
from torchtitan.tools.logging import logger

from ...diffusion.partition import BlockPartition
from .args import DenoiserOptions
from .model import convert_to_denoiser, DiffusionBlocksLlama

CONVERTER_NAME = "diffusion_blocks"


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
        if isinstance(model, DiffusionBlocksLlama):
            return  # a dblocks_llama3 model is converted already
        if not self.job_config.diffusion_blocks.enable:
            logger.info("[diffusion_blocks] enable = false: the model stays a stock Transformer")
            return
        if not isinstance(model, Transformer):
            raise ValueError(
                f"the 'diffusion_blocks' converter converts torchtitan llama3 "
                f"Transformer models, got {type(model).__name__}"
            )
        partition = BlockPartition.from_job_config(self.job_config, len(model.layers))
        convert_to_denoiser(
            model, partition, DenoiserOptions.from_config(self.job_config.diffusion_blocks)
        )
        logger.info(
            f"Converted the llama3 Transformer to the DiffusionBlocks denoiser: "
            f"{partition.num_blocks} blocks of {list(partition.layer_counts)} layers"
        )

    def post_optimizer_hook(self, model) -> None:
        pass
