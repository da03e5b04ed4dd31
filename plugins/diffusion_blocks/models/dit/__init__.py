"""Class-conditional DiT (`dblocks_dit`): the blocks denoise images."""

from functools import partial

from torchtitan.protocols.train_spec import TrainSpec

from ...components.validate import build_task_validator
from ...data.images import build_image_dataloader
from ...diffusion.objectives import build_squared_error_loss
from ...parallel.parallelize import parallelize_vision
from ...protocols.family import (
    BLOCK0_KEYS,
    blockwise_train_spec,
    DIT_KEYS,
    EDM_KEYS,
    END_TO_END_TRAINER_KEYS,
    ModelFamily,
    PARTITION_KEYS,
    TRAINER_KEYS,
)
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
    reads=TRAINER_KEYS + PARTITION_KEYS + EDM_KEYS + BLOCK0_KEYS + DIT_KEYS,
    twin_reads=END_TO_END_TRAINER_KEYS + EDM_KEYS + BLOCK0_KEYS + DIT_KEYS,
    identity_keys=PARTITION_KEYS + EDM_KEYS,
)
