"""End-to-end vs DiffusionBlocks on a byte-level text corpus (default tinyshakespeare).

    python tools/lm_report.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/llama3_text.toml] [--steps 500] [--num-blocks 4]
        [--init-from-e2e] [--out outputs/lm_report] [--skip-training]

1. splits the file: the last 10% (at a line break) is held out for validation;
2. trains the same debug model end to end for --steps optimizer steps, and with
   DiffusionBlocks for num_blocks x --steps (the random schedule gives every block
   about --steps updates: equal optimizer steps per parameter), warmup scaled alike;
   with --init-from-e2e also a DiffusionBlocks run that starts from the end-to-end
   run's weights (`[checkpoint] initial_load_path`; the modules the conversion adds
   start fresh), with the same B x --steps;
3. generates continuations of held-out prompts with each model and scores them with
   the END-TO-END model (cross-entropy in nats/byte): the paper's generative
   perplexity idea. The held-out text itself is scored too, as a reference.
Prints a markdown table and writes <out>/report.json.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.bounds import AT_LEAST_1, existing_file_arg, NON_NEGATIVE, number_arg
from diffusion_blocks.config_loader import exit_on_config_error, parse_job_config
from diffusion_blocks.data.text import check_text_file
from diffusion_blocks.models.llama3.sampler import DecodingConfig, generate
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.objectives import per_sample_cross_entropy

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "llama3_text.toml"


def split_corpus(source: Path, out: Path, val_fraction: float = 0.1) -> tuple[Path, str]:
    text = source.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
    out.mkdir(parents=True, exist_ok=True)
    train_path = out / "train.txt"
    train_path.write_text(text[:cut], encoding="utf-8")
    return train_path, text[cut:]


def common_overrides(
    config: Path, train_path: Path, dump: Path, steps: int, warmup: int
) -> list[str]:
    return [
        "--job.config_file", str(config),
        "--training.dataset_path", str(train_path),
        "--job.dump_folder", str(dump),
        "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", str(warmup),
        "--checkpoint.interval", str(steps),
        "--metrics.log_freq", "50",
    ]


def train(overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           "-m", "diffusion_blocks.train", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def validation_prompts(val_text: str, tokenizer, count: int, prompt_len: int, cont_len: int):
    """Evenly spaced (prompt, true continuation) windows of the held-out text."""
    ids = tokenizer.encode(val_text)
    span = prompt_len + cont_len
    starts = torch.linspace(0, len(ids) - span - 1, count).long().tolist()
    windows = torch.tensor([ids[s:s + span] for s in starts])
    return windows[:, :prompt_len], windows[:, prompt_len:]


@torch.no_grad()
def score_under(model, prompts, continuations) -> float:
    """Mean CE (nats/byte) of the continuations given the prompts, under `model`."""
    tokens = torch.cat([prompts, continuations], dim=1)
    logits = model(tokens[:, :-1])[:, prompts.shape[1] - 1:]
    return float(per_sample_cross_entropy(logits, continuations).mean())


@exit_on_config_error
def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=existing_file_arg,
                        default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--job.config_file", dest="config_file", type=existing_file_arg,
                        default=str(CONFIG),
                        help="the LM job config every run starts from (a dblocks_llama3 "
                             "or a stock llama3 + diffusion_blocks converter config)")
    parser.add_argument("--init-from-e2e", action="store_true",
                        help="add a DiffusionBlocks run initialised from the end-to-end run")
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=500)
    parser.add_argument("--warmup", type=number_arg(int, NON_NEGATIVE), default=50)
    parser.add_argument("--num-blocks", type=number_arg(int, AT_LEAST_1), default=4)
    parser.add_argument("--prompts", type=number_arg(int, AT_LEAST_1), default=32)
    parser.add_argument("--prompt-len", type=number_arg(int, AT_LEAST_1), default=32)
    parser.add_argument("--new-tokens", type=number_arg(int, AT_LEAST_1), default=96,
                        help="prompt-len + new-tokens must fit [training] seq_len")
    parser.add_argument("--out", default=str(REPO / "outputs" / "lm_report"))
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(argv)

    check_text_file(args.data)
    out = Path(args.out)
    config = Path(args.config_file)
    train_path, val_text = split_corpus(Path(args.data), out)

    def blockwise(dump: str) -> list[str]:
        return common_overrides(
            config, train_path, out / dump, args.num_blocks * args.steps,
            args.num_blocks * args.warmup,
        ) + ["--diffusion_blocks.num_blocks", str(args.num_blocks)]

    runs = {
        "end-to-end": (
            common_overrides(config, train_path, out / "e2e", args.steps, args.warmup)
            + ["--diffusion_blocks.no_enable"]
        ),
        f"DiffusionBlocks B={args.num_blocks}": blockwise("dblocks"),
    }
    if args.init_from_e2e:
        e2e = parse_job_config(runs["end-to-end"])
        e2e_weights = Path(e2e.job.dump_folder) / e2e.checkpoint.folder / f"step-{args.steps}"
        runs[f"DiffusionBlocks B={args.num_blocks}, from the end-to-end weights"] = (
            blockwise("dblocks_from_e2e") + ["--checkpoint.initial_load_path", str(e2e_weights)]
        )
    seq_len = parse_job_config(runs["end-to-end"]).training.seq_len  # every run's config checked
    if args.prompt_len + args.new_tokens > seq_len:
        parser.error(f"--prompt-len + --new-tokens must be <= seq_len {seq_len}")
    for overrides in runs.values():
        if "--checkpoint.initial_load_path" not in overrides:  # that one is trained first
            parse_job_config(overrides, reads_data=True)
    if not args.skip_training:
        for overrides in runs.values():
            train(overrides)

    models = {}
    for name, overrides in runs.items():
        job_config = parse_job_config(overrides)
        dump = Path(job_config.job.dump_folder)
        models[name] = load_for_inference(job_config, dump / job_config.checkpoint.folder)[:2]
    baseline, tokenizer = models["end-to-end"]
    prompts, truth = validation_prompts(
        val_text, tokenizer, args.prompts, args.prompt_len, args.new_tokens
    )
    results = {"held-out text": {"reference": score_under(baseline, prompts, truth)}}
    samples = {}
    for name, (model, _) in models.items():
        results[name] = {}
        for label, decoding in (
            ("greedy", DecodingConfig(max_new_tokens=args.new_tokens)),
            ("temperature 1.0", DecodingConfig(max_new_tokens=args.new_tokens, temperature=1.0)),
        ):
            tokens = generate(model, prompts, decoding, seq_len)
            continuation = tokens[:, args.prompt_len:]
            results[name][label] = score_under(baseline, prompts, continuation)
            samples[f"{name} / {label}"] = tokenizer.decode(tokens[0].tolist())

    print(f"\n| continuation of {args.prompts} held-out prompts | CE under the end-to-end "
          "model (nats/byte), greedy | temperature 1.0 |")
    print("|---|---|---|")
    ref = results["held-out text"]["reference"]
    print(f"| the real held-out text | {ref:.3f} | {ref:.3f} |")
    for name in runs:
        r = results[name]
        print(f"| {name} | {r['greedy']:.3f} | {r['temperature 1.0']:.3f} |")
    print()
    for key, text in samples.items():
        print(f"--- {key}:\n{text}\n")
    (out / "report.json").write_text(json.dumps(
        {"args": vars(args), "results": results, "samples": samples}, indent=2
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
