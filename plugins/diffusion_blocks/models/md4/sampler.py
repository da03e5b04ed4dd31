"""MD4's ancestral sampler with the block-partitioned network (docs/method.md section 6).

Start from a sequence of [MASK] (a prompt, if given, fixed at its start) at t = 1 and
walk the partition's plan of steps t -> s down to 0 (equal decreases of alpha): at each
step the block owning t predicts every position, and each token still masked is
unmasked with probability (alpha_s - alpha_t) / (1 - alpha_t), drawn from that
prediction ([MASK] excluded); the last step unmasks all that remain. The end-to-end
twin is the same walk with one block.
"""

from __future__ import annotations

import torch

from ...protocols.family import TextRequest


def token_probabilities(logits_BTV: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """softmax(logits / temperature) over the top_k tokens (all when 0); temperature 0
    puts all the mass on the argmax."""
    logits_BTV = logits_BTV.float()
    if temperature <= 0:
        return torch.nn.functional.one_hot(
            logits_BTV.argmax(-1), logits_BTV.shape[-1]
        ).float()
    logits_BTV = logits_BTV / temperature
    if top_k > 0:
        kth_BT1 = torch.topk(logits_BTV, top_k, dim=-1).values[..., -1:]
        logits_BTV = logits_BTV.masked_fill(logits_BTV < kth_BT1, -torch.inf)
    return logits_BTV.softmax(-1)


@torch.no_grad()
def sample(
    model, num_samples: int, seq_len: int, num_steps: int, generator: torch.Generator,
    prompt_T: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0,
) -> torch.Tensor:
    """(num_samples, seq_len) tokens; `generator` on the model's device."""
    device = model.tok_embeddings.weight.device
    schedule = model.partition.schedule
    z_BT = torch.full((num_samples, seq_len), model.mask_token_id, dtype=torch.long, device=device)
    if prompt_T is not None:
        z_BT[:, : len(prompt_T)] = prompt_T.to(device)
    for step in model.partition.sampling_plan(num_steps):
        t_B = torch.full((num_samples,), step.t, device=device)
        # model(...) rather than model.forward: FSDP hooks run on the root call
        logits_BTV = model(z_BT, t_B, block=step.block)
        probs_BTV = token_probabilities(logits_BTV, temperature, top_k)
        drawn_BT = torch.multinomial(
            probs_BTV.flatten(0, 1), 1, generator=generator
        ).view(z_BT.shape)
        unmask_BT = torch.rand(z_BT.shape, generator=generator, device=device) < (
            schedule.unmask_probability(step.t, step.s)
        )
        z_BT = torch.where((z_BT == model.mask_token_id) & unmask_BT, drawn_BT, z_BT)
    return z_BT


def sample_text(model, tokenizer, job_config, request: TextRequest) -> list[str]:
    """`request.num_samples` texts of the prompt plus max_new_tokens characters
    (at most [training] seq_len in all), temperature 1 unless given."""
    request.refuse_options(
        ("steps_per_block", "sampler", "churn", "start_sigma", "stop_sigma", "kv_cache"),
        "dblocks_md4",
    )
    prompt_ids = tokenizer.encode(request.prompt)
    if len(prompt_ids) >= job_config.training.seq_len:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens long; the model generates sequences "
            f"of at most [training] seq_len = {job_config.training.seq_len}"
        )
    seq_len = min(job_config.training.seq_len, len(prompt_ids) + request.max_new_tokens)
    device = model.tok_embeddings.weight.device
    tokens_BT = sample(
        model, request.num_samples, seq_len,
        request.steps or job_config.diffusion_blocks.sampling_steps,
        torch.Generator(device).manual_seed(request.seed),
        prompt_T=torch.tensor(prompt_ids, dtype=torch.long) if prompt_ids else None,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=request.top_k,
    )
    return [tokenizer.decode(row.tolist()) for row in tokens_BT]
