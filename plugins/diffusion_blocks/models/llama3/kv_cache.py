"""KV-cached decoding: the block-wise LM (`DiffusionBlocksLlama`) and its end-to-end
twin (a stock llama3 `Transformer`), one new token at a time without recomputing the
context.

The twin: each layer keeps the keys and values of the rows it has seen; a new token
runs only its own row, which attends the cached rows and itself.

The denoiser (docs/method.md section 5): clean rows attend clean rows only, so a clean row's
keys and values at every layer never change once computed; the noisy row of the next
token attends the clean rows and itself, and nothing attends it. The clean rows'
states do depend on the condition vector: with one sigma per sequence they are
modulated by sigma's condition, so every evaluation point (sigma, block) of the
sampling grid has its own cache; with `sigma_per_token` they get the zero condition, and
the evaluation points of one block share one (`point_key`). The grid (churned sigmas,
Heun's second evaluation and the final read at sigma_min included) is the same for
every new token, so per token and evaluation point the block runs only the clean rows
not cached yet (the previous pick; the whole prompt at a point's first use) and the
one noisy row, and each point's cache grows by those clean rows. With one sigma per
sequence a point's AdaLN modulation (a function of sigma only) is kept too.

Layout: in a layer's buffer slot = RoPE position. Clean row i sits at slot i; the noisy
row of the token after a T-token context sits at position T, so it is written at slot T
for the call (not kept: the next call overwrites it). Both models' attention is then
causal over the slots: the row at slot s sees slots <= s (a clean row sees the clean
rows up to itself, the noisy row every clean row and itself).

A cache follows one growing context; when the context does not extend the one it was
built on (generate's window slid, which moves every position) it starts again from the
whole window: correct, but then each token costs a prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Hashable

import torch

from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.model import Attention, TransformerBlock

from .model import attend, DenoiserLayer, DiffusionBlocksLlama, rotated_qkv

MIN_CAPACITY = 64  # slots first allocated per layer; the buffer doubles when full


# ---------------------------------------------------------------------------
# The cache


@dataclass
class LayerKV:
    """One layer's keys and values, (B, kv_heads, capacity, head_dim) each, slot = RoPE
    position; slots below `length` hold kept rows."""

    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    length: int = 0

    def write(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store rows (B, kv_heads, S, head_dim) at slots length..length+S-1 (without
        keeping them: see `length`); returns the keys and values of every slot up to them."""
        end = self.length + xk.shape[2]
        if self.keys is None or self.keys.shape[2] < end:
            self._grow(xk, end)
        self.keys[:, :, self.length:end] = xk
        self.values[:, :, self.length:end] = xv
        return self.keys[:, :, :end], self.values[:, :, :end]

    def _grow(self, like: torch.Tensor, end: int) -> None:
        capacity = max(end, MIN_CAPACITY, 2 * (0 if self.keys is None else self.keys.shape[2]))
        keys = like.new_empty(*like.shape[:2], capacity, like.shape[3])
        values = torch.empty_like(keys)
        if self.keys is not None:
            keys[:, :, :self.length] = self.keys[:, :, :self.length]
            values[:, :, :self.length] = self.values[:, :, :self.length]
        self.keys, self.values = keys, values


@dataclass
class Point:
    """What one evaluation point keeps: a LayerKV per layer it runs and, where they do
    not change from token to token (one sigma per sequence), sigma's condition vector
    and the layers' AdaLN modulations."""

    kv: list[LayerKV]
    cond_noisy: torch.Tensor | None = None
    modulations: list[tuple[torch.Tensor, ...]] | None = None

    @property
    def length(self) -> int:
        """Rows cached (every layer holds the same rows)."""
        return self.kv[0].length


@dataclass
class KVCache:
    """Per evaluation point (any hashable key) a Point, all holding rows of `context_BT`."""

    context_BT: torch.Tensor | None = None
    points: dict[Hashable, Point] = field(default_factory=dict)

    def follow(self, context_BT: torch.Tensor) -> None:
        """Keep what is cached if context_BT extends the context it was built on, else
        forget it (a slid window moves every row's position)."""
        old_BT = self.context_BT
        extends = (
            old_BT is not None
            and old_BT.shape[0] == context_BT.shape[0]
            and old_BT.shape[1] <= context_BT.shape[1]
            and torch.equal(context_BT[:, :old_BT.shape[1]], old_BT)
        )
        if not extends:
            self.points.clear()
        self.context_BT = context_BT

    def point(self, key: Hashable, num_layers: int) -> Point:
        if key not in self.points:
            self.points[key] = Point([LayerKV() for _ in range(num_layers)])
        return self.points[key]


# ---------------------------------------------------------------------------
# Attention over the cache


def slot_causal_mask(start: int, num_rows: int, device) -> torch.Tensor | None:
    """(rows, start + rows) bool: the row at slot start + r sees slots <= start + r;
    None where SDPA needs none: a single row sees every slot, and rows from slot 0 on
    are SDPA's own is_causal."""
    if num_rows == 1 or start == 0:
        return None
    row_slots = torch.arange(start, start + num_rows, device=device)
    return torch.arange(start + num_rows, device=device)[None] <= row_slots[:, None]


def cached_attention(
    attention: Attention, kv: LayerKV, x_BSD: torch.Tensor, freqs_cis: torch.Tensor,
    keep: int,
) -> torch.Tensor:
    """The stock llama3 attention of x's rows, placed at slots kv.length.., over the
    cached slots and themselves (causal over the slots); the first `keep` rows' keys
    and values stay cached."""
    start, num_rows = kv.length, x_BSD.shape[1]
    positions = torch.arange(start, start + num_rows, device=x_BSD.device)[None]
    xq, xk, xv = rotated_qkv(attention, x_BSD, freqs_cis, positions)
    keys, values = kv.write(xk, xv)
    mask = slot_causal_mask(start, num_rows, x_BSD.device)
    out_BSD = attend(attention, xq, keys, values, mask, is_causal=start == 0 and num_rows > 1)
    kv.length = start + keep
    return out_BSD


def attention_through(attention: Attention, kv: LayerKV, freqs_cis: torch.Tensor, keep: int):
    """cached_attention as a layer's attention_fn(x_BSD)."""
    return partial(cached_attention, attention, kv, freqs_cis=freqs_cis, keep=keep)


# ---------------------------------------------------------------------------
# The block-wise denoiser


def caches_denoiser(model) -> bool:
    return isinstance(model, DiffusionBlocksLlama) and all(
        isinstance(layer, DenoiserLayer) for layer in model.layers.values()
    )


def point_key(model: DiffusionBlocksLlama, sigma: float, block: int) -> Hashable:
    """Which cache an evaluation point uses: its own per (sigma, block); with
    sigma_per_token its block's (the clean rows get the zero condition whatever sigma)."""
    return block if model.sigma_per_token else (sigma, block)


def layer_modulations(model: DiffusionBlocksLlama, point: Point, layers, rows) -> list:
    """The layers' AdaLN modulations of `rows`. With one sigma per sequence they and
    sigma's condition vector are functions of the point's sigma alone: kept at the
    point's first use (block_rows then takes the kept condition). Per row
    (sigma_per_token) they are computed for every call's rows."""
    if model.sigma_per_token:
        return [layer.adaln(rows.cond_rows) for layer in layers]
    if point.modulations is None:
        point.cond_noisy = rows.cond_noisy
        point.modulations = [layer.adaln(rows.cond_rows) for layer in layers]
    return point.modulations


class DenoiserKVCache(KVCache):
    def last_row_denoiser(self, model: DiffusionBlocksLlama, context_BT: torch.Tensor):
        """sampler.last_row_denoiser through the cache: logits(z_BD, sigma, block,
        self_cond_BD=None) -> (B, V), block `block`'s logits for the token after
        `context_BT`. The clean rows never see a noisy row, so the cached keys and
        values hold for any z and self-conditioning estimate."""
        self.follow(context_BT)

        def logits(z_BD: torch.Tensor, sigma: float, block: int, self_cond_BD=None) -> torch.Tensor:
            layers = [model.layers[str(i)] for i in model.partition.layer_ranges[block]]
            point = self.point(point_key(model, sigma, block), len(layers))
            new_BN = context_BT[:, point.length:]
            sigma_B = torch.full((z_BD.shape[0],), sigma, device=z_BD.device)
            z_B1D = z_BD[:, None]
            self_cond_B1D = None if self_cond_BD is None else self_cond_BD[:, None]
            rows = model.block_rows(new_BN, z_B1D, sigma_B, point.cond_noisy, self_cond_B1D)
            modulations = layer_modulations(model, point, layers, rows)
            x_BSD = rows.x_BSD
            for layer, modulation, kv in zip(layers, modulations, point.kv):
                x_BSD = layer.modulated_forward(
                    x_BSD, modulation,
                    attention_through(layer.attention, kv, model.freqs_cis, new_BN.shape[1]),
                )
            denoised = model.readout(z_B1D, x_BSD[:, -1:], rows.sigma, rows.cond_noisy)
            return denoised.logits_BTV[:, -1]

        return logits


# ---------------------------------------------------------------------------
# The end-to-end twin


def caches_twin(model) -> bool:
    """A stock llama3 Transformer with SDPA attention (its uncached forward is plain
    causal attention, which the cache reproduces)."""
    return (
        isinstance(model, Transformer)
        and not isinstance(model, DiffusionBlocksLlama)
        and model.model_args.attn_type == "sdpa"
        and all(type(layer).forward is TransformerBlock.forward for layer in model.layers.values())
    )


def twin_layer_forward(
    layer: TransformerBlock, x_BSD: torch.Tensor,
    attention_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """torchtitan's TransformerBlock.forward with its attention given as attention_fn."""
    h_BSD = x_BSD + attention_fn(layer.attention_norm(x_BSD))
    return h_BSD + layer.feed_forward(layer.ffn_norm(h_BSD))


class TwinKVCache(KVCache):
    def next_token_logits(self, model: Transformer, context_BT: torch.Tensor, config=None,
                          generator=None) -> torch.Tensor:
        """sampler.autoregressive_next_token_logits through the cache: (B, V)."""
        self.follow(context_BT)
        point = self.point("twin", len(model.layers))
        # at least the last row runs: its output gives the logits
        start = min(point.length, context_BT.shape[1] - 1)
        for kv in point.kv:
            kv.length = start
        new_BN = context_BT[:, start:]
        h_BSD = model.tok_embeddings(new_BN)
        for layer, kv in zip(model.layers.values(), point.kv):
            h_BSD = twin_layer_forward(
                layer, h_BSD,
                attention_through(layer.attention, kv, model.freqs_cis, new_BN.shape[1]),
            )
        return model.output(model.norm(h_BSD[:, -1]))
