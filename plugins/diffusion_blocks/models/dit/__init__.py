"""Class-conditional DiT (`dblocks_dit`): the blocks denoise images."""

from functools import partial

from torchtitan.protocols.train_spec import TrainSpec

from ...components.validate import build_task_validator
from ...data.images import build_image_dataloader
from ...diffusion.objectives import build_squared_error_loss
from ...parallel.parallelize import parallelize_vision
from ...protocols.family import blockwise_train_spec, ModelFamily
from ..llama3.model import is_added_by_conversion
from .args import dit_flavors
from .model import DiffusionBlocksDiT, EndToEndDiT
from .task import ImageGenerationTask


def get_train_spec() -> TrainSpec:
    return blockwise_train_spec(
        DiffusionBlocksDiT, dit_flavors(), parallelize_vision,
        build_image_dataloader, None, build_squared_error_loss,
        partial(build_task_validator, ImageGenerationTask().evaluate),
    )


FAMILY = ModelFamily(
    "dblocks_dit", get_train_spec, EndToEndDiT, ImageGenerationTask(),
    added_by_conversion=is_added_by_conversion,
)
