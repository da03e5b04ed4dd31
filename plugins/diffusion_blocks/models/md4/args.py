"""Model args and flavors of the masked-diffusion LM (MD4) on torchtitan's llama3 layers."""

import dataclasses
from dataclasses import dataclass

from torchtitan.models.llama3 import llama3_args, TransformerModelArgs

from ...diffusion.masking import MaskingSchedule
from ...diffusion.partition import BlockPartition


@dataclass
class MaskedDiffusionArgs(TransformerModelArgs):
    """torchtitan's llama3 args; `vocab_size` counts the data tokens plus [MASK], the
    last id (the char flavors: 256 bytes + 1)."""

    partition: BlockPartition | None = None
    """Filled from `[diffusion_blocks]` by update_from_config (noise level: t)."""
    time_conditioning: str = "adaln_zero"
    adaln_cond_dim: int = 256

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def data_vocab_size(self) -> int:
        """The tokens a prediction ranges over ([MASK] excluded)."""
        return self.vocab_size - 1

    def update_from_config(self, job_config, **kwargs) -> None:
        super().update_from_config(job_config, **kwargs)
        section = job_config.diffusion_blocks
        self.partition = BlockPartition.from_job_config(
            job_config, self.n_layers, masking_noise_levels(section)
        )
        self.time_conditioning = section.time_conditioning
        self.adaln_cond_dim = section.adaln_cond_dim


def masking_noise_levels(section) -> MaskingSchedule:
    """The family's noise process: MD4's masking time t, `[diffusion_blocks] masking_schedule`."""
    return MaskingSchedule(section.masking_schedule)


def _with_mask_slot(args: TransformerModelArgs, **overrides) -> MaskedDiffusionArgs:
    """A stock llama3 shape whose vocabulary gains the [MASK] id."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    values.update(vocab_size=args.vocab_size + 1, **overrides)
    return MaskedDiffusionArgs(**values)


CHAR_VOCAB = 256 + 1  # the `char` tokenizer's bytes and [MASK]


def md4_flavors() -> dict[str, MaskedDiffusionArgs]:
    """Character-level shapes (bytes + [MASK]): `chars` (CPU: 8 layers, width 128, the
    debug configs; `chars_<k>l` the same with k = 1 to 4 layers, the equal-memory
    end-to-end models of its blocks) and `text8` (MD4's text8 network: 12 layers, width 768, 12 heads);
    torchtitan's sdpa llama3 shapes with one more vocabulary slot for [MASK]
    (`debugmodel`, `8B`, `70B`, `405B`; the Llama 3 tokenizer's 128256 ids + 1)."""
    flavors = {
        "chars": MaskedDiffusionArgs(
            dim=128, n_layers=8, n_heads=4, vocab_size=CHAR_VOCAB, rope_theta=10000,
        ),
        "text8": MaskedDiffusionArgs(
            dim=768, n_layers=12, n_heads=12, vocab_size=CHAR_VOCAB, rope_theta=10000,
        ),
    }
    for layers in range(1, 5):
        flavors[f"chars_{layers}l"] = dataclasses.replace(flavors["chars"], n_layers=layers)
    for name in ("debugmodel", "8B", "70B", "405B"):
        flavors[name] = _with_mask_slot(llama3_args[name])
    return flavors
