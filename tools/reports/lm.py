"""End-to-end vs DiffusionBlocks on a byte-level text corpus, scored by an independent judge.

    python tools/reports/lm.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/llama3_text.toml] [--steps 300] [--warmup 30]
        [--num-blocks 4] [--init-from-e2e] [--samplers ancestral,euler[,heun]]
        [--steps-per-block 1,2,4,8] [--temperatures 0.7,0.85,1.0] [--prompts 32]
        [--prompt-len 32] [--new-tokens 32] [--eval-windows 16] [--single-block-sigmas 80]
        [--out outputs/lm_report] [--skip-training | --train-missing]
        [--dblocks-args="--diffusion_blocks.key value ..."] [--report FILE] [--section.key value ...]

1. splits the file: the last 10% (at a line break) is held out;
2. trains the same model end to end for --steps optimizer steps; an independent JUDGE,
   end to end with another seed (`--debug.seed`) for 2 x --steps; DiffusionBlocks for
   B x --steps (the random schedule gives every block about --steps updates: equal
   optimizer updates per parameter), warmups scaled alike; with --init-from-e2e also a
   DiffusionBlocks run from the end-to-end run's weights (`[checkpoint]
   initial_load_path`; the modules the conversion adds start fresh). Further
   `--section.key value` arguments go to every run (and to loading the models);
3. continues held-out prompts: the end-to-end model at each of --temperatures, each
   DiffusionBlocks model with each token sampler at each --steps-per-block (greedy final
   pick), and each DiffusionBlocks model's block owning each of --single-block-sigmas
   alone (every token drawn at temperature 1 from that block's logits on an
   uninformative noisy row: no denoising chain), and takes the real held-out
   continuations, plus real continuations of other held-out prompts (what MAUVE gives
   two samples of real text at this sample size);
4. scores every set of continuations: CE under the judge (nats/byte), distinct-1/2/3,
   unigram entropy (nats) and MAUVE against the real continuations on the judge's
   features (mean-pooled final hidden states); and every model teacher-forced on
   held-out windows: end-to-end next-token CE, and for each DiffusionBlocks model the
   CE of the block owning each of --sigmas with an uninformative noisy input.

Prints the tables and writes <out>/report.json (or --report) with the keys:
  args:            the options;
  samples[row]:    {"model", "decoding" (the sampler's settings, or null for real
                   text), "judge_ce", "distinct_1", "distinct_2", "distinct_3",
                   "unigram_entropy", "mauve", "example" (a prompt and its continuation)};
                   rows: "held-out text", "held-out text, other prompts",
                   "end-to-end T=<t>", "<DiffusionBlocks model> <sampler> <s>/block",
                   "<DiffusionBlocks model> block <b> alone, sigma <sigma>" (decoding null);
  teacher_forced[model]: {"next_token_ce"} for end-to-end models (judge included), or
                   {"sigma_ce": {"<sigma>": {"block", "ce"}}} for DiffusionBlocks models.
Long phases (training, sampling) show a progress bar with an ETA; each training run's
output goes to <out>/log_<run>.txt.
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, existing_file_arg, NON_NEGATIVE, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import check_text_file
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.text import (
    evenly_spaced_windows, judge_features, sample_rows, score, teacher_forced,
)
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3 import evaluation
from diffusion_blocks.models.llama3.sampler import (
    forwards_per_token, generate, is_denoiser, owner_of, TOKEN_STEPS,
)
from common import common_overrides, split_corpus, train

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "llama3_text.toml"
JUDGE_SEED = 1


def comma_list(kind):
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=existing_file_arg, default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--job.config_file", dest="config_file", default=str(CONFIG),
                        help="the LM job config every run starts from (a dblocks_llama3 "
                             "or a stock llama3 + diffusion_blocks converter config)")
    parser.add_argument("--init-from-e2e", action="store_true",
                        help="add a DiffusionBlocks run initialised from the end-to-end run")
    parser.add_argument("--steps", type=number_arg(int, AT_LEAST_1), default=300,
                        help="end-to-end optimizer steps (judge: 2x, DiffusionBlocks: B x)")
    parser.add_argument("--warmup", type=number_arg(int, NON_NEGATIVE), default=30)
    parser.add_argument("--num-blocks", type=number_arg(int, AT_LEAST_1), default=4)
    parser.add_argument("--samplers", type=comma_list(str), default=["ancestral", "euler"])
    parser.add_argument("--steps-per-block", type=comma_list(int), default=[1, 2, 4, 8])
    parser.add_argument("--temperatures", type=comma_list(float), default=[0.7, 0.85, 1.0],
                        help="the end-to-end model's sampling temperatures")
    parser.add_argument("--sigmas", type=comma_list(float), default=[80, 10, 3, 1, 0.5, 0.2],
                        help="teacher-forced denoising CE at these noise levels")
    parser.add_argument("--single-block-sigmas", type=comma_list(float), default=[80.0],
                        help="DiffusionBlocks: also sample from the block owning each sigma "
                             "alone (no denoising chain, temperature 1): a diagnostic row each")
    parser.add_argument("--prompts", type=number_arg(int, AT_LEAST_1), default=32)
    parser.add_argument("--prompt-len", type=number_arg(int, AT_LEAST_1), default=32)
    parser.add_argument("--new-tokens", type=number_arg(int, AT_LEAST_1), default=32,
                        help="prompt-len + new-tokens must fit [training] seq_len")
    parser.add_argument("--eval-windows", type=number_arg(int, AT_LEAST_1), default=16,
                        help="held-out windows of seq_len for the teacher-forced CE")
    parser.add_argument("--out", default=str(REPO / "outputs" / "lm_report"))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--train-missing", action="store_true",
                        help="train only the runs whose final checkpoint is not in --out "
                             "(e.g. the end-to-end and judge folders linked from a baseline)")
    parser.add_argument("--dblocks-args", type=shlex.split, default=[],
                        help="overrides for the DiffusionBlocks runs only, one quoted "
                             "string after =: e.g. --dblocks-args=\"--diffusion_blocks.sigma_per_token\" "
                             "(one lever measured against the same baseline)")
    parser.add_argument("--report", default=None, help="default: <out>/report.json")
    args, run_overrides = parser.parse_known_args(argv)
    unknown = [a for a in run_overrides if a.startswith("-") and "." not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if any(not 0 < sigma < math.inf for sigma in args.single_block_sigmas):
        parser.error(f"--single-block-sigmas: every sigma must be > 0, got {args.single_block_sigmas}")
    for sampler in args.samplers:
        if sampler not in TOKEN_STEPS:
            parser.error(f"--samplers: {sampler!r} is not one of {sorted(TOKEN_STEPS)}")
    return args, run_overrides


class Run(NamedTuple):
    overrides: list[str]  # the trainer's arguments
    steps: int
    dump: str             # its folder under --out


def planned_runs(args, run_overrides, train_path: Path) -> dict[str, Run]:
    out, config = Path(args.out), Path(args.config_file)
    blocks = args.num_blocks

    def run(dump: str, steps: int, warmup: int, *extra: str) -> Run:
        overrides = common_overrides(config, train_path, out / dump, steps, warmup)
        return Run([*overrides, *extra, *run_overrides], steps, dump)

    dblocks = f"DiffusionBlocks B={blocks}"
    lever = args.dblocks_args
    runs = {
        "end-to-end": run("e2e", args.steps, args.warmup, "--diffusion_blocks.no_enable"),
        "judge": run("judge", 2 * args.steps, 2 * args.warmup, "--diffusion_blocks.no_enable",
                     "--debug.seed", str(JUDGE_SEED)),
        dblocks: run("dblocks", blocks * args.steps, blocks * args.warmup,
                     "--diffusion_blocks.num_blocks", str(blocks), *lever),
    }
    if args.init_from_e2e:
        e2e_weights = out / "e2e" / checkpoint_folder(runs["end-to-end"].overrides) / f"step-{args.steps}"
        runs[f"{dblocks}, from the end-to-end weights"] = run(
            "dblocks_from_e2e", blocks * args.steps, blocks * args.warmup,
            "--diffusion_blocks.num_blocks", str(blocks),
            "--checkpoint.initial_load_path", str(e2e_weights), *lever,
        )
    return runs


def checkpoint_folder(overrides: list[str]) -> str:
    return parse_job_config(overrides).checkpoint.folder


def load(overrides: list[str]):
    job_config = parse_job_config(overrides)
    dump = Path(job_config.job.dump_folder)
    model, tokenizer, _ = load_for_inference(job_config, dump / job_config.checkpoint.folder)
    return model, tokenizer, job_config.training.seq_len


def print_tables(args, samples: dict, tf: dict) -> None:
    print(f"\nContinuations of {args.prompts} held-out {args.prompt_len}-byte prompts by "
          f"{args.new_tokens} bytes; judge: end to end, {2 * args.steps} steps, another seed.\n")
    print("| samples | judge CE (nats/byte) | distinct-1 | distinct-2 | distinct-3 | "
          "unigram entropy (nats) | MAUVE |")
    print("|---|---|---|---|---|---|---|")
    for row, r in samples.items():
        print(f"| {row} | {r['judge_ce']:.3f} | {r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
              f"{r['distinct_3']:.3f} | {r['unigram_entropy']:.3f} | {r['mauve']:.3f} |")
    sigmas = [f"{s:g}" for s in args.sigmas]
    print(f"\nTeacher-forced CE on {args.eval_windows} held-out windows (nats/byte): "
          "end to end, next token; DiffusionBlocks, the block owning sigma with an "
          "uninformative noisy input.\n")
    print("| model | next token | " + " | ".join(f"sigma {s}" for s in sigmas) + " |")
    print("|---|---|" + "---|" * len(sigmas))
    for name, r in tf.items():
        if "next_token_ce" in r:
            print(f"| {name} | {r['next_token_ce']:.3f} |" + " |" * len(sigmas))
        else:
            cells = " | ".join(f"{r['sigma_ce'][s]['ce']:.3f} (block {r['sigma_ce'][s]['block']})"
                               for s in sigmas)
            print(f"| {name} | | {cells} |")
    print()
    for row, r in samples.items():
        print(f"--- {row}:\n{r['example']}\n")


@exit_on_config_error
def main(argv):
    args, run_overrides = parse_args(argv)
    out = Path(args.out)
    check_text_file(args.data)
    train_path, val_text = split_corpus(Path(args.data), out)
    runs = planned_runs(args, run_overrides, train_path)
    seq_len = parse_job_config(runs["end-to-end"].overrides).training.seq_len
    if args.prompt_len + args.new_tokens > seq_len:
        raise ConfigError(f"--prompt-len + --new-tokens must be <= [training] seq_len {seq_len}")
    if not args.skip_training:
        for name, run in runs.items():
            final = out / run.dump / checkpoint_folder(run.overrides) / f"step-{run.steps}"
            if args.train_missing and (final / ".metadata").is_file():
                print(f"{name}: {final} is there, not trained again", flush=True)
                continue
            train(name, run.overrides, run.steps, out / f"log_{run.dump}.txt")

    models, tokenizer = {}, None
    for name, run in runs.items():
        models[name], tokenizer, _ = load(run.overrides)
    judge = models["judge"]
    ids = tokenizer.encode(val_text)
    span = args.prompt_len + args.new_tokens
    windows = evenly_spaced_windows(ids, span, 2 * args.prompts)
    prompts, truth = windows[0::2, :args.prompt_len], windows[0::2, args.prompt_len:]
    other_prompts, other_truth = windows[1::2, :args.prompt_len], windows[1::2, args.prompt_len:]
    real_features = judge_features(judge, prompts, truth)

    samples = {
        "held-out text": score(judge, prompts, truth, real_features, tokenizer),
        "held-out text, other prompts": score(judge, other_prompts, other_truth, real_features, tokenizer),
    }
    rows = sample_rows(args, models)
    work = sum(args.new_tokens * forwards_per_token(models[m], d) for m, d in rows.values())
    with tqdm(total=work, desc="sampling", unit="forward") as bar:
        for row, (name, decoding) in rows.items():
            bar.set_postfix_str(row)
            per_token = forwards_per_token(models[name], decoding)
            tokens = generate(models[name], prompts, decoding, seq_len,
                              on_token=lambda: bar.update(per_token))
            samples[row] = score(judge, prompts, tokens[:, args.prompt_len:], real_features,
                                 tokenizer, name, decoding)
    for name, model in models.items():
        for sigma in args.single_block_sigmas if is_denoiser(model) else []:
            row = f"{name} block {owner_of(model.partition, sigma)} alone, sigma {sigma:g}"
            continuations = evaluation.single_block_continuations(
                model, prompts, sigma, args.new_tokens, seq_len)
            samples[row] = score(judge, prompts, continuations, real_features, tokenizer, name)

    eval_windows = evenly_spaced_windows(ids, seq_len + 1, args.eval_windows)
    tf = teacher_forced(models, eval_windows, args.sigmas)
    print_tables(args, samples, tf)
    report = Path(args.report or out / "report.json")
    report.write_text(json.dumps(
        {"args": vars(args), "samples": samples, "teacher_forced": tf}, indent=2
    ))
    print(f"wrote {report}")


if __name__ == "__main__":
    main(sys.argv[1:])
