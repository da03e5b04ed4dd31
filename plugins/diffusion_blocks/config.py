"""The `[diffusion_blocks]` config section.

torchtitan 0.2.2 extends its JobConfig through `[job] custom_config_module`: the module
must expose a dataclass named `JobConfig` whose fields are merged into torchtitan's.
Our config loader always merges this one, so users need not name it in their TOML.
"""


from dataclasses import dataclass, field

from .diffusion import NoiseSchedule, PARTITIONS
from .masking import check_masking_schedule

BLOCK_SCHEDULES = ("random", "round_robin", "sequential")  # see schedules.py
DEVICES = ("auto", "cpu", "cuda")
OFFLOAD_MODES = ("auto", "on", "off")
TIME_CONDITIONINGS = ("adaln_zero", "none")


@dataclass
class DiffusionBlocks:
    enable: bool = True
    """False trains the same model end to end (plain next-token / CE / L2 loss)."""

    num_blocks: int = 4
    """B: number of blocks the layers are cut into."""

    layers_per_block: list[int] = field(default_factory=list)
    """Explicit layer counts per block (block 0 first); empty = equal split."""

    partition: str = "equiprobable"
    """How [sigma_min, sigma_max] is cut: 'equiprobable' or 'uniform_log'."""

    overlap: float = 0.1
    """gamma: each block's interval is widened by gamma times its log-width per side."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    block_schedule: str = "random"
    """Which block a step trains: 'random' (uniform), 'round_robin' or 'sequential'."""

    seed: int = 0
    """Seed of the block-choice and sigma generators (identical on every rank)."""

    sampling_steps_per_block: int = 1
    """Euler steps each block takes at inference (LM and ViT)."""

    offload_inactive_blocks: str = "auto"
    """'on': layers (parameters, gradients, optimizer state) live in host memory and are
    streamed to the device only while their block computes; shared modules stay on
    the device. 'auto' = on with the sequential schedule. 'off' keeps all resident."""

    block_parallel: bool = False
    """Split the processes into num_blocks groups; group g trains block g every step,
    all groups at once; only the shared modules are synchronised across groups."""

    adaln_cond_dim: int = 256
    """Width of the noise-condition vector c feeding every layer's AdaLN-Zero
    Linear(SiLU(c)); 0 = the model width (the DiT form, 6 * width^2 per layer).
    Read by the LMs (dblocks_llama3; dblocks_md4 with time_conditioning = "adaln_zero");
    the ViT and DiT always use the DiT form (c as wide as the model)."""

    sampling_steps: int = 50
    """Euler steps of the image sampler (DiT), laid on the equi-probability sigma grid,
    or ancestral steps of the masked-diffusion sampler (MD4), on equal decreases of
    alpha_t; each step runs only the block owning its noise level."""

    cfg_scale: float = 2.0
    """Classifier-free guidance scale s of the image sampler (DiT):
    D = D_uncond + s (D_cond - D_uncond); 1 is plain conditional sampling."""

    label_dropout: float = 0.1
    """DiT training: share of class labels replaced by the null class, so one model is
    both conditional and unconditional (needed for guidance). Also used with enable = false."""

    masking_schedule: str = "linear"
    """MD4 (dblocks_md4): alpha_t, the probability that a token is still unmasked at
    time t: 'linear' (1 - t), 'cosine' (1 - cos(pi/2 (1 - t))) or 'poly<k>' (1 - t^k)."""

    time_conditioning: str = "adaln_zero"
    """MD4 (dblocks_md4): how the layers see t: 'adaln_zero' (every layer's AdaLN-Zero
    and a final modulation, driven by an embedding of t, as the other denoisers) or
    'none' (only the masked tokens: the share of masks implies t)."""

    def noise_schedule(self) -> NoiseSchedule:
        return NoiseSchedule(
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            p_mean=self.p_mean,
            p_std=self.p_std,
            sigma_data=self.sigma_data,
        )


@dataclass
class Data:
    tokenizer: str = "auto"
    """'auto' (the train spec's: bytes for dblocks_llama3, characters for dblocks_md4,
    the Hugging Face tokenizer at [model] hf_assets_path for a stock llama3), 'byte'
    (UTF-8 bytes with BOS / EOS, no files needed), 'char' (UTF-8 bytes only: a text is
    one stream of its characters) or 'hf' (the tokenizer at [model] hf_assets_path)."""

    holdout_fraction: float = 0.2
    """Image data without an explicit test split (digits, an image folder without
    train/ and test/, an .npz without test_images): this share of every class, fixed by
    a seeded permutation, is the test split and never trained on."""

    shuffle_seed: int = 0
    """Seed of the image data's per-epoch shuffle (the same order on every rank)."""


@dataclass
class Training:
    """Merged into torchtitan's [training] section."""

    device: str = "auto"
    """'auto' (cuda when available, else cpu with gloo), 'cpu' or 'cuda'."""


@dataclass
class JobConfig:
    diffusion_blocks: DiffusionBlocks = field(default_factory=DiffusionBlocks)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)


def check_diffusion_blocks(section: DiffusionBlocks) -> list[tuple[str, str]]:
    """Model-independent checks. Returns (key, problem) pairs; empty when valid."""
    problems: list[tuple[str, str]] = []
    if section.num_blocks < 1:
        problems.append(("num_blocks", f"must be >= 1, got {section.num_blocks}"))
    if not 0.0 <= section.overlap <= 0.5:
        problems.append(("overlap", f"must lie in [0, 0.5], got {section.overlap}"))
    if not 0.0 < section.sigma_min < section.sigma_max:
        problems.append(
            (
                "sigma_min",
                f"need 0 < sigma_min < sigma_max, got sigma_min={section.sigma_min}, "
                f"sigma_max={section.sigma_max}",
            )
        )
    if section.p_std <= 0:
        problems.append(("p_std", f"must be > 0, got {section.p_std}"))
    if section.sigma_data <= 0:
        problems.append(("sigma_data", f"must be > 0, got {section.sigma_data}"))
    if section.partition not in PARTITIONS:
        problems.append(
            ("partition", f"{section.partition!r} is not one of {sorted(PARTITIONS)}")
        )
    if section.block_schedule not in BLOCK_SCHEDULES:
        problems.append(
            (
                "block_schedule",
                f"{section.block_schedule!r} is not one of {list(BLOCK_SCHEDULES)}",
            )
        )
    if section.offload_inactive_blocks not in OFFLOAD_MODES:
        problems.append((
            "offload_inactive_blocks",
            f"{section.offload_inactive_blocks!r} is not one of {list(OFFLOAD_MODES)}",
        ))
    if section.block_parallel and section.block_schedule != "random":
        problems.append(
            ("block_parallel", "trains every block every step; leave block_schedule at 'random'")
        )
    if section.adaln_cond_dim < 0:
        problems.append(("adaln_cond_dim", f"must be >= 0, got {section.adaln_cond_dim}"))
    if section.sampling_steps_per_block < 1:
        problems.append(
            (
                "sampling_steps_per_block",
                f"must be >= 1, got {section.sampling_steps_per_block}",
            )
        )
    if section.sampling_steps < 1:
        problems.append(("sampling_steps", f"must be >= 1, got {section.sampling_steps}"))
    if section.cfg_scale < 0:
        problems.append(("cfg_scale", f"must be >= 0 (1 = no guidance), got {section.cfg_scale}"))
    if not 0.0 <= section.label_dropout < 1.0:
        problems.append(
            ("label_dropout", f"must lie in [0, 1), got {section.label_dropout}")
        )
    masking_problem = check_masking_schedule(section.masking_schedule)
    if masking_problem:
        problems.append(("masking_schedule", masking_problem))
    if section.time_conditioning not in TIME_CONDITIONINGS:
        problems.append((
            "time_conditioning",
            f"{section.time_conditioning!r} is not one of {list(TIME_CONDITIONINGS)}",
        ))
    if section.layers_per_block and len(section.layers_per_block) != section.num_blocks:
        problems.append(
            (
                "layers_per_block",
                f"has {len(section.layers_per_block)} entries but num_blocks is "
                f"{section.num_blocks}",
            )
        )
    if any(n < 1 for n in section.layers_per_block):
        problems.append(
            ("layers_per_block", f"every entry must be >= 1, got {section.layers_per_block}")
        )
    return problems


def check_data(section: Data) -> list[tuple[str, str]]:
    from .data.text import TOKENIZERS  # late: data imports torchtitan's dataset stack

    allowed = ["auto", "hf", *TOKENIZERS]
    problems = []
    if section.tokenizer not in allowed:
        problems.append(("tokenizer", f"{section.tokenizer!r} is not one of {allowed}"))
    if not 0.0 < section.holdout_fraction < 1.0:
        problems.append(
            ("holdout_fraction", f"must lie in (0, 1), got {section.holdout_fraction}")
        )
    return problems


def check_training(section) -> list[tuple[str, str]]:
    if section.device not in DEVICES:
        return [("device", f"{section.device!r} is not one of {list(DEVICES)}")]
    return []


SECTION_CHECKS = {
    "diffusion_blocks": check_diffusion_blocks,
    "data": check_data,
    "training": check_training,
}


def layers_per_block(section: DiffusionBlocks, n_layers: int) -> list[int]:
    """Layer counts per block for a model of n_layers; raises ValueError if they don't fit."""
    if section.layers_per_block:
        counts = list(section.layers_per_block)
        if sum(counts) != n_layers:
            raise ValueError(
                f"[diffusion_blocks] layers_per_block = {counts} sums to {sum(counts)} "
                f"but the model has {n_layers} layers"
            )
        return counts
    if section.num_blocks > n_layers or n_layers % section.num_blocks:
        divisors = [b for b in range(1, n_layers + 1) if n_layers % b == 0]
        raise ValueError(
            f"[diffusion_blocks] num_blocks = {section.num_blocks} does not split the "
            f"model's {n_layers} layers equally; use one of {divisors} or give "
            f"layers_per_block explicitly"
        )
    return [n_layers // section.num_blocks] * section.num_blocks


def block_layer_ranges(counts: list[int]) -> list[range]:
    """Contiguous layer index ranges, block 0 first."""
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges
