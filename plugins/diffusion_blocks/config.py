"""The `[diffusion_blocks]` config section.

torchtitan 0.2.2 extends its JobConfig through `[job] custom_config_module`: the module
must expose a dataclass named `JobConfig` whose fields are merged into torchtitan's.
Our config loader always merges this one, so users need not name it in their TOML.
"""


import math
import os
from dataclasses import dataclass, field

from .bounds import (
    ANY_FINITE, AT_LEAST_1, Bounds, bounds_problems, NON_NEGATIVE, POSITIVE, SEED, UNIT_INTERVAL,
)
from .diffusion.lognormal import lognormal_cdf, SIGMA_LAWS
from .diffusion.edm import NoiseSchedule
from .diffusion.partition import PARTITIONS
from .diffusion.sampling import ODE_SAMPLERS
from .diffusion.schedules import BLOCK_SCHEDULES
from .diffusion.masking import check_masking_schedule

DEVICES = ("auto", "cpu", "cuda")
AUGMENTATIONS = ("none", "crop_flip")  # see data/images.py
OFFLOAD_MODES = ("auto", "on", "off")
OPTIMIZERS = ("Adam", "AdamW")  # what torchtitan's build_optimizers builds
# parallelisms a block-wise step cannot use (it trains one block with data parallelism)
SINGLE_DEGREE_PARALLELISMS = (
    "tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree",
    "expert_parallel_degree",
)
NONFINITE_POLICIES = ("stop", "skip")  # see BlockwiseTrainer.handle_nonfinite_step
TIME_CONDITIONINGS = ("adaln_zero", "none")
HEAD_LOSSES = ("dense", "chunked")  # see models/cross_entropy_head.py


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
    """Which block a step trains: 'random' (uniform), 'weighted' (random with
    `block_weights`), 'round_robin' or 'sequential'."""

    block_weights: list[float] = field(default_factory=list)
    """block_schedule = 'weighted': one positive weight per block (block 0 first),
    normalised; each step trains block b with probability w_b / sum(w), drawn from the
    same seeded generator on every rank (e.g. [2, 1, 1, 1]: block 0 gets 2/5 of the
    steps). Set only with the weighted schedule."""

    block0_sigma_sampling: str = "lognormal"
    """How block 0 (the highest noise levels, where the token is decided) draws its
    training sigmas in its widened interval: 'lognormal' (the global truncated
    log-normal: with B = 4, overlap 0.1, only ~7% of its samples have sigma > 3) or
    'log_uniform' (ln sigma uniform on the interval: ~62% above 3). Other blocks always
    draw from the log-normal; held-out validation always scores with it."""

    sampling_sigma_max: float = 0.0
    """LM: the sigma text sampling starts from, in (sigma_min, sigma_max]; 0 = sigma_max.
    The sampler reads it as `BlockPartition.sampling_start_sigma` and passes it to
    `sampling_plan(num_steps, start_sigma=...)`, whose grid then spreads its steps over
    [sigma_min, sampling_sigma_max] (blocks wholly above it take no step); the starting
    noise is `initial_noise_std(start)`. Training is unchanged; the ViT and DiT
    samplers start at sigma_max."""

    sigma_per_token: bool = False
    """LM: draw one sigma per noisy row (token) instead of one per sequence; each noisy
    row is conditioned (AdaLN) on its own sigma and its CE weighted by its own w(sigma).
    The clean rows then get the zero condition vector (no noise level), in training and
    sampling alike. Costs each layer's AdaLN Linear per row instead of per sequence.
    False keeps the per-sequence path."""

    target_embedding_scale: float = 1.0
    """LM: the norm of the clean embedding (target y and clean rows) =
    scale * normalize(E[token]). Unit-norm embeddings of width D have per-coordinate
    std 1/sqrt(D); sigma_data * sqrt(D) (8 for sigma_data = 0.5, D = 256) makes it
    sigma_data, the scale EDM's preconditioning assumes."""

    token_embedding_init_std: float = 0.02
    """LM (block-wise and the recurrent family): std of the token-embedding
    initialisation. Scales torchtitan's N(0, 1) draw, so 1.0 is exactly torchtitan's
    init. Default 0.02, as the official code's label table: measured at equal steps it
    brings block 0's teacher-forced CE at sigma >= 3 within ~0.1 nats/byte of end to
    end (README, LM levers). A checkpoint loaded at start overrides it."""

    embedding_lr_multiplier: float = 1.0
    """LM: the token embeddings train with lr x this (their own optimizer param group,
    scaled by the same LR schedule); 1.0 = one group, torchtitan's optimizer as is.
    Block-wise runs only (the end-to-end twin keeps one group)."""

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

    sampler: str = "euler"
    """The step of the DiT's image sampler and the ViT's label sampler over the sigma
    grid: 'euler' (one network evaluation per step) or 'heun' (EDM's second-order step:
    two, the second at the step's end sigma by the block owning it; the same grid, so
    twice the evaluations). The text families take theirs from tools/generate.py --sampler."""

    cfg_scale: float = 2.0
    """Classifier-free guidance scale s of the image sampler (DiT):
    D = D_uncond + s (D_cond - D_uncond); 1 is plain conditional sampling."""

    label_dropout: float = 0.1
    """DiT training: share of class labels replaced by the null class, so one model is
    both conditional and unconditional (needed for guidance). Also used with enable = false."""

    on_nonfinite: str = "stop"
    """A step whose loss or gradient norm is not finite (checked before the optimizer
    steps): 'stop' ends the run with a message naming the step, the block and its sigma
    range; 'skip' drops its gradients (no optimizer or LR-schedule step; the step
    counter, its batch and its block draw are used up) and goes on."""

    max_nonfinite_skips: int = 10
    """With on_nonfinite = 'skip': the most steps of a run (resumes included) that may
    be skipped; one more stops the run."""

    head_loss: str = "dense"
    """LM (dblocks_llama3 and its end-to-end twin): how the head's cross-entropy is
    computed. 'dense': the full-vocabulary logits, then CE (their log-softmax is saved
    for backward). 'chunked': the head computes each label's CE itself,
    head_loss_chunk_rows rows at a time, saving only its input and one logsumexp per
    row (backward recomputes each chunk's logits); on CUDA with cut-cross-entropy
    installed (`pip install -e ".[fused-ce]"`) its fused kernel instead. Same loss and
    gradients, w(sigma) weighting included."""

    head_loss_chunk_rows: int = 1024
    """head_loss = 'chunked': rows (tokens) per chunk; a chunk's float32 logits take
    rows x vocab x 4 bytes while computed. Set only with head_loss = 'chunked'."""

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


RECURRENCE_LAWS = ("poisson_lognormal", "uniform", "fixed")  # see models/recurrent/model.py


@dataclass
class Recurrent:
    """`[recurrent]`: the recurrent-depth model's end-to-end twin (dblocks_recurrent with
    `[diffusion_blocks] enable = false`), trained Huginn-style. The DiffusionBlocks
    recipe trains one core pass per step and reads none of these; both recipes take
    their inference iterations r from `[diffusion_blocks] sampling_steps_per_block`
    (the one block's Euler steps)."""

    mean_recurrence: int = 8
    """Mean number r of core iterations per training step."""

    bptt_steps: int = 4
    """k: backpropagate through the last k iterations only (earlier ones run under
    no_grad); saved activations grow with k, not with r."""

    recurrence_law: str = "poisson_lognormal"
    """How r is drawn each step (identically on every rank): 'poisson_lognormal'
    (Huginn's: Poisson(lambda) + 1 with lambda log-normal, mean r), 'uniform' (1 .. 2r - 1)
    or 'fixed' (always r)."""


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
    """Seed of the image data's per-epoch shuffle (the same order on every rank) and of
    its augmentation."""

    augment: str = "none"
    """Augmentation of the image TRAINING stream (never the test split): 'none', or
    'crop_flip': a random crop_padding-pixel-shifted crop of the black-padded image and
    a horizontal flip with probability 1/2 (the CIFAR recipe), drawn from shuffle_seed,
    the epoch and the image index, so a run (and a resumed run) sees the same crops."""

    crop_padding: int = 4
    """Pixels of black padding per side for augment = 'crop_flip'."""


@dataclass
class Training:
    """Merged into torchtitan's [training] section."""

    device: str = "auto"
    """'auto' (cuda when available, else cpu with gloo), 'cpu' or 'cuda'."""


@dataclass
class Model:
    """Merged into torchtitan's [model] section: overrides of the flavor's model args,
    for models that have them (the ViT); unset keeps the flavor's value."""

    dropout: float | None = None
    """Hidden dropout (embeddings, attention output, MLP output), training only."""

    attention_dropout: float | None = None
    """Dropout on the attention probabilities, training only."""


@dataclass
class Checkpoint:
    """Merged into torchtitan's [checkpoint] section."""

    allow_fresh_start: bool = False
    """The checkpoint folder holds step-N folders but none can be resumed from (all
    unfinished or damaged): false stops with a message; true starts at step 1 there
    (the old folders stay until the new run's saves of the same steps replace them)."""


@dataclass
class JobConfig:
    diffusion_blocks: DiffusionBlocks = field(default_factory=DiffusionBlocks)
    data: Data = field(default_factory=Data)
    training: Training = field(default_factory=Training)
    model: Model = field(default_factory=Model)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    recurrent: Recurrent = field(default_factory=Recurrent)


# one Bounds per numeric key; keys that need each other are checked below
DIFFUSION_BLOCKS_BOUNDS = {
    "num_blocks": AT_LEAST_1,
    "overlap": Bounds(low=0, high=0.5),
    "sigma_min": POSITIVE,
    "sigma_max": POSITIVE,
    "p_mean": ANY_FINITE,
    "p_std": POSITIVE,
    "sigma_data": POSITIVE,
    "seed": SEED,
    "sampling_steps_per_block": AT_LEAST_1,
    "adaln_cond_dim": NON_NEGATIVE,
    "sampling_steps": AT_LEAST_1,
    "cfg_scale": NON_NEGATIVE,  # 1 = no guidance
    "label_dropout": Bounds(low=0, high=1, high_open=True),
    "max_nonfinite_skips": NON_NEGATIVE,
    "head_loss_chunk_rows": AT_LEAST_1,
}
# the least share of the log-normal that must fall on [sigma_min, sigma_max]
MIN_SIGMA_MASS = 1e-6


def check_diffusion_blocks(section: DiffusionBlocks) -> list[tuple[str, str]]:
    """Model-independent checks. Returns (key, problem) pairs; empty when valid."""
    problems = bounds_problems(section, DIFFUSION_BLOCKS_BOUNDS)
    bad = {key for key, _ in problems}
    if not bad & {"sigma_min", "sigma_max"} and section.sigma_min >= section.sigma_max:
        problems.append(
            (
                "sigma_min",
                f"need 0 < sigma_min < sigma_max, got sigma_min={section.sigma_min}, "
                f"sigma_max={section.sigma_max}",
            )
        )
    elif not bad & {"sigma_min", "sigma_max", "p_mean", "p_std"}:
        schedule = section.noise_schedule()
        mass = lognormal_cdf(section.sigma_max, schedule) - lognormal_cdf(section.sigma_min, schedule)
        if mass < MIN_SIGMA_MASS:
            problems.append((
                "p_mean",
                f"and p_std put {mass:.3g} of ln(sigma) ~ N(p_mean={section.p_mean}, "
                f"p_std={section.p_std}^2) on [sigma_min, sigma_max] = [{section.sigma_min}, "
                f"{section.sigma_max}]; move p_mean inside [ln sigma_min, ln sigma_max] = "
                f"[{math.log(section.sigma_min):.3g}, {math.log(section.sigma_max):.3g}] "
                "or widen p_std",
            ))
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
    problems += check_block_weights(section)
    if section.sampler not in ODE_SAMPLERS:
        problems.append(("sampler", f"{section.sampler!r} is not one of {list(ODE_SAMPLERS)}"))
    if section.block0_sigma_sampling not in SIGMA_LAWS:
        problems.append((
            "block0_sigma_sampling",
            f"{section.block0_sigma_sampling!r} is not one of {list(SIGMA_LAWS)}",
        ))
    if section.sampling_sigma_max != 0 and not (
        section.sigma_min < section.sampling_sigma_max <= section.sigma_max
    ):
        problems.append((
            "sampling_sigma_max",
            f"must be 0 (= sigma_max) or lie in (sigma_min, sigma_max] = "
            f"({section.sigma_min}, {section.sigma_max}], got {section.sampling_sigma_max}",
        ))
    for key in ("target_embedding_scale", "token_embedding_init_std", "embedding_lr_multiplier"):
        value = getattr(section, key)
        if not (math.isfinite(value) and value > 0):
            problems.append((key, f"must be a finite number > 0, got {value}"))
    if section.offload_inactive_blocks not in OFFLOAD_MODES:
        problems.append((
            "offload_inactive_blocks",
            f"{section.offload_inactive_blocks!r} is not one of {list(OFFLOAD_MODES)}",
        ))
    if section.block_parallel and section.block_schedule != "random":
        problems.append(
            ("block_parallel", "trains every block every step; leave block_schedule at 'random'")
        )
    if section.on_nonfinite not in NONFINITE_POLICIES:
        problems.append((
            "on_nonfinite", f"{section.on_nonfinite!r} is not one of {list(NONFINITE_POLICIES)}"
        ))
    problems += check_head_loss(section)
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


def check_block_weights(section: DiffusionBlocks) -> list[tuple[str, str]]:
    weights = section.block_weights
    if section.block_schedule != "weighted":
        if weights:
            return [("block_weights", f"is read only by block_schedule = 'weighted', "
                     f"but block_schedule is {section.block_schedule!r}")]
        return []
    if len(weights) != section.num_blocks:
        return [("block_weights", f"needs one weight per block (num_blocks = "
                 f"{section.num_blocks}), got {len(weights)}: {weights}")]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        return [("block_weights", f"every weight must be a finite number > 0, got {weights}")]
    return []


def check_head_loss(section: DiffusionBlocks) -> list[tuple[str, str]]:
    if section.head_loss not in HEAD_LOSSES:
        return [("head_loss", f"{section.head_loss!r} is not one of {list(HEAD_LOSSES)}")]
    default_rows = DiffusionBlocks.head_loss_chunk_rows
    if section.head_loss != "chunked" and section.head_loss_chunk_rows != default_rows:
        return [("head_loss_chunk_rows", "is read only by head_loss = 'chunked', but "
                 f"head_loss is {section.head_loss!r}")]
    return []


RECURRENT_BOUNDS = {"mean_recurrence": AT_LEAST_1, "bptt_steps": AT_LEAST_1}


def check_recurrent(section: Recurrent) -> list[tuple[str, str]]:
    problems = bounds_problems(section, RECURRENT_BOUNDS)
    if section.recurrence_law not in RECURRENCE_LAWS:
        problems.append((
            "recurrence_law",
            f"{section.recurrence_law!r} is not one of {list(RECURRENCE_LAWS)}",
        ))
    return problems


def check_data(section: Data) -> list[tuple[str, str]]:
    from .data.text import TOKENIZERS  # late: data imports torchtitan's dataset stack

    allowed = ["auto", "hf", *TOKENIZERS]
    problems = []
    if section.tokenizer not in allowed:
        problems.append(("tokenizer", f"{section.tokenizer!r} is not one of {allowed}"))
    problems += bounds_problems(section, {
        "holdout_fraction": Bounds(low=0, high=1, low_open=True, high_open=True),
        "shuffle_seed": SEED,
        "crop_padding": NON_NEGATIVE,
    })
    if section.augment not in AUGMENTATIONS:
        problems.append(("augment", f"{section.augment!r} is not one of {list(AUGMENTATIONS)}"))
    return problems


def check_model(section) -> list[tuple[str, str]]:
    problems = []
    for key in ("dropout", "attention_dropout"):
        value = getattr(section, key)
        if value is None:
            continue
        if not 0.0 <= value < 1.0:
            problems.append((key, f"must lie in [0, 1), got {value}"))
        elif not _flavor_has(section, key):
            problems.append((key, f"is not a model arg of {section.name!r}; only the ViT has dropout"))
    return problems


def _flavor_has(section, key: str) -> bool:
    """Whether the train spec's flavor has model arg `key` (True when the spec is
    unknown here: torchtitan reports that itself)."""
    from torchtitan.protocols.train_spec import get_train_spec

    try:
        args = get_train_spec(section.name).model_args[section.flavor]
    except (KeyError, ValueError):
        return True
    return hasattr(args, key)


# ---------------------------------------------------------------------------
# torchtitan's sections: values its code would take and fail on late (a division by
# zero mid-run, a torch traceback) or not at all (a run of 0 steps)


def check_training(section) -> list[tuple[str, str]]:
    problems = []
    if section.device not in DEVICES:
        problems.append(("device", f"{section.device!r} is not one of {list(DEVICES)}"))
    problems += bounds_problems(section, {
        "steps": AT_LEAST_1,
        "local_batch_size": AT_LEAST_1,
        "global_batch_size": Bounds(low=1, special=(-1,), special_meaning="local x data-parallel"),
        "seq_len": AT_LEAST_1,
        "max_norm": Bounds(low=0, low_open=True, allow_inf=True),  # inf: no clipping
        "gc_freq": AT_LEAST_1,
        "dataloader.num_workers": NON_NEGATIVE,
        "dataloader.prefetch_factor": AT_LEAST_1,
    })
    loader = section.dataloader
    if loader.num_workers == 0 and loader.prefetch_factor is not None:
        problems.append(("dataloader.prefetch_factor", "needs dataloader.num_workers > 0"))
    if loader.num_workers == 0 and loader.persistent_workers:
        problems.append(("dataloader.persistent_workers", "needs dataloader.num_workers > 0"))
    return problems + dataset_problems(section)


def local_datasets() -> dict[str, str]:
    """Our datasets whose dataset_path names local files: what the path must be."""
    from .data.images import LOCAL_IMAGE_DATASETS
    from .data.text import LOCAL_TEXT_DATASETS

    return {**LOCAL_TEXT_DATASETS, **LOCAL_IMAGE_DATASETS}


def dataset_problems(section) -> list[tuple[str, str]]:
    """A local-file dataset needs a `dataset_path` (whether the dataset is registered
    for the model is check_dataset_registered's; whether the path exists is
    dataset_path_problems', for the entry points that read it)."""
    what = local_datasets().get(section.dataset)
    if what and not section.dataset_path:
        return [("dataset", f"= {section.dataset!r} needs a dataset_path: {what}")]
    return []


def dataset_path_problems(job_config) -> list[tuple[str, str, str]]:
    """The local dataset files a run reads must exist (config_loader has resolved the
    paths against the config files that set them)."""
    local = local_datasets()
    problems = []
    for name in ("training", "validation"):
        section = getattr(job_config, name)
        if name == "validation" and not section.enable:
            continue
        path = section.dataset_path
        if section.dataset in local and path and not os.path.exists(path):
            problems.append((name, "dataset_path", (
                f"{path} does not exist (dataset = {section.dataset!r} reads "
                f"{local[section.dataset]}; a relative path is read from the folder of the "
                "config file that sets it)"
            )))
    return problems


def check_optimizer(section) -> list[tuple[str, str]]:
    problems = []
    if section.name not in OPTIMIZERS:
        problems.append(("name", f"{section.name!r} is not one of {list(OPTIMIZERS)}"))
    return problems + bounds_problems(section, {
        "lr": NON_NEGATIVE,
        "beta1": Bounds(low=0, high=1, high_open=True),
        "beta2": Bounds(low=0, high=1, high_open=True),
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
    })


def check_lr_scheduler(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {
        "warmup_steps": NON_NEGATIVE,
        "total_steps": AT_LEAST_1,
        "decay_ratio": UNIT_INTERVAL,
        "min_lr_factor": UNIT_INTERVAL,
    })


def check_checkpoint(section) -> list[tuple[str, str]]:
    problems = bounds_problems(section, {
        "interval": AT_LEAST_1,
        # torchtitan keeps >= 2: the newest may still be being written
        "keep_latest_k": Bounds(low=2, special=(0,), special_meaning="keep all"),
        "load_step": Bounds(low=0, special=(-1,), special_meaning="the newest"),
    })
    path = section.initial_load_path
    if section.enable and path and not os.path.isdir(path):
        problems.append((
            "initial_load_path",
            f"{path} is not a folder (a DCP step-N folder, or a Hugging Face folder with "
            "initial_load_in_hf; read from the working directory, as torchtitan does)",
        ))
    return problems


def check_metrics(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {"log_freq": AT_LEAST_1})


def check_validation(section) -> list[tuple[str, str]]:
    if not section.enable:
        return []
    problems = bounds_problems(section, {
        "freq": AT_LEAST_1,
        "steps": Bounds(low=1, special=(-1,), special_meaning="the whole validation set"),
        "local_batch_size": AT_LEAST_1,
        "seq_len": AT_LEAST_1,
    })
    return problems + dataset_problems(section)


def check_profiling(section) -> list[tuple[str, str]]:
    if not section.enable_profiling:
        return []
    problems = bounds_problems(section, {
        "profile_freq": AT_LEAST_1, "profiler_active": AT_LEAST_1, "profiler_warmup": NON_NEGATIVE,
    })
    if not problems and section.profile_freq < section.profiler_warmup + section.profiler_active:
        problems.append((
            "profile_freq",
            f"must be >= profiler_warmup + profiler_active = "
            f"{section.profiler_warmup + section.profiler_active}, got {section.profile_freq}",
        ))
    return problems


def check_comm(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {
        "init_timeout_seconds": AT_LEAST_1,
        "train_timeout_seconds": AT_LEAST_1,
        "trace_buf_size": NON_NEGATIVE,
    })


def check_parallelism(section) -> list[tuple[str, str]]:
    problems = bounds_problems(section, {
        "data_parallel_replicate_degree": AT_LEAST_1,
        "data_parallel_shard_degree": Bounds(low=1, special=(-1,), special_meaning="the rest"),
    })
    for key in SINGLE_DEGREE_PARALLELISMS:
        degree = getattr(section, key)
        if degree != 1:
            problems.append((
                key,
                f"= {degree}: DiffusionBlocks trains one block per step with data "
                "parallelism (FSDP2); set it to 1 and use data_parallel_shard_degree / "
                "data_parallel_replicate_degree",
            ))
    return problems


def check_activation_checkpoint(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {"memory_budget": UNIT_INTERVAL})


SECTION_CHECKS = {
    "diffusion_blocks": check_diffusion_blocks,
    "data": check_data,
    "training": check_training,
    "model": check_model,
    "optimizer": check_optimizer,
    "lr_scheduler": check_lr_scheduler,
    "checkpoint": check_checkpoint,
    "metrics": check_metrics,
    "validation": check_validation,
    "profiling": check_profiling,
    "comm": check_comm,
    "parallelism": check_parallelism,
    "activation_checkpoint": check_activation_checkpoint,
    "recurrent": check_recurrent,
}


def check_memory_budget_needs_compile(job_config) -> list[tuple[str, str, str]]:
    ac, compile_config = job_config.activation_checkpoint, job_config.compile
    if ac.mode == "memory_budget" and not (
        compile_config.enable and "model" in compile_config.components
    ):
        return [("activation_checkpoint", "mode",
                 "= 'memory_budget' works on the compiled model: set [compile] enable = true "
                 "(with 'model' in components) or pick another mode")]
    return []


def check_dataset_registered(job_config) -> list[tuple[str, str, str]]:
    """[training] dataset (and an enabled [validation] dataset of a text model) must be
    registered for the kind of data the model's train spec reads: torchtitan's text
    datasets, or our image datasets."""
    from torchtitan.hf_datasets.text_datasets import build_text_dataloader, DATASETS
    from torchtitan.protocols.train_spec import get_train_spec

    from .data.images import build_image_dataloader, IMAGE_DATASETS

    name = job_config.model.name
    try:
        spec = get_train_spec(name)
    except (ValueError, ImportError):
        return []  # not a model we train: resolve_run_spec says so, with the choices
    if spec.build_dataloader_fn not in (build_text_dataloader, build_image_dataloader):
        return []  # a dataloader of the user's: its datasets are its own
    images = spec.build_dataloader_fn is build_image_dataloader
    registry, kind = (IMAGE_DATASETS, "image") if images else (DATASETS, "text")
    # image models validate on the training dataset's test split
    sections = ["training"] if images or not job_config.validation.enable else ["training", "validation"]
    problems = []
    for section in sections:
        dataset = getattr(job_config, section).dataset
        if dataset not in registry:
            problems.append((section, "dataset", (
                f"{dataset!r} is not a registered {kind} dataset ([model] name {name!r} reads "
                f"{kind} data); available: {sorted(registry)}"
            )))
    return problems


# checks that read several sections: (section, key, problem) triples
JOB_CHECKS = [check_memory_budget_needs_compile, check_dataset_registered]
