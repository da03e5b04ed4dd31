"""The config: section dataclasses (sections.py), what is checked (checks.py), numeric
bounds (bounds.py) and the loader (loader.py).

`diffusion_blocks.config` is what `[job] custom_config_module` names: torchtitan 0.2.2
extends its JobConfig through a module exposing a dataclass named `JobConfig`, whose
fields it merges into its own. Our loader always merges this one, so users need not
name it in their TOML.
"""

from .sections import (  # noqa: F401 (what torchtitan and users import from here)
    Checkpoint,
    Data,
    DiffusionBlocks,
    JobConfig,
    Model,
    Recurrent,
    Training,
)
