"""The recurrent-depth LM: DiffusionBlocks' single-pass recipe vs Huginn's BPTT twin,
LM quality against the inference iterations r, at equal training steps.

    python tools/recurrent_report.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/recurrent_debug.toml] [--steps 600] \
        [--recurrences 1,2,4,8,16,32] [--out outputs/recurrent_report] [--skip-training]
        [--section.key value ...]   (applied to both trainings, e.g. --recurrent.bptt_steps 2)

1. splits the file as tools/lm_report.py does (the last 10%, at a line break, held out);
2. trains the config with DiffusionBlocks (one core pass per step) and its end-to-end
   twin (`--diffusion_blocks.no_enable`: r drawn per step, truncated BPTT) for the same
   number of optimizer steps, timing both;
3. for every r: the held-out next-token cross-entropy (nats/byte) of what each sampler
   decodes from after r core iterations, given the true context (teacher forcing; for
   DiffusionBlocks the logits of the last of r Euler steps, each step's state row
   started from noise), over --windows held-out windows of seq_len bytes; and one
   greedy continuation of a held-out prompt per model at a few r.
Prints a markdown table and writes <out>/report.json. The generative yardstick of
tools/lm_report.py (an end-to-end judge scoring samples) is not used here.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config_loader import exit_on_config_error, parse_job_config
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3.sampler import DecodingConfig
from diffusion_blocks.models.recurrent.sampler import generate, sequence_logits
from lm_report import split_corpus, validation_prompts

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "train_configs" / "recurrent_debug.toml"
RECIPES = {"dblocks": [], "twin": ["--diffusion_blocks.no_enable"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--recurrences", default="1,2,4,8,16,32")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "outputs" / "recurrent_report"))
    parser.add_argument("--skip-training", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if not any(a.startswith("--job.config_file") for a in rest):
        rest = ["--job.config_file", str(CONFIG), *rest]
    return args, rest


def recipe_overrides(config_args, train_path: Path, dump: Path, steps: int, warmup: int, recipe):
    return [
        *config_args, *RECIPES[recipe],
        "--training.dataset", "text_file", "--training.dataset_path", str(train_path),
        "--job.dump_folder", str(dump), "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", str(warmup), "--checkpoint.interval", str(steps),
        "--metrics.log_freq", "50", "--metrics.no_enable_tensorboard",
    ]


def train(overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           "-m", "diffusion_blocks.train", *overrides]
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.perf_counter() - start


@torch.no_grad()
def held_out_ce(model, windows_BS: torch.Tensor, recurrence: int, batch: int = 8) -> float:
    """Mean next-token CE (nats/byte) over the windows, logits after r iterations."""
    generator = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for chunk in windows_BS.split(batch):
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        logits = sequence_logits(model, inputs, recurrence, generator)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum"))
        count += labels.numel()
    return total / count


@exit_on_config_error
def main(argv):
    args, config_args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    train_path, val_text = split_corpus(Path(args.data), out)
    recurrences = [int(r) for r in args.recurrences.split(",")]
    report = {"steps": args.steps, "recurrences": recurrences, "recipes": {}}
    for recipe in RECIPES:
        overrides = recipe_overrides(config_args, train_path, out / recipe, args.steps,
                                     args.warmup, recipe)
        seconds = None if args.skip_training else train(overrides)
        job_config = parse_job_config(overrides)
        model, tokenizer, step_folder = load_for_inference(job_config, out / recipe / "checkpoint")
        seq_len = job_config.training.seq_len
        prompts, continuations = validation_prompts(val_text, tokenizer, args.windows, 1, seq_len)
        windows = torch.cat([prompts, continuations], dim=1)  # seq_len + 1 bytes each
        ce = {r: held_out_ce(model, windows, r) for r in recurrences}
        samples = {}
        for r in (recurrences[0], recurrences[len(recurrences) // 2], recurrences[-1]):
            prompt = windows[:1, :32]
            tokens = generate(model, prompt, DecodingConfig(max_new_tokens=64, steps_per_block=r), seq_len)
            samples[r] = tokenizer.decode(tokens[0, 32:].tolist())
        report["recipes"][recipe] = {
            "checkpoint": str(step_folder), "train_seconds": seconds,
            "held_out_ce": ce, "samples": samples,
            "config": {k: getattr(job_config.recurrent, k) for k in ("mean_recurrence", "bptt_steps", "recurrence_law")},
        }
        print(recipe, json.dumps(report["recipes"][recipe], indent=1), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print("| r (core iterations per token) | " + " | ".join(str(r) for r in recurrences) + " |")
    print("|---|" + "---|" * len(recurrences))
    for recipe, result in report["recipes"].items():
        print(f"| {recipe} held-out CE (nats/byte) | "
              + " | ".join(f"{result['held_out_ce'][r]:.3f}" for r in recurrences) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
