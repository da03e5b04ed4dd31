"""torchtitan's CheckpointManager, able to start a denoiser from a stock llama3 checkpoint.

`convert_to_denoiser` keeps every stock weight and adds modules (AdaLN-Zero in every
layer, the sigma embedder, the final AdaLN). A stock torchtitan llama3 checkpoint (DCP)
or a Hugging Face Llama checkpoint (safetensors, read through the train spec's
`Llama3StateDictAdapter`) lacks their keys, so torchtitan's strict load refuses it.

`BlockwiseCheckpointManager` loosens exactly one path: the model-only initial load
(`[checkpoint] initial_load_path` or `initial_load_in_hf` with
`initial_load_model_only = true`, before the run's checkpoint folder exists). There it
loads every weight the checkpoint has, leaves the modules added by the conversion
(`models.llama3.model.is_added_by_conversion`) as initialised, and refuses, with one line,
any other missing key or any weight stored with another shape than the model's.
Resumes, seed checkpoints (step 0), saves and the async modes are torchtitan's.
"""

import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan.components.checkpoint import CheckpointManager, MODEL
from torchtitan.tools.logging import logger

from .config_loader import ConfigError
from .models.llama3.model import is_added_by_conversion

ADDED_MODULES = "AdaLN-Zero, sigma embedder, final AdaLN"
SHOWN_KEYS = 3


def _shape(size) -> tuple[int, ...]:
    return tuple(int(d) for d in size)


def _first(items: list[str]) -> str:
    more = len(items) - SHOWN_KEYS
    return ", ".join(items[:SHOWN_KEYS]) + (f" (and {more} more)" if more > 0 else "")


def check_against_checkpoint(
    wanted: dict[str, Any], stored: dict[str, Any], path: str
) -> None:
    """Raise ConfigError (one line) unless every key of `wanted` is stored with its shape.

    `wanted` maps keys to the model's tensors, `stored` is the checkpoint's
    state_dict_metadata (DCP, or the HF reader's).
    """
    missing = [k for k in wanted if k not in stored]
    if missing:
        first = missing[0]
        raise ConfigError(
            f"checkpoint {path} has no {_first(missing)} (this model has {first} as "
            f"{_shape(wanted[first].shape)}); only the modules the DiffusionBlocks "
            f"conversion adds ({ADDED_MODULES}) may be missing: it was saved from "
            "another model ([model] name / flavor / n_layers)"
        )
    mismatched = [
        k for k in wanted
        if not isinstance(stored[k], TensorStorageMetadata)
        or _shape(stored[k].size) != _shape(wanted[k].shape)
    ]
    if mismatched:
        first = mismatched[0]
        stored_as = (
            _shape(stored[first].size)
            if isinstance(stored[first], TensorStorageMetadata)
            else "a non-tensor object"
        )
        others = (
            f"; other shapes differ too: {_first(mismatched[1:])}" if mismatched[1:] else ""
        )
        raise ConfigError(
            f"checkpoint {path} stores {first} as {stored_as}, this model has "
            f"{_shape(wanted[first].shape)}{others}: it was saved from another model "
            "shape ([model] flavor / dim / n_layers)"
        )


class BlockwiseCheckpointManager(CheckpointManager):
    """CheckpointManager whose model-only initial load accepts a stock llama3 checkpoint.

    Overrides `load` only to note whether this is the model-only initial load (it then
    calls torchtitan's `load` unchanged), and `dcp_load` to do that one load partially;
    every other load goes to torchtitan's strict `dcp_load`.
    """

    _initial_model_only_load = False

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        # torchtitan's load takes the initial (model-only) branch exactly when the run's
        # checkpoint folder does not exist yet; a resume or a step-0 seed stays strict.
        self._initial_model_only_load = (
            self.enable
            and not os.path.exists(self.folder)
            and self.initial_load_model_only
        )
        try:
            return super().load(step)
        finally:
            self._initial_model_only_load = False

    def dcp_load(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        from_hf: bool,
        from_quantized: bool,
    ) -> None:
        # the model states torchtitan's _states_to_load returns for a model-only load
        # (not the FT dataloader states, which _ft_load passes first)
        if not (
            self._initial_model_only_load
            and MODEL in self.states
            and state_dict is self.states[MODEL].state_dict()
        ):
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

        stock = {k: v for k, v in state_dict.items() if not is_added_by_conversion(k)}
        added = [k for k in state_dict if is_added_by_conversion(k)]
        if from_hf:
            loaded = self._load_stock_from_hf(stock, checkpoint_id, from_quantized)
            fresh = added
        else:
            stored = _dcp_metadata(checkpoint_id)
            # a model-only export of a denoiser has the added keys: load those too
            loaded = stock | {k: state_dict[k] for k in added if k in stored}
            fresh = [k for k in added if k not in stored]
            check_against_checkpoint(loaded, stored, checkpoint_id)
            dcp.load(loaded, checkpoint_id=checkpoint_id)
        # ModelWrapper.load_state_dict sets with strict=False: the fresh modules stay
        self.states[MODEL].load_state_dict(loaded)
        logger.info(
            f"loaded {len(state_dict) - len(fresh)} weights from {checkpoint_id}, "
            f"{len(fresh)} new ({ADDED_MODULES}) freshly initialised"
        )

    def _load_stock_from_hf(
        self, stock: dict[str, Any], checkpoint_id: str, from_quantized: bool
    ) -> dict[str, Any]:
        """torchtitan's HF branch of dcp_load on the stock weights; returns them native."""
        assert (
            self.sd_adapter is not None
        ), "trying to load checkpoint in HF safetensors format, but sd_adapter is not provided."
        hf_state_dict = self.sd_adapter.to_hf(stock)
        if not from_quantized:  # a quantized checkpoint stores other shapes (and scales)
            reader = self.sd_adapter.get_hf_storage_reader(checkpoint_id, from_quantized)
            stored = reader.read_metadata().state_dict_metadata
            check_against_checkpoint(hf_state_dict, stored, checkpoint_id)
        dcp.load(
            hf_state_dict,
            storage_reader=self.sd_adapter.get_hf_storage_reader(
                checkpoint_id, from_quantized
            ),
        )
        return self.sd_adapter.from_hf(hf_state_dict)


def _dcp_metadata(checkpoint_id: str) -> dict[str, Any]:
    try:
        return FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    except FileNotFoundError as error:
        raise ConfigError(
            f"checkpoint {checkpoint_id} is not a DCP checkpoint ({error}); for Hugging "
            "Face safetensors set [checkpoint] initial_load_in_hf = true"
        ) from error
