"""Autoregressive Llama denoiser (`dblocks_llama3`) on torchtitan's llama3 layers; a
stock `llama3` with `[model] converters = ["diffusion_blocks"]` trains the same way."""

from functools import partial

import torch

from torchtitan.components.loss import build_cross_entropy_loss
from torchtitan.hf_datasets.text_datasets import build_text_dataloader
from torchtitan.models.llama3 import Transformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan.protocols.train_spec import TrainSpec

from ...data.text import build_tokenizer
from ...family import blockwise_train_spec, ModelFamily, TextRequest
from ...parallelize import parallelize_dblocks_llama
from ...validation import build_denoiser_validator
from .args import dblocks_llama3_flavors
from .model import DiffusionBlocksLlama
from .sampler import DecodingConfig, generate
from .task import LanguageModelTask


def get_train_spec() -> TrainSpec:
    return blockwise_train_spec(
        DiffusionBlocksLlama, dblocks_llama3_flavors(), parallelize_dblocks_llama,
        build_text_dataloader, build_tokenizer, build_cross_entropy_loss,
        partial(build_denoiser_validator, LanguageModelTask()), Llama3StateDictAdapter,
    )


def sample_text(model, tokenizer, job_config, request: TextRequest) -> list[str]:
    """The prompt continued token by token (greedy unless a temperature is given)."""
    decoding = DecodingConfig(
        max_new_tokens=request.max_new_tokens,
        steps_per_block=(request.steps_per_block
                         or job_config.diffusion_blocks.sampling_steps_per_block),
        temperature=request.temperature or 0.0, top_k=request.top_k, seed=request.seed,
    )
    prompt_ids = tokenizer.encode(request.prompt, add_bos=True, add_eos=False)
    prompts_BT = torch.tensor([prompt_ids] * request.num_samples)
    tokens_BT = generate(model, prompts_BT, decoding, job_config.training.seq_len)
    return [request.prompt + tokenizer.decode(row[len(prompt_ids):].tolist()) for row in tokens_BT]


FAMILY = ModelFamily(
    "dblocks_llama3", get_train_spec, Transformer, LanguageModelTask(), stock_models=("llama3",),
    sample_text=sample_text,
)
