"""Model args and flavors of the block-partitioned Llama denoiser."""

import dataclasses
from dataclasses import dataclass

from torchtitan.models.llama3 import llama3_args, TransformerModelArgs

from ...diffusion.partition import BlockPartition


@dataclass(frozen=True)
class DenoiserOptions:
    """What `[diffusion_blocks]` says about the LM denoiser beyond its partition (see
    the keys' docs in config/sections.py); the defaults are the config's."""

    adaln_cond_dim: int = 256
    target_embedding_scale: float = 1.0
    sigma_per_token: bool = False
    token_embedding_init_std: float = 0.02
    self_conditioning: float = 0.0

    @classmethod
    def from_config(cls, section) -> "DenoiserOptions":
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


@dataclass
class DiffusionBlocksLlamaArgs(TransformerModelArgs):
    partition: BlockPartition | None = None
    """Filled from `[diffusion_blocks]` by update_from_config."""
    denoiser: DenoiserOptions = dataclasses.field(default_factory=DenoiserOptions)

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        self.partition = BlockPartition.from_job_config(job_config, self.n_layers)
        self.denoiser = DenoiserOptions.from_config(job_config.diffusion_blocks)


def _as_dblocks_args(args: TransformerModelArgs, **overrides) -> DiffusionBlocksLlamaArgs:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    values.update(overrides)
    return DiffusionBlocksLlamaArgs(**values)


def dblocks_llama3_flavors() -> dict[str, DiffusionBlocksLlamaArgs]:
    """torchtitan's llama3 flavors with their stock shapes (debugmodel: 6 layers), plus
    our own names: 8-layer debug models (B = 2, 4, 8 split evenly) and 1-, 2- and 4-layer
    ones of their shape (the LM report's equal-memory row), docs/method.md's measured
    anchor shape and Llama 3.2 1B (the memory benchmarks' sizes)."""
    flavors = {name: _as_dblocks_args(args) for name, args in llama3_args.items()}
    flavors["debugmodel_8l"] = _as_dblocks_args(llama3_args["debugmodel"], n_layers=8, n_heads=8)
    # the end-to-end model with L/B layers of an 8-layer one (equal memory, B = 8, 4, 2)
    for layers in (1, 2, 4):
        flavors[f"debugmodel_{layers}l"] = _as_dblocks_args(
            llama3_args["debugmodel"], n_layers=layers, n_heads=8
        )
    # dim 128, 4 heads: the LM budget runs (train_configs/llama3_shakespeare.toml), ~4x
    # cheaper a byte than the debug model so the report's rows fit a session on 2 cores
    for layers in (2, 8):
        flavors[f"small_{layers}l"] = _as_dblocks_args(
            llama3_args["debugmodel"], dim=128, n_layers=layers, n_heads=4, multiple_of=128
        )
    flavors["debugmodel_8l_flex_attn"] = _as_dblocks_args(
        llama3_args["debugmodel_flex_attn"], n_layers=8, n_heads=8
    )
    flavors["250M"] = DiffusionBlocksLlamaArgs(
        dim=1024, n_layers=16, n_heads=16, vocab_size=32000, rope_theta=500000
    )
    flavors["1B"] = DiffusionBlocksLlamaArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
        multiple_of=256, vocab_size=128256, rope_theta=500000,
    )
    # varlen attention packs documents; the 2T denoiser sequence has its own mask
    flavors.pop("debugmodel_varlen_attn", None)
    flavors.pop("8B_varlen", None)
    return flavors
