"""ViT classifier (`dblocks_vit`): the blocks denoise the label embedding."""

from functools import partial

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.protocols.train_spec import TrainSpec

from ...components.validate import build_task_validator
from ...data.images import build_image_dataloader
from ...parallel.parallelize import parallelize_vision
from ...protocols.family import (
    BLOCK0_KEYS,
    blockwise_train_spec,
    VIT_KEYS,
    EDM_KEYS,
    END_TO_END_TRAINER_KEYS,
    ModelFamily,
    PARTITION_KEYS,
    TRAINER_KEYS,
)
from ..llama3.model import is_added_by_conversion
from .args import vit_flavors
from .model import DiffusionBlocksViT, PlainViT
from .task import ImageClassificationTask


def get_train_spec() -> TrainSpec:
    return blockwise_train_spec(
        DiffusionBlocksViT, vit_flavors(), parallelize_vision,
        build_image_dataloader, None, build_cross_entropy_loss,
        partial(build_task_validator, ImageClassificationTask().evaluate),
    )


FAMILY = ModelFamily(
    "dblocks_vit", get_train_spec, PlainViT, ImageClassificationTask(),
    added_by_conversion=is_added_by_conversion,
    reads=TRAINER_KEYS + PARTITION_KEYS + EDM_KEYS + BLOCK0_KEYS + VIT_KEYS,
    twin_reads=END_TO_END_TRAINER_KEYS,
    identity_keys=PARTITION_KEYS + EDM_KEYS,
)
