"""The config sections this plugin adds or extends, as dataclasses, and their choice
names (the checks of their values are in checks.py; `JobConfig` is what
`[job] custom_config_module = "diffusion_blocks.config"` merges, see __init__.py).
"""

from dataclasses import dataclass, field

from ..diffusion.edm import NoiseSchedule

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
    """How [sigma_min, sigma_max] is cut: 'equiprobable', 'uniform_log', or 'explicit'
    (at `sigma_boundaries`)."""

    sigma_boundaries: list[float] = field(default_factory=list)
    """partition = 'explicit': the num_blocks - 1 inner boundaries, ascending: sigmas,
    or times t in (0, 1) for MD4's masking process (e.g. the information-balanced or
    equal-ELBO-share cut `tools/balance_partition.py` measures). Set only then."""

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

    self_conditioning: float = 0.0
    """LM (dblocks_llama3): self-conditioning (Chen et al., Analog Bits; as CDCD and
    Plaid). > 0: every noisy row also takes a previous estimate of its clean embedding,
    softmax(logits) @ table, through a Linear that starts at zero. Training: for this
    share of the sequences the block first runs without it (no gradient) and its
    estimate is fed in; the rest get none. Sampling: each step hands its estimate to
    the next (the next block at a block boundary). 0 = off (the paper's model); in
    [0, 1). Costs one more forward of the block (no backward) per training step."""

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
