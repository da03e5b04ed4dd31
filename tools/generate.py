"""Generate text from a trained checkpoint of a text family (the DiffusionBlocks model
or its end-to-end twin, as the config's `[diffusion_blocks] enable` says).

    python tools/generate.py --job.config_file train_configs/llama3_debug.toml \
        --checkpoint outputs/llama3_debug/checkpoint --prompt "the cat" \
        [--max-new-tokens 64] [--steps-per-block 1] [--temperature 0.8 --top-k 20] [--seed 0] \
        [--sampler ancestral|euler|heun] [--churn 0] [--start-sigma S] [--stop-sigma S] [--no-kv-cache]
    python tools/generate.py --job.config_file train_configs/md4_chars.toml \
        --checkpoint outputs/md4_chars/checkpoint [--prompt "the cat"] [--steps 256] \
        [--num-samples 4] [--json]

Each family samples its own way (`ModelFamily.sample_text`):
- dblocks_llama3: each new token is sampled over the sigma grid (--steps-per-block
  steps per block, default [diffusion_blocks] sampling_steps_per_block, each run by the
  block owning its sigma) with the token sampler --sampler; the block owning sigma_min
  then gives the final logits, which --temperature and --top-k act on (greedy by
  default; see diffusion_blocks.models.llama3.sampler); both it and its end-to-end
  twin decode with a KV cache (--no-kv-cache: recompute the context per token);
- dblocks_recurrent: the same token samplers, `--recurrence R` (an alias of
  --steps-per-block: it has one block) core iterations per token;
- dblocks_md4: MD4's ancestral sampler from an all-[MASK] sequence of the prompt plus
  --max-new-tokens characters, --steps steps in all (default [diffusion_blocks]
  sampling_steps), each run by the block owning its t; temperature 1 unless given.
A flag the family does not use is refused. --json prints {"checkpoint": ..., "mode":
..., "samples": [...]}.
"""

import argparse
import json
import sys

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, NON_NEGATIVE, number_arg, POSITIVE, SEED
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3.sampler import DEFAULT_SAMPLER, TOKEN_STEPS
from diffusion_blocks.protocols.family import TextRequest
from diffusion_blocks.registry import FAMILIES, resolve_run_spec


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max-new-tokens", type=number_arg(int, AT_LEAST_1), default=64)
    parser.add_argument("--num-samples", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--steps-per-block", "--recurrence", type=number_arg(int, AT_LEAST_1),
                        default=None,
                        help="autoregressive denoisers: steps per block (dblocks_recurrent: "
                             "the core iterations r); default: [diffusion_blocks] "
                             "sampling_steps_per_block")
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=None,
                        help="masked diffusion: sampler steps in all (default: "
                             "[diffusion_blocks] sampling_steps)")
    parser.add_argument("--temperature", type=number_arg(float, NON_NEGATIVE), default=None,
                        help="of the final pick only; 0 = greedy; default: greedy "
                             "(autoregressive), 1 (masked diffusion)")
    parser.add_argument("--top-k", type=number_arg(int, NON_NEGATIVE), default=0,
                        help="of the final pick only; 0 = the whole vocabulary")
    parser.add_argument("--seed", type=number_arg(int, SEED), default=0)
    parser.add_argument("--sampler", choices=sorted(TOKEN_STEPS), default=None,
                        help="autoregressive denoisers' token sampler: 'euler' (ODE step "
                             "with softmax(logits) @ normalised embeddings), 'heun' (EDM's "
                             "second-order step with the same D: two block calls per step) "
                             "or 'ancestral' (draw a token, re-noise its embedding; default "
                             f"{DEFAULT_SAMPLER})")
    parser.add_argument("--churn", type=number_arg(float, NON_NEGATIVE), default=0.0,
                        help="autoregressive denoiser: EDM S_churn, fresh noise raising "
                             "each step's sigma (0 = none)")
    parser.add_argument("--start-sigma", type=number_arg(float, POSITIVE), default=None,
                        help="autoregressive denoisers: sample from this sigma down "
                             "(default: [diffusion_blocks] sampling_sigma_max, else sigma_max)")
    parser.add_argument("--stop-sigma", type=number_arg(float, POSITIVE), default=None,
                        help="dblocks_llama3: stop the chain at the lowest grid sigma >= "
                             "this and draw the token there (default: sigma_min, the "
                             "whole chain)")
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                        help="dblocks_llama3: recompute the whole context for every new "
                             "token instead of reusing its cached keys and values (same "
                             "tokens up to float rounding, slower)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser.parse_known_args(argv)


@exit_on_config_error
def main(argv):
    args, config_args = parse_args(argv)
    job_config = parse_job_config(config_args)
    family = resolve_run_spec(job_config).family
    if family.sample_text is None:
        text_families = sorted(name for name, f in FAMILIES.items() if f.sample_text)
        raise ConfigError(
            f"tools/generate.py generates text; [model] name = {job_config.model.name!r} "
            f"does not (text models: {text_families})"
        )
    request = TextRequest(
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, num_samples=args.num_samples,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        steps_per_block=args.steps_per_block, steps=args.steps,
        sampler=args.sampler, churn=args.churn, start_sigma=args.start_sigma,
        stop_sigma=args.stop_sigma, kv_cache=args.kv_cache,
    )
    try:
        model, tokenizer, step_folder = load_for_inference(job_config, args.checkpoint)
        if args.top_k > tokenizer.get_vocab_size():
            raise ValueError(
                f"--top-k {args.top_k} is larger than the vocabulary "
                f"({tokenizer.get_vocab_size()} tokens)"
            )
        samples = family.sample_text(model, tokenizer, job_config, request)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mode = "DiffusionBlocks" if job_config.diffusion_blocks.enable else "end-to-end"
    if args.json:
        print(json.dumps({"checkpoint": str(step_folder), "mode": mode, "samples": samples}))
        return
    print(f"[{mode} model from {step_folder}]")
    print("\n---\n".join(samples))


if __name__ == "__main__":
    main(sys.argv[1:])
