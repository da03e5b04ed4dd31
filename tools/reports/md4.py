"""DiffusionBlocks vs end-to-end MD4 on a character-level text (default tinyshakespeare),
at one or more budgets.

    python tools/reports/md4.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/md4_chars.toml] [--steps 200] [--warmup 20] \
        [--num-blocks 4[,3]] [--equal-memory-row] [--variant NAME=FLAGS ...] \
        [--budgets 0.25,0.5,1] [--checkpoint-interval N] [--parallel-runs N] \
        [--eval-batches 8] [--num-samples 2] [--out outputs/md4_report] \
        [--skip-training | --train-missing] [--section.key value ...]

1. splits the file: the last 10% (at a line break) is held out;
2. trains the config's network end to end (MD4, t ~ U(0, 1)) for --steps optimizer
   steps, and with DiffusionBlocks for B x --steps for each B of --num-blocks (the random
   schedule gives every block about --steps updates: equal updates per block), warmups
   scaled alike (a B that does not divide the layers gets layers_per_block with the
   larger blocks first, e.g. 3 3 2 for 8 layers and B = 3); with --equal-memory-row an
   end-to-end run of the `chars_<k>l` flavor per B, k the largest block's layers (the
   model whose whole training fits where one block's does); each --variant NAME=FLAGS
   one more end-to-end run and one more DiffusionBlocks run per B with FLAGS (e.g.
   `no_time=--diffusion_blocks.time_conditioning none`). Character data (`text_chars`),
   no validation during training; every run saves at each --budgets fraction of its
   steps and every --checkpoint-interval steps, all kept, and --train-missing trains
   again only the runs whose final checkpoint is missing (an interrupted one resumes
   from its last checkpoint); --parallel-runs N trains N at once (one core each);
3. estimates each model's held-out bits per character at each budget (tools/eval_bpc.py's
   estimator: the same seed, --eval-batches batches of [validation] local_batch_size,
   8 draws of t per sequence) and draws unconditional samples of the final models (the
   ancestral sampler, [diffusion_blocks] sampling_steps steps, temperature 1).
Prints a markdown table (each row's gap to end to end in percent), the budgets table and
the samples; writes <out>/report.json with the keys
  args, extra;
  results[row]: {"bpc", "stderr", "sequences", "draws_per_sequence", "steps",
                 "updates_per_block", "samples"};
  budgets: {"<fraction>": {row: {"step", "bpc", "stderr"}}};
and, with more than one --budgets fraction, the plot <out>/budgets.png (and .svg);
`--plot-from REPORT_JSON` redraws that plot from a report alone (no checkpoints needed).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, existing_file_arg, NON_NEGATIVE, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.md4.args import md4_flavors
from diffusion_blocks.models.md4.evaluation import heldout_batches, heldout_bpc
from diffusion_blocks.models.md4.sampler import sample_text
from diffusion_blocks.models.md4.task import build_md4_tokenizer
from diffusion_blocks.protocols.family import TextRequest
from budget import (
    budget_fractions, budget_png, budget_steps, budget_svg, checkpointed, named_flags, Run, train_runs,
)
from common import split_text
from torchtitan.hf_datasets.text_datasets import build_text_validation_dataloader

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "md4_chars.toml"
END_TO_END = "end-to-end MD4"
Y_LABEL = "held-out bits per character (ELBO bound)"


def comma_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",") if item]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=existing_file_arg,
                        default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--job.config_file", dest="config_file", default=str(CONFIG))
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=200,
                        help="end-to-end optimizer steps (DiffusionBlocks: B x)")
    parser.add_argument("--warmup", type=number_arg(int, NON_NEGATIVE), default=20)
    parser.add_argument("--num-blocks", type=comma_ints, default=[4],
                        help="B of each DiffusionBlocks row, e.g. 4,3")
    parser.add_argument("--equal-memory-row", action="store_true",
                        help="an end-to-end run with the largest block's layers per B")
    parser.add_argument("--variant", type=named_flags, action="append", default=[],
                        metavar="NAME=FLAGS",
                        help="one more end-to-end and DiffusionBlocks run per B with FLAGS; repeatable")
    parser.add_argument("--budgets", type=budget_fractions, default=[1.0],
                        help="fractions of every run's steps to measure at (e.g. 0.25,0.5,1)")
    parser.add_argument("--checkpoint-interval", type=number_arg(int, AT_LEAST_1), default=None,
                        help="save every N steps as well (default: the --budgets steps only)")
    parser.add_argument("--parallel-runs", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--eval-batches", type=number_arg(int, AT_LEAST_1), default=8)
    parser.add_argument("--num-samples", type=number_arg(int, NON_NEGATIVE), default=2)
    parser.add_argument("--out", default=str(REPO / "outputs" / "md4_report"))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--plot-from", type=existing_file_arg, default=None, metavar="REPORT_JSON",
                        help="only draw <out>/budgets.png (and .svg) from this report's budgets: "
                             "no training, no evaluation")
    parser.add_argument("--train-missing", action="store_true",
                        help="train only the runs whose final checkpoint is not in --out")
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") and "." not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, extra


def block_layers(n_layers: int, blocks: int) -> list[int]:
    """Layers per block, the larger blocks first: 8 layers, B = 3 -> [3, 3, 2]."""
    if blocks > n_layers:
        raise ConfigError(f"--num-blocks {blocks}: the network has only {n_layers} layers")
    return [n_layers // blocks + (b < n_layers % blocks) for b in range(blocks)]


def equal_memory_flavor(flavor: str, layers: int) -> str:
    """The `<flavor>_<layers>l` flavor of the end-to-end model with one block's layers."""
    name = f"{flavor}_{layers}l"
    if name not in md4_flavors():
        raise ConfigError(f"--equal-memory-row: no MD4 flavor {name!r} (add one to models/md4/args.py)")
    return name


def planned_runs(args, extra: list[str], train_path: Path, heldout_path: Path) -> dict[str, Run]:
    out = Path(args.out)
    job_config = parse_job_config(["--job.config_file", args.config_file, *extra])
    n_layers = md4_flavors()[job_config.model.flavor].n_layers

    def run(dump: str, steps: int, warmup: int, *flags: str) -> Run:
        overrides = [
            "--job.config_file", str(args.config_file),
            "--training.dataset", "text_chars", "--training.dataset_path", str(train_path),
            "--validation.dataset", "text_chars", "--validation.dataset_path", str(heldout_path),
            "--validation.no_enable", "--job.dump_folder", str(out / dump),
            "--training.steps", str(steps), "--lr_scheduler.warmup_steps", str(warmup),
            "--metrics.log_freq", str(min(50, steps)),
        ]
        return Run([*checkpointed(overrides, steps, args.checkpoint_interval, args.budgets),
                    *flags, *extra], steps, dump)

    def dblocks(blocks: int, suffix: str, *flags: str) -> Run:
        layers = block_layers(n_layers, blocks)
        split = [] if len(set(layers)) == 1 else [
            "--diffusion_blocks.layers_per_block", *map(str, layers)]
        return run(f"dblocks_b{blocks}{suffix}", blocks * args.steps, blocks * args.warmup,
                   "--diffusion_blocks.num_blocks", str(blocks), *split, *flags)

    e2e = "--diffusion_blocks.no_enable"
    runs = {END_TO_END: run("e2e", args.steps, args.warmup, e2e)}
    for blocks in args.num_blocks:
        runs[f"DiffusionBlocks B={blocks}"] = dblocks(blocks, "")
    if args.equal_memory_row:
        for blocks in args.num_blocks:
            layers = max(block_layers(n_layers, blocks))
            flavor = equal_memory_flavor(job_config.model.flavor, layers)
            # one block: the few layers need not split into the config's B blocks
            runs[f"end-to-end, {flavor} (equal memory, B={blocks})"] = run(
                f"e2e_{layers}l", args.steps, args.warmup, e2e, "--model.flavor", flavor,
                "--diffusion_blocks.num_blocks", "1")
    for name, flags in args.variant:
        runs[f"{END_TO_END}, {name}"] = run(f"e2e_{name}", args.steps, args.warmup, e2e, *flags)
        for blocks in args.num_blocks:
            runs[f"DiffusionBlocks B={blocks}, {name}"] = dblocks(blocks, f"_{name}", *flags)
    return runs


def load(run: Run, step: int):
    job_config = parse_job_config(run.overrides)
    folder = Path(job_config.job.dump_folder) / job_config.checkpoint.folder / f"step-{step}"
    model, tokenizer, _ = load_for_inference(job_config, folder)
    return job_config, model, tokenizer


def bpc_at(run: Run, step: int, eval_batches: int) -> dict:
    job_config, model, _ = load(run, step)
    loader = build_text_validation_dataloader(1, 0, build_md4_tokenizer(job_config), job_config)
    device = torch.device("cpu")
    estimate = heldout_bpc(model, heldout_batches(loader, device, eval_batches), device, seed=0)
    return {"step": step, "bpc": estimate.bpc, "stderr": estimate.stderr,
            "sequences": estimate.sequences, "draws_per_sequence": estimate.draws_per_sequence}


def samples_of(run: Run, num_samples: int) -> list[str]:
    if num_samples == 0:
        return []
    job_config, model, tokenizer = load(run, run.steps)
    return sample_text(model, tokenizer, job_config, TextRequest(
        max_new_tokens=job_config.training.seq_len, num_samples=num_samples, seed=0))


def blocks_of(run: Run) -> int:
    if "--diffusion_blocks.no_enable" in run.overrides:
        return 1
    return int(run.overrides[run.overrides.index("--diffusion_blocks.num_blocks") + 1])


def print_tables(results: dict, budgets: dict) -> None:
    reference = results[END_TO_END]["bpc"]
    print("\n| model | optimizer steps (per block) | held-out bits per character (+- stderr) | vs end to end |")
    print("|---|---|---|---|")
    for name, r in results.items():
        gap = 100 * (r["bpc"] - reference) / reference
        print(f"| {name} | {r['steps']} ({r['updates_per_block']}) | {r['bpc']:.3f} +- "
              f"{r['stderr']:.3f} | {gap:+.1f}% |")
    if len(budgets) > 1:
        names = list(next(iter(budgets.values())))
        print("\nHeld-out bits per character at each budget (fraction of each run's steps):\n")
        print("| budget | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for fraction, row in budgets.items():
            print(f"| {fraction} | " + " | ".join(
                f"{row[n]['bpc']:.3f} (step {row[n]['step']})" for n in names) + " |")
    for name, r in results.items():
        for sample in r["samples"]:
            print(f"\n--- {name}:\n{sample}")


@exit_on_config_error
def main(argv):
    args, extra = parse_args(argv)
    out = Path(args.out)
    if args.plot_from:
        report = json.loads(Path(args.plot_from).read_text())
        if not isinstance(report.get("budgets"), dict) or len(report["budgets"]) < 2:
            raise ConfigError(f"--plot-from {args.plot_from}: no 'budgets' of two or more fractions "
                              "(a report.json of tools/reports/md4.py --budgets)")
        plot_budgets(report["budgets"], out)
        return
    train_path, heldout_path = split_text(Path(args.data), out)
    runs = planned_runs(args, extra, train_path, heldout_path)
    if not args.skip_training:
        folder = parse_job_config(runs[END_TO_END].overrides).checkpoint.folder
        train_runs(runs, out, folder, args.parallel_runs, args.train_missing)

    budgets: dict[str, dict] = {}
    for fraction in args.budgets:
        budgets[f"{fraction:g}"] = {
            name: bpc_at(run, budget_steps(run.steps, [fraction])[0], args.eval_batches)
            for name, run in runs.items()
        }
        print(f"budget {fraction:g}:", {n: round(r["bpc"], 4) for n, r in budgets[f"{fraction:g}"].items()},
              flush=True)
    results = {}
    for name, run in runs.items():
        final = dict(budgets["1"][name])
        final.pop("step")
        results[name] = {**final, "steps": run.steps, "updates_per_block": run.steps // blocks_of(run),
                         "samples": samples_of(run, args.num_samples)}
    print_tables(results, budgets)
    report = {"args": vars(args), "extra": extra, "results": results, "budgets": budgets}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if len(args.budgets) > 1:
        plot_budgets(budgets, out)
    print(f"wrote {out / 'report.json'}")


def plot_budgets(budgets: dict, out: Path) -> None:
    """budgets.png and budgets.svg in `out` from a report's {fraction: {row: {"bpc"}}}."""
    plotted = {f: {n: {"ce": r["bpc"]} for n, r in row.items()} for f, row in budgets.items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "budgets.svg").write_text(budget_svg(plotted, Y_LABEL))
    budget_png(plotted, out / "budgets.png", Y_LABEL)
    print(f"wrote {out / 'budgets.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
