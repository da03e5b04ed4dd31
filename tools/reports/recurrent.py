"""The recurrent-depth LM: DiffusionBlocks' single-pass recipe vs Huginn's BPTT twin,
LM quality against the inference iterations r, at equal training steps.

    python tools/reports/recurrent.py --data ../shared/data/tinyshakespeare.txt \
        [--job.config_file train_configs/recurrent_debug.toml] [--steps 600] \
        [--recurrences 1,2,4,8,16,32] [--chains 32] [--split-draws 4] [--ce-windows 8]
        [--longer-factor 3] [--twin-longer-factor 3] [--equal-compute-row] [--checkpoint-interval 50]
        [--parallel-runs 2] [--no-samples] [--sampler ancestral|euler|heun]
        [--out outputs/recurrent_report] [--report PATH] [--retrain] [--row NAME ...]
        [--budgets 0.25,0.5,1]
        [--section.key value ...]   (applied to both recurrent trainings)

1. splits the file as tools/reports/lm.py does (the last 10%, at a line break, held out);
2. trains the config with DiffusionBlocks (one core pass per step) and its end-to-end
   twin (`--diffusion_blocks.no_enable`: r drawn per step, truncated BPTT) for the same
   number of optimizer steps; with --longer-factor F also DiffusionBlocks for F x the
   steps (the paper trained its single-pass recipe 3x the epochs); with
   --twin-longer-factor F also the twin for F x the steps (row "twin, Fx steps": the
   twin at a budget where it learns, beside the single pass at equal steps); with
   --equal-compute-row a DiffusionBlocks row at each twin row's training FLOPs (the
   trainer's own count: the twin's extra core passes included; "dblocks, equal compute",
   and "dblocks, equal compute to the Fx steps twin" for the longer twin), read from the
   longer run's checkpoint at that step when it has one, else trained on its own
   (dblocks_equal_compute, dblocks_equal_compute_Fx); and, unless
   --no-samples, a judge: the plain end-to-end llama3 debug model
   (`train_configs/llama3_text.toml`, 8 layers) for the same steps. Runs save every
   --checkpoint-interval steps; a run whose final checkpoint is in --out is not trained
   again (unless --retrain) and an interrupted one resumes from its last checkpoint;
3. THE HEADLINE, for every row and r: the sampler's held-out CE on --ce-windows windows of
   seq_len + 1 bytes, every position (eval.sampler_ce: the denoiser's chain taken by
   --sampler, the default ancestral one with its first --split-draws draws split on the
   true token, --chains chains; the twin's last pass averaged over --chains draws of its
   random start state), at K/4, K/2 and K chains;
   and for every r, with the true held-out context (teacher forcing, every position of
   --windows windows of seq_len bytes): P(true next byte), the probability that the
   sampler at temperature 1 emits the true next byte (the mean over positions of the
   last pass's softmax at the true byte, the denoiser's chain again taken by --sampler:
   one start-noise draw per position, so an
   unbiased estimate of the probability over the start noise too), and the
   cross-entropy of the last pass's logits themselves;
4. unless --no-samples, for every r, continuations (temperature 1) of --prompts held-out
   prompts, scored by the judge (nats/byte; reports/lm.py's generative yardstick),
   beside the real text's.
Prints markdown tables and writes --report (<out>/report.json) after every row; a row it already
holds for the same checkpoint files and evaluation settings is kept, not evaluated again
(--fresh-eval: evaluate every row). --row NAME (repeatable, e.g. --row "twin, 3x steps")
trains and evaluates only the named rows; the others are carried over from the report
where it holds them for the same settings and checkpoint files, else left out.
--budgets F,...: every row also at each fraction F < 1 of its steps ("NAME at F", its
run's checkpoint nearest that step): whether a row still learns.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import diffusion_blocks  # noqa: F401
from diffusion_blocks.config.bounds import AT_LEAST_1, NON_NEGATIVE, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.eval.sampler_ce import chain_counts, mixture_log_probs, sampler_heldout_ce
from diffusion_blocks.errors import ConfigError, exit_on_config_error
from diffusion_blocks.data.text import build_tokenizer
from diffusion_blocks.eval.text import evenly_spaced_windows, judge_ce
from diffusion_blocks.inference import build_model, load_for_inference, single_process_parallel_dims
from diffusion_blocks.models.llama3.sampler import DEFAULT_SAMPLER, DecodingConfig, TOKEN_STEPS
from diffusion_blocks.models.recurrent.sampler import generate, sequence_logits
from diffusion_blocks.training_modes import blockwise_flops_per_token
from budget import budget_fractions, Run, checkpoint_interval, checkpointed, selected, train_runs
from common import common_overrides, split_corpus

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "train_configs" / "recurrent_debug.toml"
JUDGE_CONFIG = REPO / "train_configs" / "llama3_text.toml"
RECIPES = {"dblocks": [], "twin": ["--diffusion_blocks.no_enable"]}
SAMPLER_CE_SEED = 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--recurrences", default="1,2,4,8,16,32")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(REPO / "outputs" / "recurrent_report"))
    parser.add_argument("--retrain", action="store_true",
                        help="train every run again (default: train only what is missing, "
                             "resuming an interrupted run from its last checkpoint)")
    parser.add_argument("--skip-training", action="store_true",
                        help="evaluate the checkpoints in --out as they are (a row whose "
                             "checkpoint is not there yet is left out)")
    parser.add_argument("--fresh-eval", action="store_true",
                        help="evaluate every row again (default: a row report.json holds for the "
                             "same checkpoint files and evaluation settings is kept)")
    parser.add_argument("--longer-factor", type=number_arg(int, AT_LEAST_1), default=1,
                        help="F > 1: a DiffusionBlocks row trained F x --steps (warmup F x)")
    parser.add_argument("--twin-longer-factor", type=number_arg(int, AT_LEAST_1), default=1,
                        help="F > 1: a twin row trained F x --steps (warmup F x)")
    parser.add_argument("--equal-compute-row", action="store_true",
                        help="a DiffusionBlocks row at the twin's training FLOPs")
    parser.add_argument("--checkpoint-interval", type=number_arg(int, AT_LEAST_1), default=None,
                        help="save every N steps as well as at the end (all kept)")
    parser.add_argument("--parallel-runs", type=number_arg(int, AT_LEAST_1), default=1)
    parser.add_argument("--no-samples", action="store_true",
                        help="no judge, no continuations: the sampler's CE and teacher forcing only")
    parser.add_argument("--chains", type=number_arg(int, AT_LEAST_1), default=32,
                        help="chains of the sampler's held-out CE at every r")
    parser.add_argument("--chains-per-call", type=number_arg(int, AT_LEAST_1), default=16)
    parser.add_argument("--split-draws", type=number_arg(int, NON_NEGATIVE), default=4,
                        help="the denoiser's ancestral draws split on the true token "
                             "(eval.sampler_ce; --chains a multiple of 2^D)")
    parser.add_argument("--ce-windows", type=number_arg(int, AT_LEAST_1), default=8,
                        help="held-out windows of seq_len + 1 for the sampler's CE")
    parser.add_argument("--sampler", choices=sorted(TOKEN_STEPS), default=DEFAULT_SAMPLER,
                        help="the denoiser's token sampler for every figure of its rows "
                             "(draws are split only for ancestral)")
    parser.add_argument("--report", default=None, help="default: <out>/report.json")
    parser.add_argument("--budgets", type=budget_fractions, default=[1.0],
                        help="fractions in (0, 1], 1 among them: every row also at each "
                             "fraction of its steps (the nearest checkpoint)")
    parser.add_argument("--row", action="append", default=None, metavar="NAME",
                        help="only this row (repeatable; the row names the report prints)")
    args, rest = parser.parse_known_args(argv)
    if args.sampler == "ancestral" and args.chains % 2 ** args.split_draws:
        parser.error(f"--chains {args.chains}: give a multiple of 2^--split-draws = {2 ** args.split_draws}")
    if not any(a.startswith("--job.config_file") for a in rest):
        rest = ["--job.config_file", str(CONFIG), *rest]
    return args, rest


class Row(NamedTuple):
    recipe: str  # "dblocks" or "twin": how its checkpoint is scored
    run: Run
    step: int    # the checkpoint the row reads


def recipe_run(config_args, train_path: Path, out: Path, dump: str, recipe: str, steps: int,
               warmup: int, interval: int | None, budgets: list[float]) -> Run:
    overrides = [
        *config_args, *RECIPES[recipe],
        "--training.dataset", "text_file", "--training.dataset_path", str(train_path),
        "--job.dump_folder", str(out / dump), "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", str(warmup),
        "--metrics.log_freq", str(min(50, steps)), "--metrics.no_enable_tensorboard",
    ]
    return Run(checkpointed(overrides, steps, interval, budgets), steps, dump)


def training_flops_per_step(overrides: list[str]) -> int:
    """The trainer's own FLOPs count of one optimizer step (torchtitan's per-token count,
    the twin's extra core passes and the single pass's 2T sequence included)."""
    job_config = parse_job_config(overrides)
    model, model_args, _ = build_model(job_config, torch.device("cpu"), single_process_parallel_dims())
    seq_len = job_config.training.seq_len
    flops = model_args.get_nparams_and_flops(model, seq_len)[1]
    if job_config.diffusion_blocks.enable:
        flops = blockwise_flops_per_token(model, seq_len, flops)
    return flops * seq_len * job_config.training.local_batch_size


def planned_rows(args, config_args, train_path: Path, out: Path) -> tuple[dict[str, Row], dict[str, int]]:
    """The rows (each a run's checkpoint) and the training FLOPs per step of each recipe."""
    def run(dump: str, recipe: str, steps: int, warmup: int) -> Run:
        return recipe_run(config_args, train_path, out, dump, recipe, steps, warmup,
                          args.checkpoint_interval, args.budgets)

    rows = {recipe: Row(recipe, run(recipe, recipe, args.steps, args.warmup), args.steps)
            for recipe in RECIPES}
    flops = {recipe: training_flops_per_step(row.run.overrides) for recipe, row in rows.items()}
    longer = None
    if args.longer_factor > 1:
        factor = args.longer_factor
        longer = run(f"dblocks_{factor}x", "dblocks", factor * args.steps, factor * args.warmup)
        rows[f"dblocks, {factor}x steps"] = Row("dblocks", longer, longer.steps)
    # each twin row: (the suffix of its equal-compute row's name, of that row's dump)
    twins = {"": ("", rows["twin"])}
    if args.twin_longer_factor > 1:
        factor = args.twin_longer_factor
        twin_longer = run(f"twin_{factor}x", "twin", factor * args.steps, factor * args.warmup)
        rows[f"twin, {factor}x steps"] = Row("twin", twin_longer, twin_longer.steps)
        twins[f" to the {factor}x steps twin"] = (f"_{factor}x", rows[f"twin, {factor}x steps"])
    if args.equal_compute_row:
        for suffix, (dump_suffix, twin) in twins.items():
            target = twin.step * flops["twin"] / flops["dblocks"]
            if longer is not None and target <= longer.steps:
                # the longer run's nearest checkpoint (its learning rate not yet decayed)
                step = nearest_checkpoint(longer, target, args)
                rows[f"dblocks, equal compute{suffix}"] = Row("dblocks", longer, step)
            else:
                steps = max(1, round(target))
                own = run(f"dblocks_equal_compute{dump_suffix}", "dblocks", steps,
                          round(args.warmup * steps / args.steps))
                rows[f"dblocks, equal compute{suffix}"] = Row("dblocks", own, steps)
    return rows, flops


def nearest_checkpoint(run: Run, step: float, args) -> int:
    """The step of the run's checkpoint nearest `step` (it saves every interval)."""
    interval = checkpoint_interval(run.steps, args.checkpoint_interval, args.budgets)
    return max(interval, interval * round(step / interval))


def with_budgets(rows: dict[str, Row], args) -> dict[str, Row]:
    """Each row, then the same row at each --budgets fraction < 1 of its steps."""
    result = {}
    for name, row in rows.items():
        result[name] = row
        for fraction in sorted(f for f in args.budgets if f < 1):
            step = nearest_checkpoint(row.run, fraction * row.step, args)
            result[f"{name} at {fraction:g}"] = Row(row.recipe, row.run, step)
    return result


def kept_result(reusable: dict, name: str, folder: Path) -> dict | None:
    """The row report.json holds for this checkpoint file, evaluated with the same
    settings (None when it holds none)."""
    kept = reusable.get(name, {})
    if not (folder / ".metadata").is_file():
        return None
    written = (folder / ".metadata").stat().st_mtime
    if kept.get("checkpoint") == str(folder) and kept.get("checkpoint_mtime") == written:
        return kept
    return None


@torch.no_grad()
def teacher_forced(model, windows_BS: torch.Tensor, recurrence: int, sampler: str, batch: int = 8):
    """(P(true next byte), CE of the last pass's logits) over every position, the
    denoiser's chain taken by `sampler` (the twin has none)."""
    generator = torch.Generator().manual_seed(0)
    p_true, ce, count = 0.0, 0.0, 0
    for chunk in windows_BS.split(batch):
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        logits = sequence_logits(model, inputs, recurrence, generator, token_sampler=sampler)
        log_probs = F.log_softmax(logits.float(), -1)
        true_BT = log_probs.gather(-1, labels[..., None]).squeeze(-1)
        p_true += float(true_BT.exp().sum())
        ce -= float(true_BT.sum())
        count += labels.numel()
    return p_true / count, ce / count


@torch.no_grad()
def twin_mixture_ce(model, windows_BS: torch.Tensor, recurrence: int, chains: int) -> dict:
    """The twin's held-out CE as the sampler's: the last pass's softmax averaged over
    `chains` draws of its random start state (the twin's only randomness), at K/4, K/2
    and K draws, every position of the windows."""
    generator = torch.Generator().manual_seed(SAMPLER_CE_SEED)
    inputs, labels = windows_BS[:, :-1], windows_BS[:, 1:]
    log_probs_KN = torch.stack([
        F.log_softmax(sequence_logits(model, inputs, recurrence, generator).double(), -1)
        .gather(-1, labels[..., None]).flatten()
        for _ in range(chains)])
    by_chains = {k: float(-mixture_log_probs(log_probs_KN, k).mean()) for k in chain_counts(chains)}
    return {"ce": by_chains[chains], "ce_by_chains": {str(k): ce for k, ce in by_chains.items()}}


def sampler_ce_at(model, recipe: str, windows_BS: torch.Tensor, recurrence: int, args) -> dict:
    """The sampler's held-out CE at r: the denoiser's chain (eval.sampler_ce, --sampler,
    the ancestral sampler's first --split-draws draws split) or the twin's."""
    if recipe == "twin":
        return twin_mixture_ce(model, windows_BS, recurrence, args.chains)
    split_draws = args.split_draws if args.sampler == "ancestral" else 0
    config = DecodingConfig(sampler=args.sampler, steps_per_block=recurrence)
    result = sampler_heldout_ce(model, windows_BS, config, args.chains, seed=SAMPLER_CE_SEED,
                                chains_per_call=args.chains_per_call, split_draws=split_draws)
    return {"ce": result.ce, "ce_by_chains": {str(k): ce for k, ce in result.ce_by_chains.items()},
            "split_draws": result.split_draws}


def evaluation_settings(args) -> dict:
    """What a row's figures depend on besides its checkpoint (report.json "evaluation")."""
    keys = ("sampler", "chains", "split_draws", "ce_windows", "windows", "no_samples", "prompts",
            "prompt_len", "new_tokens")
    return {"recurrences": args.recurrence_list, **{k: getattr(args, k) for k in keys}}


def row_results(model, recipe: str, held_out_ids, judged, args, seq_len: int, tokenizer) -> dict:
    """Every r's figures of one checkpoint; `judged` = (judge, prompts, truth) or None."""
    windows = evenly_spaced_windows(held_out_ids, 1 + seq_len, args.windows)
    ce_windows = evenly_spaced_windows(held_out_ids, 1 + seq_len, args.ce_windows)
    per_r, samples = {}, {}
    for r in args.recurrence_list:
        p_true, ce = teacher_forced(model, windows, r, args.sampler)
        sampler_ce = sampler_ce_at(model, recipe, ce_windows, r, args)
        row = {"sampler_ce": sampler_ce["ce"], "sampler_ce_by_chains": sampler_ce["ce_by_chains"],
               "p_true_next": p_true, "last_pass_ce": ce}
        if judged is not None:
            judge, prompts, _ = judged
            decoding = DecodingConfig(max_new_tokens=args.new_tokens, steps_per_block=r,
                                      sampler=args.sampler, temperature=1.0, seed=0)
            tokens = generate(model, prompts, decoding, seq_len)
            row["judge_ce"] = judge_ce(judge, prompts, tokens[:, args.prompt_len:])
            samples[str(r)] = tokenizer.decode(tokens[0, args.prompt_len:].tolist())
        per_r[str(r)] = row
        print(recipe, r, row, repr(samples.get(str(r), "")), flush=True)
    return {"per_r": per_r, "samples": samples}


@exit_on_config_error
def main(argv):
    args, config_args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    train_path, val_text = split_corpus(Path(args.data), out)
    args.recurrence_list = [int(r) for r in args.recurrences.split(",")]
    planned, flops = planned_rows(args, config_args, train_path, out)
    rows = with_budgets(selected(planned, args.row), args)
    planned = with_budgets(planned, args)
    runs = {name: row.run for name, row in rows.items()}
    if not args.no_samples:
        judge_run = Run(common_overrides(JUDGE_CONFIG, train_path, out / "judge", args.steps,
                                         args.warmup) + ["--diffusion_blocks.no_enable"],
                        args.steps, "judge")
        runs["judge"] = judge_run
    if not args.skip_training:
        train_runs(runs, out, "checkpoint", args.parallel_runs, train_missing=not args.retrain)

    report_path = Path(args.report) if args.report else out / "report.json"
    settings = evaluation_settings(args)
    previous = json.loads(report_path.read_text()) if report_path.is_file() else {}
    # rows evaluated already, with these settings, on the same checkpoint files
    reusable = previous.get("rows", {}) if previous.get("evaluation") == settings and not args.fresh_eval else {}
    report = {"steps": args.steps, "recurrences": args.recurrence_list, "evaluation": settings,
              "train_flops_per_step": flops, "rows": {}}
    tokenizer = build_tokenizer(parse_job_config(planned["twin"].run.overrides))
    held_out_ids = tokenizer.encode(val_text)
    judged = None
    if not args.no_samples:
        judge = load_for_inference(parse_job_config(judge_run.overrides), out / "judge" / "checkpoint")[0]
        windows = evenly_spaced_windows(held_out_ids, args.prompt_len + args.new_tokens, args.prompts)
        judged = judge, windows[:, :args.prompt_len], windows[:, args.prompt_len:]
        report["real_text_judge_ce"] = judge_ce(judge, judged[1], judged[2])
    for name, row in planned.items():
        job_config = parse_job_config(row.run.overrides)
        folder = out / row.run.dump / job_config.checkpoint.folder / f"step-{row.step}"
        kept = kept_result(reusable, name, folder)
        if name not in rows:
            print(f"{name}: not a --row, " + ("carried over from the report" if kept else "left out"),
                  flush=True)
            if kept:
                report["rows"][name] = kept
            continue
        if args.skip_training and not (folder / ".metadata").is_file():
            print(f"{name}: no checkpoint {folder} yet, left out", flush=True)
            continue
        if kept:
            print(f"{name}: {folder} evaluated already with these settings, kept", flush=True)
            report["rows"][name] = kept
            continue
        written = (folder / ".metadata").stat().st_mtime
        model = load_for_inference(job_config, folder)[0]
        report["rows"][name] = {
            "recipe": row.recipe, "checkpoint": str(folder), "checkpoint_mtime": written,
            "steps": row.step, "train_flops": flops[row.recipe] * row.step,
            **row_results(model, row.recipe, held_out_ids, judged, args,
                          job_config.training.seq_len, tokenizer),
        }
        report_path.write_text(json.dumps(report, indent=2))
    report_path.write_text(json.dumps(report, indent=2))  # with the rows kept after the last one evaluated
    print_tables(report, args)
    print(f"wrote {report_path}")


def print_tables(report: dict, args) -> None:
    recurrences = report["recurrences"]
    header = "| r (core iterations per token) | " + " | ".join(map(str, recurrences)) + " |"
    rule = "|---|" + "---|" * len(recurrences)
    for key, what in (("sampler_ce", f"THE HEADLINE: the sampler's held-out CE (nats/byte), "
                                     f"{args.chains} chains, {args.ce_windows} windows"),
                      ("p_true_next", "P(true next byte), teacher forcing"),
                      ("judge_ce", "CE of samples under the judge (nats/byte)"),
                      ("last_pass_ce", "CE of the last pass's logits (nats/byte)")):
        lines = [f"| {name} (step {result['steps']}, {result['train_flops']:.3g} training FLOPs) | "
                 + " | ".join(f"{result['per_r'][str(r)][key]:.3f}" for r in recurrences) + " |"
                 for name, result in report["rows"].items() if key in result["per_r"][str(recurrences[0])]]
        if lines:
            print(f"\n{what}\n{header}\n{rule}\n" + "\n".join(lines))
    if "real_text_judge_ce" in report:
        print(f"\nthe real held-out text under the judge: {report['real_text_judge_ce']:.3f} nats/byte")


if __name__ == "__main__":
    main(sys.argv[1:])
