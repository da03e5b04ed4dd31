"""End-to-end vs DiffusionBlocks on a byte-level text corpus, scored by an independent judge.

    python tools/reports/lm.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/llama3_text.toml] [--steps 300] [--warmup 30]
        [--num-blocks 4] [--init-from-e2e] [--samplers ancestral,euler[,heun]]
        [--steps-per-block 1,2,4,8] [--temperatures 0.7,0.85,1.0] [--prompts 32]
        [--prompt-len 32] [--new-tokens 32] [--eval-windows 16] [--single-block-sigmas 80]
        [--chains 64] [--split-draws 4] [--chains-per-call 4] [--ce-windows 8] [--judge-chains 4]
        [--no-samples] [--no-dblocks-judge] [--equal-memory-row] [--equal-compute-row]
        [--budgets 0.25,0.5,1] [--checkpoint-interval N]
        [--out outputs/lm_report] [--skip-training | --train-missing] [--parallel-runs N]
        [--dblocks-args="--diffusion_blocks.key value ..."] [--lever NAME=FLAGS ...]
        [--report FILE] [--row NAME ...] [--section.key value ...]

1. splits the file: the last 10% (at a line break) is held out;
2. trains the same model end to end for --steps optimizer steps; an independent JUDGE,
   end to end with another seed (`--debug.seed`) for 2 x --steps; DiffusionBlocks for
   B x --steps (the random schedule gives every block about --steps updates: equal
   optimizer updates per parameter), warmups scaled alike; with --init-from-e2e also a
   DiffusionBlocks run from the end-to-end run's weights (`[checkpoint]
   initial_load_path`; the modules the conversion adds start fresh); a DiffusionBlocks
   JUDGE, DiffusionBlocks with the judge's seed for 2 x B x --steps (unless
   --no-dblocks-judge); each --lever NAME=FLAGS one more DiffusionBlocks run like the
   main one plus FLAGS (row "DiffusionBlocks B=<B>, NAME", folder dblocks_NAME: a lever
   measured beside the paper's recipe on the same windows); with --equal-memory-row an end-to-end run with L/B layers (the
   <flavor>_<L/B>l flavor) and with --equal-compute-row the row of an end-to-end model
   at 2 x --steps (the DiffusionBlocks run's layer-token FLOPs: `equal_compute_steps`),
   which is the judge's run (trained once; its samples are not drawn, since it judges
   them). --parallel-runs N trains N runs at once (one core each). Every run saves a
   checkpoint every --checkpoint-interval steps and at each --budgets step, all kept,
   and --train-missing trains again every run whose final checkpoint is missing:
   torchtitan resumes it from its last checkpoint; --skip-training trains nothing and
   leaves out every row whose final checkpoint is missing (a lever's row measured
   beside figures recorded earlier, say); --row NAME (repeatable, the names the report
   prints) trains only those rows and measures them beside the end-to-end one (a long
   budget trained a row per process). Further `--section.key value`
   arguments go to every run (and to loading the models);
3. continues held-out prompts: the end-to-end model at each of --temperatures, each
   DiffusionBlocks model with each token sampler at each --steps-per-block (greedy final
   pick), and each DiffusionBlocks model's block owning each of --single-block-sigmas
   alone (every token drawn at temperature 1 from that block's logits on an
   uninformative noisy row: no denoising chain), and takes the real held-out
   continuations, plus real continuations of other held-out prompts (what MAUVE gives
   two samples of real text at this sample size);
0. THE HEADLINE, printed first: every DiffusionBlocks model x sampler x steps per
   block, the sampler's held-out CE (`eval.sampler_ce.sampler_heldout_ce`, --chains K
   chains, stderr, at K/4, K/2 and K chains, floor fraction; the ancestral sampler's
   first --split-draws draws split on the true token) on --ce-windows held-out
   windows of seq_len + 1, beside the end-to-end model's next-token CE on the same
   windows' same positions and the gap in percent; and where the chain decides: the
   same estimator when each block is done (the sampler stopped there), the rise from
   the block before, and the best stop;
4. scores every set of continuations: CE under the judge (nats/byte), distinct-1/2/3,
   unigram entropy (nats) and MAUVE against the real continuations on the judge's
   features (mean-pooled final hidden states); and every model teacher-forced on
   held-out windows: end-to-end next-token CE, and for each DiffusionBlocks model the
   CE of the block owning each of --sigmas with an uninformative noisy input. Two more
   judges score every set beside the end-to-end one, so each recipe's samples are
   judged by both recipes and by neither: a byte 5-gram Kneser-Ney model fit on the
   training split (the tokenizer's BOS/EOS ids dropped), and the DiffusionBlocks judge
   through its sampler's CE (`eval.sampler_ce.sampler_judge_ce`, default sampler,
   --judge-chains chains). Why a trained DiffusionBlocks judge scored by its sampler,
   not the cheaper teacher-forced block-0 CE at sigma_max: block 0 alone is not the
   distribution the recipe samples from (the teacher-forced table shows it differs
   from the chain), and at report sizes the judge's cost is small: K chains x the
   sampler's forwards over prompt + continuation, a few seconds per sample set for
   K = 4 on the debug model; its training (2 x B x --steps DiffusionBlocks steps, about
   the cost of 4 x --steps end-to-end steps) is the price, which --no-dblocks-judge
   avoids;
5. with more than one --budgets fraction: every measured model at each fraction of its
   steps (its intermediate checkpoint): end to end next-token CE, DiffusionBlocks the
   default sampler's held-out CE at 1 step per block, on the headline's windows, and a
   plot of them, <out>/budgets.png (and the same as SVG, <out>/budgets.svg).

Prints the tables and writes <out>/report.json (or --report) with the keys:
  args:            the options;
  sampler_ce[row]: {"model", "sampler", "steps_per_block", "chains", "windows",
                   "positions", "ce", "stderr", "ce_by_chains" ({"<k>": ce} at K/4, K/2,
                   K), "floor_fraction", "e2e_ce" (same positions), "gap_pct",
                   "split_draws", "profile" ([{"sigma", "block", "ce", "ce_by_chains"}]:
                   every state of the chain, the sampler stopped there), "block_end_ce"
                   and "block_loss" ({"<block>": ce}), "best_stop" ({"sigma", "block",
                   "ce", "gap_pct"})};
                   rows "<DiffusionBlocks model> <sampler> <s>/block";
  end_to_end_ce[model]: every end-to-end model's next-token CE on the headline's windows
                   (the equal-memory and equal-compute rows among them);
  samples[row]:    {"model", "decoding" (the sampler's settings, or null for real
                   text), "judge_ce", "distinct_1", "distinct_2", "distinct_3",
                   "unigram_entropy", "mauve", "example" (a prompt and its continuation),
                   "ngram_judge_ce" (NaN when no continuation byte is left),
                   (empty with --no-samples)
                   "ngram_dropped_fraction" (the continuation ids >= 256 it dropped),
                   "dblocks_judge_ce" (absent with --no-dblocks-judge)};
                   rows: "held-out text", "held-out text, other prompts",
                   "end-to-end T=<t>", "<DiffusionBlocks model> <sampler> <s>/block",
                   "<DiffusionBlocks model> block <b> alone, sigma <sigma>" (decoding null);
  teacher_forced[model]: {"next_token_ce"} for end-to-end models (judge included), or
                   {"sigma_ce": {"<sigma>": {"block", "ce"}}} for DiffusionBlocks models;
  budgets (with more than one --budgets fraction): {"<fraction>": {model: {"step", "ce"}}}.
Long phases (training, sampling) show a progress bar with an ETA; each training run's
output goes to <out>/log_<run>.txt.
"""

import argparse
import json
import math
import re
import shlex
import sys
from pathlib import Path

from tqdm import tqdm

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, existing_file_arg, NON_NEGATIVE, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import check_text_file
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.eval.ngram import judge_ce_on_bytes, NgramLM
from diffusion_blocks.eval.sampler_ce import (
    block_ends, block_losses, sampler_heldout_ce, sampler_judge_ce,
)
from diffusion_blocks.eval.text import (
    evenly_spaced_windows, judge_features, next_token_ce, sample_rows, score, teacher_forced,
)
from diffusion_blocks.inference import load_for_inference
from diffusion_blocks.models.llama3 import evaluation
from diffusion_blocks.models.llama3.args import dblocks_llama3_flavors
from diffusion_blocks.models.llama3.sampler import (
    DecodingConfig, forwards_per_token, generate, is_denoiser, owner_of, TOKEN_STEPS,
)
from budget import (
    budget_fractions, budget_png, budget_steps, budget_svg, checkpointed, named_flags, Run, selected,
    train_runs,
)
from common import common_overrides, split_corpus

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "llama3_text.toml"
JUDGE_SEED = 1
SAMPLER_CE_SEED = 0
NGRAM_ORDER = 5
NGRAM_VOCAB = 256
DBLOCKS_JUDGE = "judge, DiffusionBlocks"
Y_LABEL = "held-out CE (nats/byte)"


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
    parser.add_argument("--chains", type=number_arg(int, AT_LEAST_1), default=64,
                        help="the headline: chains K of each sampler's held-out CE")
    parser.add_argument("--split-draws", type=number_arg(int, NON_NEGATIVE), default=4,
                        help="the ancestral sampler's CE: its first D draws split on the true "
                             "token (eval.sampler_ce; --chains a multiple of 2^D; 0: plain)")
    parser.add_argument("--chains-per-call", type=number_arg(int, AT_LEAST_1), default=4,
                        help="chains run as one batch (memory)")
    parser.add_argument("--ce-windows", type=number_arg(int, AT_LEAST_1), default=8,
                        help="held-out windows of seq_len + 1 for the sampler CE and the "
                             "end-to-end next-token CE beside it")
    parser.add_argument("--judge-chains", type=number_arg(int, AT_LEAST_1), default=4,
                        help="chains of the DiffusionBlocks judge's sampler CE of each sample set")
    parser.add_argument("--no-samples", action="store_true",
                        help="measure the held-out CEs only (headline, teacher-forced, budgets): "
                             "no samples, judges or MAUVE; report key samples = {}")
    parser.add_argument("--no-dblocks-judge", action="store_true",
                        help="no DiffusionBlocks judge run (its column is left out)")
    parser.add_argument("--equal-memory-row", action="store_true",
                        help="add an end-to-end run with L/B layers (the memory of one block)")
    parser.add_argument("--equal-compute-row", action="store_true",
                        help="add the row of an end-to-end model with the DiffusionBlocks run's "
                             "layer-token FLOPs, 2 x --steps (see equal_compute_steps): the "
                             "judge's run, trained once and not sampled")
    parser.add_argument("--budgets", type=budget_fractions, default=[1.0],
                        help="fractions of every run's steps to measure at (e.g. 0.25,0.5,1), "
                             "read from the runs' intermediate checkpoints; more than one "
                             "also writes <out>/budgets.png and .svg")
    parser.add_argument("--checkpoint-interval", type=number_arg(int, AT_LEAST_1), default=None,
                        help="save every N steps (so --train-missing resumes an interrupted "
                             "run; default: the end only, and the --budgets steps)")
    parser.add_argument("--out", default=str(REPO / "outputs" / "lm_report"))
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--parallel-runs", type=number_arg(int, AT_LEAST_1), default=1,
                        help="train up to N runs at once (one thread each; N = the cores)")
    parser.add_argument("--train-missing", action="store_true",
                        help="train only the runs whose final checkpoint is not in --out "
                             "(e.g. the end-to-end and judge folders linked from a baseline)")
    parser.add_argument("--lever", type=named_flags, action="append", default=[], metavar="NAME=FLAGS",
                        help="one more DiffusionBlocks row, trained like the main one plus FLAGS "
                             "(e.g. 'balanced=--diffusion_blocks.partition explicit ...'); repeatable")
    parser.add_argument("--dblocks-args", type=shlex.split, default=[],
                        help="overrides for the DiffusionBlocks runs only, one quoted "
                             "string after =: e.g. --dblocks-args=\"--diffusion_blocks.sigma_per_token\" "
                             "(one lever measured against the same baseline)")
    parser.add_argument("--report", default=None, help="default: <out>/report.json")
    parser.add_argument("--row", action="append", default=None, metavar="NAME",
                        help="only this row's run is trained and measured (repeatable; the names "
                             "the report prints); the end-to-end run is measured too (every row "
                             "is compared with it), trained only when named")
    args, run_overrides = parser.parse_known_args(argv)
    unknown = [a for a in run_overrides if a.startswith("-") and "." not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if any(not 0 < sigma < math.inf for sigma in args.single_block_sigmas):
        parser.error(f"--single-block-sigmas: every sigma must be > 0, got {args.single_block_sigmas}")
    for sampler in args.samplers:
        if sampler not in TOKEN_STEPS:
            parser.error(f"--samplers: {sampler!r} is not one of {sorted(TOKEN_STEPS)}")
    group = 2 ** args.split_draws
    if args.chains % group:
        parser.error(f"--chains {args.chains}: the ancestral sampler's CE runs chains in groups "
                     f"of 2^--split-draws = {group}; give a multiple of it or fewer --split-draws")
    return args, run_overrides


def equal_memory_flavor(config: Path, run_overrides: list[str], blocks: int) -> str:
    """The flavor of the end-to-end model with L/B layers: <name>_<L/B>l of an
    <name>_<L>l flavor (debugmodel_8l, B = 4: debugmodel_2l)."""
    job_config = parse_job_config(["--job.config_file", str(config), *run_overrides])
    flavor, layers = job_config.model.flavor, None
    if (match := re.fullmatch(r"(.*)_(\d+)l", flavor)) and int(match.group(2)) % blocks == 0:
        layers = int(match.group(2)) // blocks
        name = f"{match.group(1)}_{layers}l"
        if name in dblocks_llama3_flavors():
            return name
    raise ConfigError(f"--equal-memory-row: no flavor with L/B layers for {flavor!r} and "
                      f"B = {blocks} (add one to models/llama3/args.py)")


def equal_compute_steps(steps: int) -> int:
    """End-to-end steps with the DiffusionBlocks run's training FLOPs, counted as
    layer x token products (embeddings, the head and attention's T^2 term left out): a
    DiffusionBlocks step runs one block's L/B layers over 2T positions (the clean
    context and the noisy rows), B x steps of them; an end-to-end step runs L layers
    over T positions. B x steps x (L/B) x 2T / (L x T) = 2 x steps."""
    return 2 * steps


def equal_compute_name(steps: int) -> str:
    return f"end-to-end, {equal_compute_steps(steps)} steps (equal compute, the judge's run)"


def planned_runs(args, run_overrides, train_path: Path) -> dict[str, Run]:
    out, config = Path(args.out), Path(args.config_file)
    blocks = args.num_blocks

    def run(dump: str, steps: int, warmup: int, *extra: str) -> Run:
        overrides = checkpointed(common_overrides(config, train_path, out / dump, steps, warmup),
                                 steps, args.checkpoint_interval, args.budgets)
        return Run([*overrides, *extra, *run_overrides], steps, dump)

    dblocks = f"DiffusionBlocks B={blocks}"
    lever = args.dblocks_args
    e2e = "--diffusion_blocks.no_enable"
    runs = {
        "end-to-end": run("e2e", args.steps, args.warmup, e2e),
        "judge": run("judge", 2 * args.steps, 2 * args.warmup, e2e, "--debug.seed", str(JUDGE_SEED)),
        dblocks: run("dblocks", blocks * args.steps, blocks * args.warmup,
                     "--diffusion_blocks.num_blocks", str(blocks), *lever),
    }
    if not args.no_dblocks_judge:
        runs[DBLOCKS_JUDGE] = run(
            "judge_dblocks", 2 * blocks * args.steps, 2 * blocks * args.warmup,
            "--diffusion_blocks.num_blocks", str(blocks), "--debug.seed", str(JUDGE_SEED))
        # no --dblocks-args: a judge stays the same while one lever is measured
    if args.equal_memory_row:
        flavor = equal_memory_flavor(config, run_overrides, blocks)
        base = run("e2e_equal_memory", args.steps, args.warmup, e2e)
        runs[f"end-to-end, {flavor} (equal memory)"] = base._replace(
            # one block: L/B layers need not split into the config's B blocks
            overrides=[*base.overrides, "--model.flavor", flavor, "--diffusion_blocks.num_blocks", "1"])
    if args.equal_compute_row:
        # the judge's run is end to end at 2 x --steps (equal_compute_steps) with another
        # seed: it is the equal-compute model too, trained once (never sampled: a judge
        # scoring its own samples would share their errors)
        assert equal_compute_steps(args.steps) == runs["judge"].steps
        runs[equal_compute_name(args.steps)] = runs["judge"]
    for name, flags in args.lever:
        runs[f"{dblocks}, {name}"] = run(
            f"dblocks_{name}", blocks * args.steps, blocks * args.warmup,
            "--diffusion_blocks.num_blocks", str(blocks), *lever, *flags)
    if args.init_from_e2e:
        e2e_weights = out / "e2e" / checkpoint_folder(runs["end-to-end"].overrides) / f"step-{args.steps}"
        runs[f"{dblocks}, from the end-to-end weights"] = run(
            "dblocks_from_e2e", blocks * args.steps, blocks * args.warmup,
            "--diffusion_blocks.num_blocks", str(blocks),
            "--checkpoint.initial_load_path", str(e2e_weights), *lever,
        )
    return runs


def train_planned_runs(args, runs: dict[str, Run], out: Path) -> None:
    """budget.train_runs: every run once, --parallel-runs at a time, the run started
    from the end-to-end weights after the end-to-end run."""
    # every run has the config's [checkpoint] folder; read from the end-to-end run's
    # arguments, since the run from its weights cannot be parsed before they exist
    folder = checkpoint_folder(runs["end-to-end"].overrides)
    waits_for = {name: "end-to-end" for name, run in runs.items() if run.dump == "dblocks_from_e2e"}
    # --row: the named runs only (another process may be training the others)
    train_runs(selected(runs, args.row), out, folder, args.parallel_runs, args.train_missing, waits_for)


def trained_runs(args, runs: dict[str, Run], out: Path, option: str = "--skip-training") -> dict[str, Run]:
    """--skip-training: the runs whose final checkpoint is there; the others are left
    out with a line each (every row needs the end-to-end run's, the samples the
    judge's)."""
    folder = checkpoint_folder(runs["end-to-end"].overrides)
    kept = {}
    for name, run in runs.items():
        final = out / run.dump / folder / f"step-{run.steps}"
        if (final / ".metadata").is_file():
            kept[name] = run
        else:
            print(f"{name}: no checkpoint {final}, left out", flush=True)
    if "end-to-end" not in kept:
        raise ConfigError(
            f"{option}: every row is compared with the end-to-end run, which has "
            f"no checkpoint in {out / runs['end-to-end'].dump}; train it first")
    if "judge" not in kept and not args.no_samples:
        raise ConfigError(
            f"{option}: the samples need the judge's checkpoint "
            f"({out / runs['judge'].dump}); train it, or add --no-samples")
    return kept


def checkpoint_folder(overrides: list[str]) -> str:
    return parse_job_config(overrides).checkpoint.folder


def load(overrides: list[str], step: int | None = None):
    """The run's model at its latest checkpoint, or at `step`."""
    job_config = parse_job_config(overrides)
    folder = Path(job_config.job.dump_folder) / job_config.checkpoint.folder
    model, tokenizer, _ = load_for_inference(job_config, folder / f"step-{step}" if step else folder)
    return model, tokenizer, job_config.training.seq_len


def scored_models(models: dict) -> dict:
    """The models the report measures: all but the judges."""
    return {name: model for name, model in models.items() if not name.startswith("judge")}


def split_draws(args, sampler: str) -> int:
    """The estimator's split draws: --split-draws for the ancestral sampler, else 0."""
    return args.split_draws if sampler == "ancestral" else 0


def heldout_sampler_ce(args, model, windows, config: DecodingConfig, twin=None):
    return sampler_heldout_ce(
        model, windows, config, args.chains, seed=SAMPLER_CE_SEED, twin=twin,
        chains_per_call=args.chains_per_call, split_draws=split_draws(args, config.sampler))


def sampler_ce_row(args, name: str, model, windows, sampler: str, steps: int, twin) -> dict:
    result = heldout_sampler_ce(
        args, model, windows, DecodingConfig(sampler=sampler, steps_per_block=steps), twin)
    best = result.best_point()
    return {
        "model": name, "sampler": sampler, "steps_per_block": steps, "chains": result.chains,
        "split_draws": result.split_draws,
        "windows": windows.shape[0], "positions": result.positions, "ce": result.ce,
        "stderr": result.stderr,
        "ce_by_chains": {str(k): ce for k, ce in result.ce_by_chains.items()},
        "floor_fraction": result.floor_fraction, "e2e_ce": result.twin_ce,
        "gap_pct": 100 * (result.ce - result.twin_ce) / result.twin_ce,
        "profile": [{"sigma": p.sigma, "block": p.block, "ce": p.ce,
                     "ce_by_chains": {str(k): ce for k, ce in p.ce_by_chains.items()}}
                    for p in result.profile],
        "block_end_ce": {str(b): p.ce for b, p in block_ends(result.profile).items()},
        "block_loss": {str(b): loss for b, loss in block_losses(result.profile).items()},
        "best_stop": {"sigma": best.sigma, "block": best.block, "ce": best.ce,
                      "gap_pct": 100 * (best.ce - result.twin_ce) / result.twin_ce},
    }


def sampler_ce_rows(args, models: dict, windows) -> dict:
    """The headline: every DiffusionBlocks model x sampler x steps per block, its
    sampler's held-out CE on `windows` and the end-to-end model's next-token CE on the
    same windows' same positions."""
    twin = models["end-to-end"]
    plan = [(name, sampler, steps) for name, model in scored_models(models).items()
            if is_denoiser(model) for sampler in args.samplers for steps in args.steps_per_block]
    rows = {}
    for name, sampler, steps in tqdm(plan, desc="sampler CE", unit="row"):
        rows[f"{name} {sampler} {steps}/block"] = sampler_ce_row(
            args, name, models[name], windows, sampler, steps, twin)
    return rows


def print_sampler_ce(args, rows: dict, end_to_end_ce: dict) -> None:
    print(f"\nTHE HEADLINE: the sampler's held-out CE (nats/byte), {args.chains} chains, on "
          f"{args.ce_windows} held-out windows; end to end: next-token CE on the same positions.\n")
    print("End-to-end models on these windows: " + "; ".join(
        f"{name} {ce:.3f}" for name, ce in end_to_end_ce.items()) + "\n")
    print("| model | sampler | steps/block | sampler CE | +-stderr | CE at K/4, K/2, K | "
          "floor fraction | end-to-end CE | gap % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        by_k = ", ".join(f"{ce:.3f}" for ce in r["ce_by_chains"].values())
        print(f"| {r['model']} | {r['sampler']} | {r['steps_per_block']} | {r['ce']:.3f} | "
              f"{r['stderr']:.3f} | {by_k} | {r['floor_fraction']:.4f} | {r['e2e_ce']:.3f} | "
              f"{r['gap_pct']:+.1f} |")
    print("\nWhere the chain decides: the same estimator when each block is done (the "
          "sampler stopped there: --stop-sigma), the rise from the block before, and the "
          "best stop.\n")
    print("| model | sampler | steps/block | CE when each block is done (rise) | best stop: sigma, CE, gap % |")
    print("|---|---|---|---|---|")
    for r in rows.values():
        ends = "; ".join(f"{b}: {ce:.3f} ({r['block_loss'][b]:+.3f})" for b, ce in r["block_end_ce"].items())
        best = r["best_stop"]
        print(f"| {r['model']} | {r['sampler']} | {r['steps_per_block']} | {ends} | "
              f"{best['sigma']:.4g}, {best['ce']:.3f}, {best['gap_pct']:+.1f} |")


def budget_rows(args, runs: dict, models: dict, windows) -> dict:
    """Every measured model at each --budgets fraction of its steps (its intermediate
    checkpoint: the learning-rate schedule of the full run, not a shorter run's):
    end to end, next-token CE; DiffusionBlocks, the default sampler's held-out CE at
    1 step per block; on the sampler CE's windows."""
    budgets = {}
    for fraction in tqdm(args.budgets, desc="budgets", unit="budget"):
        row = {}
        for name, run in runs.items():
            if name.startswith("judge"):
                continue
            (step,) = budget_steps(run.steps, [fraction])
            model = models[name] if step == run.steps else load(run.overrides, step)[0]
            if is_denoiser(model):
                ce = heldout_sampler_ce(args, model, windows, DecodingConfig()).ce
            else:
                ce = next_token_ce(model, windows[:, :-1], windows[:, 1:])
            row[name] = {"step": step, "ce": ce}
        budgets[f"{fraction:g}"] = row
    return budgets


def print_budgets(budgets: dict) -> None:
    names = list(next(iter(budgets.values())))
    print("\nHeld-out CE (nats/byte) at each budget (fraction of each run's steps): end to "
          "end next-token; DiffusionBlocks, the default sampler at 1 step/block.\n")
    print("| budget | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for fraction, row in budgets.items():
        print(f"| {fraction} | " + " | ".join(
            f"{row[n]['ce']:.3f} (step {row[n]['step']})" for n in names) + " |")


def print_tables(args, samples: dict, tf: dict) -> None:
    if samples:
        print_samples(args, samples)
    print_teacher_forced(args, tf)


def print_samples(args, samples: dict) -> None:
    print(f"\nContinuations of {args.prompts} held-out {args.prompt_len}-byte prompts by "
          f"{args.new_tokens} bytes; judge: end to end, {2 * args.steps} steps, another seed.\n")
    print("Secondary: the samples under three judges (nats/byte): end to end (another "
          "seed), the byte 5-gram (Kneser-Ney, the training split) and DiffusionBlocks "
          "(another seed, its sampler's CE); diversity; MAUVE.\n")
    print("| samples | judge CE | 5-gram judge CE | DiffusionBlocks judge CE | distinct-1 | "
          "distinct-2 | distinct-3 | unigram entropy (nats) | MAUVE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, r in samples.items():
        dblocks = f"{r['dblocks_judge_ce']:.3f}" if "dblocks_judge_ce" in r else ""
        print(f"| {row} | {r['judge_ce']:.3f} | {r['ngram_judge_ce']:.3f} | {dblocks} | "
              f"{r['distinct_1']:.3f} | {r['distinct_2']:.3f} | "
              f"{r['distinct_3']:.3f} | {r['unigram_entropy']:.3f} | {r['mauve']:.3f} |")
    for row, r in samples.items():
        print(f"--- {row}:\n{r['example']}\n")


def print_teacher_forced(args, tf: dict) -> None:
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


def sample_sets(args, runs: dict, models: dict, tokenizer, ids: list[int], seq_len: int,
                train_path: Path) -> dict:
    """Steps 3 and 4: every set of continuations of the held-out prompts (real text,
    every model's samples, the single-block rows), scored by the three judges, with
    diversity and MAUVE."""
    judge = models["judge"]
    dblocks_judge = models.get(DBLOCKS_JUDGE)
    ngram = NgramLM.fit(train_path.read_bytes(), order=NGRAM_ORDER)
    span = args.prompt_len + args.new_tokens
    windows = evenly_spaced_windows(ids, span, 2 * args.prompts)
    prompts, truth = windows[0::2, :args.prompt_len], windows[0::2, args.prompt_len:]
    other_prompts, other_truth = windows[1::2, :args.prompt_len], windows[1::2, args.prompt_len:]
    real_features = judge_features(judge, prompts, truth)

    def judged(prompts_BP, continuations_BC, *model_and_decoding) -> dict:
        """score() under the end-to-end judge, and the two judges that share its errors
        with nobody: the byte 5-gram and the DiffusionBlocks judge's sampler."""
        row = score(judge, prompts_BP, continuations_BC, real_features, tokenizer, *model_and_decoding)
        row["ngram_judge_ce"] = judge_ce_on_bytes(ngram, prompts_BP, continuations_BC)
        # ids no byte n-gram can score (BOS/EOS, or the unused ids of a vocabulary
        # wider than 258) are dropped: how many, so a low 5-gram CE cannot hide them
        row["ngram_dropped_fraction"] = float((continuations_BC >= NGRAM_VOCAB).double().mean())
        if dblocks_judge is not None:
            row["dblocks_judge_ce"] = sampler_judge_ce(
                dblocks_judge, prompts_BP, continuations_BC, DecodingConfig(),
                args.judge_chains, seed=JUDGE_SEED, chains_per_call=args.chains_per_call)
        return row

    samples = {
        "held-out text": judged(prompts, truth),
        "held-out text, other prompts": judged(other_prompts, other_truth),
    }
    rows = {row: (name, decoding) for row, (name, decoding) in sample_rows(args, models).items()
            if runs[name] is not runs["judge"]}  # the equal-compute row is the judge's run
    work = sum(args.new_tokens * forwards_per_token(models[m], d) for m, d in rows.values())
    with tqdm(total=work, desc="sampling", unit="forward") as bar:
        for row, (name, decoding) in rows.items():
            bar.set_postfix_str(row)
            per_token = forwards_per_token(models[name], decoding)
            tokens = generate(models[name], prompts, decoding, seq_len,
                              on_token=lambda: bar.update(per_token))
            samples[row] = judged(prompts, tokens[:, args.prompt_len:], name, decoding)
    for name, model in models.items():
        if name.startswith("judge"):
            continue
        for sigma in args.single_block_sigmas if is_denoiser(model) else []:
            row = f"{name} block {owner_of(model.partition, sigma)} alone, sigma {sigma:g}"
            continuations = evaluation.single_block_continuations(
                model, prompts, sigma, args.new_tokens, seq_len)
            samples[row] = judged(prompts, continuations, name)

    return samples


@exit_on_config_error
def main(argv):
    args, run_overrides = parse_args(argv)
    out = Path(args.out)
    check_text_file(args.data)
    train_path, val_text = split_corpus(Path(args.data), out)
    runs = selected(planned_runs(args, run_overrides, train_path), args.row, always=("end-to-end",))
    if "judge" not in runs and not args.no_samples:
        raise ConfigError("--row: the samples need the judge's run; add --row judge or --no-samples")
    seq_len = parse_job_config(runs["end-to-end"].overrides).training.seq_len
    if args.prompt_len + args.new_tokens > seq_len:
        raise ConfigError(f"--prompt-len + --new-tokens must be <= [training] seq_len {seq_len}")
    if args.skip_training:
        runs = trained_runs(args, runs, out)
    else:
        train_planned_runs(args, runs, out)
        if args.row:  # the end-to-end run is measured beside them, trained or not
            runs = trained_runs(args, runs, out, option="--row")

    models, tokenizer = {}, None
    for name, run in runs.items():
        models[name], tokenizer, _ = load(run.overrides)
    ids = tokenizer.encode(val_text)
    eval_windows = evenly_spaced_windows(ids, seq_len + 1, args.eval_windows)
    ce_windows = evenly_spaced_windows(ids, seq_len + 1, args.ce_windows)
    sampler_ce = sampler_ce_rows(args, models, ce_windows)
    end_to_end_ce = {name: next_token_ce(model, ce_windows[:, :-1], ce_windows[:, 1:])
                     for name, model in scored_models(models).items() if not is_denoiser(model)}
    print_sampler_ce(args, sampler_ce, end_to_end_ce)

    samples = {} if args.no_samples else sample_sets(args, runs, models, tokenizer, ids, seq_len, train_path)
    tf = teacher_forced(models, eval_windows, args.sigmas)
    budgets = budget_rows(args, runs, models, ce_windows) if len(args.budgets) > 1 else {}
    print_tables(args, samples, tf)
    result = {"args": vars(args), "sampler_ce": sampler_ce, "end_to_end_ce": end_to_end_ce,
              "samples": samples, "teacher_forced": tf}
    if budgets:
        print_budgets(budgets)
        result["budgets"] = budgets
        (out / "budgets.svg").write_text(budget_svg(budgets, Y_LABEL))
        budget_png(budgets, out / "budgets.png", Y_LABEL)
        print(f"wrote {out / 'budgets.png'} and {out / 'budgets.svg'}")
    report = Path(args.report or out / "report.json")
    report.write_text(json.dumps(result, indent=2))
    print(f"wrote {report}")


if __name__ == "__main__":
    main(sys.argv[1:])
