"""What a checkpoint was trained as, saved with it and checked wherever it is loaded.

The identity of a run is its model (`[model] name`, `flavor`, and the family that name
trains as: a stock llama3 with the converter trains as dblocks_llama3), whether DiffusionBlocks
is on (`[diffusion_blocks] enable`) and the `[diffusion_blocks]` keys its family
declares as shaping the trained function (`ModelFamily.identity_keys`: e.g. the block
partition, with `layers_per_block` resolved, and the EDM noise settings; MD4's masking
keys instead of EDM's; for the end-to-end twin those of them it reads). A checkpoint loaded under another
identity runs every block on sigmas it was not trained for (or the wrong model
altogether) without any error, so a resume and every inference tool refuse it, naming
the key and both values.

It is a small JSON file in the step folder (`IDENTITY_FILE`, next to `.metadata`),
written by the checkpointer before every save. Not an entry of the DCP state: the
last-step save with `[checkpoint] last_save_model_only` writes the model's tensors
only, and `last_save_in_hf` writes safetensors, so a `train_state` entry would be
missing from exactly the checkpoints the inference tools read. A file in the folder is
there for every save path (sync, async, model-only, HF), and DCP's reader ignores
files that `.metadata` does not name. A checkpoint without the file (a stock
torchtitan checkpoint, or one saved before this file existed) is not checked. A saved
identity that lacks a key (written before the key joined the identity) is read as
saved with that key's default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config.sections import DiffusionBlocks
from ..errors import ConfigError

IDENTITY_FILE = "diffusion_blocks_run.json"
FAMILY_KEY = "model.family"


def run_identity(job_config, partition, family) -> dict[str, Any]:
    """The identity of the run `job_config` describes. `partition` is the model's
    BlockPartition when DiffusionBlocks is on (its resolved layer counts), else None;
    `family` the ModelFamily (its identity_keys)."""
    section = job_config.diffusion_blocks
    identity: dict[str, Any] = {
        "diffusion_blocks.enable": bool(section.enable),
        "model.name": job_config.model.name,
        "model.flavor": job_config.model.flavor,
        "model.family": family.name,
    }
    keys = family.identity_keys
    if section.enable:
        identity["diffusion_blocks.num_blocks"] = partition.num_blocks
        identity["diffusion_blocks.layers_per_block"] = list(partition.layer_counts)
    else:
        keys = [key for key in keys if key in family.twin_reads]
    for key in keys:
        identity.setdefault(f"diffusion_blocks.{key}", getattr(section, key))
    return identity


def write_identity(step_folder: str | Path, identity: dict[str, Any]) -> None:
    """Write the identity into the step folder (created if needed), atomically."""
    os.makedirs(step_folder, exist_ok=True)
    path = Path(step_folder) / IDENTITY_FILE
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(identity, indent=1) + "\n")
    os.replace(temporary, path)


def read_identity(step_folder: str | Path) -> dict[str, Any] | None:
    """The saved identity, or None for a checkpoint without one; ConfigError when the
    file cannot be read as a JSON object."""
    path = Path(step_folder) / IDENTITY_FILE
    if not path.is_file():
        return None
    try:
        identity = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} cannot be read: {error}") from None
    if not isinstance(identity, dict):
        raise ConfigError(f"{path} holds a JSON {type(identity).__name__}, not an object")
    return identity


def _config_key(key: str) -> str:
    section, name = key.split(".", 1)
    return f"[{section}] {name}"


def saved_value(saved: dict[str, Any], key: str) -> Any:
    """The saved value of `key`; a `[diffusion_blocks]` key the file lacks (saved before
    it joined the identity) reads as its default, `model.family` (added later, and
    implied by the name and flavor it was saved with) as not to be compared (None)."""
    if key in saved:
        return saved[key]
    section, name = key.split(".", 1)
    defaults = DiffusionBlocks()  # an instance: list keys have no class attribute
    if section == "diffusion_blocks" and hasattr(defaults, name):
        return getattr(defaults, name)
    if key == FAMILY_KEY:
        return None
    return "(not set)"


def identity_mismatches(saved: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """'[section] key = saved in the checkpoint, ours here' for every key of ours that
    differs (only `enable` when that differs: the other keys follow from it). Keys only
    the checkpoint has (no longer part of this family's identity) are not compared."""
    enable = "diffusion_blocks.enable"
    keys = [enable] if saved.get(enable) != ours.get(enable) else list(ours)
    return [
        f"{_config_key(key)} = {saved_value(saved, key)!r} in the checkpoint, "
        f"{ours[key]!r} here"
        for key in keys
        if saved_value(saved, key) != ours[key]
        and not (key == FAMILY_KEY and saved_value(saved, key) is None)
    ]


def check_identity(step_folder: str | Path, ours: dict[str, Any], advice: str) -> bool:
    """Raise ConfigError (one line) when the checkpoint in `step_folder` was saved by a
    run of another identity. Returns False when it has no identity (not checked)."""
    saved = read_identity(step_folder)
    if saved is None:
        return False
    mismatches = identity_mismatches(saved, ours)
    if mismatches:
        raise ConfigError(
            f"checkpoint {step_folder} was trained with other settings: "
            f"{'; '.join(mismatches)}. {advice}"
        )
    return True
