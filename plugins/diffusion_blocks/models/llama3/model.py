"""Block-partitioned autoregressive Llama denoiser (docs/method.md section 5).

The denoiser IS a stock torchtitan llama3 `Transformer`, converted in place by
`convert_to_denoiser`: every layer gets AdaLN-Zero modulation, the model gets a sigma
embedder and a final AdaLN; every stock weight is kept, so a stock checkpoint can
initialise it. `DiffusionBlocksLlama(args)` builds a Transformer and converts it, so
the `dblocks_llama3` train spec and the `diffusion_blocks` converter share one path.

A block sees the 2T sequence [clean_0..clean_{T-1} ; noisy_0..noisy_{T-1}] where the
clean rows are the input tokens x_0..x_{T-1} and noisy row j is the noised embedding of
the label x_{j+1}. Clean row i attends clean columns <= i; noisy row j attends clean
columns <= j (i.e. the tokens before the one it denoises) and itself. Clean x_i and the
noisy row of x_i share RoPE position i, so noisy row j sits at position j + 1.

A token's clean point, target_embedding_scale * normalize(E[x]), has one definition
(`scaled_unit_rows`, behind `clean_embedding` and `clean_embedding_table`): the clean
rows, the training target y, and the table samplers decode against.

Self-conditioning (`[diffusion_blocks] self_conditioning > 0`, docs/method.md section 9):
a noisy row also gets W_sc s, s a previous estimate of its clean embedding
(softmax(logits) @ table; zero when there is none) and W_sc a bias-free Linear that
starts at zero, so the model starts as the one without it.
"""

import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from torchtitan.models.attention import FlexAttentionWrapper
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.model import (
    apply_rotary_emb,
    Attention,
    precompute_freqs_cis,
    TransformerBlock,
)

from ... import diffusion
from ...diffusion.partition import BlockPartition
from ..conditioning import AdaLNModulation, FinalAdaLN, modulate, per_row, SigmaEmbedder
from .args import DenoiserOptions, DiffusionBlocksLlamaArgs


# ---------------------------------------------------------------------------
# The 2T attention pattern


def denoiser_mask_mod(seq_len: int):
    """FlexAttention mask_mod of the [clean ; noisy] sequence (True = may attend)."""

    def mask_mod(batch, head, q_idx, kv_idx):
        q_position = torch.where(q_idx < seq_len, q_idx, q_idx - seq_len)
        sees_clean_prefix = (kv_idx < seq_len) & (kv_idx <= q_position)
        return sees_clean_prefix | (q_idx == kv_idx)

    return mask_mod


def denoiser_dense_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """The same pattern as a (2T, 2T) boolean tensor, for SDPA."""
    idx = torch.arange(2 * seq_len, device=device)
    return denoiser_mask_mod(seq_len)(None, None, idx[:, None], idx[None, :])


def denoiser_positions(seq_len: int, device: torch.device) -> torch.Tensor:
    """RoPE positions (1, 2T): clean rows 0..T-1, noisy rows 1..T."""
    clean = torch.arange(seq_len, device=device)
    return torch.cat([clean, clean + 1])[None]


def rotated_qkv(
    attention: Attention, x_BSD: torch.Tensor, freqs_cis: torch.Tensor,
    positions: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stock llama3 attention's q, k, v of x's rows, (B, heads, S, head_dim), RoPE
    at `positions` (1, S) applied to q and k."""
    bs, seq_len, _ = x_BSD.shape
    xq = attention.wq(x_BSD).view(bs, seq_len, -1, attention.head_dim)
    xk = attention.wk(x_BSD).view(bs, seq_len, -1, attention.head_dim)
    xv = attention.wv(x_BSD).view(bs, seq_len, -1, attention.head_dim)
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions)
    return tuple(t.transpose(1, 2) for t in (xq, xk, xv))


def attend(
    attention: Attention, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
    mask: torch.Tensor | BlockMask | None, is_causal: bool = False,
) -> torch.Tensor:
    """Attention of the queries (B, heads, S, head_dim) over the keys and values
    (B, kv_heads, S_kv, head_dim) under `mask` (bool (S, S_kv), BlockMask, or None: all
    visible, or with is_causal SDPA's causal mask), through the output projection:
    (B, S, D)."""
    bs, _, seq_len, _ = xq.shape
    if isinstance(mask, BlockMask):
        out = FlexAttentionWrapper()(
            xq, xk, xv, block_mask=mask, enable_gqa=attention.enable_gqa
        )
    else:
        out = F.scaled_dot_product_attention(
            xq, xk, xv, attn_mask=mask, is_causal=is_causal, enable_gqa=attention.enable_gqa
        )
    return attention.wo(out.transpose(1, 2).reshape(bs, seq_len, -1))


def masked_attention(
    attention: Attention,
    x_BSD: torch.Tensor,
    freqs_cis: torch.Tensor,
    mask: torch.Tensor | BlockMask,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The stock llama3 attention with an arbitrary mask (bool tensor or BlockMask)."""
    xq, xk, xv = rotated_qkv(attention, x_BSD, freqs_cis, positions)
    return attend(attention, xq, xk, xv, mask)


# ---------------------------------------------------------------------------
# Layers and model


class DenoiserLayer(TransformerBlock):
    """A stock llama3 TransformerBlock plus AdaLN-Zero (made by class swap)."""

    adaln: AdaLNModulation

    def forward(self, x_BSD, cond, freqs_cis, mask, positions):
        """cond: the condition vector per sequence (B, C) or per row (B, S, C)."""
        return self.modulated_forward(
            x_BSD, self.adaln(cond),
            lambda attn_in: masked_attention(self.attention, attn_in, freqs_cis, mask, positions),
        )

    def modulated_forward(self, x_BSD, modulation, attention_fn):
        """The layer given its AdaLN-Zero modulation (`self.adaln(cond)`) and its
        attention as attention_fn(normed rows (B, S, D)) -> (B, S, D): the masked
        attention over the rows themselves (forward), or one that also sees cached keys
        and values (kv_cache.py, which also reuses the modulation)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation
        attn_out = attention_fn(modulate(self.attention_norm(x_BSD), shift_a, scale_a))
        h_BSD = x_BSD + per_row(gate_a) * attn_out
        ffn_out = self.feed_forward(modulate(self.ffn_norm(h_BSD), shift_m, scale_m))
        return h_BSD + per_row(gate_m) * ffn_out


class Denoised(NamedTuple):
    denoised_BTD: torch.Tensor
    logits_BTV: torch.Tensor


class BlockRows(NamedTuple):
    x_BSD: torch.Tensor       # [clean rows ; noisy rows]
    sigma: torch.Tensor       # (B,), or (B, T) per noisy row
    cond_noisy: torch.Tensor  # the noisy rows' condition: (B, C), or (B, T, C)
    cond_rows: torch.Tensor   # every row's condition: cond_noisy, or per row (B, S, C)


class DiffusionBlocksLlama(Transformer):
    """The autoregressive denoiser; only the requested block's layers run."""

    partition: BlockPartition
    options: DenoiserOptions
    sigma_embedder: SigmaEmbedder
    final_adaln: FinalAdaLN
    self_cond_proj: nn.Linear | None  # W_sc, with self_conditioning > 0
    TOKENS_PER_LABEL = 2  # a block runs on [clean ; noisy]: 2T rows for T labels

    def __init__(self, model_args: DiffusionBlocksLlamaArgs):
        assert model_args.partition is not None, "call update_from_config first"
        super().__init__(model_args)
        convert_to_denoiser(self, model_args.partition, model_args.denoiser)

    def _precompute_freqs_cis(self) -> torch.Tensor:
        # noisy rows use positions up to T (one past the stock table)
        return precompute_freqs_cis(
            self.model_args.dim // self.model_args.n_heads,
            self.model_args.max_seq_len + 1,
            self.model_args.rope_theta,
            self.model_args.rope_scaling_args,
        )

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None):
        super().init_weights(buffer_device)
        # torchtitan draws the token embeddings from N(0, 1): scaling the draw gives
        # N(0, std^2) and leaves every other random draw (and std = 1) as it was
        self.tok_embeddings.weight.mul_(self.options.token_embedding_init_std)
        init_denoiser_modules(self)

    @property
    def self_conditions(self) -> bool:
        """True: noisy rows take a previous clean estimate (`self_conditioning > 0`)."""
        return self.self_cond_proj is not None

    def expected_clean(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits) @ clean table: the estimate self-conditioning feeds back. The
        table through a call of the embedding (FSDP2 gathers its weight only there)."""
        vocab = torch.arange(self.tok_embeddings.num_embeddings, device=logits.device)
        return diffusion.expected_clean_embedding(logits, self.clean_embedding(vocab))

    @property
    def sigma_per_token(self) -> bool:
        """True: every noisy row has its own sigma (`[diffusion_blocks] sigma_per_token`)."""
        return self.options.sigma_per_token

    # FlexAttention has no backward on CPU: flex flavors use the exact masked SDPA there.
    FLEX_DEVICE_TYPES: tuple[str, ...] = ("cuda",)

    def uses_flex_attention(self, device: torch.device) -> bool:
        return self.model_args.attn_type == "flex" and device.type in self.FLEX_DEVICE_TYPES

    def clean_embedding(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """The clean targets y and the clean rows: the token embeddings L2-normalised
        and scaled to norm target_embedding_scale."""
        return self.scaled_unit_rows(self.tok_embeddings(tokens_BT))

    def clean_embedding_table(self) -> torch.Tensor:
        """(V, D): every token's clean embedding, for samplers that step with the
        expected clean embedding softmax(logits) @ table."""
        return self.scaled_unit_rows(self.tok_embeddings.weight)

    def scaled_unit_rows(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The one map from raw embeddings to clean points: scale * normalize(e)."""
        unit = F.normalize(embeddings, dim=-1)
        scale = self.options.target_embedding_scale
        return unit if scale == 1.0 else scale * unit

    def initial_noise_std(self, sigma: float) -> float:
        """Std of the sampler's starting z at noise level `sigma` (docs/method.md section 6,
        sqrt(1 + sigma_max^2) for unit-norm targets): sqrt(scale^2 + sigma^2)."""
        return math.sqrt(self.options.target_embedding_scale**2 + sigma**2)

    def attention_mask(self, seq_len: int, device: torch.device):
        if self.uses_flex_attention(torch.device(device)):
            return create_block_mask(
                denoiser_mask_mod(seq_len), None, None, 2 * seq_len, 2 * seq_len,
                device=device,
            )
        return denoiser_dense_mask(seq_len, device)

    def denoise(
        self, tokens_BT: torch.Tensor, z_BTD: torch.Tensor, sigma: torch.Tensor,
        block: int, self_cond_BTD: torch.Tensor | None = None,
    ) -> Denoised:
        """Run block `block` on (clean tokens, noisy z) at noise levels sigma: one per
        sequence (B,), or with sigma_per_token one per noisy row (B, T) (a (B,) sigma
        then applies to every row); `self_cond_BTD`: the noisy rows' previous clean
        estimates (self-conditioning; None = none yet)."""
        seq_len = tokens_BT.shape[1]
        rows = self.block_rows(tokens_BT, z_BTD, sigma, self_cond_BTD=self_cond_BTD)
        x_BSD = rows.x_BSD
        mask = self.attention_mask(seq_len, x_BSD.device)
        positions = denoiser_positions(seq_len, x_BSD.device)
        for layer_id in self.partition.layer_ranges[block]:
            x_BSD = self.layers[str(layer_id)](
                x_BSD, rows.cond_rows, self.freqs_cis, mask, positions
            )
        return self.readout(z_BTD, x_BSD[:, seq_len:], rows.sigma, rows.cond_noisy)

    def block_rows(
        self, tokens_BT: torch.Tensor, z_BTD: torch.Tensor, sigma: torch.Tensor,
        cond_noisy: torch.Tensor | None = None, self_cond_BTD: torch.Tensor | None = None,
    ) -> BlockRows:
        """A block's input rows: the clean rows of tokens_BT, then the noisy rows
        c_in(sigma) z (+ W_sc self_cond with self-conditioning) (T and T in `denoise`;
        the KV-cached decoder passes only the clean rows not yet cached and one noisy
        row), with their condition vectors; `cond_noisy`: sigma's condition where the
        caller keeps it (the KV cache)."""
        sigma_data = self.partition.schedule.sigma_data
        sigma = sigma.to(z_BTD.dtype)
        if self.sigma_per_token and sigma.dim() == 1:
            sigma = sigma[:, None].expand(-1, z_BTD.shape[1])
        if sigma.dim() != 1 and not self.sigma_per_token:
            raise ValueError(
                f"sigma of shape {tuple(sigma.shape)}: one sigma per row needs "
                "[diffusion_blocks] sigma_per_token = true"
            )
        sigma_z = diffusion.broadcast_sigma(sigma, z_BTD)
        noisy_BTD = diffusion.c_in(sigma_z, sigma_data) * z_BTD
        if self_cond_BTD is not None:
            if not self.self_conditions:
                raise ValueError(
                    "a self-conditioning estimate was given to a model without it: "
                    "set [diffusion_blocks] self_conditioning > 0"
                )
            noisy_BTD = noisy_BTD + self.self_cond_proj(self_cond_BTD.to(noisy_BTD.dtype))
        x_BSD = torch.cat([self.clean_embedding(tokens_BT), noisy_BTD], dim=1)
        # (B, C) per sequence; per token (B, T, C) for the noisy rows
        if cond_noisy is None:
            cond_noisy = self.sigma_embedder(diffusion.c_noise(sigma))
        cond_rows = cond_noisy
        if self.sigma_per_token:  # clean rows: the zero condition (no noise level)
            cond_clean = cond_noisy.new_zeros(*tokens_BT.shape, cond_noisy.shape[-1])
            cond_rows = torch.cat([cond_clean, cond_noisy], dim=1)
        return BlockRows(x_BSD, sigma, cond_noisy, cond_rows)

    def readout(
        self, z_BTD: torch.Tensor, h_BTD: torch.Tensor, sigma: torch.Tensor,
        cond_noisy: torch.Tensor,
    ) -> Denoised:
        """The noisy rows' last-layer states h -> the denoised estimate and its logits."""
        sigma_data = self.partition.schedule.sigma_data
        denoised_BTD = diffusion.denoised_estimate(z_BTD, self.norm(h_BTD), sigma, sigma_data)
        logits_BTV = self.output(self.final_adaln(denoised_BTD, cond_noisy))
        return Denoised(denoised_BTD, logits_BTV)

    def forward(
        self, tokens_BT: torch.Tensor, labels_BT: torch.Tensor, *, block: int,
        noise_BTD: torch.Tensor, sigma_B: torch.Tensor | None = None,
        sigma_BT: torch.Tensor | None = None, self_cond_BTD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training forward: noise the labels' clean embeddings at sigma_B (one per
        sequence) or sigma_BT (one per token, with sigma_per_token), denoise with one
        block (given the self-conditioning estimate, if any), return the logits at the
        noisy rows (B, T, vocab)."""
        if (sigma_B is None) == (sigma_BT is None):
            raise TypeError("give exactly one of sigma_B (per sequence) and sigma_BT (per token)")
        sigma = sigma_B if sigma_BT is None else sigma_BT
        y_BTD = self.clean_embedding(labels_BT)
        z_BTD = y_BTD + diffusion.broadcast_sigma(sigma, y_BTD) * noise_BTD
        return self.denoise(tokens_BT, z_BTD, sigma, block, self_cond_BTD).logits_BTV


# ---------------------------------------------------------------------------
# Conversion of a stock Transformer

# The state-dict keys of the modules convert_to_denoiser adds (and only those): a stock
# llama3 checkpoint lacks exactly these, and the checkpoint loader
# (diffusion_blocks.checkpoint) leaves them freshly initialised.
ADDED_BY_CONVERSION = re.compile(
    r"(sigma_embedder|final_adaln|self_cond_proj|layers\.\d+\.adaln)\."
)


def is_added_by_conversion(key: str) -> bool:
    """True for a state-dict key of a module that convert_to_denoiser adds."""
    return ADDED_BY_CONVERSION.match(key) is not None


def convert_to_denoiser(
    model: Transformer, partition: BlockPartition, options: DenoiserOptions = DenoiserOptions()
) -> None:
    """Turn a stock llama3 Transformer into DiffusionBlocksLlama, in place.

    Works on meta (before parallelisation, as torchtitan calls converters) and on
    real devices; existing weights are untouched, new modules are initialised when
    the model has real storage (on meta, init_weights does it later).
    """
    n_layers = len(model.layers)
    if partition.layer_ranges[-1].stop != n_layers:
        raise ValueError(
            f"the block partition covers {partition.layer_ranges[-1].stop} layers but "
            f"the model has {n_layers}"
        )
    reference = model.tok_embeddings.weight
    dim = reference.shape[1]
    cond_dim = options.adaln_cond_dim or dim
    with torch.device(reference.device):
        model.sigma_embedder = SigmaEmbedder(cond_dim).to(reference.dtype)
        model.final_adaln = FinalAdaLN(dim, cond_dim=cond_dim).to(reference.dtype)
        model.self_cond_proj = (
            nn.Linear(dim, dim, bias=False).to(reference.dtype)
            if options.self_conditioning > 0 else None
        )
        for layer in model.layers.values():
            layer.adaln = AdaLNModulation(cond_dim, dim, num_chunks=6).to(reference.dtype)
            layer.__class__ = DenoiserLayer
    model.partition = partition
    model.options = options
    model.__class__ = DiffusionBlocksLlama
    if reference.device.type != "meta":
        init_denoiser_modules(model)
        # the noisy rows need RoPE position T
        model.freqs_cis = model._precompute_freqs_cis().to(model.freqs_cis.device)


@torch.no_grad()
def init_denoiser_modules(model: DiffusionBlocksLlama) -> None:
    """Initialise only the modules the conversion added (AdaLN-Zero starts at zero)."""
    model.sigma_embedder.init_weights()
    model.final_adaln.init_weights()
    if model.self_cond_proj is not None:  # zero: the model starts as the one without it
        nn.init.zeros_(model.self_cond_proj.weight)
    for layer in model.layers.values():
        layer.adaln.init_weights()
