"""Text generation with the block-partitioned denoiser and with its end-to-end twin.

Denoiser, per new token (docs/method.md section 6): the noisy row of the next token starts
from sigma_start * N(0, I) (sigma_start = `start_sigma` if given, else `[diffusion_blocks] sampling_sigma_max`,
else sigma_max; see
`uninformative_state`) and walks the equi-probability sigma grid down to sigma_min in
`steps_per_block` x B steps, each step run by the block that owns its sigma. Three token
samplers take the steps:

- "euler": the probability-flow ODE step z <- z + (sigma' - sigma) (z - D) / sigma with
  the model's expected clean embedding D = softmax(logits) @ normalize(E), never the raw
  c_skip z + c_out h (no loss constrains that one's norm or off-table direction);
- "ancestral": draw a token from softmax(logits) and re-noise its normalised embedding
  to the next sigma, z <- e_hat[token] + sigma' eps, so every block sees the kind of
  state it was trained on;
- "heun": EDM's second-order step (`diffusion.heun_step`) with the same D: the Euler
  step to z', then D(z', sigma') from the block owning sigma' (the next block at a block
  boundary), and the average of the two slopes. Two block calls per step.

`churn` (EDM's S_churn) optionally raises each step's sigma with fresh noise first.
After the last step the block owning sigma_min reads z at sigma_min, and its logits
give the token (`stop_sigma`: the chain stops at the lowest sigma of its grid that is
>= stop_sigma instead, and the block owning that sigma reads z there; the token is
decided where the blocks above it left it, the later blocks take no step): greedy, or sampled at `temperature` (and `top_k`). Temperature acts on
that final distribution only; the steps always use the model's own distribution.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ... import diffusion
from ...errors import ConfigError
from . import kv_cache

# Which token sampler the denoiser uses by default: measured in the README's LM section
# (tools/reports/lm.py, 1 to 8 steps per block).
DEFAULT_SAMPLER = "ancestral"


@dataclass(frozen=True)
class DecodingConfig:
    max_new_tokens: int = 64
    steps_per_block: int = 1
    temperature: float = 0.0      # of the final pick only; 0 = greedy
    top_k: int = 0                # of the final pick only; 0 = whole vocabulary
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER  # the denoiser's token sampler: a key of TOKEN_STEPS
    churn: float = 0.0            # EDM S_churn (0 = none)
    start_sigma: float | None = None  # None = the partition's sampling_start_sigma
    stop_sigma: float | None = None   # None = sigma_min: the whole chain (see decoding_plan)
    kv_cache: bool = True         # reuse the context's keys and values (kv_cache.py)

    def __post_init__(self):
        problems = [
            f"{name} must be {rule}, got {value}"
            for name, value, ok, rule in (
                ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 0, ">= 0"),
                ("steps_per_block", self.steps_per_block, self.steps_per_block >= 1, ">= 1"),
                ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)"),
                ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 = whole vocabulary)"),
                ("sampler", repr(self.sampler), self.sampler in TOKEN_STEPS,
                 f"one of {sorted(TOKEN_STEPS)}"),
                ("churn", self.churn, self.churn >= 0, ">= 0"),
                ("start_sigma", self.start_sigma,
                 self.start_sigma is None or self.start_sigma > 0, "> 0"),
                ("stop_sigma", self.stop_sigma,
                 self.stop_sigma is None or self.stop_sigma > 0, "> 0"),
            )
            if not ok
        ]
        if problems:
            raise ConfigError("decoding: " + "; ".join(problems))


# ---------------------------------------------------------------------------
# Drawing tokens


def standard_normal(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """eps ~ N(0, I), drawn on the (CPU) generator, on like's device and dtype."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


def standard_normal_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return standard_normal(x.shape, generator, x)


def uninformative_state(shape, sigma: float, generator, like: torch.Tensor) -> torch.Tensor:
    """A noisy row at sigma that carries nothing of its token: sigma * eps, where the
    block was trained on e_hat + sigma * eps. The clean part (norm 1, mean over the
    table near 0) is the unknown; sqrt(1 + sigma^2) * eps would overstate the noise
    per coordinate (unit-norm embeddings have variance 1/D per coordinate, not 1):
    negligible at sigma_max = 80, not at a low start sigma."""
    return sigma * standard_normal(shape, generator, like)


def sample_from(logits_BV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits), (B,)."""
    probs_BV = torch.softmax(logits_BV.float(), dim=-1)
    return torch.multinomial(probs_BV.cpu(), 1, generator=generator).squeeze(-1).to(logits_BV.device)


def pick_tokens(logits_BV: torch.Tensor, config: DecodingConfig, generator) -> torch.Tensor:
    """The final pick: argmax at temperature 0, else a draw at temperature (and top-k)."""
    if config.temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits_BV, config.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, -math.inf)
    return sample_from(logits_BV, generator)


# ---------------------------------------------------------------------------
# The token samplers' steps: (z, logits at sigma, table, sigma, sigma_next, generator,
# next_logits) -> z at sigma_next. next_logits(z') gives the logits at sigma_next from
# the block owning sigma_next; only the Heun step calls it.

Logits = Callable[[torch.Tensor], torch.Tensor]
TokenStep = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float, float, torch.Generator, Logits],
    torch.Tensor,
]


def euler_token_step(z_BD, logits_BV, table_VD, sigma, sigma_next, generator, next_logits=None):
    """The ODE step with the expected clean embedding D = softmax(logits) @ table."""
    denoised_BD = diffusion.expected_clean_embedding(logits_BV, table_VD).to(z_BD.dtype)
    return diffusion.euler_step(z_BD, denoised_BD, sigma, sigma_next)


def renoised_tokens(tokens_B, table_VD, sigma_next, generator, like_BD) -> torch.Tensor:
    """z <- e_hat[token] + sigma_next * eps, each row's token given."""
    clean_BD = table_VD[tokens_B].to(like_BD.dtype)
    return diffusion.noised(clean_BD, sigma_next, standard_normal_like(clean_BD, generator))


def ancestral_token_step(z_BD, logits_BV, table_VD, sigma, sigma_next, generator, next_logits=None):
    """Draw x ~ softmax(logits) and re-noise: z <- e_hat[x] + sigma_next * eps."""
    return renoised_tokens(sample_from(logits_BV, generator), table_VD, sigma_next, generator, z_BD)


def heun_token_step(z_BD, logits_BV, table_VD, sigma, sigma_next, generator, next_logits):
    """EDM's Heun step with D = softmax(logits) @ table at both ends; the second D from
    next_logits(z'), the block owning sigma_next."""

    def denoised(logits_BV):
        return diffusion.expected_clean_embedding(logits_BV, table_VD).to(z_BD.dtype)

    return diffusion.heun_step(
        z_BD, denoised(logits_BV), sigma, sigma_next,
        lambda z_euler_BD: denoised(next_logits(z_euler_BD)),
    )


TOKEN_STEPS: dict[str, TokenStep] = {
    "euler": euler_token_step,
    "ancestral": ancestral_token_step,
    "heun": heun_token_step,
}


# ---------------------------------------------------------------------------
# The next token


def owner_of(partition, sigma: float) -> int:
    """The block that owns sigma."""
    return int(partition.block_of_level(torch.tensor([sigma], dtype=torch.float64)))


def in_last_row(x_BD: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
    """(B, T, D) zeros but for the last row, x_BD (None stays None)."""
    if x_BD is None:
        return None
    x_BTD = x_BD.new_zeros(x_BD.shape[0], seq_len, x_BD.shape[-1])
    x_BTD[:, -1] = x_BD
    return x_BTD


def last_row_denoiser(model, context_BT: torch.Tensor):
    """logits(z_BD, sigma, block, self_cond_BD=None) -> (B, V): block `block`'s logits
    for the token after `context_BT`, its noisy row holding z_BD (and the previous clean
    estimate self_cond_BD, with self-conditioning). A noisy row sees the clean prefix
    and itself only, so the other noisy rows do not matter: they are zeros."""
    batch, seq_len = context_BT.shape

    def logits(z_BD: torch.Tensor, sigma: float, block: int, self_cond_BD=None) -> torch.Tensor:
        sigma_B = torch.full((batch,), sigma, device=z_BD.device)
        denoised = model.denoise(
            context_BT, in_last_row(z_BD, seq_len), sigma_B, block,
            in_last_row(self_cond_BD, seq_len),
        )
        return denoised.logits_BTV[:, -1]

    return logits


def self_conditioned(block_logits, table_VD: torch.Tensor):
    """block_logits(z, sigma, block) of a self-conditioning model: each call gets the
    previous call's clean estimate softmax(logits) @ table (the previous step's, the
    previous block's at a block boundary); the chain's first call gets none."""
    estimate = None

    def logits(z_BD: torch.Tensor, sigma: float, block: int) -> torch.Tensor:
        nonlocal estimate
        logits_BV = block_logits(z_BD, sigma, block, estimate)
        estimate = diffusion.expected_clean_embedding(logits_BV, table_VD).to(z_BD.dtype)
        return logits_BV

    return logits


def sigma_start(partition, config: DecodingConfig) -> float:
    """The decoding's start_sigma, else the configured `[diffusion_blocks]
    sampling_sigma_max` (sigma_max unless set)."""
    schedule = partition.schedule
    if config.start_sigma is None:
        return partition.sampling_start_sigma
    if not schedule.sigma_min < config.start_sigma <= schedule.sigma_max:
        raise ConfigError(
            f"decoding: start_sigma must lie in (sigma_min, sigma_max] = "
            f"({schedule.sigma_min}, {schedule.sigma_max}], got {config.start_sigma}"
        )
    return config.start_sigma


def check_stop_sigma(partition, config: DecodingConfig, start: float) -> None:
    if config.stop_sigma is not None and not (
        partition.schedule.sigma_min <= config.stop_sigma <= start
    ):
        raise ConfigError(
            f"decoding: stop_sigma must lie in [sigma_min, start sigma] = "
            f"[{partition.schedule.sigma_min}, {start}], got {config.stop_sigma}"
        )


def whole_plan(partition, config: DecodingConfig) -> list:
    """The grid from the start sigma down to sigma_min in B x steps_per_block steps."""
    start = sigma_start(partition, config)
    check_stop_sigma(partition, config, start)
    return partition.sampling_plan(partition.num_blocks * config.steps_per_block, start)


def stopped(plan: list, stop_sigma: float | None) -> list:
    """`plan` cut after the last step landing at or above stop_sigma (all of it when None)."""
    if stop_sigma is None:
        return plan
    # relative slack: a stop_sigma typed from a printed grid point keeps that point
    return [step for step in plan if step.sigma_next >= stop_sigma * (1 - 1e-9)]


def decoding_plan(partition, config: DecodingConfig) -> list:
    """The steps a token's chain takes: the whole plan, stopped at config.stop_sigma."""
    return stopped(whole_plan(partition, config), config.stop_sigma)


def final_sigma(partition, plan: list, config: DecodingConfig) -> float:
    """Where the chain's token is read: the last step's sigma_next (the start sigma when
    the plan is empty)."""
    return plan[-1].sigma_next if plan else sigma_start(partition, config)


# on_logits(sigma, block, logits_NV): a chain's state read at sigma by its block
LogitsHook = Callable[[float, int, torch.Tensor], None]


@torch.no_grad()
def denoise_next_token_logits(
    model, context_BT: torch.Tensor, config: DecodingConfig, generator: torch.Generator,
    last_row=last_row_denoiser, table_VD: torch.Tensor | None = None, rows: int | None = None,
    on_logits: LogitsHook | None = None, token_step: TokenStep | None = None,
) -> torch.Tensor:
    """Sample the token after `context_BT` with the configured token sampler; returns
    the logits (B, V) the token is drawn from: the block owning sigma_min's, read at
    sigma_min after the last step (at the chain's stop when config.stop_sigma is set).
    `on_logits` sees every state the chain reaches as its block reads it (the logits
    each step starts from, then the final ones): what a chain stopped there would draw.
    `token_step` replaces config.sampler's step (an estimator's variant of it).
    `last_row(model, context_BT)` gives the block calls' function (`last_row_denoiser`,
    or a KV cache's; a self-conditioning model's calls pass on their estimates,
    `self_conditioned`); `table_VD` the model's clean_embedding_table() where the caller
    has it (generate makes it once, not per token). `rows`: the noisy rows the chain
    runs, one per context row unless the block calls' function takes more (B * T for
    sampler_ce.all_positions_denoiser, every position's next token); (rows, V) back."""
    partition = model.partition
    schedule = partition.schedule
    start = sigma_start(partition, config)
    whole = whole_plan(partition, config)
    plan = stopped(whole, config.stop_sigma)
    # the whole chain's churn: a stopped chain is the whole chain's first steps
    gamma = diffusion.churn_gamma(config.churn, len(whole))
    token_step = token_step or TOKEN_STEPS[config.sampler]
    if table_VD is None:
        table_VD = model.clean_embedding_table()
    block_logits = last_row(model, context_BT)
    if model.self_conditions:
        block_logits = self_conditioned(block_logits, table_VD)
    rows = context_BT.shape[0] if rows is None else rows
    z_BD = uninformative_state((rows, table_VD.shape[1]), start, generator, table_VD)

    def churn(z_BD, step):
        sigma_hat = min(step.sigma * (1 + gamma), schedule.sigma_max)
        z_BD = diffusion.churn(z_BD, step.sigma, sigma_hat, standard_normal_like(z_BD, generator))
        return z_BD, sigma_hat, owner_of(partition, sigma_hat)

    def take_step(z_BD, logits_BV, sigma, sigma_next, next_logits):
        if on_logits is not None:
            on_logits(sigma, owner_of(partition, sigma), logits_BV)
        return token_step(z_BD, logits_BV, table_VD, sigma, sigma_next, generator, next_logits)

    z_BD = diffusion.walk_plan(block_logits, z_BD, plan, take_step, churn if gamma > 0 else None)
    sigma = final_sigma(partition, plan, config)
    block = owner_of(partition, sigma)
    logits_BV = block_logits(z_BD, sigma, block)
    if on_logits is not None:
        on_logits(sigma, block, logits_BV)
    return logits_BV


@torch.no_grad()
def autoregressive_next_token_logits(model, context_BT, config, generator):
    """The end-to-end twin: a plain next-token forward."""
    return model(context_BT)[:, -1]


def is_denoiser(model) -> bool:
    return hasattr(model, "partition")


@torch.no_grad()
def next_token_function(model, config: DecodingConfig):
    """(model, context_BT, config, generator) -> the next token's logits (B, V), for one
    generate call: the denoiser's sampler (its clean-embedding table made once) or the
    twin's forward, through a fresh KV cache when config.kv_cache and the model is one
    kv_cache.py knows (the LM denoiser, a stock llama3 Transformer with SDPA
    attention); any other model decodes uncached."""
    if is_denoiser(model):
        denoise = partial(denoise_next_token_logits, table_VD=model.clean_embedding_table())
        if config.kv_cache and kv_cache.caches_denoiser(model):
            return partial(denoise, last_row=kv_cache.DenoiserKVCache().last_row_denoiser)
        return denoise
    if config.kv_cache and kv_cache.caches_twin(model):
        return kv_cache.TwinKVCache().next_token_logits
    return autoregressive_next_token_logits


@torch.no_grad()
def generate(
    model, prompt_BT: torch.Tensor, config: DecodingConfig, max_context: int,
    on_token: Callable[[], None] | None = None, next_token_logits=None,
) -> torch.Tensor:
    """Append config.max_new_tokens tokens to each prompt row; returns (B, T + new).
    `on_token` is called after every new token (progress bars); `next_token_logits`
    (model, context_BT, config, generator) -> (B, V) replaces the model's own
    (`next_token_function`), e.g. a diagnostic that reads one block alone."""
    if next_token_logits is None:
        next_token_logits = next_token_function(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    tokens_BT = prompt_BT
    for _ in range(config.max_new_tokens):
        context_BT = tokens_BT[:, -max_context:]
        logits_BV = next_token_logits(model, context_BT, config, generator)
        next_B = pick_tokens(logits_BV, config, generator)
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
        if on_token is not None:
            on_token()
    return tokens_BT


def forwards_per_token(model, config: DecodingConfig) -> int:
    """Model calls per new token: B x steps_per_block steps (two calls each for Heun)
    plus the final read for the denoiser (each runs one block), one for the end-to-end
    twin (all its layers)."""
    if not is_denoiser(model):
        return 1
    return diffusion.network_evaluations(config.sampler, decoding_plan(model.partition, config)) + 1


def decoding_config(request, job_config) -> DecodingConfig:
    """A `family.TextRequest` as the autoregressive denoisers' DecodingConfig (its
    unset fields from `[diffusion_blocks]` and the defaults)."""
    return DecodingConfig(
        max_new_tokens=request.max_new_tokens,
        steps_per_block=(request.steps_per_block
                         or job_config.diffusion_blocks.sampling_steps_per_block),
        temperature=request.temperature or 0.0, top_k=request.top_k, seed=request.seed,
        sampler=request.sampler or DEFAULT_SAMPLER, churn=request.churn,
        start_sigma=request.start_sigma, stop_sigma=request.stop_sigma,
        kv_cache=request.kv_cache,
    )


# TextRequest fields only a denoiser's sampler reads (the end-to-end twin decodes
# plain next-token logits)
DENOISER_ONLY_OPTIONS = ("sampler", "churn", "start_sigma", "stop_sigma", "steps_per_block")


def continue_prompt(
    generate_fn, family: str, model, tokenizer, job_config, request,
    refused: tuple[str, ...] = ("steps",), twin_uses: tuple[str, ...] = (),
) -> list[str]:
    """`ModelFamily.sample_text` of an autoregressive family: the prompt continued token
    by token with `generate_fn(model, prompt_BT, DecodingConfig, max_context)`, one
    text per sample, prompt included (greedy unless a temperature is given). `refused`:
    the request's fields the family does not use; `twin_uses`: the denoiser-only fields
    its end-to-end twin reads all the same (the recurrent twin's r)."""
    if getattr(model, "partition", None) is None:  # the end-to-end twin: no denoiser
        refused = (*refused, *(o for o in DENOISER_ONLY_OPTIONS if o not in twin_uses))
        family = f"{family} end to end ([diffusion_blocks] enable = false)"
    request.refuse_options(refused, family)
    prompt_ids = tokenizer.encode(request.prompt, add_bos=True, add_eos=False)
    prompts_BT = torch.tensor([prompt_ids] * request.num_samples)
    tokens_BT = generate_fn(
        model, prompts_BT, decoding_config(request, job_config), job_config.training.seq_len
    )
    return [request.prompt + tokenizer.decode(row[len(prompt_ids):].tolist()) for row in tokens_BT]
