"""DiffusionBlocks vs end-to-end MD4 on a character-level text (default tinyshakespeare).

    python tools/reports/md4.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/md4_chars.toml] [--steps 200] [--warmup 20] \
        [--num-blocks 4] [--eval-batches 8] [--out outputs/md4_report] [--skip-training] \
        [--section.key value ...]   # applied to every run, e.g. --diffusion_blocks.time_conditioning none

1. splits the file: the last 10% (at a line break) is held out;
2. trains the config's network end to end (MD4, t ~ U(0, 1)) for --steps optimizer
   steps, and with DiffusionBlocks for num_blocks x --steps (the random schedule gives
   every block about --steps updates), warmup scaled alike; character data
   (`text_chars`), no validation during training;
3. estimates each model's held-out bits per character (tools/eval_bpc.py's estimator:
   the same seed, --eval-batches batches of [validation] local_batch_size, 8 draws of
   t per sequence) and draws unconditional samples (the ancestral sampler,
   [diffusion_blocks] sampling_steps steps, temperature 1).
Prints a markdown table and the samples; writes <out>/report.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.md4.evaluation import heldout_batches, heldout_bpc
from diffusion_blocks.models.md4.sampler import sample_text
from diffusion_blocks.models.md4.task import build_md4_tokenizer
from diffusion_blocks.protocols.family import TextRequest
from common import split_text, train
from torchtitan.hf_datasets.text_datasets import build_text_validation_dataloader

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "md4_chars.toml"


def run_overrides(config, train_path, heldout_path, dump, steps, warmup, extra) -> list[str]:
    return [
        "--job.config_file", str(config),
        "--training.dataset", "text_chars", "--training.dataset_path", str(train_path),
        "--validation.dataset", "text_chars", "--validation.dataset_path", str(heldout_path),
        "--validation.no_enable",
        "--job.dump_folder", str(dump),
        "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", str(warmup),
        "--checkpoint.interval", str(steps),
        "--metrics.log_freq", "50",
        *extra,
    ]


def evaluate(job_config, eval_batches: int, num_samples: int) -> dict:
    checkpoint = Path(job_config.job.dump_folder) / job_config.checkpoint.folder
    model, tokenizer, _ = load_for_inference(job_config, checkpoint)
    loader = build_text_validation_dataloader(1, 0, build_md4_tokenizer(job_config), job_config)
    device = torch.device("cpu")
    estimate = heldout_bpc(model, heldout_batches(loader, device, eval_batches), device, seed=0)
    samples = sample_text(model, tokenizer, job_config, TextRequest(
        max_new_tokens=job_config.training.seq_len, num_samples=num_samples, seed=0,
    ))
    return {"bpc": estimate.bpc, "stderr": estimate.stderr, "sequences": estimate.sequences,
            "draws_per_sequence": estimate.draws_per_sequence, "samples": samples}


def main(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--job.config_file", dest="config_file", default=str(CONFIG))
    parser.add_argument("--steps", type=int, default=200, help="end-to-end optimizer steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--num-blocks", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "outputs" / "md4_report"))
    parser.add_argument("--skip-training", action="store_true")
    args, extra = parser.parse_known_args(argv)

    out = Path(args.out)
    train_path, heldout_path = split_text(Path(args.data), out)
    runs = {
        "end-to-end MD4": run_overrides(
            args.config_file, train_path, heldout_path, out / "e2e", args.steps,
            args.warmup, [*extra, "--diffusion_blocks.no_enable"],
        ),
        f"DiffusionBlocks B={args.num_blocks}": run_overrides(
            args.config_file, train_path, heldout_path, out / "dblocks",
            args.num_blocks * args.steps, args.num_blocks * args.warmup,
            [*extra, "--diffusion_blocks.num_blocks", str(args.num_blocks)],
        ),
    }
    results = {}
    for name, overrides in runs.items():
        steps = int(overrides[overrides.index("--training.steps") + 1])
        log = out / f"log_{Path(overrides[overrides.index('--job.dump_folder') + 1]).name}.txt"
        seconds = None if args.skip_training else train(name, overrides, steps, log)
        results[name] = evaluate(parse_job_config(overrides), args.eval_batches, args.num_samples)
        results[name].update(train_seconds=seconds, steps=steps)
        print(name, {k: v for k, v in results[name].items() if k != "samples"}, flush=True)

    print("\n| model | optimizer steps | held-out bits per character (± stderr) | training time |")
    print("|---|---|---|---|")
    for name, r in results.items():
        minutes = "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f} min"
        print(f"| {name} | {r['steps']} | {r['bpc']:.3f} ± {r['stderr']:.3f} | {minutes} |")
    for name, r in results.items():
        for sample in r["samples"]:
            print(f"\n--- {name}:\n{sample}")
    (out / "report.json").write_text(json.dumps(
        {"args": vars(args), "extra": extra, "results": results}, indent=2
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
