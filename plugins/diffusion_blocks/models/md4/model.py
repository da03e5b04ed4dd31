"""MD4's network on torchtitan's llama3 layers, block-partitioned (docs/method.md section 5).

A stock llama3 `Transformer` (token embedding, TransformerBlocks, RMSNorm, head) whose
attention is bidirectional (no mask: every position sees every position) and whose
vocabulary has one more id, [MASK]. With `time_conditioning = "adaln_zero"` every
layer gets the same AdaLN-Zero modulation as the autoregressive denoiser's layers
(`DenoiserLayer`), driven by an embedding of t, and the final norm a zero-initialised
shift / scale; with "none" the layers are the stock ones and see only x_t.

`MaskedDiffusionLM(z_BT, t_B, block=b)` runs the shared embedding, ONLY block b's
layers, the shared final norm and head, and returns logits over the vocabulary with
[MASK] at -inf: a prediction is a distribution over the data tokens.
`EndToEndMaskedDiffusionLM` is the same network as one block holding every layer
and owning all of t in [0, 1]: MD4 trained end to end.
"""

from __future__ import annotations

import math

import torch

from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.model import TransformerBlock

from ...diffusion.partition import BlockPartition
from ..conditioning import AdaLNModulation, modulate, SigmaEmbedder
from ..llama3.model import DenoiserLayer, masked_attention
from .args import MaskedDiffusionArgs


class BidirectionalLayer(TransformerBlock):
    """A stock llama3 TransformerBlock with attention over the whole sequence."""

    def forward(self, x_BTD, freqs_cis, cond_BD=None):
        h_BTD = x_BTD + masked_attention(
            self.attention, self.attention_norm(x_BTD), freqs_cis, mask=None, positions=None
        )
        return h_BTD + self.feed_forward(self.ffn_norm(h_BTD))


class TimeConditionedLayer(DenoiserLayer):
    """The autoregressive denoiser's layer (stock block + AdaLN-Zero), bidirectional."""

    def forward(self, x_BTD, freqs_cis, cond_BD=None):
        return super().forward(x_BTD, cond_BD, freqs_cis, mask=None, positions=None)


class MaskedDiffusionLM(Transformer):
    """Predicts the clean token at every position of x_t; a forward runs one block."""

    partition: BlockPartition

    def __init__(self, model_args: MaskedDiffusionArgs):
        assert model_args.partition is not None, "call update_from_config first"
        super().__init__(model_args)
        self.partition = model_args.partition
        self.mask_token_id = model_args.mask_token_id
        self.conditioned = model_args.time_conditioning == "adaln_zero"
        if not self.conditioned:
            for layer in self.layers.values():
                layer.__class__ = BidirectionalLayer
            return
        cond_dim = model_args.adaln_cond_dim or model_args.dim
        self.time_embedder = SigmaEmbedder(cond_dim)  # sinusoids of 1000 t, then an MLP
        self.final_modulation = AdaLNModulation(cond_dim, model_args.dim, num_chunks=2)
        for layer in self.layers.values():
            layer.adaln = AdaLNModulation(cond_dim, model_args.dim, num_chunks=6)
            layer.__class__ = TimeConditionedLayer

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None):
        super().init_weights(buffer_device)
        if self.conditioned:  # AdaLN-Zero: every modulation starts at zero
            self.time_embedder.init_weights()
            self.final_modulation.init_weights()
            for layer in self.layers.values():
                layer.adaln.init_weights()

    def forward(self, z_BT: torch.Tensor, t_B: torch.Tensor, *, block: int) -> torch.Tensor:
        """Logits (B, T, vocab) of the clean tokens given x_t = z, by block `block`."""
        x_BTD = self.tok_embeddings(z_BT)
        cond_BD = self.time_embedder(t_B) if self.conditioned else None
        for layer_id in self.partition.layer_ranges[block]:
            x_BTD = self.layers[str(layer_id)](x_BTD, self.freqs_cis, cond_BD)
        h_BTD = self.norm(x_BTD)
        if self.conditioned:
            h_BTD = modulate(h_BTD, *self.final_modulation(cond_BD))
        logits_BTV = self.output(h_BTD)
        return logits_BTV.index_fill(-1, self._mask_index(logits_BTV.device), -math.inf)

    def _mask_index(self, device) -> torch.Tensor:
        return torch.tensor([self.mask_token_id], device=device)


class EndToEndMaskedDiffusionLM(MaskedDiffusionLM):
    """MD4 end to end: every forward runs every layer, for any t in [0, 1]."""

    def __init__(self, model_args: MaskedDiffusionArgs):
        super().__init__(model_args)
        self.partition = model_args.partition.single_block()
