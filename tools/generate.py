"""Generate text from a trained checkpoint (DiffusionBlocks denoiser or end-to-end twin).

    python tools/generate.py --job.config_file train_configs/llama3_debug.toml \
        --checkpoint outputs/llama3_debug/checkpoint --prompt "the cat" \
        [--max-new-tokens 64] [--steps-per-block 1] [--temperature 0.8 --top-k 20] [--seed 0]
        [--sampler ancestral|euler] [--churn 0] [--start-sigma S]

For the denoiser, each new token is sampled over the sigma grid (--steps-per-block
steps per block, each run by the block owning its sigma) with the token sampler
--sampler; the block owning sigma_min then gives the final logits, which --temperature
and --top-k act on (see diffusion_blocks.models.llama3.sampler).
The model family's own generator does the work (`ModelFamily.generate_text`): for
the recurrent-depth LM (`dblocks_recurrent`, one block) `--recurrence R` (the same
flag as `--steps-per-block`) sets the core iterations per token.
"""

import argparse
import sys

import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.bounds import AT_LEAST_1, NON_NEGATIVE, number_arg, POSITIVE, SEED
from diffusion_blocks.config_loader import ConfigError, exit_on_config_error, parse_job_config
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3.sampler import DecodingConfig, TOKEN_STEPS
from diffusion_blocks.registry import resolve_run_spec


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=number_arg(int, AT_LEAST_1), default=64)
    parser.add_argument("--steps-per-block", "--recurrence", type=number_arg(int, AT_LEAST_1),
                        default=None,
                        help="Euler steps per block; for dblocks_recurrent (one block) the "
                        "core iterations r. Default: [diffusion_blocks] sampling_steps_per_block")
    parser.add_argument("--temperature", type=number_arg(float, NON_NEGATIVE), default=0.0,
                        help="of the final pick only; 0 = greedy")
    parser.add_argument("--top-k", type=number_arg(int, NON_NEGATIVE), default=0,
                        help="of the final pick only; 0 = the whole vocabulary")
    parser.add_argument("--seed", type=number_arg(int, SEED), default=0)
    parser.add_argument("--sampler", choices=sorted(TOKEN_STEPS), default=DecodingConfig.sampler,
                        help="the denoiser's token sampler: 'euler' (ODE step with "
                             "softmax(logits) @ normalised embeddings) or 'ancestral' (draw "
                             "a token, re-noise its embedding to the next sigma)")
    parser.add_argument("--churn", type=number_arg(float, NON_NEGATIVE), default=0.0,
                        help="EDM S_churn: fresh noise raising each step's sigma (0 = none)")
    parser.add_argument("--start-sigma", type=number_arg(float, POSITIVE), default=None,
                        help="sample from this sigma down (default: [diffusion_blocks] "
                             "sampling_sigma_max, else sigma_max)")
    return parser.parse_known_args(argv)


@exit_on_config_error
def main(argv):
    args, config_args = parse_args(argv)
    job_config = parse_job_config(config_args)
    family = resolve_run_spec(job_config).family
    if family.generate_text is None:
        raise ConfigError(
            f"tools/generate.py generates text with the language-model families; the "
            f"config's [model] name is {job_config.model.name!r} ({family.name} does not "
            "generate text)"
        )
    try:
        model, tokenizer, step_folder = load_for_inference(job_config, args.checkpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    steps = args.steps_per_block or job_config.diffusion_blocks.sampling_steps_per_block
    if args.top_k > tokenizer.get_vocab_size():
        raise ConfigError(
            f"--top-k {args.top_k} is larger than the vocabulary ({tokenizer.get_vocab_size()} tokens)"
        )
    decoding = DecodingConfig(
        max_new_tokens=args.max_new_tokens, steps_per_block=steps,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        sampler=args.sampler, churn=args.churn, start_sigma=args.start_sigma,
    )
    prompt_ids = tokenizer.encode(args.prompt, add_bos=True, add_eos=False)
    tokens = family.generate_text(
        model, torch.tensor([prompt_ids]), decoding, job_config.training.seq_len
    )
    mode = "DiffusionBlocks" if hasattr(model, "partition") else "end-to-end"
    print(f"[{mode} model from {step_folder}]")
    print(args.prompt + tokenizer.decode(tokens[0, len(prompt_ids):].tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
