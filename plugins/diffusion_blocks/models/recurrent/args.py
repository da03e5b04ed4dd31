"""Model args and flavors of the recurrent-depth (looped) LM: prelude, shared core, coda.

The flavor fixes the architecture (widths, layer counts of prelude / core / coda); the
job config fills in the noise schedule (`[diffusion_blocks]`), the inference iterations
(`[diffusion_blocks] sampling_steps_per_block`: the one block's Euler steps) and the
end-to-end twin's recurrence law (`[recurrent]`). Knobs a run changes from its TOML or
command line are config keys; what changes the weights' shapes is the flavor.
"""

from dataclasses import dataclass, field

from torch import nn
from torchtitan.models.utils import get_dense_model_nparams_and_flops

from ...components.dist_utils import layer_parameter_count
from ...diffusion.partition import BlockPartition
from ..llama3.args import DenoiserOptions, DiffusionBlocksLlamaArgs


@dataclass
class RecurrentArgs(DiffusionBlocksLlamaArgs):
    n_prelude_layers: int = 1
    n_core_layers: int = 2
    n_coda_layers: int = 1
    n_layers: int = field(init=False)
    """Distinct layer modules (prelude + core + coda); the core runs r times."""

    # filled from the job config by update_from_config
    inference_recurrence: int = 8
    """r at inference and validation: `[diffusion_blocks] sampling_steps_per_block`."""
    mean_recurrence: int = 8
    bptt_steps: int = 4
    recurrence_law: str = "poisson_lognormal"
    seed: int = 0
    trains_end_to_end: bool = False

    def __post_init__(self):
        self.n_layers = self.n_prelude_layers + self.n_core_layers + self.n_coda_layers

    @property
    def prelude_ids(self) -> range:
        return range(0, self.n_prelude_layers)

    @property
    def core_ids(self) -> range:
        return range(self.n_prelude_layers, self.n_prelude_layers + self.n_core_layers)

    @property
    def coda_ids(self) -> range:
        return range(self.n_prelude_layers + self.n_core_layers, self.n_layers)

    def update_from_config(self, job_config, **kwargs) -> None:
        # torchtitan's (max_seq_len = seq_len); the partition is ours: one block over
        # all of [sigma_min, sigma_max], whatever the layers
        super(DiffusionBlocksLlamaArgs, self).update_from_config(job_config, **kwargs)
        section = job_config.diffusion_blocks
        # the one block is block 0: block0_sigma_sampling (default: the log-normal) is
        # its training law; sampling_sigma_max where the sampler starts
        schedule = section.noise_schedule()
        self.partition = BlockPartition(
            layer_counts=(self.n_layers,),
            boundaries=(schedule.sigma_min, schedule.sigma_max),
            overlap=0.0,
            schedule=schedule,
            block0_sigma_sampling=section.block0_sigma_sampling,
            sampling_sigma_max=section.sampling_sigma_max,
        )
        self.denoiser = DenoiserOptions.from_config(section)
        self.inference_recurrence = section.sampling_steps_per_block
        self.seed = section.seed
        self.trains_end_to_end = not section.enable
        recurrent = job_config.recurrent
        self.mean_recurrence = recurrent.mean_recurrence
        self.bptt_steps = recurrent.bptt_steps
        self.recurrence_law = recurrent.recurrence_law

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        """torchtitan's dense count runs every layer once on T tokens: right for the
        DiffusionBlocks step (the trainer scales it for the 2T sequence). The twin runs
        the core mean_recurrence times: its extra passes are added (forward and
        backward for the k backpropagated ones, forward only for the rest)."""
        nparams, flops = get_dense_model_nparams_and_flops(
            self, model, 2 * (self.dim // self.n_heads), seq_len
        )
        if not self.trains_end_to_end:
            return nparams, flops
        core_params = layer_parameter_count(model, self.core_ids)
        attention = 12 * self.n_heads * (self.dim // self.n_heads) * seq_len * self.n_core_layers
        per_pass = 6 * core_params + attention  # forward + backward of one core pass
        grad_passes = min(self.bptt_steps, self.mean_recurrence)
        extra = (grad_passes - 1) * per_pass + (self.mean_recurrence - grad_passes) * per_pass // 3
        return nparams, flops + extra


def recurrent_flavors() -> dict[str, RecurrentArgs]:
    """CPU-sized debug shapes and GPU-sized ones. `3.9B` is Huginn's shape (Geiping et
    al. 2025: 2 prelude, 4 core, 2 coda layers of width 5280, 55 heads, SwiGLU 17920,
    vocabulary 65536) on torchtitan's llama3 layers."""
    return {
        # 4 distinct layers (1 + 2 + 1), dim 256: the debug configs, seconds per step on CPU
        "debugmodel": RecurrentArgs(
            dim=256, n_heads=8, vocab_size=2048, rope_theta=500000,
            n_prelude_layers=1, n_core_layers=2, n_coda_layers=1,
        ),
        # dim 128, 4 heads: the budget where the LM learns (recurrent_shakespeare.toml),
        # the width of the llama3 `small_8l` budget model
        "small": RecurrentArgs(
            dim=128, n_heads=4, multiple_of=128, vocab_size=2048, rope_theta=500000,
            n_prelude_layers=1, n_core_layers=2, n_coda_layers=1,
        ),
        # Huginn's 2-4-2 layout at debug width
        "debugmodel_2_4_2": RecurrentArgs(
            dim=256, n_heads=8, vocab_size=2048, rope_theta=500000,
            n_prelude_layers=2, n_core_layers=4, n_coda_layers=2,
        ),
        # one GPU: 8 distinct layers of width 1024, 178M parameters (113M without the
        # embedding and head); 132 layers deep at r = 32
        "180M": RecurrentArgs(
            dim=1024, n_heads=16, vocab_size=32000, rope_theta=500000,
            n_prelude_layers=2, n_core_layers=4, n_coda_layers=2,
        ),
        # 3.9B parameters here: the untied head and AdaLN add to Huginn's 3.5B
        "3.9B": RecurrentArgs(
            dim=5280, n_heads=55, vocab_size=65536, rope_theta=50000,
            ffn_dim_multiplier=17920 / 14080, multiple_of=256,
            n_prelude_layers=2, n_core_layers=4, n_coda_layers=2,
        ),
    }
