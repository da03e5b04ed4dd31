"""Decoding speed: the block-wise LM vs its end-to-end twin, new tokens per second
after prompts of several lengths.

    python tools/bench/generate.py [--job.config_file train_configs/llama3_debug.toml] \
        [--checkpoint DIR] [--e2e-checkpoint DIR] [--context-lengths 64,256,1024] \
        [--new-tokens 32] [--steps-per-block 1] [--sampler ancestral] [--batch-size 1] \
        [--repeats 1] [--device cpu] [--no-kv-cache] [--json] [--section.key value ...]

Builds the config's block-wise LM (`[model] flavor`, `[diffusion_blocks] num_blocks`,
...; default the debug config: debugmodel_8l, B = 4) and its end-to-end twin (the
same config with `[diffusion_blocks] enable = false`), with random weights unless
--checkpoint (block-wise) / --e2e-checkpoint (twin) are given: the speed does not
depend on the weights. `[training] seq_len` (the models' max_seq_len, RoPE's range) is
the config's for a --checkpoint (what it was trained for), and for random weights set to
the longest prompt plus --new-tokens; given on the command line it wins either way. A
prompt whose decoding would not fit is refused before anything runs, and each prompt
length says on stderr when it starts (a long prefill on a CPU takes a while). For each prompt length, a random
prompt of that many tokens (--batch-size rows), then --new-tokens tokens with
`sampler.generate` (greedy final pick; the block-wise model runs --steps-per-block steps
per block with --sampler), the best of --repeats runs of each (the models take turns).
tokens_per_s counts the new tokens after the first (batch rows included): the
first one's time holds the prompt's prefill and is reported apart (first_token_s).
With the KV cache (default) the cost per token is meant to be flat in the prompt
length; --no-kv-cache recomputes the context for every token. Wall-clock figures:
noisy on shared machines, never used in tests.

--json prints a list of rows, one per prompt length: context_length,
dblocks_tokens_per_s, e2e_tokens_per_s, ratio (dblocks / e2e), dblocks_first_token_s,
e2e_first_token_s, dblocks_block_calls_per_token, kv_cache, num_blocks,
steps_per_block, sampler, batch_size, new_tokens, device.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import (
    AT_LEAST_1,
    Bounds,
    device_arg,
    number_arg,
    number_list_arg,
)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.inference import load_model
from diffusion_blocks.models.llama3.sampler import (
    DecodingConfig, DEFAULT_SAMPLER, forwards_per_token, generate, TOKEN_STEPS,
)

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "train_configs" / "llama3_debug.toml")
PROMPT_SEED = 0


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other --section.key value arguments go to the job config "
               "(default --job.config_file train_configs/llama3_debug.toml).",
    )
    parser.add_argument("--checkpoint", default=None,
                        help="the block-wise model's weights (default: random)")
    parser.add_argument("--e2e-checkpoint", default=None,
                        help="the end-to-end twin's weights (default: random)")
    parser.add_argument("--context-lengths", type=number_list_arg(int, AT_LEAST_1),
                        default="64,256,1024", help="comma-separated prompt lengths (tokens)")
    parser.add_argument("--new-tokens", type=number_arg(int, Bounds(low=2)), default=32,
                        help="tokens decoded after each prompt (>= 2: the first holds the prefill)")
    parser.add_argument("--steps-per-block", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--sampler", choices=sorted(TOKEN_STEPS), default=DEFAULT_SAMPLER)
    parser.add_argument("--batch-size", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--repeats", type=number_arg(int, AT_LEAST_1), default=1,
                        help="timed runs per model and prompt length; the fastest counts")
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--no-kv-cache", dest="kv_cache", action="store_false",
                        help="recompute the context for every new token")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args, config_args = parser.parse_known_args(argv)
    if not given(config_args, "--job.config_file"):
        config_args = ["--job.config_file", DEFAULT_CONFIG] + config_args
    return args, config_args


def given(config_args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in config_args)


def build_models(args, config_args: list[str]):
    """(block-wise model, end-to-end twin), in eval mode on args.device."""
    if not given(config_args, "--training.seq_len") and args.checkpoint is None:
        seq_len = max(args.context_lengths) + args.new_tokens
        config_args = config_args + ["--training.seq_len", str(seq_len)]
    device = torch.device(args.device)
    dblocks, _ = load_model(parse_job_config(config_args + ["--diffusion_blocks.enable"]),
                            args.checkpoint, device)
    check_lengths_fit(args, dblocks)
    e2e, _ = load_model(parse_job_config(config_args + ["--diffusion_blocks.no_enable"]),
                        args.e2e_checkpoint, device)
    return dblocks, e2e


def check_lengths_fit(args, model) -> None:
    """ConfigError unless every prompt plus its new tokens fits max_seq_len (no window
    sliding, which would move every position and rebuild the cache per token)."""
    max_seq_len = model.model_args.max_seq_len
    for length in args.context_lengths:
        if length + args.new_tokens > max_seq_len:
            raise ConfigError(
                f"--context-lengths {length}: {length} + --new-tokens {args.new_tokens} "
                f"tokens exceed the model's max_seq_len {max_seq_len} ([training] seq_len); "
                "shorten them or raise --training.seq_len"
            )


def timed_generate(model, prompt_BT, config: DecodingConfig, max_context: int, device) -> dict:
    """One generate call: the first token's seconds (prefill included) and the tokens
    per second after it."""
    stamps = []

    def on_token():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    generate(model, prompt_BT, config, max_context, on_token=on_token)
    decoded = prompt_BT.shape[0] * (len(stamps) - 1)
    return {"first_token_s": stamps[0] - start,
            "tokens_per_s": decoded / (stamps[-1] - stamps[0])}


def measure(models: dict, prompt_BT, config, max_context, device, repeats: int) -> dict:
    """name -> the best of `repeats` runs; the models take turns, so that a change in
    the machine's load falls on both."""
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(timed_generate(model, prompt_BT, config, max_context, device))
    return {name: {"first_token_s": min(r["first_token_s"] for r in timings),
                   "tokens_per_s": max(r["tokens_per_s"] for r in timings)}
            for name, timings in runs.items()}


def bench(args, dblocks, e2e) -> list[dict]:
    device = torch.device(args.device)
    max_context = dblocks.model_args.max_seq_len
    vocab = dblocks.tok_embeddings.weight.shape[0]
    config = DecodingConfig(max_new_tokens=args.new_tokens, steps_per_block=args.steps_per_block,
                            sampler=args.sampler, kv_cache=args.kv_cache)
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    warmup = dataclasses.replace(config, max_new_tokens=2)
    rows = []
    for length in args.context_lengths:
        print(f"context {length}: {args.repeats} run(s) of {args.new_tokens} new tokens "
              "per model...", file=sys.stderr, flush=True)
        prompt_BT = torch.randint(0, vocab, (args.batch_size, length), generator=generator).to(device)
        models = {"dblocks": dblocks, "e2e": e2e}
        for model in models.values():
            generate(model, prompt_BT, warmup, max_context)  # allocator, lazy inits
        figures = measure(models, prompt_BT, config, max_context, device, args.repeats)
        rows.append({
            "context_length": length,
            "dblocks_tokens_per_s": figures["dblocks"]["tokens_per_s"],
            "e2e_tokens_per_s": figures["e2e"]["tokens_per_s"],
            "ratio": figures["dblocks"]["tokens_per_s"] / figures["e2e"]["tokens_per_s"],
            "dblocks_first_token_s": figures["dblocks"]["first_token_s"],
            "e2e_first_token_s": figures["e2e"]["first_token_s"],
            "dblocks_block_calls_per_token": forwards_per_token(dblocks, config),
            "kv_cache": args.kv_cache,
            "num_blocks": dblocks.partition.num_blocks,
            "steps_per_block": args.steps_per_block,
            "sampler": args.sampler,
            "batch_size": args.batch_size,
            "new_tokens": args.new_tokens,
            "device": args.device,
        })
    return rows


def print_table(rows: list[dict]) -> None:
    first = rows[0]
    print(f"KV cache {'on' if first['kv_cache'] else 'off'}; DiffusionBlocks B = "
          f"{first['num_blocks']}, {first['sampler']} {first['steps_per_block']} step(s) per "
          f"block ({first['dblocks_block_calls_per_token']} block calls per token); batch "
          f"{first['batch_size']}, {first['new_tokens']} new tokens, {first['device']}")
    print("| context | DiffusionBlocks tokens/s | e2e tokens/s | DiffusionBlocks / e2e "
          "| first token s (dblocks / e2e) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context_length']} | {r['dblocks_tokens_per_s']:,.1f} | "
              f"{r['e2e_tokens_per_s']:,.1f} | {r['ratio']:.2f} | "
              f"{r['dblocks_first_token_s']:.3f} / {r['e2e_first_token_s']:.3f} |")


@exit_on_config_error
def main(argv):
    args, config_args = parse_args(argv)
    dblocks, e2e = build_models(args, config_args)
    with torch.no_grad():
        rows = bench(args, dblocks, e2e)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
