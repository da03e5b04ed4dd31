"""Recurrent-depth (looped) LM, Huginn-style, on torchtitan's llama3 layers (docs/method.md
section 5, recurrent-depth row).

    tokens -> prelude (stock llama3 blocks, causal, clean rows) -> e
    core (DenoiserLayers, ONE set of weights) applied r times, e injected every time
    coda (DenoiserLayers) -> shared norm -> final AdaLN -> head

`layers` holds them in that order (prelude ids, then core ids, then coda ids), so
torchtitan's per-layer FSDP, compile and activation checkpointing apply unchanged.

Every core pass sees the autoregressive denoiser's 2T sequence [e ; state] (the llama
family's mask and RoPE positions): clean row i is the prelude's output e_i, which is
re-injected at every iteration (the state rows attend to e at every core layer, as
Huginn's adapter concatenates e to the state at every iteration); state row j attends
clean rows <= j and itself, and stands for the token x_{j+1}.

Two ways to train the same modules:
- `RecurrentDenoiser` (DiffusionBlocks): the state is the noisy normalised embedding z
  of the next token, an iteration is one Euler step of the probability-flow ODE, and
  the core with the coda is ONE denoiser over all of [sigma_min, sigma_max] (a single
  block). Training: sigma from the global truncated log-normal, the prelude, ONE core
  pass at that sigma, the coda, loss w(sigma) x CE. Prelude, core, coda, embeddings,
  conditioning and head get gradients from that one pass every step. Inference: r
  core passes as Euler steps over an r-point equi-probability sigma grid (sampler.py).
- `RecurrentTwin` (end to end, `[diffusion_blocks] enable = false`), Huginn's recipe:
  the state starts from N(0, I), each iteration is a core pass on [e ; state] (the
  state RMS-normalised between iterations), r is drawn per step, only the last
  k = bptt_steps iterations are backpropagated (truncated BPTT), the coda reads the
  last pass out, plain next-token CE. Iteration i of r is conditioned on the i-th
  point of the r-point sigma grid, so both recipes run the same modules the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from torchtitan.models.llama3 import Transformer

from ... import diffusion
from ..conditioning import AdaLNModulation, FinalAdaLN, SigmaEmbedder
from ..llama3.model import Denoised, DenoiserLayer, denoiser_positions, DiffusionBlocksLlama
from .args import RecurrentArgs

ITERATION_SEED = 514_229  # with the draw counter and the run's seed: r and the twin's start state


class RecurrentDepthLM(Transformer):
    """Prelude, shared core and coda; what the denoiser and the twin share."""

    model_args: RecurrentArgs
    TOKENS_PER_LABEL = 2  # core and coda run on [e ; state]: 2T rows for T labels

    # the llama denoiser's own methods: the same 2T sequence, mask and RoPE table, the
    # same clean points (target_embedding_scale * normalize(E[x])) and start noise
    FLEX_DEVICE_TYPES = DiffusionBlocksLlama.FLEX_DEVICE_TYPES
    _precompute_freqs_cis = DiffusionBlocksLlama._precompute_freqs_cis
    uses_flex_attention = DiffusionBlocksLlama.uses_flex_attention
    attention_mask = DiffusionBlocksLlama.attention_mask
    clean_embedding = DiffusionBlocksLlama.clean_embedding
    clean_embedding_table = DiffusionBlocksLlama.clean_embedding_table
    scaled_unit_rows = DiffusionBlocksLlama.scaled_unit_rows
    initial_noise_std = DiffusionBlocksLlama.initial_noise_std

    def __init__(self, model_args: RecurrentArgs):
        assert model_args.partition is not None, "call update_from_config first"
        if model_args.attn_type != "sdpa":
            raise ValueError(
                f"dblocks_recurrent runs SDPA attention (the prelude is causal, core and "
                f"coda take the 2T mask); got attn_type = {model_args.attn_type!r}"
            )
        super().__init__(model_args)
        self.options = model_args.denoiser  # [diffusion_blocks]' denoiser keys (as the llama3 family's)
        cond_dim = self.options.adaln_cond_dim or model_args.dim
        self.sigma_embedder = SigmaEmbedder(cond_dim)
        self.final_adaln = FinalAdaLN(model_args.dim, cond_dim=cond_dim)
        for layer_id in (*model_args.core_ids, *model_args.coda_ids):
            layer = DenoiserLayer(layer_id, model_args)
            layer.adaln = AdaLNModulation(cond_dim, model_args.dim, num_chunks=6)
            self.layers[str(layer_id)] = layer

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None):
        super().init_weights(buffer_device)
        # torchtitan's N(0, 1) draw scaled to [diffusion_blocks] token_embedding_init_std
        self.tok_embeddings.weight.mul_(self.options.token_embedding_init_std)
        self.sigma_embedder.init_weights()
        self.final_adaln.init_weights()
        for layer in (*self.core_layers, *self.coda_layers):
            layer.adaln.init_weights()  # AdaLN-Zero: every conditioned layer starts as the identity

    def _layers(self, ids: range) -> list:
        return [self.layers[str(i)] for i in ids]

    @property
    def prelude_layers(self) -> list:
        return self._layers(self.model_args.prelude_ids)

    @property
    def core_layers(self) -> list:
        return self._layers(self.model_args.core_ids)

    @property
    def coda_layers(self) -> list:
        return self._layers(self.model_args.coda_ids)

    @property
    def schedule(self) -> diffusion.NoiseSchedule:
        return self.model_args.partition.schedule

    def condition(self, sigma_B: torch.Tensor) -> torch.Tensor:
        return self.sigma_embedder(diffusion.c_noise(sigma_B))

    def context(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """The prelude on the clean tokens (causal, unconditioned): e (B, T, D). Run once
        per forward (once per generated token), injected at every core iteration."""
        h_BTD = self.clean_embedding(tokens_BT)
        for layer in self.prelude_layers:
            h_BTD = layer(h_BTD, self.freqs_cis, attention_masks=None)
        return h_BTD

    def core_pass(
        self, e_BTD: torch.Tensor, state_BTD: torch.Tensor, cond_BD: torch.Tensor
    ) -> torch.Tensor:
        """ONE pass of the shared core over [e ; state]; returns the 2T rows (B, 2T, D)."""
        seq_len = e_BTD.shape[1]
        x_BSD = torch.cat([e_BTD, state_BTD.to(e_BTD.dtype)], dim=1)
        mask = self.attention_mask(seq_len, x_BSD.device)
        positions = denoiser_positions(seq_len, x_BSD.device)
        for layer in self.core_layers:
            x_BSD = layer(x_BSD, cond_BD, self.freqs_cis, mask, positions)
        return x_BSD

    def coda(self, x_BSD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """The coda on a core pass's 2T rows, then the shared norm of the state rows (B, T, D)."""
        seq_len = x_BSD.shape[1] // 2
        mask = self.attention_mask(seq_len, x_BSD.device)
        positions = denoiser_positions(seq_len, x_BSD.device)
        for layer in self.coda_layers:
            x_BSD = layer(x_BSD, cond_BD, self.freqs_cis, mask, positions)
        return self.norm(x_BSD[:, seq_len:])

    def head(self, x_BTD: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.output(self.final_adaln(x_BTD, cond_BD))


class RecurrentDenoiser(RecurrentDepthLM):
    """DiffusionBlocks: core + coda are one denoiser for every sigma; a training step
    runs the core once (the single block of `partition` owns all of [sigma_min, sigma_max])."""

    self_conditions = False  # the LM task it shares asks (only the Llama denoiser has it)

    def __init__(self, model_args: RecurrentArgs):
        super().__init__(model_args)
        self.partition = model_args.partition

    def denoise(
        self, e_BTD: torch.Tensor, z_BTD: torch.Tensor, sigma_B: torch.Tensor
    ) -> Denoised:
        """One iteration's denoiser at noise levels sigma: ONE core pass on
        [e ; c_in z], the coda, D = c_skip z + c_out h, logits = head(final_adaln(D))."""
        sigma_data = self.schedule.sigma_data
        sigma_B = sigma_B.to(z_BTD.dtype)
        cond_BD = self.condition(sigma_B)
        scaled_BTD = diffusion.c_in(sigma_B[:, None, None], sigma_data) * z_BTD
        h_BTD = self.coda(self.core_pass(e_BTD, scaled_BTD, cond_BD), cond_BD)
        denoised_BTD = diffusion.denoised_estimate(z_BTD, h_BTD, sigma_B, sigma_data)
        return Denoised(denoised_BTD, self.head(denoised_BTD, cond_BD))

    def forward(
        self, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, *, block: int,
        sigma_B: torch.Tensor, noise_BTD: torch.Tensor,
    ) -> torch.Tensor:
        """Training forward (the llama denoiser's signature, so its task scores it):
        the prelude, the labels' embeddings noised at sigma, one denoiser pass; logits
        at the state rows (B, T, vocab)."""
        assert block == 0, f"dblocks_recurrent has one block, got block {block}"
        y_BTD = self.clean_embedding(labels_BT)
        z_BTD = y_BTD + sigma_B.to(y_BTD.dtype)[:, None, None] * noise_BTD
        return self.denoise(self.context(tokens_BT), z_BTD, sigma_B).logits_BTV


# ---------------------------------------------------------------------------
# The end-to-end twin


def draw_recurrence(law: str, mean: int, generator: torch.Generator) -> int:
    """r for one training step. 'poisson_lognormal' is Huginn's law (Geiping et al.
    2025): lambda ~ LogNormal(ln(mean - 1) - s^2/2, s = 0.5), r = Poisson(lambda) + 1,
    shifted so E[r] = mean (Huginn's own draw has mean + 1); 'uniform': 1 .. 2 mean - 1;
    'fixed': mean."""
    if law == "fixed" or mean == 1:
        return mean
    if law == "uniform":
        return int(torch.randint(1, 2 * mean, (), generator=generator))
    if law == "poisson_lognormal":
        s = 0.5
        log_rate = math.log(mean - 1) - s * s / 2 + s * float(torch.randn((), generator=generator))
        rate = torch.tensor([math.exp(log_rate)], dtype=torch.float64)
        return int(torch.poisson(rate, generator=generator)) + 1
    raise ValueError(f"unknown recurrence law {law!r}")


class RecurrentTwin(RecurrentDepthLM):
    """End to end (Huginn-style): r iterations of the core on a latent state, truncated
    BPTT through the last k, the coda once, next-token logits."""

    def __init__(self, model_args: RecurrentArgs):
        super().__init__(model_args)
        # draws made so far: r and the start state of draw n are seeded by (seed, n),
        # identically on every rank; a buffer, so checkpoints carry it and a resumed
        # run draws what the uninterrupted run drew
        self.register_buffer("recurrence_draws", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None):
        super().init_weights(buffer_device)
        self.recurrence_draws.zero_()

    def iterations(self) -> tuple[int, int, torch.Generator | None]:
        """(iterations under no_grad, backpropagated iterations, generator of the start
        state) of this forward. Training: r from the law, the last min(k, r)
        backpropagated; eval: r = inference_recurrence, none backpropagated."""
        args = self.model_args
        if not self.training:
            generator = torch.Generator(self.freqs_cis.device).manual_seed(ITERATION_SEED)
            return args.inference_recurrence, 0, generator
        if self.recurrence_draws.is_meta:
            # memory estimation on meta: the mean split, nothing to draw from
            grad = min(args.bptt_steps, args.mean_recurrence)
            return args.mean_recurrence - grad, grad, None
        seed = ITERATION_SEED + 1_000_003 * args.seed + int(self.recurrence_draws)
        self.recurrence_draws += 1
        recurrence = draw_recurrence(
            args.recurrence_law, args.mean_recurrence, torch.Generator().manual_seed(seed)
        )
        grad = min(args.bptt_steps, recurrence)
        generator = torch.Generator(self.freqs_cis.device).manual_seed(seed)
        return recurrence - grad, grad, generator

    def recur(
        self, e_BTD: torch.Tensor, no_grad_steps: int, grad_steps: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """r = no_grad_steps + grad_steps core iterations from a random state, the coda
        once; logits (B, T, vocab). Iteration i runs at the i-th point of the r-point
        sigma grid; the first no_grad_steps build no graph (truncated BPTT)."""
        recurrence = no_grad_steps + grad_steps
        batch = e_BTD.shape[0]
        sigmas = diffusion.sampling_sigmas(recurrence, self.schedule)[:-1]
        state_BTD = torch.randn(
            e_BTD.shape, generator=generator, device=e_BTD.device, dtype=e_BTD.dtype
        )
        x_BSD = cond_BD = None
        for i, sigma in enumerate(sigmas):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad_steps):
                cond_BD = self.condition(torch.full((batch,), sigma, device=e_BTD.device))
                x_BSD = self.core_pass(e_BTD, state_BTD, cond_BD)
                state_BTD = F.rms_norm(x_BSD[:, e_BTD.shape[1]:], (x_BSD.shape[-1],))
        return self.head(self.coda(x_BSD, cond_BD), cond_BD)

    def forward(self, tokens_BT: torch.Tensor, attention_masks=None, positions=None):
        """Next-token logits (B, T, vocab), torchtitan's Transformer signature."""
        no_grad_steps, grad_steps, generator = self.iterations()
        return self.recur(self.context(tokens_BT), no_grad_steps, grad_steps, generator)
